// Implicit-GEMM convolution kernels on the tensor cores (mma.sync), shared by the forward, the
// input gradient (dgrad) and the weight gradient (wgrad) of conv2d_relu.
//
// Every tensor the kernels read or write is dense NHWC (channels_last); the host code converts
// other layouts once. The three GEMMs, with P x Q the output size and R x S the kernel:
//   forward  out[m, n] = relu(sum_k A[m, k] B[k, n] + bias[n])
//            m = (b, p, q) output pixel, n = output channel, k = (r, s, c) ordered so that a
//            run of k walks along the input channels of one pixel: A is an im2col gather of x.
//   dgrad    dx[m, n] = sum_k A[m, k] B[k, n]
//            m = (b, h, w) input pixel, n = input channel, k = (r, s, co): A gathers the masked
//            output gradient at (p, q) = ((h + pad - r) / stride, (w + pad - s) / stride).
//   wgrad    dw[m, n] = sum_k A[m, k] B[k, n], split over k across blocks (fp32 workspace)
//            m = output channel, n = (r, s, c) plus one extra column n = R*S*C whose B entries
//            are 1, so that column of the product is the bias gradient; k = (b, p, q).
// The ReLU mask is applied where the backward GEMMs load the output gradient: an element of
// grad_out counts only where the forward output is > 0 (PyTorch's threshold_backward keeps the
// gradient where out is not <= 0, which differs only for NaN outputs; we follow it).
//
// Tiles: 128 x 128 per block, 8 warps of 64 x 32, 64 bytes of K per stage (32 16-bit or 16 fp32
// elements), kStages-deep shared-memory pipeline. Operands that need no arithmetic on the way
// (x, weights) travel with cp.async; the masked gradient and the scalar gathers (channel counts
// that are not a multiple of a 16-byte vector, e.g. conv1's 3 input channels) are loaded into
// registers one k-tile ahead and stored after the math of the current tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace alexnet_fast {
namespace conv_gemm {

constexpr int kThreads = 256;
constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kStages = 4;
constexpr int kInvalidRow = -(1 << 30);  // a row origin so far left that every tap is padding

// ---------------------------------------------------------------------------------------------
// element types
// ---------------------------------------------------------------------------------------------
template <typename T>
struct Num;

template <>
struct Num<__nv_bfloat16> {
  using Bits = uint16_t;
  static constexpr Bits kOne = 0x3F80;
  __device__ __forceinline__ static float to_float(uint32_t bits) { return __uint_as_float(bits << 16); }
  __device__ __forceinline__ static Bits from_float(float v) { return __bfloat16_as_ushort(__float2bfloat16_rn(v)); }
};

template <>
struct Num<__half> {
  using Bits = uint16_t;
  static constexpr Bits kOne = 0x3C00;
  __device__ __forceinline__ static float to_float(uint32_t bits) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
  }
  __device__ __forceinline__ static Bits from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
};

template <>
struct Num<float> {
  using Bits = uint32_t;
  static constexpr Bits kOne = 0x3F800000u;
  __device__ __forceinline__ static float to_float(uint32_t bits) { return __uint_as_float(bits); }
  __device__ __forceinline__ static Bits from_float(float v) { return __float_as_uint(v); }
};

// Shared-memory tile geometry of element type T. Rows of a K-major tile (one row per m or n)
// hold 64 bytes of K plus 16 bytes of padding: 80-byte rows put the 8 rows an ldmatrix (or a
// TF32 fragment load) touches on 8 different 16-byte bank groups. Rows of an MN-major tile (one
// row per k) hold 128 elements plus 8 of padding: 272 bytes (16-bit) or 544 bytes (fp32).
template <typename T>
struct Tile {
  static constexpr int kChunk = 16 / sizeof(T);  // elements of one 16-byte vector
  static constexpr int kBK = 64 / sizeof(T);     // K of one pipeline stage
  static constexpr int kPitchK = kBK + kChunk;
  static constexpr int kPitchMN = kBlockM + 8;
  static constexpr int kElemsK = kBlockM * kPitchK;
  static constexpr int kElemsMN = kBK * kPitchMN;
  static_assert(kBlockM == kBlockN, "one tile geometry serves both operands");
};

// ---------------------------------------------------------------------------------------------
// integer division by a runtime constant (multiply-high and shift), valid for 0 <= n < 2^31
// ---------------------------------------------------------------------------------------------
struct FastDivmod {
  int divisor = 1;
  uint32_t multiplier = 0;
  uint32_t shift = 0;

  FastDivmod() = default;
  // divisor >= 1. With l = ceil(log2 d) and m = ceil(2^(31+l) / d) (< 2^32), the quotient is
  // (n * m) >> (31 + l): the rounding error of m adds less than n / 2^(31+l) < 1/d, too little to
  // cross the next integer.
  __host__ explicit FastDivmod(int d) : divisor(d) {
    if (d > 1) {
      uint32_t l = 0;
      while ((uint64_t(1) << l) < uint64_t(d)) ++l;
      multiplier = static_cast<uint32_t>(((uint64_t(1) << (31 + l)) + d - 1) / uint64_t(d));
      shift = l - 1;
    }
  }
  __host__ __device__ __forceinline__ int div(int n) const {
    if (divisor == 1) return n;
#ifdef __CUDA_ARCH__
    const uint32_t hi = __umulhi(static_cast<uint32_t>(n), multiplier);
#else
    const uint32_t hi = static_cast<uint32_t>((uint64_t(uint32_t(n)) * multiplier) >> 32);
#endif
    return static_cast<int>(hi >> shift);
  }
  __host__ __device__ __forceinline__ int divmod(int n, int& rem) const {
    const int q = div(n);
    rem = n - q * divisor;
    return q;
  }
};

// ---------------------------------------------------------------------------------------------
// problem description, one struct for the three GEMMs (passed as a __grid_constant__ parameter)
// ---------------------------------------------------------------------------------------------
struct ConvShape {
  int n, h, w, c;  // x: batch, input height, width, input channels
  int k, r, s;     // weight: output channels, kernel height, width
  int p, q;        // output height, width
  int stride_h, stride_w, pad_h, pad_w;
  FastDivmod div_c, div_k, div_s;  // by c, k, s: split a GEMM k index into (r, s, channel)
  FastDivmod div_q, div_pq;        // output pixel index -> (b, p, q)
  FastDivmod div_w, div_hw;        // input pixel index -> (b, h, w)
  FastDivmod div_stride_h, div_stride_w;
};

