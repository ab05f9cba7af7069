"""Fused conv+bias+ReLU kernels: forward, input gradient, weight and bias gradients against
F.conv2d + ReLU in float64."""
import pytest
import torch
from conftest import assert_close, assert_layout, random_input, skip_unless_available, tolerance

from alexnet_fast import autotable, backends, ops, reference

# (x shape, weight shape, stride, padding): odd sizes, C_out not a multiple of 8, N=1,
# rectangular kernels, a conv1-like 11x11 stride-4 layer.
CPU_CASES = [
    ((2, 3, 11, 11), (5, 3, 3, 3), (1, 1), (1, 1)),
    ((1, 4, 9, 8), (7, 4, 5, 5), (2, 2), (2, 2)),
    ((2, 3, 27, 27), (8, 3, 11, 11), (4, 4), (0, 0)),
    ((2, 5, 6, 7), (3, 5, 1, 1), (1, 1), (0, 0)),
    ((1, 4, 7, 9), (6, 4, 3, 2), (2, 1), (1, 0)),
    ((1, 60, 5, 6), (10, 60, 3, 3), (1, 1), (1, 1)),  # C_in in channel blocks per tap, the last one partial
    ((1, 4, 5, 6), (3, 4, 1, 1), (1, 1), (1, 1)),  # stride 1, padding >= kernel: no flipped-kernel input gradient
    # channels in multiples of 8 at stride 1: the weight gradient on the pixel grid, over several
    # splits, and with a rectangular kernel, unequal padding and no padding
    ((2, 16, 11, 12), (16, 16, 3, 3), (1, 1), (1, 1)),
    ((1, 8, 9, 7), (24, 8, 5, 3), (1, 1), (2, 0)),
]
CUDA_CASES = CPU_CASES + [
    ((4, 96, 27, 27), (256, 96, 5, 5), (1, 1), (2, 2)),
    ((3, 256, 13, 13), (384, 256, 3, 3), (1, 1), (1, 1)),
    ((2, 3, 63, 63), (96, 3, 11, 11), (4, 4), (0, 0)),
    ((2, 20, 17, 19), (37, 20, 3, 3), (1, 1), (1, 1)),
]


