"""Every op of every kernel backend under torch.compile(fullgraph=True): the graph holds our ops
(fake kernels, autograd formulas) and gives eager's values and gradients."""
import pytest
import torch
from conftest import random_input, skip_unless_available

from alexnet_fast import autotable, backends, ops


def _block(x, w, b, backend):
    y = ops.conv2d_relu(x, w, b, 1, 1, backend=backend)
    y = ops.lrn_max_pool2d(y, backend=backend)
    y = ops.lrn(y, size=3, backend=backend)
    return ops.max_pool2d(y, 2, 1, backend=backend)


def test_ops_compile_fullgraph(backend, device):
    x = random_input((2, 3, 11, 11), torch.float32, device, "channels_last").requires_grad_()
    w = random_input((6, 3, 3, 3), torch.float32, device).requires_grad_()
    b = random_input((6,), torch.float32, device).requires_grad_()
    eager = _block(x, w, b, backend)
    grads = torch.autograd.grad(eager.sum(), (x, w, b))
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    out = compiled(x, w, b, backend)
    torch.testing.assert_close(out, eager, rtol=1e-6, atol=1e-6)
    for got, want in zip(torch.autograd.grad(out.sum(), (x, w, b)), grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("choice", backends.CONV_ONLY)
def test_cudnn_conv_compile_fullgraph_cuda(monkeypatch, choice, x_grad):
    """auto's cuDNN conv choices on a strided bf16 conv: the space-to-depth blocks are traced ops
    (the eager path moves them as words when x needs no gradient; a compiled one may not)."""
    skip_unless_available(choice, "cuda")
    monkeypatch.setattr(autotable, "preference", lambda *args, **kwargs: (choice,))
    x = random_input((2, 3, 27, 27), torch.bfloat16, "cuda", "channels_last").requires_grad_(x_grad)
    w = random_input((8, 3, 11, 11), torch.bfloat16, "cuda").requires_grad_()
    b = random_input((8,), torch.bfloat16, "cuda").requires_grad_()
    inputs = (x, w, b) if x_grad else (w, b)

    def conv(x, w, b):
        return ops.conv2d_relu(x, w, b, 4, 0, backend="auto")

    eager = conv(x, w, b)
    grads = torch.autograd.grad(eager.float().sum(), inputs)
    out = torch.compile(conv, fullgraph=True, backend="aot_eager")(x, w, b)
    torch.testing.assert_close(out, eager, rtol=1e-2, atol=1e-2)  # cuDNN may pick other algorithms
    for got, want in zip(torch.autograd.grad(out.float().sum(), inputs), grads):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)