template <typename T>
struct ConvArgs {
  ConvShape shape;
  int gemm_m, gemm_n, gemm_k;  // valid extents of the GEMM
  int k_tiles;                 // ceil(gemm_k / kBK)
  int k_tiles_per_split;       // wgrad: k-tiles of blockIdx.y's slice; others: k_tiles
  int m_tiles, n_tiles;
  bool m_fastest;              // block order: consecutive blocks share the B tile when true
  int tile_begin;              // tile of blockIdx.x == 0 (a launch may cover the last tiles only)
  const T* x;                  // forward A, wgrad B (NHWC)
  const T* grad;               // dgrad A, wgrad A: grad_out (NHWC)
  const T* out;                // the forward output, whose sign is the ReLU mask (NHWC)
  const T* weight;             // forward, dgrad B: dense [gemm_n][weight_ld], zero past gemm_k
  int weight_ld;               // a multiple of the 16-byte vector
  const T* bias;               // forward epilogue, may be null
  T* y;                        // forward out / dgrad dx (NHWC, dense [gemm_m][gemm_n])
  float* workspace;            // wgrad: [splits][gemm_m][workspace_ld] fp32 partial sums
  int workspace_ld;            // even
  float* partial;              // forward/dgrad split tail: [splits][gridDim.x][kBlockM * kBlockN]
};

template <typename T>
__host__ __device__ __forceinline__ void tile_coords(const ConvArgs<T>& a, int tile, int& tm, int& tn) {
  if (a.m_fastest) {
    tm = tile % a.m_tiles;
    tn = tile / a.m_tiles;
  } else {
    tn = tile % a.n_tiles;
    tm = tile / a.n_tiles;
  }
}

// Where an output pixel's receptive field starts in x: x[b, h + r, w + s, c] is at
// base + ((h + r) * W + (w + s)) * C + c.
struct PixelRow {
  int64_t base;
  int h, w;
};

__device__ __forceinline__ PixelRow invalid_row() { return {0, kInvalidRow, 0}; }

__device__ __forceinline__ PixelRow output_pixel_row(const ConvShape& cs, int m) {
  int rem, q;
  const int b = cs.div_pq.divmod(m, rem);
  const int p = cs.div_q.divmod(rem, q);
  return {static_cast<int64_t>(b) * cs.h * cs.w * cs.c, p * cs.stride_h - cs.pad_h, q * cs.stride_w - cs.pad_w};
}

// Offset of x[b, h + r, w + s, c], or -1 where the tap falls in the zero padding.
__device__ __forceinline__ int64_t x_offset(const ConvShape& cs, const PixelRow& row, int r, int s, int c) {
  const int ih = row.h + r, iw = row.w + s;
  if (static_cast<unsigned>(ih) >= static_cast<unsigned>(cs.h) || static_cast<unsigned>(iw) >= static_cast<unsigned>(cs.w)) {
    return -1;
  }
  return row.base + (static_cast<int64_t>(ih) * cs.w + iw) * cs.c + c;
}

// dgrad rows: an input pixel (b, h, w); base is image b of grad_out, (h, w) are shifted by the
// padding so that the output row of kernel tap r is (h - r) / stride.
__device__ __forceinline__ PixelRow input_pixel_row(const ConvShape& cs, int m) {
  int rem, w;
  const int b = cs.div_hw.divmod(m, rem);
  const int h = cs.div_w.divmod(rem, w);
  return {static_cast<int64_t>(b) * cs.p * cs.q * cs.k, h + cs.pad_h, w + cs.pad_w};
}

// Offset of grad_out[b, p, q, co] that input pixel `row` receives through tap (r, s), or -1.
__device__ __forceinline__ int64_t grad_offset(const ConvShape& cs, const PixelRow& row, int r, int s, int co) {
  const int th = row.h - r, tw = row.w - s;
  if (th < 0 || tw < 0) return -1;
  int rh, rw;
  const int p = cs.div_stride_h.divmod(th, rh);
  const int q = cs.div_stride_w.divmod(tw, rw);
  if ((rh | rw) != 0 || p >= cs.p || q >= cs.q) return -1;
  return row.base + (static_cast<int64_t>(p) * cs.q + q) * cs.k + co;
}

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; zero-fills the destination when !valid (src is not read).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Round to TF32 (nearest, ties away), as cuDNN's TF32 convolutions do, rather than letting the
// tensor core drop the low mantissa bits.
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}

// Zero each element of g whose element of o is <= 0 (the ReLU mask of the backward GEMMs).
template <typename T>
__device__ __forceinline__ uint32_t relu_mask_word(uint32_t g, uint32_t o) {
  if constexpr (sizeof(T) == 4) {
    return Num<T>::to_float(o) <= 0.f ? 0u : g;
  } else {
    const uint32_t lo = Num<T>::to_float(o & 0xFFFFu) <= 0.f ? 0u : 0x0000FFFFu;
    const uint32_t hi = Num<T>::to_float(o >> 16) <= 0.f ? 0u : 0xFFFF0000u;
    return g & (lo | hi);
  }
}

template <typename T>
__device__ __forceinline__ uint4 relu_mask(uint4 g, uint4 o) {
  return make_uint4(relu_mask_word<T>(g.x, o.x), relu_mask_word<T>(g.y, o.y), relu_mask_word<T>(g.z, o.z),
                    relu_mask_word<T>(g.w, o.w));
}

template <typename T>
__device__ __forceinline__ typename Num<T>::Bits relu_mask_scalar(typename Num<T>::Bits g, typename Num<T>::Bits o) {
  return Num<T>::to_float(o) <= 0.f ? typename Num<T>::Bits(0) : g;
}

