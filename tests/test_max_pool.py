"""Max-pool kernels against PyTorch: exact values, the same winners (ties, NaN), gradients."""
import pytest
import torch
from conftest import (assert_close, assert_layout, pool_by_indices, random_input,
                      skip_unless_available, to_layout)

from alexnet_fast import backends, ops, reference

# (shape, kernel, stride, padding, ceil_mode)
CPU_CASES = [
    ((2, 3, 9, 9), (3, 3), (2, 2), (0, 0), False),
    ((1, 2, 8, 10), (3, 3), (2, 2), (1, 1), False),
    ((2, 3, 8, 7), (3, 3), (2, 2), (0, 0), True),
    ((1, 4, 7, 6), (2, 3), (1, 2), (1, 0), True),
    ((2, 1, 5, 5), (5, 5), (1, 1), (2, 2), False),
    ((1, 2, 7, 8), (3, 3), (2, 2), (0, 0), True),  # ceil_mode: the last window overhangs in W only
]
CUDA_CASES = CPU_CASES + [
    ((3, 96, 27, 27), (3, 3), (2, 2), (0, 0), False),
    ((2, 17, 54, 54), (3, 3), (2, 2), (0, 0), False),
    ((1, 40, 33, 31), (3, 3), (2, 2), (1, 1), True),
]


def cases(device):
    return CPU_CASES if device == "cpu" else CUDA_CASES


