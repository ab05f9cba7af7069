"""Compile every Triton kernel the ops launch for the H200 (sm_90), on a machine without a GPU;
prints a JSON report. Run by tests/test_triton_compile.py in a child
process: the tests run Triton under its interpreter, which never compiles for a GPU, and the
interpreter must be off here before triton is imported.

Each op runs once per dtype and layout on small CPU tensors with the kernel launch replaced by a
compile: the signature and the 16-divisibility hints are the ones a launch on the GPU derives from
the same arguments. A config whose shared memory exceeds what one sm_90 block may use would fail
to load there (the autotuner would then drop it)."""
from __future__ import annotations

import json
import os
import sys
import traceback

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 232448  # bytes of shared memory one sm_90 block may use (227 KB)
_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
          torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")
# Every autotune config with --all-configs (when last run, before ints equal to 1 were treated as
# constants: 541 compiles in 15 minutes on one core with triton 3.8, every config fitted, the
# largest in 192 KB); by default the first of each (91 compiles, 100-150 s on a cold cache),
# which covers every kernel and specialization the ops launch.
ALL_CONFIGS = "--all-configs" in sys.argv

compiled: dict[tuple, dict] = {}


def _signature(fn: JITFunction, args, kwargs):
    """Triton's launch-time specialization of these arguments: an int equal to 1 becomes a
    constant, and ints and pointers divisible by 16 carry that hint (none of our kernels opts out)."""
    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = bound[p.name] if p.name in bound else p.default
        if p.is_constexpr or v is None or (type(v) is int and v == 1):
            signature[p.name], constexprs[p.name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            signature[p.name] = "u1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: no signature type for argument {p.name} = {v!r}")
    return signature, constexprs, attrs


def _compile(fn: JITFunction, args, kwargs) -> None:
    options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
    signature, constexprs, attrs = _signature(fn, args, kwargs)
    key = (fn.__name__, repr(signature), repr(sorted(constexprs.items())), repr(attrs), repr(sorted(options.items())))
    if key in compiled:
        return
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options)
    compiled[key] = {"kernel": fn.__name__, "shared": kernel.metadata.shared, "options": options,
                     "constexprs": {k: repr(v) for k, v in constexprs.items()}}


def _run(self, *args, grid, warmup=False, **kwargs):
    _compile(self, args, dict(kwargs))


def _run_configs(self, *args, **kwargs):
    kwargs.pop("grid", None)
    kwargs.pop("warmup", None)
    for config in self.configs if ALL_CONFIGS else self.configs[:1]:
        _compile(self.fn, args, {**kwargs, **config.all_kwargs()})


def _launch_every_op() -> None:
    from alexnet_fast.triton.linear_sgd import linear_weight_grad_sgd_

    ns = torch.ops.alexnet_fast_triton
    lrn = (5, 1e-4, 0.75, 2.0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            def t(*shape):
                return torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)

            # conv: channel blocks (C_in 16) at stride 1 and 2, and a flat K (C_in 3)
            for c_in, stride in ((16, [1, 1]), (16, [2, 2]), (3, [4, 4])):
                x, w, b = t(2, c_in, 13, 13), torch.randn(8, c_in, 3, 3, dtype=dtype), torch.randn(8, dtype=dtype)
                out = ns.conv2d_relu(x, w, b, stride, [1, 1])
                ns.conv2d_relu_backward(out, out, x, w, stride, [1, 1], [True, True, True])
            x = t(2, 16, 9, 9)
            ns.lrn_backward(x, x, *lrn)
            ns.lrn(x, *lrn)
            pooled, idx = ns.max_pool2d(x, [3, 3], [2, 2], [0, 0], False)
            ns.max_pool2d_backward(pooled, idx, [9, 9], [3, 3], [2, 2], [0, 0])
            pooled, idx = ns.lrn_max_pool2d(x, *lrn, [3, 3], [2, 2])
            ns.lrn_max_pool2d_backward(pooled, x, idx, *lrn, [3, 3], [2, 2])
        rows = torch.randn(8, 16, dtype=dtype)
        param = torch.randn(16, 16)
        linear_weight_grad_sgd_(rows, rows, param, torch.zeros_like(param),
                                param.to(dtype) if dtype != torch.float32 else None, lr=0.1,
                                weight_decay=5e-4, momentum=0.9, dampening=0.0, nesterov=False,
                                maximize=False, first_step=True)


def _kernels() -> list[str]:
    """Every @triton.jit kernel (a ``*_kernel``) of the package's Triton modules."""
    import importlib
    import pkgutil

    import alexnet_fast.triton as pkg

    names = []
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        names += [n for n, v in vars(module).items() if isinstance(v, JITFunction) and n.endswith("_kernel")]
    return sorted(set(names))


def main() -> int:
    JITFunction.run = _run
    Autotuner.run = _run_configs
    report = {"target": f"{TARGET.backend} sm_{TARGET.arch}", "triton": triton.__version__,
              "all_configs": ALL_CONFIGS, "shared_limit": SHARED_LIMIT, "error": None}
    try:
        _launch_every_op()
    except Exception:
        report["error"] = traceback.format_exc()
    report["kernels"] = _kernels()
    report["compiled"] = list(compiled.values())
    json.dump(report, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
