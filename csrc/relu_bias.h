// relu_backward_bias, shared by the CPU and CUDA kernels: PyTorch's ReLU gradient
// threshold_backward(grad_out, out, 0) (a NaN output passes its gradient) and its per-channel sum,
// the bias gradient of a conv+bias+ReLU (in grad_out's dtype, added up in float or double).
#pragma once
#include <ATen/ATen.h>

#include <tuple>

#include "checks.h"

inline void check_relu_backward_bias(const at::Tensor& grad_out, const at::Tensor& out) {
  CHECK_4D(grad_out);
  CHECK_FLOATING(grad_out);
  CHECK_SAME_DTYPE(grad_out, out);
  CHECK_SAME_DEVICE(grad_out, out);
  TORCH_CHECK(out.sizes() == grad_out.sizes(), "out must have the shape of grad_out (", grad_out.sizes(), "), got ",
              out.sizes());
}

// Two passes (the mask, then the sum); the result in out's layout, as the fake kernel says.
inline std::tuple<at::Tensor, at::Tensor> relu_backward_bias_unfused(const at::Tensor& grad_out, const at::Tensor& out) {
  const auto fmt = output_memory_format(out);
  at::Tensor masked = at::empty(grad_out.sizes(), grad_out.options().memory_format(fmt));
  at::threshold_backward_out(masked, grad_out.contiguous(fmt), out.contiguous(fmt), 0);
  const auto acc = masked.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {masked, masked.sum({0, 2, 3}, false, acc).to(masked.scalar_type())};
}
