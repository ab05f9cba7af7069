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


# Measured on the H200 (BENCHMARKS.md, B=128, bf16 channels_last, CUDA-graph-timed kernels):
# - the CUDA C++ LRN, max-pool and fused LRN->max-pool kernels beat the Triton ones in every row
#   (e.g. LRN fwd+bwd 0.112 vs 0.144 ms, max-pool fwd+bwd 0.084 vs 0.231 ms at 96x54x54);
# - conv2-conv5: cuDNN is faster than both of ours, forward and backward;
# - conv1, forward + weight gradient: Triton's kernels take 1.38 ms on the device against cuDNN's
#   1.63 ms, but a Triton launch costs the host far more than a cuDNN call (plain calls: LRN
#   fwd+bwd 0.60 ms against 0.12 ms replayed), and the eager training step is partly host-bound;
#   cuDNN stays until a training step with Triton's conv1 has been measured.
_H200 = {
    "conv2d_relu": ("torch",),
    "lrn": ("native", "triton", "torch"),
    "max_pool2d": ("native", "triton", "torch"),
    "lrn_max_pool2d": ("native", "triton", "torch"),
}
GPU = {
    "NVIDIA H200": _H200,
    # an unmeasured GPU gets the H200's order: the kernels target the same memory-bound behaviour
    "default": _H200,
}


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
    row = table.get((op, shape_key)) or table.get(op) or GPU["default"][op]
    return row
