"""alexnet_fast.optim: the SGD step (``alexnet_fast::sgd_step_``) against torch.optim.SGD, the
autocast copies it writes, when the ops may use them, and that training is the same with them."""
import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS_SGD as CONFIGS
from conftest import assert_close, skip_unless_available, tolerance

from alexnet_fast import optim
from alexnet_fast.model import AlexNet
from alexnet_fast.step import train_step


def _params(device):
    gen = torch.Generator().manual_seed(0)
    shapes = [(37, 5), (4, 3, 5, 7), (7,), (1,), (2, 3, 1, 1)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device)) for s in shapes]
    params[1] = torch.nn.Parameter(params[1].detach().to(memory_format=torch.channels_last))
    return params


def _run(device, config, copy_dtype=torch.bfloat16, steps=4):
    """Steps our SGD and torch.optim.SGD (in float64) on the same gradients; a parameter that gets
    its first gradient only from the second step (its first-step buffer rule comes later), and
    one that never gets one."""
    ours = _params(device)
    ref = [torch.nn.Parameter(p.detach().double().cpu()) for p in ours]
    opt = optim.SGD(ours, lr=0.05, autocast_dtype=copy_dtype, **config)
    ref_opt = torch.optim.SGD(ref, lr=0.05, foreach=False, **config)
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        for i, (p, q) in enumerate(zip(ours, ref)):
            if i == len(ours) - 1 or (i == 2 and step == 0):
                continue
            g = torch.randn(p.shape, generator=gen)
            p.grad = torch.empty_like(p).copy_(g)  # in the parameter's layout, as autograd leaves it
            q.grad = g.double()
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            assert_close(p, q, torch.float32, "elementwise", what=f"step {step} parameter {tuple(p.shape)}")
    return ours, opt


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sgd_step_matches_torch(device, config):
    skip_unless_available("native", device)
    ours, opt = _run(device, config)
    assert ours[1].grad.is_contiguous(memory_format=torch.channels_last)  # the kernel walked its storage
    for p in ours:
        buffer = opt.state[p].get("momentum_buffer")
        assert (buffer is None) == (config["momentum"] == 0 or p.grad is None)


@pytest.mark.parametrize("copy_dtype", optim.COPY_DTYPES)
def test_copies_are_the_casts_and_carry_the_gradient(device, copy_dtype):
    skip_unless_available("native", device)
    ours, _ = _run(device, CONFIGS[0], copy_dtype)
    for p in ours[:-1]:
        low = optim.cast(p, copy_dtype)
        assert low.dtype == copy_dtype and low.stride() == p.stride()
        assert torch.equal(low, p.detach().to(copy_dtype)), "the copy holds exactly the cast's values"
        assert low.data_ptr() == optim._COPIES[p].tensor.data_ptr(), "served from the copy, not cast again"
        weights = torch.randn(p.shape, device=device, dtype=copy_dtype)
        (g_copy,) = torch.autograd.grad((low * weights).float().sum(), p)
        (g_cast,) = torch.autograd.grad((p.to(copy_dtype) * weights).float().sum(), p)
        assert g_copy.dtype == torch.float32 and torch.equal(g_copy, g_cast)
    never_stepped = ours[-1]
    assert never_stepped not in optim._COPIES
    assert torch.equal(optim.cast(never_stepped, copy_dtype), never_stepped.detach().to(copy_dtype))


@pytest.mark.parametrize("change", ["in-place", "load_state_dict", "new storage", "other dtype"])
def test_a_changed_parameter_is_cast_afresh(change):
    skip_unless_available("native", "cpu")
    model = torch.nn.Linear(6, 4)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(3, 6)).sum().backward()
    opt.step()
    w = model.weight
    assert optim.cast(w, torch.bfloat16).data_ptr() == optim._COPIES[w].tensor.data_ptr()
    dtype = torch.bfloat16
    with torch.no_grad():
        if change == "in-place":
            w.mul_(3)
        elif change == "load_state_dict":
            model.load_state_dict({"weight": torch.randn(4, 6), "bias": torch.zeros(4)})
        elif change == "new storage":
            w.data = torch.randn(4, 6)
        else:
            dtype = torch.float16
    low = optim.cast(w, dtype)
    assert low.data_ptr() != optim._COPIES[w].tensor.data_ptr()
    assert torch.equal(low, w.detach().to(dtype))


