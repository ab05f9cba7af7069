"""The PyTorch reference of every op: the ground truth of every test and the ``torch`` backend.

Semantics the kernels must reproduce exactly:

* ``conv2d_relu(x, w, b, stride, padding) = relu(conv2d(x, w, b, stride, padding))`` (groups=1,
  dilation=1). Its gradients use the ReLU mask ``out > 0`` (PyTorch's ``threshold_backward``).
* ``lrn`` is ``torch.nn.functional.local_response_norm``:
  ``out[c] = x[c] / (k + alpha / size * sum_{j in W(c)} x[j]^2) ** beta`` with the window
  ``W(c) = [c - size // 2, c + (size - 1) // 2]`` clipped to ``[0, C)`` (zero padding across
  channels), for odd and even ``size``.
* ``max_pool2d`` is ``torch.nn.functional.max_pool2d``: padded positions never win; each window is
  scanned in row-major order and an element replaces the running maximum when it is greater or is
  NaN. So ties go to the first maximum, and a NaN wins (the last NaN when several). The gradient
  flows to that one element.
* ``lrn_max_pool2d`` is ``max_pool2d(lrn(x))`` with padding 0 and ceil_mode False.

The ``indices`` our kernels return (see :func:`max_pool2d_indices`) are the window-local offset
``kh * kernel_w + kw`` of the winning element as uint8, an eighth of the bytes of PyTorch's int64
flat indices; this module derives them from PyTorch's own indices so tests can compare them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv2d_relu(x, weight, bias=None, stride=(1, 1), padding=(0, 0)):
    return F.relu(F.conv2d(x, weight, bias, stride, padding))


def lrn(x, size=5, alpha=1e-4, beta=0.75, k=2.0):
    return F.local_response_norm(x, size, alpha, beta, k)


def max_pool2d(x, kernel_size=(3, 3), stride=(2, 2), padding=(0, 0), ceil_mode=False):
    return F.max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode)


def lrn_max_pool2d(x, size=5, alpha=1e-4, beta=0.75, k=2.0, kernel_size=(3, 3), stride=(2, 2)):
    return max_pool2d(lrn(x, size, alpha, beta, k), kernel_size, stride)


def max_pool2d_indices(x, kernel_size=(3, 3), stride=(2, 2), padding=(0, 0), ceil_mode=False):
    """Window-local uint8 offsets of the element each output took, from PyTorch's flat indices."""
    kh, kw = kernel_size
    _, idx = F.max_pool2d(x, kernel_size, stride, padding, ceil_mode=ceil_mode, return_indices=True)
    w_in = x.shape[-1]
    oh = torch.arange(idx.shape[-2], device=x.device).view(-1, 1)
    ow = torch.arange(idx.shape[-1], device=x.device).view(1, -1)
    row = idx // w_in - (oh * stride[0] - padding[0])
    col = idx % w_in - (ow * stride[1] - padding[1])
    assert bool(((row >= 0) & (row < kh) & (col >= 0) & (col < kw)).all())
    return (row * kw + col).to(torch.uint8)


def pool_output_size(size: int, kernel: int, stride: int, padding: int, ceil_mode: bool) -> int:
    """Output length of one pooled dimension, PyTorch's rule (a last window must start inside
    the input or its left padding)."""
    num = size + 2 * padding - kernel
    out = (num + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def conv_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1
