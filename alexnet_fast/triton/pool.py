"""Overlapping max-pool in Triton, forward and backward.

Forward: a program owns a ``[BLOCK_C, BLOCK_Q]`` tile of outputs (channels x flattened output
pixels) and scans each window in row-major order, replacing the running maximum when an element
is greater or NaN (ties go to the first maximum, the last NaN wins, padding never wins). It
writes the maximum and its window-local offset ``kh * KW + kw`` as uint8.

Backward is a gather, without atomics: the input is cut into ``SH x SW`` cells, cell ``(cy, cx)``
holding the padded rows ``cy*SH .. cy*SH + SH - 1`` (columns alike). The pixel at ``(a, b)`` in its
cell lies in window ``(cy - t, cx - u)`` at offset ``(a + t*SH, b + u*SW)`` for every ``t, u`` with
that offset inside the kernel, so each pixel checks exactly the windows that cover it (2.25 per
pixel for 3x3/2) and each window is read once per cell.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

import alexnet_fast.autograd
from alexnet_fast.ops import output_memory_format, pool_out_shape
from alexnet_fast.triton._common import (autotune_by_layout, channels_last_variant, check_input,
                                         check_pool_args, define_op, launch, nothing_to_run,
                                         poison_if_debug)

_INT32_MAX = 2**31 - 1


def needs_wide_offsets(*tensors: Tensor) -> bool:
    """Whether offsets within one image need 64 bits (offsets across images always have them);
    the margin covers masked lanes that compute offsets past the image's end."""
    return any(t.shape[0] and t.numel() // t.shape[0] > _INT32_MAX // 2 for t in tensors)


@triton.jit
def _program_tile(C, Q, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr):
    """(image, channels, flattened pixels) of this program; channel blocks vary fastest."""
    pid = tl.program_id(0)
    num_cb = tl.cdiv(C, BLOCK_C)
    num_qb = tl.cdiv(Q, BLOCK_Q)
    rest = pid // num_cb
    c = (pid % num_cb) * BLOCK_C + tl.arange(0, BLOCK_C)
    q = (rest % num_qb) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    return rest // num_qb, c, q


@triton.jit
def _max_pool_forward_kernel(x_ptr, out_ptr, idx_ptr, C, H, W, OH, OW,
                             x_sn, x_sc, x_sh, x_sw, o_sn, o_sc, o_sh, o_sw,
                             KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                             PH: tl.constexpr, PW: tl.constexpr, BOUNDS: tl.constexpr, WIDE: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr):
    n, c, q = _program_tile(C, OH * OW, BLOCK_C, BLOCK_Q)
    if WIDE:
        c = c.to(tl.int64)
        q = q.to(tl.int64)
    mask = (c < C)[:, None] & (q < OH * OW)[None, :]
    oh = q // OW
    ow = q % OW
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    # Compare in float32 (float64 for float64): exact for every input dtype, and the interpreter
    # compares bfloat16 values by their bits.
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    x = x_ptr + n.to(tl.int64) * x_sn + (c * x_sc)[:, None]
    # Start from the first element inside the input (the top-left one unless padding is involved),
    # so a window of -inf still reports an element of the input.
    if BOUNDS:
        kh0 = tl.maximum(-ih0, 0)
        kw0 = tl.maximum(-iw0, 0)
        best = tl.load(x + ((ih0 + kh0) * x_sh + (iw0 + kw0) * x_sw)[None, :], mask=mask, other=0).to(ACC)
        best_k = tl.broadcast_to((kh0 * KW + kw0)[None, :], (BLOCK_C, BLOCK_Q)).to(tl.int32)
    else:
        best = tl.load(x + (ih0 * x_sh + iw0 * x_sw)[None, :], mask=mask, other=0).to(ACC)
        best_k = tl.zeros((BLOCK_C, BLOCK_Q), tl.int32)
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            if BOUNDS or kh + kw > 0:
                ih = ih0 + kh
                iw = iw0 + kw
                m = mask
                if BOUNDS:
                    m = m & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[None, :]
                v = tl.load(x + (ih * x_sh + iw * x_sw)[None, :], mask=m, other=0).to(ACC)
                take = m & ((v > best) | (v != v))
                best = tl.where(take, v, best)
                best_k = tl.where(take, kh * KW + kw, best_k)
    o = n.to(tl.int64) * o_sn + (c * o_sc)[:, None] + (oh * o_sh + ow * o_sw)[None, :]
    tl.store(out_ptr + o, best.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(idx_ptr + o, best_k.to(tl.uint8), mask=mask)


@triton.jit
def _max_pool_backward_kernel(g_ptr, idx_ptr, dx_ptr, C, H, W, OH, OW, NCY, NCX,
                              g_sn, g_sc, g_sh, g_sw, i_sn, i_sc, i_sh, i_sw, d_sn, d_sc, d_sh, d_sw,
                              KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                              PH: tl.constexpr, PW: tl.constexpr, WIDE: tl.constexpr,
                              BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr):
    TM: tl.constexpr = (KH + SH - 1) // SH
    UM: tl.constexpr = (KW + SW - 1) // SW
    n, c, q = _program_tile(C, NCY * NCX, BLOCK_C, BLOCK_Q)
    if WIDE:
        c = c.to(tl.int64)
        q = q.to(tl.int64)
    cmask = (c < C)[:, None]
    qmask = q < NCY * NCX
    cy = q // NCX
    cx = q % NCX
    ACC: tl.constexpr = tl.float64 if g_ptr.dtype.element_ty == tl.float64 else tl.float32
    g = g_ptr + n.to(tl.int64) * g_sn + (c * g_sc)[:, None]
    ix = idx_ptr + n.to(tl.int64) * i_sn + (c * i_sc)[:, None]
    ks = ()
    gs = ()
    for t in tl.static_range(TM):
        for u in tl.static_range(UM):
            oh = cy - t
            ow = cx - u
            m = cmask & (qmask & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW))[None, :]
            ks = ks + (tl.load(ix + (oh * i_sh + ow * i_sw)[None, :], mask=m, other=0).to(tl.int32),)
            gs = gs + (tl.load(g + (oh * g_sh + ow * g_sw)[None, :], mask=m, other=0).to(ACC),)
    dx = dx_ptr + n.to(tl.int64) * d_sn + (c * d_sc)[:, None]
    for a in tl.static_range(SH):
        for b in tl.static_range(SW):
            acc = tl.zeros((BLOCK_C, BLOCK_Q), ACC)
            for t in tl.static_range(TM):
                for u in tl.static_range(UM):
                    # The pixel's offset (a + t*SH, b + u*SW) in the window t rows and u columns of
                    # windows up-left, if that window covers it.
                    if a + t * SH < KH:
                        if b + u * SW < KW:
                            hit = ks[t * UM + u] == (a + t * SH) * KW + b + u * SW
                            acc += tl.where(hit, gs[t * UM + u], 0)
            ih = cy * SH + a - PH
            iw = cx * SW + b - PW
            m = cmask & (qmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))[None, :]
            tl.store(dx + (ih * d_sh + iw * d_sw)[None, :], acc.to(dx_ptr.dtype.element_ty), mask=m)


