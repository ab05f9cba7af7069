// CUDA kernels of lrn, lrn_backward, lrn_max_pool2d and lrn_max_pool2d_backward.
//
// LRN mixes the channels of one pixel. For size 5 (AlexNet's; the register windows are compiled
// for it) the work is laid out by memory layout:
// * NCHW: a thread owns a pixel, or VEC consecutive pixels of a row, and walks the channels with
//   the window of x in registers (LrnForwardWindow, LrnBackwardWindow): x is read once and every
//   load is coalesced along W. With few pixels the channels are split into groups, each
//   re-reading the few channels of its window halo.
// * channels_last: a lane owns VEC channels of one pixel (a 16-byte load) and takes the window
//   across lanes with shuffles (lane_window_sums).
// The fused lrn_max_pool2d never writes the LRN output to memory. NCHW blocks compute the LRN of
// a spatial tile of input into shared memory, U channels at a time, and pool it from there.
// channels_last gives each thread one pooled pixel and VEC channels: it computes the LRN of every
// window position from the input (the window's neighbour channels come from L1/L2), so a pixel
// covered by several windows is normalised once per window, with no shared memory.
// lrn_max_pool2d_backward reads x, indices and grad_out and writes dx in one kernel: the gradient
// of the LRN output is gathered on the fly from the pool windows covering each 2x2 stride cell of
// the 3x3/2 pool (each window read once per cell), then passed through the LRN gradient as in
// lrn_backward: along the channel walk (NCHW) or across lanes (channels_last). Other pools in
// channels_last run max_pool2d_backward, then lrn_backward. lrn_max_pool2d_backward_relu is the
// channels_last kernel with the ReLU's mask and the bias gradient's channel sums added.
// Other LRN sizes, other pools in the NCHW fused backward, float64, channel counts the vectors do
// not divide and misaligned tensors run the generic kernels: one thread per element, summing each
// window directly.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <numeric>
#include <tuple>
#include <type_traits>

#include "cuda/cuda_common.cuh"

namespace alexnet_fast::gpu {
namespace {

// Channels of the NCHW channel walks loaded ahead of use, per thread.
constexpr int kForwardUnroll = 8;
constexpr int kBackwardUnroll = 4;
// Fused forward, NCHW: input pixels per thread (the tile has up to kTilePixels * kThreads) and
// channels per shared-memory round.
constexpr int kTilePixels = 4;
constexpr int kTileChannels = 4;
// Fused backward, NCHW: the pool of the cell kernel, and channels loaded ahead.
constexpr int kCellK = 3, kCellS = 2;
constexpr int kCellUnroll = 2;

// ================================================================================================
// Generic kernels: any size, any pool, float64, either layout (CL: channels_last). One thread per
// element in memory order, grid-stride.
// ================================================================================================

// Element coordinates of offset e of a dense NCHW or NHWC tensor.
template <bool CL>
__device__ __forceinline__ void coords(int64_t e, int64_t C, int64_t H, int64_t W, int64_t& n, int64_t& c, int64_t& h,
                                       int64_t& w) {
  int64_t r;
  if constexpr (CL) {
    r = divmod(e, C, c);
    r = divmod(r, W, w);
    n = divmod(r, H, h);
  } else {
    r = divmod(e, W, w);
    r = divmod(r, H, h);
    n = divmod(r, C, c);
  }
}

template <bool CL>
__device__ __forceinline__ int64_t offset_of(int64_t n, int64_t c, int64_t h, int64_t w, int64_t C, int64_t H,
                                             int64_t W) {
  return CL ? ((n * H + h) * W + w) * C + c : ((n * C + c) * H + h) * W + w;
}

// Sum of squares over the window of channel c, with xp at channel 0 of the pixel.
template <typename A, typename T>
__device__ __forceinline__ A window_sumsq(const T* __restrict__ xp, int64_t cstride, int c, int C, int before,
                                          int after) {
  A s = 0;
  const int j1 = min(C - 1, c + after);
  for (int j = max(0, c - before); j <= j1; ++j) {
    const A v = static_cast<A>(xp[j * cstride]);
    s += v * v;
  }
  return s;
}

template <typename T, bool CL>
__global__ void __launch_bounds__(kThreads)
    lrn_forward_generic_kernel(const T* __restrict__ x, T* __restrict__ out, int64_t total, int C, int H, int W,
                               int before, int after, LrnParams<at::opmath_type<T>> prm) {
  using A = at::opmath_type<T>;
  const int64_t cstride = CL ? 1 : static_cast<int64_t>(H) * W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    int64_t n, c, h, w;
    coords<CL>(e, C, H, W, n, c, h, w);
    const T* xp = x + e - c * cstride;
    const A s = window_sumsq<A>(xp, cstride, static_cast<int>(c), C, before, after);
    out[e] = static_cast<T>(static_cast<A>(x[e]) * lrn_factor(s, prm));
  }
}

// dx of lrn (FUSED false: grad is x-shaped) or of lrn_max_pool2d (FUSED true: grad and indices
// are pooled; the LRN output's gradient is gathered from the windows).
template <typename T, bool CL, bool FUSED>
__global__ void __launch_bounds__(kThreads, 4)  // 64 registers: no spills (ptxas alone picks 48 and spills)
    lrn_backward_generic_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ indices,
                                const T* __restrict__ x, T* __restrict__ dx, int64_t total, int C, int before,
                                int after, PoolShape ps, LrnParams<at::opmath_type<T>> prm) {
  using A = at::opmath_type<T>;
  const int H = ps.H, W = ps.W;
  const int64_t cstride = CL ? 1 : static_cast<int64_t>(H) * W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    int64_t n, c, h, w;
    coords<CL>(e, C, H, W, n, c, h, w);
    const int64_t pixel = e - c * cstride;
    const T* xp = x + pixel;
    const auto grad_at = [&](int j) -> A {
      if constexpr (FUSED) {
        const auto offset = [&](int oh, int ow) { return offset_of<CL>(n, j, oh, ow, C, ps.OH, ps.OW); };
        return pool_gather(grad, indices, offset, static_cast<int>(h), static_cast<int>(w), ps);
      } else {
        return static_cast<A>(grad[pixel + j * cstride]);
      }
    };
    // dx[c] = gf[c] - x[c] * sum of the terms t[j] of the channels j whose window holds c.
    A own = 0, terms = 0;
    const int j1 = min(C - 1, static_cast<int>(c) + before);
    for (int j = max(0, static_cast<int>(c) - after); j <= j1; ++j) {
      const A s = window_sumsq<A>(xp, cstride, j, C, before, after);
      A gf, t;
      lrn_grad_terms(s, static_cast<A>(xp[j * cstride]), grad_at(j), prm, gf, t);
      terms += t;
      if (j == c) own = gf;
    }
    dx[e] = static_cast<T>(own - static_cast<A>(x[e]) * terms);
  }
}

