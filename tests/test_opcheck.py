"""torch.library.opcheck on every op of every kernel backend: schema, fake kernel, autograd
registration and dispatch consistency."""
import pytest
import torch
from conftest import random_input

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
