"""SGD that keeps each parameter's autocast copy and can step Linear weights during the backward,
and the cast the ops take their weights through.

Under autocast, every forward casts each float32 weight to bfloat16 (or float16) before its
convolution or matrix product. For AlexNet's 58 M parameters that is a pass reading 233 MB and
writing 117 MB per step, about 0.13 ms of the 2.6 ms bf16 training step on the H200. The optimizer
writes every parameter anyway, so :class:`SGD` writes the low-precision copy in the same pass
(two bytes more per parameter, ``torch.ops.alexnet_fast.sgd_step_``), and :func:`cast`, through
which ``alexnet_fast.ops`` and ``alexnet_fast.linear`` cast their weights, returns that copy
instead of casting again.

A copy holds exactly the cast's values, and gradients flow through it to the float32 parameter
as through the cast, so training is the same with and without it. It is used only while it is
current: it records the parameter's version counter and storage after the step, so any later
change of the parameter (``load_state_dict``, an initialiser, another optimizer) makes the ops
cast afresh until the next step. Under ``torch.compile`` the ops always cast.

Stepping in the backward (``step_in_backward=True``): the weight gradient of a Linear layer is a
product whose output the optimizer only reads once, to step the weight. Inside
:meth:`SGD.steps_in_backward` (which ``alexnet_fast.step.train_step`` enters around the backward),
the backward of ``alexnet_fast.linear.linear`` hands its operands to :func:`step_in_backward`,
which steps the weight in the product's epilogue (``alexnet_fast/triton/linear_sgd.py``): the
gradient is never written, and the weight has no ``.grad``, so :meth:`SGD.step` leaves it alone.
The rule, the state and the checkpoints are ``torch.optim.SGD``'s. It needs every gradient of the
weight to be that one product, so nothing may read, scale or reduce it: no gradient clipping, no
loss scaler, no DistributedDataParallel (whose all-reduce would come after the step), no
accumulation over several backward passes, no weight used twice in the step (autograd refuses
that one: the first use's step changes the weight the other saved).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from alexnet_fast import backends

__all__ = ["SGD", "cast", "step_in_backward"]

COPY_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class _Copy:
    tensor: Tensor
    version: int = -1  # the parameter's version counter when the copy was written
    data_ptr: int = 0

    def current_for(self, param: Tensor, dtype: torch.dtype) -> bool:
        return (self.tensor.dtype == dtype and self.version == param._version
                and self.data_ptr == param.data_ptr() and self.tensor.shape == param.shape)


_COPIES: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> _Copy


class _Through(torch.autograd.Function):
    """The copy in the forward, the cast's gradient (to the parameter's dtype) in the backward."""

    @staticmethod
    def forward(ctx, param, copy):
        ctx.dtype = param.dtype
        return copy.view_as(copy)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, served from the copy :class:`SGD` wrote when it is current."""
    if t.dtype == dtype or torch.compiler.is_compiling():
        return t.to(dtype)
    copy = _COPIES.get(t)
    if copy is None or not copy.current_for(t, dtype):
        return t.to(dtype)
    if t.requires_grad and torch.is_grad_enabled():
        return _Through.apply(t, copy.tensor)
    return copy.tensor


def _fits_kernel(p: Tensor, buffer: Tensor | None) -> bool:
    """Whether the kernel can step ``p``: it walks the storage of dense float32 tensors, so the
    parameter must be contiguous in some memory format and its gradient and momentum buffer (a
    loaded one may come from a model in another layout) laid out alike."""
    g = p.grad
    dense = p.is_contiguous() or (p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last))
    return (p.dtype == torch.float32 and p.layout == torch.strided and dense
            and g.dtype == torch.float32 and g.layout == torch.strided and g.stride() == p.stride()
            and (buffer is None or (buffer.dtype == torch.float32 and buffer.stride() == p.stride())))


def _fits_fused(param: Tensor, grad_out: Tensor, x: Tensor) -> bool:
    """Whether the fused kernel can step ``param`` with ``grad_out.T @ x`` as the backward's own
    product would compute it: a contiguous float32 weight, 2-D operands of one dtype on its
    device, a device Triton runs on, and float32 operands only where CUDA products use TF32
    (a true float32 product stays PyTorch's)."""
    if not (param.dtype == torch.float32 and param.dim() == 2 and param.is_contiguous() and grad_out.dim() == 2
            and x.dim() == 2 and grad_out.dtype == x.dtype and grad_out.device == param.device == x.device):
        return False
    if grad_out.dtype == torch.float32:
        if param.is_cuda and not torch.backends.cuda.matmul.allow_tf32:
            return False
    elif grad_out.dtype not in COPY_DTYPES:
        return False
    return backends.availability("triton", param.device.type)[0]


# The SGD whose steps_in_backward block runs. A plain global, not a context variable: autograd runs
# a CUDA backward on its own threads, which do not see the caller's context.
_ACTIVE: list = []


def step_in_backward(param: Tensor, grad_out: Tensor, x: Tensor) -> bool:
    """Step ``param`` (a Linear weight) with the gradient ``grad_out.T @ x`` now, if an
    :meth:`SGD.steps_in_backward` block runs, its optimizer holds ``param`` and the fused kernel
    can do it; returns whether it did (the caller then returns no gradient for ``param``)."""
    if not _ACTIVE or torch.compiler.is_compiling():
        return False
    return _ACTIVE[0]._step_from_product(param, grad_out, x)


