// CPU kernels of max_pool2d and its backward, read and written through strides, so every layout
// runs without a copy. Where the channels are contiguous (channels_last) a pixel's channels are
// one vector and each loop over them vectorizes. Otherwise a thread takes one plane: the forward
// pools it row by row, the backward scatters each window's gradient to its winner.
#include <torch/library.h>

#include <vector>

#include "cpu/cpu_common.h"

namespace alexnet_fast::cpu {
namespace {

// The pooling geometry of one call.
struct Pool {
  int64_t N, C, H, W, OH, OW, kh, kw, sh, sw, ph, pw;
};

// The parallel grain for items costing about `work` elementary operations each.
int64_t grain_for(int64_t work) { return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work)); }

// WindowMax's rule, for every channel of a pixel at once. It vectorizes: selects, not branches;
// restrict pointers; and offsets as wide as the values, whose comparison masks select them.
template <typename scalar_t, typename acc_t>
void channels_max(const scalar_t* __restrict__ x, int32_t offset, int64_t C, acc_t* __restrict__ best,
                  int32_t* __restrict__ best_offset) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t v = static_cast<acc_t>(x[c]);
    const bool take = v > best[c] || v != v;  // v != v: NaN
    best[c] = take ? v : best[c];
    best_offset[c] = take ? offset : best_offset[c];
  }
}

// sum[c] += grad[c] where this pixel won window channel c (winner[c] == mine), for every channel;
// called per window in the order PyTorch's scatter adds them. Adding +0 elsewhere changes no
// sum (a sum that starts at +0 is never -0), and a plain masked add vectorizes.
template <typename scalar_t, typename acc_t>
void channels_add_won(const uint8_t* __restrict__ winner, const scalar_t* __restrict__ grad, int32_t mine, int64_t C,
                      acc_t* __restrict__ sum) {
  for (int64_t c = 0; c < C; ++c) {
    const acc_t g = static_cast<acc_t>(grad[c]);
    sum[c] += static_cast<int32_t>(winner[c]) == mine ? g : acc_t(0);
  }
}

