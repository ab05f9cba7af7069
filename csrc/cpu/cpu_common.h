// Helpers shared by the CPU kernels: index-space iteration in a tensor's memory order, the
// max-pool window rule, and the entry points one CPU file calls in another.
#pragma once
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "checks.h"
#include "poison.h"
#include "pool_shape.h"

namespace alexnet_fast::cpu {

// True when a tensor is best visited channel-innermost (its memory order is N, H, W, C).
inline bool is_channels_last(const at::Tensor& t) {
  return output_memory_format(t) == at::MemoryFormat::ChannelsLast;
}

// Element offset of (n, c, h, w) in a 4-D tensor, read through its strides (any layout).
struct Strides4 {
  int64_t n, c, h, w;
  explicit Strides4(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
  int64_t operator()(int64_t in, int64_t ic, int64_t ih, int64_t iw) const {
    return in * n + ic * c + ih * h + iw * w;
  }
};

// Calls f(n, c, h, w) for every index of an [N, C, H, W] space, in parallel, visiting the indices
// in the memory order of an NCHW (channels_last = false) or NHWC tensor so that writes stream.
// `work` is the rough cost of one call in elementary operations; it sizes the parallel chunks.
template <typename F>
void parallel_for_nchw(int64_t N, int64_t C, int64_t H, int64_t W, bool channels_last, int64_t work,
                       const F& f) {
  const int64_t total = N * C * H * W;
  if (total == 0) return;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    int64_t n, c, h, w, r = begin;
    if (channels_last) {
      c = r % C, r /= C, w = r % W, r /= W, h = r % H, n = r / H;
    } else {
      w = r % W, r /= W, h = r % H, r /= H, c = r % C, n = r / C;
    }
    for (int64_t i = begin; i < end; ++i) {
      f(n, c, h, w);
      if (channels_last) {
        if (++c == C) {
          c = 0;
          if (++w == W) {
            w = 0;
            if (++h == H) h = 0, ++n;
          }
        }
      } else if (++w == W) {
        w = 0;
        if (++h == H) {
          h = 0;
          if (++c == C) c = 0, ++n;
        }
      }
    }
  });
}

// PyTorch's max-pool rule: the running maximum starts at -inf on the window's first valid
// element and is replaced by an element that is greater or NaN, scanning row-major. So ties keep
// the first maximum, a NaN wins (the last NaN when several), and an all -inf window gives its
// first element.
template <typename acc_t>
struct WindowMax {
  acc_t value = -std::numeric_limits<acc_t>::infinity();
  int64_t offset;
  explicit WindowMax(int64_t first_offset) : offset(first_offset) {}
  void update(acc_t v, int64_t off) {
    if (v > value || std::isnan(v)) value = v, offset = off;
  }
};

// grad_x[n, c, ih, iw] = sum of grad_out over the windows whose winner (indices) is (ih, iw),
// summed in the order PyTorch's scatter adds them (oh, then ow), whatever grad_x's layout; every
// element of grad_x is written once, by one thread. Defined in max_pool_cpu.cpp.
void max_pool2d_backward_into(const at::Tensor& grad_out, const at::Tensor& indices, at::Tensor& grad_x,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding);

}  // namespace alexnet_fast::cpu
