"""Stepping Linear weights in the backward: the fused weight-gradient + SGD kernel
(alexnet_fast/triton/linear_sgd.py) against torch.optim.SGD on the float64 product, and
``SGD(step_in_backward=True)`` in a training step against torch.optim.SGD."""
import contextlib
import copy

import pytest
import torch
from conftest import CONFIGS_SGD, random_input, rel_error, skip_unless_available, tolerance

from alexnet_fast import backends, linear, optim
from alexnet_fast.step import train_step


@pytest.fixture
def tf32_products():
    """CUDA float32 products in TF32, the only float32 ones the fused kernel replaces."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def _bound(dtype, device):
    return tolerance(dtype, "gemm", tf32=device == "cuda")


def _reference_step(p0, buf0, g, config, lr):
    """torch.optim.SGD in float64 from parameter p0 and buffer buf0 (None: the first step)."""
    q = torch.nn.Parameter(p0.double().cpu())
    opt = torch.optim.SGD([q], lr=lr, foreach=False, **config)
    if buf0 is not None:
        opt.state[q]["momentum_buffer"] = buf0.double().cpu().clone()
    q.grad = g
    opt.step()
    return q.detach(), opt.state[q].get("momentum_buffer")


@pytest.mark.parametrize("shape", [(5, 37, 53), (70, 65, 130)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("config", CONFIGS_SGD, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("first_step", [False, True], ids=["later", "first"])
def test_kernel_matches_sgd_on_the_product(device, shape, dtype, config, first_step, tf32_products):
    """The parameter's change, the momentum buffer and the copy after one step, against
    torch.optim.SGD with the float64 gradient. On the first step the buffer is poisoned: the
    kernel must set it, not read it."""
    skip_unless_available("triton", device)
    from alexnet_fast.triton.linear_sgd import linear_weight_grad_sgd_

    batch, rows, cols = shape
    grad_out, x = random_input((batch, rows), dtype, device), random_input((batch, cols), dtype, device)
    p0 = random_input((rows, cols), torch.float32, device)
    momentum = config.get("momentum", 0)
    buf0 = random_input((rows, cols), torch.float32, device) if momentum and not first_step else None
    p = p0.clone()
    buf = None
    if momentum:
        buf = torch.full_like(p, float("nan")) if first_step else buf0.clone()
    low = torch.full_like(p, float("nan"), dtype=torch.bfloat16)
    lr = 0.05
    linear_weight_grad_sgd_(grad_out, x, p, buf, low, lr=lr, weight_decay=config.get("weight_decay", 0.0),
                            momentum=momentum, dampening=config.get("dampening", 0.0),
                            nesterov=config.get("nesterov", False), maximize=config.get("maximize", False),
                            first_step=first_step)
    g = grad_out.double().cpu().t() @ x.double().cpu()
    ref_p, ref_buf = _reference_step(p0, buf0, g, config, lr)
    bound = _bound(dtype, device)
    err = rel_error(p.double().cpu() - p0.double().cpu(), ref_p - p0.double().cpu(), normwise=True)
    assert err <= bound, f"the parameter's change: relative error {err:.3g} > {bound:g}"
    if momentum:
        err = rel_error(buf, ref_buf, normwise=True)
        assert err <= bound, f"momentum buffer: relative error {err:.3g} > {bound:g}"
    _assert_cast(low, p)


def _assert_cast(low, p):
    """``low`` is ``p`` cast to bfloat16: to nearest-even on the GPU, as PyTorch casts; the Triton
    interpreter casts by truncation, so there each element may be that instead."""
    want = p.to(torch.bfloat16)
    if not backends.triton_interpreted():
        assert torch.equal(low, want), "the copy is the new parameter's cast"
        return
    truncated = (p.view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)  # exact: low bits are 0
    assert bool(((low == want) | (low == truncated)).all()), "the copy is the new parameter's cast"


def test_kernel_arguments_are_named():
    skip_unless_available("triton", "cpu")
    from alexnet_fast.triton.linear_sgd import linear_weight_grad_sgd_

    g, x, p = torch.randn(4, 3), torch.randn(4, 5), torch.randn(3, 5)
    hyper = dict(lr=0.1, weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
                 first_step=False)
    cases = [
        ((g[0], x, p, None, None), ValueError, "grad_out must be a 2-D tensor"),
        ((g, x.double(), p, None, None), TypeError, "grad_out and x must share a dtype"),
        ((g, x, p.t(), None, None), ValueError, r"param must have shape \(grad_out.shape\[1\], x.shape\[1\]\)"),
        ((g, x[:3], p, None, None), ValueError, "one row per sample"),
        ((g, x, p.t().contiguous().t(), None, None), ValueError, "param must be a contiguous float32 tensor"),
        ((g, x, p, torch.zeros_like(p), None), ValueError, "momentum_buffer must be given exactly when"),
        ((g, x, p, None, torch.zeros_like(p)), ValueError, "copy must be a contiguous"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            linear_weight_grad_sgd_(*args, **hyper)


class _TwoLayers(torch.nn.Module):
    """Two Linears through alexnet_fast.linear, as AlexNet's classifier runs them; ``shared``
    runs the first weight twice."""

    def __init__(self, shared=False):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(23, 23 if shared else 40), torch.nn.Linear(23 if shared else 40, 7)
        self.shared = shared

    def forward(self, x):
        h = torch.relu(linear.linear(x, self.fc1.weight, self.fc1.bias))
        if self.shared:
            h = torch.relu(linear.linear(h, self.fc1.weight, self.fc1.bias))
        return linear.linear(h, self.fc2.weight, self.fc2.bias)


def _batches(device, n=3):
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(9, 23, generator=gen).to(device), torch.randint(0, 7, (9,), generator=gen).to(device))
            for _ in range(n)]


def test_train_step_steps_the_weights_in_the_backward(device, tf32_products):
    """Three steps against torch.optim.SGD on a copy of the model: the weights have no gradient
    (the backward stepped them), the biases do (step() did), and every parameter moved as
    torch.optim.SGD moved it, momentum buffers included."""
    skip_unless_available("triton", device)
    torch.manual_seed(0)
    ours = _TwoLayers().to(device)
    ref = copy.deepcopy(ours)
    start = [p.detach().clone() for p in ours.parameters()]
    args = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt = optim.SGD(ours.parameters(), autocast_dtype=None, step_in_backward=True, **args)
    ref_opt = torch.optim.SGD(ref.parameters(), foreach=False, **args)
    criterion = torch.nn.CrossEntropyLoss()
    for x, y in _batches(device):
        train_step(ours, opt, criterion, x, y)
        train_step(ref, ref_opt, criterion, x, y)
        assert ours.fc1.weight.grad is None and ours.fc2.weight.grad is None
        assert ours.fc1.bias.grad is not None and ours.fc2.bias.grad is not None
    bound = _bound(torch.float32, device)
    for (name, p), q, p0 in zip(ours.named_parameters(), ref.parameters(), start):
        err = rel_error(p - p0, q - p0, normwise=True)
        assert err <= bound, f"{name}'s change: relative error {err:.3g} > {bound:g}"
        err = rel_error(opt.state[p]["momentum_buffer"], ref_opt.state[q]["momentum_buffer"], normwise=True)
        assert err <= bound, f"{name}'s momentum buffer: relative error {err:.3g} > {bound:g}"


def test_only_inside_the_block(device, tf32_products):
    """A backward outside ``steps_in_backward`` (or with step_in_backward off) leaves gradients and
    steps nothing."""
    skip_unless_available("triton", device)
    model = _TwoLayers().to(device)
    x, y = _batches(device, 1)[0]
    before = model.fc1.weight.detach().clone()
    for step_in_backward, in_block in ((True, False), (False, True)):
        opt = optim.SGD(model.parameters(), lr=0.1, autocast_dtype=None, step_in_backward=step_in_backward)
        with opt.steps_in_backward() if in_block else contextlib.nullcontext():
            torch.nn.functional.cross_entropy(model(x), y).backward()
        assert model.fc1.weight.grad is not None and torch.equal(model.fc1.weight.detach(), before)
        model.zero_grad(set_to_none=True)


def test_a_weight_used_twice_is_refused(device, tf32_products):
    """Its first use's step changes the weight the second use saved: autograd's version check
    stops the backward instead of a step with half the gradient."""
    skip_unless_available("triton", device)
    model = _TwoLayers(shared=True).to(device)
    opt = optim.SGD(model.parameters(), lr=0.1, autocast_dtype=None, step_in_backward=True)
    x, y = _batches(device, 1)[0]
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        train_step(model, opt, torch.nn.CrossEntropyLoss(), x, y)
