"""Per-op benchmarks: conv+ReLU per AlexNet layer, LRN, max-pool and the fused LRN->max-pool, in
forward, backward and forward+backward, per dtype and layout, for every provider side by side:

``eager``        the PyTorch reference op (``alexnet_fast.reference``)
``cudnn_fused``  cuDNN's fused conv+bias+ReLU (``torch.cudnn_convolution_relu``) with cuDNN
                 gradients, the ``cudnn`` choice of ``auto`` (convolutions, CUDA only)
``cudnn_s2d``    the same at stride 1 on the input's space-to-depth blocks, the ``cudnn_s2d``
                 choice of ``auto`` (strided convolutions, CUDA only)
``compile``      ``torch.compile`` of the reference op (forward+backward only, see ``run``)
``native``, ``triton``, ``auto``   ``alexnet_fast.ops`` with that backend

Shapes come from ``alexnet_fast.model.layer_shapes``. Each case's inputs are random, never zeros,
and rotated among several copies when one copy is smaller than twice the L2 cache. Every
provider's output and gradients are checked against eager on the same inputs first (a loose
sanity bound that catches a broken kernel, not the tests' tolerance; beyond it, against the
float64 result, which reduced precision can need: ``bench.sanity``), then timed. On CUDA the
timed unit is the replay of a CUDA graph of one call (forward, or forward+backward), so a row
measures the kernels, not the host's per-call work (Python, dispatch, autograd), which is tens of
microseconds and would hide the difference between kernels of that size; the training-step
benchmark shows what that host work costs end to end. The CSV's ``method`` column says how each
row was timed.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from dataclasses import dataclass

import torch

from alexnet_fast import backends, ops, reference, roofline
from alexnet_fast.bench import (
    DTYPES, LAYOUTS, Skipped, Timing, error_status, format_row, graph_replays, make_row, peak_memory_mb, precision,
    rel_diff, sanity, synchronize, time_fn,
)
from alexnet_fast.model import (ALEXNET_CONVS, INPUT_SIZE, LRN_PARAMS, POOL_PARAMS, ConvSpec, fits_input_size,
                                 layer_shapes, min_input_size)

OP_PROVIDERS = ("eager", "cudnn_fused", "cudnn_s2d", "compile", "native", "triton", "auto")
TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MAX_INPUT_SETS = 8
ROTATE_FACTOR = 2  # rotated inputs span at least this many L2 caches


@dataclass(frozen=True)
class OpCase:
    kernel: str  # conv1..conv5, lrn, max_pool2d, lrn_max_pool2d
    op: str  # the alexnet_fast.ops function
    shape: tuple  # input (N, C, H, W)
    conv: ConvSpec | None = None

    @property
    def input_grad(self) -> bool:
        """conv1 reads the images, which need no gradient: its backward has no dgrad."""
        return self.conv is None or self.conv.name != ALEXNET_CONVS[0].name

    @property
    def shape_str(self) -> str:
        return "x".join(str(d) for d in self.shape)

    def work(self, dtype: str) -> dict:
        if self.conv is not None:
            c = self.conv
            return roofline.conv_work(self.shape, c.c_out, c.kernel, c.stride, c.padding, dtype, self.input_grad)
        kernel, stride = POOL_PARAMS["kernel_size"], POOL_PARAMS["stride"]
        if self.op == "lrn":
            return roofline.lrn_work(self.shape, LRN_PARAMS["size"], dtype)
        if self.op == "max_pool2d":
            return roofline.max_pool_work(self.shape, kernel, stride, dtype)
        return roofline.lrn_max_pool_work(self.shape, LRN_PARAMS["size"], kernel, stride, dtype)

    def dtypes(self, selected) -> list[str]:
        """TF32 only changes convolutions."""
        return [d for d in selected if d != "tf32" or self.conv is not None]


def op_cases(batch: int = 128, size: int = INPUT_SIZE) -> list[OpCase]:
    """Every benchmarked op at its place in AlexNet, in network order."""
    cases = []
    for entry, shape in layer_shapes(batch, size):
        if isinstance(entry, ConvSpec):
            cases.append(OpCase(entry.name, "conv2d_relu", shape, entry))
        elif entry == "lrn_max_pool2d":
            cases += [OpCase(op, op, shape) for op in ("lrn", "max_pool2d", "lrn_max_pool2d")]
        else:
            cases.append(OpCase(entry, entry, shape))
    return cases


def applicable(case: OpCase, provider: str, mode: str) -> bool:
    """cuDNN's fused conv+ReLU exists for convolutions only; its space-to-depth form is for
    strided ones."""
    if provider == "cudnn_s2d":
        return case.conv is not None and case.conv.stride > 1
    return provider != "cudnn_fused" or case.conv is not None


def provider_fn(case: OpCase, provider: str, device: str):
    """The callable ``provider`` runs for ``case`` (tensors in, one tensor out); raises Skipped
    when it cannot run on ``device``."""
    if provider in ("native", "triton"):
        ok, reason = backends.availability(provider, device)
        if not ok:
            raise Skipped(reason)
        if provider == "triton" and device == "cpu":
            raise Skipped("Triton on the CPU runs only in the interpreter, which is not timed")
    if provider in ("cudnn_fused", "cudnn_s2d"):
        ok, reason = backends.availability("cudnn", device)
        if not ok:
            raise Skipped(reason)
    if case.conv is not None:
        s, p = case.conv.stride, case.conv.padding
        if provider in ("eager", "compile"):
            fn = lambda x, w, b: reference.conv2d_relu(x, w, b, (s, s), (p, p))  # noqa: E731
        elif provider == "cudnn_fused":
            fn = lambda x, w, b: torch.ops.alexnet_fast.conv2d_relu_cudnn(x, w, b, [s, s], [p, p])  # noqa: E731
        elif provider == "cudnn_s2d":
            fn = lambda x, w, b: ops.conv2d_relu_cudnn_s2d(x, w, b, (s, s), (p, p))  # noqa: E731
        else:
            fn = lambda x, w, b: ops.conv2d_relu(x, w, b, s, p, backend=provider)  # noqa: E731
    else:
        params = {"lrn": LRN_PARAMS, "max_pool2d": POOL_PARAMS, "lrn_max_pool2d": {**LRN_PARAMS, **POOL_PARAMS}}[case.op]
        if provider in ("eager", "compile"):
            ref = getattr(reference, case.op)
            fn = lambda x: ref(x, **params)  # noqa: E731
        else:
            op = getattr(ops, case.op)
            fn = lambda x: op(x, **params, backend=provider)  # noqa: E731
    if provider == "compile":
        torch.compiler.reset()  # a fresh cache per case: no silent fallback at the recompile limit
        fn = torch.compile(fn, dynamic=False)
    return fn


@dataclass
class Prepared:
    make_calls: object  # () -> one call of the mode per input set, in rotation order. Mode "bwd"
    # runs the forwards first, on the current stream: their backward runs on it (and can be captured).
    first_call_s: float  # compile time for the compile provider
    check: dict  # bench.sanity's status, note and rel_err (against eager: output and every gradient)

    def plain(self):
        """The timed callable without a graph: one call of the mode on the next input set."""
        order = itertools.cycle(self.make_calls())
        return lambda: next(order)()


class OpBench:
    """Inputs of one (case, dtype, layout) on a device, shared by all providers and modes."""

    def __init__(self, case: OpCase, dtype: str, layout: str, device: str, seed: int = 0):
        self.case, self.dtype, self.layout, self.device = case, dtype, layout, device
        first = self._input_set(seed)
        self.sets = [first] + [self._input_set(seed + i) for i in range(1, self._num_sets(first))]
        grad_mask = (case.input_grad, True, True) if case.conv is not None else (True,)
        for tensors in self.sets:
            for t, need in zip(tensors, grad_mask):
                t.requires_grad_(need)
        self.grad_inputs = [tuple(t for t in s if t.requires_grad) for s in self.sets]
        self.eager = provider_fn(case, "eager", device)
        with torch.no_grad():
            self.ref_out = self.eager(*self.sets[0])
        gen = torch.Generator(device=device).manual_seed(seed + 1000)
        self.grad_outs = [torch.empty_like(self.ref_out).normal_(generator=gen) for _ in self.sets]
        self._ref_grads = None
        self._exact = None

    def _input_set(self, seed: int) -> tuple:
        gen = torch.Generator(device=self.device).manual_seed(seed)
        dtype = TORCH_DTYPES[self.dtype]
        fmt = torch.channels_last if self.layout == "nhwc" else torch.contiguous_format

        def randn(shape, scale=1.0):
            t = torch.randn(shape, generator=gen, device=self.device, dtype=torch.float32) * scale
            return t.to(dtype).contiguous(memory_format=fmt) if len(shape) == 4 else t.to(dtype)

        x = randn(self.case.shape)
        c = self.case.conv
        if c is None:
            return (x,)
        w = randn((c.c_out, c.c_in, c.kernel, c.kernel), 1 / math.sqrt(c.c_in * c.kernel**2))
        return (x, w, randn((c.c_out,), 0.1))

    def _num_sets(self, first) -> int:
        if self.device != "cuda":
            return 1
        l2 = torch.cuda.get_device_properties(torch.cuda.current_device()).L2_cache_size
        nbytes = sum(t.numel() * t.element_size() for t in first)
        return max(1, min(MAX_INPUT_SETS, math.ceil(ROTATE_FACTOR * l2 / nbytes)))

    def _grads(self, out, i, retain=False):
        return torch.autograd.grad(out, self.grad_inputs[i], self.grad_outs[i], retain_graph=retain)

    @property
    def ref_grads(self):
        if self._ref_grads is None:
            self._ref_grads = self._grads(self.eager(*self.sets[0]), 0)
        return self._ref_grads

    @property
    def exact(self) -> tuple:
        """Eager's output and gradients in float64, on the first input set (the one checked)."""
        if self._exact is None:
            inputs = [t.detach().double().requires_grad_(t.requires_grad) for t in self.sets[0]]
            out = self.eager(*inputs)
            grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], self.grad_outs[0].double())
            self._exact = (out.detach(), *grads)
        return self._exact

    def _check(self, results: tuple, rel_err: float) -> dict:
        """bench.sanity of ``results`` (output, gradients...) ``rel_err`` away from eager's; beyond
        the bound, against the float64 result too (computed only then, once per case)."""
        check = sanity(rel_err, self.dtype)
        if check["status"] == "ok":
            return check
        exact = self.exact
        eager = (self.ref_out, *self.ref_grads)[:len(results)]
        from_exact = tuple(max(rel_diff(a, e) for a, e in zip(r, exact)) for r in (results, eager))
        return sanity(rel_err, self.dtype, from_exact)

    def prepare(self, provider: str, mode: str) -> Prepared:
        """Check ``provider`` against eager and return its timed callable for ``mode``."""
        fn = provider_fn(self.case, provider, self.device)
        start = time.perf_counter()
        if mode == "fwd":
            with torch.no_grad():
                out = fn(*self.sets[0])
            grads, ref_grads = (), ()
        else:
            out = fn(*self.sets[0])
            grads, ref_grads = self._grads(out, 0), self.ref_grads
        synchronize(self.device)
        first_call_s = time.perf_counter() - start
        rel_err = max([rel_diff(out, self.ref_out)] + [rel_diff(g, r) for g, r in zip(grads, ref_grads)])
        check = self._check((out, *grads), rel_err)
        sets = self.sets

        def make_calls():
            if mode == "fwd":
                def call(i):
                    with torch.no_grad():
                        fn(*sets[i])
            elif mode == "fwd+bwd":
                def call(i):
                    self._grads(fn(*sets[i]), i)
            else:
                outs = [fn(*s) for s in sets]

                def call(i):
                    self._grads(outs[i], i, retain=True)
            return [functools.partial(call, i) for i in range(len(sets))]
        return Prepared(make_calls, first_call_s, check)


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def selection(cfg) -> dict:
    """What a run measures: explicit choices, else the defaults (smaller under --quick)."""
    cuda = cfg.device == "cuda"
    tiny = cfg.quick and not cuda
    return {
        "dtypes": cfg.dtypes or (("bf16" if cuda else "fp32",) if cfg.quick else DTYPES),
        "layouts": cfg.layouts or (("nchw",) if cfg.quick else LAYOUTS),
        "modes": cfg.modes or (("fwd", "fwd+bwd") if cfg.quick else roofline.MODES),
        "batch": cfg.batch or (2 if tiny else 128),
        "size": cfg.image_size or (128 if tiny else INPUT_SIZE),
        "providers": tuple(p for p in OP_PROVIDERS if cfg.providers is None or p in cfg.providers),
        # ~1000 timed rows in a full GPU run: 30 ms of repetitions is 100s of calls for most ops
        "warmup_ms": 2 if tiny else 5,
        "rep_ms": 10 if tiny else (20 if cfg.quick else 30),
    }