// One thread per pooled output, in the output's memory order; each window element's LRN is
// computed directly and rounded to T before the comparison, as max_pool2d(lrn(x)) would see it.
template <typename T, bool CL>
__global__ void __launch_bounds__(kThreads)
    lrn_max_pool2d_forward_generic_kernel(const T* __restrict__ x, T* __restrict__ out,
                                          uint8_t* __restrict__ indices, int64_t total, int C, int before,
                                          int after, PoolShape ps, LrnParams<at::opmath_type<T>> prm) {
  using A = at::opmath_type<T>;
  const int64_t cstride = CL ? 1 : static_cast<int64_t>(ps.H) * ps.W;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    int64_t n, c, oh, ow;
    coords<CL>(e, C, ps.OH, ps.OW, n, c, oh, ow);
    A best = -std::numeric_limits<A>::infinity();
    int arg = 0;
    for (int a = 0; a < ps.kh; ++a) {
      for (int b = 0; b < ps.kw; ++b) {
        const T* xp = x + offset_of<CL>(n, 0, oh * ps.sh + a, ow * ps.sw + b, C, ps.H, ps.W);
        const A s = window_sumsq<A>(xp, cstride, static_cast<int>(c), C, before, after);
        const A v = static_cast<A>(static_cast<T>(static_cast<A>(xp[c * cstride]) * lrn_factor(s, prm)));
        pool_update(v, a * ps.kw + b, best, arg);
      }
    }
    out[e] = static_cast<T>(best);
    indices[e] = static_cast<uint8_t>(arg);
  }
}

