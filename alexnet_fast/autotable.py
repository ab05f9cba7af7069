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

GPU = {
    "default": {
        "conv2d_relu": ("torch",),
        "lrn": ("triton", "native", "torch"),
        "max_pool2d": ("triton", "native", "torch"),
        "lrn_max_pool2d": ("triton", "native", "torch"),
    },
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
