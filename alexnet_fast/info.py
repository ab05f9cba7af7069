"""What this install can run: versions, GPU, which backends are built and usable, and why."""
from __future__ import annotations

import platform

import torch

from alexnet_fast import autotable, backends
from alexnet_fast.autograd import ALL_OPS as OPS


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
    out["auto"] = {dev: {op: backends.resolve("auto", op, dev) for op in OPS} for dev in devices}
    out["auto_table"] = "GPU rows: " + ", ".join(autotable.GPU)
    return out


def format_info(d: dict, indent: int = 0) -> str:
    lines = []
    for key, value in d.items():
        if isinstance(value, dict):
            lines.append(" " * indent + f"{key}:")
            lines.append(format_info(value, indent + 2))
        else:
            lines.append(" " * indent + f"{key}: {value}")
    return "\n".join(lines)
