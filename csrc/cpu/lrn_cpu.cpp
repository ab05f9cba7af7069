// CPU kernels of lrn, lrn_backward and the fused lrn_max_pool2d with its backward.
//
// LRN mixes channels of one pixel, so the kernels work on tiles of one image row: a [C][T] buffer
// of T consecutive pixels in opmath precision, loaded and stored through the tensor's strides in
// its own memory order (so NCHW and channels_last both stream, and no layout is copied).
#include <torch/library.h>

#include <array>
#include <vector>

#include "cpu/cpu_common.h"

namespace alexnet_fast::cpu {
namespace {

// Pixels per tile: with C = 256 a [C][T] buffer of floats is 64 KB.
constexpr int64_t kTile = 64;

// F.local_response_norm: W(c) = [c - before, c + after] clipped to [0, C).
template <typename acc_t>
struct LrnParams {
  int64_t before, after;
  acc_t k, beta, coef;  // coef = alpha / size
  acc_t grad_coef;      // 2 * alpha * beta / size
  LrnParams(int64_t size, double alpha, double beta_, double k_)
      : before(size / 2),
        after((size - 1) / 2),
        k(static_cast<acc_t>(k_)),
        beta(static_cast<acc_t>(beta_)),
        coef(static_cast<acc_t>(alpha / static_cast<double>(size))),
        grad_coef(static_cast<acc_t>(2.0 * alpha * beta_ / static_cast<double>(size))) {}
};

void check_lrn_params(int64_t size, double beta, double k) {
  CHECK_POSITIVE(size);
  TORCH_CHECK(k > 0 || beta == 0, "k must be positive (the denominator is k + alpha/size * sum(x^2)), got ", k);
}

// buf[c * T + t] = p[c * sc + t * sw] for c < C, t < T, in the order of the tensor's memory.
template <typename scalar_t, typename acc_t>
void load_tile(const scalar_t* p, int64_t sc, int64_t sw, int64_t C, int64_t T, acc_t* buf) {
  if (sw <= sc) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < T; ++t) buf[c * T + t] = static_cast<acc_t>(p[c * sc + t * sw]);
  } else {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) buf[c * T + t] = static_cast<acc_t>(p[c * sc + t * sw]);
  }
}

template <typename scalar_t, typename acc_t>
void store_tile(const acc_t* buf, int64_t C, int64_t T, scalar_t* p, int64_t sc, int64_t sw) {
  if (sw <= sc) {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < T; ++t) p[c * sc + t * sw] = static_cast<scalar_t>(buf[c * T + t]);
  } else {
    for (int64_t t = 0; t < T; ++t)
      for (int64_t c = 0; c < C; ++c) p[c * sc + t * sw] = static_cast<scalar_t>(buf[c * T + t]);
  }
}

// s[c][t] = k + alpha/size * sum_{j in W(c)} x[j][t]^2, summed with j ascending. `sq` is scratch.
template <typename acc_t>
void lrn_denominator(const acc_t* x, int64_t C, int64_t T, const LrnParams<acc_t>& p, acc_t* sq, acc_t* s) {
  for (int64_t i = 0; i < C * T; ++i) sq[i] = x[i] * x[i];
  for (int64_t c = 0; c < C; ++c) {
    acc_t* row = s + c * T;
    const int64_t j0 = std::max<int64_t>(0, c - p.before), j1 = std::min(C - 1, c + p.after);
    std::fill(row, row + T, acc_t(0));
    for (int64_t j = j0; j <= j1; ++j)
      for (int64_t t = 0; t < T; ++t) row[t] += sq[j * T + t];
    for (int64_t t = 0; t < T; ++t) row[t] = p.k + p.coef * row[t];
  }
}

// The one formula of an LRN output, shared by lrn and lrn_max_pool2d so both round alike.
template <typename acc_t>
inline acc_t lrn_value(acc_t x, acc_t s, acc_t beta) {
  return x / std::pow(s, beta);
}

