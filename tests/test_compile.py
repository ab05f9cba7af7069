"""Every op of every kernel backend under torch.compile(fullgraph=True): the graph holds our ops
(fake kernels, autograd formulas) and gives eager's values and gradients."""
import torch
from conftest import random_input

from alexnet_fast import ops


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