def _run(backend, device, dtype, layout, xs, ws, stride, padding, bias=True, x_grad=True, w_grad=True):
    # PyTorch's rule, which the kernels follow: float32 convolutions on CUDA use TF32 when cuDNN may.
    tf32 = dtype == torch.float32 and device == "cuda" and torch.backends.cudnn.allow_tf32
    what = f"{backend} {dtype} {layout} x={xs} w={ws} s={stride} p={padding} bias={bias} tf32={tf32} " \
           f"grads x={x_grad} w={w_grad}"
    x = random_input(xs, dtype, device, layout).requires_grad_(x_grad)
    w = (random_input(ws, dtype, device) / (ws[1] * ws[2] * ws[3]) ** 0.5).requires_grad_(w_grad)
    b = random_input((ws[0],), dtype, device, scale=0.1).requires_grad_() if bias else None
    out = ops.conv2d_relu(x, w, b, stride, padding, backend=backend)
    x64, w64 = x.detach().double().cpu().requires_grad_(x_grad), w.detach().double().cpu().requires_grad_(w_grad)
    b64 = b.detach().double().cpu().requires_grad_() if bias else None
    ref = reference.conv2d_relu(x64, w64, b64, stride, padding)
    assert out.dtype == dtype
    assert_layout(out, layout, what)
    assert (ref > 0).any() and (ref == 0).any(), "the case must exercise both sides of the ReLU"
    assert_close(out, ref, dtype, "gemm", tf32, what=f"conv2d_relu {what}")
    # The gradients mask grad_out with the op's own output (out > 0). Where the rounded output and
    # the exact one fall on different sides of zero the masks differ, and a few hundred such
    # near-zero outputs move a normwise error by sqrt(their share); so the GEMMs are checked
    # against the float64 gradient under our mask, and the mask against the exact one away from 0.
    pre64 = torch.nn.functional.conv2d(x64, w64, b64, stride, padding)
    ours_on = out.detach().cpu() > 0
    decided = pre64.detach().abs() > tolerance(dtype, "gemm", tf32) * pre64.detach().abs().max()
    assert torch.equal(ours_on[decided], (pre64.detach() > 0)[decided]), f"ReLU mask differs: {what}"
    g = random_input(out.shape, dtype, device, layout)
    inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
    inputs64 = [t for t in (x64, w64, b64) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(out, inputs, g)
    grads64 = torch.autograd.grad(pre64, inputs64, g.double().cpu() * ours_on)
    names = (["x"] if x_grad else []) + (["weight"] if w_grad else []) + (["bias"] if bias else [])
    assert len(names) == len(grads)
    for name, got, want in zip(names, grads, grads64):
        assert got.shape == want.shape and got.dtype == dtype
        assert_close(got, want, dtype, "gemm", tf32, what=f"grad {name} {what}")
    if x_grad:
        assert_layout(grads[0], layout, f"grad x {what}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_conv_relu(backend, device, dtype, layout):
    tf32_flag = torch.backends.cudnn.allow_tf32
    try:
        for allow_tf32 in ([False, True] if dtype == torch.float32 and device == "cuda" else [False]):
            torch.backends.cudnn.allow_tf32 = allow_tf32
            for case in CPU_CASES if device == "cpu" else CUDA_CASES:
                _run(backend, device, dtype, layout, *case)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32_flag


def test_conv_relu_no_bias_and_frozen_input(backend, device):
    for layout in ("contiguous", "channels_last"):
        _run(backend, device, torch.float32, layout, (2, 3, 27, 27), (8, 3, 11, 11), (4, 4), (0, 0),
             bias=False, x_grad=False)
        # a frozen weight: the bias still gets its gradient
        _run(backend, device, torch.float32, layout, (2, 4, 9, 8), (7, 4, 3, 3), (1, 1), (1, 1), w_grad=False)
        _run(backend, device, torch.float32, layout, (2, 4, 9, 8), (7, 4, 3, 3), (1, 1), (1, 1), w_grad=False,
             x_grad=False)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("cudnn_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("choice", backends.CONV_ONLY)
def test_conv_relu_cudnn_on_cuda(monkeypatch, choice, cudnn_dtype, layout):
    """auto's cuDNN choices: cuDNN's fused forward and the ReLU-masked cuDNN gradients, on the
    input itself (cudnn) or on its space-to-depth blocks (cudnn_s2d)."""
    skip_unless_available(choice, "cuda")
    monkeypatch.setattr(autotable, "preference", lambda *args, **kwargs: (choice,))
    assert backends.resolve("auto", "conv2d_relu", "cuda") == choice
    tf32_flag = torch.backends.cudnn.allow_tf32
    try:
        for allow_tf32 in [False, True] if cudnn_dtype == torch.float32 else [False]:
            torch.backends.cudnn.allow_tf32 = allow_tf32
            for case in CUDA_CASES:
                _run("auto", "cuda", cudnn_dtype, layout, *case)
            _run("auto", "cuda", cudnn_dtype, layout, *CPU_CASES[2], bias=False, x_grad=False)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32_flag


def test_conv_relu_autocast(backend, device):
    """Under autocast the op runs in the autocast dtype with fp32 parameters, like F.conv2d."""
    dtype = torch.bfloat16
    x = torch.randn(2, 4, 9, 9, device=device)
    w = torch.randn(6, 4, 3, 3, device=device, requires_grad=True)
    b = torch.randn(6, device=device, requires_grad=True)
    with torch.autocast(device, dtype=dtype):
        out = ops.conv2d_relu(x, w, b, 1, 1, backend=backend)
        ref = ops.conv2d_relu(x, w, b, 1, 1, backend="torch")
    assert out.dtype == ref.dtype == dtype
    x64, w64, b64 = (t.detach().double().cpu().requires_grad_() for t in (x, w, b))
    pre64 = torch.nn.functional.conv2d(x64, w64, b64, 1, 1)
    assert_close(out, pre64.relu(), dtype, "gemm")
    out.float().sum().backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32
    # float32 gradients of bf16 products, masked by the op's own output (see _run)
    gw, gb = torch.autograd.grad(pre64, (w64, b64), (out.detach().cpu() > 0).double())
    assert_close(w.grad, gw, dtype, "gemm", what="autocast weight gradient")
    assert_close(b.grad, gb, dtype, "gemm", what="autocast bias gradient")


def test_conv_relu_empty_batch(backend, device):
    x = torch.randn(0, 3, 9, 9, device=device, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=device, requires_grad=True)
    out = ops.conv2d_relu(x, w, None, 1, 0, backend=backend)
    assert out.shape == (0, 4, 7, 7)
    out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w.grad, torch.zeros_like(w))


def test_conv_relu_gradcheck_float64():
    if not backends.availability("native", "cpu")[0]:
        pytest.skip(backends.availability("native", "cpu")[1])
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: ops.conv2d_relu(*t, (2, 1), (1, 0), backend="native"), (x, w, b))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_relu_backward_bias(device, dtype, layout):
    """relu_backward_bias: threshold_backward (a zero output masks its gradient, a NaN output
    passes it) exactly, and the per-channel sum of what it wrote against float64. On CUDA, 16
    channels in channels_last take the one-pass kernel and 7 the two passes."""
    skip_unless_available("native", device)
    for shape in ((3, 16, 5, 7), (2, 7, 4, 4)):
        out = random_input(shape, dtype, device, layout, relu=True)
        out[0, 1, 2, 3] = float("nan")
        g = random_input(shape, dtype, device, layout)
        masked, bias_grad = torch.ops.alexnet_fast.relu_backward_bias(g, out)
        ref = torch.where(out.double().cpu() <= 0, 0.0, g.double().cpu())
        assert_layout(masked, layout, f"masked {shape}")
        assert masked.dtype == bias_grad.dtype == dtype and bias_grad.shape == (shape[1],)
        assert torch.equal(masked.double().cpu(), ref), f"masked {shape} {layout}"
        assert_close(bias_grad, ref.sum((0, 2, 3)), dtype, "gemm", what=f"bias gradient {shape} {layout}")


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_backward_ops_agree(device, layout):
    """The Triton library's one backward op (what autograd calls) and its two separate ones (the
    native library's schemas) run the same mask pass and kernels, so they agree bit for bit, for
    every choice of gradients. A NaN output passes its gradient, as in PyTorch."""
    skip_unless_available("triton", device)
    ns = ops.kernels("triton")  # imports the Triton library, which a test run in another order may not have
    stride, padding = [2, 1], [1, 1]
    x = random_input((2, 5, 9, 8), torch.float32, device, layout)
    w = random_input((7, 5, 3, 3), torch.float32, device)
    out = ns.conv2d_relu(x, w, None, stride, padding)
    out[0, 1, 2, 3] = float("nan")
    g = random_input(out.shape, torch.float32, device, layout)
    gx = ns.conv2d_relu_backward_input(g, out, w, [9, 8], stride, padding)
    gw, gb = ns.conv2d_relu_backward_weight(g, out, x, [3, 3], stride, padding)
    assert_close(gb, torch.where(out.double().cpu() <= 0, 0.0, g.double().cpu()).sum((0, 2, 3)), torch.float32,
                 "gemm", what="bias gradient")
    for mask in ([True, True, True], [False, True, False], [True, False, False], [False, False, True]):
        args = (g, out, x, w, stride, padding, mask)
        torch.library.opcheck(ns.conv2d_relu_backward.default, args)
        for got, want, wanted, name in zip(ns.conv2d_relu_backward(*args), (gx, gw, gb), mask, ("x", "weight", "bias")):
            if wanted:
                assert torch.equal(got, want) and got.stride() == want.stride(), f"grad {name}, mask {mask}"
            else:
                assert got.numel() == 0, f"grad {name} not asked for, mask {mask}"
    with pytest.raises(ValueError, match="weight must be a 4-D"):
        ns.conv2d_relu_backward(g, out, x, w[0, 0, 0], stride, padding, [True, True, True])
    with pytest.raises(ValueError, match="weight must have x's 5 input channels"):
        ns.conv2d_relu_backward(g, out, x, w[:, :4], stride, padding, [True, True, True])


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_triton_weight_grid_special_inputs(device, layout):
    """The stride-1 weight gradient on the pixel grid (16-bit, channels in multiples of 8) with
    what the shape cases do not reach: an x that is a strided slice, the expanded (stride-0)
    gradient of ``out.sum()``, and a NaN output, whose gradient passes as in PyTorch. Against
    float64 under the op's own mask."""
    skip_unless_available("triton", device)
    from alexnet_fast.triton import conv

    ns = ops.kernels("triton")
    dtype, stride, padding = torch.bfloat16, [1, 1], [1, 1]
    x = random_input((2, 24, 10, 12), dtype, device, layout)[:, 4:20, 1:, 2:]  # (2, 16, 9, 10)
    w = random_input((8, 16, 3, 3), dtype, device) / 12
    assert conv._weight_grid(x, 8, (3, 3), stride, padding) is not None, "the case must take the grid path"
    out = ns.conv2d_relu(x, w, None, stride, padding)
    out[0, 1, 2, 3] = float("nan")
    g = torch.ones((), dtype=dtype, device=device).expand(out.shape)
    gx, gw, gb = ns.conv2d_relu_backward(g, out, x, w, stride, padding, [True, True, True])
    passed = (~(out.double().cpu() <= 0)).double()  # NaN passes
    assert passed.any() and not passed.all()
    x64 = x.detach().double().cpu().requires_grad_()
    w64 = w.detach().double().cpu().requires_grad_()
    rx, rw = torch.autograd.grad(torch.nn.functional.conv2d(x64, w64, None, stride, padding), (x64, w64), passed)
    assert_close(gx, rx, dtype, "gemm", what="input gradient")
    assert_close(gw, rw, dtype, "gemm", what="weight gradient")
    assert_close(gb, passed.sum((0, 2, 3)), dtype, "gemm", what="bias gradient")