template <typename scalar_t>
void max_pool2d_forward(const at::Tensor& x, at::Tensor& out, at::Tensor& indices, const Pool& g) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  uint8_t* ip = indices.mutable_data_ptr<uint8_t>();
  const Strides4 xs(x), os(out), is(indices);
  const int64_t window = g.kh * g.kw;
  if (xs.c == 1 && os.c == 1 && is.c == 1) {  // channels_last: one pixel's channels at a time
    at::parallel_for(0, g.N * g.OH * g.OW, grain_for(window * g.C), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> best(g.C);
      std::vector<int32_t> best_offset(g.C);
      for (int64_t p = begin; p < end; ++p) {
        const int64_t n = p / (g.OH * g.OW), oh = p / g.OW % g.OH, ow = p % g.OW;
        const int64_t hs = oh * g.sh - g.ph, ws = ow * g.sw - g.pw;
        const int64_t h0 = std::max<int64_t>(hs, 0), h1 = std::min(hs + g.kh, g.H);
        const int64_t w0 = std::max<int64_t>(ws, 0), w1 = std::min(ws + g.kw, g.W);
        std::fill(best.begin(), best.end(), -std::numeric_limits<acc_t>::infinity());
        std::fill(best_offset.begin(), best_offset.end(), static_cast<int32_t>((h0 - hs) * g.kw + (w0 - ws)));
        for (int64_t ih = h0; ih < h1; ++ih) {
          for (int64_t iw = w0; iw < w1; ++iw) {
            channels_max(xp + xs(n, 0, ih, iw), static_cast<int32_t>((ih - hs) * g.kw + (iw - ws)), g.C,
                         best.data(), best_offset.data());
          }
        }
        scalar_t* o = op + os(n, 0, oh, ow);
        uint8_t* i = ip + is(n, 0, oh, ow);
        for (int64_t c = 0; c < g.C; ++c) {
          o[c] = static_cast<scalar_t>(best[c]);
          i[c] = static_cast<uint8_t>(best_offset[c]);
        }
      }
    });
    return;
  }
  // any other layout: a thread pools output rows of one (n, c) plane, a window element at a time
  // across the row (the same row-major scan of each window as WindowMax, so the same winners).
  // Window column dw falls inside the input for outputs lo[dw] <= ow < hi[dw]
  // (0 <= ow*sw - pw + dw < W).
  std::vector<int64_t> lo(g.kw), hi(g.kw);
  for (int64_t dw = 0; dw < g.kw; ++dw) {
    lo[dw] = g.pw > dw ? (g.pw - dw + g.sw - 1) / g.sw : 0;
    hi[dw] = g.W - 1 + g.pw - dw < 0 ? 0 : std::min(g.OW, (g.W - 1 + g.pw - dw) / g.sw + 1);
  }
  at::parallel_for(0, g.N * g.C * g.OH, grain_for(window * g.OW), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> best(g.OW);
    std::vector<int32_t> best_offset(g.OW);
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / (g.C * g.OH), c = r / g.OH % g.C, oh = r % g.OH;
      const int64_t hs = oh * g.sh - g.ph, h0 = std::max<int64_t>(hs, 0), h1 = std::min(hs + g.kh, g.H);
      for (int64_t ow = 0; ow < g.OW; ++ow) {  // the first element of the window inside the input
        const int64_t ws = ow * g.sw - g.pw;
        best[ow] = -std::numeric_limits<acc_t>::infinity();
        best_offset[ow] = static_cast<int32_t>((h0 - hs) * g.kw + (std::max<int64_t>(ws, 0) - ws));
      }
      const scalar_t* plane = xp + xs(n, c, 0, 0);
      for (int64_t ih = h0; ih < h1; ++ih) {
        for (int64_t dw = 0; dw < g.kw; ++dw) {
          const scalar_t* row = plane + ih * xs.h + (dw - g.pw) * xs.w;
          const int32_t offset = static_cast<int32_t>((ih - hs) * g.kw + dw);
          acc_t* __restrict__ b = best.data();
          int32_t* __restrict__ o = best_offset.data();
          for (int64_t ow = lo[dw]; ow < hi[dw]; ++ow) {
            const acc_t v = static_cast<acc_t>(row[ow * g.sw * xs.w]);
            const bool take = v > b[ow] || v != v;
            b[ow] = take ? v : b[ow];
            o[ow] = take ? offset : o[ow];
          }
        }
      }
      for (int64_t ow = 0; ow < g.OW; ++ow) {
        op[os(n, c, oh, ow)] = static_cast<scalar_t>(best[ow]);
        ip[is(n, c, oh, ow)] = static_cast<uint8_t>(best_offset[ow]);
      }
    }
  });
}

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
  if (out.numel() == 0) return {out, indices};
  const Pool g{N, C, H, W, OH, OW, kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1]};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_cpu",
                                  [&] { max_pool2d_forward<scalar_t>(x, out, indices, g); });
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
  const Pool g{grad_x.size(0), grad_x.size(1), grad_x.size(2), grad_x.size(3), grad_out.size(2), grad_out.size(3),
               kernel_size[0], kernel_size[1], stride[0], stride[1], padding[0], padding[1]};
  if (grad_x.numel() == 0) return;
  const Strides4 gs(grad_out), is(indices), xs(grad_x);
  // The windows containing input row ih: oh0(ih) <= oh <= oh1(ih), those with
  // oh*sh - ph <= ih < oh*sh - ph + kh (and likewise for columns).
  const auto first_window = [](int64_t i, int64_t pad, int64_t k, int64_t s) {
    const int64_t t = i + pad - k + 1;
    return t <= 0 ? int64_t{0} : (t + s - 1) / s;
  };
  const int64_t windows = ((g.kh + g.sh - 1) / g.sh) * ((g.kw + g.sw - 1) / g.sw), window = g.kh * g.kw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "max_pool2d_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    const uint8_t* ip = indices.const_data_ptr<uint8_t>();
    scalar_t* dp = grad_x.mutable_data_ptr<scalar_t>();
    if (gs.c == 1 && is.c == 1 && xs.c == 1) {  // channels_last: one pixel's channels at a time
      at::parallel_for(0, g.N * g.H * g.W, grain_for(windows * g.C), [&](int64_t begin, int64_t end) {
        std::vector<acc_t> sum(g.C);
        for (int64_t p = begin; p < end; ++p) {
          const int64_t n = p / (g.H * g.W), ih = p / g.W % g.H, iw = p % g.W;
          const int64_t oh0 = first_window(ih, g.ph, g.kh, g.sh), oh1 = std::min(g.OH - 1, (ih + g.ph) / g.sh);
          const int64_t ow0 = first_window(iw, g.pw, g.kw, g.sw), ow1 = std::min(g.OW - 1, (iw + g.pw) / g.sw);
          std::fill(sum.begin(), sum.end(), acc_t(0));
          for (int64_t oh = oh0; oh <= oh1; ++oh) {
            const int64_t row = (ih - (oh * g.sh - g.ph)) * g.kw;
            for (int64_t ow = ow0; ow <= ow1; ++ow) {
              channels_add_won(ip + is(n, 0, oh, ow), gp + gs(n, 0, oh, ow),
                               static_cast<int32_t>(row + iw - (ow * g.sw - g.pw)), g.C, sum.data());
            }
          }
          scalar_t* d = dp + xs(n, 0, ih, iw);
          for (int64_t c = 0; c < g.C; ++c) d[c] = static_cast<scalar_t>(sum[c]);
        }
      });
      return;
    }
    // any other layout: a thread scatters each window's gradient to its winner, one (n, c) plane at
    // a time, in (oh, ow) order: every element gets the same additions, in the same order, as the
    // gather above makes (a plane of acc_t sums, rounded once at the end)
    std::vector<int64_t> row_of(window), col_of(window);  // a window offset's row and column
    for (int64_t k = 0; k < window; ++k) row_of[k] = k / g.kw, col_of[k] = k % g.kw;
    at::parallel_for(0, g.N * g.C, grain_for(g.OH * g.OW + g.H * g.W), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sums(g.H * g.W);
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t n = plane / g.C, c = plane % g.C;
        std::fill(sums.begin(), sums.end(), acc_t(0));
        const uint8_t* winners = ip + is(n, c, 0, 0);
        const scalar_t* grads = gp + gs(n, c, 0, 0);
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          for (int64_t ow = 0; ow < g.OW; ++ow) {
            const int64_t offset = winners[oh * is.h + ow * is.w];
            if (offset >= window) continue;  // names no window element (as in the gather)
            const int64_t ih = oh * g.sh - g.ph + row_of[offset], iw = ow * g.sw - g.pw + col_of[offset];
            if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {  // else the window's padding
              sums[ih * g.W + iw] += static_cast<acc_t>(grads[oh * gs.h + ow * gs.w]);
            }
          }
        }
        scalar_t* d = dp + xs(n, c, 0, 0);
        for (int64_t ih = 0; ih < g.H; ++ih) {
          for (int64_t iw = 0; iw < g.W; ++iw) d[ih * xs.h + iw * xs.w] = static_cast<scalar_t>(sums[ih * g.W + iw]);
        }
      }
    });
  });
}

}  // namespace alexnet_fast::cpu

TORCH_LIBRARY_IMPL(alexnet_fast, CPU, m) {
  m.impl("max_pool2d", &alexnet_fast::cpu::max_pool2d_cpu);
  m.impl("max_pool2d_backward", &alexnet_fast::cpu::max_pool2d_backward_cpu);
}
