// CPU kernel of sgd_step_ (csrc/sgd.h): the element rule over each parameter's storage in memory
// order, in parallel chunks.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "sgd.h"

namespace alexnet_fast::cpu {
namespace {

template <typename Low>
void sgd_tensor(const at::Tensor& p, const at::Tensor& g, const at::Tensor* buf, const at::Tensor* copy,
                const SgdArgs& a) {
  float* pp = p.mutable_data_ptr<float>();
  const float* gp = g.const_data_ptr<float>();
  float* bp = buf ? buf->mutable_data_ptr<float>() : nullptr;
  Low* lp = copy ? copy->mutable_data_ptr<Low>() : nullptr;
  at::parallel_for(0, p.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const float v = sgd_element(pp[i], gp[i], bp ? bp + i : nullptr, a);
      if (lp) lp[i] = static_cast<Low>(v);
    }
  });
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  at::TensorList copies, double lr, double weight_decay, double momentum, double dampening,
                  bool nesterov, bool maximize, bool first_step) {
  const bool buffered = check_sgd_args(params, grads, momentum_buffers, copies, momentum);
  const SgdArgs a{lr, weight_decay, momentum, dampening, nesterov, maximize, first_step};
  for (size_t i = 0; i < params.size(); ++i) {
    const at::Tensor* buf = buffered ? &momentum_buffers[i] : nullptr;
    const at::Tensor* copy = copies.empty() ? nullptr : &copies[i];
    if (copy && copy->scalar_type() == at::kHalf) {
      sgd_tensor<at::Half>(params[i], grads[i], buf, copy, a);
    } else {
      sgd_tensor<at::BFloat16>(params[i], grads[i], buf, copy, a);
    }
  }
}

}  // namespace
}  // namespace alexnet_fast::cpu

TORCH_LIBRARY_IMPL(alexnet_fast, CPU, m) { m.impl("sgd_step_", &alexnet_fast::cpu::sgd_step_cpu); }
