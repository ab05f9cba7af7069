"""``F.linear`` whose weight gradient comes straight from the matrix product, in float32, or is
the optimizer's step instead.

Under CUDA autocast a linear layer runs in bfloat16 (or float16) on a low-precision copy of the
float32 weight, and its backward computes the weight and bias gradients in that dtype and then
casts them to float32: a pass over the gradient that costs AlexNet's fc6 (9216 x 4096) 0.11 ms per
step on the H200, as much as its three matrix products. cuBLAS can write the float32 product of
bfloat16 operands itself (``torch.mm(..., out_dtype=torch.float32)``), which drops the pass and a
rounding of the gradient. The forward is autocast's: the same casts (served from the copies
``alexnet_fast.optim.SGD`` keeps, when current), the same product.

In a training step whose optimizer steps in the backward (``alexnet_fast.optim.SGD(...,
step_in_backward=True)``), the backward hands the weight gradient's operands to
``alexnet_fast.optim.step_in_backward``, which steps the weight in the product's epilogue; the
weight then gets no gradient. The input gradient is computed first, from the weight as the
forward used it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from alexnet_fast import optim

# out_dtype products (CUDA kernels only) arrived in torch 2.8; older versions cast afterwards.
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def _float32_product(a: Tensor, b: Tensor) -> Tensor:
    if a.dtype == torch.float32:
        return torch.mm(a, b)
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a, b).float()


class _Linear(torch.autograd.Function):
    """``F.linear`` on the operands as given (``dtype`` None) or cast to the autocast ``dtype``."""

    @staticmethod
    def forward(ctx, x, weight, bias, dtype):
        if dtype is None:
            x_in, w_in, b_in = x, weight, bias
        else:
            x_in, w_in = x.to(dtype), optim.cast(weight, dtype)
            b_in = None if bias is None else optim.cast(bias, dtype)
        ctx.save_for_backward(x_in, w_in, weight)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return F.linear(x_in, w_in, b_in)

    @staticmethod
    def backward(ctx, grad):
        x_in, w_in, weight = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        rows = grad.reshape(-1, grad.shape[-1])
        x_rows = x_in.reshape(-1, x_in.shape[-1])
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = (grad @ w_in).to(x_dtype)
        if ctx.needs_input_grad[2]:
            gb = rows.sum(0, dtype=torch.float32).to(b_dtype)
        if ctx.needs_input_grad[1] and not optim.step_in_backward(weight, rows, x_rows):
            gw = _float32_product(rows.t(), x_rows).to(w_dtype)
        return gx, gw, gb, None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` with the backward above: for float32 operands, and under CUDA
    autocast to bfloat16/float16 with a float32 weight. Anywhere else it is ``F.linear``."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        if not (x.is_cuda and weight.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16)):
            return F.linear(x, weight, bias)
        return _Linear.apply(x, weight, bias, dtype)
    if x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32):
        return _Linear.apply(x, weight, bias, None)
    return F.linear(x, weight, bias)