template <typename T>
__device__ __forceinline__ uint4 load16(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <typename T>
__device__ __forceinline__ typename Num<T>::Bits load_bits(const T* p) {
  return __ldg(reinterpret_cast<const typename Num<T>::Bits*>(p));
}

// ---------------------------------------------------------------------------------------------
// operand loaders: fetch(tile, kt) starts loading k-tile kt (cp.async straight into the tile, or
// global loads into registers); store(tile) writes what the registers hold. The kernel calls
// store after the math of the previous stage, so register loads overlap it.
// kKMajor: the tile holds one row per m (or n) with K contiguous; otherwise one row per k.
// kRowTable: the loader needs kBlockM PixelRows in shared memory, filled by its constructor.
// kRegisterStaged: fetch only loads into registers (it may run before the stage is free);
// otherwise fetch writes the tile (cp.async, or direct stores of constant chunks).
// ---------------------------------------------------------------------------------------------

// Threads of a 16-byte-vector K-major tile: 4 chunks per 64-byte row, rows tid/4 and tid/4+64.
template <typename T>
struct KMajorVecSlots {
  static constexpr int kChunk = Tile<T>::kChunk;
  int col;   // element column of this thread's chunk within the tile
  int row0;  // first of its two rows (the second is row0 + 64)
  __device__ __forceinline__ explicit KMajorVecSlots(int tid) : col((tid & 3) * kChunk), row0(tid >> 2) {}
  __device__ __forceinline__ int row(int i) const { return row0 + i * (kThreads / 4); }
  __device__ __forceinline__ int offset(int i) const { return row(i) * Tile<T>::kPitchK + col; }
};

// Threads of a scalar K-major tile: one column per thread, rows tid/kBK + j * (256/kBK).
template <typename T>
struct KMajorScalarSlots {
  static constexpr int kBK = Tile<T>::kBK;
  static constexpr int kRowStep = kThreads / kBK;
  static constexpr int kRows = kBlockM / kRowStep;
  int col, row0;
  __device__ __forceinline__ explicit KMajorScalarSlots(int tid) : col(tid % kBK), row0(tid / kBK) {}
  __device__ __forceinline__ int row(int j) const { return row0 + j * kRowStep; }
  __device__ __forceinline__ int offset(int j) const { return row(j) * Tile<T>::kPitchK + col; }
};

// Threads of a 16-byte-vector MN-major tile: kBlockM/kChunk chunks per row, two rows each.
template <typename T>
struct MNMajorVecSlots {
  static constexpr int kChunk = Tile<T>::kChunk;
  static constexpr int kChunksPerRow = kBlockM / kChunk;
  static constexpr int kRowStep = kThreads / kChunksPerRow;
  static_assert(kRowStep * 2 == Tile<T>::kBK, "two chunks per thread cover an MN-major tile");
  int col, row0;
  __device__ __forceinline__ explicit MNMajorVecSlots(int tid)
      : col((tid % kChunksPerRow) * kChunk), row0(tid / kChunksPerRow) {}
  __device__ __forceinline__ int row(int i) const { return row0 + i * kRowStep; }
  __device__ __forceinline__ int offset(int i) const { return row(i) * Tile<T>::kPitchMN + col; }
};

// Threads of a scalar MN-major tile: one column per thread (consecutive lanes, consecutive
// columns), rows tid/128 + 2j.
template <typename T>
struct MNMajorScalarSlots {
  static constexpr int kRowStep = kThreads / kBlockM;
  static constexpr int kRows = Tile<T>::kBK / kRowStep;
  int col, row0;
  __device__ __forceinline__ explicit MNMajorScalarSlots(int tid) : col(tid % kBlockM), row0(tid / kBlockM) {}
  __device__ __forceinline__ int row(int j) const { return row0 + j * kRowStep; }
  __device__ __forceinline__ int offset(int j) const { return row(j) * Tile<T>::kPitchMN + col; }
};

// k = (r * S + s) * channels + ch  ->  (r, s, ch); div_ch divides by `channels`.
__device__ __forceinline__ void split_tap(const ConvShape& cs, const FastDivmod& div_ch, int k, int& r, int& s,
                                          int& ch) {
  const int rs = div_ch.divmod(k, ch);
  r = cs.div_s.divmod(rs, s);
}

// Forward A: im2col rows of x (one per output pixel), K = (r, s, c).
template <typename T, bool kVec>
struct ForwardALoader;

template <typename T>
struct ForwardALoader<T, true> {
  static constexpr bool kKMajor = true, kRowTable = false, kRegisterStaged = false;
  KMajorVecSlots<T> slots;
  PixelRow rows[2];
  __device__ ForwardALoader(const ConvArgs<T>& a, int m0, int tid, PixelRow*) : slots(tid) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int m = m0 + slots.row(i);
      rows[i] = m < a.gemm_m ? output_pixel_row(a.shape, m) : invalid_row();
    }
  }
  __device__ __forceinline__ void fetch(const ConvArgs<T>& a, T* tile, int kt) {
    const int k = kt * Tile<T>::kBK + slots.col;
    int r = 0, s = 0, c = 0;
    const bool k_ok = k < a.gemm_k;
    if (k_ok) split_tap(a.shape, a.shape.div_c, k, r, s, c);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t off = k_ok ? x_offset(a.shape, rows[i], r, s, c) : -1;
      cp_async16(tile + slots.offset(i), a.x + (off < 0 ? 0 : off), off >= 0);
    }
  }
  __device__ __forceinline__ void store(T*) {}
};

