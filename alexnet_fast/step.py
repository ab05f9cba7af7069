"""One training step (forward, loss, backward, optimizer step), run eagerly or replayed from a
CUDA graph.

An AlexNet step launches a few hundred kernels. On the H200 its device work takes about 2.6 ms
(bf16, batch 128, ``--backend auto``) while the host needs about 6 ms to launch them, so an eager
loop waits on the host. :class:`GraphedStep` captures the step once and then launches it whole
with one call. A capture records addresses and values, which sets its rules:

* each batch is copied into the static input tensors of the capture. The capture is made for the
  shape of the first batch; a batch of another shape (an epoch's ragged last batch) runs eagerly;
* the fused SGD kernel takes the learning rate by value, so when a scheduler changes it the step
  is captured again;
* the returned loss and logits are the capture's static outputs, overwritten by the next replay.

The first ``warmup`` calls run eagerly on a side stream, so that cuDNN's algorithm search, the
libraries' workspaces and the optimizer's momentum buffers are set up outside the capture.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

__all__ = ["autocast", "train_step", "GraphedStep"]


def autocast(device_type: str, dtype: torch.dtype | None, cache_enabled: bool = True):
    """``torch.autocast`` to ``dtype`` on ``device_type``; no autocast when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype, cache_enabled=cache_enabled)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, criterion, x: Tensor, y: Tensor,
               amp_dtype: torch.dtype | None = None, scaler=None, autocast_cache: bool = True) -> tuple[Tensor, Tensor]:
    """One eager step of ``model`` on the batch ``(x, y)``; returns ``(loss, logits)``, detached
    (a loss that held on to its autograd graph would keep the graph's gradient-accumulation nodes,
    and their streams, alive into the next step). ``amp_dtype``: the autocast dtype, None for
    none; ``scaler``: a GradScaler (float16), with which nothing is stepped in the backward (the
    scaler must see every gradient first)."""
    with autocast(x.device.type, amp_dtype, autocast_cache):
        logits = model(x)
        loss = criterion(logits, y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        # an alexnet_fast.optim.SGD made with step_in_backward steps the Linear weights in here
        steps = getattr(optimizer, "steps_in_backward", contextlib.nullcontext)
        with steps():
            loss.backward()
        optimizer.step()
    return loss.detach(), logits.detach()


class GraphedStep:
    """``step(x, y) -> (loss, logits)``: :func:`train_step` replayed from a CUDA graph (the
    module docstring gives the rules). ``model`` (in training mode), its ``optimizer`` and the
    batches live on one CUDA device; the optimizer must not need the host during its step (no
    GradScaler; SGD, fused or not, qualifies)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, criterion,
                 amp_dtype: torch.dtype | None = None, warmup: int = 3):
        if warmup < 1:
            raise ValueError(f"warmup must be at least 1 eager step before the capture, got {warmup}")
        self.model, self.optimizer, self.criterion, self.amp_dtype = model, optimizer, criterion, amp_dtype
        self.warmup = warmup
        self.eager_calls = 0
        self.shapes = None  # of the first batch: the one shape that is captured
        self.captures = 0  # how many times the step was captured (for tests and reports)
        self.graph = None
        self.static = None  # (x, y, loss, logits) of the capture
        self.lrs = None  # the learning rates the capture holds

    def _learning_rates(self) -> list:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _eager_on_side_stream(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        side = torch.cuda.Stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            out = train_step(self.model, self.optimizer, self.criterion, x, y, self.amp_dtype)
        torch.cuda.current_stream(x.device).wait_stream(side)
        return out

    def _capture(self, x: Tensor, y: Tensor) -> None:
        self.graph = self.static = None  # frees the previous capture's memory pool
        static_x, static_y = x.clone(), y.clone()
        # backward allocates the gradients inside the graph's pool, where the replays write them
        self.optimizer.zero_grad(set_to_none=True)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            # autocast's weight cache must stay off: its casts would be freed outside the pool
            loss, logits = train_step(self.model, self.optimizer, self.criterion, static_x, static_y,
                                      self.amp_dtype, autocast_cache=False)
        self.graph, self.static, self.lrs = graph, (static_x, static_y, loss, logits), self._learning_rates()
        self.captures += 1

    def __call__(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not x.is_cuda:
            raise ValueError(f"a graphed step runs on CUDA tensors, got x on {x.device}")
        if self.shapes is None:
            self.shapes = (x.shape, y.shape)
        if (x.shape, y.shape) != self.shapes:
            return train_step(self.model, self.optimizer, self.criterion, x, y, self.amp_dtype)
        if self.eager_calls < self.warmup:
            self.eager_calls += 1
            return self._eager_on_side_stream(x, y)
        if self.graph is None or self._learning_rates() != self.lrs:
            self._capture(x, y)  # records the step without running it
        static_x, static_y, loss, logits = self.static
        static_x.copy_(x)
        static_y.copy_(y)
        self.graph.replay()
        return loss, logits
