"""What ``backend="auto"`` runs: per op, device and shape class, backends in order of preference.

The GPU entries come from measurements of the project's own benchmark (`alexnet-fast bench`,
see BENCHMARKS.md), keyed by GPU name; a GPU with no entry uses the ``default`` row. The CPU row
comes from ``alexnet-fast bench --quick`` on a 2-core x86 machine (below).
"""
from __future__ import annotations

import functools

# op -> backends in order of preference, from measured benchmark results only.
# CPU (fp32, B=2, 128x128 input, forward+backward, ms, PyTorch / our C++): PyTorch's oneDNN
# convolutions beat our im2col GEMM (conv2 6.7 / 16.9); our LRN is about even (3.49 / 3.38,
# 1.99 / 2.11) and keeps its smaller saved state. Since our max-pool walks whole rows and
# scatters its gradient plane by plane (2026-11-29), the fused LRN->max-pool beats PyTorch's LRN
# then max-pool (6.42 / 4.60, 3.51 / 2.81; again 7.02 / 5.81, 3.80 / 3.05); the max-pool alone
# still does not on the smaller planes (96x30x30 0.80 / 0.65, 256x14x14 0.25 / 0.66, 256x6x6
# 0.06 / 0.17).
CPU = {
    "conv2d_relu": ("torch",),
    "lrn": ("native", "torch"),
    "max_pool2d": ("torch",),
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
#   0.243 ms;
# - conv1 (3 channels, 11x11, stride 4) as a 3x3 stride-1 convolution over its input's 4x4
#   space-to-depth blocks ("cudnn_s2d"): forward 0.128 ms against cuDNN's 1.061 ms on conv1
#   itself, forward + weight gradient 0.315 against 1.581 ms, where Triton's flat-K kernels take
#   1.38 ms; with TF32 0.736 against 1.352 ms, in fp32 2.495 against 2.565 ms.
_CONV1 = conv_key(3, 96, (11, 11), (4, 4))
_H200 = {
    "conv2d_relu": ("cudnn", "torch"),
    ("conv2d_relu", _CONV1): ("cudnn_s2d", "cudnn", "torch"),
    "lrn": ("native", "triton", "torch"),
    "max_pool2d": ("native", "triton", "torch"),
    "lrn_max_pool2d": ("native", "triton", "torch"),
}
# An unmeasured GPU gets the H200's order: the kernels target the same memory-bound behaviour.
GPU = {"NVIDIA H200": _H200, "default": _H200}


@functools.lru_cache(maxsize=None)
def _gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def preference(op: str, device_type: str, shape_key=None) -> tuple[str, ...]:
    """Backends to try for ``op``; ``shape_key`` (a convolution's ``conv_key``) selects a
    per-shape row where the table has one."""
    if device_type != "cuda":
        return CPU.get(op, ("torch",))
    table = GPU.get(_gpu_name(), GPU["default"])
    return table.get((op, shape_key)) or table.get(op) or GPU["default"][op]
