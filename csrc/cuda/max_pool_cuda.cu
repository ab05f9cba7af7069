// CUDA kernels of max_pool2d and max_pool2d_backward.
//
// Forward: one thread per output (NCHW; consecutive threads take consecutive columns), or per
// output pixel and vector of channels (channels_last: 16-byte loads when the channel count allows),
// scanning the window row-major with PyTorch's rule; the 3x3 kernel is unrolled.
// Backward is a gather, without atomics. For a 3x3 stride-2 pool (AlexNet's) each thread owns a
// 2x2 stride cell of input pixels and reads each of the (at most 2x2) windows covering it once;
// other pools take one thread per input element, reading every window that covers it.
#include <torch/library.h>

#include <tuple>

#include "cuda/cuda_common.cuh"

namespace alexnet_fast::gpu {
namespace {

// The pool shape with specialised kernels: AlexNet's.
constexpr int kCellK = 3, kCellS = 2;
// Planes per thread of the NCHW kernels: the per-thread index arithmetic is shared by them and
// their loads are in flight together.
constexpr int kPlanes = 4;

// Window scan of one output position for NV lanes at once (planes, or channels), from the window's
// unclipped top-left corner (hs, ws); KH = KW = 0 reads the kernel size from `s`.
// load(h, w, v) fills v with the NV lanes' inputs at (h, w) in the comparison type A.
template <int KH, int KW, int NV, typename A, typename Load>
__device__ __forceinline__ void scan_window(const Load& load, int hs, int ws, const PoolShape& s, A (&best)[NV],
                                            int (&arg)[NV]) {
  const int kh = KH > 0 ? KH : s.kh, kw = KW > 0 ? KW : s.kw;
  const int h0 = max(hs, 0), h1 = min(hs + kh, s.H), w0 = max(ws, 0), w1 = min(ws + kw, s.W);
#pragma unroll
  for (int i = 0; i < NV; ++i) best[i] = -std::numeric_limits<A>::infinity(), arg[i] = (h0 - hs) * kw + (w0 - ws);
  const auto visit = [&](int h, int w, int offset) {
    A v[NV];
    load(h, w, v);
#pragma unroll
    for (int i = 0; i < NV; ++i) pool_update(v[i], offset, best[i], arg[i]);
  };
  if constexpr (KH > 0) {
#pragma unroll
    for (int a = 0; a < KH; ++a) {
#pragma unroll
      for (int b = 0; b < KW; ++b) {
        const int h = hs + a, w = ws + b;
        if (h >= h0 && h < h1 && w >= w0 && w < w1) visit(h, w, a * KW + b);
      }
    }
  } else {
    for (int h = h0; h < h1; ++h)
      for (int w = w0; w < w1; ++w) visit(h, w, (h - hs) * kw + (w - ws));
  }
}

// NCHW: one thread per output position and kPlanes planes (blockIdx.y walks the groups of planes),
// which share the window's offsets and bounds; consecutive threads take consecutive columns.

template <typename T, int KH, int KW>
__global__ void __launch_bounds__(kThreads)
    max_pool2d_forward_nchw_kernel(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ indices,
                                   int64_t planes, PoolShape s) {
  using A = at::opmath_type<T>;
  const int o = blockIdx.x * kThreads + threadIdx.x;
  if (o >= s.OH * s.OW) return;
  const int oh = o / s.OW, ow = o - oh * s.OW;
  const int hs = oh * s.sh - s.ph, ws = ow * s.sw - s.pw;
  const int64_t plane_in = static_cast<int64_t>(s.H) * s.W, plane_out = static_cast<int64_t>(s.OH) * s.OW;
  // A fixed window: its element offsets and bounds once, then plain loads per plane.
  int off[KH > 0 ? KH * KW : 1];
  bool ok[KH > 0 ? KH * KW : 1];
  if constexpr (KH > 0) {
#pragma unroll
    for (int q = 0; q < KH * KW; ++q) {
      const int h = hs + q / KW, w = ws + q % KW;
      ok[q] = h >= 0 && h < s.H && w >= 0 && w < s.W;
      off[q] = h * s.W + w;
    }
  }
  for (int64_t p0 = static_cast<int64_t>(blockIdx.y) * kPlanes; p0 < planes;
       p0 += static_cast<int64_t>(gridDim.y) * kPlanes) {
    const int count = static_cast<int>(std::min<int64_t>(kPlanes, planes - p0));
    // Planes past the end repeat the last one (loaded, never stored): no predicated loads.
    const T* xk[kPlanes];
#pragma unroll
    for (int k = 0; k < kPlanes; ++k) xk[k] = x + (p0 + min(k, count - 1)) * plane_in;
    A best[kPlanes];
    int arg[kPlanes];
    if constexpr (KH > 0) {
      const int first = (max(hs, 0) - hs) * KW + (max(ws, 0) - ws);
#pragma unroll
      for (int k = 0; k < kPlanes; ++k) best[k] = -std::numeric_limits<A>::infinity(), arg[k] = first;
#pragma unroll
      for (int q = 0; q < KH * KW; ++q) {
        if (ok[q]) {
#pragma unroll
          for (int k = 0; k < kPlanes; ++k) pool_update(static_cast<A>(xk[k][off[q]]), q, best[k], arg[k]);
        }
      }
    } else {
      scan_window<KH, KW>(
          [&](int h, int w, A (&v)[kPlanes]) {
#pragma unroll
            for (int k = 0; k < kPlanes; ++k) v[k] = static_cast<A>(xk[k][h * s.W + w]);
          },
          hs, ws, s, best, arg);
    }
#pragma unroll
    for (int k = 0; k < kPlanes; ++k) {
      if (k < count) {
        out[(p0 + k) * plane_out + o] = static_cast<T>(best[k]);
        indices[(p0 + k) * plane_out + o] = static_cast<uint8_t>(arg[k]);
      }
    }
  }
}

// channels_last: one thread per (output pixel, VEC channels); total = N*OH*OW*(C/VEC). Four blocks
// per SM is a register budget of 64, which the 8-channel vectors fit without spills (left alone,
// ptxas picks 48 and spills).
template <typename T, int VEC, int KH, int KW>
__global__ void __launch_bounds__(kThreads, 4)
    max_pool2d_forward_nhwc_kernel(const T* __restrict__ x, T* __restrict__ out, uint8_t* __restrict__ indices,
                                   int total, int C, PoolShape s) {
  using A = at::opmath_type<T>;
  const unsigned t = blockIdx.x * kThreads + threadIdx.x;
  if (t >= static_cast<unsigned>(total)) return;
  const unsigned pix = t / static_cast<unsigned>(C / VEC), row = pix / static_cast<unsigned>(s.OW);
  const unsigned n = row / static_cast<unsigned>(s.OH);
  const int c0 = static_cast<int>(t - pix * (C / VEC)) * VEC;
  const int oh = static_cast<int>(row - n * s.OH), ow = static_cast<int>(pix - row * s.OW);
  const T* xn = x + static_cast<int64_t>(n) * s.H * s.W * C + c0;
  A best[VEC];
  int arg[VEC];
  scan_window<KH, KW>(
      [&](int h, int w, A (&v)[VEC]) { load_as<VEC>(xn + (static_cast<int64_t>(h) * s.W + w) * C, v); },
      oh * s.sh - s.ph, ow * s.sw - s.pw, s, best, arg);
  const int64_t o = static_cast<int64_t>(t) * VEC;
  store_as<VEC>(out + o, best);
  store_as<VEC>(indices + o, arg);
}

// Backward for the 3x3/2 pool, NCHW: one thread per stride cell of a plane and kPlanes planes
// (blockIdx.y walks the groups of planes), which share the cell's window and pixel offsets.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    max_pool2d_backward_cell_nchw_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ indices,
                                         T* __restrict__ dx, int64_t planes, int cells_w, int cells, PoolShape s) {
  using Cell = PoolCell<kCellK, kCellK, kCellS, kCellS>;
  using A = at::opmath_type<T>;
  constexpr int kPix = kCellS * kCellS, kWin = Cell::kWinH * Cell::kWinW;
  const int cell = blockIdx.x * kThreads + threadIdx.x;
  if (cell >= cells) return;
  const int i = cell / cells_w, j = cell - i * cells_w;
  int win_off[kWin], pix_off[kPix];
  bool win_ok[kWin], pix_ok[kPix];
#pragma unroll
  for (int q = 0; q < kWin; ++q) {
    // q ascending is (a, b) descending: the windows in (oh, ow) order.
    const int oh = i - (Cell::kWinH - 1 - q / Cell::kWinW), ow = j - (Cell::kWinW - 1 - q % Cell::kWinW);
    win_ok[q] = oh >= 0 && oh < s.OH && ow >= 0 && ow < s.OW;
    win_off[q] = oh * s.OW + ow;
  }
#pragma unroll
  for (int p = 0; p < kPix; ++p) {
    const int h = i * kCellS - s.ph + p / kCellS, w = j * kCellS - s.pw + p % kCellS;
    pix_ok[p] = h >= 0 && h < s.H && w >= 0 && w < s.W;
    pix_off[p] = h * s.W + w;
  }
  const int64_t plane_in = static_cast<int64_t>(s.H) * s.W, plane_out = static_cast<int64_t>(s.OH) * s.OW;
  for (int64_t p0 = static_cast<int64_t>(blockIdx.y) * kPlanes; p0 < planes;
       p0 += static_cast<int64_t>(gridDim.y) * kPlanes) {
    const int count = static_cast<int>(std::min<int64_t>(kPlanes, planes - p0));
    // Planes past the end repeat the last one (read, never written): no predicated loads.
    const T* gk[kPlanes];
    const uint8_t* ik[kPlanes];
#pragma unroll
    for (int k = 0; k < kPlanes; ++k) {
      const int64_t plane = p0 + min(k, count - 1);
      gk[k] = grad + plane * plane_out;
      ik[k] = indices + plane * plane_out;
    }
    A acc[kPlanes][kCellS][kCellS] = {};
#pragma unroll
    for (int q = 0; q < kWin; ++q) {
      if (win_ok[q]) {
#pragma unroll
        for (int k = 0; k < kPlanes; ++k) {
          Cell::add(Cell::kWinH - 1 - q / Cell::kWinW, Cell::kWinW - 1 - q % Cell::kWinW, ik[k][win_off[q]],
                    static_cast<A>(gk[k][win_off[q]]), acc[k]);
        }
      }
    }
#pragma unroll
    for (int k = 0; k < kPlanes; ++k) {
      if (k < count) {
        T* dp = dx + (p0 + k) * plane_in;
#pragma unroll
        for (int p = 0; p < kPix; ++p) {
          if (pix_ok[p]) dp[pix_off[p]] = static_cast<T>(acc[k][p / kCellS][p % kCellS]);
        }
      }
    }
  }
}

// Backward for the 3x3/2 pool, channels_last: one thread per (stride cell, VEC channels);
// total = N*cells_h*cells_w*(C/VEC).
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    max_pool2d_backward_cell_nhwc_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ indices,
                                         T* __restrict__ dx, int total, int C, int cells_h, int cells_w,
                                         PoolShape s) {
  using Cell = PoolCell<kCellK, kCellK, kCellS, kCellS>;
  using A = at::opmath_type<T>;
  const unsigned t = blockIdx.x * kThreads + threadIdx.x;
  if (t >= static_cast<unsigned>(total)) return;
  const unsigned cell = t / static_cast<unsigned>(C / VEC), cell_row = cell / static_cast<unsigned>(cells_w);
  const unsigned n = cell_row / static_cast<unsigned>(cells_h);
  const int c0 = static_cast<int>(t - cell * (C / VEC)) * VEC;
  const int i = static_cast<int>(cell_row - n * cells_h), j = static_cast<int>(cell - cell_row * cells_w);
  A acc[VEC][kCellS][kCellS] = {};
  Cell::gather_nhwc(grad, indices, n, i, j, c0, C, s, true, acc);
#pragma unroll
  for (int r = 0; r < kCellS; ++r) {
#pragma unroll
    for (int c = 0; c < kCellS; ++c) {
      const int h = i * kCellS - s.ph + r, w = j * kCellS - s.pw + c;
      if (h >= 0 && h < s.H && w >= 0 && w < s.W) {
        A y[VEC];
#pragma unroll
        for (int v = 0; v < VEC; ++v) y[v] = acc[v][r][c];
        store_as<VEC>(dx + ((static_cast<int64_t>(n) * s.H + h) * s.W + w) * C + c0, y);
      }
    }
  }
}

