"""A Linear layer's weight gradient with the SGD step in the product's epilogue.

The weight gradient of ``y = x @ W.T`` is ``grad_out.T @ x``, a product whose reduction runs over
the batch (K = 128 for AlexNet). For fc6 and fc7, 54.5 M of the model's 58 M parameters, that
product writes the gradient (4 bytes per parameter) and the optimizer's step then reads it
back with the parameter and momentum buffer and writes both (20 bytes). Here each program
computes a tile of the gradient in registers and steps the same tile of the parameter and buffer
at once (16 bytes per parameter, 18 with the autocast copy): the gradient never reaches memory.

The step is ``torch.optim.SGD``'s rule, in the order of ``csrc/sgd.h``'s ``sgd_element``, evaluated
in float32 (the hyper-parameters arrive as floats; the unfused step computes in double and
rounds, which can differ by a few units in the last place per step).

Operands: 16-bit ones are read as they lie (Hopper's 16-bit tensor-core instructions take either
operand order from shared memory). TF32 ones must be K-major there, and ``grad_out`` and ``x``
are batch-major, so they are transposed first (2 and 4.7 MB for fc6, against 151 MB of
parameter and buffer). H200 measurements of the tile shapes are in BENCHMARKS.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from alexnet_fast.backends import triton_interpreted
from alexnet_fast.triton._common import mma

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by operand width: of ten tile shapes timed on
# the H200 (BENCHMARKS.md), the fastest for fc6, and within 3% of the fastest for fc7. Small
# tiles keep the accumulator and the parameter and buffer tiles in registers; the operands come
# from L2.
_CONFIGS = {4: (32, 64, 64, 4, 2), 2: (64, 64, 64, 4, 3)}
_TRANSPOSE_BLOCK = 64


@triton.jit
def _transpose_kernel(src_ptr, dst_ptr, R, C, BLOCK: tl.constexpr):
    """dst (C, R) = src (R, C) transposed, both contiguous."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = (rows < R)[:, None] & (cols < C)[None, :]
    tile = tl.load(src_ptr + rows[:, None].to(tl.int64) * C + cols[None, :], mask=inside)
    tl.store(dst_ptr + cols[None, :].to(tl.int64) * R + rows[:, None], tile, mask=inside)