def test_state_dicts_are_torch_sgds():
    """A checkpoint of either optimizer resumes in the other with the same next steps."""
    skip_unless_available("native", "cpu")
    args = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)
    a, b = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = optim.SGD(a.parameters(), **args), torch.optim.SGD(b.parameters(), foreach=False, **args)
    x = torch.randn(4, 5)
    for model, opt in ((a, opt_a), (b, opt_b)):
        model(x).square().sum().backward()
        opt.step()
    swapped_a = torch.optim.SGD(a.parameters(), foreach=False, **args)
    swapped_a.load_state_dict(opt_a.state_dict())
    swapped_b = optim.SGD(b.parameters(), **args)
    swapped_b.load_state_dict(opt_b.state_dict())
    for model, opt in ((a, swapped_a), (b, swapped_b)):
        model.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_bad_arguments_are_named():
    skip_unless_available("native", "cpu")
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="autocast_dtype must be None or one of"):
        optim.SGD([p], lr=0.1, autocast_dtype=torch.float32)
    with pytest.raises(TypeError, match="step_in_backward must be a bool"):
        optim.SGD([p], lr=0.1, step_in_backward="yes")
    step = torch.ops.alexnet_fast.sgd_step_
    g, low = torch.randn(3), torch.empty(3, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"grads must have one tensor per parameter \(1\), got 0"):
        step([p.detach()], [], [], [], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"momentum_buffers must have 1 tensors"):
        step([p.detach()], [g], [], [low], 0.1, 0.0, 0.9, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"grads\[0\] must have the parameter's shape"):
        step([p.detach()], [torch.randn(4)], [], [], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"copies\[0\] must be bfloat16 or float16"):
        step([p.detach()], [g], [], [torch.empty(3)], 0.1, 0.0, 0.0, 0.0, False, False, False)
    with pytest.raises(RuntimeError, match=r"params\[0\] must be float32"):
        step([p.detach().double()], [g.double()], [], [], 0.1, 0.0, 0.0, 0.0, False, False, False)


def test_a_loaded_buffer_in_another_layout_takes_torchs_step():
    """A momentum buffer loaded from a checkpoint of an NCHW model into a channels_last one."""
    skip_unless_available("native", "cpu")
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last))
    q = torch.nn.Parameter(p.detach().clone())
    buffer, g = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    p.grad, q.grad = torch.empty_like(p).copy_(g), torch.empty_like(q).copy_(g)
    ours, ref = optim.SGD([p], lr=0.1, momentum=0.9), torch.optim.SGD([q], lr=0.1, momentum=0.9, foreach=False)
    ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"] = buffer.clone(), buffer.clone()
    ours.step()
    ref.step()
    torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert torch.equal(optim.cast(p, torch.bfloat16), p.detach().to(torch.bfloat16))


def test_a_gradient_in_another_layout_takes_torchs_step():
    """A gradient whose strides differ from its parameter's: PyTorch's step, then the casts."""
    skip_unless_available("native", "cpu")
    p = torch.nn.Parameter(torch.randn(2, 3, 4, 5))
    q = torch.nn.Parameter(p.detach().clone())
    g = torch.randn(2, 3, 4, 5)
    p.grad = g.contiguous(memory_format=torch.channels_last)
    q.grad = g.clone()
    optim.SGD([p], lr=0.1, momentum=0.9).step()
    torch.optim.SGD([q], lr=0.1, momentum=0.9, foreach=False).step()
    torch.testing.assert_close(p, q, rtol=0, atol=0)
    assert torch.equal(optim.cast(p, torch.bfloat16), p.detach().to(torch.bfloat16))


