"""Every native CUDA op of alexnet_fast, forward and backward, for compute-sanitizer.

Runs every schema of torch.ops.alexnet_fast on small odd shapes, in float32 and bfloat16, NCHW
and channels_last, with shapes and parameters chosen to reach every kernel variant (vectorised
and scalar, specialised and generic, one and several channel groups or tiles). Each call is
synchronised so that a sanitizer report points at it, and its result is compared loosely with the
float64 reference (the test suite checks tightly), so a run that is clean under the sanitizer but
computes garbage still fails. Prints one line per call; exits 1 on any error.

    compute-sanitizer --tool memcheck python scripts/sanitize_ops.py   (see scripts/sanitize.sh)
"""
from __future__ import annotations

import sys
import traceback

import torch
import torch.nn.functional as F

from alexnet_fast import backends, reference

DTYPES = (torch.float32, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last")
# Loose bounds on max|out - ref| / max|ref| (normwise for convolutions, which may use TF32).
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
CONV_TOLERANCE = {torch.float32: 1e-2, torch.bfloat16: 3e-2}
LRN = (1e-4, 0.75, 2.0)

# (shape, size). Size 5 runs the register-window kernels: NCHW with 4-pixel vectors when H*W % 4
# == 0 (else single pixels), several channel groups for C = 70; channels_last with 16-byte vectors
# when C allows. Size 4 and channels_last C = 13 run the generic kernels.
LRN_CASES = [((2, 13, 7, 9), 5), ((2, 16, 6, 6), 5), ((1, 70, 3, 5), 5), ((2, 13, 5, 6), 4)]
# (shape, kernel, stride, padding, ceil_mode). 3x3/2: the stride-cell backward, with and without
# padding; (2, 3)/(1, 2): the generic backward.
POOL_CASES = [((2, 16, 9, 11), (3, 3), (2, 2), (0, 0), False), ((1, 13, 8, 7), (3, 3), (2, 2), (1, 1), True),
              ((2, 5, 7, 6), (2, 3), (1, 2), (1, 0), True)]
# (shape, size, kernel, stride). NCHW tiles with one and several channel groups, channels_last
# rows, the cell backwards of both layouts (odd sizes: a partial last cell; even: a last row and
# column in no window); C = 13 (channels_last) and size 4 run the generic kernels.
FUSED_CASES = [((2, 16, 11, 9), 5, (3, 3), (2, 2)), ((1, 70, 7, 7), 5, (3, 3), (2, 2)),
               ((1, 24, 8, 10), 5, (3, 3), (2, 2)), ((1, 13, 9, 10), 5, (3, 3), (2, 2)),
               ((2, 16, 7, 6), 4, (2, 3), (1, 2))]
# (shape, c_out, kernel, stride, padding). For the ReLU mask and bias pass (relu_backward_bias and
# the cudnn backward; channels_last, C_out a multiple of the 16-byte vector): one and several
# blocks of rows, rows not a multiple of a block's; C_out = 5 takes the fallback.
CONV_CASES = [((2, 3, 11, 9), 5, (3, 3), (2, 1), (1, 0)), ((1, 16, 9, 9), 24, (3, 3), (1, 1), (1, 1)),
              ((2, 8, 13, 11), 16, (3, 3), (1, 1), (1, 1))]

failures = 0


def cuda_input(shape, dtype, layout, relu=False, scale=3.0, seed=0):
    """Random data made on the CPU (in float64, for the reference) and copied in its layout."""
    g = torch.Generator().manual_seed(seed)
    x64 = torch.randn(shape, dtype=torch.float64, generator=g) * scale
    if relu:
        x64 = x64.clamp_min(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x64.to(dtype).contiguous(memory_format=fmt)
    return x.cuda(), x.double()


def rel_error(out, ref, normwise=False):
    out, ref = out.detach().cpu().double(), ref.detach().double()
    if out.shape != ref.shape:
        return float("inf")
    if normwise:
        return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def pooled_at(y, indices, kernel, stride, padding=(0, 0)):
    """The element of each pooling window of y that the uint8 window offsets name (windows past
    the input's end, as ceil_mode makes, are padded like the left ones)."""
    n, c, h, w = y.shape
    oh, ow = indices.shape[-2:]
    extra_h = max(0, (oh - 1) * stride[0] + kernel[0] - h - 2 * padding[0])
    extra_w = max(0, (ow - 1) * stride[1] + kernel[1] - w - 2 * padding[1])
    pad = (padding[1], padding[1] + extra_w, padding[0], padding[0] + extra_h)
    padded = F.pad(y.reshape(n * c, 1, h, w), pad)
    cols = F.unfold(padded, kernel, stride=stride)
    picked = cols.gather(1, indices.cpu().reshape(n * c, 1, oh * ow).long())
    return picked.reshape(n, c, oh, ow)


def run(name, what, fn):
    """Calls fn() -> (error, bound) or (ok, detail); prints one line; counts failures."""
    global failures
    try:
        result = fn()
        torch.cuda.synchronize()
    except Exception:  # a failed launch or check: report it and go on with the next op
        failures += 1
        print(f"FAIL {name:28s} {what}\n{traceback.format_exc()}", flush=True)
        return
    err, bound = result
    ok = err <= bound if isinstance(bound, float) else bool(err)
    failures += not ok
    detail = f"err {err:.2e} (bound {bound:.0e})" if isinstance(bound, float) else bound
    print(f"{'ok  ' if ok else 'FAIL'} {name:28s} {what}  {detail}", flush=True)


def check_lrn(ops, dtype, layout, shape, size):
    x, x64 = cuda_input(shape, dtype, layout)
    g, g64 = cuda_input(shape, dtype, layout, scale=1.0, seed=1)
    what = f"{str(dtype)[6:]:8s} {layout:13s} {shape} size={size}"
    x64.requires_grad_()
    ref = reference.lrn(x64, size, *LRN)
    (gref,) = torch.autograd.grad(ref, x64, g64)
    run("lrn", what, lambda: (rel_error(ops.lrn(x, size, *LRN), ref), TOLERANCE[dtype]))
    run("lrn_backward", what, lambda: (rel_error(ops.lrn_backward(g, x, size, *LRN), gref), TOLERANCE[dtype]))


def check_max_pool(ops, dtype, layout, shape, kernel, stride, padding, ceil_mode):
    x, x64 = cuda_input(shape, dtype, layout, relu=True)
    what = f"{str(dtype)[6:]:8s} {layout:13s} {shape} k={kernel} s={stride} p={padding} ceil={ceil_mode}"
    out, idx = ops.max_pool2d(x, list(kernel), list(stride), list(padding), ceil_mode)
    torch.cuda.synchronize()
    ref = reference.max_pool2d(x64, kernel, stride, padding, ceil_mode)
    ref_idx = reference.max_pool2d_indices(x64, kernel, stride, padding, ceil_mode)
    run("max_pool2d", what, lambda: (torch.equal(out.cpu().double(), ref) and torch.equal(idx.cpu(), ref_idx),
                                     "values and indices exact"))
    g, g64 = cuda_input(out.shape, dtype, layout, scale=1.0, seed=1)
    y64 = x64.clone().requires_grad_()
    (gref,) = torch.autograd.grad(pooled_at(y64, ref_idx, kernel, stride, padding), y64, g64)
    run("max_pool2d_backward", what, lambda: (rel_error(
        ops.max_pool2d_backward(g, idx, list(shape[-2:]), list(kernel), list(stride), list(padding)), gref),
        TOLERANCE[dtype]))


def check_lrn_max_pool(ops, dtype, layout, shape, size, kernel, stride):
    x, x64 = cuda_input(shape, dtype, layout, relu=True)
    what = f"{str(dtype)[6:]:8s} {layout:13s} {shape} size={size} k={kernel} s={stride}"
    out, idx = ops.lrn_max_pool2d(x, size, *LRN, list(kernel), list(stride))
    torch.cuda.synchronize()
    # Winners as the kernel chose them (16-bit near-ties may differ from float64's choice).
    x64.requires_grad_()
    ref = pooled_at(reference.lrn(x64, size, *LRN), idx, kernel, stride)
    run("lrn_max_pool2d", what, lambda: (rel_error(out, ref), TOLERANCE[dtype]))
    g, g64 = cuda_input(out.shape, dtype, layout, scale=1.0, seed=1)
    (gref,) = torch.autograd.grad(ref, x64, g64)
    run("lrn_max_pool2d_backward", what, lambda: (rel_error(
        ops.lrn_max_pool2d_backward(g, x, idx, size, *LRN, list(kernel), list(stride)), gref),
        TOLERANCE[dtype]))

    def through_relu():  # x is a ReLU output: the gradient masked where x <= 0, and its channel sums
        dz, bias_grad = ops.lrn_max_pool2d_backward_relu(g, x, idx, size, *LRN, list(kernel), list(stride))
        masked = gref * (x64.detach() > 0)
        return max(rel_error(dz, masked), rel_error(bias_grad, masked.sum((0, 2, 3)), normwise=True)), TOLERANCE[dtype]

    run("lrn_max_pool2d_backward_relu", what, through_relu)


def check_conv(ops, dtype, layout, shape, c_out, kernel, stride, padding):
    x, x64 = cuda_input(shape, dtype, layout)
    w, w64 = cuda_input((c_out, shape[1], *kernel), dtype, "contiguous", scale=0.3, seed=2)
    b, b64 = cuda_input((c_out,), dtype, "contiguous", seed=3)
    what = f"{str(dtype)[6:]:8s} {layout:13s} {shape} -> {c_out} k={kernel} s={stride} p={padding}"
    for t in (x64, w64, b64):
        t.requires_grad_()
    ref = reference.conv2d_relu(x64, w64, b64, stride, padding)
    out = ops.conv2d_relu(x, w, b, list(stride), list(padding))
    torch.cuda.synchronize()
    run("conv2d_relu", what, lambda: (rel_error(out, ref, normwise=True), CONV_TOLERANCE[dtype]))
    g, g64 = cuda_input(out.shape, dtype, layout, scale=1.0, seed=4)
    gx, gw, gb = torch.autograd.grad(ref, (x64, w64, b64), g64)
    run("conv2d_relu_backward_input", what, lambda: (rel_error(
        ops.conv2d_relu_backward_input(g, out, w, list(shape[-2:]), list(stride), list(padding)), gx,
        normwise=True), CONV_TOLERANCE[dtype]))

    def weight_grads():
        dw, db = ops.conv2d_relu_backward_weight(g, out, x, list(kernel), list(stride), list(padding))
        return max(rel_error(dw, gw, normwise=True), rel_error(db, gb, normwise=True)), CONV_TOLERANCE[dtype]

    run("conv2d_relu_backward_weight", what, weight_grads)

    cudnn_out = ops.conv2d_relu_cudnn(x, w, b, list(stride), list(padding))
    torch.cuda.synchronize()
    run("conv2d_relu_cudnn", what, lambda: (rel_error(cudnn_out, ref, normwise=True), CONV_TOLERANCE[dtype]))

    def cudnn_grads():
        grads = ops.conv2d_relu_cudnn_backward(g, cudnn_out, x, w, list(stride), list(padding), [True, True, True])
        return max(rel_error(got, want, normwise=True) for got, want in zip(grads, (gx, gw, gb))), CONV_TOLERANCE[dtype]

    run("conv2d_relu_cudnn_backward", what, cudnn_grads)

    def relu_bias():
        masked, db = ops.relu_backward_bias(g, cudnn_out)
        want = torch.where(cudnn_out.double().cpu() <= 0, 0.0, g64)
        return max(rel_error(masked, want), rel_error(db, want.sum((0, 2, 3)), normwise=True)), TOLERANCE[dtype]

    run("relu_backward_bias", what, relu_bias)


def check_sgd(ops, numel, offset):
    """sgd_step_ with momentum and the bf16 copies: vectorised (offset 0) and scalar (offset 1)."""
    gen = torch.Generator().manual_seed(numel)
    p64, g64, buf64 = (torch.randn(numel + offset, dtype=torch.float64, generator=gen) for _ in range(3))
    p, g, buf = (t.float().cuda()[offset:] for t in (p64, g64, buf64))
    low = torch.empty(numel + offset, dtype=torch.bfloat16, device="cuda")[offset:]
    lr, wd, momentum = 0.05, 5e-4, 0.9
    ops.sgd_step_([p], [g], [buf], [low], lr, wd, momentum, 0.0, False, False, False)
    d = g64[offset:] + wd * p64[offset:]
    ref = p64[offset:] - lr * (momentum * buf64[offset:] + d)
    torch.cuda.synchronize()
    run("sgd_step_", f"numel={numel} offset={offset} parameter", lambda: (rel_error(p, ref), TOLERANCE[torch.float32]))
    run("sgd_step_", f"numel={numel} offset={offset} bf16 copy", lambda: (rel_error(low, ref), TOLERANCE[torch.bfloat16]))


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    info, reason = backends.native_build()
    if info is None or not info["with_cuda"]:
        print(f"the native CUDA kernels are not built: {reason or info}", file=sys.stderr)
        return 1
    ops = torch.ops.alexnet_fast
    for dtype in DTYPES:
        for layout in LAYOUTS:
            for case in LRN_CASES:
                check_lrn(ops, dtype, layout, *case)
            for case in POOL_CASES:
                check_max_pool(ops, dtype, layout, *case)
            for case in FUSED_CASES:
                check_lrn_max_pool(ops, dtype, layout, *case)
            for case in CONV_CASES:
                check_conv(ops, dtype, layout, *case)
    for numel, offset in ((4099, 0), (1001, 1)):
        check_sgd(ops, numel, offset)
    print(f"{failures} failed" if failures else "all ops ok", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
