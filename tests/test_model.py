"""The AlexNet module: the seed's architecture and state_dict layout, backends, compile, CLI."""
import pytest
import torch
from torch import nn

from alexnet_fast import AlexNet, backends, load_seed_state_dict
from alexnet_fast.model import ALEXNET_CONVS, layer_shapes


def seed_model(num_classes=10):
    """The seed's module tree rebuilt from plain nn modules (its keys are what checkpoints hold)."""

    class Block(nn.Module):
        def __init__(self, cin, cout, k, s, p, lrn):
            super().__init__()
            layers = [nn.Conv2d(cin, cout, k, s, p), nn.ReLU(inplace=True)]
            if lrn:
                layers.append(nn.LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0))
            self.net = nn.Sequential(*layers)

        def forward(self, x):
            return self.net(x)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.classifier = nn.Sequential(
                nn.Dropout(0.5), nn.Linear(9216, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5),
                nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Linear(4096, num_classes))

        def forward(self, x):
            return self.classifier(torch.flatten(x, 1))

    class Seed(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(
                Block(3, 96, 11, 4, 0, True), nn.MaxPool2d(3, 2), Block(96, 256, 5, 1, 2, True), nn.MaxPool2d(3, 2),
                Block(256, 384, 3, 1, 1, False), Block(384, 384, 3, 1, 1, False), Block(384, 256, 3, 1, 1, False),
                nn.MaxPool2d(3, 2))
            self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
            self.classifier = Head()

        def forward(self, x):
            return self.classifier(self.avgpool(self.features(x)))

    return Seed()


def test_state_dict_matches_seed_layout():
    ours = set(AlexNet().state_dict())
    seed = set(seed_model().state_dict())
    assert ours == seed
    assert "features.0.net.0.weight" in ours and "classifier.classifier.6.bias" in ours


def test_seed_checkpoint_gives_the_same_logits():
    torch.manual_seed(0)
    seed = seed_model().eval()
    model = AlexNet(backend="torch").eval()
    load_seed_state_dict(model, {"module." + k: v for k, v in seed.state_dict().items()})
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), seed(x), rtol=1e-5, atol=1e-5)


def test_linear_init_and_shapes():
    model = AlexNet(num_classes=7)
    for i in (1, 4, 6):
        lin = model.classifier.classifier[i]
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
        std = lin.weight.std().item()
        assert abs(std - (2.0 / lin.in_features) ** 0.5) < 0.1 * std  # Kaiming normal, fan_in, relu
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 227, 227)).shape == (1, 7)
    rows = layer_shapes(128)
    assert rows[0] == (ALEXNET_CONVS[0], (128, 3, 224, 224))
    assert rows[1] == ("lrn_max_pool2d", (128, 96, 54, 54))
    assert rows[3] == ("lrn_max_pool2d", (128, 256, 26, 26))


def test_classifier_linears_follow_the_backend(monkeypatch):
    """The torch backend (the reference peers run) keeps nn.Linear; the others run the three
    Linears through alexnet_fast.linear, with the same parameters."""
    from alexnet_fast import linear

    calls = []
    monkeypatch.setattr(linear, "linear", lambda x, w, b: calls.append(w.shape) or torch.nn.functional.linear(x, w, b))
    head = AlexNet(num_classes=5).classifier.eval()
    x = torch.randn(2, 256, 6, 6)
    head.backend = "torch"
    ref = head(x)
    assert calls == []
    head.backend = "auto"
    assert torch.equal(head(x), ref)
    assert calls == [(4096, 9216), (4096, 4096), (5, 4096)]


@pytest.mark.parametrize("lrn", [True, False])
def test_features_run_each_conv_with_its_pool(monkeypatch, lrn):
    """features_forward runs conv1/conv2 with their LRN->max-pool (a plain max-pool without LRN)
    and conv5 with its max-pool as one op each, conv3/conv4 alone, and gives what the layers
    give one by one."""
    from alexnet_fast import ops

    calls = []
    for name in ("conv2d_relu", "conv2d_relu_lrn_max_pool2d", "conv2d_relu_max_pool2d"):
        op = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _op=op, _name=name, **k: calls.append((_name, a[1].shape[1]))
                            or _op(*a, **k))
    model = AlexNet(num_classes=5, backend="torch", lrn=lrn).eval()
    x = torch.randn(1, 3, 67, 67)
    with torch.no_grad():
        out = model.features_forward(x)
        ref = model.features(x)
    pooled = "conv2d_relu_lrn_max_pool2d" if lrn else "conv2d_relu_max_pool2d"
    assert calls[:5] == [(pooled, 3), (pooled, 96), ("conv2d_relu", 256), ("conv2d_relu", 384),
                         ("conv2d_relu_max_pool2d", 384)]
    torch.testing.assert_close(out, ref)


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        AlexNet(num_classes=0)
    with pytest.raises(ValueError, match="x must be an"):
        AlexNet()(torch.randn(1, 1, 224, 224))


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_backends_agree_on_the_model(backend):
    ok, reason = backends.availability(backend, "cpu")
    if not ok:
        pytest.skip(reason)
    torch.manual_seed(0)
    size = 99 if backend == "native" else 67  # the smallest inputs the layer stack takes; the interpreter is slow
    model = AlexNet(backend="torch").eval()
    x = torch.randn(2, 3, size, size, requires_grad=True)
    ref = model(x)
    (gref,) = torch.autograd.grad(ref.sum(), x)
    model.backend = backend
    out = model(x)
    (g,) = torch.autograd.grad(out.sum(), x)
    # fp32 against fp32 through 8 layers and a 9216-wide classifier, summation orders differing in
    # every conv: the per-op float64 bounds live in the op tests; this checks the wiring
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g, gref, rtol=1e-3, atol=1e-6)


def test_compile_fullgraph_native_matches_eager():
    ok, reason = backends.availability("native", "cpu")
    if not ok:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = AlexNet(backend="native").eval()
    x = torch.randn(2, 3, 99, 99)
    with torch.no_grad():
        eager = model(x)
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), eager, rtol=1e-4, atol=1e-5)
    # the backward graph through the autograd formulas, without Inductor's compile time
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-6)
    out = compiled(x.requires_grad_())
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