def compile_plan(sel, quick: bool) -> tuple[str, str, str] | None:
    """(mode, dtype, layout) the compile provider runs in, or None: each case costs a compile of
    seconds, so it runs forward+backward in one dtype (bf16 when selected) and one layout
    (channels_last when selected, torch.compile's best)."""
    if quick or "fwd+bwd" not in sel["modes"] or "compile" not in sel["providers"]:
        return None
    return ("fwd+bwd", "bf16" if "bf16" in sel["dtypes"] else sel["dtypes"][0],
            "nhwc" if "nhwc" in sel["layouts"] else sel["layouts"][0])


def check_config(cfg) -> None:
    size = cfg.image_size or INPUT_SIZE
    if not fits_input_size(size):
        raise ValueError(f"--image-size {size} is too small for AlexNet's layers; use at least {min_input_size()}")
    names = list(dict.fromkeys(c.kernel for c in op_cases(1, size)))  # LRN and max-pool recur per layer
    unknown = [k for k in cfg.kernels or () if k not in names]
    if unknown or cfg.kernels == ():
        raise ValueError(f"--kernels must be a comma-separated list of {', '.join(names)}; got {','.join(cfg.kernels)!r}")


def measure_ceilings(device: str, env: dict, quick: bool) -> tuple[dict, list]:
    """The copy rate (read + write bytes/s) and dense matrix-product rates, measured now:
    2 GiB copy and 8192^3 products on CUDA; smaller sizes on the CPU (no TF32 there: its fp32
    rate stands in)."""
    cuda = device == "cuda"
    rows = []
    nbytes = 2 * 2**30 if cuda else (64 if quick else 256) * 2**20
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), device, 10, 100)
    del src, dst
    copy_gbps = 2 * nbytes / (t.ms * 1e-3) / 1e9
    rows.append(make_row(env, kernel="ceiling", provider="copy", mode="fwd", shape=f"{nbytes}B", dtype="fp32",
                         layout="-", op="copy", status="ok", ms=t.ms, ms_p20=t.p20, ms_p80=t.p80,
                         min_bytes=2 * nbytes, gbps=copy_gbps, method=t.method))
    n = 8192 if cuda else 1024  # 512^3 on the CPU runs well below the rate of AlexNet's convs
    mm = {}
    for dtype in ("bf16", "fp32", "tf32") if cuda else ("bf16", "fp32"):
        gen = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(n, n, generator=gen, device=device).to(TORCH_DTYPES[dtype]) for _ in range(2))
        with precision(dtype):
            t = time_fn(lambda: a @ b, device, 10, 100)
        del a, b
        mm[dtype] = 2 * n**3 / (t.ms * 1e-3) / 1e12
        rows.append(make_row(env, kernel="ceiling", provider="matmul", mode="fwd", shape=f"{n}x{n}x{n}",
                             dtype=dtype, layout="-", op="matmul", status="ok", ms=t.ms, ms_p20=t.p20,
                             ms_p80=t.p80, flops=2 * n**3, tflops=mm[dtype], method=t.method))
    mm.setdefault("tf32", mm["fp32"])
    for r in rows:
        print(format_row(r), flush=True)
    return {"copy_gbps": copy_gbps, "mm_tflops": mm}, rows