// ================================================================================================
// NCHW channel walks. Thread t owns VEC pixels (n, hw .. hw + VEC) and the channels
// [c_begin, c_end) of group blockIdx.y; channel j of those pixels is at base + j * HW.
// ================================================================================================
template <typename T, int SIZE, int VEC, int U>
__global__ void __launch_bounds__(kThreads)
    lrn_forward_nchw_kernel(const T* __restrict__ x, T* __restrict__ out, int pixel_vecs, int64_t HW, int C,
                            int c_chunk, LrnParams<float> prm) {
  using Window = LrnForwardWindow<SIZE, VEC>;
  const unsigned t = blockIdx.x * kThreads + threadIdx.x;
  if (t >= static_cast<unsigned>(pixel_vecs)) return;
  const unsigned hw_vecs = static_cast<unsigned>(HW / VEC), n = t / hw_vecs;
  const int64_t base = static_cast<int64_t>(n) * C * HW + static_cast<int64_t>(t - n * hw_vecs) * VEC;
  const int c_begin = blockIdx.y * c_chunk, c_end = min(C, c_begin + c_chunk);
  const int j_end = c_end + Window::kAfter;  // the stream: channels [c_begin - kBefore, j_end)
  Window win;
  win.reset();
  const auto step = [&](int j0, auto checked) {
    constexpr bool kChecked = decltype(checked)::value;
    float xb[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      if (!kChecked || (j >= 0 && j < C && j < j_end)) {
        load_as<VEC>(x + base + j * HW, xb[u]);
      } else {
        fill_zero(xb[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      win.push(xb[u]);
      const int c = j0 + u - Window::kAfter;
      if (!kChecked || (c >= c_begin && c < c_end)) {
        float y[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) y[v] = win.out(v, prm);
        store_as<VEC>(out + base + c * HW, y);
      }
    }
  };
  // Every load and output of a batch is in range from channel c_begin + kAfter on.
  walk_channels<U>(c_begin - Window::kBefore, j_end, max(0, c_begin + Window::kAfter), min(C, j_end), step);
}

template <typename T, int SIZE, int VEC, int U>
__global__ void __launch_bounds__(kThreads)
    lrn_backward_nchw_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ dx,
                             int pixel_vecs, int64_t HW, int C, int c_chunk, LrnParams<float> prm) {
  using Window = LrnBackwardWindow<SIZE, VEC>;
  const unsigned t = blockIdx.x * kThreads + threadIdx.x;
  if (t >= static_cast<unsigned>(pixel_vecs)) return;
  const unsigned hw_vecs = static_cast<unsigned>(HW / VEC), n = t / hw_vecs;
  const int64_t base = static_cast<int64_t>(n) * C * HW + static_cast<int64_t>(t - n * hw_vecs) * VEC;
  const int c_begin = blockIdx.y * c_chunk, c_end = min(C, c_begin + c_chunk);
  // Stream step j reads x of channel j and grad of channel j - kAfter, and yields dx of channel
  // j - SIZE + 1. Terms of channels below g_lo never reach a dx of this group.
  const int j_end = c_end + SIZE - 1;
  const int g_lo = max(0, c_begin - Window::kAfter);
  Window win;
  win.reset();
  const auto step = [&](int j0, auto checked) {
    constexpr bool kChecked = decltype(checked)::value;
    float xb[U][VEC], gb[U][VEC];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u, c = j - Window::kAfter;
      if (!kChecked || (j >= 0 && j < C && j < j_end)) {
        load_as<VEC>(x + base + j * HW, xb[u]);
      } else {
        fill_zero(xb[u]);
      }
      if (!kChecked || (c >= g_lo && c < C && j < j_end)) {
        load_as<VEC>(grad + base + c * HW, gb[u]);
      } else {
        fill_zero(gb[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u, c = j - Window::kAfter, i = j - (SIZE - 1);
      win.push_x(xb[u]);
      win.push_grad(gb[u], !kChecked || (c >= 0 && c < C), prm);
      if (!kChecked || (i >= c_begin && i < c_end)) {
        float y[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) y[v] = win.dx(v);
        store_as<VEC>(dx + base + i * HW, y);
      }
    }
  };
  // Every load and output of a batch is in range from channel c_begin + SIZE - 1 on.
  walk_channels<U>(c_begin - (SIZE - 1), j_end, c_begin + SIZE - 1, min(C, j_end), step);
}

// ================================================================================================
// channels_last: lanes own chunks of VEC channels (see LaneChunk); C is a multiple of VEC, so a
// chunk never straddles two pixels and the channel of its first element is (q mod C/VEC) * VEC.
// ================================================================================================

// The whole tensor is one row of chunks.
template <typename T, int SIZE, int VEC>
__global__ void __launch_bounds__(kThreads)
    lrn_forward_nhwc_kernel(const T* __restrict__ x, T* __restrict__ out, int warps, int chunks, int C,
                            LrnParams<float> prm) {
  constexpr int kBefore = SIZE / 2, kAfter = (SIZE - 1) / 2;
  const LaneChunk lc = lane_chunk(warps, chunks);
  if (lc.row > 0) return;  // the whole warp
  float xv[VEC];
  int c0 = 0;
  fill_zero(xv);
  if (lc.loads) {
    load_as<VEC>(x + static_cast<int64_t>(lc.q) * VEC, xv);
    c0 = static_cast<int>(static_cast<unsigned>(lc.q) % static_cast<unsigned>(C / VEC)) * VEC;
  }
  float sq[VEC], sums[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) sq[v] = xv[v] * xv[v];
  lane_window_sums<kBefore, kAfter>(sq, c0 > 0, c0 + VEC < C, sums);
  if (lc.produces) {
    float y[VEC];
#pragma unroll
    for (int v = 0; v < VEC; ++v) y[v] = xv[v] * lrn_factor(sums[v], prm);
    store_as<VEC>(out + static_cast<int64_t>(lc.q) * VEC, y);
  }
}

// The LRN gradient of a lane's chunk of VEC channels of one pixel, from x and the gradient g of the
// LRN output there (zeros, and `loads` false, in lanes that hold no chunk); the window sums of x^2
// and of the gradient terms come from the neighbouring lanes (has_left / has_right: their chunk is
// the same pixel's). RELU: x is the output of a ReLU, and y is the gradient of the ReLU's input
// instead: y where x > 0, else 0 (threshold_backward's rule: a NaN x passes its gradient). Every
// lane of the warp must call it.
template <int SIZE, int VEC, bool RELU>
__device__ __forceinline__ void lrn_grad_chunk(const float (&xv)[VEC], const float (&gv)[VEC], bool loads,
                                               bool has_left, bool has_right, const LrnParams<float>& prm,
                                               float (&y)[VEC]) {
  constexpr int kBefore = SIZE / 2, kAfter = (SIZE - 1) / 2;
  float sq[VEC], sums[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) sq[v] = xv[v] * xv[v];
  lane_window_sums<kBefore, kAfter>(sq, has_left, has_right, sums);
  float gf[VEC], t[VEC], tsums[VEC];
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    lrn_grad_terms(sums[v], xv[v], gv[v], prm, gf[v], t[v]);
    t[v] = loads ? t[v] : 0.f;
  }
  // Channel c collects the terms of the channels whose window holds it: [c - kAfter, c + kBefore].
  lane_window_sums<kAfter, kBefore>(t, has_left, has_right, tsums);
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    y[v] = gf[v] - xv[v] * tsums[v];
    if constexpr (RELU) y[v] = xv[v] <= 0.f ? 0.f : y[v];
  }
}

// dx of lrn: the whole tensor is one row of chunks, as in the forward.
template <typename T, int SIZE, int VEC>
__global__ void __launch_bounds__(kThreads)
    lrn_backward_nhwc_kernel(const T* __restrict__ grad, const T* __restrict__ x, T* __restrict__ dx, int warps,
                             int chunks, int C, LrnParams<float> prm) {
  const LaneChunk lc = lane_chunk(warps, chunks);
  if (lc.row > 0) return;  // the whole warp
  const int64_t e = static_cast<int64_t>(lc.q) * VEC;
  float xv[VEC], gv[VEC], y[VEC];
  int c0 = 0;
  fill_zero(xv);
  fill_zero(gv);
  if (lc.loads) {
    c0 = static_cast<int>(static_cast<unsigned>(lc.q) % static_cast<unsigned>(C / VEC)) * VEC;
    load_as<VEC>(x + e, xv);
    load_as<VEC>(grad + e, gv);
  }
  lrn_grad_chunk<SIZE, VEC, false>(xv, gv, lc.loads, c0 > 0, c0 + VEC < C, prm, y);
  if (lc.produces) store_as<VEC>(dx + e, y);
}

// Chunks of one block's tile in the kernels below: its warps' producing lanes.
constexpr int kChunksPerBlock = kWarps * kProducingLanes;

// The grid of a kernel that sums per channel with write_channel_partials must be a multiple of
// this: the smallest m with m * kChunksPerBlock a multiple of the channel groups. Then tile
// b + k * gridDim.x starts at a chunk congruent to tile b's modulo the groups, so every lane meets
// the same channel group in each of its block's tiles and adds its values up in registers, with no
// barrier until the end.
int relu_grid_multiple(int64_t groups) { return static_cast<int>(groups / std::gcd(int64_t(kChunksPerBlock), groups)); }

// The end of such a kernel: acc holds what each producing lane wrote, summed over its tiles. The
// block adds its lanes per channel in a fixed order and writes partial[blockIdx.x, C];
// launch_bias_grad_sum adds the blocks' rows. Deterministic, and the grid (the blocks that fit on
// the GPU at once) keeps partial small enough for that last sum to be quick. Needs
// C / VEC <= kThreads (one channel group per thread).
template <int VEC>
__device__ __forceinline__ void write_channel_partials(const float (&acc)[VEC], int C, float* __restrict__ partial) {
  __shared__ float lanes[kChunksPerBlock][VEC];
  const int lane = threadIdx.x & 31, slot = (threadIdx.x / 32) * kProducingLanes + lane - 1;
  if (lane >= 1 && lane <= kProducingLanes) {
#pragma unroll
    for (int v = 0; v < VEC; ++v) lanes[slot][v] = acc[v];
  }
  __syncthreads();
  const int groups = C / VEC, g = threadIdx.x;
  if (g < groups) {
    // slot s holds channel group (first + s) mod groups, first = the group of the block's first chunk
    const int first = static_cast<int>(static_cast<int64_t>(blockIdx.x) * kChunksPerBlock % groups);
    float sum[VEC];
    fill_zero(sum);
    for (int s = (g - first + groups) % groups; s < kChunksPerBlock; s += groups) {
#pragma unroll
      for (int v = 0; v < VEC; ++v) sum[v] += lanes[s][v];
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) partial[static_cast<int64_t>(blockIdx.x) * C + g * VEC + v] = sum[v];
  }
}

// dx of lrn_max_pool2d, channels_last, 3x3/2 pool without padding, in one pass. The lanes take the
// chunks of the stream of stride cells (cells (n, i, j) in order, C / VEC chunks each) as LaneChunk
// lays them out, and block b the tiles b, b + gridDim.x, ... A lane reads the (at most 2x2)
// windows covering its cell once, gathers from them the gradient of the LRN output at the cell's
// 2x2 pixels (PoolCell: PyTorch's order, rounded to T as the pool's gradient would be stored), and
// passes each pixel through the LRN gradient. HBM sees x and dx once and the pooled gradient and
// indices about once (the neighbouring cells' re-reads hit L1/L2): the pool's full-resolution
// gradient, which max_pool2d_backward followed by lrn_backward writes and reads back, never
// exists. (Gathering per pixel instead of per cell read each window 2.25 times from L2 and ran at
// a fraction of the two passes' speed.)
// RELU: x is the output of a ReLU; dx is the gradient of the ReLU's input (lrn_grad_chunk), and
// its per-channel sums go to partial (write_channel_partials; the grid is a multiple of
// relu_grid_multiple).
template <typename T, int SIZE, int VEC, bool RELU>
__global__ void __launch_bounds__(kThreads, 2)
    lrn_max_pool2d_backward_nhwc_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ indices,
                                        const T* __restrict__ x, T* __restrict__ dx, int warps, int chunks, int C,
                                        int cells_h, int cells_w, PoolShape s, LrnParams<float> prm,
                                        float* __restrict__ partial) {
  using Cell = PoolCell<kCellK, kCellK, kCellS, kCellS>;
  const unsigned groups = static_cast<unsigned>(C / VEC);
  const int tiles = (chunks + kChunksPerBlock - 1) / kChunksPerBlock;
  float acc[VEC];
  fill_zero(acc);
  for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    LaneChunk lc = lane_chunk(warps, chunks, tile);
    if (lc.row > 0) lc.loads = lc.produces = false;  // warps past the last chunk, in the last tile
    int c0 = 0, i = 0, j = 0;
    int64_t n = 0;
    if (lc.loads) {
      const unsigned cell = static_cast<unsigned>(lc.q) / groups, row = cell / static_cast<unsigned>(cells_w);
      c0 = static_cast<int>(static_cast<unsigned>(lc.q) - cell * groups) * VEC;
      n = row / static_cast<unsigned>(cells_h);
      i = static_cast<int>(row - static_cast<unsigned>(n) * cells_h);
      j = static_cast<int>(cell - row * cells_w);
    }
    // All loads first, so that they are in flight together: x at the cell's pixels (r, s) ...
    bool pix_ok[kCellS][kCellS];
    Vec<T, VEC> xr[kCellS][kCellS] = {};
#pragma unroll
    for (int r = 0; r < kCellS; ++r) {
#pragma unroll
      for (int c = 0; c < kCellS; ++c) {
        const int h = i * kCellS + r, w = j * kCellS + c;
        pix_ok[r][c] = lc.loads && h < s.H && w < s.W;
        if (pix_ok[r][c]) xr[r][c] = load_vec<VEC>(x + ((n * s.H + h) * s.W + w) * C + c0);
      }
    }
    // ... and the gradient and indices of the windows covering the cell.
    float cell[VEC][kCellS][kCellS] = {};
    Cell::gather_nhwc(grad, indices, n, i, j, c0, C, s, lc.loads, cell);
#pragma unroll
    for (int r = 0; r < kCellS; ++r) {
#pragma unroll
      for (int c = 0; c < kCellS; ++c) {
        const bool ok = pix_ok[r][c];
        float xv[VEC], gv[VEC], y[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
          xv[v] = ok ? static_cast<float>(xr[r][c].v[v]) : 0.f;
          gv[v] = ok ? static_cast<float>(static_cast<T>(cell[v][r][c])) : 0.f;
        }
        lrn_grad_chunk<SIZE, VEC, RELU>(xv, gv, ok, c0 > 0, c0 + VEC < C, prm, y);
        if (lc.produces && ok) {
          store_as<VEC>(dx + ((n * s.H + i * kCellS + r) * s.W + j * kCellS + c) * C + c0, y);
          if constexpr (RELU) {
            // the values as stored (rounded to T), as the unfused ops' bias gradient sums them
#pragma unroll
            for (int v = 0; v < VEC; ++v) acc[v] += static_cast<float>(static_cast<T>(y[v]));
          }
        }
      }
    }
  }
  if constexpr (RELU) write_channel_partials(acc, C, partial);
}

