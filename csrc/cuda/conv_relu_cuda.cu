// CUDA kernels of conv2d_relu and its two gradients: implicit GEMMs on the tensor cores
// (conv_gemm.cuh). The kernels read and write channels_last (NHWC) memory only: NCHW inputs
// (x, grad_out, out) are converted to channels_last once per call, and an NCHW output is written
// to a channels_last buffer and copied once. Outputs follow csrc/checks.h's
// output_memory_format, with the strides the fake kernels of alexnet_fast/ops.py give.
//
// Dtypes: bfloat16 and float16 on the tensor cores with fp32 accumulation; float32 on the TF32
// tensor cores when torch.backends.cudnn.allow_tf32 is set (PyTorch's rule for convolutions),
// with fp32 FMAs otherwise. float64 runs on the CPU kernels only.
//
// The same op through cuDNN (conv2d_relu_cudnn, which `auto` runs where cuDNN is faster) is at the
// end: cuDNN's fused forward, and one backward with our ReLU-mask and bias-gradient pass.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <limits>
#include <mutex>
#include <optional>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <vector>

#include "checks.h"
#include "relu_bias.h"
#include "conv_gemm.cuh"
#include "cuda/cuda_common.cuh"
#include "poison.h"

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got ", (x).device())

namespace {

using alexnet_fast::conv_gemm::ConvArgs;
using alexnet_fast::conv_gemm::ConvShape;
using alexnet_fast::conv_gemm::DgradALoader;
using alexnet_fast::conv_gemm::FastDivmod;
using alexnet_fast::conv_gemm::ForwardALoader;
using alexnet_fast::conv_gemm::GemmTraits;
using alexnet_fast::conv_gemm::kBlockM;
using alexnet_fast::conv_gemm::kBlockN;
using alexnet_fast::conv_gemm::kThreads;
using alexnet_fast::conv_gemm::MathKind;
using alexnet_fast::conv_gemm::OutputEpilogue;
using alexnet_fast::conv_gemm::TailPlan;
using alexnet_fast::conv_gemm::Tile;
using alexnet_fast::conv_gemm::WeightBLoader;
using alexnet_fast::conv_gemm::WgradALoader;
using alexnet_fast::conv_gemm::WgradBLoader;
using alexnet_fast::conv_gemm::WgradEpilogue;
using alexnet_fast::poison_if_debug;

// GEMM extents and per-dimension coordinates stay in int32 with room for a tile of overrun;
// element offsets are 64-bit.
constexpr int64_t kMaxExtent = std::numeric_limits<int32_t>::max() - 1024;
// Spatial coordinates, padding included, must stay clear of the invalid-row sentinel.
constexpr int64_t kMaxSpatial = int64_t(1) << 29;

template <typename T, MathKind kKind>
struct Config {
  using type = T;
  static constexpr MathKind kMath = kKind;
};

bool allow_tf32() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 9)
  return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV);
#else
  return at::globalContext().allowTF32CuDNN();
#endif
}

// Calls f(Config<T, math>{}) for the kernel element type of `dtype`.
template <class F>
void dispatch_dtype(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kBFloat16:
      f(Config<__nv_bfloat16, MathKind::kTensorCore>{});
      break;
    case at::kHalf:
      f(Config<__half, MathKind::kTensorCore>{});
      break;
    case at::kFloat:
      if (allow_tf32()) {
        f(Config<float, MathKind::kTensorCore>{});
      } else {
        f(Config<float, MathKind::kFma>{});
      }
      break;
    default:
      TORCH_CHECK(false, what, " must be float32, float16 or bfloat16 for the CUDA kernels (float64 runs on the CPU), got ",
                  dtype);
  }
}

int64_t conv_output_size(int64_t size, int64_t kernel, int64_t stride, int64_t padding) {
  return (size + 2 * padding - kernel) / stride + 1;
}

int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_extent(int64_t v, const char* what) {
  TORCH_CHECK(v <= kMaxExtent, what, " = ", v, " exceeds what the CUDA conv kernels index with 32-bit integers (",
              kMaxExtent, ")");
}