def run(cfg, env: dict, save=None) -> list[dict]:
    """Measure every selected case and provider; returns result rows (ceilings included).
    ``save(rows)``, when given, is called with the rows so far after each case and dtype, so a
    run stopped early keeps what it measured."""
    sel = selection(cfg)
    device = cfg.device
    plan = compile_plan(sel, cfg.quick)
    if "compile" in sel["providers"]:
        print("compile provider: " + (f"{plan[0]}, {plan[1]}, {plan[2]} only (each case costs a compile)" if plan
                                      else "not run (--quick, or no fwd+bwd mode selected)"), flush=True)
    ceilings, rows = measure_ceilings(device, env, cfg.quick)
    reported = set()
    for case in op_cases(sel["batch"], sel["size"]):
        if cfg.kernels and case.kernel not in cfg.kernels:
            continue
        for dtype in case.dtypes(sel["dtypes"]):
            work = case.work(dtype)
            ceil_tflops = ceilings["mm_tflops"][roofline.compute_ceiling_dtype(case.op, dtype)]
            for layout in sel["layouts"]:
                with precision(dtype):
                    try:
                        bench = OpBench(case, dtype, layout, device)
                    except Exception as e:  # the eager reference itself cannot run this case here
                        row = make_row(env, kernel=case.kernel, provider="eager", mode="fwd", shape=case.shape_str,
                                       dtype=dtype, layout=layout, op=case.op)
                        row["status"], row["note"] = error_status(e)
                        rows.append(row)
                        print(format_row(row), flush=True)
                        continue
                    for provider in sel["providers"]:
                        for mode in sel["modes"]:
                            if not applicable(case, provider, mode):
                                continue
                            if provider == "compile" and plan != (mode, dtype, layout):
                                continue
                            row = _measure(bench, provider, mode, work[mode], ceilings["copy_gbps"], ceil_tflops,
                                           sel, env)
                            rows.append(row)
                            if row["status"] == "skipped" and (provider, row["note"]) in reported:
                                continue
                            reported.add((provider, row["note"]))
                            print(format_row(row), flush=True)
                    del bench
            if save is not None:
                save(rows)
    return rows


