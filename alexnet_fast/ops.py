"""The public ops, their argument checks, backend dispatch, and the Python-side registration of
the native ops (fake kernels for torch.compile, autograd formulas).

Every public op accepts ``backend=None`` (the current default, see ``alexnet_fast.set_backend``)
or one of ``"auto" | "torch" | "native" | "triton"``. Outputs keep the input's memory format:
channels_last in, channels_last out.

Autocast: ``conv2d_relu`` runs in the autocast dtype as ``F.conv2d`` does; ``lrn`` and
``max_pool2d`` keep their input's dtype (they accumulate in float32 internally).
"""
from __future__ import annotations

import numbers

import torch
from torch import Tensor

from alexnet_fast import autograd, autotable, backends, optim, reference, space_to_depth

__all__ = ["conv2d_relu", "lrn", "max_pool2d", "lrn_max_pool2d", "conv2d_relu_lrn_max_pool2d",
           "conv2d_relu_max_pool2d"]

# uint8 window offsets hold kernel areas up to 256.
MAX_POOL_WINDOW = 256


# ---------------------------------------------------------------------------------------------
# argument checks: one set for every backend, so every backend fails the same way
# ---------------------------------------------------------------------------------------------
def _pair(value, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (int(value), int(value))
    elif isinstance(value, (tuple, list)) and len(value) == 2 and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        value = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(value) < minimum:
        what = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


def _check_input(x, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_lrn(size, alpha, beta, k) -> None:
    if not isinstance(size, numbers.Integral) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    for name, v in (("alpha", alpha), ("beta", beta), ("k", k)):
        if not isinstance(v, numbers.Real) or isinstance(v, bool):
            raise TypeError(f"{name} must be a real number, got {v!r}")
    if k <= 0 and beta != 0:
        raise ValueError(f"k must be positive (the denominator is k + alpha/size * sum(x^2)), got {k}")


def _check_pool(x: Tensor, kernel_size, stride, padding, ceil_mode):
    kernel_size = _pair(kernel_size, "kernel_size", 1)
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    if not isinstance(ceil_mode, bool):
        raise TypeError(f"ceil_mode must be a bool, got {ceil_mode!r}")
    if kernel_size[0] * kernel_size[1] > MAX_POOL_WINDOW:
        raise ValueError(f"kernel_size {kernel_size} has more than {MAX_POOL_WINDOW} elements (indices are uint8)")
    if any(p * 2 > k for p, k in zip(padding, kernel_size)):
        raise ValueError(f"padding {padding} must be at most half of kernel_size {kernel_size}")
    out_hw = [
        reference.pool_output_size(n, k, s, p, ceil_mode)
        for n, k, s, p in zip(x.shape[-2:], kernel_size, stride, padding)
    ]
    if min(out_hw) < 1:
        raise ValueError(
            f"kernel_size {kernel_size} is larger than the padded input {tuple(x.shape[-2:])} "
            f"with padding {padding}: the output would be empty")
    return kernel_size, stride, padding


def _check_conv(x: Tensor, weight, bias, stride, padding):
    _check_input(weight, "weight")
    if weight.shape[0] < 1 or min(weight.shape[-2:]) < 1:
        raise ValueError(f"weight must have at least one output channel and a non-empty kernel, got shape {tuple(weight.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"weight must have x's {x.shape[1]} input channels in dim 1 (groups=1), got shape {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on x's device {x.device}, got {weight.device}")
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],):
            got = tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__
            raise ValueError(f"bias must be None or a tensor of shape ({weight.shape[0]},), got {got}")
        if bias.device != x.device:
            raise ValueError(f"bias must be on x's device {x.device}, got {bias.device}")
    if not torch.is_autocast_enabled(x.device.type) and (
            weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype)):
        raise TypeError(
            f"weight and bias must have x's dtype {x.dtype} outside autocast, got weight {weight.dtype}"
            + (f", bias {bias.dtype}" if bias is not None else ""))
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    for n, k, p in zip(x.shape[-2:], weight.shape[-2:], padding):
        if n + 2 * p < k:
            raise ValueError(
                f"kernel {tuple(weight.shape[-2:])} is larger than the padded input "
                f"{tuple(x.shape[-2:])} with padding {padding}")
    return stride, padding