template <typename T>
struct ForwardALoader<T, false> {
  static constexpr bool kKMajor = true, kRowTable = true, kRegisterStaged = true;
  using Bits = typename Num<T>::Bits;
  using Slots = KMajorScalarSlots<T>;
  Slots slots;
  const PixelRow* table;
  Bits v[Slots::kRows];
  __device__ ForwardALoader(const ConvArgs<T>& a, int m0, int tid, PixelRow* row_table) : slots(tid), table(row_table) {
    if (tid < kBlockM) row_table[tid] = m0 + tid < a.gemm_m ? output_pixel_row(a.shape, m0 + tid) : invalid_row();
  }
  __device__ __forceinline__ void fetch(const ConvArgs<T>& a, T*, int kt) {
    const int k = kt * Tile<T>::kBK + slots.col;
    int r = 0, s = 0, c = 0;
    const bool k_ok = k < a.gemm_k;
    if (k_ok) split_tap(a.shape, a.shape.div_c, k, r, s, c);
#pragma unroll
    for (int j = 0; j < Slots::kRows; ++j) {
      const int64_t off = k_ok ? x_offset(a.shape, table[slots.row(j)], r, s, c) : -1;
      v[j] = off >= 0 ? load_bits(a.x + off) : Bits(0);
    }
  }
  __device__ __forceinline__ void store(T* tile) {
    Bits* t = reinterpret_cast<Bits*>(tile);
#pragma unroll
    for (int j = 0; j < Slots::kRows; ++j) t[slots.offset(j)] = v[j];
  }
};

// Forward and dgrad B: a dense [gemm_n][weight_ld] matrix (the permuted, zero-padded weight).
template <typename T>
struct WeightBLoader {
  static constexpr bool kKMajor = true, kRowTable = false, kRegisterStaged = false;
  KMajorVecSlots<T> slots;
  int n0;
  __device__ WeightBLoader(const ConvArgs<T>&, int n0_, int tid, PixelRow*) : slots(tid), n0(n0_) {}
  __device__ __forceinline__ void fetch(const ConvArgs<T>& a, T* tile, int kt) {
    const int k = kt * Tile<T>::kBK + slots.col;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int n = n0 + slots.row(i);
      const bool ok = n < a.gemm_n && k < a.weight_ld;
      const int64_t off = ok ? static_cast<int64_t>(n) * a.weight_ld + k : 0;
      cp_async16(tile + slots.offset(i), a.weight + off, ok);
    }
  }
  __device__ __forceinline__ void store(T*) {}
};

// Dgrad A: rows are input pixels, K = (r, s, co); grad_out masked by out > 0.
template <typename T, bool kVec>
struct DgradALoader;

template <typename T>
struct DgradALoader<T, true> {
  static constexpr bool kKMajor = true, kRowTable = false, kRegisterStaged = true;
  KMajorVecSlots<T> slots;
  PixelRow rows[2];
  uint4 g[2], o[2];
  __device__ DgradALoader(const ConvArgs<T>& a, int m0, int tid, PixelRow*) : slots(tid) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int m = m0 + slots.row(i);
      rows[i] = m < a.gemm_m ? input_pixel_row(a.shape, m) : invalid_row();
    }
  }
  __device__ __forceinline__ void fetch(const ConvArgs<T>& a, T*, int kt) {
    const int k = kt * Tile<T>::kBK + slots.col;
    int r = 0, s = 0, co = 0;
    const bool k_ok = k < a.gemm_k;
    if (k_ok) split_tap(a.shape, a.shape.div_k, k, r, s, co);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int64_t off = k_ok ? grad_offset(a.shape, rows[i], r, s, co) : -1;
      if (off >= 0) {
        g[i] = load16(a.grad + off);
        o[i] = load16(a.out + off);
      } else {
        g[i] = o[i] = make_uint4(0, 0, 0, 0);
      }
    }
  }
  __device__ __forceinline__ void store(T* tile) {
#pragma unroll
    for (int i = 0; i < 2; ++i) *reinterpret_cast<uint4*>(tile + slots.offset(i)) = relu_mask<T>(g[i], o[i]);
  }
};

template <typename T>
struct DgradALoader<T, false> {
  static constexpr bool kKMajor = true, kRowTable = true, kRegisterStaged = true;
  using Bits = typename Num<T>::Bits;
  using Slots = KMajorScalarSlots<T>;
  Slots slots;
  const PixelRow* table;
  Bits v[Slots::kRows];
  __device__ DgradALoader(const ConvArgs<T>& a, int m0, int tid, PixelRow* row_table) : slots(tid), table(row_table) {
    if (tid < kBlockM) row_table[tid] = m0 + tid < a.gemm_m ? input_pixel_row(a.shape, m0 + tid) : invalid_row();
  }
  __device__ __forceinline__ void fetch(const ConvArgs<T>& a, T*, int kt) {
    const int k = kt * Tile<T>::kBK + slots.col;
    int r = 0, s = 0, co = 0;
    const bool k_ok = k < a.gemm_k;
    if (k_ok) split_tap(a.shape, a.shape.div_k, k, r, s, co);
#pragma unroll
    for (int j = 0; j < Slots::kRows; ++j) {
      const int64_t off = k_ok ? grad_offset(a.shape, table[slots.row(j)], r, s, co) : -1;
      v[j] = off >= 0 ? relu_mask_scalar<T>(load_bits(a.grad + off), load_bits(a.out + off)) : Bits(0);
    }
  }
  __device__ __forceinline__ void store(T* tile) {
    Bits* t = reinterpret_cast<Bits*>(tile);
#pragma unroll
    for (int j = 0; j < Slots::kRows; ++j) t[slots.offset(j)] = v[j];
  }
};

// Wgrad A (MN-major): tile row k is output pixel kt*kBK + k, columns are output channels.
template <typename T, bool kVec>
struct WgradALoader;

template <typename T>
struct WgradALoader<T, true> {
  static constexpr bool kKMajor = false, kRowTable = false, kRegisterStaged = true;
  MNMajorVecSlots<T> slots;
  int co;
  uint4 g[2], o[2];
  __device__ WgradALoader(const ConvArgs<T>&, int m0, int tid, PixelRow*) : slots(tid), co(m0 + slots.col) {}
  __device__ __forceinline__ void fetch(const ConvArgs<T>& a, T*, int kt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int pix = kt * Tile<T>::kBK + slots.row(i);
      if (pix < a.gemm_k && co < a.gemm_m) {
        const int64_t off = static_cast<int64_t>(pix) * a.shape.k + co;
        g[i] = load16(a.grad + off);
        o[i] = load16(a.out + off);
      } else {
        g[i] = o[i] = make_uint4(0, 0, 0, 0);
      }
    }
  }
  __device__ __forceinline__ void store(T* tile) {
#pragma unroll
    for (int i = 0; i < 2; ++i) *reinterpret_cast<uint4*>(tile + slots.offset(i)) = relu_mask<T>(g[i], o[i]);
  }
};

