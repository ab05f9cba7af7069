// CUDA kernel of sgd_step_ (csrc/sgd.h): one grid-stride launch per parameter over its storage,
// four elements (16 bytes of each float32 tensor) per step where the pointers allow. Moves 20
// bytes per element with momentum (parameter, gradient and buffer read; parameter and buffer
// written) plus 2 for the low-precision copy.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/cuda_common.cuh"
#include "sgd.h"

namespace alexnet_fast::gpu {
namespace {

constexpr int kSgdVec = 4;

template <typename Low, bool kBuffer, bool kCopy, bool kVector>
__global__ void __launch_bounds__(kThreads)
    sgd_step_kernel(float* __restrict__ p, const float* __restrict__ g, float* __restrict__ buf,
                    Low* __restrict__ low, int64_t n, SgdArgs a) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t t0 = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  int64_t scalar_from = 0;
  if constexpr (kVector) {
    const int64_t vectors = n / kSgdVec;
    for (int64_t v = t0; v < vectors; v += stride) {
      const int64_t e = v * kSgdVec;
      float pv[kSgdVec], gv[kSgdVec], bv[kSgdVec];
      load_as<kSgdVec>(p + e, pv);
      load_as<kSgdVec>(g + e, gv);
      if constexpr (kBuffer) load_as<kSgdVec>(buf + e, bv);
#pragma unroll
      for (int i = 0; i < kSgdVec; ++i) sgd_element(pv[i], gv[i], kBuffer ? &bv[i] : nullptr, a);
      store_as<kSgdVec>(p + e, pv);
      if constexpr (kBuffer) store_as<kSgdVec>(buf + e, bv);
      if constexpr (kCopy) store_as<kSgdVec>(low + e, pv);
    }
    scalar_from = vectors * kSgdVec;
  }
  for (int64_t e = scalar_from + t0; e < n; e += stride) {
    float pe = p[e];
    sgd_element(pe, g[e], kBuffer ? buf + e : nullptr, a);
    p[e] = pe;
    if constexpr (kCopy) low[e] = static_cast<Low>(pe);
  }
}

template <typename Low, bool kBuffer, bool kCopy>
void launch(const at::Tensor& p, const at::Tensor& g, const at::Tensor* buf, const at::Tensor* copy,
            const SgdArgs& a, cudaStream_t stream) {
  const int64_t n = p.numel();
  float* bp = kBuffer ? buf->mutable_data_ptr<float>() : nullptr;
  Low* lp = kCopy ? copy->mutable_data_ptr<Low>() : nullptr;
  // the copy holds half the bytes: 8-byte alignment gives it whole vectors
  const bool vector = aligned_to(p, 16) && aligned_to(g, 16) && (!kBuffer || aligned_to(*buf, 16)) &&
                      (!kCopy || aligned_to(*copy, 8));
  const unsigned blocks = strided_grid(vector ? ceil_div(n, int64_t(kSgdVec)) : n);
  const auto kernel = vector ? sgd_step_kernel<Low, kBuffer, kCopy, true> : sgd_step_kernel<Low, kBuffer, kCopy, false>;
  kernel<<<blocks, kThreads, 0, stream>>>(p.mutable_data_ptr<float>(), g.const_data_ptr<float>(), bp, lp, n, a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename Low>
void sgd_tensor(const at::Tensor& p, const at::Tensor& g, const at::Tensor* buf, const at::Tensor* copy,
                const SgdArgs& a, cudaStream_t stream) {
  if (buf && copy) return launch<Low, true, true>(p, g, buf, copy, a, stream);
  if (buf) return launch<Low, true, false>(p, g, buf, copy, a, stream);
  if (copy) return launch<Low, false, true>(p, g, buf, copy, a, stream);
  launch<Low, false, false>(p, g, buf, copy, a, stream);
}

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                   at::TensorList copies, double lr, double weight_decay, double momentum, double dampening,
                   bool nesterov, bool maximize, bool first_step) {
  const bool buffered = check_sgd_args(params, grads, momentum_buffers, copies, momentum);
  if (params.empty()) return;
  const c10::cuda::CUDAGuard guard(params[0].device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const SgdArgs a{lr, weight_decay, momentum, dampening, nesterov, maximize, first_step};
  for (size_t i = 0; i < params.size(); ++i) {
    if (params[i].numel() == 0) continue;
    const at::Tensor* buf = buffered ? &momentum_buffers[i] : nullptr;
    const at::Tensor* copy = copies.empty() ? nullptr : &copies[i];
    if (copy && copy->scalar_type() == at::kHalf) {
      sgd_tensor<at::Half>(params[i], grads[i], buf, copy, a, stream);
    } else {
      sgd_tensor<at::BFloat16>(params[i], grads[i], buf, copy, a, stream);
    }
  }
}

}  // namespace
}  // namespace alexnet_fast::gpu

TORCH_LIBRARY_IMPL(alexnet_fast, CUDA, m) { m.impl("sgd_step_", &alexnet_fast::gpu::sgd_step_cuda); }
