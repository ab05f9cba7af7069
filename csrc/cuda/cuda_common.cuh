// Helpers shared by the LRN and max-pool CUDA kernels (lrn_cuda.cu, max_pool_cuda.cu): vector
// memory access, the LRN arithmetic and its channel windows (in registers along a channel walk,
// or across the lanes of a warp), the max-pool rule and its gradient gather, and the host-side
// launch arithmetic.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "checks.h"
#include "poison.h"  // poison_if_debug: the debug fill of kernel outputs
#include "pool_shape.h"  // pooling argument checks and output sizes, shared with the CPU kernels

namespace alexnet_fast::gpu {

constexpr int kThreads = 256;  // threads per block of every kernel here
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;
// The channels_last LRN kernels give each lane a chunk of VEC channels of one pixel and take the
// channel window across lanes with shuffles. Lanes 1..30 of a warp produce; lanes 0 and 31 load
// the chunks on either side, so that every producing lane has both neighbours in its warp.
constexpr int kProducingLanes = 30;
// The LRN size the register-window kernels are compiled for (AlexNet's); other sizes run the
// generic kernels, which sum each window directly.
constexpr int kFastLrnSize = 5;
// Channel-walking kernels split the channels into groups (each re-reading a few halo channels)
// until about this many threads per SM are busy: enough loads in flight to cover HBM latency.
constexpr int64_t kTargetThreadsPerSm = 512;
constexpr int kMinChannelsPerGroup = 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// The integer type of a vector's bytes: accesses go through it, so that a vector of 16-bit
// elements is one load or store (copying the Vec itself may be split into 16-bit accesses).
template <int kBytes>
struct RawBits;
template <>
struct RawBits<1> {
  using type = uint8_t;
};
template <>
struct RawBits<2> {
  using type = uint16_t;
};
template <>
struct RawBits<4> {
  using type = uint32_t;
};
template <>
struct RawBits<8> {
  using type = uint2;
};
template <>
struct RawBits<16> {
  using type = uint4;
};

template <int N, typename T>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  using Raw = typename RawBits<sizeof(Vec<T, N>)>::type;
  return __builtin_bit_cast(Vec<T, N>, *reinterpret_cast<const Raw*>(p));
}

template <int N, typename T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& v) {
  using Raw = typename RawBits<sizeof(Vec<T, N>)>::type;
  *reinterpret_cast<Raw*>(p) = __builtin_bit_cast(Raw, v);
}

// N consecutive elements, converted to the arithmetic type A (float, or double for double).
template <int N, typename T, typename A>
__device__ __forceinline__ void load_as(const T* p, A (&out)[N]) {
  const Vec<T, N> v = load_vec<N>(p);
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = static_cast<A>(v.v[i]);
}

template <int N, typename T, typename A>
__device__ __forceinline__ void store_as(T* p, const A (&in)[N]) {
  Vec<T, N> v;
#pragma unroll
  for (int i = 0; i < N; ++i) v.v[i] = static_cast<T>(in[i]);
  store_vec(p, v);
}

template <int N, typename A>
__device__ __forceinline__ void fill_zero(A (&a)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) a[i] = A(0);
}

// Returns a / b and sets r = a % b, for a >= 0 and b > 0: in 32 bits when both fit (several
// times cheaper than the 64-bit division, and the usual case). For the generic kernels' 64-bit
// element indices; the specialised kernels index work items (threads, chunks, cells) in 32 bits
// (host-checked with fits_index32) and elements in 64, since the branch here keeps the compiler
// from merging the vector stores that follow.
__device__ __forceinline__ int64_t divmod(int64_t a, int64_t b, int64_t& r) {
  if (((a | b) >> 31) == 0) {
    const uint32_t q = static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
    r = a - static_cast<int64_t>(q) * b;
    return q;
  }
  const int64_t q = a / b;
  r = a - q * b;
  return q;
}

// Runs step(j0, checked) over batches j0 = first, first + U, ... < end of a channel walk, where
// `checked` is std::true_type for batches that reach outside [safe_lo, safe_hi) (safe_hi <= end)
// and must test each channel, std::false_type for the batches of the steady state in between.
template <int U, typename Step>
__device__ __forceinline__ void walk_channels(int first, int end, int safe_lo, int safe_hi, const Step& step) {
  int j0 = first;
  for (; j0 < end && j0 < safe_lo; j0 += U) step(j0, std::true_type{});
  for (; j0 + U <= safe_hi; j0 += U) step(j0, std::false_type{});
  for (; j0 < end; j0 += U) step(j0, std::true_type{});
}

