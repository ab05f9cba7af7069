// Pooling shapes and argument checks, shared by the CPU and CUDA kernels (the same rules as
// alexnet_fast/reference.py and alexnet_fast/ops.py).
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <utility>

#include "checks.h"

namespace alexnet_fast {

// reference.pool_output_size: a last (ceil_mode) window must start inside the input or its left
// padding.
inline int64_t pool_output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding, bool ceil_mode) {
  const int64_t num = size + 2 * padding - kernel;
  if (num < 0) return 0;
  int64_t out = (num + (ceil_mode ? stride - 1 : 0)) / stride + 1;
  if (ceil_mode && (out - 1) * stride >= size + padding) --out;
  return out;
}

// uint8 window offsets hold kernel areas up to 256 (alexnet_fast.ops.MAX_POOL_WINDOW).
constexpr int64_t kMaxPoolWindow = 256;

inline void check_pool_params(at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  CHECK_PAIR(kernel_size);
  CHECK_PAIR(stride);
  CHECK_PAIR(padding);
  CHECK_POSITIVE(kernel_size[0]);
  CHECK_POSITIVE(kernel_size[1]);
  CHECK_POSITIVE(stride[0]);
  CHECK_POSITIVE(stride[1]);
  CHECK_NONNEGATIVE(padding[0]);
  CHECK_NONNEGATIVE(padding[1]);
  // the kernels hold pooling geometry in 32-bit ints
  TORCH_CHECK(stride[0] <= INT32_MAX && stride[1] <= INT32_MAX && kernel_size[0] <= INT32_MAX &&
                  kernel_size[1] <= INT32_MAX && padding[0] <= INT32_MAX && padding[1] <= INT32_MAX,
              "kernel_size, stride and padding must fit in 32 bits, got ", kernel_size, ", ", stride, ", ", padding);
  TORCH_CHECK(kernel_size[0] * kernel_size[1] <= kMaxPoolWindow, "kernel_size ", kernel_size, " has more than ",
              kMaxPoolWindow, " elements (indices are uint8)");
  TORCH_CHECK(2 * padding[0] <= kernel_size[0] && 2 * padding[1] <= kernel_size[1], "padding ", padding,
              " must be at most half of kernel_size ", kernel_size);
}

// The pooled (OH, OW) of an input of spatial size (H, W); errors when a window does not fit.
inline std::pair<int64_t, int64_t> pool_output_hw(int64_t H, int64_t W, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode) {
  const int64_t OH = pool_output_size(H, kernel_size[0], stride[0], padding[0], ceil_mode);
  const int64_t OW = pool_output_size(W, kernel_size[1], stride[1], padding[1], ceil_mode);
  TORCH_CHECK(OH >= 1 && OW >= 1, "kernel_size ", kernel_size, " is larger than the padded input (", H, ", ", W,
              ") with padding ", padding, ": the output would be empty");
  return {OH, OW};
}

}  // namespace alexnet_fast