_P = triton.Config
_POOL_FORWARD = autotune_by_layout(
    _max_pool_forward_kernel, ["C", "H", "W", "KH", "KW", "SH", "SW"],
    pixel_configs=[_P({"BLOCK_C": bc, "BLOCK_Q": bq}, num_warps=w)
                   for bc, bq, w in ((1, 256, 2), (1, 512, 4), (2, 256, 4), (2, 512, 4), (4, 256, 4),
                                     (4, 512, 8))],
    channel_configs=[_P({"BLOCK_C": bc, "BLOCK_Q": bq}, num_warps=w)
                     for bc, bq, w in ((32, 16, 2), (64, 8, 2), (64, 16, 4), (128, 8, 4), (128, 16, 8),
                                       (32, 32, 4))],
    interpreter_configs=(_P({"BLOCK_C": 2, "BLOCK_Q": 32}), _P({"BLOCK_C": 8, "BLOCK_Q": 8})),
)
_POOL_BACKWARD = autotune_by_layout(
    _max_pool_backward_kernel, ["C", "H", "W", "KH", "KW", "SH", "SW"],
    pixel_configs=[_P({"BLOCK_C": bc, "BLOCK_Q": bq}, num_warps=w)
                   for bc, bq, w in ((1, 256, 2), (1, 512, 4), (2, 256, 4), (4, 128, 4), (4, 256, 8))],
    channel_configs=[_P({"BLOCK_C": bc, "BLOCK_Q": bq}, num_warps=w)
                     for bc, bq, w in ((32, 16, 2), (64, 8, 2), (64, 16, 4), (128, 8, 4), (128, 16, 8))],
    interpreter_configs=(_P({"BLOCK_C": 2, "BLOCK_Q": 32}), _P({"BLOCK_C": 8, "BLOCK_Q": 8})),
)


