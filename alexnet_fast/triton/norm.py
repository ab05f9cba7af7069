"""LRN and the fused LRN->max-pool in Triton, forward and backward.

A program owns ``BLOCK_P`` pixels of one image and ``CB`` consecutive channels. It loads the
channels it needs (its own plus a halo on each side, see ``_common.load_channels``) once, as one
``[BLOCK_P]`` tensor per channel, and forms every window sum from neighbouring entries, so each
denominator's power is computed once per channel and program. The backward recomputes the
denominators from x (LRN saves nothing but x):

    dx[j] = g[j] * D[j]^-beta - 2 * alpha/size * beta * x[j] * sum_{c : j in W(c)} g[c] x[c] D[c]^(-beta-1)

where ``W(c) = [c - size//2, c + (size-1)//2]`` and ``j in W(c)`` iff ``c in [j - (size-1)//2, j + size//2]``.

The fused op computes the LRN at every element of each pooling window (the full-resolution LRN
output never reaches memory) and compares the values rounded to the output dtype, as
``max_pool2d(lrn(x))`` would see them. Its backward gathers the pooled gradient of each input
pixel from the windows that chose it (cells as in ``pool.py``) and feeds it to the LRN backward.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.language.extra import libdevice

import alexnet_fast.autograd
from alexnet_fast.backends import triton_interpreted
from alexnet_fast.ops import output_memory_format, pool_out_shape
from alexnet_fast.triton._common import (autotune_by_layout, channels_last_variant, check_input,
                                         check_pool_args, define_op, dense, dense_strides, launch,
                                         load_channels, nothing_to_run, poison_if_debug, pow2_divisor,
                                         store_channels)
from alexnet_fast.triton.pool import needs_wide_offsets, pool_outputs


def _halos(size: int) -> tuple[int, int]:
    """Channels loaded on each side of a block: (forward: the window, backward: two windows),
    rounded up to powers of two so channels_last tiles stay power-of-two wide."""
    lo = size // 2
    return triton.next_power_of_2(lo) if lo else 0, triton.next_power_of_2(size - 1) if size > 1 else 0


@triton.jit
def _load_with_halo(ptr, offs, mask, c0, C, stride_c, HALO: tl.constexpr, CB: tl.constexpr,
                    BLOCK_P: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr):
    """Channels ``c0 - HALO .. c0 + CB + HALO - 1`` as a tuple (entry ``HALO + j`` is channel c0 + j)."""
    chans = load_channels(ptr, offs, mask, c0, C, stride_c, CB, BLOCK_P, CHANNELS_LAST, ACC)
    if HALO > 0:
        left = load_channels(ptr, offs, mask, c0 - HALO, C, stride_c, HALO, BLOCK_P, CHANNELS_LAST, ACC)
        right = load_channels(ptr, offs, mask, c0 + CB, C, stride_c, HALO, BLOCK_P, CHANNELS_LAST, ACC)
        chans = left + chans + right
    return chans


@triton.jit
def _pow(base, exponent, FAST_POW: tl.constexpr):
    """``base ** exponent`` for ``base > 0``. FAST_POW (float32 on the GPU) takes the hardware's
    approximate log2 (absolute error ~2**-22, a relative error of the power below 1e-6), where
    tl.log2 would call libdevice's exact log2f, about 20 instructions per element."""
    if FAST_POW:
        lg = libdevice.fast_log2f(base)
    else:
        lg = tl.log2(base)
    return tl.exp2(exponent * lg)