void check_kernel_fits(int64_t h, int64_t w, int64_t r, int64_t s, at::IntArrayRef padding) {
  TORCH_CHECK(h + 2 * padding[0] >= r && w + 2 * padding[1] >= s, "kernel ", r, "x", s,
              " is larger than the padded input ", h, "x", w, " with padding (", padding[0], ", ", padding[1], ")");
}

void check_conv_params(at::IntArrayRef stride, at::IntArrayRef padding) {
  CHECK_PAIR(stride);
  CHECK_PAIR(padding);
  CHECK_POSITIVE(stride[0]);
  CHECK_POSITIVE(stride[1]);
  CHECK_NONNEGATIVE(padding[0]);
  CHECK_NONNEGATIVE(padding[1]);
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Shape of the problem with x [n, c, h, w], weight [k, c, r, s], output [n, k, p, q].
ConvShape make_shape(int64_t n, int64_t c, int64_t h, int64_t w, int64_t k, int64_t r, int64_t s, int64_t p,
                     int64_t q, at::IntArrayRef stride, at::IntArrayRef padding) {
  TORCH_CHECK(h + 2 * padding[0] + stride[0] < kMaxSpatial && w + 2 * padding[1] + stride[1] < kMaxSpatial,
              "input size ", h, "x", w, " with padding (", padding[0], ", ", padding[1], ") and stride (", stride[0], ", ",
              stride[1], ") is too large for the CUDA conv kernels");
  auto div = [](int64_t d) { return FastDivmod(static_cast<int>(std::max<int64_t>(d, 1))); };
  ConvShape cs;
  cs.n = int(n), cs.h = int(h), cs.w = int(w), cs.c = int(c);
  cs.k = int(k), cs.r = int(r), cs.s = int(s);
  cs.p = int(p), cs.q = int(q);
  cs.stride_h = int(stride[0]), cs.stride_w = int(stride[1]);
  cs.pad_h = int(padding[0]), cs.pad_w = int(padding[1]);
  cs.div_c = div(c), cs.div_k = div(k), cs.div_s = div(s);
  cs.div_q = div(q), cs.div_pq = div(p * q);
  cs.div_w = div(w), cs.div_hw = div(h * w);
  cs.div_stride_h = div(stride[0]), cs.div_stride_w = div(stride[1]);
  return cs;
}

// An output in memory format `fmt`, allocated as every kernel of ours and the fake kernels
// allocate theirs, so the strides agree also on dimensions of size 1 (poisoned in debug runs).
at::Tensor alloc_output(at::IntArrayRef shape, const at::TensorOptions& options, at::MemoryFormat fmt) {
  return poison_if_debug(at::empty(shape, options.memory_format(fmt)));
}

// Where a kernel writes `result`: the tensor itself when its memory is dense NHWC, else a
// channels_last buffer that is copied into it afterwards.
at::Tensor nhwc_target(const at::Tensor& result) {
  return result.is_contiguous(at::MemoryFormat::ChannelsLast)
             ? result
             : poison_if_debug(
                   at::empty(result.sizes(), result.options().memory_format(at::MemoryFormat::ChannelsLast)));
}

// A row-major [rows, cols] matrix as [rows, ld] with ld a multiple of `chunk`, zero past cols,
// so that the kernels load whole 16-byte vectors of it (zeros on purpose: never poisoned).
at::Tensor pad_rows(const at::Tensor& m, int64_t chunk) {
  const int64_t rows = m.size(0), cols = m.size(1), ld = round_up(std::max<int64_t>(cols, 1), chunk);
  if (ld == cols) {
    at::Tensor dense = m.contiguous();
    if (aligned16(dense)) return dense;
  }
  at::Tensor padded = at::zeros({rows, ld}, m.options());
  padded.narrow(1, 0, cols).copy_(m);
  return padded;
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.data_ptr());
}

template <typename T>
T* mutable_ptr(const at::Tensor& t) {
  return reinterpret_cast<T*>(t.data_ptr());
}