def _grid(n: int, c: int, q: int):
    return lambda meta: (triton.cdiv(c, meta["BLOCK_C"]) * triton.cdiv(q, meta["BLOCK_Q"]) * n,)


def pool_outputs(x: Tensor, kernel_size, stride, padding, ceil_mode) -> tuple[Tensor, Tensor]:
    """Empty (output, uint8 offsets) in the shape and layout the fake kernels give."""
    fmt = output_memory_format(x)
    shape = pool_out_shape(x, kernel_size, stride, padding, ceil_mode)
    if min(shape[-2:]) < 1:
        raise ValueError(f"kernel_size {list(kernel_size)} is larger than the input {tuple(x.shape[-2:])} "
                         f"with padding {list(padding)}: the output would be empty")
    return (torch.empty(shape, dtype=x.dtype, device=x.device).contiguous(memory_format=fmt),
            torch.empty(shape, dtype=torch.uint8, device=x.device).contiguous(memory_format=fmt))


@define_op("alexnet_fast_triton::max_pool2d",
           "(Tensor x, int[2] kernel_size, int[2] stride, int[2] padding, bool ceil_mode) "
           "-> (Tensor, Tensor)")
def max_pool2d(x: Tensor, kernel_size: list[int], stride: list[int], padding: list[int],
               ceil_mode: bool) -> tuple[Tensor, Tensor]:
    check_input(x, "x")
    check_pool_args(kernel_size, stride, padding)
    out, idx = pool_outputs(x, kernel_size, stride, padding, ceil_mode)
    if nothing_to_run(out):
        return out, idx
    out, idx = poison_if_debug(out), poison_if_debug(idx)
    n, c, h, w = x.shape
    oh, ow = out.shape[-2:]
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    # Without padding, and with every window of a ceil_mode output inside the input, no element
    # of a window needs a bounds check.
    bounds = ph > 0 or pw > 0 or (oh - 1) * sh + kh > h or (ow - 1) * sw + kw > w
    launch(_POOL_FORWARD[channels_last_variant(x)], _grid(n, c, oh * ow), x, out, idx, c, h, w, oh, ow,
           *x.stride(), *out.stride(), KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, BOUNDS=bounds,
           WIDE=needs_wide_offsets(x, out))
    return out, idx


@define_op("alexnet_fast_triton::max_pool2d_backward",
           "(Tensor grad_out, Tensor indices, int[2] input_hw, int[2] kernel_size, int[2] stride, "
           "int[2] padding) -> Tensor")
def max_pool2d_backward(grad_out: Tensor, indices: Tensor, input_hw: list[int], kernel_size: list[int],
                        stride: list[int], padding: list[int]) -> Tensor:
    check_input(grad_out, "grad_out")
    check_input(indices, "indices", like=grad_out, shape=grad_out.shape, dtype=torch.uint8)
    check_pool_args(kernel_size, stride, padding)
    if len(input_hw) != 2 or min(input_hw) < 1:
        raise ValueError(f"input_hw must be 2 positive ints, got {list(input_hw)}")
    n, c, oh, ow = grad_out.shape
    h, w = input_hw
    dx = torch.empty((n, c, h, w), dtype=grad_out.dtype, device=grad_out.device).contiguous(
        memory_format=output_memory_format(grad_out))
    if nothing_to_run(dx):
        return dx
    poison_if_debug(dx)
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    ncy, ncx = (h - 1 + ph) // sh + 1, (w - 1 + pw) // sw + 1
    launch(_POOL_BACKWARD[channels_last_variant(grad_out)], _grid(n, c, ncy * ncx), grad_out, indices, dx, c,
           h, w, oh, ow, ncy, ncx, *grad_out.stride(), *indices.stride(), *dx.stride(), KH=kh, KW=kw, SH=sh,
           SW=sw, PH=ph, PW=pw, WIDE=needs_wide_offsets(grad_out, dx))
    return dx


alexnet_fast.autograd.register(torch.ops.alexnet_fast_triton, ("max_pool2d",))
