"""What ``backend="auto"`` runs: per op, device and shape class, backends in order of preference.

The GPU entries come from measurements of the project's own benchmark (`alexnet-fast bench`,
see BENCHMARKS.md), keyed by GPU name; a GPU with no entry uses the ``default`` row. On the CPU the
C++ kernels are used for the memory-bound ops and PyTorch (oneDNN) for convolutions, which beats
an im2col GEMM there.
"""
from __future__ import annotations

import functools

# op -> backends in order of preference. Fill the GPU table from measured benchmark results only.
CPU = {
    "conv2d_relu": ("torch",),
    "lrn": ("native", "torch"),
    "max_pool2d": ("native", "torch"),
    "lrn_max_pool2d": ("native", "torch"),
}


def conv_key(c_in: int, c_out: int, kernel_hw, stride) -> tuple:
    """The shape class of a convolution in the tables: (C_in, C_out, (kh, kw), (sh, sw))."""
    return (c_in, c_out, tuple(kernel_hw), tuple(stride))


# Measured on the H200 (BENCHMARKS.md, B=128, bf16 channels_last, CUDA-graph-timed kernels, and
# the training step):
# - the CUDA C++ LRN, max-pool and fused LRN->max-pool kernels beat the Triton ones in every row
#   (e.g. LRN fwd+bwd 0.112 vs 0.144 ms, max-pool fwd+bwd 0.084 vs 0.231 ms at 96x54x54);
# - convolutions: cuDNN beats both of ours on conv2-conv5, and its fused conv+bias+ReLU
#   ("cudnn") beats PyTorch's conv, bias add and ReLU ("torch"), e.g. conv2 forward 0.158 vs
#   0.242 ms;
# - conv1, forward + weight gradient: Triton's kernels take 1.38 ms on the device against cuDNN's
#   1.63 ms. In a step replayed from a CUDA graph that wins (4.29 vs 4.65 ms per step); run
#   eagerly, the Triton launches cost the host more than they save (7.24 vs 5.67 ms), so only
#   the graphed table takes them.
_CONV1 = conv_key(3, 96, (11, 11), (4, 4))
_H200 = {
    "conv2d_relu": ("cudnn", "torch"),
    "lrn": ("native", "triton", "torch"),
    "max_pool2d": ("native", "triton", "torch"),
    "lrn_max_pool2d": ("native", "triton", "torch"),
}
_H200_GRAPHED = {**_H200, ("conv2d_relu", _CONV1): ("triton", "cudnn", "torch")}
# An unmeasured GPU gets the H200's order: the kernels target the same memory-bound behaviour.
GPU = {"NVIDIA H200": _H200, "default": _H200}
# The rows for ops replayed from a CUDA graph (backends.for_cuda_graph), where a launch's host
# cost does not recur.
GPU_GRAPHED = {"NVIDIA H200": _H200_GRAPHED, "default": _H200_GRAPHED}


@functools.lru_cache(maxsize=None)
def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def preference(op: str, device_type: str, shape_key=None, graphed: bool = False) -> tuple[str, ...]:
    """Backends to try for ``op``; ``shape_key`` (a convolution's ``conv_key``) selects a
    per-shape row where the table has one; ``graphed`` the rows for CUDA-graph replay."""
    if device_type != "cuda":
        return CPU.get(op, ("torch",))
    tables = GPU_GRAPHED if graphed else GPU
    table = tables.get(_gpu_name(), tables["default"])
    return table.get((op, shape_key)) or table.get(op) or tables["default"][op]