// Runs f(n, h, w0, T) over all row tiles of T <= tile pixels, in parallel.
template <typename F>
void parallel_for_row_tiles(int64_t N, int64_t H, int64_t W, int64_t tile, int64_t work_per_pixel, const F& f) {
  const int64_t tiles_w = (W + tile - 1) / tile;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, tile * work_per_pixel));
  at::parallel_for(0, N * H * tiles_w, grain, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t w0 = (i % tiles_w) * tile, h = (i / tiles_w) % H, n = i / (tiles_w * H);
      f(n, h, w0, std::min(tile, W - w0));
    }
  });
}

at::Tensor lrn_cpu(const at::Tensor& x, int64_t size, double alpha, double beta, double k) {
  CHECK_4D(x);
  CHECK_FLOATING(x);
  check_lrn_params(size, beta, k);
  at::Tensor out = poison_if_debug(at::empty(x.sizes(), x.options().memory_format(output_memory_format(x))));
  if (out.numel() == 0) return out;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const Strides4 xs(x), os(out);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LrnParams<acc_t> p(size, alpha, beta, k);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    parallel_for_row_tiles(N, H, W, kTile, C * (size + 4), [&](int64_t n, int64_t h, int64_t w0, int64_t T) {
      thread_local std::vector<acc_t> buf;
      buf.resize(3 * C * kTile);
      acc_t *xt = buf.data(), *sq = xt + C * kTile, *s = sq + C * kTile;
      load_tile(xp + xs(n, 0, h, w0), xs.c, xs.w, C, T, xt);
      lrn_denominator(xt, C, T, p, sq, s);
      for (int64_t i = 0; i < C * T; ++i) sq[i] = lrn_value(xt[i], s[i], p.beta);
      store_tile(sq, C, T, op + os(n, 0, h, w0), os.c, os.w);
    });
  });
  return out;
}

// dx[c] = g[c] s[c]^-beta - (2 alpha beta / size) x[c] sum_{j : c in W(j)} g[j] x[j] s[j]^(-beta-1),
// where c in W(j) <=> j in [c - after, c + before].
at::Tensor lrn_backward_impl(const at::Tensor& grad_out, const at::Tensor& x, int64_t size, double alpha,
                             double beta, double k) {
  at::Tensor grad_x = poison_if_debug(at::empty(x.sizes(), x.options().memory_format(output_memory_format(x))));
  if (grad_x.numel() == 0) return grad_x;
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const Strides4 xs(x), gs(grad_out), ds(grad_x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LrnParams<acc_t> p(size, alpha, beta, k);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const scalar_t* gp = grad_out.const_data_ptr<scalar_t>();
    scalar_t* dp = grad_x.mutable_data_ptr<scalar_t>();
    parallel_for_row_tiles(N, H, W, kTile, C * (2 * size + 8), [&](int64_t n, int64_t h, int64_t w0, int64_t T) {
      thread_local std::vector<acc_t> buf;
      buf.resize(4 * C * kTile);
      acc_t *xt = buf.data(), *gt = xt + C * kTile, *sq = gt + C * kTile, *s = sq + C * kTile;
      load_tile(xp + xs(n, 0, h, w0), xs.c, xs.w, C, T, xt);
      load_tile(gp + gs(n, 0, h, w0), gs.c, gs.w, C, T, gt);
      lrn_denominator(xt, C, T, p, sq, s);
      for (int64_t i = 0; i < C * T; ++i) {
        const acc_t scale = std::pow(s[i], -p.beta);
        sq[i] = p.grad_coef == 0 ? acc_t(0) : gt[i] * xt[i] * scale / s[i];  // beta = 0 allows s = 0
        gt[i] *= scale;
      }
      for (int64_t c = 0; c < C; ++c) {
        acc_t* row = s + c * T;
        const int64_t j0 = std::max<int64_t>(0, c - p.after), j1 = std::min(C - 1, c + p.before);
        std::fill(row, row + T, acc_t(0));
        for (int64_t j = j0; j <= j1; ++j)
          for (int64_t t = 0; t < T; ++t) row[t] += sq[j * T + t];
        for (int64_t t = 0; t < T; ++t) row[t] = gt[c * T + t] - p.grad_coef * xt[c * T + t] * row[t];
      }
      store_tile(s, C, T, dp + ds(n, 0, h, w0), ds.c, ds.w);
    });
  });
  return grad_x;
}

