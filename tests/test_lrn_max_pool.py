"""Fused LRN -> max-pool against max_pool2d(lrn(x)) in float64, with the winners chosen as the
unfused ops would choose them in the output dtype."""
import pytest
import torch
from conftest import assert_close, assert_layout, pool_by_indices, random_input, skip_unless_available

from alexnet_fast import backends, ops, reference

# (shape, size, kernel, stride)
CPU_CASES = [((2, 7, 9, 9), 5, (3, 3), (2, 2)), ((1, 3, 8, 11), 5, (3, 3), (2, 2)),
             ((2, 6, 7, 6), 4, (2, 3), (1, 2))]
CUDA_CASES = CPU_CASES + [((3, 96, 27, 27), 5, (3, 3), (2, 2)), ((2, 256, 13, 13), 5, (3, 3), (2, 2)),
                          ((1, 33, 30, 31), 3, (3, 3), (2, 2)),
                          ((2, 32, 28, 30), 5, (3, 3), (2, 2))]  # even: the last row and column in no window
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


RELU_CUDA_CASES = CUDA_CASES + [((2, 16, 11, 9), 5, (3, 3), (2, 2))]


@pytest.mark.parametrize("backend", ["native"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_backward_through_relu(backend, device, dtype, layout):
    """lrn_max_pool2d_backward_relu: for x = relu(z) (zeros, so ties and a mask that matters), the
    gradient of z (lrn_max_pool2d's input gradient, zero where x <= 0) against the float64
    reference, and its per-channel sum against the float64 sum of what the op wrote."""
    skip_unless_available(backend, device)
    impl = ops.kernels(backend)
    lrn = PARAMS[0]
    for shape, size, kernel, stride in CPU_CASES if device == "cpu" else RELU_CUDA_CASES:
        what = f"{dtype} {layout} {shape} size={size} k={kernel} s={stride}"
        x = random_input(shape, dtype, device, layout, relu=True, scale=3.0)
        out, idx = impl.lrn_max_pool2d(x, size, *lrn.values(), list(kernel), list(stride))
        g = random_input(out.shape, dtype, device, layout)
        dz, bias_grad = impl.lrn_max_pool2d_backward_relu(g, x, idx, size, *lrn.values(), list(kernel), list(stride))
        assert_layout(dz, layout, f"dz {what}")
        assert dz.dtype == bias_grad.dtype == dtype and bias_grad.shape == (shape[1],)
        x64 = x.double().cpu().requires_grad_()
        ref = pool_by_indices(reference.lrn(x64, size, **lrn), idx.cpu(), kernel, stride)
        (gx,) = torch.autograd.grad(ref, x64, g.double().cpu())
        assert_close(dz, gx * (x64 > 0), dtype, "elementwise", what=f"dz {what}")
        assert_close(bias_grad, dz.double().sum((0, 2, 3)), dtype, "gemm", what=f"bias grad {what}")


CONV_POOL_CASES = [  # (x shape, weight shape, stride, padding): conv1 (through space-to-depth on CUDA), conv2-like
    ((2, 3, 67, 67), (96, 3, 11, 11), 4, 0),
    ((2, 16, 15, 13), (32, 16, 5, 5), 1, 2),
]


@pytest.mark.parametrize("pool", ["lrn_max_pool2d", "max_pool2d"])
@pytest.mark.parametrize("backend", ["auto", "native", "torch"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_conv_relu_pool_is_the_two_ops(backend, device, layout, precision, pool):
    """ops.conv2d_relu_lrn_max_pool2d and ops.conv2d_relu_max_pool2d against conv2d_relu then the
    pool with the same backend: the same output and gradients (x, weight, bias), within rounding.
    On CUDA, ``auto`` runs each as one autograd node (cuDNN's convolution, our pool, and the
    backward through the ReLU with the pool's); elsewhere it is the two ops."""
    if backend != "auto":
        skip_unless_available(backend, device)
    gen = torch.Generator().manual_seed(0)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # both paths run the same convolutions; keep them exact
    try:
        for x_shape, w_shape, stride, padding in CONV_POOL_CASES:
            what = f"{pool} {backend} {precision} {layout} {x_shape} {w_shape}"
            x = random_input(x_shape, torch.float32, device, layout).requires_grad_()
            weight = (torch.randn(w_shape, generator=gen) * w_shape[1] ** -0.5).to(device).requires_grad_()
            bias = torch.randn(w_shape[0], generator=gen).to(device).requires_grad_()
            results, g = [], None
            for fused in (True, False):
                with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                    if fused:
                        out = getattr(ops, f"conv2d_relu_{pool}")(x, weight, bias, stride, padding, backend=backend)
                    else:
                        out = getattr(ops, pool)(ops.conv2d_relu(x, weight, bias, stride, padding, backend=backend),
                                                 backend=backend)
                g = random_input(out.shape, out.dtype, device, layout) if g is None else g
                results.append((out, *torch.autograd.grad(out, (x, weight, bias), g)))
                if fused and device == "cuda" and backend == "auto" and layout == "channels_last":
                    assert type(out.grad_fn).__name__ == "ConvReLUPoolBackward", what
            (out, *grads), (ref, *ref_grads) = results
            assert_layout(out, layout, what)
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            # NCHW: the two ops pool the convolution's output in NCHW, the one node pools it in
            # cuDNN's channels_last (another kernel, which may round differently)
            assert_close(out, ref, dtype, "elementwise", what=f"forward {what}")
            for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads):
                assert got.dtype == want.dtype and got.shape == want.shape
                assert_close(got, want, dtype, "gemm", what=f"grad {name} {what}")
    finally:
        torch.backends.cudnn.allow_tf32 = saved
