"""Pieces shared by the Triton kernels: op registration, autotuning per layout, dense layouts,
per-channel loads and stores (LRN and max-pool), and the tile product (the GEMMs).

The LRN window runs across channels, so the LRN kernels hold one ``[BLOCK_P]`` tensor of pixels
per channel (a tuple built at trace time) and form each window sum from neighbouring tuple
entries: every element is loaded and its power computed once per program, with no shifted
reloads. Channels_last tensors are loaded as ``[BLOCK_P, W]`` tiles (coalesced along channels)
and split into per-channel tensors; contiguous (NCHW) tensors are loaded channel by channel
(coalesced along pixels). Both variants are correct for any strides; the layout picks the fast one.
"""
from __future__ import annotations

import contextvars

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from alexnet_fast.backends import autotune_enabled, poison_outputs, triton_interpreted
from alexnet_fast.ops import MAX_POOL_WINDOW

_shapes_only = contextvars.ContextVar("alexnet_fast_triton_shapes_only", default=False)


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot(a, b, acc)``. The CPU interpreter multiplies bfloat16 tiles as their raw 16-bit
    integers; with ``UPCAST`` (set under the interpreter for bfloat16) the tiles are widened to
    float32 first, which is exact and gives the products the tensor cores compute."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


def define_op(name: str, schema: str):
    """Register the decorated host function as the op ``name``: a ``triton_op`` (torch.compile
    sees its kernels), or under ``TRITON_INTERPRET=1`` an opaque ``custom_op``, because triton_op
    runs the function on fake tensors for shapes and the interpreter cannot launch on those; there
    the function serves as the fake kernel too, returning before its launches (``nothing_to_run``)."""
    def decorate(fn):
        if not triton_interpreted():
            return triton_op(name, mutates_args=(), schema=schema)(fn)
        op = torch.library.custom_op(name, fn, mutates_args=(), schema=schema)

        @op.register_fake
        def _(*args):
            token = _shapes_only.set(True)
            try:
                return fn(*args)
            finally:
                _shapes_only.reset(token)

        return op

    return decorate


def check_input(t, name: str, like: torch.Tensor | None = None, shape=None, dtype=None) -> None:
    """The argument checks of a direct op call (the public ``alexnet_fast.ops`` check more): a 4-D
    tensor, floating point unless ``dtype`` says otherwise, on ``like``'s device (and of its dtype
    when no ``dtype`` is given), of ``shape`` when given."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got {got}")
    want = dtype or (like.dtype if like is not None else None)
    if want is not None and t.dtype != want:
        raise TypeError(f"{name} must be a {want} tensor, got {t.dtype}")
    if want is None and t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} must be on the device of the other inputs ({like.device}), got {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_pool_args(kernel_size, stride, padding=(0, 0)) -> None:
    """Pairs of positive kernel and stride, padding at most half the kernel, windows that fit uint8."""
    for name, v, least in (("kernel_size", kernel_size, 1), ("stride", stride, 1), ("padding", padding, 0)):
        if len(v) != 2 or min(v) < least:
            what = "positive" if least else "non-negative"
            raise ValueError(f"{name} must be 2 {what} ints, got {list(v)}")
    if kernel_size[0] * kernel_size[1] > MAX_POOL_WINDOW:
        raise ValueError(
            f"kernel_size {list(kernel_size)} has more than {MAX_POOL_WINDOW} elements (indices are uint8)")
    if any(2 * p > k for p, k in zip(padding, kernel_size)):
        raise ValueError(f"padding {list(padding)} must be at most half of kernel_size {list(kernel_size)}")


def nothing_to_run(out: torch.Tensor) -> bool:
    """Whether an op whose output is ``out`` returns without a launch: an empty output, or a fake
    kernel run under the interpreter (see ``define_op``)."""
    return out.numel() == 0 or _shapes_only.get()


# The poison of uint8 max-pool window offsets. Windows hold up to MAX_POOL_WINDOW = 256 elements,
# so 255 is a valid offset only in a window of exactly 256 (16 x 16, say); in every smaller window,
# AlexNet's 3 x 3 included, an unwritten 255 points outside it (as in csrc/poison.h).
INDEX_POISON = 0xFF
assert INDEX_POISON == MAX_POOL_WINDOW - 1


def poison_if_debug(t: torch.Tensor) -> torch.Tensor:
    """``t`` filled with NaN (floating) or ``INDEX_POISON`` (uint8) when the debug switch
    ``backends.POISON_ENV_VAR`` is on, else untouched. For buffers a kernel writes in full, never
    for ones that must start as zero."""
    if not poison_outputs() or t.numel() == 0:
        return t
    if t.is_floating_point():
        return t.fill_(float("nan"))
    if t.dtype != torch.uint8:
        raise TypeError(f"poison_if_debug: no poison value for {t.dtype}")
    return t.fill_(INDEX_POISON)


def launch(kernel, grid, *args, **kwargs) -> None:
    wrap_triton(kernel)[grid](*args, **kwargs)


def autotune_by_layout(kernel, key, pixel_configs, channel_configs, interpreter_configs):
    """Two autotuned launchers of ``kernel``: ``[False]`` for pixel-contiguous (NCHW) tensors and
    ``[True]`` for channel-contiguous (channels_last) ones, each over its own configs. Under
    ``TRITON_INTERPRET=1`` each uses its one config of ``interpreter_configs`` (pixels, channels):
    timing configs there would only cost minutes."""
    launchers = {}
    for channels_last, configs, interp in ((False, pixel_configs, interpreter_configs[0]),
                                           (True, channel_configs, interpreter_configs[1])):
        if triton_interpreted():
            configs = [interp]
        elif not autotune_enabled():
            configs = configs[:1]
        launchers[channels_last] = triton.autotune(configs=configs, key=key)(kernel)
    return launchers


def channels_last_variant(t: torch.Tensor) -> bool:
    """Whether the channel-contiguous kernel variant suits ``t`` (N, C, H, W). Decided by
    ``is_contiguous`` rather than by comparing strides, which stays clear of guards on symbolic
    shapes under torch.compile."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is contiguous or channels_last (read in place, no copy), else a contiguous copy."""
    return t if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last) else t.contiguous()


def dense_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, flattened pixel ``h * W + w``) strides of a ``dense`` tensor, from its
    shape: a size-1 dimension may report any stride."""
    _, c, h, w = t.shape
    if t.is_contiguous():
        return c * h * w, h * w, 1
    return h * w * c, 1, c


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