void check_grad_like(const at::Tensor& grad_out, const at::Tensor& x) {
  CHECK_4D(x);
  CHECK_FLOATING(x);
  CHECK_4D(grad_out);
  CHECK_SAME_DTYPE(x, grad_out);
  CHECK_SAME_DEVICE(x, grad_out);
}

at::Tensor lrn_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, int64_t size, double alpha, double beta,
                            double k) {
  check_grad_like(grad_out, x);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have the shape of x ", x.sizes(), ", got ",
              grad_out.sizes());
  check_lrn_params(size, beta, k);
  return lrn_backward_impl(grad_out, x, size, alpha, beta, k);
}

constexpr int64_t kNoPadding[2] = {0, 0};

std::tuple<at::Tensor, at::Tensor> lrn_max_pool2d_cpu(const at::Tensor& x, int64_t size, double alpha, double beta,
                                                      double k, at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  CHECK_4D(x);
  CHECK_FLOATING(x);
  check_lrn_params(size, beta, k);
  const at::IntArrayRef padding(kNoPadding, 2);
  check_pool_params(kernel_size, stride, padding);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  int64_t OH, OW;
  std::tie(OH, OW) = pool_output_hw(H, W, kernel_size, stride, padding, false);
  const auto fmt = output_memory_format(x);
  at::Tensor out = poison_if_debug(at::empty({N, C, OH, OW}, x.options().memory_format(fmt)));
  at::Tensor indices = poison_if_debug(at::empty({N, C, OH, OW}, x.options().dtype(at::kByte).memory_format(fmt)));
  if (out.numel() == 0) return {out, indices};
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  // A task pools `block` outputs of one output row from the LRN of the kh input rows under them,
  // computed into a [kh][C][T] buffer; only these rows of LRN values ever exist.
  const int64_t block = std::max<int64_t>(1, (kTile - kw) / sw + 1);
  const int64_t tile = (block - 1) * sw + kw;
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const Strides4 xs(x), os(out), is(indices);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_max_pool2d_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const LrnParams<acc_t> p(size, alpha, beta, k);
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint8_t* ip = indices.mutable_data_ptr<uint8_t>();
    parallel_for_row_tiles(N, OH, OW, block, C * kh * (size + 4) * sw, [&](int64_t n, int64_t oh, int64_t ow0,
                                                                            int64_t count) {
      thread_local std::vector<acc_t> buf;
      buf.resize((kh + 3) * C * tile);
      acc_t *xt = buf.data(), *sq = xt + C * tile, *s = sq + C * tile, *rows = s + C * tile;
      const int64_t T = (count - 1) * sw + kw, w0 = ow0 * sw;
      for (int64_t ki = 0; ki < kh; ++ki) {
        load_tile(xp + xs(n, 0, oh * sh + ki, w0), xs.c, xs.w, C, T, xt);
        lrn_denominator(xt, C, T, p, sq, s);
        acc_t* row = rows + ki * C * T;
        // Rounded to scalar_t as lrn stores it, so ties are decided as in max_pool2d(lrn(x)).
        for (int64_t i = 0; i < C * T; ++i) {
          row[i] = static_cast<acc_t>(static_cast<scalar_t>(lrn_value(xt[i], s[i], p.beta)));
        }
      }
      const auto pool = [&](int64_t c, int64_t j) {
        WindowMax<acc_t> best(0);
        for (int64_t ki = 0; ki < kh; ++ki) {
          const acc_t* row = rows + (ki * C + c) * T + j * sw;
          for (int64_t kj = 0; kj < kw; ++kj) best.update(row[kj], ki * kw + kj);
        }
        op[os(n, c, oh, ow0 + j)] = static_cast<scalar_t>(best.value);
        ip[is(n, c, oh, ow0 + j)] = static_cast<uint8_t>(best.offset);
      };
      if (channels_last) {
        for (int64_t j = 0; j < count; ++j)
          for (int64_t c = 0; c < C; ++c) pool(c, j);
      } else {
        for (int64_t c = 0; c < C; ++c)
          for (int64_t j = 0; j < count; ++j) pool(c, j);
      }
    });
  });
  return {out, indices};
}

