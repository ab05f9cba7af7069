"""torch.library.opcheck on every op of every kernel backend: schema, fake kernel, autograd
registration and dispatch consistency."""
import pytest
import torch
from conftest import random_input, skip_unless_available

import alexnet_fast  # noqa: F401  (registers fake kernels and autograd)
from alexnet_fast import ops


def _samples(device, layout):
    x = random_input((2, 6, 9, 9), torch.float32, device, layout, relu=True).requires_grad_()
    w = random_input((5, 6, 3, 3), torch.float32, device).requires_grad_()
    b = random_input((5,), torch.float32, device).requires_grad_()
    out = torch.relu(torch.nn.functional.conv2d(x.detach(), w.detach(), b.detach(), 2, 1))
    g_conv = random_input(out.shape, torch.float32, device, layout)
    g_pool = random_input((2, 6, 4, 4), torch.float32, device, layout)
    g_x = random_input(x.shape, torch.float32, device, layout)
    idx = torch.randint(0, 9, (2, 6, 4, 4), dtype=torch.uint8, device=device)
    lrn = (5, 1e-4, 0.75, 2.0)
    return {
        "conv2d_relu": (x, w, b, [2, 2], [1, 1]),
        "conv2d_relu_backward_input": (g_conv, out, w.detach(), [9, 9], [2, 2], [1, 1]),
        "conv2d_relu_backward_weight": (g_conv, out, x.detach(), [3, 3], [2, 2], [1, 1]),
        "lrn": (x, *lrn),
        "lrn_backward": (g_x, x.detach(), *lrn),
        "max_pool2d": (x, [3, 3], [2, 2], [0, 0], False),
        "max_pool2d_backward": (g_pool, idx, [9, 9], [3, 3], [2, 2], [0, 0]),
        "lrn_max_pool2d": (x, *lrn, [3, 3], [2, 2]),
        "lrn_max_pool2d_backward": (g_pool, x.detach(), idx, *lrn, [3, 3], [2, 2]),
    }


OPS = list(_samples("cpu", "contiguous"))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("op", OPS)
def test_opcheck(backend, device, layout, op):
    args = _samples(device, layout)[op]
    torch.library.opcheck(getattr(ops.kernels(backend), op).default, args)


def _size_one_samples(device):
    """channels_last inputs whose outputs have 1x1 planes: the layout is ambiguous there, and the
    fake kernels must still give the strides the kernels give."""
    x = random_input((2, 6, 3, 3), torch.float32, device, "channels_last", relu=True)
    w = random_input((5, 6, 3, 3), torch.float32, device)
    b = random_input((5,), torch.float32, device)
    out = torch.relu(torch.nn.functional.conv2d(x, w, b, 2, 0)).contiguous(memory_format=torch.channels_last)
    g_pool = random_input((2, 6, 1, 1), torch.float32, device, "channels_last")
    g_pool = g_pool.as_strided(g_pool.shape, (6, 1, 6, 6))  # as the kernels lay out a 1x1 channels_last output
    idx = torch.zeros((2, 6, 1, 1), dtype=torch.uint8, device=device).as_strided((2, 6, 1, 1), (6, 1, 6, 6))
    lrn = (5, 1e-4, 0.75, 2.0)
    return {
        "conv2d_relu": (x, w, b, [2, 2], [0, 0]),
        "conv2d_relu_backward_input": (out, out, w, [3, 3], [2, 2], [0, 0]),
        "conv2d_relu_backward_weight": (out, out, x, [3, 3], [2, 2], [0, 0]),
        "lrn": (x, *lrn),
        "lrn_backward": (x, x, *lrn),
        "max_pool2d": (x, [3, 3], [2, 2], [0, 0], False),
        "max_pool2d_backward": (g_pool, idx, [3, 3], [3, 3], [2, 2], [0, 0]),
        "lrn_max_pool2d": (x, *lrn, [3, 3], [2, 2]),
        "lrn_max_pool2d_backward": (g_pool, x, idx, *lrn, [3, 3], [2, 2]),
    }


@pytest.mark.parametrize("op", OPS)
def test_fake_strides_match_the_kernels(backend, device, op):
    """What torch.compile plans with (the fake kernel) has the kernel's strides, size-1 dims too."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    args = _size_one_samples(device)[op]
    fn = getattr(ops.kernels(backend), op).default
    real = fn(*args)
    with FakeTensorMode() as mode:
        fake = fn(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    for r, f in zip(real, fake):
        assert (r.shape, r.stride()) == (f.shape, f.stride()), f"{op}: kernel {r.stride()}, fake {f.stride()}"


def _cudnn_samples(layout):
    """The ops behind auto's ``cudnn`` choice of conv2d_relu; with a 1x1 output plane too."""
    samples = _samples("cuda", layout)
    x, w, b, stride, padding = samples["conv2d_relu"]
    out = samples["conv2d_relu_backward_input"][1]
    g = samples["conv2d_relu_backward_input"][0]
    small = _size_one_samples("cuda")["conv2d_relu"]
    small_out = torch.relu(torch.nn.functional.conv2d(*small[:3], 2, 0))
    return [
        ("conv2d_relu_cudnn", (x, w, b, stride, padding)),
        ("conv2d_relu_cudnn", (x, w, None, stride, padding)),
        ("conv2d_relu_cudnn", small),
        ("conv2d_relu_cudnn_backward", (g, out, x.detach(), w.detach(), stride, padding, [True, True, True])),
        ("conv2d_relu_cudnn_backward", (g, out, x.detach(), w.detach(), stride, padding, [False, True, False])),
        ("conv2d_relu_cudnn_backward", (small_out, small_out, *small[:2], [2, 2], [0, 0], [True, True, True])),
    ]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_cudnn_conv_cuda(layout):
    skip_unless_available("cudnn", "cuda")
    from torch._subclasses.fake_tensor import FakeTensorMode

    for name, args in _cudnn_samples(layout):
        fn = getattr(torch.ops.alexnet_fast, name).default
        torch.library.opcheck(fn, args)
        real = fn(*args)
        with FakeTensorMode() as mode:
            fake = fn(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args])
        real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
        for r, f in zip(real, fake):
            assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype), f"{name}: kernel {r.stride()}, fake {f.stride()}"


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_native_only_ops(device, layout):
    """The ops of the native library that have no Triton twin: the LRN->max-pool backward
    through a ReLU, the ReLU's backward with the bias gradient, and the SGD step (a mutating op)
    with momentum and bf16 copies."""
    skip_unless_available("native", device)
    x = random_input((2, 16, 9, 9), torch.float32, device, layout, relu=True)
    g_pool = random_input((2, 16, 4, 4), torch.float32, device, layout)
    _, idx = ops.kernels("native").lrn_max_pool2d(x, 5, 1e-4, 0.75, 2.0, [3, 3], [2, 2])
    torch.library.opcheck(torch.ops.alexnet_fast.lrn_max_pool2d_backward_relu.default,
                          (g_pool, x, idx, 5, 1e-4, 0.75, 2.0, [3, 3], [2, 2]))
    torch.library.opcheck(torch.ops.alexnet_fast.relu_backward_bias.default, (g_pool, x[:, :, :4, :4]))
    p, grad, buf = (random_input((5, 16, 3, 3), torch.float32, device, layout) for _ in range(3))
    low = torch.empty_like(p, dtype=torch.bfloat16)
    torch.library.opcheck(torch.ops.alexnet_fast.sgd_step_.default,
                          ([p], [grad], [buf], [low], 0.1, 5e-4, 0.9, 0.0, False, False, False))
