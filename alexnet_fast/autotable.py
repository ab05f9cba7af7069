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

# Measured on the H200 (BENCHMARKS.md, B=128): the CUDA C++ LRN, max-pool and fused LRN->max-pool
# kernels beat the Triton ones in every row measured (e.g. LRN fwd+bwd bf16 NCHW 0.18 ms vs
# 0.89 ms; max-pool fwd bf16 NCHW 0.10 vs 0.22 ms). cuDNN stays the conv default: ours were not
# yet verified by the GPU tests.
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
    """Backends to try for ``op``; ``shape_key`` (e.g. a conv layer's (C_in, C_out, k, stride))
    selects a per-shape row where the table has one."""
    if device_type != "cuda":
        return CPU.get(op, ("torch",))
    table = GPU.get(_gpu_name(), GPU["default"])
    row = table.get((op, shape_key)) or table.get(op) or GPU["default"][op]
    return row