template <typename T>
void set_tiles(ConvArgs<T>& a, int64_t gemm_m, int64_t gemm_n, int64_t gemm_k, bool m_fastest) {
  check_extent(gemm_m, "GEMM rows");
  check_extent(gemm_n, "GEMM columns");
  check_extent(gemm_k, "GEMM reduction length");
  a.gemm_m = int(gemm_m), a.gemm_n = int(gemm_n), a.gemm_k = int(gemm_k);
  a.k_tiles = int(ceil_div(gemm_k, Tile<T>::kBK));
  a.k_tiles_per_split = a.k_tiles;
  a.m_tiles = int(ceil_div(gemm_m, kBlockM));
  a.n_tiles = int(ceil_div(gemm_n, kBlockN));
  check_extent(int64_t(a.m_tiles) * a.n_tiles, "GEMM tiles");
  a.m_fastest = m_fastest;
}

template <typename T, MathKind kMath, class A, class B, class E>
auto gemm_kernel() {
  return alexnet_fast::conv_gemm::conv_gemm_kernel<T, kMath, A, B, E>;
}

// The kernel, set up once per device for its dynamic shared memory; blocks_per_sm and slots
// (blocks resident on the whole GPU) come from the occupancy calculator.
template <typename T, MathKind kMath, class A, class B, class E>
auto prepared_kernel(int64_t& slots, int& blocks_per_sm) {
  auto kernel = gemm_kernel<T, kMath, A, B, E>();
  constexpr size_t smem = GemmTraits<T, A, B>::kSmemBytes;
  static std::mutex mutex;
  static std::unordered_map<int, int> occupancy;  // device -> resident blocks per SM
  const int device = at::cuda::current_device();
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = occupancy.find(device);
    if (it == occupancy.end()) {
      int n = 0;
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
      C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, kThreads, smem));
      it = occupancy.emplace(device, std::max(n, 1)).first;
    }
    blocks_per_sm = it->second;
  }
  slots = int64_t(blocks_per_sm) * at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return kernel;
}

// Tensor-core (or FMA) throughput of one SM, for launch planning only.
template <typename T, MathKind kMath>
constexpr double sm_flops() {
  return kMath == MathKind::kFma ? 0.35e12 : (sizeof(T) == 4 ? 1.5e12 : 3.0e12);
}

