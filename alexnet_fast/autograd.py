"""Autograd formulas of our ops, shared by every op namespace that holds our schemas: the native
library ``torch.ops.alexnet_fast`` and the Triton ops (``alexnet_fast/triton``), which mirror it.

What each forward keeps for backward (counted in bytes, see BENCHMARKS.md):
* conv2d_relu (and conv2d_relu_cudnn): x, weight and its output (the ReLU mask is ``out > 0``;
  no mask tensor).
* lrn: only x, which the preceding conv2d_relu keeps anyway; backward recomputes the denominator.
* max_pool2d: uint8 window offsets (an eighth of PyTorch's int64 indices); not x.
* lrn_max_pool2d: x and the uint8 offsets; the LRN output is never stored.
"""
import torch


ALL_OPS = ("conv2d_relu", "lrn", "max_pool2d", "lrn_max_pool2d")


def register(ns, ops=ALL_OPS) -> None:
    """Register the autograd formulas of ``ops`` (forward names) for the op namespace ``ns``
    (e.g. ``torch.ops.alexnet_fast``); each forward's backward op must exist in ``ns``."""
    unknown = set(ops) - set(ALL_OPS)
    if unknown:
        raise ValueError(f"ops must be among {ALL_OPS}, got {sorted(unknown)}")
    def conv_setup(ctx, inputs, output):
        x, weight, bias, stride, padding = inputs
        ctx.save_for_backward(x, weight, output)
        ctx.stride, ctx.padding, ctx.has_bias = stride, padding, bias is not None

    def conv_backward(ctx, grad):
        x, weight, out = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = ns.conv2d_relu_backward_input(grad, out, weight, list(x.shape[-2:]), ctx.stride, ctx.padding)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            gw, gb = ns.conv2d_relu_backward_weight(grad, out, x, list(weight.shape[-2:]), ctx.stride, ctx.padding)
        return gx, gw, gb if ctx.has_bias else None, None, None

    if "conv2d_relu" in ops:
        torch.library.register_autograd(ns.conv2d_relu.default, conv_backward, setup_context=conv_setup)

    def lrn_setup(ctx, inputs, output):
        x, *ctx.params = inputs
        ctx.save_for_backward(x)

    def lrn_backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return ns.lrn_backward(grad, x, *ctx.params), None, None, None, None

    if "lrn" in ops:
        torch.library.register_autograd(ns.lrn.default, lrn_backward, setup_context=lrn_setup)

    def pool_setup(ctx, inputs, output):
        x, ctx.kernel_size, ctx.stride, ctx.padding, _ = inputs
        ctx.input_hw = list(x.shape[-2:])
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])

    def pool_backward(ctx, grad, _grad_indices):
        (indices,) = ctx.saved_tensors
        gx = ns.max_pool2d_backward(grad, indices, ctx.input_hw, ctx.kernel_size, ctx.stride, ctx.padding)
        return gx, None, None, None, None

    if "max_pool2d" in ops:
        torch.library.register_autograd(ns.max_pool2d.default, pool_backward, setup_context=pool_setup)

    def fused_setup(ctx, inputs, output):
        x, *ctx.params = inputs
        ctx.save_for_backward(x, output[1])
        ctx.mark_non_differentiable(output[1])

    def fused_backward(ctx, grad, _grad_indices):
        x, indices = ctx.saved_tensors
        return (ns.lrn_max_pool2d_backward(grad, x, indices, *ctx.params),) + (None,) * 6

    if "lrn_max_pool2d" in ops:
        torch.library.register_autograd(ns.lrn_max_pool2d.default, fused_backward, setup_context=fused_setup)


def register_conv(ns, forward: str, backward: str) -> None:
    """The autograd formula of the conv+ReLU op ``ns.<forward>`` (the schema of conv2d_relu) whose
    one backward op ``ns.<backward>(grad, out, x, weight, stride, padding, output_mask)`` returns
    the gradients asked for (an empty tensor in place of the others), so that the two GEMMs share
    whatever pass over the gradient they need."""
    def setup(ctx, inputs, output):
        x, weight, _, ctx.stride, ctx.padding = inputs
        ctx.save_for_backward(x, weight, output)

    def backward_formula(ctx, grad):
        x, weight, out = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])  # a missing bias needs no gradient
        grads = getattr(ns, backward)(grad, out, x, weight, ctx.stride, ctx.padding, mask)
        return tuple(g if wanted else None for g, wanted in zip(grads, mask)) + (None, None)

    torch.library.register_autograd(getattr(ns, forward).default, backward_formula, setup_context=setup)