// ------------------------------------------------------------------------------------------------
// LRN arithmetic: out[c] = x[c] * d[c]^-beta with d[c] = k + alpha/size * sum_{j in W(c)} x[j]^2,
// W(c) = [c - size/2, c + (size-1)/2] clipped to [0, C). In float32 for every storage dtype but
// float64 (A = at::opmath_type<T>); d^-beta as exp2(-beta * log2 d): two special-function
// instructions in float32, no division.
// ------------------------------------------------------------------------------------------------
template <typename A>
struct LrnParams {
  A coef;       // alpha / size
  A k;
  A neg_beta;   // -beta
  A neg_beta1;  // -beta - 1
  A grad_coef;  // 2 * alpha * beta / size
  bool beta_zero;  // d^-0 is 1 even where d is 0, as in torch.pow
};

template <typename A>
LrnParams<A> make_lrn_params(int64_t size, double alpha, double beta, double k) {
  LrnParams<A> p;
  p.coef = static_cast<A>(alpha / static_cast<double>(size));
  p.k = static_cast<A>(k);
  p.neg_beta = static_cast<A>(-beta);
  p.neg_beta1 = static_cast<A>(-beta - 1.0);
  p.grad_coef = static_cast<A>(2.0 * alpha * beta / static_cast<double>(size));
  p.beta_zero = beta == 0.0;
  return p;
}

// In float32 the special-function unit's approximations (relative error about 2^-22, so d^-beta
// stays within a few 1e-7 for any denominator below ~2^40): the accurate log2f is a polynomial of
// some 25 instructions, more than a bf16 LRN element's whole instruction budget at HBM speed.
// Flushing subnormals is harmless: d >= k > 0, and d^-beta below 2^-126 rounds the output to 0.
__device__ __forceinline__ float pow2(float v) {
  float r;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ float log_2(float v) {
  float r;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(v));
  return r;
}
__device__ __forceinline__ double pow2(double v) { return exp2(v); }
__device__ __forceinline__ double log_2(double v) { return log2(v); }

inline void check_lrn_params(int64_t size, double beta, double k) {
  CHECK_POSITIVE(size);
  TORCH_CHECK(k > 0 || beta == 0, "k must be positive (the denominator is k + alpha/size * sum(x^2)), got ", k);
}

// d^-beta for the window sum of squares `sumsq`.
// (Both sides of each choice below are computed and one is selected: a branch around the inline
// asm would split the vector stores of the callers into scalar ones.)
template <typename A>
__device__ __forceinline__ A lrn_factor(A sumsq, const LrnParams<A>& p) {
  const A d = fma(p.coef, sumsq, p.k);
  const A f = pow2(p.neg_beta * log_2(d));
  return p.beta_zero ? A(1) : f;
}

// The gradient terms of channel c: gf = g[c] * d[c]^-beta (its direct part) and
// t = 2 alpha beta / size * g[c] x[c] d[c]^(-beta-1), which channel c passes back to every channel
// j of its window: dx[j] = gf[j] - x[j] * sum_{c : j in W(c)} t[c].
template <typename A>
__device__ __forceinline__ void lrn_grad_terms(A sumsq, A x, A g, const LrnParams<A>& p, A& gf, A& t) {
  const A d = fma(p.coef, sumsq, p.k);
  const A l = log_2(d);
  const A f = pow2(p.neg_beta * l), f1 = pow2(p.neg_beta1 * l);
  gf = g * (p.beta_zero ? A(1) : f);
  // grad_coef is 0 when alpha or beta is: the term vanishes, also where d is 0.
  t = p.grad_coef == A(0) ? A(0) : p.grad_coef * g * x * f1;
}

// Sum of squares of the last SIZE channels at position p of a window of x values.
template <int SIZE, int NPIX>
__device__ __forceinline__ float sum_of_squares(const float (&xs)[SIZE][NPIX], int p) {
  float s = xs[0][p] * xs[0][p];
#pragma unroll
  for (int k = 1; k < SIZE; ++k) s = fmaf(xs[k][p], xs[k][p], s);
  return s;
}