class SGD(torch.optim.SGD):
    """``torch.optim.SGD`` (the same arguments, state and update rule, evaluated as PyTorch's
    fused CUDA step does) whose step also writes an ``autocast_dtype`` copy of every parameter it
    updates, for :func:`cast` (None: no copies, for training without autocast). The step is one
    kernel per parameter where the native extension runs on the parameters' device and every
    parameter is a dense float32 tensor whose gradient has its strides; otherwise it is
    PyTorch's step followed by the casts. Checkpoints are ``torch.optim.SGD``'s: either loads the
    other's state.

    ``step_in_backward``: Linear weights are stepped by the backward inside
    :meth:`steps_in_backward` (the module docstring gives the conditions)."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 autocast_dtype: torch.dtype | None = torch.bfloat16, step_in_backward: bool = False):
        if autocast_dtype is not None and autocast_dtype not in COPY_DTYPES:
            raise ValueError(f"autocast_dtype must be None or one of {COPY_DTYPES}, got {autocast_dtype}")
        if not isinstance(step_in_backward, bool):
            raise TypeError(f"step_in_backward must be a bool, got {step_in_backward!r}")
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize)
        self.autocast_dtype = autocast_dtype
        self.step_in_backward = step_in_backward

    @contextlib.contextmanager
    def steps_in_backward(self):
        """The block in which a backward steps this optimizer's Linear weights (with
        ``step_in_backward``; otherwise the block changes nothing). Enter it around the
        ``backward()`` of a training step, after ``zero_grad`` and before :meth:`step`."""
        if not self.step_in_backward:
            yield
            return
        if _ACTIVE:
            raise RuntimeError("another SGD's steps_in_backward block is running; one at a time")
        _ACTIVE.append(self)
        try:
            yield
        finally:
            _ACTIVE.clear()

    def _group_of(self, param: Tensor):
        return next((g for g in self.param_groups if any(p is param for p in g["params"])), None)

    def _step_from_product(self, param: Tensor, grad_out: Tensor, x: Tensor) -> bool:
        group = self._group_of(param)
        if group is None or param.grad is not None or not _fits_fused(param, grad_out, x):
            return False  # not ours, or a gradient to add to: the plain product and step()
        state = self.state[param]
        buffer, first_step = None, False
        if group["momentum"] != 0:
            buffer = state.get("momentum_buffer")
            if buffer is not None and not (buffer.dtype == torch.float32 and buffer.is_contiguous()):
                return False
            if buffer is None:  # the first step sets the buffer to the gradient (PyTorch's rule)
                buffer = state["momentum_buffer"] = torch.empty_like(param)
                first_step = True
        copy = self._copy_of(param) if self.autocast_dtype is not None else None
        from alexnet_fast.triton.linear_sgd import linear_weight_grad_sgd_

        linear_weight_grad_sgd_(
            grad_out, x, param, buffer, copy.tensor if copy is not None else None, lr=group["lr"],
            weight_decay=group["weight_decay"], momentum=group["momentum"], dampening=group["dampening"],
            nesterov=group["nesterov"], maximize=group["maximize"], first_step=first_step)
        # written in place, as step() writes it; a second use of the weight in this step then fails
        # autograd's check of the tensors it saved, instead of stepping with half its gradient
        torch.autograd.graph.increment_version(param)
        if copy is not None:
            copy.version, copy.data_ptr = param._version, param.data_ptr()
        return True

    def _copy_of(self, p: Tensor) -> _Copy:
        copy = _COPIES.get(p)
        if copy is None or copy.tensor.dtype != self.autocast_dtype or copy.tensor.shape != p.shape \
                or copy.tensor.stride() != p.stride() or copy.tensor.device != p.device:
            # allocated once and then written in place: a CUDA graph of the step keeps its address
            copy = _Copy(torch.empty_like(p, dtype=self.autocast_dtype, memory_format=torch.preserve_format))
            _COPIES[p] = copy
        return copy

    def _kernel_runs(self, params) -> bool:
        if not params or not all(_fits_kernel(p, self.state[p].get("momentum_buffer")) for p in params):
            return False
        return backends.availability("native", params[0].device.type)[0]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        updated = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not self._kernel_runs(updated):
            super().step()
            for p in updated if self.autocast_dtype is not None else ():
                copy = self._copy_of(p)
                copy.tensor.copy_(p)
                copy.version, copy.data_ptr = p._version, p.data_ptr()
            return loss
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if group["momentum"] == 0:
                self._run(group, params, first_step=False)
                continue
            # a parameter's first step sets its buffer to the gradient (PyTorch's rule)
            fresh = [p for p in params if self.state[p].get("momentum_buffer") is None]
            for p in fresh:
                self.state[p]["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
            fresh_ids = {id(p) for p in fresh}
            self._run(group, fresh, first_step=True)
            self._run(group, [p for p in params if id(p) not in fresh_ids], first_step=False)
        return loss

    def _run(self, group, params, first_step: bool) -> None:
        if not params:
            return
        copies = [self._copy_of(p) for p in params] if self.autocast_dtype is not None else []
        buffers = [self.state[p]["momentum_buffer"] for p in params] if group["momentum"] != 0 else []
        torch.ops.alexnet_fast.sgd_step_(
            params, [p.grad for p in params], buffers, [c.tensor for c in copies], group["lr"],
            group["weight_decay"], group["momentum"], group["dampening"], group["nesterov"], group["maximize"],
            first_step)
        for p, copy in zip(params, copies):
            copy.version, copy.data_ptr = p._version, p.data_ptr()
