"""pytest-benchmark suites over the same cases and callables as ``alexnet-fast bench``: the real
AlexNet shapes (batch 128, 224x224, bf16) on a GPU, small ones (batch 2, 128x128, fp32) on the
CPU. Run with ``pytest benchmarks/ --benchmark-only``; each provider is checked against eager
before it is timed, and one that cannot run here is skipped with the reason."""
import pytest
import torch

from alexnet_fast import bench, bench_ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BATCH, SIZE = (128, 224) if CUDA else (2, 128)
DTYPE = "bf16" if CUDA else "fp32"
LAYOUTS = bench.LAYOUTS if CUDA else ("nchw",)


def pytest_generate_tests(metafunc):
    if "op_case" in metafunc.fixturenames:
        cases = bench_ops.op_cases(BATCH, SIZE)
        metafunc.parametrize("op_case", cases, ids=[f"{c.kernel}-{c.shape_str}" for c in cases])
    if "layout" in metafunc.fixturenames:
        metafunc.parametrize("layout", LAYOUTS)


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture
def dtype():
    with bench.precision(DTYPE):
        yield DTYPE


@pytest.fixture
def shape():
    return BATCH, SIZE


@pytest.fixture
def synced(device):
    """``synced(fn)``: a call that returns when fn's GPU work is done (pytest-benchmark times wall
    clock)."""
    def wrap(fn):
        def call():
            fn()
            bench.synchronize(device)
        return call
    return wrap


@pytest.fixture
def or_skip():
    """``or_skip(fn, *args)``: fn's result, or a skip with the reason when the provider cannot run
    here (a failure still fails)."""
    def call(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            status, note = bench.error_status(e)
            if status == "skipped":
                pytest.skip(note)
            raise
    return call
