// CPU kernels of conv2d_relu and its two gradients: im2col + one GEMM (at::mm) per chunk of
// images, in opmath precision (float for float16/bfloat16, so a result is rounded once).
//
// Every GEMM operand is a logical [M, K] or [M, C_out] matrix over the chunk's output pixels
// m = (n, oh, ow). Its orientation in memory follows the layout of the tensor it is built from or
// written to: pixel-major for channels_last tensors (channels contiguous, K ordered (ki, kj, ci)),
// pixel-minor for NCHW (K ordered (ci, ki, kj)), so gathers and scatters walk memory in order.
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <utility>
#include <vector>

#include "cpu/cpu_common.h"
#include "relu_bias.h"

namespace alexnet_fast::cpu {
namespace {

// The column buffers of one chunk of images stay below this size (a single image may exceed it).
constexpr int64_t kChunkBytes = int64_t{64} << 20;

struct ConvGeom {
  int64_t N, C_in, H, W, C_out, kh, kw, sh, sw, ph, pw, OH, OW;
  int64_t pixels() const { return OH * OW; }
  int64_t K() const { return C_in * kh * kw; }
  // Images per chunk so that `per_pixel` opmath values per output pixel fit kChunkBytes.
  int64_t chunk(int64_t per_pixel, int64_t elem_size) const {
    const int64_t per_image = std::max<int64_t>(1, pixels() * per_pixel * elem_size);
    return std::clamp<int64_t>(kChunkBytes / per_image, 1, std::max<int64_t>(N, 1));
  }
};

void check_conv_params(at::IntArrayRef kernel_hw, at::IntArrayRef stride, at::IntArrayRef padding, int64_t H,
                       int64_t W) {
  CHECK_PAIR(stride);
  CHECK_PAIR(padding);
  CHECK_POSITIVE(stride[0]);
  CHECK_POSITIVE(stride[1]);
  CHECK_NONNEGATIVE(padding[0]);
  CHECK_NONNEGATIVE(padding[1]);
  TORCH_CHECK(H + 2 * padding[0] >= kernel_hw[0] && W + 2 * padding[1] >= kernel_hw[1], "kernel ", kernel_hw,
              " is larger than the padded input (", H, ", ", W, ") with padding ", padding);
}

ConvGeom make_geom(int64_t N, int64_t C_in, int64_t H, int64_t W, int64_t C_out, at::IntArrayRef kernel_hw,
                   at::IntArrayRef stride, at::IntArrayRef padding) {
  check_conv_params(kernel_hw, stride, padding, H, W);
  const int64_t OH = (H + 2 * padding[0] - kernel_hw[0]) / stride[0] + 1;
  const int64_t OW = (W + 2 * padding[1] - kernel_hw[1]) / stride[1] + 1;
  return {N, C_in, H, W, C_out, kernel_hw[0], kernel_hw[1], stride[0], stride[1], padding[0], padding[1], OH, OW};
}

// Position of (ci, ki, kj) along K.
struct KOrder {
  int64_t ci, ki, kj;
  KOrder(const ConvGeom& g, bool channels_last)
      : ci(channels_last ? 1 : g.kh * g.kw),
        ki(channels_last ? g.kw * g.C_in : g.kw),
        kj(channels_last ? g.C_in : 1) {}
  int64_t operator()(int64_t c, int64_t i, int64_t j) const { return c * ci + i * ki + j * kj; }
};

// weight [C_out, C_in, kh, kw] as the [C_out, K] operand in KOrder(channels_last), in opmath dtype.
at::Tensor weight_matrix(const at::Tensor& weight, bool channels_last, at::ScalarType acc) {
  at::Tensor w = weight.to(acc);
  if (channels_last) w = w.permute({0, 2, 3, 1});
  return w.contiguous().view({weight.size(0), weight.size(1) * weight.size(2) * weight.size(3)});
}

// A logical [rows, cols] opmath matrix, stored row-major (pixel-major) or column-major. Its users
// (im2col, masked_grad) write every element, so it is poisoned in debug runs.
at::Tensor new_matrix(int64_t rows, int64_t cols, bool row_major, at::ScalarType acc) {
  const auto opts = at::TensorOptions().dtype(acc);
  return poison_if_debug(row_major ? at::empty({rows, cols}, opts) : at::empty({cols, rows}, opts).t());
}

// Our ops have no Autocast kernel, so the at::mm calls inside would be autocast again (to
// bfloat16 under a CPU autocast region): the GEMMs run in the opmath dtype the kernels chose.
struct NoAutocast {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autocast_dispatch_keyset};
};

// Strided element access to a 2-D matrix.
template <typename T>
struct Mat {
  T* p;
  int64_t s0, s1;
  explicit Mat(const at::Tensor& t) : p(t.mutable_data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)) {}
  T& operator()(int64_t i, int64_t j) const { return p[i * s0 + j * s1]; }
};