template <typename T>
struct WgradALoader<T, false> {
  static constexpr bool kKMajor = false, kRowTable = false, kRegisterStaged = true;
  using Bits = typename Num<T>::Bits;
  using Slots = MNMajorScalarSlots<T>;
  Slots slots;
  int co;
  Bits v[Slots::kRows];
  __device__ WgradALoader(const ConvArgs<T>&, int m0, int tid, PixelRow*) : slots(tid), co(m0 + slots.col) {}
  __device__ __forceinline__ void fetch(const ConvArgs<T>& a, T*, int kt) {
#pragma unroll
    for (int j = 0; j < Slots::kRows; ++j) {
      const int pix = kt * Tile<T>::kBK + slots.row(j);
      if (pix < a.gemm_k && co < a.gemm_m) {
        const int64_t off = static_cast<int64_t>(pix) * a.shape.k + co;
        v[j] = relu_mask_scalar<T>(load_bits(a.grad + off), load_bits(a.out + off));
      } else {
        v[j] = Bits(0);
      }
    }
  }
  __device__ __forceinline__ void store(T* tile) {
    Bits* t = reinterpret_cast<Bits*>(tile);
#pragma unroll
    for (int j = 0; j < Slots::kRows; ++j) t[slots.offset(j)] = v[j];
  }
};

// Wgrad B (MN-major): tile row k is output pixel kt*kBK + k, column n = (r, s, c) of the im2col
// row of that pixel; column R*S*C is the ones column of the bias gradient, later columns zero.
template <typename T, bool kVec>
struct WgradBLoader;

template <typename T>
struct WgradBLoader<T, true> {
  static constexpr bool kKMajor = false, kRowTable = false, kRegisterStaged = false;
  using Bits = typename Num<T>::Bits;
  MNMajorVecSlots<T> slots;
  int n, r = 0, s = 0, c = 0;
  __device__ WgradBLoader(const ConvArgs<T>& a, int n0, int tid, PixelRow*) : slots(tid), n(n0 + slots.col) {
    if (n < a.gemm_n - 1) split_tap(a.shape, a.shape.div_c, n, r, s, c);
  }
  __device__ __forceinline__ void fetch(const ConvArgs<T>& a, T* tile, int kt) {
    const int taps = a.gemm_n - 1;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int pix = kt * Tile<T>::kBK + slots.row(i);
      T* dst = tile + slots.offset(i);
      if (n < taps) {
        const int64_t off = pix < a.gemm_k ? x_offset(a.shape, output_pixel_row(a.shape, pix), r, s, c) : -1;
        cp_async16(dst, a.x + (off < 0 ? 0 : off), off >= 0);
      } else {
        // The chunk that starts at the ones column holds a single 1 in its first element.
        const bool one = n == taps && pix < a.gemm_k;
        *reinterpret_cast<uint4*>(dst) = make_uint4(one ? uint32_t(Num<T>::kOne) : 0u, 0u, 0u, 0u);
      }
    }
  }
  __device__ __forceinline__ void store(T*) {}
};

template <typename T>
struct WgradBLoader<T, false> {
  static constexpr bool kKMajor = false, kRowTable = false, kRegisterStaged = true;
  using Bits = typename Num<T>::Bits;
  using Slots = MNMajorScalarSlots<T>;
  Slots slots;
  int n, r = 0, s = 0, c = 0;
  Bits v[Slots::kRows];
  __device__ WgradBLoader(const ConvArgs<T>& a, int n0, int tid, PixelRow*) : slots(tid), n(n0 + slots.col) {
    if (n < a.gemm_n - 1) split_tap(a.shape, a.shape.div_c, n, r, s, c);
  }
  __device__ __forceinline__ void fetch(const ConvArgs<T>& a, T*, int kt) {
    const int taps = a.gemm_n - 1;
#pragma unroll
    for (int j = 0; j < Slots::kRows; ++j) {
      const int pix = kt * Tile<T>::kBK + slots.row(j);
      if (n < taps) {
        const int64_t off = pix < a.gemm_k ? x_offset(a.shape, output_pixel_row(a.shape, pix), r, s, c) : -1;
        v[j] = off >= 0 ? load_bits(a.x + off) : Bits(0);
      } else {
        v[j] = n == taps && pix < a.gemm_k ? Num<T>::kOne : Bits(0);
      }
    }
  }
  __device__ __forceinline__ void store(T* tile) {
    Bits* t = reinterpret_cast<Bits*>(tile);
#pragma unroll
    for (int j = 0; j < Slots::kRows; ++j) t[slots.offset(j)] = v[j];
  }
};

// ---------------------------------------------------------------------------------------------
// math: one k-tile of the block's 128 x 128 product. for_each_pair(f) calls
// f(row, col, v0, v1) for the accumulators at (row, col) and (row, col + 1) of the block tile.
// ---------------------------------------------------------------------------------------------
enum class MathKind { kTensorCore, kFma };

// bf16 / fp16: ldmatrix fragments, mma.m16n8k16 with fp32 accumulation. Warp (wm, wn) owns rows
// wm*64 .. +64 and columns wn*32 .. +32 as 4 x 4 blocks of 16 x 8.
template <typename T, bool kAK, bool kBK>
struct Mma16 {
  static constexpr int kPK = Tile<T>::kPitchK, kPMN = Tile<T>::kPitchMN;
  float acc[4][4][4];
  int lane, wm, wn;