// ================================================================================================
// Fused forward
// ================================================================================================

// NCHW: block (n, tile) pools a toh x tow tile of outputs from the tih x tiw input pixels under it,
// for the channels of group blockIdx.y. Thread t holds input pixels t + k * kThreads (k < P) and
// walks their channels; each round of U channels goes through shared memory to the pooling
// threads, `lanes` of which share an output position.
struct FusedTile {
  int toh, tow, tiles_h, tiles_w;
};

template <typename T, int SIZE, int P, int U, int KH, int KW>
__global__ void __launch_bounds__(kThreads, 2)  // 128 registers: no spills (ptxas alone picks 64 and spills)
    lrn_max_pool2d_forward_nchw_kernel(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ indices,
                                       int C, int c_chunk, PoolShape s, FusedTile ft, LrnParams<float> prm) {
  using Window = LrnForwardWindow<SIZE, P>;
  __shared__ T lrn_tile[U][P * kThreads];
  const int tile = blockIdx.x;
  const int tc = tile % ft.tiles_w, tr = (tile / ft.tiles_w) % ft.tiles_h, n = tile / ft.tiles_w / ft.tiles_h;
  const int oh0 = tr * ft.toh, ow0 = tc * ft.tow;
  const int toh = min(ft.toh, s.OH - oh0), tow = min(ft.tow, s.OW - ow0);
  const int tiw = (tow - 1) * s.sw + s.kw, npix = ((toh - 1) * s.sh + s.kh) * tiw;
  const int64_t plane_in = static_cast<int64_t>(s.H) * s.W, plane_out = static_cast<int64_t>(s.OH) * s.OW;

  int pix_off[P];
  bool pix_ok[P];
#pragma unroll
  for (int k = 0; k < P; ++k) {
    const int p = threadIdx.x + k * kThreads, r = p / tiw;
    pix_ok[k] = p < npix;
    pix_off[k] = (oh0 * s.sh + r) * s.W + ow0 * s.sw + (p - r * tiw);
  }
  const int npos = toh * tow, lanes = kThreads / npos;
  const bool pools = threadIdx.x < lanes * npos;
  const int pos = threadIdx.x % npos, u_first = threadIdx.x / npos;
  const int pr = pos / tow, pc = pos - pr * tow;
  const int window0 = pr * s.sh * tiw + pc * s.sw;  // tile index of the window's top-left pixel
  const T* xn = x + static_cast<int64_t>(n) * C * plane_in;
  const int64_t out0 = static_cast<int64_t>(n) * C * plane_out + static_cast<int64_t>(oh0 + pr) * s.OW + ow0 + pc;

  const int c_begin = blockIdx.y * c_chunk, c_end = min(C, c_begin + c_chunk);
  const int j_end = c_end + Window::kAfter;
  Window win;
  win.reset();
  const auto step = [&](int j0, auto checked) {
    constexpr bool kChecked = decltype(checked)::value;
    float xb[U][P];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int j = j0 + u;
      const bool channel = !kChecked || (j >= 0 && j < C && j < j_end);
#pragma unroll
      for (int k = 0; k < P; ++k) {
        xb[u][k] = channel && pix_ok[k] ? static_cast<float>(xn[j * plane_in + pix_off[k]]) : 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      win.push(xb[u]);
      const int c = j0 + u - Window::kAfter;
      if (!kChecked || (c >= c_begin && c < c_end)) {
#pragma unroll
        for (int k = 0; k < P; ++k) {
          if (pix_ok[k]) lrn_tile[u][threadIdx.x + k * kThreads] = static_cast<T>(win.out(k, prm));
        }
      }
    }
    __syncthreads();
    if (pools) {
      for (int u = u_first; u < U; u += lanes) {
        const int c = j0 + u - Window::kAfter;
        if (kChecked && (c < c_begin || c >= c_end)) continue;
        float best[1];
        int arg[1];
        scan_inner_window<KH, KW>(
            [&](int a, int b, float (&v)[1]) { v[0] = static_cast<float>(lrn_tile[u][window0 + a * tiw + b]); }, s.kh,
            s.kw, best, arg);
        out[out0 + c * plane_out] = static_cast<T>(best[0]);
        indices[out0 + c * plane_out] = static_cast<uint8_t>(arg[0]);
      }
    }
    __syncthreads();
  };
  // The same batches for every thread (the barriers): in range from channel c_begin + kAfter on.
  walk_channels<U>(c_begin - Window::kBefore, j_end, max(0, c_begin + Window::kAfter), min(C, j_end), step);
}

