"""The backend registry: names, availability (with the reason when unavailable), and the default.

``torch``  PyTorch's own ops (the reference; cuDNN for convolutions on the GPU).
``native`` the C++/CUDA extension ``alexnet_fast._C``: CUDA kernels on GPU tensors, C++ kernels
           on CPU tensors.
``triton`` Triton kernels (GPU tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
``auto``   per op and device, the fastest available backend according to ``autotable``.

``auto`` may also choose, for ``conv2d_relu`` on the GPU,
``cudnn``      cuDNN's fused conv+bias+ReLU forward and cuDNN gradients with the ReLU mask applied
               once (``torch.ops.alexnet_fast.conv2d_relu_cudnn``), where ``torch`` runs PyTorch's
               convolution, bias add and ReLU apart;
``cudnn_s2d``  the same op on the space-to-depth blocks of a strided convolution's input
               (``alexnet_fast.space_to_depth``), a stride-1 convolution over more channels.
They are not backends of their own: the other ops have no cuDNN kernels.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os

import torch

BACKENDS = ("auto", "torch", "native", "triton")
CONCRETE = ("torch", "native", "triton")
CONV_ONLY = ("cudnn", "cudnn_s2d")  # what ``auto`` may also choose for conv2d_relu
ENV_VAR = "ALEXNET_FAST_BACKEND"


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run on the given device."""


def _check_name(name: str, arg: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"{arg} must be one of {BACKENDS}, got {name!r}")
    return name


# None: not set in this context, so the environment variable's (read when first needed, so that a
# bad value fails the first op that needs it, with its message, not every import of the package).
_default = contextvars.ContextVar("alexnet_fast_backend", default=None)


@functools.lru_cache(maxsize=None)
def _env_backend() -> str:
    return _check_name(os.environ.get(ENV_VAR, "auto"), ENV_VAR)


def set_backend(name: str) -> None:
    """Set the backend used when an op or module is given ``backend=None``."""
    _default.set(_check_name(name))


def get_backend() -> str:
    return _default.get() or _env_backend()


@contextlib.contextmanager
def use_backend(name: str):
    """``with use_backend("triton"): ...`` runs the block with another default backend."""
    token = _default.set(_check_name(name))
    try:
        yield
    finally:
        _default.reset(token)


@functools.lru_cache(maxsize=None)
def native_build():
    """(build_info dict or None, reason when the extension does not load)."""
    try:
        _C = importlib.import_module("alexnet_fast._C")
    except ImportError as e:  # a source checkout that was never built
        return None, f"the C++ extension alexnet_fast._C did not load ({e}); install with `pip install --no-build-isolation -e .`"
    return _C.build_info(), ""


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        import triton  # noqa: F401
    except ImportError as e:
        return f"triton is not installed ({e}); `pip install triton`"
    return ""


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


# ``ALEXNET_FAST_POISON_OUTPUTS=1``: a debug switch that fills each buffer a kernel allocates and
# then writes in full with NaN (uint8 max-pool offsets with 255) before the kernel runs, so an
# element the kernel never writes cannot pass for a right value. The C++/CUDA kernels read the
# same variable (csrc/poison.h); the Triton ops through ``poison_outputs``.
POISON_ENV_VAR = "ALEXNET_FAST_POISON_OUTPUTS"


@functools.lru_cache(maxsize=None)
def poison_outputs() -> bool:
    """Whether ``POISON_ENV_VAR`` is ``1``, read once per process (as the C++ side reads it)."""
    return os.environ.get(POISON_ENV_VAR) == "1"


def autotune_enabled() -> bool:
    """``ALEXNET_FAST_AUTOTUNE=0`` makes each Triton kernel use its first config instead of timing
    all of them per shape (the tests set it: they run many shapes once each)."""
    return os.environ.get("ALEXNET_FAST_AUTOTUNE", "1") != "0"


@functools.lru_cache(maxsize=None)
def _availability(backend: str, device_type: str) -> tuple[bool, str]:
    if backend == "torch":
        return True, ""
    if device_type not in ("cpu", "cuda"):
        return False, f"{backend} kernels exist for cpu and cuda tensors, not {device_type}"
    if backend == "native":
        info, reason = native_build()
        if info is None:
            return False, reason
        if device_type == "cuda" and not info["with_cuda"]:
            return False, (
                "native CUDA kernels were not built: this install found no nvcc or a CPU-only torch; "
                "rebuild with CUDA_HOME=/path/to/cuda pip install --no-build-isolation -e . "
                "(and without ALEXNET_FAST_NO_CUDA=1)")
        return True, ""
    if backend in CONV_ONLY:
        if device_type != "cuda":
            return False, "cudnn runs conv2d_relu on CUDA tensors only"
        if not torch.backends.cudnn.is_available():
            return False, "this torch build has no cuDNN"
        return _availability("native", device_type)  # the op lives in the CUDA extension
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return False, err
        if device_type == "cpu" and not triton_interpreted():
            return False, "triton kernels run on CUDA tensors; on CPU tensors only under TRITON_INTERPRET=1 (for tests)"
        if device_type == "cuda":
            major, _ = torch.cuda.get_device_capability()
            if major < 8:
                return False, f"triton kernels need a GPU of compute capability >= 8.0, this one is {major}.x"
        return True, ""
    raise ValueError(f"backend must be one of {CONCRETE + CONV_ONLY}, got {backend!r}")


def availability(backend: str, device_type: str) -> tuple[bool, str]:
    """(usable, reason if not) for a concrete backend on a device type ("cpu", "cuda")."""
    return _availability(backend, device_type)


@torch.compiler.assume_constant_result
def uses_reference(backend: str | None) -> bool:
    """Whether ``backend`` (None: the current default) is ``torch``, PyTorch's own ops."""
    return _check_name(backend if backend is not None else get_backend()) == "torch"


@torch.compiler.assume_constant_result
def resolve(backend: str | None, op: str, device_type: str, shape_key=None) -> str:
    """The concrete backend that runs ``op`` for a tensor on ``device_type``.

    An explicitly requested backend that cannot run raises BackendUnavailableError saying what is
    missing; ``auto`` falls back silently along its preference list. Under torch.compile the
    choice is made once, while tracing, and becomes part of the compiled graph.
    """
    name = _check_name(backend if backend is not None else get_backend())
    if name != "auto":
        ok, reason = availability(name, device_type)
        if not ok:
            raise BackendUnavailableError(f"backend {name!r} cannot run {op} on {device_type}: {reason}")
        return _loaded(name)
    from alexnet_fast import autotable

    for candidate in autotable.preference(op, device_type, shape_key):
        if availability(candidate, device_type)[0]:
            return _loaded(candidate)
    return "torch"


def _loaded(name: str) -> str:
    """Make sure the op namespace of ``name`` is registered (an error in our own Triton module
    propagates: it is a bug, not an unavailable backend)."""
    if name == "triton":
        importlib.import_module("alexnet_fast.triton")
    return name
