"""Inputs the shape-and-dtype tests do not reach, for every op of both kernel backends: NaN (it
must come out where PyTorch's ops put it), strided inputs that are neither contiguous nor
channels_last, and the expanded (stride-0) gradient that ``out.sum().backward()`` passes."""
import pytest
import torch
from conftest import assert_close

from alexnet_fast import ops, reference

OPS = ("lrn", "max_pool2d", "lrn_max_pool2d", "conv2d_relu")
LRN = dict(size=5, alpha=0.5, beta=0.6, k=1.0)  # strong enough that every window channel counts
POOL = dict(kernel_size=3, stride=2)
KIND = {"conv2d_relu": "gemm"}  # the others are elementwise


@pytest.fixture(autouse=True)
def true_fp32():
    """These tests are about NaN and strides, not rounding: float32 convolutions run in true fp32
    (TF32 is PyTorch's default for them on CUDA), so the float32 bounds apply and no output lies
    near enough to zero for TF32 to flip its ReLU mask and move the gradient."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def _apply(op, x, weight=None, bias=None, backend=None):
    """``op`` on ``x`` through our ops (``backend`` given) or the PyTorch reference (None)."""
    impl = ops if backend is not None else reference
    kw = {} if backend is None else {"backend": backend}
    if op == "lrn":
        return impl.lrn(x, **LRN, **kw)
    if op == "max_pool2d":
        return impl.max_pool2d(x, **POOL, **kw)
    if op == "lrn_max_pool2d":
        return impl.lrn_max_pool2d(x, **LRN, **POOL, **kw)
    return impl.conv2d_relu(x, weight, bias, 1, 1, **kw)


def _conv_params(c_in, dtype, device):
    w = torch.randn(5, c_in, 3, 3, dtype=torch.float64) / (9 * c_in) ** 0.5
    b = torch.randn(5, dtype=torch.float64) * 0.1
    return w.to(dtype).to(device), b.to(dtype).to(device)


@pytest.mark.parametrize("channels", [7, 16])  # 16: whole 16-byte vectors of channels (the vector kernels)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", OPS)
def test_nan_comes_out_where_pytorch_puts_it(backend, device, dtype, layout, op, channels):
    x = torch.randn(2, channels, 9, 10, dtype=torch.float64)
    x[0, 3, 4, 4] = float("nan")  # inside every window kind
    x[1, 0, 0, 9] = float("nan")  # at a corner and the first channel
    x[1, 5, 6:8, 2] = float("nan")  # two in one window column: the last one wins
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.to(dtype).to(device).contiguous(memory_format=fmt)
    weight, bias = _conv_params(channels, dtype, device) if op == "conv2d_relu" else (None, None)
    out = _apply(op, x, weight, bias, backend)
    ref = _apply(op, x.double().cpu(), *(t.double().cpu() if t is not None else None for t in (weight, bias)))
    assert torch.isnan(ref).any() and not torch.isnan(ref).all(), "the case must have NaN and numbers"
    # assert_close fails unless NaN stands exactly where the reference has it
    assert_close(out, ref, dtype, KIND.get(op, "elementwise"), what=f"{op} {backend} {dtype} {layout} with NaN")
    # The gradient goes to the NaN PyTorch picks (the last in the window). Not for the LRN in
    # 16-bit dtypes: its rounding may flip near-ties among the numbers, which
    # test_lrn_max_pool.py allows for.
    if op == "max_pool2d" or (op == "lrn_max_pool2d" and dtype in (torch.float32, torch.float64)):
        x64 = x.detach().double().cpu().requires_grad_()
        g = torch.randn(out.shape, dtype=torch.float64)
        (gx,) = torch.autograd.grad(_apply(op, x.requires_grad_(), backend=backend), x, g.to(dtype).to(device))
        (gref,) = torch.autograd.grad(_apply(op, x64), x64, g.to(dtype).double())
        assert_close(gx, gref, dtype, "elementwise", what=f"{op} {backend} {dtype} {layout} gradient with NaN")


@pytest.mark.parametrize("op", OPS)
def test_strided_input_and_expanded_gradient(backend, device, op):
    """A slice of a larger tensor (neither contiguous nor channels_last) in, and the stride-0
    gradient of ``out.sum()`` back: the ops make what they need dense themselves."""
    base = torch.randn(2, 9, 12, 15, dtype=torch.float64)
    x64 = base[:, 1:8, 1:, 2:13].requires_grad_()  # (2, 7, 11, 11)
    assert not x64.is_contiguous() and not x64.is_contiguous(memory_format=torch.channels_last)
    x = base.float().to(device)[:, 1:8, 1:, 2:13].requires_grad_()
    weight, bias = _conv_params(7, torch.float32, device) if op == "conv2d_relu" else (None, None)
    out = _apply(op, x, weight, bias, backend)
    w64, b64 = (t.double().cpu() if t is not None else None for t in (weight, bias))
    ref = _apply(op, x64, w64, b64)
    kind = KIND.get(op, "elementwise")
    assert_close(out, ref, torch.float32, kind, what=f"{op} {backend} on a strided input")
    out.sum().backward()
    ref.sum().backward()
    assert_close(x.grad, x64.grad, torch.float32, kind, what=f"{op} {backend} gradient of out.sum()")