// channels_last: thread = (output pixel, chunk of VEC channels). At each window position it loads
// the chunk (16 bytes) and the kBefore / kAfter channels on either side, and computes the chunk's
// LRN there; the running maximum of the window is all it keeps. Neighbouring threads read the
// neighbouring chunks of the same pixels, so the input comes from HBM once and the halo and the
// overlap of the windows (2.25 reads per pixel for 3x3/2) from L1/L2. The LRN of a pixel is
// computed once per covering window instead of once: its two special-function operations per
// element cost less than the shared-memory rounds of keeping it.
template <typename T, int SIZE, int VEC, int KH, int KW>
__global__ void __launch_bounds__(kThreads)
    lrn_max_pool2d_forward_nhwc_kernel(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ indices,
                                       int64_t total, int C, PoolShape s, LrnParams<float> prm) {
  constexpr int kBefore = SIZE / 2, kAfter = (SIZE - 1) / 2;
  const int G = C / VEC;
  for (int64_t t = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; t < total;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t p = t / G;  // the output pixel, (n, oh, ow) row-major
    const int c0 = static_cast<int>(t - p * G) * VEC;
    const int ow = static_cast<int>(p % s.OW), oh = static_cast<int>(p / s.OW % s.OH);
    const int64_t n = p / s.OW / s.OH;
    const T* corner = x + ((n * s.H + oh * s.sh) * s.W + ow * s.sw) * C + c0;
    float best[VEC];
    int arg[VEC];
    scan_inner_window<KH, KW>(
        [&](int a, int b, float (&y)[VEC]) {
          const T* px = corner + (static_cast<int64_t>(a) * s.W + b) * C;
          float v[VEC], sq[kBefore + VEC + kAfter];
          load_as<VEC>(px, v);
          // the channels past either end are LRN's zero padding
#pragma unroll
          for (int i = 0; i < kBefore; ++i) {
            const float h = c0 - kBefore + i >= 0 ? static_cast<float>(px[i - kBefore]) : 0.f;
            sq[i] = h * h;
          }
#pragma unroll
          for (int i = 0; i < VEC; ++i) sq[kBefore + i] = v[i] * v[i];
#pragma unroll
          for (int i = 0; i < kAfter; ++i) {
            const float h = c0 + VEC + i < C ? static_cast<float>(px[VEC + i]) : 0.f;
            sq[kBefore + VEC + i] = h * h;
          }
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            float sum = sq[i];
#pragma unroll
            for (int k = 1; k <= kBefore + kAfter; ++k) sum += sq[i + k];
            // rounded to T, as the LRN output that the reference pools: ties are decided on it
            y[i] = static_cast<float>(static_cast<T>(v[i] * lrn_factor(sum, prm)));
          }
        },
        s.kh, s.kw, best, arg);
    store_as<VEC>(out + p * C + c0, best);
    store_as<VEC>(indices + p * C + c0, arg);
  }
}

// ================================================================================================
// Fused backward, NCHW, 3x3/2 pool: thread = (n, stride cell (i, j)) x channel group. Each
// channel step reads x at the cell's 4 pixels and the indices and grad_out of the (at most) 2x2
// windows covering the cell, gathers the LRN output's gradient at the 4 pixels (PoolCell), and
// advances an LrnBackwardWindow over them.
// ================================================================================================
template <typename T, int SIZE, int U>
__global__ void __launch_bounds__(kThreads)
    lrn_max_pool2d_backward_nchw_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ indices,
                                        const T* __restrict__ x, T* __restrict__ dx, int cells, int cells_h,
                                        int cells_w, int C, int c_chunk, PoolShape s, LrnParams<float> prm) {
  using Cell = PoolCell<kCellK, kCellK, kCellS, kCellS>;
  constexpr int kPix = kCellS * kCellS, kWin = Cell::kWinH * Cell::kWinW;
  using Window = LrnBackwardWindow<SIZE, kPix>;
  const unsigned t = blockIdx.x * kThreads + threadIdx.x;
  if (t >= static_cast<unsigned>(cells)) return;
  const unsigned cell_row = t / static_cast<unsigned>(cells_w), n = cell_row / static_cast<unsigned>(cells_h);
  const int i = static_cast<int>(cell_row - n * cells_h), j = static_cast<int>(t - cell_row * cells_w);
  int pix_off[kPix], win_off[kWin];
  bool pix_ok[kPix], win_ok[kWin];
#pragma unroll
  for (int p = 0; p < kPix; ++p) {
    const int h = i * kCellS + p / kCellS, w = j * kCellS + p % kCellS;
    pix_ok[p] = h < s.H && w < s.W;
    pix_off[p] = h * s.W + w;
  }
#pragma unroll
  for (int q = 0; q < kWin; ++q) {
    // q = (a, b) with a, b descending as q ascends: windows in (oh, ow) order.
    const int oh = i - (Cell::kWinH - 1 - q / Cell::kWinW), ow = j - (Cell::kWinW - 1 - q % Cell::kWinW);
    win_ok[q] = oh >= 0 && oh < s.OH && ow >= 0 && ow < s.OW;
    win_off[q] = oh * s.OW + ow;
  }
  const int64_t plane_in = static_cast<int64_t>(s.H) * s.W, plane_out = static_cast<int64_t>(s.OH) * s.OW;
  const T* xn = x + static_cast<int64_t>(n) * C * plane_in;
  T* dxn = dx + static_cast<int64_t>(n) * C * plane_in;
  const T* gn = grad + static_cast<int64_t>(n) * C * plane_out;
  const uint8_t* in = indices + static_cast<int64_t>(n) * C * plane_out;

  const int c_begin = blockIdx.y * c_chunk, c_end = min(C, c_begin + c_chunk);
  const int j_end = c_end + SIZE - 1;
  const int g_lo = max(0, c_begin - Window::kAfter);
  Window win;
  win.reset();
  const auto step = [&](int j0, auto checked) {
    constexpr bool kChecked = decltype(checked)::value;
    float xb[U][kPix], gb[U][kWin];
    int kb[U][kWin];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int jj = j0 + u, c = jj - Window::kAfter;
      const bool xch = !kChecked || (jj >= 0 && jj < C && jj < j_end);
      const bool gch = !kChecked || (c >= g_lo && c < C && jj < j_end);
#pragma unroll
      for (int p = 0; p < kPix; ++p) {
        xb[u][p] = xch && pix_ok[p] ? static_cast<float>(xn[jj * plane_in + pix_off[p]]) : 0.f;
      }
#pragma unroll
      for (int q = 0; q < kWin; ++q) {
        const bool ok = gch && win_ok[q];
        kb[u][q] = ok ? static_cast<int>(in[c * plane_out + win_off[q]]) : -1;
        gb[u][q] = ok ? static_cast<float>(gn[c * plane_out + win_off[q]]) : 0.f;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int jj = j0 + u, c = jj - Window::kAfter, ci = jj - (SIZE - 1);
      win.push_x(xb[u]);
      float cell[kCellS][kCellS] = {};
#pragma unroll
      for (int q = 0; q < kWin; ++q) {
        Cell::add(Cell::kWinH - 1 - q / Cell::kWinW, Cell::kWinW - 1 - q % Cell::kWinW, kb[u][q], gb[u][q], cell);
      }
      float gy[kPix];
#pragma unroll
      for (int p = 0; p < kPix; ++p) gy[p] = cell[p / kCellS][p % kCellS];
      win.push_grad(gy, !kChecked || (c >= 0 && c < C), prm);
      if (!kChecked || (ci >= c_begin && ci < c_end)) {
#pragma unroll
        for (int p = 0; p < kPix; ++p) {
          if (pix_ok[p]) dxn[ci * plane_in + pix_off[p]] = static_cast<T>(win.dx(p));
        }
      }
    }
  };
  walk_channels<U>(c_begin - (SIZE - 1), j_end, c_begin + SIZE - 1, min(C, j_end), step);
}

// ================================================================================================
// Host side
// ================================================================================================
constexpr int64_t kNoPadding[2] = {0, 0};

bool is_channels_last(at::MemoryFormat fmt) { return fmt == at::MemoryFormat::ChannelsLast; }