  __device__ Mma16() : lane(threadIdx.x & 31), wm(((threadIdx.x >> 5) & 1) * 64), wn((threadIdx.x >> 6) * 32) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  }

  __device__ __forceinline__ void compute(const T* As, const T* Bs) {
#pragma unroll
    for (int kk = 0; kk < Tile<T>::kBK; kk += 16) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int m = wm + mi * 16;
        if constexpr (kAK) {
          ldsm_x4(a[mi], As + (m + (lane & 15)) * kPK + kk + (lane >> 4) * 8);
        } else {
          ldsm_x4_trans(a[mi], As + (kk + (lane & 7) + (lane >> 4) * 8) * kPMN + m + ((lane >> 3) & 1) * 8);
        }
      }
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        const int n = wn + nj * 16;
        uint32_t r[4];
        if constexpr (kBK) {
          ldsm_x4(r, Bs + (n + (lane & 7) + (lane >> 4) * 8) * kPK + kk + ((lane >> 3) & 1) * 8);
        } else {
          ldsm_x4_trans(r, Bs + (kk + (lane & 7) + ((lane >> 3) & 1) * 8) * kPMN + n + (lane >> 4) * 8);
        }
        b[2 * nj][0] = r[0];
        b[2 * nj][1] = r[1];
        b[2 * nj + 1][0] = r[2];
        b[2 * nj + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16816<T>(acc[mi][ni], a[mi], b[ni]);
    }
  }

  template <class F>
  __device__ __forceinline__ void for_each_pair(F&& f) const {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          f(wm + mi * 16 + (lane >> 2) + h * 8, wn + ni * 8 + (lane & 3) * 2, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
  }
};

// fp32 on the TF32 tensor cores: mma.m16n8k8, fragments loaded element by element (ldmatrix
// moves 16-bit elements only), rounded to TF32 on the way. Same warp layout as Mma16.
template <bool kAK, bool kBK>
struct MmaTf32 {
  static constexpr int kPK = Tile<float>::kPitchK, kPMN = Tile<float>::kPitchMN;
  float acc[4][4][4];
  int lane, wm, wn;

  __device__ MmaTf32() : lane(threadIdx.x & 31), wm(((threadIdx.x >> 5) & 1) * 64), wn((threadIdx.x >> 6) * 32) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  }

  __device__ __forceinline__ static float at_a(const float* As, int m, int k) {
    return kAK ? As[m * kPK + k] : As[k * kPMN + m];
  }
  __device__ __forceinline__ static float at_b(const float* Bs, int k, int n) {
    return kBK ? Bs[n * kPK + k] : Bs[k * kPMN + n];
  }

  __device__ __forceinline__ void compute(const float* As, const float* Bs) {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int kk = 0; kk < Tile<float>::kBK; kk += 8) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const int m = wm + mi * 16 + g;
        a[mi][0] = to_tf32(at_a(As, m, kk + t));
        a[mi][1] = to_tf32(at_a(As, m + 8, kk + t));
        a[mi][2] = to_tf32(at_a(As, m, kk + t + 4));
        a[mi][3] = to_tf32(at_a(As, m + 8, kk + t + 4));
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const int n = wn + ni * 8 + g;
        b[ni][0] = to_tf32(at_b(Bs, kk + t, n));
        b[ni][1] = to_tf32(at_b(Bs, kk + t + 4, n));
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_1688_tf32(acc[mi][ni], a[mi], b[ni]);
    }
  }

  template <class F>
  __device__ __forceinline__ void for_each_pair(F&& f) const {
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          f(wm + mi * 16 + (lane >> 2) + h * 8, wn + ni * 8 + (lane & 3) * 2, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1]);
  }
};

// True fp32 (TF32 disallowed): each thread accumulates rows ty + 16i and column pairs
// 2tx + 32j of the block tile with FMAs.
template <bool kAK, bool kBK>
struct FmaF32 {
  static constexpr int kPK = Tile<float>::kPitchK, kPMN = Tile<float>::kPitchMN;
  float acc[8][8];
  int tx, ty;

  __device__ FmaF32() : tx(threadIdx.x & 15), ty(threadIdx.x >> 4) {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 8; ++j) acc[i][j] = 0.f;
  }

  __device__ __forceinline__ void compute(const float* As, const float* Bs) {
#pragma unroll 4
    for (int k = 0; k < Tile<float>::kBK; ++k) {
      float a[8], b[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int m = ty + 16 * i;
        a[i] = kAK ? As[m * kPK + k] : As[k * kPMN + m];
      }
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int n = tx * 2 + 32 * (j >> 1) + (j & 1);
        b[j] = kBK ? Bs[n * kPK + k] : Bs[k * kPMN + n];
      }
#pragma unroll
      for (int i = 0; i < 8; ++i)
#pragma unroll
        for (int j = 0; j < 8; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  template <class F>
  __device__ __forceinline__ void for_each_pair(F&& f) const {
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) f(ty + 16 * i, tx * 2 + 32 * j, acc[i][2 * j], acc[i][2 * j + 1]);
  }
};

template <typename T, MathKind kKind, bool kAK, bool kBK>
struct MathFor {
  using type = Mma16<T, kAK, kBK>;
};
template <bool kAK, bool kBK>
struct MathFor<float, MathKind::kTensorCore, kAK, kBK> {
  using type = MmaTf32<kAK, kBK>;
};
template <bool kAK, bool kBK>
struct MathFor<float, MathKind::kFma, kAK, kBK> {
  using type = FmaF32<kAK, kBK>;
};

// ---------------------------------------------------------------------------------------------
// epilogues
// ---------------------------------------------------------------------------------------------
// Stores (v0, v1) at row-major [*, ncols] offset `off` (column col, col + 1), as one aligned pair
// where both columns exist and the row length keeps pairs aligned.
template <typename T>
__device__ __forceinline__ void store_pair(T* base, int64_t off, int col, int ncols, float v0, float v1) {
  using Bits = typename Num<T>::Bits;
  Bits* p = reinterpret_cast<Bits*>(base) + off;
  if (col + 1 < ncols && (ncols & 1) == 0) {
    if constexpr (sizeof(T) == 2) {
      *reinterpret_cast<uint32_t*>(p) = uint32_t(Num<T>::from_float(v0)) | (uint32_t(Num<T>::from_float(v1)) << 16);
    } else {
      *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
    }
  } else {
    if (col < ncols) p[0] = Num<T>::from_float(v0);
    if (col + 1 < ncols) p[1] = Num<T>::from_float(v1);
  }
}

