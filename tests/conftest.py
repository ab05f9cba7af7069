"""Shared fixtures and the one tolerance helper of the test suite.

Without a GPU, Triton kernels run on CPU tensors under the Triton interpreter, so the same tests
cover them on every machine; the variable must be set before triton is first imported.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Each test shape runs once: timing every Triton config per shape would dominate the GPU run.
os.environ.setdefault("ALEXNET_FAST_AUTOTUNE", "0")
# Kernels fill the outputs they allocate with NaN (uint8 indices with 255) before writing them, so
# every kernel test fails on an element the kernel leaves unwritten. Read once per process, by the
# C++ kernels too, so it is set before anything imports the extension.
os.environ.setdefault("ALEXNET_FAST_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

from alexnet_fast import backends  # noqa: E402

DEVICES = ["cpu", "cuda"]
KERNEL_BACKENDS = ["native", "triton"]

# Relative error bounds against the float64 reference, by (dtype, kind); the one place they live.
# kind "exact": selections and copies (max-pool values), "elementwise": LRN-like per-element math,
# "gemm": reductions over K (convolutions, normwise).
TOLERANCES = {
    (torch.float64, "exact"): 0.0, (torch.float64, "elementwise"): 1e-12, (torch.float64, "gemm"): 1e-12,
    (torch.float32, "exact"): 0.0, (torch.float32, "elementwise"): 1e-5, (torch.float32, "gemm"): 1e-5,
    (torch.float16, "exact"): 0.0, (torch.float16, "elementwise"): 5e-3, (torch.float16, "gemm"): 5e-3,
    (torch.bfloat16, "exact"): 0.0, (torch.bfloat16, "elementwise"): 2e-2, (torch.bfloat16, "gemm"): 2e-2,
}
TF32_GEMM_TOL = 5e-3

# torch.optim.SGD settings the optimizer tests step with.
CONFIGS_SGD = [
    dict(momentum=0.9, weight_decay=5e-4),  # the seed's
    dict(momentum=0.0, weight_decay=1e-2),  # no momentum buffers
    dict(momentum=0.9, dampening=0.1),
    dict(momentum=0.8, nesterov=True, weight_decay=1e-3),
    dict(momentum=0.9, maximize=True),
]


def tolerance(dtype: torch.dtype, kind: str, tf32: bool = False) -> float:
    if tf32 and dtype == torch.float32 and kind == "gemm":
        return TF32_GEMM_TOL
    return TOLERANCES[(dtype, kind)]


def rel_error(out: torch.Tensor, ref: torch.Tensor, normwise: bool) -> float:
    """max|out - ref| / max|ref| (or ||out - ref|| / ||ref||); NaN anywhere in out is infinite."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    if out64.shape != ref64.shape:
        raise AssertionError(f"shape {tuple(out64.shape)} != reference {tuple(ref64.shape)}")
    if out64.numel() == 0:
        return 0.0
    nan_ref = torch.isnan(ref64)
    if not torch.equal(torch.isnan(out64), nan_ref):
        return float("inf")
    diff = (out64 - ref64).masked_fill(nan_ref, 0)
    ref64 = ref64.masked_fill(nan_ref, 0)
    if normwise:
        return (diff.norm() / ref64.norm().clamp_min(1e-30)).item()
    return (diff.abs().max() / ref64.abs().max().clamp_min(1e-30)).item()


def assert_close(out, ref, dtype, kind, tf32=False, what="output"):
    """Assert ``out`` matches the float64 reference ``ref`` within the bound for (dtype, kind)."""
    tol = tolerance(dtype, kind, tf32)
    err = rel_error(out, ref, normwise=(kind == "gemm"))
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol:g} ({dtype}, {kind})"


def skip_unless_available(backend: str, device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    ok, reason = backends.availability(backend, device)
    if not ok:
        pytest.skip(f"{backend} on {device}: {reason}")


@pytest.fixture(params=DEVICES)
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


@pytest.fixture(params=KERNEL_BACKENDS)
def backend(request, device):
    skip_unless_available(request.param, device)
    return request.param


def pytest_runtest_logreport(report):
    """With ALEXNET_FAST_FAILURE_LOG set, append each failure's traceback to that file as it
    happens, so a GPU run stopped at its time limit still says why a test failed."""
    path = os.environ.get("ALEXNET_FAST_FAILURE_LOG")
    if path and report.failed and "PYTEST_XDIST_WORKER" not in os.environ:
        with open(path, "a") as f:
            f.write(f"== {report.nodeid} ({report.when})\n{report.longreprtext}\n\n")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def to_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)


def assert_layout(t: torch.Tensor, layout: str, what: str = "output") -> None:
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    assert t.is_contiguous(memory_format=fmt), f"{what} is not {layout} (strides {t.stride()})"


@pytest.fixture(params=[torch.float32, torch.bfloat16, torch.float16, torch.float64],
                ids=lambda d: str(d).removeprefix("torch."))
def dtype(request, backend, device):
    """Dtypes each kernel backend must support: the GPU kernels float32/float16/bfloat16; the C++
    CPU kernels also float64 (the dtype of gradcheck). One test per dtype, so that a parallel run
    spreads the (slow) first compilation of each Triton kernel over processes."""
    if request.param == torch.float64 and not (backend == "native" and device == "cpu"):
        pytest.skip("float64 is a dtype of the C++ CPU kernels only")
    return request.param


def random_input(shape, dtype, device, layout="contiguous", relu=False, scale=1.0):
    """Random data (never zeros or constants); relu=True gives ReLU outputs full of ties (zeros)."""
    x = torch.randn(shape, dtype=torch.float64) * scale
    if relu:
        x = x.clamp_min(0)
    return to_layout(x.to(dtype).to(device), layout)


def pool_by_indices(y, indices, kernel_size, stride, padding=(0, 0)):
    """Take, in each pooling window of ``y``, the element the uint8 window offsets name: a
    differentiable reference for pooling with a given choice of winners."""
    n, c, h, w = y.shape
    oh, ow = indices.shape[-2:]
    cols = torch.nn.functional.unfold(y.reshape(n * c, 1, h, w), kernel_size, padding=padding, stride=stride)
    picked = cols.gather(1, indices.reshape(n * c, 1, oh * ow).long().to(cols.device))
    return picked.reshape(n, c, oh, ow)