// The forward and dgrad GEMMs: whole waves of tiles with the fused epilogue, and a short last
// wave split along K when that is estimated to be faster (plan_tail).
template <typename T, MathKind kMath, class A, class B, bool kForward>
void run_output_gemm(ConvArgs<T> a, const at::TensorOptions& float_options, cudaStream_t stream) {
  using E = OutputEpilogue<T, kForward>;
  constexpr size_t smem = GemmTraits<T, A, B>::kSmemBytes;
  int64_t slots = 0;
  int blocks_per_sm = 0;
  auto kernel = prepared_kernel<T, kMath, A, B, E>(slots, blocks_per_sm);
  const int64_t tiles = int64_t(a.m_tiles) * a.n_tiles;
  const TailPlan plan =
      alexnet_fast::conv_gemm::plan_tail(tiles, a.k_tiles, Tile<T>::kBK, blocks_per_sm, slots, sm_flops<T, kMath>());
  if (plan.full_tiles > 0) {
    kernel<<<unsigned(plan.full_tiles), kThreads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (plan.tail_tiles == 0) return;
  a.tile_begin = int(plan.full_tiles);
  a.k_tiles_per_split = int(ceil_div(a.k_tiles, plan.splits));
  const int splits = int(ceil_div(a.k_tiles, a.k_tiles_per_split));
  // Each split stores (not adds) its whole tile, and tail_finish_kernel sums the splits: no
  // element is read before it is written, so the workspace starts poisoned in debug runs.
  at::Tensor partial = poison_if_debug(at::empty({splits, plan.tail_tiles, kBlockM * kBlockN}, float_options));
  a.partial = partial.data_ptr<float>();
  kernel<<<dim3(unsigned(plan.tail_tiles), unsigned(splits)), kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t pairs = plan.tail_tiles * kBlockM * kBlockN / 2;
  const int blocks = int(std::min<int64_t>(ceil_div(pairs, 256), slots * 4));
  alexnet_fast::conv_gemm::tail_finish_kernel<T, kForward><<<blocks, 256, 0, stream>>>(a, int(plan.tail_tiles), splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------
// forward
// ---------------------------------------------------------------------------------------------
void check_forward_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                        at::IntArrayRef stride, at::IntArrayRef padding) {
  CHECK_4D(x);
  CHECK_4D(weight);
  CHECK_CUDA(x);
  CHECK_SAME_DEVICE(x, weight);
  CHECK_SAME_DTYPE(x, weight);
  check_conv_params(stride, padding);
  TORCH_CHECK(weight.size(1) == x.size(1), "weight must have x's ", x.size(1),
              " input channels in dim 1 (groups=1), got shape ", weight.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == weight.size(0), "bias must have shape [", weight.size(0), "], got ",
                b.sizes());
    TORCH_CHECK(b.device() == x.device(), "bias must be on the device of x (", x.device(), "), got ", b.device());
    TORCH_CHECK(b.scalar_type() == x.scalar_type(), "bias must have the dtype of x (", x.scalar_type(), "), got ",
                b.scalar_type());
  }
  check_kernel_fits(x.size(2), x.size(3), weight.size(2), weight.size(3), padding);
}

at::Tensor conv2d_relu_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            at::IntArrayRef stride, at::IntArrayRef padding) {
  check_forward_args(x, weight, bias, stride, padding);
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t k = weight.size(0), r = weight.size(2), s = weight.size(3);
  const int64_t p = conv_output_size(h, r, stride[0], padding[0]);
  const int64_t q = conv_output_size(w, s, stride[1], padding[1]);
  c10::cuda::CUDAGuard guard(x.device());

  at::Tensor result = alloc_output({n, k, p, q}, x.options(), output_memory_format(x));
  if (result.numel() == 0) return result;
  at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor bc = bias.has_value() ? bias->contiguous() : at::Tensor();
  at::Tensor y = nhwc_target(result);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_dtype(x.scalar_type(), "x", [&](auto cfg) {
    using T = typename decltype(cfg)::type;
    constexpr MathKind kMath = decltype(cfg)::kMath;
    constexpr int kChunk = Tile<T>::kChunk;
    // weight as [k][(r, s, c)], rows padded to whole vectors
    at::Tensor wt = pad_rows(weight.permute({0, 2, 3, 1}).reshape({k, r * s * c}), kChunk);
    ConvArgs<T> a{};
    a.shape = make_shape(n, c, h, w, k, r, s, p, q, stride, padding);
    set_tiles(a, n * p * q, k, r * s * c, /*m_fastest=*/false);
    a.x = ptr<T>(xc);
    a.weight = ptr<T>(wt);
    a.weight_ld = int(wt.size(1));
    a.bias = bc.defined() ? ptr<T>(bc) : nullptr;
    a.y = mutable_ptr<T>(y);
    if (c % kChunk == 0 && aligned16(xc)) {
      run_output_gemm<T, kMath, ForwardALoader<T, true>, WeightBLoader<T>, true>(a, y.options().dtype(at::kFloat), stream);
    } else {
      run_output_gemm<T, kMath, ForwardALoader<T, false>, WeightBLoader<T>, true>(a, y.options().dtype(at::kFloat), stream);
    }
  });
  if (!y.is_same(result)) result.copy_(y);
  return result;
}