def test_model_trains_the_same_with_the_copies(device):
    """AlexNet under autocast with ``backend="native"`` (whose convolutions cast through
    ``optim.cast``, as do the Linears on CUDA): our SGD with copies and torch's SGD give the same
    losses, step after step."""
    skip_unless_available("native", device)
    dtype = torch.bfloat16
    gen = torch.Generator(device=device).manual_seed(0)
    batches = [(torch.randn(2, 3, 67, 67, generator=gen, device=device),
                torch.randint(0, 10, (2,), generator=gen, device=device)) for _ in range(3)]
    runs = []
    for ours in (False, True):
        torch.manual_seed(0)
        model = AlexNet(num_classes=10, backend="native").to(device).train()
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        args = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)
        opt = (optim.SGD(model.parameters(), autocast_dtype=dtype, **args) if ours
               else torch.optim.SGD(model.parameters(), **args, **({"fused": True} if device == "cuda" else {})))
        runs.append([float(train_step(model, opt, F.cross_entropy, x, y, dtype)[0]) for x, y in batches * 2])
        if ours:
            assert len([p for p in model.parameters() if p in optim._COPIES]) == 16
    # The first step starts from the same weights: the copies are the casts, to the bit.
    assert runs[0][0] == runs[1][0], runs
    # After it the two steps' float32 weights may differ in the last bit (our step evaluates in
    # double; PyTorch's CPU step in float32, its fused CUDA step with other multiply-add
    # contractions). Such a bit can flip the bfloat16 rounding of a weight's copy or of a logit,
    # so later losses agree to the bfloat16 bound, no closer.
    for a, b in zip(*runs):
        assert abs(a - b) <= tolerance(dtype, "elementwise") * abs(b), runs


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_cuda_step_agrees_with_torchs_fused_step(config):
    """On the GPU, against PyTorch's fused step (the same double arithmetic; the compilers may
    fuse its multiply-adds differently, so the last bit may differ), on large tensors (the
    vectorised loop) and on ones of odd size and offset (the scalar one)."""
    skip_unless_available("native", "cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(1 << 20, generator=gen, device="cuda")
    shapes = [(4096, 9), (96, 3, 11, 11), (1001,), (5,)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen, device="cuda")) for s in shapes]
    ours.append(torch.nn.Parameter(base[1:1002]))  # 4-byte aligned only: the scalar loop
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    opt = optim.SGD(ours, lr=0.05, **config)
    ref_opt = torch.optim.SGD(ref, lr=0.05, fused=True, **config)
    for step in range(3):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=gen, device="cuda")
            q.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            assert_close(p, q, torch.float32, "elementwise", what=f"step {step} parameter {tuple(p.shape)}")
            assert torch.equal(optim.cast(p, torch.bfloat16), p.detach().to(torch.bfloat16))


def test_copies_are_kept_only_where_the_ops_read_them():
    from alexnet_fast.train import keeps_autocast_copies

    bf16 = torch.bfloat16
    assert keeps_autocast_copies("auto", "cuda", bf16, compiled=False) is bf16
    assert keeps_autocast_copies("native", "cuda", torch.float16, compiled=False) is torch.float16
    assert keeps_autocast_copies("torch", "cuda", bf16, compiled=False) is None  # autocast's own casts
    assert keeps_autocast_copies("auto", "cuda", bf16, compiled=True) is None  # compiled ops always cast
    assert keeps_autocast_copies("auto", "cuda", None, compiled=False) is None  # no autocast
    assert keeps_autocast_copies("auto", "cpu", bf16, compiled=False) is None


def test_weights_are_stepped_in_the_backward_only_where_nothing_else_needs_their_gradients():
    from alexnet_fast.train import can_step_in_backward, make_sgd

    assert can_step_in_backward("auto", "cuda", compiled=False)
    assert can_step_in_backward("triton", "cuda", compiled=False)
    assert not can_step_in_backward("torch", "cuda", compiled=False)  # PyTorch's Linear
    assert not can_step_in_backward("auto", "cuda", compiled=True)  # the compiled backward's own product
    assert not can_step_in_backward("auto", "cuda", compiled=False, world=2)  # DDP reduces after the backward
    assert not can_step_in_backward("auto", "cuda", compiled=False, scaled=True)  # the scaler reads every gradient
    assert not can_step_in_backward("auto", "cpu", compiled=False)
    params = [torch.nn.Parameter(torch.randn(3, 2))]
    opt = make_sgd(params, "cuda", lr=0.1, momentum=0.9, weight_decay=0.0, step_in_backward=True)
    assert isinstance(opt, optim.SGD) and opt.step_in_backward and opt.autocast_dtype is None
    assert not isinstance(make_sgd(params, "cpu", lr=0.1, momentum=0.9, weight_decay=0.0), optim.SGD)
