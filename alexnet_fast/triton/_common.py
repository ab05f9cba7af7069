"""Pieces shared by the LRN and max-pool kernels: autotuning per layout, the flattened pixel
stride, and per-channel loads and stores.

The LRN window runs across channels, so the LRN kernels hold one ``[BLOCK_P]`` tensor of pixels
per channel (a tuple built at trace time) and form each window sum from neighbouring tuple
entries: every element is loaded and its power computed once per program, with no shifted
reloads. Channels_last tensors are loaded as ``[BLOCK_P, W]`` tiles (coalesced along channels)
and split into per-channel tensors; contiguous (NCHW) tensors are loaded channel by channel
(coalesced along pixels). Both variants are correct for any strides; the layout picks the fast one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from alexnet_fast.backends import triton_interpreted


def autotune_by_layout(kernel, key, pixel_configs, channel_configs, interpreter_configs):
    """Two autotuned launchers of ``kernel``: ``[False]`` for pixel-contiguous (NCHW) tensors and
    ``[True]`` for channel-contiguous (channels_last) ones, each over its own configs. Under
    ``TRITON_INTERPRET=1`` each uses its one config of ``interpreter_configs`` (pixels, channels):
    timing configs there would only cost minutes."""
    launchers = {}
    for channels_last, configs, interp in ((False, pixel_configs, interpreter_configs[0]),
                                           (True, channel_configs, interpreter_configs[1])):
        launchers[channels_last] = triton.autotune(configs=[interp] if triton_interpreted() else configs,
                                                   key=key)(kernel)
    return launchers


def channels_last_variant(t: torch.Tensor) -> bool:
    """Whether the channel-contiguous kernel variant suits ``t`` (N, C, H, W)."""
    return t.stride(1) == 1 and t.shape[1] > 1


def pixel_stride(t: torch.Tensor) -> int | None:
    """The stride of the flattened pixel index ``h * W + w`` of an (N, C, H, W) tensor, or None
    when ``h`` and ``w`` do not flatten into one stride."""
    _, _, h, w = t.shape
    if w == 1:
        return t.stride(2)
    if h == 1 or t.stride(2) == w * t.stride(3):
        return t.stride(3)
    return None


def flattenable(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its pixels flatten into one stride (contiguous, channels_last, or a
    channel slice of either: no copy), else a contiguous copy."""
    return t if pixel_stride(t) is not None else t.contiguous()


def pow2_divisor(values, cap: int) -> int:
    """The largest power of two up to ``cap`` that divides every value: kernels round those values
    down to a multiple of it (a no-op) so the compiler sees the alignment and emits vector loads,
    which Triton's own specialization only does for multiples of 16."""
    align = cap
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


@triton.jit
def load_channels(ptr, offs, mask, c_first, C, stride_c,
                  W: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_LAST: tl.constexpr, ACC: tl.constexpr):
    """Channels ``c_first .. c_first + W - 1`` of ``ptr`` at the pixel offsets ``offs`` as a tuple
    of W ``[BLOCK_P]`` tensors of dtype ACC; channels outside ``[0, C)`` and masked pixels read 0."""
    if CHANNELS_LAST:
        cs = tl.arange(0, W)
        m = mask[:, None] & (c_first + cs >= 0)[None, :] & (c_first + cs < C)[None, :]
        base = ptr + c_first.to(tl.int64) * stride_c
        tile = tl.load(base + offs[:, None] + cs[None, :] * stride_c, mask=m, other=0).to(ACC)
        # Split the channel axis into its even and odd entries until single channels remain;
        # putting every first half before every second half leaves parts[i] = channel i.
        parts = (tile,)
        for level in tl.static_range(8):
            if (W >> level) > 1:
                firsts = ()
                seconds = ()
                for i in tl.static_range(1 << level):
                    a, b = tl.split(tl.reshape(parts[i], (BLOCK_P, W >> (level + 1), 2)))
                    firsts = firsts + (a,)
                    seconds = seconds + (b,)
                parts = firsts + seconds
        chans = ()
        for i in tl.static_range(W):
            chans = chans + (tl.reshape(parts[i], (BLOCK_P,)),)
    else:
        chans = ()
        for i in tl.static_range(W):
            c = c_first + i
            v = tl.load(ptr + c.to(tl.int64) * stride_c + offs, mask=mask & (c >= 0) & (c < C), other=0)
            chans = chans + (v.to(ACC),)
    return chans


@triton.jit
def store_channels(ptr, offs, mask, chans, c_first, C, stride_c,
                   W: tl.constexpr, BLOCK_P: tl.constexpr, CHANNELS_LAST: tl.constexpr):
    """Store the tuple of W ``[BLOCK_P]`` tensors ``chans`` as channels ``c_first .. + W - 1``
    (``c_first >= 0``) of ``ptr`` at the pixel offsets ``offs``, in ``ptr``'s dtype."""
    if CHANNELS_LAST:
        # The inverse of load_channels' split: entries i and i + half hold the even and odd
        # channels of the next wider tile.
        parts = ()
        for i in tl.static_range(W):
            parts = parts + (tl.reshape(chans[i], (BLOCK_P, 1)),)
        for level in tl.static_range(8):
            if (1 << level) < W:
                joined = ()
                for i in tl.static_range(W >> (level + 1)):
                    joined = joined + (tl.reshape(tl.join(parts[i], parts[i + (W >> (level + 1))]),
                                                  (BLOCK_P, 2 << level)),)
                parts = joined
        cs = tl.arange(0, W)
        m = mask[:, None] & (c_first + cs < C)[None, :]
        base = ptr + c_first.to(tl.int64) * stride_c
        tl.store(base + offs[:, None] + cs[None, :] * stride_c, parts[0].to(ptr.dtype.element_ty), mask=m)
    else:
        for i in tl.static_range(W):
            c = c_first + i
            tl.store(ptr + c.to(tl.int64) * stride_c + offs, chans[i].to(ptr.dtype.element_ty),
                     mask=mask & (c < C))
