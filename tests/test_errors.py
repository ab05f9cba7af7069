"""Bad input: a clear error naming the argument, never a crash or a silent wrong result."""
import json
import re
import subprocess
import sys

import pytest
import torch

import alexnet_fast
from alexnet_fast import backends, ops
from conftest import DEVICES, skip_unless_available

BACKENDS = ["torch", "native", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn,args,exc,match", [
    (ops.lrn, (torch.randn(2, 3, 4),), ValueError, "x must be a 4-D"),
    (ops.lrn, (torch.randint(0, 3, (1, 3, 4, 4)),), TypeError, "x must be a floating-point"),
    (ops.lrn, (torch.randn(1, 3, 4, 4), 0), ValueError, "size must be a positive int"),
    (ops.lrn, (torch.randn(1, 3, 4, 4), 5, 1e-4, 0.75, -1.0), ValueError, "k must be positive"),
    (ops.max_pool2d, (torch.randn(1, 3, 4, 4), 0), ValueError, "kernel_size must be positive"),
    (ops.max_pool2d, (torch.randn(1, 3, 4, 4), 3, -1), ValueError, "stride must be positive"),
    (ops.max_pool2d, (torch.randn(1, 3, 4, 4), 3, 1, 2), ValueError, "padding .* at most half"),
    (ops.max_pool2d, (torch.randn(1, 3, 2, 2), 3, 1), ValueError, "larger than the padded input"),
    (ops.max_pool2d, (torch.randn(1, 3, 4, 4), (2, 2, 2)), ValueError, "kernel_size must be an int or a pair"),
    (ops.max_pool2d, (torch.randn(1, 3, 40, 40), 17), ValueError, "more than 256"),
    (ops.lrn_max_pool2d, (torch.randn(1, 3, 2, 2),), ValueError, "larger than the padded input"),
    (ops.conv2d_relu, (torch.randn(1, 3, 8, 8), torch.randn(4, 2, 3, 3)), ValueError, "input channels"),
    (ops.conv2d_relu, (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3)), ValueError, "weight must be a 4-D"),
    (ops.conv2d_relu, (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(5)), ValueError, "bias must be"),
    (ops.conv2d_relu, (torch.randn(1, 3, 2, 2), torch.randn(4, 3, 3, 3)), ValueError, "larger than the padded"),
    (ops.conv2d_relu, (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3).double()), TypeError, "weight and bias must have x's dtype"),
    (ops.conv2d_relu, (torch.randn(1, 3, 8, 8), torch.randn(4, 3, 3, 3), None, 0), ValueError, "stride must be positive"),
])
def test_bad_arguments(backend, fn, args, exc, match):
    skip_unless_available(backend, "cpu")
    with pytest.raises(exc, match=match):
        fn(*args, backend=backend)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        ops.lrn(torch.randn(1, 3, 4, 4), backend="cudnn")
    with pytest.raises(ValueError, match="backend must be one of"):
        alexnet_fast.set_backend("fast")
    with pytest.raises(ValueError, match="backend must be None or one of"):
        alexnet_fast.AlexNet(backend="fast")


def test_unavailable_backend_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    backends._availability.cache_clear()
    try:
        with pytest.raises(backends.BackendUnavailableError, match="triton kernels run on CUDA tensors"):
            ops.lrn(torch.randn(1, 3, 4, 4), backend="triton")
        # auto falls back silently
        assert backends.resolve("auto", "lrn", "cpu") in ("native", "torch")
    finally:
        backends._availability.cache_clear()


# Each case: (what the message must match, a call that bypasses the Python checks); `dev` is the
# device under test.
_CPP_CHECKS = r"""
import json, sys, torch
from alexnet_fast import ops
nat, dev = ops.kernels("native"), sys.argv[1]
p = torch.randn(3, device=dev)
cases = [
    ("x must be a 4-D", lambda: nat.lrn(torch.randn(3, 4, 4, device=dev), 5, 1e-4, 0.75, 2.0)),
    ("weight", lambda: nat.conv2d_relu(torch.randn(1, 3, 8, 8, device=dev),
                                       torch.randn(4, 3, 3, 3, device=dev).double(), None, [1, 1], [0, 0])),
    ("indices", lambda: nat.max_pool2d_backward(torch.randn(1, 3, 3, 3, device=dev), torch.zeros(1, 3, 3, 3, device=dev),
                                                [7, 7], [3, 3], [2, 2], [0, 0])),
    (r"grads must have one tensor per parameter \(1\), got 0",
     lambda: torch.ops.alexnet_fast.sgd_step_([p], [], [], [], 0.1, 0.0, 0.9, 0.0, False, False, False)),
]
messages = []
for _, call in cases:
    try:
        call()
        messages.append(None)
    except RuntimeError as e:
        messages.append(str(e))
print(json.dumps([[match, msg] for (match, _), msg in zip(cases, messages)]))
"""


@pytest.mark.parametrize("device", DEVICES)
def test_native_kernels_check_arguments_themselves(device):
    """Direct torch.ops calls bypass the Python checks; the C++ checks still name the argument, as a
    Python exception. In a child process, because a failed check once ended the process: an
    extension linked with its own copy of libstdc++ crashed at the first throw (setup.py)."""
    skip_unless_available("native", device)
    run = subprocess.run([sys.executable, "-c", _CPP_CHECKS, device], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"the process ended with {run.returncode}: {run.stderr[-2000:]}"
    for match, message in json.loads(run.stdout.splitlines()[-1]):
        assert message is not None, f"no error for the case {match!r}"
        assert re.search(match, message), (match, message)


def test_backend_selection_api(monkeypatch):
    assert alexnet_fast.get_backend() in backends.BACKENDS
    with alexnet_fast.use_backend("torch"):
        assert alexnet_fast.get_backend() == "torch"
        assert backends.resolve(None, "lrn", "cpu") == "torch"
    alexnet_fast.set_backend("torch")
    try:
        assert alexnet_fast.get_backend() == "torch"
    finally:
        alexnet_fast.set_backend("auto")


def test_auto_conv_rows_on_the_h200(monkeypatch):
    """The GPU table's conv rows: conv1 through its space-to-depth blocks, the others through
    cuDNN's fused conv+ReLU; a shape without a row of its own takes the op's row."""
    from alexnet_fast import autotable

    monkeypatch.setattr(autotable, "_gpu_name", lambda: "NVIDIA H200")
    monkeypatch.setattr(backends, "availability", lambda name, device_type: (True, ""))
    conv1, conv2 = autotable.conv_key(3, 96, (11, 11), (4, 4)), autotable.conv_key(96, 256, (5, 5), (1, 1))
    assert backends.resolve("auto", "conv2d_relu", "cuda", conv1) == "cudnn_s2d"
    assert backends.resolve("auto", "conv2d_relu", "cuda", conv2) == "cudnn"
    assert backends.resolve("auto", "conv2d_relu", "cuda", autotable.conv_key(3, 8, (5, 5), (2, 2))) == "cudnn"
    assert backends.resolve("auto", "lrn", "cuda") == "native"