@triton.jit
def _weight_grad_sgd_kernel(
    a_ptr, b_ptr, p_ptr, buf_ptr, copy_ptr, M, N, K,
    stride_am, stride_ak, stride_bn, stride_bk,
    lr, weight_decay, momentum, dampening,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, HAS_WEIGHT_DECAY: tl.constexpr, HAS_BUFFER: tl.constexpr, FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr, HAS_COPY: tl.constexpr,
):
    """Tile (pm, pn) of g = A @ B.T (A: M x K, B: N x K, any strides), then the SGD step of
    p[M, N] (contiguous float32) with it, the momentum buffer and the copy alike."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    rm = (pid // tiles_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % tiles_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    inside = m_ok[:, None] & n_ok[None, :]
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    # the parameter tile's loads go out before the product, so their latency overlaps it; the
    # streams are touched once, so they are first out of L2, which keeps the operands there
    p = tl.load(p_ptr + offs, mask=inside, eviction_policy="evict_first")
    if HAS_BUFFER and not FIRST_STEP:
        buf = tl.load(buf_ptr + offs, mask=inside, eviction_policy="evict_first")
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k in range(0, K, BLOCK_K):
        kk = k + rk
        a = tl.load(a_ptr + rm[:, None] * stride_am + kk[None, :] * stride_ak,
                    mask=m_ok[:, None] & (kk < K)[None, :], other=0.0)
        b = tl.load(b_ptr + rn[None, :] * stride_bn + kk[:, None] * stride_bk,
                    mask=n_ok[None, :] & (kk < K)[:, None], other=0.0)
        acc = mma(a, b, acc, PRECISION, UPCAST)
    g = acc
    if MAXIMIZE:
        g = -g
    if HAS_WEIGHT_DECAY:
        g = g + weight_decay * p
    if HAS_BUFFER:
        if FIRST_STEP:
            buf = g
        else:
            buf = momentum * buf + (1 - dampening) * g
        tl.store(buf_ptr + offs, buf, mask=inside, eviction_policy="evict_first")
        if NESTEROV:
            g = g + momentum * buf
        else:
            g = buf
    p = p - lr * g
    tl.store(p_ptr + offs, p, mask=inside, eviction_policy="evict_first")
    if HAS_COPY:
        tl.store(copy_ptr + offs, p.to(copy_ptr.dtype.element_ty), mask=inside, eviction_policy="evict_first")


def _k_major(t: Tensor) -> Tensor:
    """(K, R) -> (R, K) contiguous, in one tiled pass. PyTorch's strided copy took 19 and 14 µs for
    fc6's and fc7's two operands on the H200 (BENCHMARKS.md); this pass was not timed alone."""
    t = t.contiguous()
    rows, cols = t.shape
    out = t.new_empty((cols, rows))
    grid = (triton.cdiv(rows, _TRANSPOSE_BLOCK), triton.cdiv(cols, _TRANSPOSE_BLOCK))
    _transpose_kernel[grid](t, out, rows, cols, BLOCK=_TRANSPOSE_BLOCK)
    return out


def _check(grad_out, x, param, momentum_buffer, copy, momentum: float) -> None:
    for name, t in (("grad_out", grad_out), ("x", x), ("param", param)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            got = f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a 2-D tensor, got {got}")
    if grad_out.dtype != x.dtype or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"grad_out and x must share a dtype among float32, bfloat16 and float16, "
                        f"got {grad_out.dtype} and {x.dtype}")
    if grad_out.shape[0] != x.shape[0] or param.shape != (grad_out.shape[1], x.shape[1]):
        raise ValueError(f"param must have shape (grad_out.shape[1], x.shape[1]) and grad_out and x one row "
                         f"per sample, got grad_out {tuple(grad_out.shape)}, x {tuple(x.shape)}, "
                         f"param {tuple(param.shape)}")
    if param.dtype != torch.float32 or not param.is_contiguous():
        raise ValueError(f"param must be a contiguous float32 tensor, got {param.dtype}"
                         f"{'' if param.is_contiguous() else ', not contiguous'}")
    if (momentum_buffer is None) != (momentum == 0):
        raise ValueError(f"momentum_buffer must be given exactly when momentum is nonzero (momentum {momentum})")
    for name, t, dtypes in (("momentum_buffer", momentum_buffer, (torch.float32,)),
                            ("copy", copy, (torch.bfloat16, torch.float16))):
        if t is not None and (t.shape != param.shape or not t.is_contiguous() or t.dtype not in dtypes):
            raise ValueError(f"{name} must be a contiguous {' or '.join(map(str, dtypes))} tensor of param's "
                             f"shape {tuple(param.shape)}, got {t.dtype} {tuple(t.shape)}")
    for name, t in (("x", x), ("param", param), ("momentum_buffer", momentum_buffer), ("copy", copy)):
        if t is not None and t.device != grad_out.device:
            raise ValueError(f"{name} must be on grad_out's device {grad_out.device}, got {t.device}")


def linear_weight_grad_sgd_(grad_out: Tensor, x: Tensor, param: Tensor, momentum_buffer: Tensor | None,
                            copy: Tensor | None, *, lr: float, weight_decay: float, momentum: float,
                            dampening: float, nesterov: bool, maximize: bool, first_step: bool) -> None:
    """One ``torch.optim.SGD`` step of ``param`` (out_features x in_features, float32) with the
    gradient ``grad_out.T @ x`` (rows: samples; float32 operands multiply in TF32), in place on
    ``param``, ``momentum_buffer`` (None without momentum; only written on the first step) and
    ``copy`` (the parameter's bfloat16/float16 copy, or None)."""
    _check(grad_out, x, param, momentum_buffer, copy, momentum)
    if param.numel() == 0:
        return
    (rows, cols), depth = param.shape, grad_out.shape[0]
    if depth == 0:  # no samples, a zero gradient: the kernel's loop runs no step over these
        a, b, precision = grad_out.new_zeros((rows, 1)), x.new_zeros((cols, 1)), "ieee"
    elif grad_out.dtype == torch.float32:
        a, b, precision = _k_major(grad_out), _k_major(x), "tf32"
    else:
        a, b, precision = grad_out.t(), x.t(), "ieee"  # 16-bit operands ignore the precision
    block_m, block_n, block_k, warps, stages = _CONFIGS[grad_out.element_size()]
    grid = (triton.cdiv(rows, block_m) * triton.cdiv(cols, block_n),)
    _weight_grad_sgd_kernel[grid](
        a, b, param, momentum_buffer if momentum_buffer is not None else param,
        copy if copy is not None else param, rows, cols, depth,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        float(lr), float(weight_decay), float(momentum), float(dampening),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=precision,
        UPCAST=triton_interpreted() and grad_out.dtype == torch.bfloat16,
        HAS_WEIGHT_DECAY=weight_decay != 0, HAS_BUFFER=momentum_buffer is not None,
        FIRST_STEP=bool(first_step), NESTEROV=bool(nesterov), MAXIMIZE=bool(maximize), HAS_COPY=copy is not None,
        num_warps=warps, num_stages=stages)
