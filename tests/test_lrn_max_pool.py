"""Fused LRN -> max-pool against max_pool2d(lrn(x)) in float64, with the winners chosen as the
unfused ops would choose them in the output dtype."""
import pytest
import torch
from conftest import assert_close, assert_layout, pool_by_indices, random_input

from alexnet_fast import backends, ops, reference

# (shape, size, kernel, stride)
CPU_CASES = [((2, 7, 9, 9), 5, (3, 3), (2, 2)), ((1, 3, 8, 11), 5, (3, 3), (2, 2)),
             ((2, 6, 7, 6), 4, (2, 3), (1, 2))]
CUDA_CASES = CPU_CASES + [((3, 96, 27, 27), 5, (3, 3), (2, 2)), ((2, 256, 13, 13), 5, (3, 3), (2, 2)),
                          ((1, 33, 30, 31), 3, (3, 3), (2, 2))]
# AlexNet's LRN, and one where the neighbouring channels matter a lot (AlexNet's alpha leaves their
# share of the output near 1e-4, which a wrong window in a 16-bit dtype would hide)
PARAMS = [dict(alpha=1e-4, beta=0.75, k=2.0), dict(alpha=0.5, beta=0.6, k=1.0)]


def reference_indices(x, size, kernel, stride, lrn):
    """Winners of max_pool2d(lrn(x)) with the LRN values rounded to x's dtype (computed in fp32),
    the rule our kernels follow; float64 inputs keep float64."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = reference.lrn(x.cpu().to(acc), size, **lrn).to(x.dtype)
    return reference.max_pool2d_indices(y, kernel, stride)


def _check_half_winners(x, size, kernel, stride, lrn, idx, ref_idx, what):
    """In 16-bit dtypes our fp32 LRN may round a value one ulp away from PyTorch's, which can turn
    a near-tie into a tie: allow a rare different winner only where the two candidates are equal
    to within one ulp, and check the rest exactly. The count bound (0.1% of the windows, but one
    at least: on the CPU cases' 45-224 windows one flipped near-tie is already 0.4-2%) only catches
    a wholesale difference."""
    differ = idx != ref_idx
    assert int(differ.sum()) <= max(1, differ.numel() // 1000), f"{int(differ.sum())} winners differ: {what}"
    if differ.any():
        y = reference.lrn(x.cpu().float(), size, **lrn)
        ours = pool_by_indices(y, idx, kernel, stride)[differ]
        theirs = pool_by_indices(y, ref_idx, kernel, stride)[differ]
        ulp = theirs.abs() * torch.finfo(x.dtype).eps
        assert ((ours - theirs).abs() <= ulp).all(), f"different winners that are not near-ties: {what}"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("relu", [False, True], ids=["randn", "relu-ties"])
@pytest.mark.parametrize("lrn", PARAMS, ids=["alexnet", "strong"])
def test_lrn_max_pool_forward_backward(backend, device, dtype, layout, relu, lrn):
    for shape, size, kernel, stride in CPU_CASES if device == "cpu" else CUDA_CASES:
        x = random_input(shape, dtype, device, layout, relu=relu, scale=3.0).requires_grad_()
        what = f"{backend} {dtype} {layout} {shape} size={size} k={kernel} s={stride}"
        out = ops.lrn_max_pool2d(x, size, **lrn, kernel_size=kernel, stride=stride, backend=backend)
        assert out.dtype == dtype
        assert_layout(out, layout, what)
        impl = ops.kernels(backend)
        _, idx = impl.lrn_max_pool2d(x.detach(), size, *lrn.values(), list(kernel), list(stride))
        ref_idx = reference_indices(x.detach(), size, kernel, stride, lrn)
        if dtype in (torch.float32, torch.float64):
            assert torch.equal(idx.cpu(), ref_idx), f"winners differ: {what}"
        else:
            _check_half_winners(x.detach(), size, kernel, stride, lrn, idx.cpu(), ref_idx, what)
            ref_idx = idx.cpu()
        x64 = x.detach().double().cpu().requires_grad_()
        ref = pool_by_indices(reference.lrn(x64, size, **lrn), ref_idx, kernel, stride)
        assert_close(out, ref, dtype, "elementwise", what=f"lrn_max_pool2d {what}")
        if dtype in (torch.float32, torch.float64):  # the winners are unambiguous: the plain composition
            plain = reference.lrn_max_pool2d(x64, size, **lrn, kernel_size=kernel, stride=stride)
            assert_close(out, plain, dtype, "elementwise", what=f"vs max_pool2d(lrn) {what}")
        g = random_input(out.shape, dtype, device, layout)
        (gx,) = torch.autograd.grad(out, x, g)
        (gref,) = torch.autograd.grad(ref, x64, g.double().cpu())
        assert_layout(gx, layout, f"grad {what}")
        assert_close(gx, gref, dtype, "elementwise", what=f"lrn_max_pool2d grad {what}")


def test_lrn_max_pool_empty_batch(backend, device):
    x = torch.randn(0, 5, 9, 9, device=device, requires_grad=True)
    out = ops.lrn_max_pool2d(x, backend=backend)
    assert out.shape == (0, 5, 4, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_lrn_max_pool_gradcheck_float64():
    if not backends.availability("native", "cpu")[0]:
        pytest.skip(backends.availability("native", "cpu")[1])
    x = torch.randn(1, 6, 7, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: ops.lrn_max_pool2d(t, 3, 0.3, 0.75, 1.0, 3, 2, backend="native"), (x,))