// Bias and ReLU (forward) and the store of one pair of outputs at (m, n), (m, n + 1).
template <typename T, bool kForward>
__device__ __forceinline__ void store_output(const ConvArgs<T>& a, int m, int n, float v0, float v1) {
  if (m >= a.gemm_m || n >= a.gemm_n) return;
  if constexpr (kForward) {
    if (a.bias != nullptr) {
      v0 += Num<T>::to_float(load_bits(a.bias + n));
      if (n + 1 < a.gemm_n) v1 += Num<T>::to_float(load_bits(a.bias + n + 1));
    }
    // relu that keeps NaN, as torch.relu does.
    v0 = v0 < 0.f ? 0.f : v0;
    v1 = v1 < 0.f ? 0.f : v1;
  }
  store_pair(a.y, static_cast<int64_t>(m) * a.gemm_n + n, n, a.gemm_n, v0, v1);
}

// Forward (kForward) and dgrad outputs; a launch over a split tail writes fp32 partial tiles
// instead, which tail_finish_kernel sums and stores.
template <typename T, bool kForward>
struct OutputEpilogue {
  template <class Math>
  __device__ __forceinline__ static void apply(const ConvArgs<T>& a, const Math& math, int m0, int n0) {
    if (a.partial != nullptr) {
      float* tile = a.partial + (static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x) * (kBlockM * kBlockN);
      math.for_each_pair([&](int row, int col, float v0, float v1) {
        *reinterpret_cast<float2*>(tile + row * kBlockN + col) = make_float2(v0, v1);
      });
    } else {
      math.for_each_pair(
          [&](int row, int col, float v0, float v1) { store_output<T, kForward>(a, m0 + row, n0 + col, v0, v1); });
    }
  }
};

template <typename T>
struct WgradEpilogue {
  template <class Math>
  __device__ __forceinline__ static void apply(const ConvArgs<T>& a, const Math& math, int m0, int n0) {
    float* ws = a.workspace + static_cast<int64_t>(blockIdx.y) * a.gemm_m * a.workspace_ld;
    math.for_each_pair([&](int row, int col, float v0, float v1) {
      const int m = m0 + row, n = n0 + col;
      if (m >= a.gemm_m || n >= a.gemm_n) return;
      float* p = ws + static_cast<int64_t>(m) * a.workspace_ld + n;
      if (n + 1 < a.gemm_n) {
        *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
      } else {
        p[0] = v0;
      }
    });
  }
};

// ---------------------------------------------------------------------------------------------
// the kernel
// ---------------------------------------------------------------------------------------------
template <typename T, class ALoader, class BLoader>
struct GemmTraits {
  static constexpr int kATileElems = ALoader::kKMajor ? Tile<T>::kElemsK : Tile<T>::kElemsMN;
  static constexpr int kBTileElems = BLoader::kKMajor ? Tile<T>::kElemsK : Tile<T>::kElemsMN;
  static constexpr int kStageElems = kATileElems + kBTileElems;
  static constexpr bool kRowTable = ALoader::kRowTable || BLoader::kRowTable;
  static constexpr size_t kSmemBytes =
      size_t(kStages) * kStageElems * sizeof(T) + (kRowTable ? kBlockM * sizeof(PixelRow) : 0);
  static_assert((kATileElems * sizeof(T)) % 16 == 0 && (kStageElems * sizeof(T)) % 16 == 0, "16-byte tiles");
};

// Two blocks per SM (at most 128 registers a thread) on the tensor cores; the FMA fallback holds
// its 64 accumulators and operands in more registers than that and runs one block per SM.
template <typename T, MathKind kKind, class ALoader, class BLoader, class Epilogue>
__global__ void __launch_bounds__(kThreads, kKind == MathKind::kFma ? 1 : 2) conv_gemm_kernel(const __grid_constant__ ConvArgs<T> args) {
  using Traits = GemmTraits<T, ALoader, BLoader>;
  using Math = typename MathFor<T, kKind, ALoader::kKMajor, BLoader::kKMajor>::type;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  PixelRow* row_table = reinterpret_cast<PixelRow*>(smem_raw + size_t(kStages) * Traits::kStageElems * sizeof(T));

  const int tid = threadIdx.x;
  int tm, tn;
  tile_coords(args, args.tile_begin + static_cast<int>(blockIdx.x), tm, tn);
  const int m0 = tm * kBlockM, n0 = tn * kBlockN;
  const int kt_begin = blockIdx.y * args.k_tiles_per_split;
  const int kt_end = min(kt_begin + args.k_tiles_per_split, args.k_tiles);
  const int num_kt = max(kt_end - kt_begin, 0);

  auto a_tile = [&](int stage) { return smem + stage * Traits::kStageElems; };
  auto b_tile = [&](int stage) { return smem + stage * Traits::kStageElems + Traits::kATileElems; };

  ALoader a_loader(args, m0, tid, row_table);
  BLoader b_loader(args, n0, tid, row_table);
  if constexpr (Traits::kRowTable) __syncthreads();
  Math math;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_kt) {
      a_loader.fetch(args, a_tile(s), kt_begin + s);
      b_loader.fetch(args, b_tile(s), kt_begin + s);
      a_loader.store(a_tile(s));
      b_loader.store(b_tile(s));
    }
    cp_async_commit();
  }

  for (int i = 0; i < num_kt; ++i) {
    const int next = i + kStages - 1;
    const int next_stage = next % kStages;
    const bool more = next < num_kt;
    // Register loads of tile `next` start before the barrier: their registers were stored at
    // the end of the previous iteration.
    if (more) {
      if constexpr (ALoader::kRegisterStaged) a_loader.fetch(args, a_tile(next_stage), kt_begin + next);
      if constexpr (BLoader::kRegisterStaged) b_loader.fetch(args, b_tile(next_stage), kt_begin + next);
    }
    cp_async_wait<kStages - 2>();
    // Tile i has landed for every thread, and every warp is done with tile i - 1, whose stage
    // the writes below refill.
    __syncthreads();
    if (more) {
      if constexpr (!ALoader::kRegisterStaged) a_loader.fetch(args, a_tile(next_stage), kt_begin + next);
      if constexpr (!BLoader::kRegisterStaged) b_loader.fetch(args, b_tile(next_stage), kt_begin + next);
    }
    cp_async_commit();
    math.compute(a_tile(i % kStages), b_tile(i % kStages));
    if (more) {
      a_loader.store(a_tile(next_stage));
      b_loader.store(b_tile(next_stage));
    }
  }
  cp_async_wait<0>();

  Epilogue::apply(args, math, m0, n0);
}