// ---------------------------------------------------------------------------------------------
// input gradient
// ---------------------------------------------------------------------------------------------
at::Tensor conv2d_relu_backward_input_cuda(const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& weight,
                                           at::IntArrayRef input_hw, at::IntArrayRef stride, at::IntArrayRef padding) {
  CHECK_4D(grad_out);
  CHECK_4D(out);
  CHECK_4D(weight);
  CHECK_CUDA(grad_out);
  CHECK_SAME_DEVICE(grad_out, out);
  CHECK_SAME_DEVICE(grad_out, weight);
  CHECK_SAME_DTYPE(grad_out, out);
  CHECK_SAME_DTYPE(grad_out, weight);
  CHECK_PAIR(input_hw);
  CHECK_POSITIVE(input_hw[0]);
  CHECK_POSITIVE(input_hw[1]);
  check_conv_params(stride, padding);
  TORCH_CHECK(out.sizes() == grad_out.sizes(), "out must have the shape of grad_out ", grad_out.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(weight.size(0) == grad_out.size(1), "weight must have grad_out's ", grad_out.size(1),
              " output channels in dim 0, got shape ", weight.sizes());
  const int64_t n = grad_out.size(0), k = grad_out.size(1), p = grad_out.size(2), q = grad_out.size(3);
  const int64_t c = weight.size(1), r = weight.size(2), s = weight.size(3);
  const int64_t h = input_hw[0], w = input_hw[1];
  check_kernel_fits(h, w, r, s, padding);
  TORCH_CHECK(conv_output_size(h, r, stride[0], padding[0]) == p && conv_output_size(w, s, stride[1], padding[1]) == q,
              "grad_out must have the output size ", conv_output_size(h, r, stride[0], padding[0]), "x",
              conv_output_size(w, s, stride[1], padding[1]), " of input_hw ", input_hw, " with kernel ", r, "x", s,
              ", got ", p, "x", q);
  c10::cuda::CUDAGuard guard(grad_out.device());

  at::Tensor result = alloc_output({n, c, h, w}, grad_out.options(), output_memory_format(grad_out));
  if (result.numel() == 0) return result;
  at::Tensor gc = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor oc = out.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = nhwc_target(result);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_dtype(grad_out.scalar_type(), "grad_out", [&](auto cfg) {
    using T = typename decltype(cfg)::type;
    constexpr MathKind kMath = decltype(cfg)::kMath;
    constexpr int kChunk = Tile<T>::kChunk;
    // weight as [c][(r, s, k)], rows padded to whole vectors
    at::Tensor wd = pad_rows(weight.permute({1, 2, 3, 0}).reshape({c, r * s * k}), kChunk);
    ConvArgs<T> a{};
    a.shape = make_shape(n, c, h, w, k, r, s, p, q, stride, padding);
    set_tiles(a, n * h * w, c, r * s * k, /*m_fastest=*/false);
    a.grad = ptr<T>(gc);
    a.out = ptr<T>(oc);
    a.weight = ptr<T>(wd);
    a.weight_ld = int(wd.size(1));
    a.y = mutable_ptr<T>(y);
    if (k % kChunk == 0 && aligned16(gc) && aligned16(oc)) {
      run_output_gemm<T, kMath, DgradALoader<T, true>, WeightBLoader<T>, false>(a, y.options().dtype(at::kFloat), stream);
    } else {
      run_output_gemm<T, kMath, DgradALoader<T, false>, WeightBLoader<T>, false>(a, y.options().dtype(at::kFloat), stream);
    }
  });
  if (!y.is_same(result)) result.copy_(y);
  return result;
}

// ---------------------------------------------------------------------------------------------
// weight and bias gradients
// ---------------------------------------------------------------------------------------------

template <typename T, MathKind kMath, bool kVec>
void run_wgrad(ConvArgs<T>& a, const at::Tensor& grad_weight, const at::Tensor& grad_bias, cudaStream_t stream) {
  using A = WgradALoader<T, kVec>;
  using B = WgradBLoader<T, kVec>;
  using E = WgradEpilogue<T>;
  constexpr size_t smem = GemmTraits<T, A, B>::kSmemBytes;
  int64_t slots = 0;
  int blocks_per_sm = 0;
  auto kernel = prepared_kernel<T, kMath, A, B, E>(slots, blocks_per_sm);
  const int64_t tiles = int64_t(a.m_tiles) * a.n_tiles;
  int splits = alexnet_fast::conv_gemm::wgrad_splits(tiles, a.k_tiles, Tile<T>::kBK, blocks_per_sm, slots,
                                                     sm_flops<T, kMath>(), int64_t(a.gemm_m) * a.workspace_ld * 4);
  a.k_tiles_per_split = int(ceil_div(a.k_tiles, splits));
  splits = int(ceil_div(a.k_tiles, a.k_tiles_per_split));  // no empty slices

  // Each split stores (not adds) its [gemm_m, gemm_n] slice, which wgrad_reduce_kernel sums (the
  // padding columns up to workspace_ld are neither written nor read): poisoned in debug runs.
  at::Tensor workspace =
      poison_if_debug(at::empty({splits, a.gemm_m, a.workspace_ld}, grad_weight.options().dtype(at::kFloat)));
  a.workspace = workspace.data_ptr<float>();
  kernel<<<dim3(unsigned(tiles), unsigned(splits)), kThreads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t total = int64_t(a.gemm_m) * a.gemm_n;
  const int threads = 256;
  const int blocks = int(std::min<int64_t>(ceil_div(total, threads), slots * 4));
  alexnet_fast::conv_gemm::wgrad_reduce_kernel<T>
      <<<blocks, threads, 0, stream>>>(a, splits, mutable_ptr<T>(grad_weight), mutable_ptr<T>(grad_bias));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> relu_backward_bias_cuda(const at::Tensor& grad_out, const at::Tensor& out);

std::tuple<at::Tensor, at::Tensor> conv2d_relu_backward_weight_cuda(const at::Tensor& grad_out, const at::Tensor& out,
                                                                    const at::Tensor& x, at::IntArrayRef kernel_hw,
                                                                    at::IntArrayRef stride, at::IntArrayRef padding) {
  CHECK_4D(grad_out);
  CHECK_4D(out);
  CHECK_4D(x);
  CHECK_CUDA(grad_out);
  CHECK_SAME_DEVICE(grad_out, out);
  CHECK_SAME_DEVICE(grad_out, x);
  CHECK_SAME_DTYPE(grad_out, out);
  CHECK_SAME_DTYPE(grad_out, x);
  CHECK_PAIR(kernel_hw);
  CHECK_POSITIVE(kernel_hw[0]);
  CHECK_POSITIVE(kernel_hw[1]);
  check_conv_params(stride, padding);
  TORCH_CHECK(out.sizes() == grad_out.sizes(), "out must have the shape of grad_out ", grad_out.sizes(), ", got ",
              out.sizes());
  TORCH_CHECK(x.size(0) == grad_out.size(0), "x must have grad_out's batch size ", grad_out.size(0), ", got ",
              x.size(0));
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t k = grad_out.size(1), p = grad_out.size(2), q = grad_out.size(3);
  const int64_t r = kernel_hw[0], s = kernel_hw[1];
  check_kernel_fits(h, w, r, s, padding);
  TORCH_CHECK(conv_output_size(h, r, stride[0], padding[0]) == p && conv_output_size(w, s, stride[1], padding[1]) == q,
              "grad_out must have the output size ", conv_output_size(h, r, stride[0], padding[0]), "x",
              conv_output_size(w, s, stride[1], padding[1]), " of x's ", h, "x", w, " with kernel ", r, "x", s,
              ", got ", p, "x", q);
  c10::cuda::CUDAGuard guard(grad_out.device());

  at::Tensor grad_weight = poison_if_debug(at::empty({k, c, r, s}, grad_out.options()));
  at::Tensor grad_bias = poison_if_debug(at::empty({k}, grad_out.options()));
  if (k == 0) return {grad_weight, grad_bias};
  if (n * p * q == 0) {
    grad_weight.zero_();
    grad_bias.zero_();
    return {grad_weight, grad_bias};
  }
  at::Tensor gc = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor oc = out.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor xc = x.contiguous(at::MemoryFormat::ChannelsLast);
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  dispatch_dtype(grad_out.scalar_type(), "grad_out", [&](auto cfg) {
    using T = typename decltype(cfg)::type;
    constexpr MathKind kMath = decltype(cfg)::kMath;
    constexpr int kChunk = Tile<T>::kChunk;
    ConvArgs<T> a{};
    a.shape = make_shape(n, c, h, w, k, r, s, p, q, stride, padding);
    // Columns (r, s, c) of the weight gradient, then the bias column.
    set_tiles(a, k, r * s * c + 1, n * p * q, /*m_fastest=*/true);
    a.x = ptr<T>(xc);
    a.grad = ptr<T>(gc);
    a.out = ptr<T>(oc);
    a.workspace_ld = int(round_up(a.gemm_n, 4));
    if (k % kChunk == 0 && c % kChunk == 0 && aligned16(gc) && aligned16(oc) && aligned16(xc)) {
      run_wgrad<T, kMath, true>(a, grad_weight, grad_bias, stream);
    } else {
      run_wgrad<T, kMath, false>(a, grad_weight, grad_bias, stream);
    }
  });
  // Under TF32 the GEMM's bias column sums TF32-rounded gradients. PyTorch's bias gradient is a
  // float32 sum, and where the gradients cancel (a sum near zero) the rounding does not: one
  // test case's bias gradient was 7.7e-3 off normwise. So the mask pass's float32 sums replace it.
  if (grad_out.scalar_type() == at::kFloat && allow_tf32()) {
    grad_bias.copy_(std::get<1>(relu_backward_bias_cuda(gc, oc)));
  }
  return {grad_weight, grad_bias};
}

// ---------------------------------------------------------------------------------------------
// through cuDNN
// ---------------------------------------------------------------------------------------------
// The forward is cuDNN's fused conv+bias+ReLU (one kernel, where F.relu(F.conv2d(...)) runs the
// convolution, a bias add and a ReLU). The backward masks grad_out with the output and sums it per
// channel (the bias gradient) in one pass, then gives the masked gradient to cuDNN's input and
// weight gradients. Operands are taken in x's layout, so the outputs (and the weight gradient) are
// in it too, as the fake kernels say.
at::Tensor conv2d_relu_cudnn(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                             at::IntArrayRef stride, at::IntArrayRef padding) {
  check_forward_args(x, weight, bias, stride, padding);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_memory_format(x);
  return at::cudnn_convolution_relu(x.contiguous(fmt), weight.contiguous(fmt), bias, stride, padding, {1, 1}, 1);
}

constexpr int kMaskThreads = 256;

// channels_last rows of C = groups * VEC channels. Block b takes rows [b * rows_per_block, ...);
// its threads hold (row slot, channel vector) pairs, kMaskThreads / groups row slots, and add up
// their channels in float; the slots' sums meet in shared memory and the block writes its C sums
// to partial[b]. The masked gradient is written as it goes. Without atomics: deterministic.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaskThreads)
    relu_mask_bias_grad_kernel(const T* __restrict__ grad, const T* __restrict__ out, T* __restrict__ masked,
                               float* __restrict__ partial, int64_t rows, int groups, int64_t rows_per_block) {
  __shared__ float sums[kMaskThreads * VEC];
  const int slots = kMaskThreads / groups, slot = threadIdx.x / groups, g = threadIdx.x - slot * groups;
  const int C = groups * VEC;
  float acc[VEC];
  alexnet_fast::gpu::fill_zero(acc);
  const int64_t r0 = blockIdx.x * rows_per_block, r1 = std::min(rows, r0 + rows_per_block);
  if (slot < slots) {
#pragma unroll 4
    for (int64_t r = r0 + slot; r < r1; r += slots) {
      const int64_t e = r * C + g * VEC;
      float gv[VEC], ov[VEC];
      alexnet_fast::gpu::load_as<VEC>(grad + e, gv);
      alexnet_fast::gpu::load_as<VEC>(out + e, ov);
#pragma unroll
      for (int v = 0; v < VEC; ++v) {
        gv[v] = ov[v] <= 0.f ? 0.f : gv[v];  // threshold_backward's rule: a NaN output passes its gradient
        acc[v] += gv[v];
      }
      alexnet_fast::gpu::store_as<VEC>(masked + e, gv);
    }
#pragma unroll
    for (int v = 0; v < VEC; ++v) sums[slot * C + g * VEC + v] = acc[v];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < C; c += kMaskThreads) {
    float total = 0.f;
    for (int k = 0; k < slots; ++k) total += sums[k * C + c];
    partial[blockIdx.x * C + c] = total;
  }
}

// (masked grad_out, bias gradient) in one pass, where the layout allows (channels_last, whole
// 16-byte vectors, at most kMaskThreads vectors per pixel); {} otherwise.
std::optional<std::tuple<at::Tensor, at::Tensor>> relu_mask_bias_grad(const at::Tensor& grad, const at::Tensor& out) {
  if (output_memory_format(grad) != at::MemoryFormat::ChannelsLast || grad.scalar_type() == at::kDouble ||
      grad.numel() == 0) {
    return std::nullopt;
  }
  const int64_t C = grad.size(1), rows = grad.numel() / C;
  const int vec = int(16 / grad.element_size());
  if (C % vec != 0 || C / vec > kMaskThreads || !aligned16(grad) || !aligned16(out)) return std::nullopt;
  at::Tensor masked = poison_if_debug(at::empty_like(grad, at::MemoryFormat::ChannelsLast));
  const int groups = int(C / vec), slots = kMaskThreads / groups;
  const int64_t blocks = std::min<int64_t>(ceil_div(rows, slots), int64_t(alexnet_fast::gpu::sm_count()) * 8);
  const int64_t rows_per_block = ceil_div(rows, blocks);
  at::Tensor partial = poison_if_debug(at::empty({blocks, C}, grad.options().dtype(at::kFloat)));
  at::Tensor bias_grad = poison_if_debug(at::empty({C}, grad.options()));
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "relu_mask_bias_grad", [&] {
    if constexpr (!std::is_same_v<scalar_t, double>) {
      constexpr int kVec = 16 / sizeof(scalar_t);
      relu_mask_bias_grad_kernel<scalar_t, kVec><<<unsigned(blocks), kMaskThreads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(), masked.mutable_data_ptr<scalar_t>(),
          partial.mutable_data_ptr<float>(), rows, groups, rows_per_block);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      alexnet_fast::gpu::launch_bias_grad_sum<scalar_t>(partial, bias_grad, stream);
    }
  });
  return std::make_tuple(masked, bias_grad);
}

