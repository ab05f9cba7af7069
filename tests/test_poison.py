"""The debug switch ALEXNET_FAST_POISON_OUTPUTS: with it on, a kernel's outputs are filled with NaN
(uint8 indices with 255) before the kernel writes them, and the kernel still returns the right
result; with it off, nothing is filled. The switch is read once per process, so each setting runs
in a fresh interpreter. The fills are seen through the profiler, which records every aten::fill_
with its value, the ones the C++ kernels make included."""
import json
import os
import subprocess
import sys

import pytest

from alexnet_fast import backends

SCRIPT = r"""
import json, sys
import torch
from torch.profiler import ProfilerActivity, profile
from alexnet_fast import backends, ops

report = {"switch": backends.poison_outputs(), "ops": {}, "helper": None}
torch.manual_seed(0)
x = torch.randn(2, 3, 9, 9)
ref = torch.nn.functional.max_pool2d(x, 3, 2)
for backend in ("native", "triton"):
    if not backends.availability(backend, "cpu")[0]:
        continue
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = ops.max_pool2d(x, 3, 2, backend=backend)
    fills = [[e.input_shapes[0], str(e.concrete_inputs[1])]
             for e in prof.events() if e.name == "aten::fill_"]
    report["ops"][backend] = {"fills": fills, "shape": list(out.shape), "correct": torch.equal(out, ref)}
try:
    from alexnet_fast.triton._common import poison_if_debug
except ImportError:
    pass
else:
    f = poison_if_debug(torch.zeros(5))
    u = poison_if_debug(torch.zeros(5, dtype=torch.uint8))
    report["helper"] = {"float": "nan" if f.isnan().all() else f.tolist(), "uint8": u.tolist()}
json.dump(report, sys.stdout)
"""


def _run(switch: str) -> dict:
    env = dict(os.environ, ALEXNET_FAST_POISON_OUTPUTS=switch)
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout)


def _kernel_backends():
    found = [b for b in ("native", "triton") if backends.availability(b, "cpu")[0]]
    if not found:
        pytest.skip("neither the native nor the Triton kernels run on CPU tensors here")
    return found


def test_switch_on_poisons_outputs_before_the_kernel_writes_them():
    expected = _kernel_backends()
    report = _run("1")
    assert report["switch"] is True
    assert sorted(report["ops"]) == sorted(expected)
    for backend, r in report["ops"].items():
        fills = {(tuple(shape), value) for shape, value in r["fills"]}
        shape = tuple(r["shape"])
        assert {(shape, "nan"), (shape, "255")} <= fills, f"{backend}: outputs not poisoned: {fills}"
        assert r["correct"], f"{backend}: max_pool2d wrong with poisoned outputs"
    if report["helper"] is not None:
        assert report["helper"] == {"float": "nan", "uint8": [255] * 5}


def test_switch_off_fills_nothing():
    expected = _kernel_backends()
    report = _run("0")
    assert report["switch"] is False
    assert sorted(report["ops"]) == sorted(expected)
    for backend, r in report["ops"].items():
        assert r["fills"] == [], f"{backend}: filled outputs with the switch off: {r['fills']}"
        assert r["correct"]
    if report["helper"] is not None:
        assert report["helper"] == {"float": [0.0] * 5, "uint8": [0] * 5}
