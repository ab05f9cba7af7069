"""``F.linear`` under CUDA autocast with its float32 gradients written by the matrix products.

Autocast runs a linear layer in bfloat16 (or float16) on a low-precision copy of the float32
weight, and its backward computes the weight and bias gradients in that dtype and then casts
them to float32: a pass over the gradient that costs AlexNet's fc6 (9216 x 4096) 0.11 ms per step
on the H200, as much as its three matrix products. cuBLAS can write the float32 product of
bfloat16 operands itself (``torch.mm(..., out_dtype=torch.float32)``), which drops the pass and
a rounding of the gradient. The forward is autocast's: the same casts (served from the copies
``alexnet_fast.optim.SGD`` keeps, when current), the same product.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alexnet_fast import optim

# out_dtype products (CUDA kernels only) arrived in torch 2.8; older versions cast afterwards.
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _float32_product(a: Tensor, b: Tensor) -> Tensor:
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


class _AutocastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        x_low, w_low = x.to(dtype), optim.cast(weight, dtype)
        ctx.save_for_backward(x_low, w_low)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.linear(x_low, w_low, None if bias is None else optim.cast(bias, dtype))

    @staticmethod
    def backward(ctx, grad):
        x_low, w_low = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        rows = grad.reshape(-1, grad.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (grad @ w_low).to(x_dtype)
        if ctx.needs_input_grad[1]:
            gw = _float32_product(rows.t(), x_low.reshape(-1, x_low.shape[-1])).to(w_dtype)
        if ctx.needs_input_grad[2]:
            gb = rows.sum(0, dtype=torch.float32).to(b_dtype)
        return gx, gw, gb, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``; under CUDA autocast with float32 parameters, with the
    gradients above. Anywhere else it is ``F.linear``."""
    if (x.is_cuda and torch.is_autocast_enabled("cuda") and weight.dtype == torch.float32
            and torch.get_autocast_dtype("cuda") in (torch.bfloat16, torch.float16)):
        return _AutocastLinear.apply(x, weight, bias, torch.get_autocast_dtype("cuda"))
    return F.linear(x, weight, bias)