// The 16-byte vector of T the channels_last kernels load, if C and the tensors allow it.
template <typename T>
bool channels_last_vectors(int64_t C, std::initializer_list<const at::Tensor*> tensors) {
  constexpr int kVec = 16 / sizeof(T);
  if (C % kVec != 0) return false;
  for (const at::Tensor* t : tensors) {
    if (!aligned_to(*t, t->scalar_type() == at::kByte ? kVec : 16)) return false;
  }
  return true;
}

// The register-window kernels, where they apply (false: run the generic kernel instead).
template <typename T>
bool lrn_forward_fast(const at::Tensor& x, at::Tensor& out, const LrnParams<float>& prm, cudaStream_t stream) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  if (is_channels_last(output_memory_format(x))) {
    constexpr int kVec = 16 / sizeof(T);
    const int64_t chunks = x.numel() / kVec, warps = ceil_div(chunks, kProducingLanes);
    if (!channels_last_vectors<T>(C, {&x, &out}) || !fits_index32(chunks)) return false;
    lrn_forward_nhwc_kernel<T, kFastLrnSize, kVec><<<grid_blocks(warps, kWarps), kThreads, 0, stream>>>(
        xp, op, static_cast<int>(warps), static_cast<int>(chunks), static_cast<int>(C), prm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
  constexpr int kVec = 4;
  const bool vec = HW % kVec == 0 && aligned_to(x, kVec * sizeof(T)) && aligned_to(out, kVec * sizeof(T));
  const int64_t pixel_vecs = N * HW / (vec ? kVec : 1);
  if (!fits_index32(pixel_vecs)) return false;
  const int chunk = channel_chunk(pixel_vecs, C);
  const dim3 grid(grid_blocks(pixel_vecs, kThreads), static_cast<unsigned>(ceil_div(C, chunk)));
  const auto kernel = vec ? lrn_forward_nchw_kernel<T, kFastLrnSize, kVec, kForwardUnroll>
                          : lrn_forward_nchw_kernel<T, kFastLrnSize, 1, kForwardUnroll>;
  kernel<<<grid, kThreads, 0, stream>>>(xp, op, static_cast<int>(pixel_vecs), HW, static_cast<int>(C), chunk, prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename T>
bool lrn_backward_fast(const at::Tensor& g, const at::Tensor& x, at::Tensor& dx, const LrnParams<float>& prm,
                       cudaStream_t stream) {
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const T* gp = g.const_data_ptr<T>();
  const T* xp = x.const_data_ptr<T>();
  T* dp = dx.mutable_data_ptr<T>();
  if (is_channels_last(output_memory_format(x))) {
    constexpr int kVec = 16 / sizeof(T);
    const int64_t chunks = x.numel() / kVec, warps = ceil_div(chunks, kProducingLanes);
    if (!channels_last_vectors<T>(C, {&x, &g, &dx}) || !fits_index32(chunks)) return false;
    lrn_backward_nhwc_kernel<T, kFastLrnSize, kVec><<<grid_blocks(warps, kWarps), kThreads, 0, stream>>>(
        gp, xp, dp, static_cast<int>(warps), static_cast<int>(chunks), static_cast<int>(C), prm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
  constexpr int kVec = 4;
  const int64_t bytes = kVec * sizeof(T);
  const bool vec = HW % kVec == 0 && aligned_to(x, bytes) && aligned_to(g, bytes) && aligned_to(dx, bytes);
  const int64_t pixel_vecs = N * HW / (vec ? kVec : 1);
  if (!fits_index32(pixel_vecs)) return false;
  const int chunk = channel_chunk(pixel_vecs, C);
  const dim3 grid(grid_blocks(pixel_vecs, kThreads), static_cast<unsigned>(ceil_div(C, chunk)));
  const auto kernel = vec ? lrn_backward_nchw_kernel<T, kFastLrnSize, kVec, kBackwardUnroll>
                          : lrn_backward_nchw_kernel<T, kFastLrnSize, 1, kBackwardUnroll>;
  kernel<<<grid, kThreads, 0, stream>>>(gp, xp, dp, static_cast<int>(pixel_vecs), HW, static_cast<int>(C), chunk, prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

at::Tensor lrn_cuda(const at::Tensor& x, int64_t size, double alpha, double beta, double k) {
  CHECK_4D(x);
  CHECK_FLOATING(x);
  CHECK_DEVICE_TYPE(x, at::kCUDA);
  check_lrn_params(size, beta, k);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_memory_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor out = poison_if_debug(at::empty(x.sizes(), x.options().memory_format(fmt)));
  if (out.numel() == 0) return out;
  check_plane(x.size(2), x.size(3), "x");
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (size == kFastLrnSize &&
          lrn_forward_fast<scalar_t>(xc, out, make_lrn_params<float>(size, alpha, beta, k), stream)) {
        return;
      }
    }
    const int64_t total = out.numel();
    const auto kernel = is_channels_last(fmt) ? lrn_forward_generic_kernel<scalar_t, true>
                                              : lrn_forward_generic_kernel<scalar_t, false>;
    kernel<<<strided_grid(total), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), total, static_cast<int>(x.size(1)),
        static_cast<int>(x.size(2)), static_cast<int>(x.size(3)), static_cast<int>(size / 2),
        static_cast<int>((size - 1) / 2), make_lrn_params<at::opmath_type<scalar_t>>(size, alpha, beta, k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

void check_grad_like(const at::Tensor& grad_out, const at::Tensor& x) {
  CHECK_4D(x);
  CHECK_FLOATING(x);
  CHECK_DEVICE_TYPE(x, at::kCUDA);
  CHECK_4D(grad_out);
  CHECK_SAME_DTYPE(x, grad_out);
  CHECK_SAME_DEVICE(x, grad_out);
}

at::Tensor lrn_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, int64_t size, double alpha,
                             double beta, double k) {
  check_grad_like(grad_out, x);
  TORCH_CHECK(grad_out.sizes() == x.sizes(), "grad_out must have the shape of x ", x.sizes(), ", got ",
              grad_out.sizes());
  check_lrn_params(size, beta, k);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_memory_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor g = grad_out.contiguous(fmt);
  at::Tensor dx = poison_if_debug(at::empty(x.sizes(), x.options().memory_format(fmt)));
  if (dx.numel() == 0) return dx;
  check_plane(x.size(2), x.size(3), "x");
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_backward_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (size == kFastLrnSize &&
          lrn_backward_fast<scalar_t>(g, xc, dx, make_lrn_params<float>(size, alpha, beta, k), stream)) {
        return;
      }
    }
    const int64_t total = dx.numel();
    const PoolShape shape{static_cast<int>(x.size(2)), static_cast<int>(x.size(3))};
    const auto kernel = is_channels_last(fmt) ? lrn_backward_generic_kernel<scalar_t, true, false>
                                              : lrn_backward_generic_kernel<scalar_t, false, false>;
    kernel<<<strided_grid(total), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), nullptr, xc.const_data_ptr<scalar_t>(), dx.mutable_data_ptr<scalar_t>(), total,
        static_cast<int>(x.size(1)), static_cast<int>(size / 2), static_cast<int>((size - 1) / 2), shape,
        make_lrn_params<at::opmath_type<scalar_t>>(size, alpha, beta, k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

// The NCHW tile: balanced tiles of at most 32 output columns, as many rows as keep the input
// tile within kTilePixels pixels per thread and the outputs within one per thread.
FusedTile choose_tile(const PoolShape& s) {
  const auto fits = [&](int64_t toh, int64_t tow) {
    return toh * tow <= kThreads && ((toh - 1) * s.sh + s.kh) * ((tow - 1) * s.sw + s.kw) <= kTilePixels * kThreads;
  };
  int64_t tow = std::min<int64_t>(s.OW, 32);
  while (tow > 1 && !fits(1, tow)) --tow;
  int64_t toh = 1;
  while (toh < s.OH && fits(toh + 1, tow)) ++toh;
  FusedTile ft;
  ft.tiles_w = static_cast<int>(ceil_div(s.OW, tow));
  ft.tiles_h = static_cast<int>(ceil_div(s.OH, toh));
  ft.tow = static_cast<int>(ceil_div(s.OW, ft.tiles_w));
  ft.toh = static_cast<int>(ceil_div(s.OH, ft.tiles_h));
  return ft;
}

template <typename T>
bool lrn_max_pool2d_forward_fast(const at::Tensor& x, at::Tensor& out, at::Tensor& indices, const PoolShape& s,
                                 const LrnParams<float>& prm, cudaStream_t stream) {
  const int64_t N = x.size(0), C = x.size(1);
  const T* xp = x.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  uint8_t* ip = indices.mutable_data_ptr<uint8_t>();
  const bool k3 = s.kh == 3 && s.kw == 3;  // AlexNet's window, unrolled
  if (is_channels_last(output_memory_format(x))) {
    constexpr int kVec = 16 / sizeof(T);
    if (!channels_last_vectors<T>(C, {&x, &out, &indices})) return false;
    const int64_t total = out.numel() / kVec;
    const auto kernel = k3 ? lrn_max_pool2d_forward_nhwc_kernel<T, kFastLrnSize, kVec, 3, 3>
                           : lrn_max_pool2d_forward_nhwc_kernel<T, kFastLrnSize, kVec, 0, 0>;
    kernel<<<strided_grid(total), kThreads, 0, stream>>>(xp, op, ip, total, static_cast<int>(C), s, prm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return true;
  }
  const FusedTile ft = choose_tile(s);
  const int64_t tiles = N * ft.tiles_w * ft.tiles_h;
  const int chunk = channel_chunk(tiles * kThreads, C);
  const dim3 grid(grid_blocks(tiles, 1), static_cast<unsigned>(ceil_div(C, chunk)));
  const auto kernel = k3 ? lrn_max_pool2d_forward_nchw_kernel<T, kFastLrnSize, kTilePixels, kTileChannels, 3, 3>
                         : lrn_max_pool2d_forward_nchw_kernel<T, kFastLrnSize, kTilePixels, kTileChannels, 0, 0>;
  kernel<<<grid, kThreads, 0, stream>>>(xp, op, ip, static_cast<int>(C), chunk, s, ft, prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

std::tuple<at::Tensor, at::Tensor> lrn_max_pool2d_cuda(const at::Tensor& x, int64_t size, double alpha, double beta,
                                                       double k, at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  CHECK_4D(x);
  CHECK_FLOATING(x);
  CHECK_DEVICE_TYPE(x, at::kCUDA);
  check_lrn_params(size, beta, k);
  const at::IntArrayRef padding(kNoPadding, 2);
  check_pool_params(kernel_size, stride, padding);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto out_hw = pool_output_hw(H, W, kernel_size, stride, padding, false);
  const int64_t OH = out_hw.first, OW = out_hw.second;
  check_plane(H, W, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_memory_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor out = poison_if_debug(at::empty({N, C, OH, OW}, x.options().memory_format(fmt)));
  at::Tensor indices = poison_if_debug(at::empty({N, C, OH, OW}, x.options().dtype(at::kByte).memory_format(fmt)));
  if (out.numel() == 0) return {out, indices};
  const PoolShape s = make_pool_shape(H, W, OH, OW, kernel_size, stride, padding);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_max_pool2d_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (size == kFastLrnSize &&
          lrn_max_pool2d_forward_fast<scalar_t>(xc, out, indices, s, make_lrn_params<float>(size, alpha, beta, k),
                                                stream)) {
        return;
      }
    }
    const int64_t total = out.numel();
    const auto kernel = is_channels_last(fmt) ? lrn_max_pool2d_forward_generic_kernel<scalar_t, true>
                                              : lrn_max_pool2d_forward_generic_kernel<scalar_t, false>;
    kernel<<<strided_grid(total), kThreads, 0, stream>>>(
        xc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), indices.mutable_data_ptr<uint8_t>(), total,
        static_cast<int>(C), static_cast<int>(size / 2), static_cast<int>((size - 1) / 2), s,
        make_lrn_params<at::opmath_type<scalar_t>>(size, alpha, beta, k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, indices};
}

// max_pool2d_backward's result: the gradient of the pool's input.
at::Tensor pool_gradient(const at::Tensor& g, const at::Tensor& indices, const PoolShape& s) {
  static const auto pool_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("alexnet_fast::max_pool2d_backward", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, at::IntArrayRef, at::IntArrayRef,
                            at::IntArrayRef, at::IntArrayRef)>();
  return pool_backward.call(g, indices, {s.H, s.W}, {s.kh, s.kw}, {s.sh, s.sw}, {s.ph, s.pw});
}

// channels_last, AlexNet's LRN size and 3x3/2 pool, whole vectors: lrn_max_pool2d_backward_nhwc_kernel
// (false: not applicable). RELU: for x = relu(z), dx is the gradient of z, and its per-channel sum
// goes to bias_grad.
template <typename T, bool RELU>
bool lrn_max_pool2d_backward_nhwc(const at::Tensor& g, const at::Tensor& x, const at::Tensor& indices,
                                  at::Tensor& dx, at::Tensor* bias_grad, const PoolShape& s,
                                  const LrnParams<float>& prm, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t cells_h = ceil_div(s.H, kCellS), cells_w = ceil_div(s.W, kCellS);
  const int64_t chunks = N * cells_h * cells_w * (C / kVec), warps = ceil_div(chunks, kProducingLanes);
  const bool cell_pool = s.kh == kCellK && s.kw == kCellK && s.sh == kCellS && s.sw == kCellS && s.ph == 0 && s.pw == 0;
  if (!is_channels_last(output_memory_format(x)) || !cell_pool ||
      !channels_last_vectors<T>(C, {&x, &g, &indices, &dx}) || !fits_index32(chunks + kChunksPerBlock) ||
      (RELU && C / kVec > kThreads)) {
    return false;
  }
  const auto kernel = lrn_max_pool2d_backward_nhwc_kernel<T, kFastLrnSize, kVec, RELU>;
  int64_t blocks = ceil_div(chunks, kChunksPerBlock);  // one tile per block
  at::Tensor partial;
  if constexpr (RELU) {
    // As many blocks as fit on the GPU at once (each walks a few dozen tiles at AlexNet's sizes),
    // rounded up to the kernel's multiple (the extra blocks, if any, write zero sums).
    static const int per_sm = [&] {
      int n = 0;
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, 0));
      return std::max(n, 1);
    }();
    const int64_t multiple = relu_grid_multiple(C / kVec);
    blocks = ceil_div(std::min<int64_t>(blocks, int64_t(sm_count()) * per_sm), multiple) * multiple;
    partial = poison_if_debug(at::empty({blocks, C}, x.options().dtype(at::kFloat)));
  }
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      g.const_data_ptr<T>(), indices.const_data_ptr<uint8_t>(), x.const_data_ptr<T>(), dx.mutable_data_ptr<T>(),
      static_cast<int>(warps), static_cast<int>(chunks), static_cast<int>(C), static_cast<int>(cells_h),
      static_cast<int>(cells_w), s, prm, RELU ? partial.mutable_data_ptr<float>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if constexpr (RELU) launch_bias_grad_sum<T>(partial, *bias_grad, stream);
  return true;
}

template <typename T>
bool lrn_max_pool2d_backward_fast(const at::Tensor& g, const at::Tensor& x, const at::Tensor& indices,
                                  at::Tensor& dx, const PoolShape& s, const LrnParams<float>& prm,
                                  cudaStream_t stream) {
  const int64_t N = x.size(0), C = x.size(1);
  if (is_channels_last(output_memory_format(x))) {
    // Other pools: the pool's gradient at full resolution, then the LRN's.
    return lrn_max_pool2d_backward_nhwc<T, false>(g, x, indices, dx, nullptr, s, prm, stream) ||
           lrn_backward_fast<T>(pool_gradient(g, indices, s), x, dx, prm, stream);
  }
  const int64_t cells_h = ceil_div(s.H, kCellS), cells_w = ceil_div(s.W, kCellS), cells = N * cells_h * cells_w;
  if (s.kh != kCellK || s.kw != kCellK || s.sh != kCellS || s.sw != kCellS || !fits_index32(cells)) return false;
  const int chunk = channel_chunk(cells, C);
  const dim3 grid(grid_blocks(cells, kThreads), static_cast<unsigned>(ceil_div(C, chunk)));
  lrn_max_pool2d_backward_nchw_kernel<T, kFastLrnSize, kCellUnroll><<<grid, kThreads, 0, stream>>>(
      g.const_data_ptr<T>(), indices.const_data_ptr<uint8_t>(), x.const_data_ptr<T>(), dx.mutable_data_ptr<T>(),
      static_cast<int>(cells), static_cast<int>(cells_h), static_cast<int>(cells_w), static_cast<int>(C), chunk, s,
      prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

// The arguments of the fused backward ops, checked; returns the pool's shape.
PoolShape check_fused_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& indices,
                                    int64_t size, double beta, double k, at::IntArrayRef kernel_size,
                                    at::IntArrayRef stride) {
  check_grad_like(grad_out, x);
  CHECK_4D(indices);
  TORCH_CHECK(indices.scalar_type() == at::kByte, "indices must be a uint8 tensor, got ", indices.scalar_type());
  CHECK_SAME_DEVICE(x, indices);
  check_lrn_params(size, beta, k);
  const at::IntArrayRef padding(kNoPadding, 2);
  check_pool_params(kernel_size, stride, padding);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto out_hw = pool_output_hw(H, W, kernel_size, stride, padding, false);
  const int64_t OH = out_hw.first, OW = out_hw.second;
  CHECK_SHAPE(grad_out, N, C, OH, OW);
  CHECK_SHAPE(indices, N, C, OH, OW);
  check_plane(H, W, "x");
  return make_pool_shape(H, W, OH, OW, kernel_size, stride, padding);
}

at::Tensor lrn_max_pool2d_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& indices,
                                        int64_t size, double alpha, double beta, double k,
                                        at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  const PoolShape s = check_fused_backward_args(grad_out, x, indices, size, beta, k, kernel_size, stride);
  const int64_t C = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_memory_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  const at::Tensor g = grad_out.contiguous(fmt);
  const at::Tensor idx = indices.contiguous(fmt);
  at::Tensor dx = poison_if_debug(at::empty(x.sizes(), x.options().memory_format(fmt)));
  if (dx.numel() == 0) return dx;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_max_pool2d_backward_cuda", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      if (size == kFastLrnSize &&
          lrn_max_pool2d_backward_fast<scalar_t>(g, xc, idx, dx, s, make_lrn_params<float>(size, alpha, beta, k),
                                                 stream)) {
        return;
      }
    }
    const int64_t total = dx.numel();
    const auto kernel = is_channels_last(fmt) ? lrn_backward_generic_kernel<scalar_t, true, true>
                                              : lrn_backward_generic_kernel<scalar_t, false, true>;
    kernel<<<strided_grid(total), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), idx.const_data_ptr<uint8_t>(), xc.const_data_ptr<scalar_t>(),
        dx.mutable_data_ptr<scalar_t>(), total, static_cast<int>(C), static_cast<int>(size / 2),
        static_cast<int>((size - 1) / 2), s, make_lrn_params<at::opmath_type<scalar_t>>(size, alpha, beta, k));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

// (dz, bias gradient) for x = relu(z): lrn_max_pool2d's input gradient passed back through the
// ReLU, and its sum per channel.
std::tuple<at::Tensor, at::Tensor> lrn_max_pool2d_backward_relu_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& indices, int64_t size, double alpha,
    double beta, double k, at::IntArrayRef kernel_size, at::IntArrayRef stride) {
  const PoolShape s = check_fused_backward_args(grad_out, x, indices, size, beta, k, kernel_size, stride);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_memory_format(x);
  const at::Tensor xc = x.contiguous(fmt), g = grad_out.contiguous(fmt), idx = indices.contiguous(fmt);
  at::Tensor dz = poison_if_debug(at::empty(x.sizes(), x.options().memory_format(fmt)));
  at::Tensor bias_grad = poison_if_debug(at::empty({x.size(1)}, x.options()));
  if (dz.numel() > 0 && x.scalar_type() != at::kDouble && size == kFastLrnSize) {
    bool done = false;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lrn_max_pool2d_backward_relu", [&] {
      if constexpr (!std::is_same_v<scalar_t, double>) {
        done = lrn_max_pool2d_backward_nhwc<scalar_t, true>(g, xc, idx, dz, &bias_grad, s,
                                                           make_lrn_params<float>(size, alpha, beta, k),
                                                           at::cuda::getCurrentCUDAStream());
      }
    });
    if (done) return {dz, bias_grad};
  }
  // Elsewhere: the fused op's backward, then the mask and the sum as PyTorch's ops.
  dz = at::threshold_backward(lrn_max_pool2d_backward_cuda(g, xc, idx, size, alpha, beta, k, kernel_size, stride),
                              xc, 0);
  return {dz, dz.sum({0, 2, 3}, false, at::kFloat).to(x.scalar_type())};
}

}  // namespace
}  // namespace alexnet_fast::gpu

TORCH_LIBRARY_IMPL(alexnet_fast, CUDA, m) {
  m.impl("lrn_max_pool2d_backward_relu", &alexnet_fast::gpu::lrn_max_pool2d_backward_relu_cuda);
  m.impl("lrn", &alexnet_fast::gpu::lrn_cuda);
  m.impl("lrn_backward", &alexnet_fast::gpu::lrn_backward_cuda);
  m.impl("lrn_max_pool2d", &alexnet_fast::gpu::lrn_max_pool2d_cuda);
  m.impl("lrn_max_pool2d_backward", &alexnet_fast::gpu::lrn_max_pool2d_backward_cuda);
}