def _autocast(x: Tensor, weight: Tensor, bias):
    """Cast conv operands as autocast would for F.conv2d; the ops carry no Autocast kernel, so a
    direct torch.ops call runs in the dtypes it is given. The parameters come from the copies
    ``alexnet_fast.optim.SGD`` keeps, when current."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.dtype != torch.float64:  # autocast leaves float64 alone
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), optim.cast(weight, dtype)
        bias = optim.cast(bias, dtype) if bias is not None else None
    return x, weight, bias


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------
def kernels(backend: str):
    """The op namespace of a kernel backend: ``torch.ops.alexnet_fast`` (native) or
    ``torch.ops.alexnet_fast_triton``; both hold the same schemas (csrc/ops.cpp)."""
    if backend not in ("native", "triton"):
        raise ValueError(f"backend must be 'native' or 'triton', got {backend!r}")
    backends.resolve(backend, "kernels", "cuda" if torch.cuda.is_available() else "cpu")
    return _namespace(backend)


def _namespace(name: str):
    return torch.ops.alexnet_fast if name == "native" else torch.ops.alexnet_fast_triton


def conv2d_relu(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                backend: str | None = None) -> Tensor:
    """``relu(conv2d(x, weight, bias, stride, padding))`` with groups=1, dilation=1."""
    stride, padding, name = _resolve_conv(x, weight, bias, stride, padding, backend)
    return _conv2d_relu(name, x, weight, bias, stride, padding)


def _resolve_conv(x: Tensor, weight: Tensor, bias, stride, padding, backend):
    """The checked (stride, padding) of a convolution and what runs it."""
    _check_input(x)
    stride, padding = _check_conv(x, weight, bias, stride, padding)
    shape_key = autotable.conv_key(x.shape[1], weight.shape[0], weight.shape[-2:], stride)
    return stride, padding, backends.resolve(backend, "conv2d_relu", x.device.type, shape_key)


def _conv2d_relu(name: str, x: Tensor, weight: Tensor, bias, stride, padding) -> Tensor:
    """conv2d_relu through ``name`` (a concrete backend or an auto-only conv path) on checked
    arguments."""
    if name == "torch":
        return reference.conv2d_relu(x, weight, bias, stride, padding)
    x, weight, bias = _autocast(x, weight, bias)
    if name == "cudnn":
        return torch.ops.alexnet_fast.conv2d_relu_cudnn(x, weight, bias, list(stride), list(padding))
    if name == "cudnn_s2d":
        return conv2d_relu_cudnn_s2d(x, weight, bias, stride, padding)
    impl = _namespace(name)
    return impl.conv2d_relu(x, weight, bias, list(stride), list(padding))


def conv2d_relu_cudnn_s2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride, padding) -> Tensor:
    """auto's ``cudnn_s2d`` choice: ``conv2d_relu_cudnn`` at stride 1 on the space-to-depth blocks
    of x (``alexnet_fast.space_to_depth``); the operands as that op takes them (no checks, no
    autocast)."""
    def stride1(blocks, blocked_weight, bias):
        return torch.ops.alexnet_fast.conv2d_relu_cudnn(blocks, blocked_weight, bias, [1, 1], [0, 0])

    return space_to_depth.conv2d_relu(x, weight, bias, stride, padding, stride1, output_memory_format(x))


class ConvReLUPool(torch.autograd.Function):
    """``pool(conv2d_relu_cudnn(x, weight, bias))`` on the native ops as one autograd node, the pool
    being ``lrn_max_pool2d`` (``lrn_args`` given) or ``max_pool2d`` (``lrn_args`` None; no padding,
    floor mode). Its backward takes the ReLU with the pool, where the two ops apart pass the
    full-resolution gradient through memory once more (``conv2d_relu_cudnn_backward``'s mask and
    bias pass):

    * after LRN->max-pool, one pass does the pool's and the LRN's gradient, the ReLU mask and the
      bias gradient's channel sums (``lrn_max_pool2d_backward_relu``);
    * after a plain max-pool, the mask is applied to the pooled gradient: the element a window
      took holds the window's maximum, so its ReLU output is positive exactly where the pooled
      output is (NaN included), and its gradient is the pooled one. The bias gradient is then
      the sum of the masked pooled gradient (``relu_backward_bias`` on the pooled tensors), and
      ``max_pool2d_backward`` spreads it.

    cuDNN's input and weight gradients take the result as it is."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, lrn_args, pool_args):
        ns = torch.ops.alexnet_fast
        out = ns.conv2d_relu_cudnn(x, weight, bias, stride, padding)
        if lrn_args is None:
            pooled, indices = ns.max_pool2d(out, *pool_args, [0, 0], False)
            ctx.save_for_backward(x, weight, pooled, indices)  # the mask's source: pooled, not out
            ctx.input_hw = list(out.shape[-2:])
        else:
            pooled, indices = ns.lrn_max_pool2d(out, *lrn_args, *pool_args)
            ctx.save_for_backward(x, weight, out, indices)
        ctx.args = (stride, padding, lrn_args, pool_args, bias is not None)
        return pooled

    @staticmethod
    def backward(ctx, grad):
        ns = torch.ops.alexnet_fast
        x, weight, kept, indices = ctx.saved_tensors
        stride, padding, lrn_args, pool_args, has_bias = ctx.args
        if lrn_args is None:
            masked, bias_grad = ns.relu_backward_bias(grad, kept)
            dz = ns.max_pool2d_backward(masked, indices, ctx.input_hw, *pool_args, [0, 0])
        else:
            dz, bias_grad = ns.lrn_max_pool2d_backward_relu(grad, kept, indices, *lrn_args, *pool_args)
        fmt = output_memory_format(x)  # cuDNN's layout, as conv2d_relu_cudnn_backward gives it
        gx, gw, _ = torch.ops.aten.convolution_backward(
            dz, x.contiguous(memory_format=fmt), weight.contiguous(memory_format=fmt), None, stride, padding, [1, 1],
            False, [0, 0], 1, [ctx.needs_input_grad[0], ctx.needs_input_grad[1], False])
        return gx, gw, bias_grad if has_bias else None, None, None, None, None


