// CPU kernels of max_pool2d and its backward: one output (or one input gradient) element per
// iteration, read through strides, so every layout runs without a copy.
#include <torch/library.h>

#include "cpu/cpu_common.h"

namespace alexnet_fast::cpu {
namespace {

std::tuple<at::Tensor, at::Tensor> max_pool2d_cpu(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                  at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode) {
  CHECK_4D(x);
  CHECK_FLOATING(x);
  check_pool_params(kernel_size, stride, padding);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  int64_t OH, OW;
  std::tie(OH, OW) = pool_output_hw(H, W, kernel_size, stride, padding, ceil_mode);
  const auto fmt = output_memory_format(x);
  at::Tensor out = poison_if_debug(at::empty({N, C, OH, OW}, x.options().memory_format(fmt)));
  at::Tensor indices = poison_if_debug(at::empty({N, C, OH, OW}, x.options().dtype(at::kByte).memory_format(fmt)));
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1];
  const Strides4 xs(x), os(out), is(indices);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint8_t* ip = indices.mutable_data_ptr<uint8_t>();
    parallel_for_nchw(N, C, OH, OW, fmt == at::MemoryFormat::ChannelsLast, kh * kw,
                      [&](int64_t n, int64_t c, int64_t oh, int64_t ow) {
                        const int64_t hs = oh * sh - ph, ws = ow * sw - pw;
                        const int64_t h0 = std::max<int64_t>(hs, 0), h1 = std::min(hs + kh, H);
                        const int64_t w0 = std::max<int64_t>(ws, 0), w1 = std::min(ws + kw, W);
                        WindowMax<acc_t> best((h0 - hs) * kw + (w0 - ws));
                        for (int64_t ih = h0; ih < h1; ++ih) {
                          for (int64_t iw = w0; iw < w1; ++iw) {
                            best.update(static_cast<acc_t>(xp[xs(n, c, ih, iw)]), (ih - hs) * kw + (iw - ws));
                          }
                        }
                        op[os(n, c, oh, ow)] = static_cast<scalar_t>(best.value);
                        ip[is(n, c, oh, ow)] = static_cast<uint8_t>(best.offset);
                      });
  });
  return {out, indices};
}

at::Tensor max_pool2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& indices, at::IntArrayRef input_hw,
                                   at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  CHECK_4D(grad_out);
  CHECK_FLOATING(grad_out);
  CHECK_4D(indices);
  TORCH_CHECK(indices.scalar_type() == at::kByte, "indices must be a uint8 tensor, got ", indices.scalar_type());
  CHECK_SAME_DEVICE(grad_out, indices);
  TORCH_CHECK(indices.sizes() == grad_out.sizes(), "indices must have the shape of grad_out ", grad_out.sizes(),
              ", got ", indices.sizes());
  CHECK_PAIR(input_hw);
  CHECK_POSITIVE(input_hw[0]);
  CHECK_POSITIVE(input_hw[1]);
  check_pool_params(kernel_size, stride, padding);
  const auto floor_hw = pool_output_hw(input_hw[0], input_hw[1], kernel_size, stride, padding, false);
  const auto ceil_hw = pool_output_hw(input_hw[0], input_hw[1], kernel_size, stride, padding, true);
  const int64_t OH = grad_out.size(2), OW = grad_out.size(3);
  TORCH_CHECK((OH == floor_hw.first || OH == ceil_hw.first) && (OW == floor_hw.second || OW == ceil_hw.second),
              "grad_out must have the pooled size of input_hw ", input_hw, " (", floor_hw.first, ", ",
              floor_hw.second, ") or with ceil_mode (", ceil_hw.first, ", ", ceil_hw.second, "), got (", OH, ", ",
              OW, ")");
  at::Tensor grad_x = poison_if_debug(at::empty({grad_out.size(0), grad_out.size(1), input_hw[0], input_hw[1]},
                                                grad_out.options().memory_format(output_memory_format(grad_out))));
  max_pool2d_backward_into(grad_out, indices, grad_x, kernel_size, stride, padding);
  return grad_x;
}

}  // namespace

void max_pool2d_backward_into(const at::Tensor& grad_out, const at::Tensor& indices, at::Tensor& grad_x,
                              at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  const int64_t N = grad_x.size(0), C = grad_x.size(1), H = grad_x.size(2), W = grad_x.size(3);
  const int64_t OH = grad_out.size(2), OW = grad_out.size(3);
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1];
  const Strides4 gs(grad_out), is(indices), xs(grad_x);
  // Windows containing an input row ih: oh with oh*sh - ph <= ih < oh*sh - ph + kh.
  const auto first_window = [](int64_t i, int64_t pad, int64_t k, int64_t s) {
    const int64_t t = i + pad - k + 1;
    return t <= 0 ? int64_t{0} : (t + s - 1) / s;
  };
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "max_pool2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const uint8_t* ip = indices.const_data_ptr<uint8_t>();
    scalar_t* dp = grad_x.mutable_data_ptr<scalar_t>();
    const int64_t windows = ((kh + sh - 1) / sh) * ((kw + sw - 1) / sw);
    parallel_for_nchw(N, C, H, W, is_channels_last(grad_x), windows,
                      [&](int64_t n, int64_t c, int64_t ih, int64_t iw) {
                        const int64_t oh0 = first_window(ih, ph, kh, sh), oh1 = std::min(OH - 1, (ih + ph) / sh);
                        const int64_t ow0 = first_window(iw, pw, kw, sw), ow1 = std::min(OW - 1, (iw + pw) / sw);
                        acc_t sum = 0;
                        for (int64_t oh = oh0; oh <= oh1; ++oh) {
                          const int64_t row = (ih - (oh * sh - ph)) * kw;
                          for (int64_t ow = ow0; ow <= ow1; ++ow) {
                            if (ip[is(n, c, oh, ow)] == row + iw - (ow * sw - pw)) {
                              sum += static_cast<acc_t>(gp[gs(n, c, oh, ow)]);
                            }
                          }
                        }
                        dp[xs(n, c, ih, iw)] = static_cast<scalar_t>(sum);
                      });
  });
}

}  // namespace alexnet_fast::cpu

TORCH_LIBRARY_IMPL(alexnet_fast, CPU, m) {
  m.impl("max_pool2d", &alexnet_fast::cpu::max_pool2d_cpu);
  m.impl("max_pool2d_backward", &alexnet_fast::cpu::max_pool2d_backward_cpu);
}