// Backward for any pool: one thread per input element, in memory order (NCHW, or NHWC when CL).
template <typename T, bool CL>
__global__ void __launch_bounds__(kThreads)
    max_pool2d_backward_generic_kernel(const T* __restrict__ grad, const uint8_t* __restrict__ indices,
                                       T* __restrict__ dx, int64_t total, int C, PoolShape s) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    int64_t n, c, h, w, r;
    if constexpr (CL) {
      r = divmod(e, C, c);
      r = divmod(r, s.W, w);
      n = divmod(r, s.H, h);
    } else {
      r = divmod(e, s.W, w);
      r = divmod(r, s.H, h);
      n = divmod(r, C, c);
    }
    const auto offset = [&](int oh, int ow) -> int64_t {
      return CL ? ((n * s.OH + oh) * s.OW + ow) * C + c : ((n * C + c) * s.OH + oh) * s.OW + ow;
    };
    dx[e] = static_cast<T>(pool_gather(grad, indices, offset, static_cast<int>(h), static_cast<int>(w), s));
  }
}

// Grid for the per-plane kernels: blockIdx.y walks the planes, planes_per_block at a time.
dim3 plane_grid(int64_t per_plane, int64_t planes, int planes_per_block) {
  return dim3(grid_blocks(per_plane, kThreads),
              static_cast<unsigned>(std::min<int64_t>(ceil_div(planes, planes_per_block), 65535)));
}