def _conv2d_relu_pool(x, weight, bias, stride, padding, lrn_params, kernel_size, pool_stride, backend) -> Tensor:
    """``pool(conv2d_relu(x, ...))`` with the pool ``lrn_max_pool2d`` (``lrn_params`` = (size,
    alpha, beta, k)) or ``max_pool2d`` (None): :class:`ConvReLUPool` where the backend runs the
    convolution through cuDNN (``auto`` on the GPU) and the pool through the native kernels, the
    two ops elsewhere and under torch.compile."""
    conv_stride, conv_padding, conv_name = _resolve_conv(x, weight, bias, stride, padding, backend)
    pool_op = "max_pool2d" if lrn_params is None else "lrn_max_pool2d"
    if (conv_name in backends.CONV_ONLY and not torch.compiler.is_compiling()
            and backends.resolve(backend, pool_op, x.device.type) == "native"):
        lrn_args = None
        if lrn_params is not None:
            _check_lrn(*lrn_params)
            size, alpha, beta, k = lrn_params
            lrn_args = (int(size), float(alpha), float(beta), float(k))
        conv_out = torch.empty(conv_out_shape(x, weight, conv_stride, conv_padding), device="meta")
        pool_kernel, pool_step, _ = _check_pool(conv_out, kernel_size, pool_stride, 0, False)
        pool_args = (list(pool_kernel), list(pool_step))
        x, weight, bias = _autocast(x, weight, bias)
        if conv_name == "cudnn":
            return ConvReLUPool.apply(x, weight, bias, list(conv_stride), list(conv_padding), lrn_args, pool_args)

        def stride1(blocks, blocked_weight, bias):
            return ConvReLUPool.apply(blocks, blocked_weight, bias, [1, 1], [0, 0], lrn_args, pool_args)

        return space_to_depth.conv2d_relu(x, weight, bias, conv_stride, conv_padding, stride1,
                                          output_memory_format(x))
    out = _conv2d_relu(conv_name, x, weight, bias, conv_stride, conv_padding)
    if lrn_params is None:
        return max_pool2d(out, kernel_size, pool_stride, backend=backend)
    return lrn_max_pool2d(out, *lrn_params, kernel_size, pool_stride, backend=backend)


