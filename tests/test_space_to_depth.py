"""The space-to-depth rewrite of strided convolutions (alexnet_fast.space_to_depth): in float64
through PyTorch's stride-1 convolution, it must give the strided convolution's output and
gradients to rounding, for every geometry, including kernels smaller than the stride, padding,
and inputs whose last rows no window reads."""
import random

import pytest
import torch
from conftest import assert_close, random_input

from alexnet_fast import reference, space_to_depth


def _stride1(x, weight, bias):
    # NCHW: PyTorch's CPU convolution fails some channels_last backwards ("grad_weight must be
    # contiguous"); the blocks' layout is checked on the GPU, through the cudnn_s2d path.
    return reference.conv2d_relu(x.contiguous(), weight, bias, (1, 1), (0, 0))


def _cases():
    """Fixed corner cases, then random geometries."""
    cases = [
        ((2, 3, 27, 27), (8, 3, 11, 11), (4, 4), (0, 0)),  # conv1-like: the blocks tile the input
        ((2, 3, 30, 29), (8, 3, 11, 11), (4, 4), (0, 0)),  # rows and columns past the last window
        ((1, 2, 9, 9), (3, 2, 1, 1), (2, 2), (0, 0)),  # kernel smaller than the stride
        ((1, 4, 9, 8), (7, 4, 5, 5), (2, 2), (2, 2)),  # padding
        ((1, 4, 7, 9), (6, 4, 3, 2), (2, 1), (1, 0)),  # one stride 1
        ((2, 5, 6, 7), (3, 5, 3, 3), (1, 1), (1, 1)),  # no stride: the blocks are the padded input
        ((1, 3, 11, 11), (4, 3, 11, 11), (4, 4), (0, 0)),  # a 1x1 output
    ]
    rng = random.Random(0)
    for _ in range(12):
        sh, sw = rng.randint(1, 5), rng.randint(1, 5)
        kh, kw = rng.randint(1, 8), rng.randint(1, 8)
        ph, pw = rng.randint(0, kh // 2), rng.randint(0, kw // 2)
        h, w = rng.randint(max(kh - 2 * ph, 1), 23), rng.randint(max(kw - 2 * pw, 1), 23)
        cases.append(((rng.randint(1, 3), rng.randint(1, 5), h, w), (rng.randint(1, 9), 0, kh, kw), (sh, sw), (ph, pw)))
    return [(xs, (ws[0], xs[1], ws[2], ws[3]), s, p) for xs, ws, s, p in cases]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", _cases(), ids=str)
def test_space_to_depth_equals_the_strided_conv(case, layout):
    xs, ws, stride, padding = case
    x = random_input(xs, torch.float64, "cpu", layout).requires_grad_()
    w = random_input(ws, torch.float64, "cpu").requires_grad_()
    b = random_input((ws[0],), torch.float64, "cpu", scale=0.1).requires_grad_()
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    out = space_to_depth.conv2d_relu(x, w, b, stride, padding, _stride1, fmt)
    ref = reference.conv2d_relu(x, w, b, stride, padding)
    assert out.shape == ref.shape and out.is_contiguous(memory_format=fmt)
    assert_close(out, ref, torch.float64, "gemm", what=f"forward {case}")
    g = random_input(ref.shape, torch.float64, "cpu")
    grads = torch.autograd.grad(out, (x, w, b), g)
    assert grads[0].is_contiguous(memory_format=fmt), f"grad x strides {grads[0].stride()}"
    for name, got, want in zip("xwb", grads, torch.autograd.grad(ref, (x, w, b), g)):
        assert_close(got, want, torch.float64, "gemm", what=f"grad {name} {case}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", _cases()[:5], ids=str)
def test_blocks_moved_as_words_equal_the_differentiable_copy(case, dtype):
    """Without a gradient to follow, block rows move as 8/4/2-byte words (by their width and the
    input's offset); the blocks must be the same bits as from the differentiable copy."""
    xs, ws, stride, padding = case
    for layout in ("channels_last", "contiguous"):
        for sliced in (False, True):  # a batch slice: the storage offset decides the word
            x = random_input((xs[0] + 1, *xs[1:]), dtype, "cpu", layout)
            x = x[1:] if sliced else x[:-1]
            fast = space_to_depth.block_input(x, ws[-2:], stride, padding)
            slow = space_to_depth.block_input(x.detach().requires_grad_(), ws[-2:], stride, padding)
            assert fast.dtype == dtype and fast.is_contiguous(memory_format=torch.channels_last)
            assert torch.equal(fast, slow.detach()), (layout, sliced)


def test_block_layout():
    """Channel (i*sw + j)*C + c of block (h, w) is padded input pixel (h*sh + i, w*sw + j), channel c."""
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float64).reshape(2, 3, 8, 8)
    blocks = space_to_depth.block_input(x, (4, 4), (4, 4), (0, 0))
    assert blocks.shape == (2, 48, 2, 2) and blocks.is_contiguous(memory_format=torch.channels_last)
    for i, j, c, h, w in [(0, 0, 0, 0, 0), (1, 2, 1, 1, 0), (3, 3, 2, 1, 1)]:
        assert blocks[1, (i * 4 + j) * 3 + c, h, w] == x[1, c, h * 4 + i, w * 4 + j]
    weight = torch.randn(5, 3, 3, 3, dtype=torch.float64)
    blocked = space_to_depth.block_weight(weight, (2, 2))
    assert blocked.shape == (5, 12, 2, 2)
    assert blocked[4, (1 * 2 + 0) * 3 + 2, 0, 1] == weight[4, 2, 1, 2]
    assert blocked[0, (1 * 2 + 1) * 3, 1, 1] == 0  # the zero tap past the 3x3 kernel
