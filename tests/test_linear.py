"""alexnet_fast.linear: F.linear with float32 weight gradients from the products (under CUDA
autocast too); stepping in the backward is in test_linear_sgd.py."""
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, random_input

from alexnet_fast import linear


def _check(apply, device, x_dtype):
    x = random_input((6, 40), x_dtype, device).requires_grad_()
    w = random_input((24, 40), torch.float32, device, scale=0.2).requires_grad_()
    b = random_input((24,), torch.float32, device).requires_grad_()
    out = apply(x, w, b)
    x64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
    ref = F.linear(x64, w64, b64)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, "gemm", what="forward")
    g = random_input(out.shape, torch.bfloat16, device)
    grads = torch.autograd.grad(out, (x, w, b), g)
    for name, got, want, dtype in zip("xwb", grads, torch.autograd.grad(ref, (x64, w64, b64), g.double().cpu()),
                                      (x_dtype, torch.float32, torch.float32)):
        assert got.dtype == dtype, name
        assert_close(got, want, torch.bfloat16, "gemm", what=f"grad {name}")


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_linear_function(x_dtype):
    """The autograd function itself, on the CPU (float32 products through a cast there)."""
    _check(lambda x, w, b: linear._Linear.apply(x, w, b, torch.bfloat16), "cpu", x_dtype)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_under_autocast_cuda(x_dtype):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")

    def apply(x, w, b):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return linear.linear(x, w, b)

    _check(apply, "cuda", x_dtype)


def test_linear_without_autocast_is_f_linear(device):
    x, w, b = torch.randn(3, 5, device=device), torch.randn(4, 5, device=device), torch.randn(4, device=device)
    assert torch.equal(linear.linear(x, w, b), F.linear(x, w, b))
    assert torch.equal(linear.linear(x, w), F.linear(x, w))