// cols[m, k(ci, ki, kj)] = x[n0 + n, ci, oh * sh - ph + ki, ow * sw - pw + kj], 0 in the padding,
// for the nb images from n0. Fills cols in its memory order.
template <typename scalar_t, typename acc_t>
void im2col(const at::Tensor& x, int64_t n0, int64_t nb, const ConvGeom& g, const KOrder& ko, const at::Tensor& cols) {
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  const Strides4 xs(x);
  const Mat<acc_t> cm(cols);
  const int64_t P = g.pixels(), K = g.K();
  if (cm.s1 == 1) {  // pixel-major: the K values of one output pixel, a run of C_in per (ki, kj)
    const int64_t step = ko.ci * cm.s1;
    at::parallel_for(0, nb * P, std::max<int64_t>(1, at::internal::GRAIN_SIZE / K), [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const int64_t n = n0 + m / P, oh = (m % P) / g.OW, ow = m % g.OW;
        for (int64_t ki = 0; ki < g.kh; ++ki) {
          const int64_t ih = oh * g.sh - g.ph + ki;
          for (int64_t kj = 0; kj < g.kw; ++kj) {
            const int64_t iw = ow * g.sw - g.pw + kj;
            acc_t* dst = &cm(m, ko(0, ki, kj));
            if (ih >= 0 && ih < g.H && iw >= 0 && iw < g.W) {
              const scalar_t* src = xp + xs(n, 0, ih, iw);
              for (int64_t ci = 0; ci < g.C_in; ++ci) dst[ci * step] = static_cast<acc_t>(src[ci * xs.c]);
            } else {
              for (int64_t ci = 0; ci < g.C_in; ++ci) dst[ci * step] = acc_t(0);
            }
          }
        }
      }
    });
  } else {  // pixel-minor: for one k and image, rows of OW values, each zeros | input run | zeros
    // Output columns whose iw = ow * sw - pw + kj lies inside [0, W), for each kj.
    std::vector<std::pair<int64_t, int64_t>> inside(g.kw);
    for (int64_t kj = 0; kj < g.kw; ++kj) {
      const int64_t first = g.pw - kj, last = g.W - 1 + g.pw - kj;  // ow * sw in [first, last]
      const int64_t lo = first <= 0 ? 0 : std::min(g.OW, (first + g.sw - 1) / g.sw);
      const int64_t hi = last < 0 ? lo : std::clamp<int64_t>(last / g.sw + 1, lo, g.OW);
      inside[kj] = {lo, hi};
    }
    at::parallel_for(0, K * nb, std::max<int64_t>(1, at::internal::GRAIN_SIZE / P), [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t nl = i % nb, kidx = i / nb;
        const int64_t kj = kidx % g.kw, ki = (kidx / g.kw) % g.kh, ci = kidx / (g.kw * g.kh);
        const int64_t k = ko(ci, ki, kj);
        const auto [lo, hi] = inside[kj];
        for (int64_t oh = 0; oh < g.OH; ++oh) {
          const int64_t ih = oh * g.sh - g.ph + ki;
          acc_t* dst = &cm(nl * P + oh * g.OW, k);
          if (ih < 0 || ih >= g.H) {
            for (int64_t ow = 0; ow < g.OW; ++ow) dst[ow * cm.s0] = acc_t(0);
            continue;
          }
          const scalar_t* src = xp + xs(n0 + nl, ci, ih, 0) + (kj - g.pw) * xs.w;
          const int64_t src_step = g.sw * xs.w;
          for (int64_t ow = 0; ow < lo; ++ow) dst[ow * cm.s0] = acc_t(0);
          for (int64_t ow = lo; ow < hi; ++ow) dst[ow * cm.s0] = static_cast<acc_t>(src[ow * src_step]);
          for (int64_t ow = hi; ow < g.OW; ++ow) dst[ow * cm.s0] = acc_t(0);
        }
      }
    });
  }
}