std::tuple<at::Tensor, at::Tensor> max_pool2d_cuda(const at::Tensor& x, at::IntArrayRef kernel_size,
                                                   at::IntArrayRef stride, at::IntArrayRef padding, bool ceil_mode) {
  CHECK_4D(x);
  CHECK_FLOATING(x);
  CHECK_DEVICE_TYPE(x, at::kCUDA);
  check_pool_params(kernel_size, stride, padding);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const auto out_hw = pool_output_hw(H, W, kernel_size, stride, padding, ceil_mode);
  const int64_t OH = out_hw.first, OW = out_hw.second;
  check_plane(H, W, "x");
  check_plane(OH, OW, "out");  // padding can make the output plane larger than the input's
  const c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_memory_format(x);
  const at::Tensor xc = x.contiguous(fmt);
  at::Tensor out = poison_if_debug(at::empty({N, C, OH, OW}, x.options().memory_format(fmt)));
  at::Tensor indices = poison_if_debug(at::empty({N, C, OH, OW}, x.options().dtype(at::kByte).memory_format(fmt)));
  if (out.numel() == 0) return {out, indices};
  const PoolShape s = make_pool_shape(H, W, OH, OW, kernel_size, stride, padding);
  const bool k3 = s.kh == 3 && s.kw == 3;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_pool2d_cuda", [&] {
    const scalar_t* xp = xc.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    uint8_t* ip = indices.mutable_data_ptr<uint8_t>();
    if (fmt == at::MemoryFormat::ChannelsLast) {
      constexpr int kVec = 16 / sizeof(scalar_t);
      const bool vec = C % kVec == 0 && aligned_to(xc, 16) && aligned_to(out, 16) && aligned_to(indices, kVec);
      const int64_t total = N * OH * OW * (vec ? C / kVec : C);
      TORCH_CHECK(fits_index32(total), "max_pool2d: channels_last outputs of more than 2^31 ",
                  vec ? "channel vectors" : "elements", " are not supported, got ", total);
      const unsigned blocks = grid_blocks(total, kThreads);
      const auto launch = [&](auto kernel) {
        kernel<<<blocks, kThreads, 0, stream>>>(xp, op, ip, static_cast<int>(total), static_cast<int>(C), s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (vec) {
        k3 ? launch(max_pool2d_forward_nhwc_kernel<scalar_t, kVec, 3, 3>)
           : launch(max_pool2d_forward_nhwc_kernel<scalar_t, kVec, 0, 0>);
      } else {
        k3 ? launch(max_pool2d_forward_nhwc_kernel<scalar_t, 1, 3, 3>)
           : launch(max_pool2d_forward_nhwc_kernel<scalar_t, 1, 0, 0>);
      }
    } else {
      const dim3 grid = plane_grid(OH * OW, N * C, kPlanes);
      const auto launch = [&](auto kernel) {
        kernel<<<grid, kThreads, 0, stream>>>(xp, op, ip, N * C, s);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      k3 ? launch(max_pool2d_forward_nchw_kernel<scalar_t, 3, 3>)
         : launch(max_pool2d_forward_nchw_kernel<scalar_t, 0, 0>);
    }
  });
  return {out, indices};
}

at::Tensor max_pool2d_backward_cuda(const at::Tensor& grad_out, const at::Tensor& indices, at::IntArrayRef input_hw,
                                    at::IntArrayRef kernel_size, at::IntArrayRef stride, at::IntArrayRef padding) {
  CHECK_4D(grad_out);
  CHECK_FLOATING(grad_out);
  CHECK_DEVICE_TYPE(grad_out, at::kCUDA);
  CHECK_4D(indices);
  TORCH_CHECK(indices.scalar_type() == at::kByte, "indices must be a uint8 tensor, got ", indices.scalar_type());
  CHECK_SAME_DEVICE(grad_out, indices);
  CHECK_PAIR(input_hw);
  CHECK_NONNEGATIVE(input_hw[0]);
  CHECK_NONNEGATIVE(input_hw[1]);
  check_pool_params(kernel_size, stride, padding);
  TORCH_CHECK(indices.sizes() == grad_out.sizes(), "indices must have the shape of grad_out ", grad_out.sizes(),
              ", got ", indices.sizes());
  const int64_t N = grad_out.size(0), C = grad_out.size(1), OH = grad_out.size(2), OW = grad_out.size(3);
  const int64_t H = input_hw[0], W = input_hw[1];
  // The forward's output size, with or without ceil_mode (which the backward is not given).
  for (int d = 0; d < 2; ++d) {
    const int64_t in = input_hw[d], out = grad_out.size(2 + d);
    TORCH_CHECK(out == pool_output_size(in, kernel_size[d], stride[d], padding[d], false) ||
                    out == pool_output_size(in, kernel_size[d], stride[d], padding[d], true),
                "grad_out has ", out, " pooled ", d == 0 ? "rows" : "columns", ", which no pool of ", in,
                " with kernel_size ", kernel_size, ", stride ", stride, ", padding ", padding, " gives");
  }
  check_plane(H, W, "input");
  const c10::cuda::CUDAGuard guard(grad_out.device());
  const auto fmt = output_memory_format(grad_out);
  const at::Tensor g = grad_out.contiguous(fmt);
  const at::Tensor idx = indices.contiguous(fmt);
  at::Tensor dx = poison_if_debug(at::empty({N, C, H, W}, grad_out.options().memory_format(fmt)));
  if (dx.numel() == 0) return dx;
  const PoolShape s = make_pool_shape(H, W, OH, OW, kernel_size, stride, padding);
  const bool cell = s.kh == kCellK && s.kw == kCellK && s.sh == kCellS && s.sw == kCellS;
  const bool channels_last = fmt == at::MemoryFormat::ChannelsLast;
  const int64_t cells_h = ceil_div(H + s.ph, kCellS), cells_w = ceil_div(W + s.pw, kCellS);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "max_pool2d_backward_cuda", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const uint8_t* ip = idx.const_data_ptr<uint8_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = C % kVec == 0 && aligned_to(g, 16) && aligned_to(dx, 16) && aligned_to(idx, kVec);
    const int64_t cell_items = N * cells_h * cells_w * (vec ? C / kVec : C);
    if (cell && channels_last && fits_index32(cell_items)) {
      const auto kernel = vec ? max_pool2d_backward_cell_nhwc_kernel<scalar_t, kVec>
                              : max_pool2d_backward_cell_nhwc_kernel<scalar_t, 1>;
      kernel<<<grid_blocks(cell_items, kThreads), kThreads, 0, stream>>>(
          gp, ip, dp, static_cast<int>(cell_items), static_cast<int>(C), static_cast<int>(cells_h),
          static_cast<int>(cells_w), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (cell && !channels_last) {
      const int64_t cells = cells_h * cells_w;
      max_pool2d_backward_cell_nchw_kernel<scalar_t><<<plane_grid(cells, N * C, kPlanes), kThreads, 0, stream>>>(
          gp, ip, dp, N * C, static_cast<int>(cells_w), static_cast<int>(cells), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else {
      const int64_t total = dx.numel();
      const auto kernel = channels_last ? max_pool2d_backward_generic_kernel<scalar_t, true>
                                        : max_pool2d_backward_generic_kernel<scalar_t, false>;
      kernel<<<strided_grid(total), kThreads, 0, stream>>>(gp, ip, dp, total, static_cast<int>(C), s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return dx;
}

}  // namespace
}  // namespace alexnet_fast::gpu

TORCH_LIBRARY_IMPL(alexnet_fast, CUDA, m) {
  m.impl("max_pool2d", &alexnet_fast::gpu::max_pool2d_cuda);
  m.impl("max_pool2d_backward", &alexnet_fast::gpu::max_pool2d_backward_cuda);
}