def conv2d_relu_lrn_max_pool2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                               size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                               kernel_size=3, pool_stride=2, backend: str | None = None) -> Tensor:
    """``lrn_max_pool2d(conv2d_relu(x, weight, bias, stride, padding), size, alpha, beta, k,
    kernel_size, pool_stride)``: AlexNet's conv1 and conv2 with what follows them, as one autograd
    node where that saves a pass (:class:`ConvReLUPool`)."""
    return _conv2d_relu_pool(x, weight, bias, stride, padding, (size, alpha, beta, k), kernel_size, pool_stride,
                             backend)


def conv2d_relu_max_pool2d(x: Tensor, weight: Tensor, bias: Tensor | None = None, stride=1, padding=0,
                           kernel_size=3, pool_stride=2, backend: str | None = None) -> Tensor:
    """``max_pool2d(conv2d_relu(x, weight, bias, stride, padding), kernel_size, pool_stride)``:
    AlexNet's conv5 with its pool, as one autograd node where that saves a pass
    (:class:`ConvReLUPool`)."""
    return _conv2d_relu_pool(x, weight, bias, stride, padding, None, kernel_size, pool_stride, backend)


def lrn(x: Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
        backend: str | None = None) -> Tensor:
    """``torch.nn.functional.local_response_norm`` over channels (alpha is divided by size)."""
    _check_input(x)
    _check_lrn(size, alpha, beta, k)
    name = backends.resolve(backend, "lrn", x.device.type)
    if name == "torch":
        return reference.lrn(x, size, alpha, beta, k)
    impl = _namespace(name)
    return impl.lrn(x, int(size), float(alpha), float(beta), float(k))


def max_pool2d(x: Tensor, kernel_size=3, stride=2, padding=0, ceil_mode: bool = False,
               backend: str | None = None) -> Tensor:
    """``torch.nn.functional.max_pool2d`` (first maximum wins ties; NaN propagates)."""
    _check_input(x)
    kernel_size, stride, padding = _check_pool(x, kernel_size, stride, padding, ceil_mode)
    name = backends.resolve(backend, "max_pool2d", x.device.type)
    if name == "torch":
        return reference.max_pool2d(x, kernel_size, stride, padding, ceil_mode)
    impl = _namespace(name)
    return impl.max_pool2d(x, list(kernel_size), list(stride), list(padding), ceil_mode)[0]


def lrn_max_pool2d(x: Tensor, size: int = 5, alpha: float = 1e-4, beta: float = 0.75, k: float = 2.0,
                   kernel_size=3, stride=2, backend: str | None = None) -> Tensor:
    """``max_pool2d(lrn(x, size, alpha, beta, k), kernel_size, stride)`` in one pass."""
    _check_input(x)
    _check_lrn(size, alpha, beta, k)
    kernel_size, stride, _ = _check_pool(x, kernel_size, stride, 0, False)
    name = backends.resolve(backend, "lrn_max_pool2d", x.device.type)
    if name == "torch":
        return reference.lrn_max_pool2d(x, size, alpha, beta, k, kernel_size, stride)
    impl = _namespace(name)
    return impl.lrn_max_pool2d(x, int(size), float(alpha), float(beta), float(k), list(kernel_size),
                               list(stride))[0]