// The LRN of a stream of channels at NPIX independent positions (pixels, or the elements of a
// vector of pixels), one channel per push: x of the last SIZE channels stays in registers, so each
// input is read once. (The squares are recomputed from it: one instruction more per element than
// keeping them, SIZE registers fewer per position.) After push(x_j), out(p) is the LRN output of
// channel j - kAfter at position p.
template <int SIZE, int NPIX>
struct LrnForwardWindow {
  static constexpr int kBefore = SIZE / 2, kAfter = (SIZE - 1) / 2;
  float xs[SIZE][NPIX];  // x of channels j - SIZE + 1 .. j

  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int p = 0; p < NPIX; ++p) {
#pragma unroll
      for (int k = 0; k < SIZE; ++k) xs[k][p] = 0.f;
    }
  }

  __device__ __forceinline__ void push(const float (&xj)[NPIX]) {
#pragma unroll
    for (int p = 0; p < NPIX; ++p) {
#pragma unroll
      for (int k = 0; k + 1 < SIZE; ++k) xs[k][p] = xs[k + 1][p];
      xs[SIZE - 1][p] = xj[p];
    }
  }

  __device__ __forceinline__ float out(int p, const LrnParams<float>& prm) const {
    return xs[kBefore][p] * lrn_factor(sum_of_squares(xs, p), prm);
  }
};

// The LRN gradient along a stream of channels at NPIX positions. Per stream step j: push_x(x_j),
// then push_grad(g_c) with the output gradient of channel c = j - kAfter (whose window is
// complete), after which dx(p) is the input gradient of channel i = j - SIZE + 1 (whose terms t of
// channels [i - kAfter, i + kBefore] are complete). The stream must start SIZE - 1 channels before
// the first dx wanted.
template <int SIZE, int NPIX>
struct LrnBackwardWindow {
  static constexpr int kBefore = SIZE / 2, kAfter = (SIZE - 1) / 2;
  float xs[SIZE][NPIX];         // x of channels j - SIZE + 1 .. j
  float t[SIZE][NPIX];          // terms t of channels c - SIZE + 1 .. c
  float gf[kBefore + 1][NPIX];  // g * d^-beta of channels c - kBefore .. c

  __device__ __forceinline__ void reset() {
#pragma unroll
    for (int p = 0; p < NPIX; ++p) {
#pragma unroll
      for (int k = 0; k < SIZE; ++k) xs[k][p] = t[k][p] = 0.f;
#pragma unroll
      for (int k = 0; k <= kBefore; ++k) gf[k][p] = 0.f;
    }
  }

  __device__ __forceinline__ void push_x(const float (&xj)[NPIX]) {
#pragma unroll
    for (int p = 0; p < NPIX; ++p) {
#pragma unroll
      for (int k = 0; k + 1 < SIZE; ++k) xs[k][p] = xs[k + 1][p];
      xs[SIZE - 1][p] = xj[p];
    }
  }

  // `valid`: channel c exists (0 <= c < C); a missing channel passes no term.
  __device__ __forceinline__ void push_grad(const float (&gc)[NPIX], bool valid, const LrnParams<float>& prm) {
#pragma unroll
    for (int p = 0; p < NPIX; ++p) {
      float g_factor, term;
      lrn_grad_terms(sum_of_squares(xs, p), xs[kBefore][p], gc[p], prm, g_factor, term);
#pragma unroll
      for (int k = 0; k + 1 < SIZE; ++k) t[k][p] = t[k + 1][p];
      t[SIZE - 1][p] = valid ? term : 0.f;
#pragma unroll
      for (int k = 0; k < kBefore; ++k) gf[k][p] = gf[k + 1][p];
      gf[kBefore][p] = valid ? g_factor : 0.f;
    }
  }

  __device__ __forceinline__ float dx(int p) const {
    float s = t[0][p];
#pragma unroll
    for (int k = 1; k < SIZE; ++k) s += t[k][p];
    return gf[0][p] - xs[0][p] * s;
  }
};