at::Tensor lrn_max_pool2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& indices,
                                       int64_t size, double alpha, double beta, double k, at::IntArrayRef kernel_size,
                                       at::IntArrayRef stride) {
  check_grad_like(grad_out, x);
  CHECK_4D(indices);
  TORCH_CHECK(indices.scalar_type() == at::kByte, "indices must be a uint8 tensor, got ", indices.scalar_type());
  CHECK_SAME_DEVICE(x, indices);
  check_lrn_params(size, beta, k);
  const at::IntArrayRef padding(kNoPadding, 2);
  check_pool_params(kernel_size, stride, padding);
  int64_t OH, OW;
  std::tie(OH, OW) = pool_output_hw(x.size(2), x.size(3), kernel_size, stride, padding, false);
  const std::array<int64_t, 4> pooled_shape{x.size(0), x.size(1), OH, OW};
  const at::IntArrayRef pooled(pooled_shape);
  TORCH_CHECK(grad_out.sizes() == pooled, "grad_out must have the pooled shape ", pooled, ", got ", grad_out.sizes());
  TORCH_CHECK(indices.sizes() == pooled, "indices must have the pooled shape ", pooled, ", got ", indices.sizes());
  // The gradient of the LRN output, in x's layout: a full-size buffer, zero where no window took
  // the element (the gather writes those zeros itself, so the buffer starts poisoned).
  at::Tensor grad_lrn =
      poison_if_debug(at::empty(x.sizes(), grad_out.options().memory_format(output_memory_format(x))));
  max_pool2d_backward_into(grad_out, indices, grad_lrn, kernel_size, stride, padding);
  return lrn_backward_impl(grad_lrn, x, size, alpha, beta, k);
}

// (dz, bias gradient) for x = relu(z): the gradient above through the ReLU (threshold_backward's
// rule) and its sum per channel, accumulated in float (in double for double).
std::tuple<at::Tensor, at::Tensor> lrn_max_pool2d_backward_relu_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& indices, int64_t size, double alpha,
    double beta, double k, at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  const at::Tensor dz = at::threshold_backward(
      lrn_max_pool2d_backward_cpu(grad_out, x, indices, size, alpha, beta, k, kernel_size, stride), x, 0);
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {dz, dz.sum({0, 2, 3}, false, acc).to(x.scalar_type())};
}

}  // namespace
}  // namespace alexnet_fast::cpu

TORCH_LIBRARY_IMPL(alexnet_fast, CPU, m) {
  m.impl("lrn_max_pool2d_backward_relu", &alexnet_fast::cpu::lrn_max_pool2d_backward_relu_cpu);
  m.impl("lrn", &alexnet_fast::cpu::lrn_cpu);
  m.impl("lrn_backward", &alexnet_fast::cpu::lrn_backward_cpu);
  m.impl("lrn_max_pool2d", &alexnet_fast::cpu::lrn_max_pool2d_cpu);
  m.impl("lrn_max_pool2d_backward", &alexnet_fast::cpu::lrn_max_pool2d_backward_cpu);
}