# ---------------------------------------------------------------------------------------------
# registration of the native ops: fake kernels (shapes for torch.compile) and autograd
# ---------------------------------------------------------------------------------------------
def output_memory_format(x: Tensor) -> torch.memory_format:
    """The layout our kernels write: channels_last for channels_last inputs, else contiguous
    (the same rule as csrc/checks.h's output_memory_format)."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def empty_output(shape, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An output of ``shape`` in ``like``'s output layout, allocated as the C++ kernels allocate
    theirs (``at::empty`` with a memory format), so that the strides agree also on dimensions
    of size 1, where ``.contiguous(memory_format=...)`` would keep the default strides."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device,
                       memory_format=output_memory_format(like))


def conv_out_shape(x: Tensor, weight: Tensor, stride, padding):
    oh, ow = (reference.conv_output_size(n, k, s, p)
              for n, k, s, p in zip(x.shape[-2:], weight.shape[-2:], stride, padding))
    return (x.shape[0], weight.shape[0], oh, ow)


def pool_out_shape(x: Tensor, kernel_size, stride, padding, ceil_mode):
    oh, ow = (reference.pool_output_size(n, k, s, p, ceil_mode)
              for n, k, s, p in zip(x.shape[-2:], kernel_size, stride, padding))
    return (x.shape[0], x.shape[1], oh, ow)


def _register_native() -> None:
    lib = "alexnet_fast::"
    reg = torch.library.register_fake

    @reg(lib + "conv2d_relu")
    def _(x, weight, bias, stride, padding):
        return empty_output(conv_out_shape(x, weight, stride, padding), x)

    @reg(lib + "conv2d_relu_backward_input")
    def _(grad_out, out, weight, input_hw, stride, padding):
        return empty_output((grad_out.shape[0], weight.shape[1], *input_hw), grad_out)

    @reg(lib + "conv2d_relu_backward_weight")
    def _(grad_out, out, x, kernel_hw, stride, padding):
        return (grad_out.new_empty((grad_out.shape[1], x.shape[1], *kernel_hw)),
                grad_out.new_empty((grad_out.shape[1],)))

    @reg(lib + "conv2d_relu_cudnn")
    def _(x, weight, bias, stride, padding):
        return empty_output(conv_out_shape(x, weight, stride, padding), x)

    @reg(lib + "relu_backward_bias")
    def _(grad_out, out):
        return empty_output(grad_out.shape, out), grad_out.new_empty((grad_out.shape[1],))

    @reg(lib + "conv2d_relu_cudnn_backward")
    def _(grad_out, out, x, weight, stride, padding, output_mask):
        shapes = (x.shape, weight.shape, None)
        return tuple((empty_output(shape, x) if shape else x.new_empty((weight.shape[0],))) if wanted
                     else x.new_empty((0,)) for shape, wanted in zip(shapes, output_mask))

    @reg(lib + "lrn")
    def _(x, size, alpha, beta, k):
        return torch.empty_like(x, memory_format=output_memory_format(x))

    @reg(lib + "lrn_backward")
    def _(grad_out, x, size, alpha, beta, k):
        return torch.empty_like(x, memory_format=output_memory_format(x))

    def pool_fake(x, kernel_size, stride, padding, ceil_mode):
        shape = pool_out_shape(x, kernel_size, stride, padding, ceil_mode)
        return empty_output(shape, x), empty_output(shape, x, torch.uint8)

    reg(lib + "max_pool2d")(pool_fake)

    @reg(lib + "max_pool2d_backward")
    def _(grad_out, indices, input_hw, kernel_size, stride, padding):
        return empty_output((*grad_out.shape[:2], *input_hw), grad_out)

    @reg(lib + "lrn_max_pool2d")
    def _(x, size, alpha, beta, k, kernel_size, stride):
        return pool_fake(x, kernel_size, stride, (0, 0), False)

    @reg(lib + "lrn_max_pool2d_backward")
    def _(grad_out, x, indices, size, alpha, beta, k, kernel_size, stride):
        return torch.empty_like(x, memory_format=output_memory_format(x))

    @reg(lib + "lrn_max_pool2d_backward_relu")
    def _(grad_out, x, indices, size, alpha, beta, k, kernel_size, stride):
        return torch.empty_like(x, memory_format=output_memory_format(x)), x.new_empty((x.shape[1],))

    @reg(lib + "sgd_step_")
    def _(params, grads, momentum_buffers, copies, lr, weight_decay, momentum, dampening, nesterov, maximize,
          first_step):
        return None  # writes its arguments in place

    autograd.register(torch.ops.alexnet_fast)
    autograd.register_conv(torch.ops.alexnet_fast, "conv2d_relu_cudnn", "conv2d_relu_cudnn_backward")


if backends.native_build()[0] is not None:
    _register_native()