// sums[v] = ext[v] + ... + ext[v + L + R], where ext is `val` (this lane's VEC consecutive
// channels) preceded by the last L values of the previous lane and followed by the first R values
// of the next lane, zero where that lane's chunk is another pixel's (has_left/has_right false).
// Every lane of the warp must call it.
template <int L, int R, int VEC>
__device__ __forceinline__ void lane_window_sums(const float (&val)[VEC], bool has_left, bool has_right,
                                                 float (&sums)[VEC]) {
  static_assert(L <= VEC && R <= VEC, "the window must not reach past the neighbouring lanes");
  float ext[L + VEC + R];
#pragma unroll
  for (int i = 0; i < L; ++i) {
    const float v = __shfl_up_sync(kFullMask, val[VEC - L + i], 1);
    ext[i] = has_left ? v : 0.f;
  }
#pragma unroll
  for (int i = 0; i < VEC; ++i) ext[L + i] = val[i];
#pragma unroll
  for (int i = 0; i < R; ++i) {
    const float v = __shfl_down_sync(kFullMask, val[i], 1);
    ext[L + VEC + i] = has_right ? v : 0.f;
  }
#pragma unroll
  for (int v = 0; v < VEC; ++v) {
    float s = ext[v];
#pragma unroll
    for (int k = 1; k <= L + R; ++k) s += ext[v + k];
    sums[v] = s;
  }
}

// The chunk of VEC channels a lane of the channels_last LRN kernels works on: the grid's warp w
// takes chunks [30 w', 30 w' + 30) of row w / warps_per_row (w' = w % warps_per_row), a row being
// `row_chunks` consecutive chunks of memory. q = -1 and q = row_chunks are the outer lanes'
// neighbours outside the row: they load nothing.
struct LaneChunk {
  int row;
  int q;          // chunk index within the row
  bool loads;     // 0 <= q < row_chunks
  bool produces;  // loads, and the lane is one of the 30 producing lanes
};

// `block`: the block's index in the grid, or the tile a block walking several tiles is at.
__device__ __forceinline__ LaneChunk lane_chunk(int warps_per_row, int row_chunks, unsigned block = blockIdx.x) {
  const int lane = threadIdx.x & 31;
  const unsigned warp = block * kWarps + threadIdx.x / 32;
  LaneChunk lc;
  lc.row = static_cast<int>(warp / static_cast<unsigned>(warps_per_row));
  lc.q = static_cast<int>(warp - lc.row * warps_per_row) * kProducingLanes + lane - 1;
  lc.loads = lc.q >= 0 && lc.q < row_chunks;
  lc.produces = lc.loads && lane >= 1 && lane <= kProducingLanes;
  return lc;
}

// ------------------------------------------------------------------------------------------------
// Max-pool
// ------------------------------------------------------------------------------------------------
struct PoolShape {
  int H, W, OH, OW;
  int kh, kw, sh, sw, ph, pw;
};

inline PoolShape make_pool_shape(int64_t H, int64_t W, int64_t OH, int64_t OW, at::IntArrayRef kernel_size,
                                 at::IntArrayRef stride, at::IntArrayRef padding) {
  return PoolShape{static_cast<int>(H), static_cast<int>(W), static_cast<int>(OH), static_cast<int>(OW),
                   static_cast<int>(kernel_size[0]), static_cast<int>(kernel_size[1]), static_cast<int>(stride[0]),
                   static_cast<int>(stride[1]), static_cast<int>(padding[0]), static_cast<int>(padding[1])};
}

// PyTorch's rule, scanning a window row-major from a running maximum of -inf (and the first valid
// element's offset): a greater element or a NaN replaces it. Ties keep the first maximum, the last
// NaN wins, an all -inf window gives its first element. Written as selects on one condition (v != v
// is isnan): with an if, the compiler keeps a predicate per vector element alive and spills them
// into registers.
template <typename A>
__device__ __forceinline__ void pool_update(A v, int offset, A& best, int& arg) {
  const bool take = v > best || v != v;
  best = take ? v : best;
  arg = take ? offset : arg;
}

