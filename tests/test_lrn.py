"""LRN kernels (native C++/CUDA and Triton) against the float64 PyTorch reference."""
import pytest
import torch
from conftest import assert_close, assert_layout, random_input

from alexnet_fast import ops, reference

# (shape, size): N=1, C smaller than the window, even sizes, sizes no block divides.
CPU_CASES = [((2, 7, 5, 6), 5), ((1, 3, 4, 3), 5), ((2, 6, 3, 5), 4), ((1, 9, 2, 7), 1), ((3, 4, 5, 5), 2)]
CUDA_CASES = CPU_CASES + [((3, 96, 13, 13), 5), ((2, 256, 9, 11), 5), ((1, 37, 31, 29), 6), ((4, 5, 33, 17), 3)]
PARAMS = [(1e-4, 0.75, 2.0), (0.5, 0.6, 1.0)]  # AlexNet's, and one where the window matters a lot


def cases(device):
    return CPU_CASES if device == "cpu" else CUDA_CASES


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("alpha,beta,k", PARAMS)
def test_lrn_forward_backward(backend, device, dtype, layout, alpha, beta, k):
    for shape, size in cases(device):
        x = random_input(shape, dtype, device, layout, scale=3.0).requires_grad_()
        out = ops.lrn(x, size, alpha, beta, k, backend=backend)
        x64 = x.detach().double().cpu().requires_grad_()
        ref = reference.lrn(x64, size, alpha, beta, k)
        what = f"{backend} {dtype} {layout} {shape} size={size}"
        assert out.dtype == dtype
        assert_layout(out, layout, what)
        assert_close(out, ref, dtype, "elementwise", what=f"lrn {what}")
        g = random_input(shape, dtype, device, layout)
        (gx,) = torch.autograd.grad(out, x, g)
        (gref,) = torch.autograd.grad(ref, x64, g.double().cpu())
        assert_layout(gx, layout, f"grad {what}")
        assert_close(gx, gref, dtype, "elementwise", what=f"lrn grad {what}")


def test_lrn_empty_batch(backend, device):
    x = torch.randn(0, 5, 4, 4, device=device, requires_grad=True)
    out = ops.lrn(x, backend=backend)
    assert out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_lrn_gradcheck_float64():
    from alexnet_fast import backends

    if not backends.availability("native", "cpu")[0]:
        pytest.skip(backends.availability("native", "cpu")[1])
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ops.lrn(t, 3, 0.3, 0.75, 1.0, backend="native"), (x,))