// grad[m, co] = out > 0 ? grad_out : 0 (threshold_backward) for the chunk's nb images from n0,
// as a [M, C_out] opmath matrix oriented like grad_out.
template <typename scalar_t, typename acc_t>
at::Tensor masked_grad(const at::Tensor& grad_out, const at::Tensor& out, int64_t n0, int64_t nb, const ConvGeom& g,
                       at::ScalarType acc) {
  const bool channels_last = is_channels_last(grad_out);
  at::Tensor grad = new_matrix(nb * g.pixels(), g.C_out, channels_last, acc);
  const Mat<acc_t> gm(grad);
  const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* op = out.const_data_ptr<scalar_t>();
  const Strides4 gs(grad_out), os(out);
  parallel_for_nchw(nb, g.C_out, g.OH, g.OW, channels_last, 1, [&](int64_t n, int64_t co, int64_t oh, int64_t ow) {
    // threshold_backward's rule: only out <= 0 blocks the gradient (a NaN output passes it)
    const bool active = !(static_cast<acc_t>(op[os(n0 + n, co, oh, ow)]) <= acc_t(0));
    gm((n * g.OH + oh) * g.OW + ow, co) = active ? static_cast<acc_t>(gp[gs(n0 + n, co, oh, ow)]) : acc_t(0);
  });
  return grad;
}

at::Tensor conv2d_relu_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias_opt,
                           at::IntArrayRef stride, at::IntArrayRef padding) {
  CHECK_4D(x);
  CHECK_FLOATING(x);
  CHECK_4D(weight);
  CHECK_SAME_DTYPE(x, weight);
  CHECK_SAME_DEVICE(x, weight);
  TORCH_CHECK(weight.size(1) == x.size(1), "weight must have x's ", x.size(1),
              " input channels in dim 1 (groups=1), got shape ", weight.sizes());
  CHECK_POSITIVE(weight.size(0));
  CHECK_POSITIVE(weight.size(2));
  CHECK_POSITIVE(weight.size(3));
  if (bias_opt.has_value()) {
    const at::Tensor& bias = *bias_opt;
    TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), "bias must be None or a tensor of shape (",
                weight.size(0), ",), got ", bias.sizes());
    CHECK_SAME_DTYPE(x, bias);
    CHECK_SAME_DEVICE(x, bias);
  }
  const ConvGeom g = make_geom(x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.sizes().slice(2),
                               stride, padding);
  const auto fmt = output_memory_format(x);
  at::Tensor out = poison_if_debug(at::empty({g.N, g.C_out, g.OH, g.OW}, x.options().memory_format(fmt)));
  if (out.numel() == 0) return out;
  const bool x_cl = is_channels_last(x), out_cl = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv2d_relu_cpu", [&] {
    const NoAutocast no_autocast;
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const KOrder ko(g, x_cl);
    const at::Tensor wmat = weight_matrix(weight, x_cl, acc);
    const at::Tensor bias = bias_opt.has_value() ? bias_opt->to(acc).contiguous() : at::zeros({g.C_out}, wmat.options());
    const acc_t* bp = bias.const_data_ptr<acc_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    const Strides4 os(out);
    const int64_t nb_max = g.chunk(g.K() + g.C_out, sizeof(acc_t));
    for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, g.N - n0);
      const at::Tensor cols = new_matrix(nb * g.pixels(), g.K(), x_cl, acc);
      im2col<scalar_t, acc_t>(x, n0, nb, g, ko, cols);
      // [M, C_out], oriented like out so the epilogue reads it in order.
      const at::Tensor result = out_cl ? at::mm(cols, wmat.t()) : at::mm(wmat, cols.t()).t();
      const Mat<acc_t> rm(result);
      parallel_for_nchw(nb, g.C_out, g.OH, g.OW, out_cl, 1, [&](int64_t n, int64_t co, int64_t oh, int64_t ow) {
        const acc_t v = rm((n * g.OH + oh) * g.OW + ow, co) + bp[co];
        op[os(n0 + n, co, oh, ow)] = static_cast<scalar_t>((v > acc_t(0) || std::isnan(v)) ? v : acc_t(0));
      });
    }
  });
  return out;
}