std::tuple<at::Tensor, at::Tensor> relu_backward_bias_cuda(const at::Tensor& grad_out, const at::Tensor& out) {
  check_relu_backward_bias(grad_out, out);
  CHECK_DEVICE_TYPE(grad_out, at::kCUDA);
  c10::cuda::CUDAGuard guard(grad_out.device());
  const auto fmt = output_memory_format(out);
  const at::Tensor g = grad_out.contiguous(fmt), o = out.contiguous(fmt);
  if (auto fused = relu_mask_bias_grad(g, o)) return *fused;
  return relu_backward_bias_unfused(g, o);
}

// (grad_x, grad_weight, grad_bias); an output not asked for by output_mask is an empty tensor.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_cudnn_backward(
    const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& x, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, std::array<bool, 3> output_mask) {
  check_forward_args(x, weight, std::nullopt, stride, padding);
  CHECK_4D(grad_out);
  CHECK_SAME_DEVICE(x, grad_out);
  CHECK_SAME_DEVICE(x, out);
  CHECK_SAME_DTYPE(x, grad_out);
  CHECK_SAME_DTYPE(x, out);
  const int64_t p = conv_output_size(x.size(2), weight.size(2), stride[0], padding[0]);
  const int64_t q = conv_output_size(x.size(3), weight.size(3), stride[1], padding[1]);
  CHECK_SHAPE(grad_out, x.size(0), weight.size(0), p, q);
  CHECK_SHAPE(out, x.size(0), weight.size(0), p, q);
  c10::cuda::CUDAGuard guard(x.device());
  const auto fmt = output_memory_format(x);
  const auto [masked, gb] = relu_backward_bias_cuda(grad_out.contiguous(fmt), out.contiguous(fmt));
  auto [gx, gw, unused] = at::convolution_backward(masked, x.contiguous(fmt), weight.contiguous(fmt), std::nullopt,
                                                   stride, padding, {1, 1}, false, {0, 0}, 1,
                                                   {output_mask[0], output_mask[1], false});
  const auto given = [&](const at::Tensor& t, bool wanted) {
    return wanted && t.defined() ? t : at::empty({0}, x.options());
  };
  return {given(gx, output_mask[0]), given(gw, output_mask[1]), given(gb, output_mask[2])};
}

}  // namespace

TORCH_LIBRARY_IMPL(alexnet_fast, CUDA, m) {
  m.impl("conv2d_relu", &conv2d_relu_cuda);
  m.impl("conv2d_relu_backward_input", &conv2d_relu_backward_input_cuda);
  m.impl("conv2d_relu_backward_weight", &conv2d_relu_backward_weight_cuda);
  m.impl("conv2d_relu_cudnn", &conv2d_relu_cudnn);
  m.impl("conv2d_relu_cudnn_backward", &conv2d_relu_cudnn_backward);
  m.impl("relu_backward_bias", &relu_backward_bias_cuda);
}