def _check(backend, device, dtype, layout, shape, kernel, stride, padding, ceil_mode, relu):
    x = random_input(shape, dtype, device, layout, relu=relu).requires_grad_()
    what = f"{backend} {dtype} {layout} {shape} k={kernel} s={stride} p={padding} ceil={ceil_mode} relu={relu}"
    out = ops.max_pool2d(x, kernel, stride, padding, ceil_mode, backend=backend)
    ref = reference.max_pool2d(x.detach().cpu(), kernel, stride, padding, ceil_mode)
    assert out.dtype == dtype
    assert_layout(out, layout, what)
    assert torch.equal(out.detach().cpu(), ref), f"max_pool2d values differ: {what}"
    # the same winners as PyTorch: compare the gradients, which flow to the winner only
    g = random_input(out.shape, dtype, device, layout)
    (gx,) = torch.autograd.grad(out, x, g)
    x_ref = x.detach().cpu().double().requires_grad_()
    ref64 = reference.max_pool2d(x_ref, kernel, stride, padding, ceil_mode)
    (gref,) = torch.autograd.grad(ref64, x_ref, g.detach().cpu().double())
    assert_layout(gx, layout, f"grad {what}")
    assert_close(gx, gref, dtype, "elementwise", what=f"max_pool2d grad {what}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [False, True], ids=["randn", "relu-ties"])
def test_max_pool_forward_backward(backend, device, dtype, layout, relu):
    for case in cases(device):
        _check(backend, device, dtype, layout, *case, relu=relu)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_max_pool_indices_match_pytorch(backend, device, dtype, layout):
    """The kernel's uint8 window offsets name exactly PyTorch's winners (first max on ties)."""
    for shape, kernel, stride, padding, ceil_mode in cases(device):
        x = random_input(shape, dtype, device, layout, relu=True)
        impl = ops.kernels(backend)
        out, idx = impl.max_pool2d(x, list(kernel), list(stride), list(padding), ceil_mode)
        assert idx.dtype == torch.uint8
        ref_idx = reference.max_pool2d_indices(x.cpu(), kernel, stride, padding, ceil_mode)
        assert torch.equal(idx.cpu(), ref_idx), f"indices differ {backend} {dtype} {layout} {shape}"


def test_max_pool_nan_propagates(backend, device):
    x = torch.randn(2, 3, 9, 9)
    x[0, 1, 4, 4] = float("nan")
    x[1, 2, 0, 0] = float("nan")
    x[1, 2, 0, 1] = float("nan")
    for layout in ("contiguous", "channels_last"):
        xd = to_layout(x.to(device), layout)
        out = ops.max_pool2d(xd, 3, 2, backend=backend)
        ref = reference.max_pool2d(x, (3, 3), (2, 2))
        assert torch.equal(torch.isnan(out.cpu()), torch.isnan(ref))
        assert torch.equal(out.cpu().nan_to_num(), ref.nan_to_num())
        impl = ops.kernels(backend)
        _, idx = impl.max_pool2d(xd, [3, 3], [2, 2], [0, 0], False)
        assert torch.equal(idx.cpu(), reference.max_pool2d_indices(x, (3, 3), (2, 2)))


def test_max_pool_all_neg_inf_and_padding(backend, device):
    x = torch.full((1, 2, 5, 5), float("-inf"), device=device)
    out = ops.max_pool2d(x, 2, 1, 1, backend=backend)
    assert torch.equal(out.cpu(), reference.max_pool2d(x.cpu(), (2, 2), (1, 1), (1, 1)))
    impl = ops.kernels(backend)
    _, idx = impl.max_pool2d(x, [2, 2], [1, 1], [1, 1], False)
    assert torch.equal(idx.cpu(), reference.max_pool2d_indices(x.cpu(), (2, 2), (1, 1), (1, 1)))


def test_max_pool_backward_writes_every_element(backend, device):
    """Pixels no window covers (stride = kernel leaves the last columns out) get exact zeros, and
    every other pixel the sum of the gradients of the windows it won."""
    x = random_input((2, 3, 11, 11), torch.float32, device)
    impl = ops.kernels(backend)
    out, idx = impl.max_pool2d(x, [3, 3], [3, 3], [0, 0], False)
    g = torch.randn_like(out)
    gx = impl.max_pool2d_backward(g, idx, [11, 11], [3, 3], [3, 3], [0, 0])
    y = torch.zeros(x.shape, dtype=torch.float64, requires_grad=True)
    (gref,) = torch.autograd.grad(pool_by_indices(y, idx.cpu(), (3, 3), (3, 3)), y, g.double().cpu())
    assert torch.equal(gx.cpu().double(), gref)
    assert gx[..., 9:, :].abs().sum() == 0 and gx[..., :, 9:].abs().sum() == 0


def test_max_pool_empty_batch(backend, device):
    x = torch.randn(0, 3, 9, 9, device=device, requires_grad=True)
    out = ops.max_pool2d(x, 3, 2, backend=backend)
    assert out.shape == (0, 3, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_max_pool_gradcheck_float64():
    if not backends.availability("native", "cpu")[0]:
        pytest.skip(backends.availability("native", "cpu")[1])
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64, requires_grad=True)  # distinct values: no ties
    assert torch.autograd.gradcheck(lambda t: ops.max_pool2d(t, 3, 2, 1, True, backend="native"), (x,))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cpu_backward_ignores_offsets_that_name_no_input(layout):
    """The C++ backward adds a window's gradient only to the input element its offset names: an
    offset past the window (255) or on the window's padding adds nothing, and writes nowhere
    (the channels_last kernel gathers per pixel, the other scatters per plane)."""
    skip_unless_available("native", "cpu")
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 3, 9, 9).contiguous(memory_format=fmt)
    nat = ops.kernels("native")
    out, idx = nat.max_pool2d(x, [3, 3], [2, 2], [1, 1], False)
    g = torch.randn_like(out)
    bad = idx.clone()
    bad[:, :, 0, 0] = 0  # row -1, column -1: the top-left window's padding corner
    bad[:, :, 1, 2] = 255  # past the 3x3 window
    got = nat.max_pool2d_backward(g, bad, [9, 9], [3, 3], [2, 2], [1, 1])
    kept = g.clone()
    kept[:, :, 0, 0] = 0
    kept[:, :, 1, 2] = 0
    assert torch.equal(got, nat.max_pool2d_backward(kept, idx, [9, 9], [3, 3], [2, 2], [1, 1]))
