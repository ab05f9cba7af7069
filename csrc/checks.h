// Argument checks shared by the CPU and CUDA kernels. Every message names the argument and what
// was expected, so a bad call from Python reads as a sentence, not a crash.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#define CHECK_4D(x) \
  TORCH_CHECK((x).dim() == 4, #x " must be a 4-D (N, C, H, W) tensor, got ", (x).dim(), " dimensions")

#define CHECK_FLOATING(x)                                                               \
  TORCH_CHECK(at::isFloatingType((x).scalar_type()),                                    \
              #x " must be a floating-point tensor (float32, float64, float16 or bfloat16), got ", \
              (x).scalar_type())

#define CHECK_SAME_DTYPE(x, y)                                                                 \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #y " must have the dtype of " #x " (", \
              (x).scalar_type(), "), got ", (y).scalar_type())

#define CHECK_SAME_DEVICE(x, y)                                                                  \
  TORCH_CHECK((x).device() == (y).device(), #y " must be on the device of " #x " (", (x).device(), \
              "), got ", (y).device())

#define CHECK_DEVICE_TYPE(x, device_type) \
  TORCH_CHECK((x).device().type() == (device_type), #x " must be a ", (device_type), " tensor, got ", (x).device())

#define CHECK_POSITIVE(v) TORCH_CHECK((v) > 0, #v " must be positive, got ", (v))

#define CHECK_NONNEGATIVE(v) TORCH_CHECK((v) >= 0, #v " must be non-negative, got ", (v))

#define CHECK_PAIR(v) TORCH_CHECK((v).size() == 2, #v " must have 2 values (h, w), got ", (v).size())

#define CHECK_SHAPE(x, ...)                                                                   \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape ",        \
              at::IntArrayRef({__VA_ARGS__}), ", got ", (x).sizes())

// The layout our kernels write: channels_last for channels_last inputs, contiguous otherwise
// (the same rule as alexnet_fast.ops.output_memory_format, which the fake kernels use).
inline at::MemoryFormat output_memory_format(const at::Tensor& x) {
  if (!x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}