@triton.jit
def _lrn_values(xs, OFF: tl.constexpr, CB: tl.constexpr, SIZE: tl.constexpr, alpha_over_size, neg_beta, k,
                FAST_POW: tl.constexpr):
    """LRN of the channels ``xs[OFF] .. xs[OFF + CB - 1]`` (their windows lie inside ``xs``)."""
    # (Index arithmetic stays inline: the interpreter turns assigned ints into tensors, and the
    # compiler does not let an unrolled loop reassign a constexpr.)
    ys = ()
    for j in tl.static_range(CB):
        s = xs[OFF + j - SIZE // 2] * xs[OFF + j - SIZE // 2]
        for d in tl.static_range(1, SIZE):
            s += xs[OFF + j - SIZE // 2 + d] * xs[OFF + j - SIZE // 2 + d]
        den = k + alpha_over_size * s
        ys = ys + (xs[OFF + j] * _pow(den, neg_beta, FAST_POW),)
    return ys


@triton.jit
def _lrn_backward_values(xs, XOFF: tl.constexpr, gs, GOFF: tl.constexpr, CB: tl.constexpr, SIZE: tl.constexpr,
                         alpha_over_size, neg_beta, k, FAST_POW: tl.constexpr):
    """dx of the channels at ``xs[XOFF] .. xs[XOFF + CB - 1]`` from x and the output gradient
    (``gs[GOFF + j]`` is the channel of ``xs[XOFF + j]``)."""
    LO: tl.constexpr = SIZE // 2
    HI: tl.constexpr = (SIZE - 1) // 2
    # Per channel c in [-HI, CB + LO): gp = g D^(-beta-1), D and t = gp * x.
    gps = ()
    dens = ()
    ts = ()
    for t in tl.static_range(CB + SIZE - 1):
        s = xs[XOFF + t - HI - LO] * xs[XOFF + t - HI - LO]
        for d in tl.static_range(1, SIZE):
            s += xs[XOFF + t - HI - LO + d] * xs[XOFF + t - HI - LO + d]
        den = k + alpha_over_size * s
        gp = gs[GOFF + t - HI] * _pow(den, neg_beta - 1.0, FAST_POW)
        gps = gps + (gp,)
        dens = dens + (den,)
        ts = ts + (gp * xs[XOFF + t - HI],)
    coef = 2.0 * alpha_over_size * neg_beta
    dxs = ()
    for j in tl.static_range(CB):
        r = ts[j]
        for d in tl.static_range(1, SIZE):
            r += ts[j + d]
        dxs = dxs + (gps[j + HI] * dens[j + HI] + coef * xs[XOFF + j] * r,)
    return dxs


@triton.jit
def _program_block(C, HW, CB: tl.constexpr, BLOCK_P: tl.constexpr):
    """(image, first channel, first pixel) of this program; channel blocks vary fastest, so the
    programs sharing a halo run together and find it in L2."""
    pid = tl.program_id(0)
    num_cb = tl.cdiv(C, CB)
    num_pb = tl.cdiv(HW, BLOCK_P)
    rest = pid // num_cb
    return rest // num_pb, (pid % num_cb) * CB, (rest % num_pb) * BLOCK_P


@triton.jit
def _lrn_forward_kernel(x_ptr, out_ptr, C, HW, x_sn, x_sc, x_sp, o_sn, o_sc, o_sp,
                        alpha_over_size, neg_beta, k, SIZE: tl.constexpr, HALO: tl.constexpr,
                        FAST_POW: tl.constexpr, ALIGN: tl.constexpr,
                        BLOCK_P: tl.constexpr, CB: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    # Show the compiler what ALIGN divides (see _common.pow2_divisor): vector loads along pixels.
    HW = HW // ALIGN * ALIGN
    x_sn = x_sn // ALIGN * ALIGN
    x_sc = x_sc // ALIGN * ALIGN
    o_sn = o_sn // ALIGN * ALIGN
    o_sc = o_sc // ALIGN * ALIGN
    n, c0, p0 = _program_block(C, HW, CB, BLOCK_P)
    p = tl.arange(0, BLOCK_P)
    mask = p0 + p < HW
    x = x_ptr + n.to(tl.int64) * x_sn + p0.to(tl.int64) * x_sp
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    xs = _load_with_halo(x, p * x_sp, mask, c0, C, x_sc, HALO, CB, BLOCK_P, CHANNELS_LAST, ACC)
    ys = _lrn_values(xs, HALO, CB, SIZE, alpha_over_size, neg_beta, k, FAST_POW)
    out = out_ptr + n.to(tl.int64) * o_sn + p0.to(tl.int64) * o_sp
    store_channels(out, p * o_sp, mask, ys, c0, C, o_sc, CB, BLOCK_P, CHANNELS_LAST)


@triton.jit
def _lrn_backward_kernel(g_ptr, x_ptr, dx_ptr, C, HW, g_sn, g_sc, g_sp, x_sn, x_sc, x_sp, d_sn, d_sc, d_sp,
                         alpha_over_size, neg_beta, k, SIZE: tl.constexpr, GHALO: tl.constexpr,
                         XHALO: tl.constexpr, FAST_POW: tl.constexpr, ALIGN: tl.constexpr,
                         BLOCK_P: tl.constexpr, CB: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    HW = HW // ALIGN * ALIGN
    g_sn = g_sn // ALIGN * ALIGN
    g_sc = g_sc // ALIGN * ALIGN
    x_sn = x_sn // ALIGN * ALIGN
    x_sc = x_sc // ALIGN * ALIGN
    d_sn = d_sn // ALIGN * ALIGN
    d_sc = d_sc // ALIGN * ALIGN
    n, c0, p0 = _program_block(C, HW, CB, BLOCK_P)
    p = tl.arange(0, BLOCK_P)
    mask = p0 + p < HW
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    x = x_ptr + n.to(tl.int64) * x_sn + p0.to(tl.int64) * x_sp
    g = g_ptr + n.to(tl.int64) * g_sn + p0.to(tl.int64) * g_sp
    xs = _load_with_halo(x, p * x_sp, mask, c0, C, x_sc, XHALO, CB, BLOCK_P, CHANNELS_LAST, ACC)
    gs = _load_with_halo(g, p * g_sp, mask, c0, C, g_sc, GHALO, CB, BLOCK_P, CHANNELS_LAST, ACC)
    dxs = _lrn_backward_values(xs, XHALO, gs, GHALO, CB, SIZE, alpha_over_size, neg_beta, k, FAST_POW)
    dx = dx_ptr + n.to(tl.int64) * d_sn + p0.to(tl.int64) * d_sp
    store_channels(dx, p * d_sp, mask, dxs, c0, C, d_sc, CB, BLOCK_P, CHANNELS_LAST)




@triton.jit
def _lrn_max_pool_forward_kernel(x_ptr, out_ptr, idx_ptr, C, OH, OW, x_sn, x_sc, x_sh, x_sw,
                                 o_sn, o_sc, o_sh, o_sw,
                                 alpha_over_size, neg_beta, k, SIZE: tl.constexpr, HALO: tl.constexpr,
                                 FAST_POW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                                 SH: tl.constexpr, SW: tl.constexpr,
                                 WIDE: tl.constexpr, BLOCK_P: tl.constexpr, CB: tl.constexpr,
                                 CHANNELS_LAST: tl.constexpr):
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    OUT: tl.constexpr = out_ptr.dtype.element_ty
    n, c0, q0 = _program_block(C, OH * OW, CB, BLOCK_P)
    q = q0 + tl.arange(0, BLOCK_P)
    mask = q < OH * OW
    if WIDE:
        q = q.to(tl.int64)
    oh = q // OW
    ow = q % OW
    x = x_ptr + n.to(tl.int64) * x_sn
    best = ()
    best_k = ()
    for kh in tl.static_range(KH):
        for kw in tl.static_range(KW):
            offs = (oh * SH + kh) * x_sh + (ow * SW + kw) * x_sw
            xs = _load_with_halo(x, offs, mask, c0, C, x_sc, HALO, CB, BLOCK_P, CHANNELS_LAST, ACC)
            ys = _lrn_values(xs, HALO, CB, SIZE, alpha_over_size, neg_beta, k, FAST_POW)
            # Compare the values rounded to the output dtype, as max_pool2d(lrn(x)) sees them, so
            # ties stay ties (in ACC: the interpreter compares bfloat16 values by their bits).
            if kh + kw == 0:
                for j in tl.static_range(CB):
                    best = best + (ys[j].to(OUT).to(ACC),)
                    best_k = best_k + (tl.zeros((BLOCK_P,), tl.int32),)
            else:
                new_best = ()
                new_k = ()
                for j in tl.static_range(CB):
                    v = ys[j].to(OUT).to(ACC)
                    take = (v > best[j]) | (v != v)
                    new_best = new_best + (tl.where(take, v, best[j]),)
                    new_k = new_k + (tl.where(take, kh * KW + kw, best_k[j]),)
                best = new_best
                best_k = new_k
    o = n.to(tl.int64) * o_sn
    offs = oh * o_sh + ow * o_sw
    store_channels(out_ptr + o, offs, mask, best, c0, C, o_sc, CB, BLOCK_P, CHANNELS_LAST)
    store_channels(idx_ptr + o, offs, mask, best_k, c0, C, o_sc, CB, BLOCK_P, CHANNELS_LAST)


@triton.jit
def _lrn_max_pool_backward_kernel(g_ptr, x_ptr, idx_ptr, dx_ptr, C, H, W, OH, OW, NCY, NCX,
                                  g_sn, g_sc, g_sh, g_sw, x_sn, x_sc, x_sh, x_sw, i_sn, i_sc, i_sh, i_sw,
                                  d_sn, d_sc, d_sh, d_sw, alpha_over_size, neg_beta, k,
                                  SIZE: tl.constexpr, GHALO: tl.constexpr, XHALO: tl.constexpr,
                                  FAST_POW: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                                  SH: tl.constexpr, SW: tl.constexpr,
                                  WIDE: tl.constexpr, BLOCK_P: tl.constexpr, CB: tl.constexpr,
                                  CHANNELS_LAST: tl.constexpr):
    """Input cells of SH x SW pixels as in pool.py's backward; the pixel at (a, b) of a cell takes
    the pooled gradient of each window t rows and u columns up-left whose offset it holds."""
    ACC: tl.constexpr = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
    TM: tl.constexpr = (KH + SH - 1) // SH
    UM: tl.constexpr = (KW + SW - 1) // SW
    n, c0, q0 = _program_block(C, NCY * NCX, CB, BLOCK_P)
    q = q0 + tl.arange(0, BLOCK_P)
    qmask = q < NCY * NCX
    if WIDE:
        q = q.to(tl.int64)
    cy = q // NCX
    cx = q % NCX
    g = g_ptr + n.to(tl.int64) * g_sn
    x = x_ptr + n.to(tl.int64) * x_sn
    ix = idx_ptr + n.to(tl.int64) * i_sn
    dx = dx_ptr + n.to(tl.int64) * d_sn
    for a in tl.static_range(SH):
        for b in tl.static_range(SW):
            ih = cy * SH + a
            iw = cx * SW + b
            pm = qmask & (ih < H) & (iw < W)
            dys = ()
            for i in tl.static_range(CB + 2 * GHALO):
                dys = dys + (tl.zeros((BLOCK_P,), ACC),)
            for t in tl.static_range(TM):
                for u in tl.static_range(UM):
                    # The pixel's offset (a + t*SH, b + u*SW) in that window, if the window covers it.
                    if a + t * SH < KH:
                        if b + u * SW < KW:
                            oh = cy - t
                            ow = cx - u
                            wm = pm & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
                            ks = _load_with_halo(ix, oh * i_sh + ow * i_sw, wm, c0, C, i_sc, GHALO, CB,
                                                 BLOCK_P, CHANNELS_LAST, tl.int32)
                            gs = _load_with_halo(g, oh * g_sh + ow * g_sw, wm, c0, C, g_sc, GHALO, CB,
                                                 BLOCK_P, CHANNELS_LAST, ACC)
                            summed = ()
                            for i in tl.static_range(CB + 2 * GHALO):
                                hit = ks[i] == (a + t * SH) * KW + b + u * SW
                                summed = summed + (dys[i] + tl.where(hit, gs[i], 0),)
                            dys = summed
            xs = _load_with_halo(x, ih * x_sh + iw * x_sw, pm, c0, C, x_sc, XHALO, CB, BLOCK_P, CHANNELS_LAST,
                                 ACC)
            dxs = _lrn_backward_values(xs, XHALO, dys, GHALO, CB, SIZE, alpha_over_size, neg_beta, k,
                                       FAST_POW)
            store_channels(dx, ih * d_sh + iw * d_sw, pm, dxs, c0, C, d_sc, CB, BLOCK_P, CHANNELS_LAST)


def _P(kwargs, channels_last, num_warps=4):
    return triton.Config({**kwargs, "CHANNELS_LAST": channels_last}, num_warps=num_warps)


# Tile shapes (BLOCK_P, CB, num_warps), from the instruction counts of the sm_90 code: the pixel
# variant wants 4-8 pixels per thread (vector loads); the channel variant one pixel per thread
# (BLOCK_P = 32 * num_warps, no replicated lanes) and wide channel blocks (fewer halo loads and
# shuffles per output); the fused kernels recompute the LRN per window element, so small blocks
# keep them in registers.
_LRN_FORWARD = autotune_by_layout(
    _lrn_forward_kernel, ["C", "HW", "SIZE"],
    pixel_configs=[_P({"BLOCK_P": p, "CB": cb}, False, w)
                   for p, cb, w in ((512, 8, 4), (1024, 8, 4), (1024, 8, 8), (512, 16, 4), (1024, 16, 8),
                                    (256, 16, 2))],
    channel_configs=[_P({"BLOCK_P": p, "CB": cb}, True, w)
                     for p, cb, w in ((64, 32, 2), (128, 32, 4), (128, 16, 4), (256, 16, 8), (32, 64, 1),
                                      (64, 64, 2))],
    interpreter_configs=(_P({"BLOCK_P": 16, "CB": 4}, False), _P({"BLOCK_P": 8, "CB": 4}, True)),
)
_LRN_BACKWARD = autotune_by_layout(
    _lrn_backward_kernel, ["C", "HW", "SIZE"],
    pixel_configs=[_P({"BLOCK_P": p, "CB": cb}, False, w)
                   for p, cb, w in ((256, 8, 2), (512, 8, 4), (512, 8, 2), (256, 16, 4), (128, 8, 1))],
    channel_configs=[_P({"BLOCK_P": p, "CB": cb}, True, w)
                     for p, cb, w in ((64, 32, 2), (128, 32, 4), (128, 16, 4), (32, 64, 1), (64, 16, 2))],
    interpreter_configs=(_P({"BLOCK_P": 16, "CB": 4}, False), _P({"BLOCK_P": 8, "CB": 4}, True)),
)
_FUSED_FORWARD = autotune_by_layout(
    _lrn_max_pool_forward_kernel, ["C", "OH", "OW", "SIZE", "KH", "KW", "SH", "SW"],
    pixel_configs=[_P({"BLOCK_P": p, "CB": cb}, False, w)
                   for p, cb, w in ((128, 4, 4), (128, 8, 4), (64, 8, 2), (256, 4, 8), (32, 8, 1))],
    channel_configs=[_P({"BLOCK_P": p, "CB": cb}, True, w)
                     for p, cb, w in ((32, 8, 1), (64, 8, 2), (128, 8, 4), (32, 16, 1))],
    interpreter_configs=(_P({"BLOCK_P": 16, "CB": 4}, False), _P({"BLOCK_P": 8, "CB": 4}, True)),
)
_FUSED_BACKWARD = autotune_by_layout(
    _lrn_max_pool_backward_kernel, ["C", "H", "W", "SIZE", "KH", "KW", "SH", "SW"],
    pixel_configs=[_P({"BLOCK_P": p, "CB": cb}, False, w)
                   for p, cb, w in ((128, 4, 4), (64, 4, 2), (32, 8, 1), (128, 8, 4))],
    channel_configs=[_P({"BLOCK_P": p, "CB": cb}, True, w)
                     for p, cb, w in ((32, 8, 1), (64, 8, 2), (32, 16, 1))],
    interpreter_configs=(_P({"BLOCK_P": 16, "CB": 4}, False), _P({"BLOCK_P": 8, "CB": 4}, True)),
)

def _check_size(size: int) -> None:
    if size < 1:
        raise ValueError(f"size must be a positive int, got {size}")


def _fast_pow(x: Tensor) -> bool:
    """The hardware log2 for float32 math on the GPU (the interpreter has no libdevice)."""
    return x.dtype != torch.float64 and not triton_interpreted()


def _align(*tensors: Tensor) -> int:
    """A power of two dividing the pixel count and the batch and channel strides of every tensor
    (the pixel variant's vector width; 1 for channels_last tensors, whose channel stride is 1)."""
    t = tensors[0]
    values = [t.shape[2] * t.shape[3]] + [v for u in tensors for v in dense_strides(u)[:2]]
    return pow2_divisor(values, 16 // t.element_size())


def _grid(n: int, c: int, hw: int):
    return lambda meta: (triton.cdiv(c, meta["CB"]) * triton.cdiv(hw, meta["BLOCK_P"]) * n,)


@define_op("alexnet_fast_triton::lrn",
           "(Tensor x, int size, float alpha, float beta, float k) -> Tensor")
def lrn(x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    check_input(x, "x")
    _check_size(size)
    out = torch.empty_like(x, memory_format=output_memory_format(x))
    if nothing_to_run(out):
        return out
    poison_if_debug(out)
    x = dense(x)
    n, c, h, w = x.shape
    halo, _ = _halos(size)
    launch(_LRN_FORWARD[channels_last_variant(x)], _grid(n, c, h * w), x, out, c, h * w, *dense_strides(x),
           *dense_strides(out), alpha / size, -beta, k, SIZE=size, HALO=halo, FAST_POW=_fast_pow(x),
           ALIGN=_align(x, out))
    return out


@define_op("alexnet_fast_triton::lrn_backward",
           "(Tensor grad_out, Tensor x, int size, float alpha, float beta, float k) -> Tensor")
def lrn_backward(grad_out: Tensor, x: Tensor, size: int, alpha: float, beta: float, k: float) -> Tensor:
    check_input(x, "x")
    check_input(grad_out, "grad_out", like=x, shape=x.shape)
    _check_size(size)
    dx = torch.empty_like(x, memory_format=output_memory_format(x))
    if nothing_to_run(dx):
        return dx
    poison_if_debug(dx)
    x, grad_out = dense(x), dense(grad_out)
    n, c, h, w = x.shape
    ghalo, xhalo = _halos(size)
    launch(_LRN_BACKWARD[channels_last_variant(x)], _grid(n, c, h * w), grad_out, x, dx, c, h * w,
           *dense_strides(grad_out), *dense_strides(x), *dense_strides(dx), alpha / size, -beta, k, SIZE=size,
           GHALO=ghalo, XHALO=xhalo, FAST_POW=_fast_pow(x), ALIGN=_align(grad_out, x, dx))
    return dx


@define_op("alexnet_fast_triton::lrn_max_pool2d",
           "(Tensor x, int size, float alpha, float beta, float k, int[2] kernel_size, int[2] stride) "
           "-> (Tensor, Tensor)")
def lrn_max_pool2d(x: Tensor, size: int, alpha: float, beta: float, k: float, kernel_size: list[int],
                   stride: list[int]) -> tuple[Tensor, Tensor]:
    check_input(x, "x")
    _check_size(size)
    check_pool_args(kernel_size, stride)
    out, idx = pool_outputs(x, kernel_size, stride, (0, 0), False)
    if nothing_to_run(out):
        return out, idx
    out, idx = poison_if_debug(out), poison_if_debug(idx)
    n, c = x.shape[:2]
    oh, ow = out.shape[-2:]
    halo, _ = _halos(size)
    launch(_FUSED_FORWARD[channels_last_variant(x)], _grid(n, c, oh * ow), x, out, idx, c, oh, ow,
           *x.stride(), *out.stride(), alpha / size, -beta, k, SIZE=size, HALO=halo, FAST_POW=_fast_pow(x),
           KH=kernel_size[0], KW=kernel_size[1], SH=stride[0], SW=stride[1], WIDE=needs_wide_offsets(x, out))
    return out, idx


@define_op("alexnet_fast_triton::lrn_max_pool2d_backward",
           "(Tensor grad_out, Tensor x, Tensor indices, int size, float alpha, float beta, float k, "
           "int[2] kernel_size, int[2] stride) -> Tensor")
def lrn_max_pool2d_backward(grad_out: Tensor, x: Tensor, indices: Tensor, size: int, alpha: float,
                            beta: float, k: float, kernel_size: list[int], stride: list[int]) -> Tensor:
    check_input(x, "x")
    _check_size(size)
    check_pool_args(kernel_size, stride)
    pooled = pool_out_shape(x, kernel_size, stride, (0, 0), False)
    check_input(grad_out, "grad_out", like=x, shape=pooled)
    check_input(indices, "indices", like=x, shape=pooled, dtype=torch.uint8)
    dx = torch.empty_like(x, memory_format=output_memory_format(x))
    if nothing_to_run(dx):
        return dx
    poison_if_debug(dx)
    n, c, h, w = x.shape
    oh, ow = grad_out.shape[-2:]
    (kh, kw), (sh, sw) = kernel_size, stride
    ncy, ncx = triton.cdiv(h, sh), triton.cdiv(w, sw)
    ghalo, xhalo = _halos(size)
    launch(_FUSED_BACKWARD[channels_last_variant(x)], _grid(n, c, ncy * ncx), grad_out, x, indices, dx, c, h,
           w, oh, ow, ncy, ncx, *grad_out.stride(), *x.stride(), *indices.stride(), *dx.stride(),
           alpha / size, -beta, k, SIZE=size, GHALO=ghalo, XHALO=xhalo, FAST_POW=_fast_pow(x), KH=kh, KW=kw,
           SH=sh, SW=sw, WIDE=needs_wide_offsets(x, grad_out))
    return dx


alexnet_fast.autograd.register(torch.ops.alexnet_fast_triton, ("lrn", "lrn_max_pool2d"))
