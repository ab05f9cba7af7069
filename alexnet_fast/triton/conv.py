"""Fused conv2d + bias + ReLU in Triton as implicit GEMMs: forward, input gradient (dgrad) and
weight + bias gradient (wgrad), registered as ``alexnet_fast_triton`` ops with the schemas of the
native ``alexnet_fast`` ops.

GEMM views (groups=1, dilation=1; M counts pixels, K = KH * KW * C_in ordered (kh, kw, c_in)):

* forward  ``out[M = N*OH*OW, C_out] = relu(patches[M, K] @ W[K, C_out] + bias)``;
* dgrad    ``dx[M = N*H*W, C_in] = masked_grad[M, KH*KW*C_out] @ W'``: at stride 1 the forward
  kernel (no ReLU) with the kernel flipped; otherwise one sub-GEMM per stride phase
  ``(ih % SH, iw % SW)``, so only the taps that hit each input pixel are visited;
* wgrad    ``dW[C_out, K] = masked_grad[M, C_out]^T @ patches[M, K]``, split over M into fp32
  partial sums that the host adds; at stride 1 on the pixel grid (below).

``masked_grad = where(out <= 0, 0, grad_out)`` (PyTorch's threshold_backward, NaN outputs
included) is written by one pass over grad_out and out, which also sums it per channel (the bias
gradient); the GEMMs read it as plain operands. Forming it inside the GEMMs' loads, which spares
that tensor, was the first design and measured slower on the H200 (bf16, B=128): conv2's input
gradient 587 against 412 us, its weight gradient 1053 against 585 us, where the pass takes 62 us.

The pixel grid (stride-1 weight gradient in 16-bit dtypes, padding below the kernel, channel
counts multiples of 8): x is copied into a [rows, C_in] matrix whose row
``(n * HS + h + PH) * WS + w + PW`` holds pixel (n, h, w), with ``HS, WS = H + PH, W + PW`` and
zeros in every other row. An image's bottom padding is the next one's top padding, and a row's
right padding the next row's left, so they are stored once. The masked gradient goes into the
same grid, output pixel (n, oh, ow) in row ``q = (n * HS + oh) * WS + ow``, zeros elsewhere.
Kernel tap (a, b) of row q then reads x's row ``q + a * WS + b``: one fixed shift per tap, so
the GEMM walks contiguous rows with no masks and no index arithmetic in its loop. It costs zero
rows (13-15% of the GEMM on AlexNet's layers) and one copy of x, and on the H200 ran 2.1-2.4x
faster than the per-pixel window kernel (bf16, B=128, conv2 582 against 275 us; BENCHMARKS.md).
The input gradient reads the gradient through a strided view of the grid.

Layout: the kernels read activations as channels_last (NHWC), so a K block is a contiguous run
of channels (the forward kernel takes the image and row strides, which lets it read a view of
the grid). NCHW inputs are converted to channels_last once inside each op (one copy of x, and
of grad_out and out in the backward); outputs are written directly in the layout
``alexnet_fast.ops.output_memory_format`` prescribes (channels_last in, channels_last out).

K is walked in one of two ways (the ``FLAT_K`` switch, see ``_flat_k``):

* channel blocks per tap: for each (kh, kw), ``BLOCK_K`` contiguous channels; used when C_in
  fills the blocks (conv2-conv5);
* flat: K is one run ``kh * (KW * C_in) + (kw * C_in + c)``. In NHWC the ``KW * C_in`` values
  of one kernel row are contiguous in memory (conv1: 11 rows of 33 values), so a K block
  covers whole rows instead of padding C_in=3 to a channel block (which would waste 80-95% of
  the MMA work).

Dtypes: float16 / bfloat16 on the tensor cores with float32 accumulation. float32 follows
PyTorch's convolution rule: TF32 when ``torch.backends.cudnn.allow_tf32`` is True, true fp32
products otherwise (read when the op runs; under torch.compile, when it is traced).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import triton_op, wrap_triton

from alexnet_fast import autograd, reference
from alexnet_fast.backends import triton_interpreted
from alexnet_fast.ops import output_memory_format
from alexnet_fast.triton import conv_configs
from alexnet_fast.triton._common import mma, poison_if_debug

NAMESPACE = "alexnet_fast_triton"
_INTERPRETED = triton_interpreted()
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A flat K is used once channel blocks of this width would pad C_in by more than a quarter.
_CHANNEL_BLOCK = 32
_INT32_MAX = 2**31 - 1


# ---------------------------------------------------------------------------------------------
# device helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pixel_rows(offs_m, OH, OW, SXN, SXH, C, SH: tl.constexpr, SW: tl.constexpr, PH: tl.constexpr,
                PW: tl.constexpr):
    """For output pixels ``offs_m`` (flat n, oh, ow): the top-left input coordinate of their
    window and the int64 offset of that (possibly padded-out) position in x, whose pixels are
    SXN (image) and SXH (row) elements apart and hold their C channels contiguously."""
    ow = offs_m % OW
    t = offs_m // OW
    oh = t % OH
    n = t // OH
    ih0 = oh * SH - PH
    iw0 = ow * SW - PW
    row_base = n.to(tl.int64) * SXN + ih0.to(tl.int64) * SXH + iw0 * C
    return n, oh, ow, ih0, iw0, row_base


@triton.jit
def _k_columns(kt, C, KH: tl.constexpr, KW: tl.constexpr, FLAT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weight column (index into the (kh, kw, c_in) order) of each position of K block ``kt``,
    and which positions exist."""
    if FLAT_K:
        k = kt * BLOCK_K + tl.arange(0, BLOCK_K)
        return k, k < KH * KW * C
    c_blocks = tl.cdiv(C, BLOCK_K)
    tap = kt // c_blocks
    c = (kt - tap * c_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    return tap * C + c, c < C


@triton.jit
def _load_patches(x_ptr, row_base, ih0, iw0, row_ok, kt, k_idx, k_ok, H, W, C, SXH, KW: tl.constexpr,
                  FLAT_K: tl.constexpr, BLOCK_K: tl.constexpr):
    """The [BLOCK_M, BLOCK_K] tile of K block ``kt`` (columns ``k_idx`` from ``_k_columns``) of
    the im2col rows of pixels whose window starts at (ih0, iw0); zero outside the image."""
    if FLAT_K:
        row_len = KW * C
        r = k_idx // row_len
        j = k_idx - r * row_len
        s = j // C
        ih = ih0[:, None] + r[None, :]
        iw = iw0[:, None] + s[None, :]
        mask = row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ptrs = x_ptr + row_base[:, None] + (r * SXH + j)[None, :]
    else:
        tap = kt // tl.cdiv(C, BLOCK_K)
        r = tap // KW
        s = tap - r * KW
        ih = ih0 + r
        iw = iw0 + s
        ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        mask = ok[:, None] & k_ok[None, :]
        ptrs = x_ptr + (row_base + (r * SXH + s * C))[:, None] + (k_idx - tap * C)[None, :]
    return tl.load(ptrs, mask=mask, other=0.0)


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def conv2d_relu_forward_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr,
    N, H, W, C, OH, OW, CO,
    sx_n, sx_h, so_n, so_c, so_h, so_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    HAS_BIAS: tl.constexpr, RELU: tl.constexpr, FLAT_K: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out = relu(conv(x, w) + bias) (the ReLU if RELU): x with contiguous channels and pixels
    (sx_n, sx_h, C) elements apart, w [CO, KH, KW, C], out written with its strides."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(CO, BLOCK_N)
    # Output-channel tiles vary fastest so the programs sharing a patch tile run together.
    pid_m = pid // num_n
    pid_n = pid - pid_m * num_n
    M = N * OH * OW
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < M
    n, oh, ow, ih0, iw0, row_base = _pixel_rows(offs_m, OH, OW, sx_n, sx_h, C, SH, SW, PH, PW)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < CO
    K = KH * KW * C
    w_rows = w_ptr + offs_n.to(tl.int64) * K

    if FLAT_K:
        k_tiles = tl.cdiv(K, BLOCK_K)
    else:
        k_tiles = KH * KW * tl.cdiv(C, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(0, k_tiles):
        k_idx, k_ok = _k_columns(kt, C, KH, KW, FLAT_K, BLOCK_K)
        a = _load_patches(x_ptr, row_base, ih0, iw0, m_ok, kt, k_idx, k_ok, H, W, C, sx_h, KW, FLAT_K, BLOCK_K)
        b = tl.load(w_rows[None, :] + k_idx[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(a, b, acc, PRECISION, UPCAST)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if RELU:
        # where(acc < 0) rather than maximum: NaN propagates as in torch.relu.
        acc = tl.where(acc < 0, 0.0, acc)
    rows = n.to(tl.int64) * so_n + oh.to(tl.int64) * so_h + ow.to(tl.int64) * so_w
    ptrs = out_ptr + rows[:, None] + offs_n.to(tl.int64)[None, :] * so_c
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def conv2d_relu_backward_input_kernel(
    grad_ptr, w_ptr, dx_ptr,
    N, H, W, C, OH, OW, CO,
    sd_n, sd_c, sd_h, sd_w,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dx = conv_transpose(grad, w): grad the masked output gradient (NHWC), w [CO, KH, KW, C].

    Program axis 1 is the stride phase (ph, pw): its pixels ih = ph + SH*a, iw = pw + SW*b are
    reached only by the taps r = r0 + SH*i, s = s0 + SW*j, from outputs oh = a + qh - i,
    ow = b + qw - j."""
    phase = tl.program_id(1)
    ph = phase // SW
    pw = phase - ph * SW
    HQ = (H - ph + SH - 1) // SH
    WQ = (W - pw + SW - 1) // SW
    MQ = N * HQ * WQ
    pid = tl.program_id(0)
    num_n = tl.cdiv(C, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid - pid_m * num_n
    if pid_m * BLOCK_M >= MQ:
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < MQ
    b_idx = offs_m % WQ
    t = offs_m // WQ
    a_idx = t % HQ
    n = t // HQ
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C

    r0 = (ph + PH) % SH
    s0 = (pw + PW) % SW
    qh = (ph + PH - r0) // SH
    qw = (pw + PW - s0) // SW
    taps_w = (KW - s0 + SW - 1) // SW
    taps = ((KH - r0 + SH - 1) // SH) * taps_w
    co_blocks = tl.cdiv(CO, BLOCK_K)
    K = KH * KW * C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, taps * co_blocks):
        tap = it // co_blocks
        co = (it - tap * co_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        i = tap // taps_w
        j = tap - i * taps_w
        oh = a_idx + qh - i
        ow = b_idx + qw - j
        row_ok = m_ok & (oh >= 0) & (oh < OH) & (ow >= 0) & (ow < OW)
        co_ok = co < CO
        g_mask = row_ok[:, None] & co_ok[None, :]
        g_offs = (((n.to(tl.int64) * OH + oh) * OW + ow) * CO)[:, None] + co[None, :]
        g = tl.load(grad_ptr + g_offs, mask=g_mask, other=0.0)
        w_col = ((r0 + SH * i) * KW + s0 + SW * j) * C
        w_ptrs = w_ptr + (co.to(tl.int64) * K + w_col)[:, None] + offs_n[None, :]
        wt = tl.load(w_ptrs, mask=co_ok[:, None] & n_ok[None, :], other=0.0)
        acc = mma(g, wt, acc, PRECISION, UPCAST)

    ih = ph + SH * a_idx
    iw = pw + SW * b_idx
    rows = n.to(tl.int64) * sd_n + ih.to(tl.int64) * sd_h + iw.to(tl.int64) * sd_w
    ptrs = dx_ptr + rows[:, None] + offs_n.to(tl.int64)[None, :] * sd_c
    tl.store(ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def conv2d_relu_backward_weight_kernel(
    grad_ptr, x_ptr, dw_ptr,
    N, H, W, C, OH, OW, CO, CHUNK,
    KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
    PH: tl.constexpr, PW: tl.constexpr,
    FLAT_K: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial sums over the pixels [split * CHUNK, (split + 1) * CHUNK), split = program axis 1:
    dw[split, CO, KH*KW*C] of grad^T @ patches, grad the masked output gradient (NHWC)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_n = tl.cdiv(CO, BLOCK_N)
    kt = pid // num_n
    pid_n = pid - kt * num_n
    K = KH * KW * C
    M = N * OH * OW
    m_start = split * CHUNK
    m_end = tl.minimum(m_start + CHUNK, M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < CO
    k_idx, k_ok = _k_columns(kt, C, KH, KW, FLAT_K, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_end
        n, oh, ow, ih0, iw0, row_base = _pixel_rows(offs_m, OH, OW, H * W * C, W * C, C, SH, SW, PH, PW)
        g_offs = (offs_m.to(tl.int64) * CO)[:, None] + offs_n[None, :]
        g = tl.load(grad_ptr + g_offs, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
        a = _load_patches(x_ptr, row_base, ih0, iw0, m_ok, kt, k_idx, k_ok, H, W, C, W * C, KW, FLAT_K, BLOCK_K)
        acc = mma(tl.trans(g), a, acc, PRECISION, UPCAST)
    ptrs = dw_ptr + ((split * CO + offs_n).to(tl.int64) * K)[:, None] + k_idx[None, :]
    tl.store(ptrs, acc, mask=n_ok[:, None] & k_ok[None, :])


@triton.jit
def conv2d_relu_backward_weight_grid_kernel(
    grad_ptr, x_ptr, dw_ptr, CO, C, NCOL, WS, CHUNK,
    KW: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The stride-1 weight gradient on the pixel grid (``_Grid``), without masks or index
    arithmetic in its loop: partial sums over grid rows [split * CHUNK, (split + 1) * CHUNK),
    split = program axis 1, of dw[split, co, (a * KW + b) * C + c] = sum_q grad[q, co] *
    x[q + a * WS + b, c]; grad [rows, CO] and x [rows + shift, C] grid matrices. C and CO are
    multiples of 8 (the host checks), so runs of 8 columns are contiguous and aligned."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_m = tl.cdiv(CO, BLOCK_M)
    # Output-channel tiles vary fastest so the programs sharing an x tile run together.
    pid_n = pid // num_m
    pid_m = pid - pid_n * num_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Past the edge, wrap to a valid address (never stored) rather than mask in the loop.
    co = tl.max_contiguous(tl.multiple_of(offs_m % CO, 8), 8)
    col = offs_n % NCOL
    tap = col // C
    a = tap // KW
    x_col = tl.max_contiguous(tl.multiple_of((a * WS + tap - a * KW) * C + col - tap * C, 8), 8)
    q = split * CHUNK + tl.arange(0, BLOCK_K)
    g_ptrs = grad_ptr + (q.to(tl.int64) * CO)[:, None] + co[None, :]
    x_ptrs = x_ptr + (q.to(tl.int64) * C)[:, None] + x_col[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, CHUNK, BLOCK_K):
        g = tl.load(g_ptrs)
        x = tl.load(x_ptrs)
        acc = mma(tl.trans(g), x, acc, PRECISION, UPCAST)
        g_ptrs += BLOCK_K * CO
        x_ptrs += BLOCK_K * C
    ptrs = dw_ptr + ((split * CO + offs_m).to(tl.int64) * NCOL)[:, None] + offs_n[None, :]
    tl.store(ptrs, acc, mask=(offs_m < CO)[:, None] & (offs_n < NCOL)[None, :])


@triton.jit
def grid_rows_kernel(src_ptr, out_ptr, dst_ptr, db_ptr, N, H, W, C, HS, WS, OFF_H, OFF_W, ROWS, CHUNK,
                     RELU_MASK: tl.constexpr, BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr):
    """Rows q < ROWS of dst [ROWS, C] (``_Grid``): pixel (n, h, w) = (q // (HS*WS),
    q // WS % HS - OFF_H, q % WS - OFF_W) of src (dense NHWC, N x H x W), zero where there is
    none. With RELU_MASK it is where(out <= 0, 0, src), out like src (PyTorch's
    threshold_backward); with BIAS the float32 sums of each channel over the rows
    [split * CHUNK, (split + 1) * CHUNK), split = program axis 1, go to db[split, C]."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C
    m_start = split * CHUNK
    m_end = tl.minimum(m_start + CHUNK, ROWS)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        q = m0 + tl.arange(0, BLOCK_M)
        img = q // (HS * WS)
        rest = q - img * (HS * WS)
        h = rest // WS - OFF_H
        w = rest % WS - OFF_W
        valid = (img < N) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        mask = valid[:, None] & n_ok[None, :]
        offs = (((img.to(tl.int64) * H + h) * W + w) * C)[:, None] + offs_n[None, :]
        v = tl.load(src_ptr + offs, mask=mask, other=0.0)
        if RELU_MASK:
            # where(out <= 0) rather than out > 0: a NaN output passes its gradient, as in PyTorch
            v = tl.where(tl.load(out_ptr + offs, mask=mask, other=0.0) <= 0, 0.0, v)
        tl.store(dst_ptr + (q.to(tl.int64) * C)[:, None] + offs_n[None, :], v,
                 mask=(q < m_end)[:, None] & n_ok[None, :])
        if BIAS:
            db += tl.sum(v.to(tl.float32), axis=0)
    if BIAS:
        tl.store(db_ptr + split * C + offs_n, db, mask=n_ok)


# ---------------------------------------------------------------------------------------------
# host side
# ---------------------------------------------------------------------------------------------
_SHAPE_KEY = ["N", "H", "W", "C", "CO", "KH", "KW", "SH", "SW", "PH", "PW"]


def _autotuned(kernel, configs, key):
    """One autotuned launcher per operand width in bytes (2: float16/bfloat16, 4: float32)."""
    return {width: triton.autotune(configs=configs(width, _INTERPRETED), key=key)(kernel) for width in (2, 4)}


_FORWARD = _autotuned(conv2d_relu_forward_kernel, conv_configs.forward, _SHAPE_KEY + ["FLAT_K"])
_BACKWARD_INPUT = _autotuned(conv2d_relu_backward_input_kernel, conv_configs.backward_input, _SHAPE_KEY)
_BACKWARD_WEIGHT = _autotuned(conv2d_relu_backward_weight_kernel, conv_configs.backward_weight,
                              _SHAPE_KEY + ["FLAT_K", "CHUNK"])
_BACKWARD_WEIGHT_GRID = _autotuned(conv2d_relu_backward_weight_grid_kernel, conv_configs.backward_weight_grid,
                                   ["CO", "C", "NCOL", "WS", "CHUNK", "KW"])
# Weight-gradient splits over pixels (or grid rows): chunks aligned to every config's block
# along them, each split taking at least _SPLIT_MIN_ROWS of them. The interpreter runs tiny
# shapes, which still get several splits so the cross-split sum is exercised.
_CHUNK_ALIGN = max([c.kwargs["BLOCK_M"] for width in (2, 4)
                    for c in conv_configs.backward_weight(width, _INTERPRETED)]
                   + [c.kwargs["BLOCK_K"] for width in (2, 4)
                      for c in conv_configs.backward_weight_grid(width, _INTERPRETED)])
_SPLIT_MIN_ROWS = _CHUNK_ALIGN // 2 if _INTERPRETED else 1024
# The row passes (grid_rows_kernel: the ReLU mask and bias sums, the grid copy of x): their tile,
# rows x channels (a 128-channel row of 16-bit values is 256 bytes), their warps, and how many
# programs per SM they aim for. These passed the GPU tests; of eight variants timed on the H200,
# 64 rows was fastest (bf16 conv2's gradient: 51 against 62 us here) but has not been through
# the GPU tests yet.
_ROWS_BLOCK_M, _ROWS_BLOCK_N, _ROWS_WARPS, _ROWS_PROGRAMS_PER_SM = 32, 128, 4, 4


class _Grid(NamedTuple):
    """The padded pixel grid of a stride-1 convolution's weight gradient (module docstring):
    images of ``hs x ws`` pixels, ``splits`` chunks of ``chunk`` rows of the output gradient."""
    hs: int
    ws: int
    chunk: int
    splits: int

    @property
    def rows(self) -> int:
        return self.chunk * self.splits


def _chunks(rows: int, splits: int, align: int) -> tuple[int, int]:
    """(chunk, count): ``rows`` cut into about ``splits`` chunks of a multiple of ``align`` rows
    (the last one may be shorter), none of them empty."""
    chunk = triton.cdiv(triton.cdiv(rows, max(1, splits)), align) * align
    return chunk, triton.cdiv(rows, chunk)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _flat_k(c_in: int) -> bool:
    """Flat K when channel blocks of _CHANNEL_BLOCK would pad C_in by more than a quarter."""
    return triton.cdiv(c_in, _CHANNEL_BLOCK) * _CHANNEL_BLOCK * 4 > c_in * 5


def _dot_modes(dtype: torch.dtype) -> tuple[str, bool]:
    """(tl.dot input_precision, whether to widen bfloat16 tiles for the interpreter)."""
    precision = "ieee" if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else "tf32"
    return precision, _INTERPRETED and dtype == torch.bfloat16


def _check_tensors(dtype: torch.dtype, device: torch.device, **tensors: Tensor) -> None:
    for name, t in tensors.items():
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16 for the triton kernels, "
                            f"got {t.dtype}")
        if t.dtype != dtype:
            raise TypeError(f"{name} must have dtype {dtype} like the other operands, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on device {device} like the other operands, got {t.device}")


def _check_geometry(kernel_hw, stride, padding) -> None:
    for name, v, low in (("kernel_hw", kernel_hw, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if len(v) != 2 or min(v) < low:
            raise ValueError(f"{name} must be 2 ints >= {low}, got {list(v)}")


def _check_rows(*counts: int) -> None:
    if max(counts) > _INT32_MAX:
        raise ValueError(f"the batch has {max(counts)} pixels; the triton kernels index up to 2**31 - 1")


def _out_hw(in_hw, kernel_hw, stride, padding) -> tuple[int, int]:
    return tuple(reference.conv_output_size(n, k, s, p)
                 for n, k, s, p in zip(in_hw, kernel_hw, stride, padding))


def _weight_k_major(weight: Tensor) -> Tensor:
    """[C_out, KH, KW, C_in] contiguous: row co of the GEMM's weight matrix in K order."""
    return weight.permute(0, 2, 3, 1).contiguous()


def _k_tiles(kernel_hw, c_in: int, flat: bool, block_k: int) -> int:
    kh, kw = kernel_hw
    return triton.cdiv(kh * kw * c_in, block_k) if flat else kh * kw * triton.cdiv(c_in, block_k)


def _register(name: str, schema: str, impl, allocate):
    """Define ``alexnet_fast_triton::name``.

    On the GPU it is a ``triton_op``: torch.compile traces ``impl`` and sees the kernels. Under
    the CPU interpreter ``wrap_triton`` launches kernels directly and cannot be traced, so the op
    is an opaque ``custom_op`` whose fake kernel is ``allocate`` (the checks and empty outputs
    ``impl`` starts from); opcheck and torch.compile then still cover schemas, shapes, layouts
    and autograd on machines without a GPU."""
    qualname = f"{NAMESPACE}::{name}"
    if _INTERPRETED:
        op = torch.library.custom_op(qualname, impl, mutates_args=(), schema=schema)
        op.register_fake(allocate)
        return op
    return triton_op(qualname, impl, mutates_args=(), schema=schema)


def _allocate_forward(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int],
                      padding: list[int]) -> Tensor:
    _check_tensors(x.dtype, x.device, x=x, weight=weight)
    if bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype
                             or bias.device != x.device):
        raise ValueError(f"bias must be None or a ({weight.shape[0]},) {x.dtype} tensor on {x.device}, "
                         f"got {tuple(bias.shape)} {bias.dtype} on {bias.device}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have x's {x.shape[1]} input channels in dim 1, "
                         f"got {tuple(weight.shape)}")
    _check_geometry(weight.shape[-2:], stride, padding)
    n, _, h, w = x.shape
    oh, ow = _out_hw((h, w), weight.shape[-2:], stride, padding)
    if min(oh, ow) < 1:
        raise ValueError(f"kernel {tuple(weight.shape[-2:])} is larger than the padded input {(h, w)} "
                         f"with padding {list(padding)}")
    _check_rows(n * oh * ow)
    return torch.empty((n, weight.shape[0], oh, ow), dtype=x.dtype, device=x.device,
                       memory_format=output_memory_format(x))


def _conv2d_relu(x: Tensor, weight: Tensor, bias: Tensor | None, stride: list[int],
                 padding: list[int]) -> Tensor:
    out = _allocate_forward(x, weight, bias, stride, padding)
    if out.numel() == 0:
        return out
    poison_if_debug(out)  # here, not in _allocate_forward, which is also the fake kernel
    return _forward(x, weight, bias, out, stride, padding, relu=True)


def _forward(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, stride: list[int],
             padding: list[int], relu: bool) -> Tensor:
    """out (allocated, written in full) = conv2d(x, weight, bias), through a ReLU if ``relu``."""
    n, c, h, w = x.shape
    co, _, kh, kw = weight.shape
    oh, ow = out.shape[-2:]
    x_rows = _channels_minor(x)
    w_k = _weight_k_major(weight)
    precision, upcast = _dot_modes(x.dtype)

    def grid(meta):
        return (triton.cdiv(n * oh * ow, meta["BLOCK_M"]) * triton.cdiv(co, meta["BLOCK_N"]),)

    wrap_triton(_FORWARD[x.element_size()])[grid](
        x_rows, w_k, bias.contiguous() if bias is not None else w_k, out,  # the kernel reads bias with stride 1
        n, h, w, c, oh, ow, co, x_rows.stride(0), x_rows.stride(2), *out.stride(),
        KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
        HAS_BIAS=bias is not None, RELU=relu, FLAT_K=_flat_k(c), PRECISION=precision, UPCAST=upcast)
    return out


def _channels_minor(x: Tensor) -> Tensor:
    """x itself when each pixel's channels are contiguous and a row's pixels follow each other
    (channels_last, or a view of the pixel grid), else a channels_last copy: the kernels take the
    image and row strides."""
    if x.stride(1) == 1 and x.stride(3) == x.shape[1]:
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _grid_rows(src: Tensor, hs: int, ws: int, offset, rows: int, relu_out: Tensor | None = None,
               bias: bool = False) -> tuple[Tensor, Tensor | None]:
    """The [rows, C] matrix holding pixel (n, h, w) of src (N, C, H, W) in row
    ``(n * hs + h + offset[0]) * ws + w + offset[1]`` and zeros in every other row, written in one
    pass (``grid_rows_kernel``); with ``relu_out``, ``where(relu_out <= 0, 0, src)`` (the ReLU's
    backward), and with ``bias`` the float32 sum of each channel too. ``hs, ws = H, W`` with no
    offset is src in channels_last."""
    n, c, h, w = src.shape
    dst = poison_if_debug(src.new_empty((rows, c)))  # every row is written
    block_n = min(_ROWS_BLOCK_N, triton.next_power_of_2(c))
    blocks_n = triton.cdiv(c, block_n)
    programs = _ROWS_PROGRAMS_PER_SM * _sm_count(src.device)
    chunk, splits = _chunks(rows, triton.cdiv(programs, blocks_n), _ROWS_BLOCK_M)
    # Every split stores (not adds) its sums, so they start poisoned in debug runs.
    # Without bias the kernel never touches db_ptr; dst stands in for it.
    sums = poison_if_debug(torch.empty((splits, c), dtype=torch.float32, device=src.device)) if bias else dst
    src = src.contiguous(memory_format=torch.channels_last)
    wrap_triton(grid_rows_kernel)[(blocks_n, splits)](
        src, src if relu_out is None else relu_out.contiguous(memory_format=torch.channels_last), dst, sums,
        n, h, w, c, hs, ws, offset[0], offset[1], rows, chunk, RELU_MASK=relu_out is not None, BIAS=bias,
        BLOCK_M=_ROWS_BLOCK_M, BLOCK_N=block_n, num_warps=_ROWS_WARPS)
    return dst, sums.sum(0) if bias else None


def _relu_backward_bias(grad_out: Tensor, out: Tensor, bias: bool,
                        grid: _Grid | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """``where(out <= 0, 0, grad_out)`` (the masked gradient) as an (N, C_out, OH, OW) tensor
    with contiguous channels, the [rows, C_out] matrix it views (channels_last, or the pixel grid
    when ``grid`` is given), and with ``bias`` its float32 sum per channel, the bias gradient:
    one pass over the two tensors, whose result the backward GEMMs read as it is. Masking inside
    the GEMMs' loads instead (a load of out and a select per K step) measured slower than this
    pass and the plain GEMMs together (BENCHMARKS.md, Convolutions)."""
    n, co, oh, ow = grad_out.shape
    hs, ws, rows = (grid.hs, grid.ws, grid.rows) if grid else (oh, ow, n * oh * ow)
    if grad_out.numel() == 0:
        return (torch.empty_like(grad_out, memory_format=torch.channels_last), grad_out.new_empty((0, co)),
                grad_out.new_zeros((co,), dtype=torch.float32) if bias else None)
    matrix, sums = _grid_rows(grad_out, hs, ws, (0, 0), rows, relu_out=out, bias=bias)
    masked = matrix.as_strided(grad_out.shape, (hs * ws * co, 1, ws * co, co))
    return masked, matrix, sums


def _check_backward_input(grad_out: Tensor, out: Tensor, weight: Tensor, input_hw: list[int],
                          stride: list[int], padding: list[int]) -> None:
    _check_tensors(grad_out.dtype, grad_out.device, grad_out=grad_out, out=out, weight=weight)
    _check_geometry(weight.shape[-2:], stride, padding)
    n, co, oh, ow = grad_out.shape
    h, w = input_hw
    if (out.shape != grad_out.shape or weight.shape[0] != co
            or _out_hw((h, w), weight.shape[-2:], stride, padding) != (oh, ow)):
        raise ValueError(
            f"grad_out {tuple(grad_out.shape)}, out {tuple(out.shape)}, weight {tuple(weight.shape)} and "
            f"input_hw {list(input_hw)} do not describe one convolution with stride {list(stride)}, "
            f"padding {list(padding)}")
    _check_rows(n * h * w, n * oh * ow)


def _empty_input_grad(grad_out: Tensor, shape) -> Tensor:
    return torch.empty(shape, dtype=grad_out.dtype, device=grad_out.device,
                       memory_format=output_memory_format(grad_out))


def _allocate_backward_input(grad_out: Tensor, out: Tensor, weight: Tensor, input_hw: list[int],
                             stride: list[int], padding: list[int]) -> Tensor:
    _check_backward_input(grad_out, out, weight, input_hw, stride, padding)
    return _empty_input_grad(grad_out, (grad_out.shape[0], weight.shape[1], *input_hw))


def _input_grad(masked: Tensor, weight: Tensor, dx: Tensor, stride: list[int], padding: list[int]) -> Tensor:
    """dx (allocated, written in full) from the masked output gradient (contiguous channels; in
    channels_last unless the stride is 1).

    At stride 1 that is the convolution of the gradient with the kernel flipped and its channel
    axes swapped, padded by ``k - 1 - p``: the forward kernel, whose loop over K is leaner than
    the phase kernel's, measured faster (BENCHMARKS.md, Convolutions)."""
    n, co, oh, ow = masked.shape
    _, c, kh, kw = weight.shape
    h, w = dx.shape[-2:]
    sh, sw = stride
    if (sh, sw) == (1, 1) and padding[0] < kh and padding[1] < kw:
        flipped = weight.flip(2, 3).transpose(0, 1)
        return _forward(masked, flipped, None, dx, [1, 1], [kh - 1 - padding[0], kw - 1 - padding[1]], relu=False)
    w_k = _weight_k_major(weight)
    precision, upcast = _dot_modes(masked.dtype)
    phase_rows = n * triton.cdiv(h, sh) * triton.cdiv(w, sw)

    def grid(meta):
        return (triton.cdiv(phase_rows, meta["BLOCK_M"]) * triton.cdiv(c, meta["BLOCK_N"]), sh * sw)

    wrap_triton(_BACKWARD_INPUT[masked.element_size()])[grid](
        masked, w_k, dx,
        n, h, w, c, oh, ow, co, *dx.stride(),
        KH=kh, KW=kw, SH=sh, SW=sw, PH=padding[0], PW=padding[1], PRECISION=precision, UPCAST=upcast)
    return dx


def _conv2d_relu_backward_input(grad_out: Tensor, out: Tensor, weight: Tensor, input_hw: list[int],
                                stride: list[int], padding: list[int]) -> Tensor:
    dx = _allocate_backward_input(grad_out, out, weight, input_hw, stride, padding)
    if dx.numel() == 0:
        return dx
    masked, _, _ = _relu_backward_bias(grad_out, out, bias=False)
    return _input_grad(masked, weight, poison_if_debug(dx), stride, padding)


def _weight_grad_splits(rows: int, c_out: int, k: int, device: torch.device) -> tuple[int, int]:
    """(rows per split, number of splits): enough programs to fill the GPU about twice over,
    counting one program per nominal 128 x 128 tile of the [C_out, K] gradient."""
    tiles = triton.cdiv(c_out, 128) * triton.cdiv(k, 128)
    return _chunks(rows, min(triton.cdiv(2 * _sm_count(device), tiles), rows // _SPLIT_MIN_ROWS), _CHUNK_ALIGN)


def _weight_grid(x: Tensor, c_out: int, kernel_hw, stride, padding) -> _Grid | None:
    """The pixel grid of the weight gradient (module docstring), where it applies: 16-bit
    operands, stride 1, padding below the kernel (so every output pixel lies in its image's block
    of rows), and channel counts that are multiples of 8 (the kernel's aligned loads). In TF32 the
    grid gained nothing on the H200 (conv2's weight gradient op 4.2 ms, 7.5x cuDNN's; the
    per-pixel kernel's took 3.6 ms as a plain call): Hopper's TF32 products take K-major operands
    only, and both of this GEMM's are channel-major."""
    n, c, h, w = x.shape
    (kh, kw), (ph, pw) = kernel_hw, padding
    if x.element_size() != 2 or list(stride) != [1, 1] or ph >= kh or pw >= kw or c % 8 or c_out % 8:
        return None
    hs, ws = h + ph, w + pw
    chunk, splits = _weight_grad_splits(n * hs * ws, c_out, kh * kw * c, x.device)
    _check_rows(chunk * splits + (kh - 1) * ws + kw)  # x's grid rows: the last taps reach past the last row
    return _Grid(hs, ws, chunk, splits)


def _check_backward_weight(grad_out: Tensor, out: Tensor, x: Tensor, kernel_hw: list[int],
                           stride: list[int], padding: list[int]) -> None:
    _check_tensors(grad_out.dtype, grad_out.device, grad_out=grad_out, out=out, x=x)
    _check_geometry(kernel_hw, stride, padding)
    n, co, oh, ow = grad_out.shape
    _, c, h, w = x.shape
    if (out.shape != grad_out.shape or x.shape[0] != n
            or _out_hw((h, w), kernel_hw, stride, padding) != (oh, ow)):
        raise ValueError(
            f"grad_out {tuple(grad_out.shape)}, out {tuple(out.shape)}, x {tuple(x.shape)} and kernel_hw "
            f"{list(kernel_hw)} do not describe one convolution with stride {list(stride)}, "
            f"padding {list(padding)}")
    _check_rows(n * oh * ow, n * h * w)


def _allocate_backward_weight(grad_out: Tensor, out: Tensor, x: Tensor, kernel_hw: list[int],
                              stride: list[int], padding: list[int]) -> tuple[Tensor, Tensor]:
    _check_backward_weight(grad_out, out, x, kernel_hw, stride, padding)
    co = grad_out.shape[1]
    return grad_out.new_empty((co, x.shape[1], *kernel_hw)), grad_out.new_empty((co,))


def _weight_grad(masked: Tensor, matrix: Tensor, x: Tensor, grad_w: Tensor, stride: list[int],
                 padding: list[int], grid: _Grid | None) -> Tensor:
    """grad_w (allocated, written in full) from the masked output gradient, as
    ``_relu_backward_bias`` gives it for ``grid``: on the pixel grid, or in channels_last when
    ``grid`` is None."""
    n, co, oh, ow = masked.shape
    _, c, h, w = x.shape
    kh, kw = grad_w.shape[-2:]
    if grad_w.numel() == 0:
        return grad_w
    k = kh * kw * c
    precision, upcast = _dot_modes(masked.dtype)

    def partial_sums(splits: int) -> Tensor:
        # Every split stores (not adds) its partial sums, so they start poisoned in debug runs.
        # grad_w is written whole by copy_ below, not by a kernel: left as it is.
        return poison_if_debug(torch.empty((splits, co, k), dtype=torch.float32, device=masked.device))

    if grid is not None:
        dw = partial_sums(grid.splits)
        # x's rows reach (kh - 1) * ws + kw - 1 past the gradient's: the last taps of the last rows
        x_rows, _ = _grid_rows(x, grid.hs, grid.ws, padding, grid.rows + (kh - 1) * grid.ws + kw - 1)

        def grid_fn(meta):
            return (triton.cdiv(co, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_N"]), grid.splits)

        wrap_triton(_BACKWARD_WEIGHT_GRID[masked.element_size()])[grid_fn](
            matrix, x_rows, dw, co, c, k, grid.ws, grid.chunk, KW=kw, PRECISION=precision, UPCAST=upcast)
    else:
        chunk, splits = _weight_grad_splits(n * oh * ow, co, k, masked.device)
        dw = partial_sums(splits)
        flat = _flat_k(c)

        def grid_fn(meta):
            return (triton.cdiv(co, meta["BLOCK_N"]) * _k_tiles((kh, kw), c, flat, meta["BLOCK_K"]), splits)

        wrap_triton(_BACKWARD_WEIGHT[masked.element_size()])[grid_fn](
            matrix, x.contiguous(memory_format=torch.channels_last), dw,
            n, h, w, c, oh, ow, co, chunk,
            KH=kh, KW=kw, SH=stride[0], SW=stride[1], PH=padding[0], PW=padding[1],
            FLAT_K=flat, PRECISION=precision, UPCAST=upcast)
    return grad_w.copy_(dw.sum(0).view(co, kh, kw, c).permute(0, 3, 1, 2))


def _conv2d_relu_backward_weight(grad_out: Tensor, out: Tensor, x: Tensor, kernel_hw: list[int],
                                 stride: list[int], padding: list[int]) -> tuple[Tensor, Tensor]:
    grad_w, grad_b = _allocate_backward_weight(grad_out, out, x, kernel_hw, stride, padding)
    if grad_out.numel() == 0:
        return grad_w.zero_(), grad_b.zero_()
    grid = _weight_grid(x, grad_out.shape[1], kernel_hw, stride, padding)
    masked, matrix, bias_sums = _relu_backward_bias(grad_out, out, bias=True, grid=grid)
    return _weight_grad(masked, matrix, x, grad_w, stride, padding, grid), grad_b.copy_(bias_sums)


def _allocate_backward(grad_out: Tensor, out: Tensor, x: Tensor, weight: Tensor, stride: list[int],
                       padding: list[int], output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients ``output_mask`` asks for (x's, weight's, bias's), each empty (0,) if not."""
    if len(output_mask) != 3:
        raise ValueError(f"output_mask must be 3 bools (x, weight, bias), got {list(output_mask)}")
    _check_tensors(grad_out.dtype, grad_out.device, x=x)
    _check_backward_input(grad_out, out, weight, list(x.shape[-2:]), stride, padding)  # checks weight
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight must have x's {x.shape[1]} input channels in dim 1, got {tuple(weight.shape)}")
    _check_backward_weight(grad_out, out, x, list(weight.shape[-2:]), stride, padding)
    dx, dw, db = output_mask
    return (_empty_input_grad(grad_out, x.shape) if dx else grad_out.new_empty((0,)),
            grad_out.new_empty(weight.shape) if dw else grad_out.new_empty((0,)),
            grad_out.new_empty((weight.shape[0],)) if db else grad_out.new_empty((0,)))


def _conv2d_relu_backward(grad_out: Tensor, out: Tensor, x: Tensor, weight: Tensor, stride: list[int],
                          padding: list[int], output_mask: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    """The two ops above in one, over one masked gradient: what autograd calls."""
    dx, dw, db = _allocate_backward(grad_out, out, x, weight, stride, padding, output_mask)
    if grad_out.numel() == 0:
        return dx.zero_(), dw.zero_(), db.zero_()
    # The weight gradient's grid, where it applies, also serves the input gradient (as a view).
    grid = _weight_grid(x, weight.shape[0], weight.shape[-2:], stride, padding) if output_mask[1] else None
    masked, matrix, bias_sums = _relu_backward_bias(grad_out, out, bias=output_mask[2], grid=grid)
    if output_mask[0]:
        _input_grad(masked, weight, poison_if_debug(dx), stride, padding)
    if output_mask[1]:
        _weight_grad(masked, matrix, x, dw, stride, padding, grid)
    if output_mask[2]:
        db.copy_(bias_sums)
    return dx, dw, db


conv2d_relu = _register(
    "conv2d_relu", "(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding) -> Tensor",
    _conv2d_relu, _allocate_forward)
conv2d_relu_backward_input = _register(
    "conv2d_relu_backward_input",
    "(Tensor grad_out, Tensor out, Tensor weight, int[2] input_hw, int[2] stride, int[2] padding) -> Tensor",
    _conv2d_relu_backward_input, _allocate_backward_input)
conv2d_relu_backward_weight = _register(
    "conv2d_relu_backward_weight",
    "(Tensor grad_out, Tensor out, Tensor x, int[2] kernel_hw, int[2] stride, int[2] padding) "
    "-> (Tensor, Tensor)",
    _conv2d_relu_backward_weight, _allocate_backward_weight)
conv2d_relu_backward = _register(
    "conv2d_relu_backward",
    "(Tensor grad_out, Tensor out, Tensor x, Tensor weight, int[2] stride, int[2] padding, bool[3] output_mask) "
    "-> (Tensor, Tensor, Tensor)",
    _conv2d_relu_backward, _allocate_backward)

autograd.register_conv(torch.ops.alexnet_fast_triton, "conv2d_relu", "conv2d_relu_backward")
