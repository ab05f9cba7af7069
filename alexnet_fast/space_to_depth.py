"""A strided convolution as a stride-1 one over the space-to-depth blocks of its input.

With stride (sh, sw), output pixel (y, x) reads input row ``y*sh + u`` for kernel row u. Writing
``u = a*sh + i`` with ``0 <= i < sh`` splits the input into sh x sw blocks: input channel c of
block pixel (i, j) becomes channel ``(i*sw + j)*C + c`` of a block image H/sh x W/sw, and the kernel,
zero-padded to a multiple of the stride, becomes ``ceil(kh/sh) x ceil(kw/sw)`` over those
``sh*sw*C`` channels. The result is the same sum over the same products (plus zero taps), with
stride 1.

Why: AlexNet's conv1 (3 channels, 11x11, stride 4) gives an implicit GEMM a K of 3 per kernel
tap, which no tensor-core tile fills; cuDNN runs it at ~25 TFLOP/s on the H200. As a 3x3 stride-1
convolution over 48 channels (19% more FLOPs, the zero taps) cuDNN runs it about 8x faster
forward (BENCHMARKS.md). The blocks cost one copy of the input, in channels_last.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alexnet_fast import reference

# Integer types by width, to move runs of values as whole words.
_WORDS = {8: torch.int64, 4: torch.int32, 2: torch.int16}


def _blocks(n: int, s: int) -> int:
    return -(-n // s)


class _GradIn(torch.autograd.Function):
    """The identity, whose gradient is made dense in a given memory format (the blocks' backward
    would leave it in theirs)."""

    @staticmethod
    def forward(x, memory_format):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.memory_format = inputs[1]

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=ctx.memory_format), None


def _copy_blocks(nhwc: Tensor, bh: int, sh: int, bw: int, sw: int) -> Tensor:
    """(N, bh*sh, bw*sw, C) -> (N, bh, bw, sh*sw*C), contiguous. A block row of sw*C values is
    contiguous on both sides; PyTorch's strided copy costs per element, so where autograd need not
    follow (a bit cast has no gradient) the rows move as the widest words that divide them. Under
    torch.compile, Inductor writes the copy itself."""
    n, c = nhwc.shape[0], nhwc.shape[-1]
    run = sw * c * nhwc.element_size()
    word = 1
    if not (torch.compiler.is_compiling() or nhwc.requires_grad) and nhwc.is_contiguous():
        offset = nhwc.storage_offset() * nhwc.element_size()
        word = next((b for b in (8, 4, 2) if run % b == 0 and offset % b == 0), 1)
    if word <= nhwc.element_size():
        return nhwc.reshape(n, bh, sh, bw, sw, c).permute(0, 1, 3, 2, 4, 5).reshape(n, bh, bw, sh * sw * c)
    words = nhwc.reshape(n, bh * sh, bw * sw * c).view(_WORDS[word]).reshape(n, bh, sh, bw, run // word)
    # clone, not reshape: fresh strides, which a cast view needs even on dimensions of size 1
    blocks = words.permute(0, 1, 3, 2, 4).clone(memory_format=torch.contiguous_format)
    return blocks.view(n, bh, bw, sh * run // word).view(nhwc.dtype)


def block_input(x: Tensor, kernel_hw, stride, padding) -> Tensor:
    """x (N, C, H, W) as (N, sh*sw*C, OH + kbh - 1, OW + kbw - 1) blocks in channels_last, channel
    ``(i*sw + j)*C + c`` holding padded input pixel ``(h*sh + i, w*sw + j)``; rows and columns
    past the last output's window are cut, zeros fill the padding."""
    n, c, h, w = x.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = (reference.conv_output_size(*a) for a in zip((h, w), kernel_hw, stride, padding))
    bh, bw = oh + _blocks(kernel_hw[0], sh) - 1, ow + _blocks(kernel_hw[1], sw) - 1
    nhwc = x.permute(0, 2, 3, 1)
    # one pad: the zero padding before, and after it zeros up to bh*sh rows (or a cut, negative)
    pads = (0, 0, pw, bw * sw - w - pw, ph, bh * sh - h - ph)
    if any(pads):
        nhwc = F.pad(nhwc, pads)
    return _copy_blocks(nhwc, bh, sh, bw, sw).permute(0, 3, 1, 2)


def block_weight(weight: Tensor, stride) -> Tensor:
    """weight (C_out, C, kh, kw) as (C_out, sh*sw*C, ceil(kh/sh), ceil(kw/sw)), channels ordered as
    ``block_input``'s."""
    c_out, c, kh, kw = weight.shape
    sh, sw = stride
    kbh, kbw = _blocks(kh, sh), _blocks(kw, sw)
    padded = F.pad(weight, (0, kbw * sw - kw, 0, kbh * sh - kh))
    blocks = padded.reshape(c_out, c, kbh, sh, kbw, sw).permute(0, 3, 5, 1, 2, 4)
    return blocks.reshape(c_out, sh * sw * c, kbh, kbw)


def conv2d_relu(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding, conv,
                memory_format: torch.memory_format) -> Tensor:
    """``relu(conv2d(x, weight, bias, stride, padding))`` through ``conv(x, weight, bias)``, a
    stride-1, unpadded conv+bias+ReLU, on the blocks; differentiable where ``conv`` is. The output
    and x's gradient are dense in ``memory_format``."""
    if x.requires_grad:
        x = _GradIn.apply(x, memory_format)
    out = conv(block_input(x, weight.shape[-2:], stride, padding), block_weight(weight, stride), bias)
    return out.contiguous(memory_format=memory_format)
