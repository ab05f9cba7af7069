// alexnet_fast::sgd_step_: PyTorch's SGD step over a list of float32 parameters, which also writes
// each parameter's low-precision (bfloat16 / float16) copy for autocast in the same pass
// (alexnet_fast/optim.py says why). The element rule is shared by the CPU and CUDA kernels; the
// argument checks are shared by both entry points.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "checks.h"

#if defined(__CUDACC__)
#define ALEXNET_FAST_HOST_DEVICE __host__ __device__
#else
#define ALEXNET_FAST_HOST_DEVICE
#endif

namespace alexnet_fast {

struct SgdArgs {
  double lr, weight_decay, momentum, dampening;
  bool nesterov, maximize, first_step;
};

// One element of torch.optim.SGD's rule (maximize negates the gradient before the weight decay, as
// its for-each step does), evaluated as PyTorch's fused CUDA step evaluates it: the
// hyper-parameters are doubles, so each expression is computed in double and rounded to float
// where that kernel stores it; nesterov uses the unrounded momentum. `buf` is null without
// momentum. Returns the new parameter.
ALEXNET_FAST_HOST_DEVICE inline float sgd_element(float& p, float g, float* buf, const SgdArgs& a) {
  if (a.maximize) g = -g;
  if (a.weight_decay != 0) g = static_cast<float>(g + a.weight_decay * p);
  if (buf != nullptr) {
    const double m = a.first_step ? static_cast<double>(g) : a.momentum * *buf + (1 - a.dampening) * g;
    *buf = static_cast<float>(m);
    g = static_cast<float>(a.nesterov ? g + a.momentum * m : m);
  }
  p = static_cast<float>(p - a.lr * g);
  return p;
}

// Checks the lists (one entry per parameter; momentum_buffers empty without momentum, copies
// empty when none are kept) and returns whether momentum buffers are in use.
inline bool check_sgd_args(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                           at::TensorList copies, double momentum) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n, "grads must have one tensor per parameter (", n, "), got ", grads.size());
  const bool buffered = momentum != 0;
  TORCH_CHECK(momentum_buffers.size() == (buffered ? n : 0), "momentum_buffers must have ", buffered ? n : 0,
              " tensors (one per parameter with momentum ", momentum, "), got ", momentum_buffers.size());
  TORCH_CHECK(copies.empty() || copies.size() == n, "copies must be empty or have one tensor per parameter (", n,
              "), got ", copies.size());
  const auto same_geometry = [](const at::Tensor& t, const at::Tensor& p, const char* what, size_t i) {
    TORCH_CHECK(t.layout() == at::kStrided, what, "[", i, "] must be a dense tensor, got layout ", t.layout());
    TORCH_CHECK(t.device() == p.device(), what, "[", i, "] must be on ", p.device(), ", got ", t.device());
    TORCH_CHECK(t.sizes() == p.sizes() && t.strides() == p.strides(), what, "[", i,
                "] must have the parameter's shape and strides ", p.sizes(), " ", p.strides(), ", got ", t.sizes(),
                " ", t.strides());
  };
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.scalar_type() == at::kFloat, "params[", i, "] must be float32, got ", p.scalar_type());
    TORCH_CHECK(p.layout() == at::kStrided && p.is_non_overlapping_and_dense(), "params[", i,
                "] must be a dense, non-overlapping tensor");
    TORCH_CHECK(p.device() == params[0].device(), "params must share one device: params[0] is on ",
                params[0].device(), ", params[", i, "] on ", p.device());
    same_geometry(grads[i], p, "grads", i);
    TORCH_CHECK(grads[i].scalar_type() == at::kFloat, "grads[", i, "] must be float32, got ",
                grads[i].scalar_type());
    if (buffered) {
      same_geometry(momentum_buffers[i], p, "momentum_buffers", i);
      TORCH_CHECK(momentum_buffers[i].scalar_type() == at::kFloat, "momentum_buffers[", i,
                  "] must be float32, got ", momentum_buffers[i].scalar_type());
    }
    if (!copies.empty()) {
      same_geometry(copies[i], p, "copies", i);
      const auto dtype = copies[i].scalar_type();
      TORCH_CHECK(dtype == at::kBFloat16 || dtype == at::kHalf, "copies[", i,
                  "] must be bfloat16 or float16, got ", dtype);
    }
  }
  return buffered;
}

}  // namespace alexnet_fast