// Max and offset over a window that lies inside its input (no padding), row-major, for NV lanes;
// KH = KW = 0 takes the size (kh, kw) at run time. load(a, b, v) fills v with the lanes' values at
// window position (a, b).
template <int KH, int KW, int NV, typename Load>
__device__ __forceinline__ void scan_inner_window(const Load& load, int kh, int kw, float (&best)[NV],
                                                  int (&arg)[NV]) {
#pragma unroll
  for (int i = 0; i < NV; ++i) best[i] = -INFINITY, arg[i] = 0;
  const auto visit = [&](int a, int b, int offset) {
    float v[NV];
    load(a, b, v);
#pragma unroll
    for (int i = 0; i < NV; ++i) pool_update(v[i], offset, best[i], arg[i]);
  };
  if constexpr (KH > 0) {
#pragma unroll
    for (int a = 0; a < KH; ++a) {
#pragma unroll
      for (int b = 0; b < KW; ++b) visit(a, b, a * KW + b);
    }
  } else {
    for (int a = 0; a < kh; ++a)
      for (int b = 0; b < kw; ++b) visit(a, b, a * kw + b);
  }
}

// The windows (oh, ow) whose rows/columns cover input row/column h: [lo, hi).
__device__ __forceinline__ void covering_windows(int h, int k, int s, int pad, int out, int& lo, int& hi) {
  lo = h + pad < k ? 0 : (h + pad - k) / s + 1;
  hi = min((h + pad) / s + 1, out);
}

// The input gradient at (h, w) of one plane: the sum of the output gradients whose window offset
// names (h, w), added in (oh, ow) order as PyTorch does. `offset(oh, ow)` is the element offset of
// that output in `grad` and `indices`.
template <typename T, typename Offset, typename A = at::opmath_type<T>>
__device__ __forceinline__ A pool_gather(const T* __restrict__ grad, const uint8_t* __restrict__ indices,
                                         const Offset& offset, int h, int w, const PoolShape& s) {
  int oh0, oh1, ow0, ow1;
  covering_windows(h, s.kh, s.sh, s.ph, s.OH, oh0, oh1);
  covering_windows(w, s.kw, s.sw, s.pw, s.OW, ow0, ow1);
  A acc = 0;
  for (int oh = oh0; oh < oh1; ++oh) {
    for (int ow = ow0; ow < ow1; ++ow) {
      const int64_t o = offset(oh, ow);
      if (indices[o] == (h + s.ph - oh * s.sh) * s.kw + (w + s.pw - ow * s.sw)) acc += static_cast<A>(grad[o]);
    }
  }
  return acc;
}

// Gradient gather over a stride cell, for a pool with compile-time KH x KW kernel and SH x SW
// stride: cell (i, j) is the SH x SW input pixels at rows i*SH - ph + [0, SH) and columns
// j*SW - pw + [0, SW); the windows covering it are (i - a, j - b) for a < ceil(KH/SH),
// b < ceil(KW/SW), in which the cell's pixel (r, s) has offset (a*SH + r)*KW + b*SW + s. Called for
// those windows in (oh, ow) order (a and b descending), this adds window (a, b)'s gradient g to the
// pixel its offset `index` names, if that pixel is in the cell.
template <int KH, int KW, int SH, int SW>
struct PoolCell {
  static constexpr int kWinH = (KH + SH - 1) / SH, kWinW = (KW + SW - 1) / SW;

  template <typename A>
  __device__ __forceinline__ static void add(int a, int b, int index, A g, A (&acc)[SH][SW]) {
#pragma unroll
    for (int r = 0; r < SH; ++r) {
#pragma unroll
      for (int s = 0; s < SW; ++s) {
        if (a * SH + r < KH && b * SW + s < KW) acc[r][s] += index == (a * SH + r) * KW + b * SW + s ? g : A(0);
      }
    }
  }

  // channels_last: adds every window covering cell (i, j) of image n to acc, for the VEC channels
  // from c0 (grad and indices are the pool's output-shaped tensors, C channels); nothing where
  // `valid` is false.
  template <int VEC, typename T, typename A>
  __device__ __forceinline__ static void gather_nhwc(const T* __restrict__ grad, const uint8_t* __restrict__ indices,
                                                     int64_t n, int i, int j, int c0, int C, const PoolShape& ps,
                                                     bool valid, A (&acc)[VEC][SH][SW]) {
#pragma unroll
    for (int a = kWinH - 1; a >= 0; --a) {
#pragma unroll
      for (int b = kWinW - 1; b >= 0; --b) {
        const int oh = i - a, ow = j - b;
        if (valid && oh >= 0 && oh < ps.OH && ow >= 0 && ow < ps.OW) {
          const int64_t o = ((n * ps.OH + oh) * ps.OW + ow) * C + c0;
          const Vec<uint8_t, VEC> k = load_vec<VEC>(indices + o);
          A g[VEC];
          load_as<VEC>(grad + o, g);
#pragma unroll
          for (int v = 0; v < VEC; ++v) add(a, b, k.v[v], g[v], acc[v]);
        }
      }
    }
  }
};

