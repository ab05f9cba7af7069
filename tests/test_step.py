"""The training step replayed from a CUDA graph (alexnet_fast.step) and ``train --cuda-graph``.

On the GPU a graphed run must train exactly as the eager one: the same losses and weights, also
across the ragged last batch (run eagerly) and a learning-rate change (captured again). Without a
GPU the settings that cannot work are checked."""
import math
import os

import pytest
import torch
from conftest import skip_unless_available
from test_train import tiny

from alexnet_fast import AlexNet, cli
from alexnet_fast.step import GraphedStep, train_step
from alexnet_fast.train import ConfigError, fit, make_sgd

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")


def test_graphed_step_refuses_cpu_tensors_and_no_warmup():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    step = GraphedStep(model, opt, torch.nn.functional.cross_entropy)
    with pytest.raises(ValueError, match="CUDA tensors, got x on cpu"):
        step(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="warmup must be at least 1"):
        GraphedStep(model, opt, torch.nn.functional.cross_entropy, warmup=0)


@pytest.mark.parametrize("settings, match", [
    (dict(cuda_graph=True), "cuda_graph needs one process on a CUDA device, got 1 process"),
    (dict(cuda_graph=True, compile=True), "cuda_graph and compile exclude each other"),
    (dict(cuda_graph=True, amp="fp16"), "cuda_graph does not run with amp fp16"),
])
def test_cuda_graph_settings_that_cannot_work(settings, match):
    with pytest.raises(ConfigError, match=match):
        fit(tiny(**settings))


def test_cli_flag_and_its_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--cuda-graph", "--device", "cpu", "--limit", "8", "--epochs", "1",
                     "--input-size", "72", "--no-progress", "--out", str(out)]) == 2
    assert "error: cuda_graph needs one process on a CUDA device" in capsys.readouterr().err
    assert not out.exists()


def test_checkpoints_from_before_the_setting_resume(tmp_path):
    """A checkpoint written before cuda_graph existed ran without it, and resumes."""
    run = str(tmp_path / "run")
    fit(tiny(out=run))
    ckpt = torch.load(os.path.join(run, "last.pt"), weights_only=True)
    del ckpt["config"]["cuda_graph"]
    torch.save(ckpt, os.path.join(run, "last.pt"))
    resumed = fit(tiny(epochs=2), resume=os.path.join(run, "last.pt"))
    assert [r["epoch"] for r in resumed.history] == [1, 2] and not resumed.config.cuda_graph


def _batches(n_full, batch, size, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    shapes = [batch] * n_full + [batch // 2]  # a ragged last batch
    return [(torch.randn(b, 3, size, size, generator=gen, device=device),
             torch.randint(0, 10, (b,), generator=gen, device=device)) for b in shapes]


@needs_cuda
@pytest.mark.parametrize("backend", ["torch", "auto", "triton"])
def test_graphed_step_trains_like_eager(backend):
    """Eager steps and graphed replays of the same steps give the same losses and weights: the
    warm-up, the capture, the ragged batch run eagerly in between, and a new capture after a
    learning-rate change. True fp32 and no dropout, so only reduction order may differ."""
    if backend != "auto":  # auto picks among the available ones
        skip_unless_available(backend, "cuda")
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        runs = []
        for graphed in (False, True):
            torch.manual_seed(0)
            model = AlexNet(num_classes=10, backend=backend).cuda().train()
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0
            opt = make_sgd(model.parameters(), "cuda", lr=0.01, momentum=0.9, weight_decay=5e-4)
            loss_fn = torch.nn.functional.cross_entropy
            step = (GraphedStep(model, opt, loss_fn, warmup=2) if graphed
                    else lambda x, y: train_step(model, opt, loss_fn, x, y))
            batches = _batches(5, 4, 72, "cuda", seed=1)
            losses = []
            for i, (x, y) in enumerate(batches + batches[:3]):
                if i == len(batches):
                    opt.param_groups[0]["lr"] = 0.001  # as ReduceLROnPlateau does
                loss, logits = step(x, y)
                assert logits.shape == (x.shape[0], 10)
                losses.append(float(loss))
            if graphed:
                assert step.captures == 2, "captured once, and again after the learning-rate change"
            runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    (eager_losses, eager_params), (graph_losses, graph_params) = runs
    assert all(math.isfinite(v) for v in graph_losses)
    for a, b in zip(graph_losses, eager_losses):
        assert abs(a - b) <= 1e-4 * abs(b), (graph_losses, eager_losses)
    for p, q in zip(graph_params, eager_params):
        assert torch.allclose(p, q, rtol=1e-3, atol=1e-6), (p - q).abs().max()


@needs_cuda
def test_fit_with_cuda_graph_trains_like_eager():
    """``fit`` with cuda_graph: the same loss at every step as the eager run from the same seed
    (dropout included: a replay draws its random numbers from the generator's state as the eager
    step would), two epochs with a ragged last batch each, within the guide's bf16 bound."""
    settings = dict(limit=18, batch_size=4, epochs=2, device="cuda", backend="auto", amp="bf16")
    eager = fit(tiny(**settings))
    graphed = fit(tiny(cuda_graph=True, **settings))
    assert len(graphed.step_losses) == len(eager.step_losses) == 10  # 4 full batches and 1 of 2, twice
    worst = max(abs(a - b) / abs(b) for a, b in zip(graphed.step_losses, eager.step_losses))
    assert worst <= 2e-2, (graphed.step_losses, eager.step_losses)
