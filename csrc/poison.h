// A debug switch shared by the CPU and CUDA kernels: with ALEXNET_FAST_POISON_OUTPUTS=1 in the
// environment (read once per process), every buffer a kernel allocates and then writes in full is
// filled before the kernel runs, so an element the kernel forgets to write shows up in the result
// instead of silently keeping whatever the memory held (zeros, or the same op's last output).
// The Python side reads the same variable: alexnet_fast.backends.POISON_ENV_VAR.
//
// Buffers that are meant to start as zero (accumulators, zero padding) are allocated as zeros and
// never passed through poison_if_debug.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "pool_shape.h"

namespace alexnet_fast {

inline bool poison_outputs_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("ALEXNET_FAST_POISON_OUTPUTS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return enabled;
}

// The poison of the uint8 max-pool window offsets. Windows hold up to kMaxPoolWindow = 256
// elements, so 255 is a valid offset, but only for a window of exactly 256 elements (16 x 16,
// say); for every smaller window, AlexNet's 3 x 3 included, an unwritten offset of 255 points
// outside the window and fails any comparison with the reference indices or the gradient that
// follows them.
constexpr uint8_t kIndexPoison = 0xFF;
static_assert(kMaxPoolWindow - 1 == kIndexPoison, "255 is in range only for the largest window");

// `t` filled with NaN (floating) or kIndexPoison (uint8) when the switch is on, else untouched.
// On CUDA the fill runs on the current stream, ahead of the kernel that writes `t`.
inline at::Tensor poison_if_debug(at::Tensor t) {
  if (!poison_outputs_enabled() || t.numel() == 0) return t;
  if (at::isFloatingType(t.scalar_type())) {
    t.fill_(std::numeric_limits<double>::quiet_NaN());
  } else {
    TORCH_INTERNAL_ASSERT(t.scalar_type() == at::kByte, "poison_if_debug: no poison value for ",
                          t.scalar_type());
    t.fill_(static_cast<int64_t>(kIndexPoison));
  }
  return t;
}

}  // namespace alexnet_fast
