"""The roofline of every benchmarked op: minimum bytes and FLOPs per op and mode, the ceilings
they are compared against, and the achieved fractions.

Minimum bytes count each input read once and each output written once, at the element size of
the benchmark dtype (4 for fp32/TF32, 2 for bf16/fp16); ``INDEX_BYTES`` per pooled element for
the window offsets a training forward keeps for its backward. "fwd" is the inference forward,
"bwd" the backward alone (reading what the training forward saved), "fwd+bwd" the training
forward plus the backward. The table, with x the op input, y its output, g = dL/dy:

=================  =================================  =============================================
op                 fwd bytes / FLOPs                   bwd bytes / FLOPs
=================  =================================  =============================================
conv2d_relu        x + w + b + y  /  GEMM              g + y (ReLU mask) + x + gw + gb, and w + gx
                                                       when x needs a gradient  /  GEMM each for
                                                       wgrad and (when x needs one) dgrad
lrn                x + y  /  LRN_FLOPS * |x|           g + x + gx  /  LRN_BACKWARD_FLOPS * |x|
max_pool2d         x + y (+ idx when training)         g + idx + gx  /  |y|
                   /  (kh*kw - 1) * |y|
lrn_max_pool2d     x + y (+ idx)  /  lrn + max_pool    g + idx + x + gx  /  lrn bwd + |y|
=================  =================================  =============================================

GEMM = 2 * N * C_out * H_out * W_out * C_in * kh * kw (one pass). Bias and ReLU FLOPs are left
out; so are the "training forward" saves of conv2d_relu (its output is the saved tensor) and of
lrn (x, which its producer holds anyway).

Ceilings: the memory roof is a large device-to-device copy (read + write bytes per second); the
compute roof of a convolution is the dense matrix product of its dtype (fp16 uses the bf16 one,
same tensor-core rate), and of LRN/pooling the fp32 product (their math runs in fp32 on the
vector units).
"""
from __future__ import annotations

from dataclasses import dataclass

from alexnet_fast.reference import conv_output_size, pool_output_size

DTYPE_BYTES = {"fp32": 4, "tf32": 4, "bf16": 2, "fp16": 2}
INDEX_BYTES = 1  # uint8 window offsets (alexnet_fast.reference.max_pool2d_indices)
MODES = ("fwd", "bwd", "fwd+bwd")
# LRN per element: window sum of squares (size multiply-adds), scale and shift, pow, divide.
LRN_FLOPS_PER_SIZE, LRN_FLOPS_EXTRA = 2, 3
# LRN backward recomputes the forward's window sum and adds a second window sum.
LRN_BACKWARD_FLOPS_PER_SIZE, LRN_BACKWARD_FLOPS_EXTRA = 4, 6


@dataclass(frozen=True)
class Work:
    bytes: int
    flops: int

    def __add__(self, other: "Work") -> "Work":
        return Work(self.bytes + other.bytes, self.flops + other.flops)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def conv_out_hw(h: int, w: int, kernel: int, stride: int, padding: int) -> tuple[int, int]:
    return conv_output_size(h, kernel, stride, padding), conv_output_size(w, kernel, stride, padding)


def pool_out_hw(h: int, w: int, kernel: int, stride: int) -> tuple[int, int]:
    return pool_output_size(h, kernel, stride, 0, False), pool_output_size(w, kernel, stride, 0, False)


def conv_work(shape, c_out: int, kernel: int, stride: int, padding: int, dtype: str,
              input_grad: bool = True) -> dict[str, Work]:
    """Work of conv2d_relu per mode for input ``shape`` (N, C_in, H, W)."""
    n, c_in, h, w = shape
    ho, wo = conv_out_hw(h, w, kernel, stride, padding)
    e = DTYPE_BYTES[dtype]
    x, wt, b, y = _numel(shape), c_out * c_in * kernel * kernel, c_out, n * c_out * ho * wo
    gemm = 2 * n * c_out * ho * wo * c_in * kernel * kernel
    fwd = Work(e * (x + wt + b + y), gemm)
    bwd = Work(e * (2 * y + x + wt + b + (wt + x if input_grad else 0)), gemm * (2 if input_grad else 1))
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def lrn_work(shape, size: int, dtype: str) -> dict[str, Work]:
    x = _numel(shape)
    e = DTYPE_BYTES[dtype]
    fwd = Work(2 * e * x, (LRN_FLOPS_PER_SIZE * size + LRN_FLOPS_EXTRA) * x)
    bwd = Work(3 * e * x, (LRN_BACKWARD_FLOPS_PER_SIZE * size + LRN_BACKWARD_FLOPS_EXTRA) * x)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def max_pool_work(shape, kernel: int, stride: int, dtype: str) -> dict[str, Work]:
    n, c, h, w = shape
    ho, wo = pool_out_hw(h, w, kernel, stride)
    x, y = _numel(shape), n * c * ho * wo
    e = DTYPE_BYTES[dtype]
    fwd = Work(e * (x + y), (kernel * kernel - 1) * y)
    bwd = Work(e * (y + x) + INDEX_BYTES * y, y)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": Work(fwd.bytes + INDEX_BYTES * y, fwd.flops) + bwd}


def lrn_max_pool_work(shape, size: int, kernel: int, stride: int, dtype: str) -> dict[str, Work]:
    """The fused op: the LRN output never reaches memory; backward reads x to recompute it."""
    n, c, h, w = shape
    ho, wo = pool_out_hw(h, w, kernel, stride)
    x, y = _numel(shape), n * c * ho * wo
    e = DTYPE_BYTES[dtype]
    lrn, pool = lrn_work(shape, size, dtype), max_pool_work(shape, kernel, stride, dtype)
    fwd = Work(e * (x + y), lrn["fwd"].flops + pool["fwd"].flops)
    bwd = Work(e * (y + 2 * x) + INDEX_BYTES * y, lrn["bwd"].flops + pool["bwd"].flops)
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": Work(fwd.bytes + INDEX_BYTES * y, fwd.flops) + bwd}


def compute_ceiling_dtype(op: str, dtype: str) -> str:
    """Which measured matrix-product ceiling bounds ``op`` in ``dtype``."""
    if op != "conv2d_relu":
        return "fp32"
    return {"fp16": "bf16"}.get(dtype, dtype)


def roofline(work: Work, ms: float, copy_gbps: float, peak_tflops: float) -> dict:
    """Achieved rates and fractions of the ceilings for ``work`` done in ``ms`` milliseconds.

    ``floor_ms`` is the roofline time max(bytes / bandwidth, FLOPs / peak); ``frac_roofline`` =
    floor_ms / ms, 1.0 meaning the op runs at the roofline.
    """
    if ms <= 0:
        raise ValueError(f"ms must be positive, got {ms}")
    if copy_gbps <= 0 or peak_tflops <= 0:
        raise ValueError(f"ceilings must be positive, got copy_gbps={copy_gbps}, peak_tflops={peak_tflops}")
    seconds = ms * 1e-3
    gbps = work.bytes / seconds / 1e9
    tflops = work.flops / seconds / 1e12
    floor_ms = max(work.bytes / (copy_gbps * 1e9), work.flops / (peak_tflops * 1e12)) * 1e3
    return {
        "gbps": gbps,
        "tflops": tflops,
        "frac_bw": gbps / copy_gbps,
        "frac_compute": tflops / peak_tflops,
        "floor_ms": floor_ms,
        "frac_roofline": floor_ms / ms,
    }
