"""What this install can run: versions, GPU, which backends are built and usable, and why."""
from __future__ import annotations

import platform

import torch

from alexnet_fast import autotable, backends
from alexnet_fast.autograd import ALL_OPS as OPS
from alexnet_fast.model import ALEXNET_CONVS


def info() -> dict:
    """A dict describing the install; ``alexnet-fast info`` prints it."""
    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "default_backend": backends.get_backend(),
    }
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    build, reason = backends.native_build()
    out["native_extension"] = build if build is not None else {"loaded": False, "reason": reason}
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    out["backends"] = {
        dev: {name: (lambda ok_reason: "usable" if ok_reason[0] else f"unavailable: {ok_reason[1]}")(
            backends.availability(name, dev)) for name in backends.CONCRETE}
        for dev in devices
    }
    out["auto"] = {dev: _auto(dev) for dev in devices}
    out["auto_table"] = "GPU rows: " + ", ".join(autotable.GPU)
    return out


def _auto(device_type: str) -> dict:
    """What ``auto`` runs per op, and per AlexNet layer for the convolutions (per-shape rows)."""
    row = {op: backends.resolve("auto", op, device_type) for op in OPS}
    for spec in ALEXNET_CONVS:
        key = autotable.conv_key(spec.c_in, spec.c_out, (spec.kernel,) * 2, (spec.stride,) * 2)
        row[f"conv2d_relu {spec.name}"] = backends.resolve("auto", "conv2d_relu", device_type, key)
    return row


def format_info(d: dict, indent: int = 0) -> str:
    lines = []
    for key, value in d.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines.append(format_info(value, indent + 2))
        else:
            lines.append(" " * indent + f"{key}: {value}")
    return "\n".join(lines)