void check_grad_pair(const at::Tensor& grad_out, const at::Tensor& out) {
  CHECK_4D(grad_out);
  CHECK_FLOATING(grad_out);
  CHECK_SAME_DTYPE(grad_out, out);
  CHECK_SAME_DEVICE(grad_out, out);
  TORCH_CHECK(out.sizes() == grad_out.sizes(), "out must have the shape of grad_out ", grad_out.sizes(), ", got ",
              out.sizes());
}

void check_output_hw(const at::Tensor& grad_out, const ConvGeom& g) {
  TORCH_CHECK(grad_out.size(2) == g.OH && grad_out.size(3) == g.OW, "grad_out must have the convolution's output size (",
              g.OH, ", ", g.OW, "), got (", grad_out.size(2), ", ", grad_out.size(3), ")");
}

at::Tensor conv2d_relu_backward_input_cpu(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& weight,
                                          at::IntArrayRef input_hw, at::IntArrayRef stride, at::IntArrayRef padding) {
  check_grad_pair(grad_out, out);
  CHECK_4D(weight);
  CHECK_SAME_DTYPE(grad_out, weight);
  CHECK_SAME_DEVICE(grad_out, weight);
  TORCH_CHECK(weight.size(0) == grad_out.size(1), "weight must have grad_out's ", grad_out.size(1),
              " output channels in dim 0, got shape ", weight.sizes());
  CHECK_PAIR(input_hw);
  CHECK_POSITIVE(input_hw[0]);
  CHECK_POSITIVE(input_hw[1]);
  const ConvGeom g = make_geom(grad_out.size(0), weight.size(1), input_hw[0], input_hw[1], weight.size(0),
                               weight.sizes().slice(2), stride, padding);
  check_output_hw(grad_out, g);
  const auto fmt = output_memory_format(grad_out);
  at::Tensor grad_x = poison_if_debug(at::empty({g.N, g.C_in, g.H, g.W}, grad_out.options().memory_format(fmt)));
  if (grad_x.numel() == 0) return grad_x;
  const bool dx_cl = fmt == at::MemoryFormat::ChannelsLast;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "conv2d_relu_backward_input_cpu", [&] {
    const NoAutocast no_autocast;
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const KOrder ko(g, dx_cl);
    const at::Tensor wmat = weight_matrix(weight, dx_cl, acc);
    scalar_t* dp = grad_x.mutable_data_ptr<scalar_t>();
    const Strides4 ds(grad_x);
    const int64_t nb_max = g.chunk(g.K() + g.C_out, sizeof(acc_t));
    for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, g.N - n0);
      const at::Tensor grad = masked_grad<scalar_t, acc_t>(grad_out, out, n0, nb, g, acc);
      // dcols [M, K] = grad @ W, oriented like grad_x.
      const at::Tensor dcols = dx_cl ? at::mm(grad, wmat) : at::mm(wmat.t(), grad.t()).t();
      const Mat<acc_t> dm(dcols);
      // col2im as a gather: each grad_x element sums the columns that read it, so no two threads
      // write one element.
      parallel_for_nchw(nb, g.C_in, g.H, g.W, dx_cl, g.kh * g.kw, [&](int64_t n, int64_t ci, int64_t ih, int64_t iw) {
        acc_t sum = 0;
        for (int64_t ki = 0; ki < g.kh; ++ki) {
          const int64_t th = ih + g.ph - ki;
          if (th < 0) break;
          if (th % g.sh != 0 || th / g.sh >= g.OH) continue;
          for (int64_t kj = 0; kj < g.kw; ++kj) {
            const int64_t tw = iw + g.pw - kj;
            if (tw < 0) break;
            if (tw % g.sw != 0 || tw / g.sw >= g.OW) continue;
            sum += dm((n * g.OH + th / g.sh) * g.OW + tw / g.sw, ko(ci, ki, kj));
          }
        }
        dp[ds(n0 + n, ci, ih, iw)] = static_cast<scalar_t>(sum);
      });
    }
  });
  return grad_x;
}