// Sums the wgrad workspace over splits and scatters it: columns (r, s, c) to grad_weight
// [k][c][r][s], the ones column to grad_bias[k].
template <typename T>
__global__ void wgrad_reduce_kernel(const __grid_constant__ ConvArgs<T> args, int splits, T* grad_weight, T* grad_bias) {
  const ConvShape& cs = args.shape;
  const int64_t total = static_cast<int64_t>(args.gemm_m) * args.gemm_n;
  const int64_t split_stride = static_cast<int64_t>(args.gemm_m) * args.workspace_ld;
  const int taps = args.gemm_n - 1;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total; idx += int64_t(gridDim.x) * blockDim.x) {
    const int co = static_cast<int>(idx / args.gemm_n);
    const int n = static_cast<int>(idx - int64_t(co) * args.gemm_n);
    const float* p = args.workspace + int64_t(co) * args.workspace_ld + n;
    float sum = 0.f;
    for (int z = 0; z < splits; ++z) sum += p[z * split_stride];
    const typename Num<T>::Bits bits = Num<T>::from_float(sum);
    if (n == taps) {
      reinterpret_cast<typename Num<T>::Bits*>(grad_bias)[co] = bits;
    } else {
      int r, s, c;
      split_tap(cs, cs.div_c, n, r, s, c);
      reinterpret_cast<typename Num<T>::Bits*>(grad_weight)[((int64_t(co) * cs.c + c) * cs.r + r) * cs.s + s] = bits;
    }
  }
}

// Sums the split partial tiles of a tail launch (tiles tile_begin ..) and stores them as the
// output epilogue would have.
template <typename T, bool kForward>
__global__ void tail_finish_kernel(const __grid_constant__ ConvArgs<T> args, int tail_tiles, int splits) {
  constexpr int kTileElems = kBlockM * kBlockN;
  const int64_t pairs = static_cast<int64_t>(tail_tiles) * kTileElems / 2;
  const int64_t split_stride = static_cast<int64_t>(tail_tiles) * kTileElems;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < pairs; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e = idx * 2;
    const int local = static_cast<int>(e / kTileElems);
    const int within = static_cast<int>(e - int64_t(local) * kTileElems);
    int tm, tn;
    tile_coords(args, args.tile_begin + local, tm, tn);
    const int m = tm * kBlockM + within / kBlockN, n = tn * kBlockN + within % kBlockN;
    if (m >= args.gemm_m || n >= args.gemm_n) continue;
    float v0 = 0.f, v1 = 0.f;
    for (int z = 0; z < splits; ++z) {
      const float2 v = *reinterpret_cast<const float2*>(args.partial + z * split_stride + e);
      v0 += v.x;
      v1 += v.y;
    }
    store_output<T, kForward>(args, m, n, v0, v1);
  }
}

// ---------------------------------------------------------------------------------------------
// launch planning (host)
// ---------------------------------------------------------------------------------------------
// Whole waves of 128 x 128 tiles keep every SM busy; a last, partial wave leaves most of them
// idle for the time of one tile. Splitting the tail tiles' K over `splits` blocks each shortens
// that wave at the price of a pass over an fp32 workspace and a finishing kernel. The estimate
// uses rough H200 rates; a tail worth less than 10% of a wave is left whole.
struct TailPlan {
  int64_t full_tiles;  // launched with the fused epilogue
  int64_t tail_tiles;  // launched with split K (0: none)
  int splits;
};

inline TailPlan plan_tail(int64_t tiles, int64_t k_tiles, int bk, int blocks_per_sm, int64_t slots, double sm_flops) {
  constexpr double kMemBytesPerS = 3.0e12, kLaunchS = 4e-6;
  TailPlan plan{tiles, 0, 1};
  const int64_t tail = tiles % slots;
  if (tail == 0 || k_tiles < 4) return plan;
  // One tile's time while blocks_per_sm blocks share an SM.
  const double t_tile = blocks_per_sm * 2.0 * kBlockM * kBlockN * double(k_tiles) * bk / sm_flops;
  double best = 0.9 * t_tile;
  const int64_t max_splits = std::min<int64_t>(16, k_tiles / 2);
  for (int64_t s = 2; s <= max_splits; ++s) {
    const double waves = double((tail * s + slots - 1) / slots);
    const double t = waves * t_tile / double(s) + double(tail * s) * kBlockM * kBlockN * 4.0 * 2.0 / kMemBytesPerS + kLaunchS;
    if (t < best) {
      best = t;
      plan = TailPlan{tiles - tail, tail, int(s)};
    }
  }
  return plan;
}

// Number of k-slices of the wgrad GEMM, whose few output tiles (C_out x R*S*C) sit over a long
// reduction (N*P*Q): the estimated time of the slices' waves plus the pass over the fp32
// workspace (workspace_bytes per slice, written once and read once), at least 4 k-tiles a slice.
inline int wgrad_splits(int64_t tiles, int64_t k_tiles, int bk, int blocks_per_sm, int64_t slots, double sm_flops,
                        int64_t workspace_bytes) {
  constexpr double kMemBytesPerS = 3.0e12;
  const int64_t max_splits = std::max<int64_t>(1, std::min<int64_t>(256, k_tiles / 4));
  int best = 1;
  double best_t = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t per_split = (k_tiles + s - 1) / s;
    const int64_t used = (k_tiles + per_split - 1) / per_split;
    const double waves = double((tiles * used + slots - 1) / slots);
    const double t = waves * blocks_per_sm * 2.0 * kBlockM * kBlockN * double(per_split) * bk / sm_flops +
                     2.0 * double(used) * double(workspace_bytes) / kMemBytesPerS;
    if (s == 1 || t < 0.98 * best_t) {
      best = int(used);
      best_t = t;
    }
  }
  return best;
}

}  // namespace conv_gemm
}  // namespace alexnet_fast