def _time(prepared: Prepared, device: str, sel) -> Timing:
    """On CUDA, the replay of a CUDA graph of each call (kernels only, see ``graph_replays``). In
    mode "bwd" the forwards run on the capturing stream first, so that the backward, which
    autograd runs on its forward's stream, is what the graph captures. Elsewhere, and where
    capture fails, the plain calls (host work included); ``method`` says which."""
    timed, how = None, "plain calls, host work included"
    if device == "cuda":
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                calls = prepared.make_calls()
            timed, how = graph_replays(calls, stream), "CUDA graph replay, host work excluded"
        except Exception as e:  # a provider whose calls cannot be captured is timed as plain calls
            how = f"plain calls, host work included (graph capture failed: {type(e).__name__})"
    timing = time_fn(timed or prepared.plain(), device, sel["warmup_ms"], sel["rep_ms"])
    return dataclasses.replace(timing, method=f"{timing.method}; {how}")


def _measure(bench: OpBench, provider, mode, work, copy_gbps, ceil_tflops, sel, env) -> dict:
    case = bench.case
    row = make_row(env, kernel=case.kernel, provider=provider, mode=mode, shape=case.shape_str, dtype=bench.dtype,
                   layout=bench.layout, op=case.op, min_bytes=work.bytes, flops=work.flops,
                   ceil_gbps=copy_gbps, ceil_tflops=ceil_tflops)
    try:
        prepared = bench.prepare(provider, mode)
        timing = _time(prepared, bench.device, sel)
        peak = peak_memory_mb(prepared.plain(), bench.device) if mode == "fwd+bwd" else None
    except Exception as e:  # a provider that cannot run this case is reported, never fatal
        row["status"], row["note"] = error_status(e)
        return row
    row.update(
        **prepared.check,
        ms=timing.ms, ms_p20=timing.p20, ms_p80=timing.p80, method=timing.method,
        peak_mb=peak, compile_s=prepared.first_call_s if provider == "compile" else None,
        **roofline.roofline(work, timing.ms, copy_gbps, ceil_tflops),
    )
    return row