std::tuple<at::Tensor, at::Tensor> conv2d_relu_backward_weight_cpu(const at::Tensor& grad_out, const at::Tensor& out,
                                                                   const at::Tensor& x, at::IntArrayRef kernel_hw,
                                                                   at::IntArrayRef stride, at::IntArrayRef padding) {
  check_grad_pair(grad_out, out);
  CHECK_4D(x);
  CHECK_SAME_DTYPE(grad_out, x);
  CHECK_SAME_DEVICE(grad_out, x);
  TORCH_CHECK(x.size(0) == grad_out.size(0), "x must have grad_out's batch size ", grad_out.size(0), ", got ",
              x.size(0));
  CHECK_PAIR(kernel_hw);
  CHECK_POSITIVE(kernel_hw[0]);
  CHECK_POSITIVE(kernel_hw[1]);
  const ConvGeom g = make_geom(x.size(0), x.size(1), x.size(2), x.size(3), grad_out.size(1), kernel_hw, stride, padding);
  check_output_hw(grad_out, g);
  at::Tensor grad_weight, grad_bias;
  const bool x_cl = is_channels_last(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "conv2d_relu_backward_weight_cpu", [&] {
    const NoAutocast no_autocast;
    using acc_t = at::opmath_type<scalar_t>;
    const auto acc = c10::CppTypeToScalarType<acc_t>::value;
    const KOrder ko(g, x_cl);
    // Accumulators (addmm_/add_ over the chunks): zeros on purpose, never poisoned.
    at::Tensor gw = at::zeros({g.C_out, g.K()}, at::TensorOptions().dtype(acc));
    at::Tensor gb = at::zeros({g.C_out}, gw.options());
    const int64_t nb_max = g.chunk(g.K() + g.C_out, sizeof(acc_t));
    for (int64_t n0 = 0; n0 < g.N; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, g.N - n0);
      const at::Tensor cols = new_matrix(nb * g.pixels(), g.K(), x_cl, acc);
      im2col<scalar_t, acc_t>(x, n0, nb, g, ko, cols);
      const at::Tensor grad = masked_grad<scalar_t, acc_t>(grad_out, out, n0, nb, g, acc);
      gw.addmm_(grad.t(), cols);
      gb.add_(grad.sum(0));
    }
    gw = x_cl ? gw.view({g.C_out, g.kh, g.kw, g.C_in}).permute({0, 3, 1, 2}) : gw.view({g.C_out, g.C_in, g.kh, g.kw});
    grad_weight = gw.to(grad_out.scalar_type()).contiguous();
    grad_bias = gb.to(grad_out.scalar_type());
  });
  return {grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor> relu_backward_bias_cpu(const at::Tensor& grad_out, const at::Tensor& out) {
  check_relu_backward_bias(grad_out, out);
  CHECK_DEVICE_TYPE(grad_out, at::kCPU);
  return relu_backward_bias_unfused(grad_out, out);
}

}  // namespace
}  // namespace alexnet_fast::cpu

TORCH_LIBRARY_IMPL(alexnet_fast, CPU, m) {
  m.impl("relu_backward_bias", &alexnet_fast::cpu::relu_backward_bias_cpu);
  m.impl("conv2d_relu", &alexnet_fast::cpu::conv2d_relu_cpu);
  m.impl("conv2d_relu_backward_input", &alexnet_fast::cpu::conv2d_relu_backward_input_cpu);
  m.impl("conv2d_relu_backward_weight", &alexnet_fast::cpu::conv2d_relu_backward_weight_cpu);
}