// ------------------------------------------------------------------------------------------------
// The bias gradient of a ReLU-masked gradient from per-block partial sums
// ------------------------------------------------------------------------------------------------
// partial[blocks, C] (float) -> bias_grad[C] (T): a 32x32 block takes 32 channels, its rows of
// threads every 32nd block row, and sums them in a fixed order, so the result is deterministic.
// (A column sum and a cast through PyTorch cost two launches and ~15 us at C = 96.)
constexpr int kSumTile = 32;

template <typename T>
__global__ void __launch_bounds__(kSumTile * kSumTile)
    bias_grad_sum_kernel(const float* __restrict__ partial, T* __restrict__ bias_grad, int64_t blocks, int C) {
  __shared__ float sums[kSumTile][kSumTile + 1];
  const int c = blockIdx.x * kSumTile + threadIdx.x;
  float acc = 0.f;
  if (c < C) {
    for (int64_t b = threadIdx.y; b < blocks; b += kSumTile) acc += partial[b * C + c];
  }
  sums[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
    float total = 0.f;
    for (int k = 0; k < kSumTile; ++k) total += sums[k][threadIdx.x];
    bias_grad[c] = T(total);
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Work items of the specialised kernels are indexed in 32 bits.
inline bool fits_index32(int64_t n) { return n <= std::numeric_limits<int32_t>::max(); }

inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

inline bool aligned_to(const at::Tensor& t, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % static_cast<uintptr_t>(bytes) == 0;
}

// Blocks of a one-dimensional grid, with a clear error where a tensor is beyond what it indexes.
inline unsigned grid_blocks(int64_t work_items, int64_t items_per_block) {
  const int64_t blocks = ceil_div(work_items, items_per_block);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "tensor too large for one launch (", work_items,
              " work items)");
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

// Blocks for a grid-stride loop over `total` items: enough to fill the GPU, no more than the work.
inline unsigned strided_grid(int64_t total) {
  return static_cast<unsigned>(std::clamp<int64_t>(ceil_div(total, kThreads), 1, int64_t(sm_count()) * 64));
}

// The kernels index within one plane (h * W + w) in 32 bits.
inline void check_plane(int64_t h, int64_t w, const char* what) {
  TORCH_CHECK(h * w < (int64_t(1) << 31), what, ": planes of more than 2^31 elements are not supported, got ", h,
              " x ", w);
}

// Channel chunk of the channel-walking kernels for `threads` threads per group: groups are added
// (each of at least kMinChannelsPerGroup channels) until about kTargetThreadsPerSm threads per SM
// are busy.
inline int channel_chunk(int64_t threads, int64_t C) {
  const int64_t target = kTargetThreadsPerSm * sm_count();
  // the groups become grid.y, which holds at most 65535 blocks
  const int64_t max_groups = std::clamp<int64_t>(C / kMinChannelsPerGroup, 1, 65535);
  const int64_t groups = std::clamp<int64_t>(ceil_div(target, std::max<int64_t>(threads, 1)), 1, max_groups);
  return static_cast<int>(ceil_div(C, groups));
}

// Launches bias_grad_sum_kernel over partial [blocks, C] into bias_grad [C] (dtype T).
template <typename T>
void launch_bias_grad_sum(const at::Tensor& partial, at::Tensor& bias_grad, cudaStream_t stream) {
  const int64_t blocks = partial.size(0), C = partial.size(1);
  bias_grad_sum_kernel<T><<<static_cast<unsigned>(ceil_div(C, kSumTile)), dim3(kSumTile, kSumTile), 0, stream>>>(
      partial.const_data_ptr<float>(), bias_grad.mutable_data_ptr<T>(), blocks, static_cast<int>(C));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace alexnet_fast::gpu
