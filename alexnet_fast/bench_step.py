"""The whole training step of the seed AlexNet (LRN included): forward, cross-entropy, backward and
an SGD step (momentum 0.9, weight decay 5e-4), for every provider in the same run:

``eager``           AlexNet(backend="torch"): the PyTorch reference ops, NCHW and channels_last
``compile``         torch.compile of that reference model (channels_last, as the peers measured it)
``auto``            AlexNet(backend="auto"), eager, NCHW and channels_last
``auto+compile``    torch.compile of the auto model, in the layout where ``auto`` was faster
``auto+cudagraph``  the auto model with the whole step (forward, backward, optimizer) captured in
                    one CUDA graph and replayed; inputs are copied into static tensors first

Every provider applies the same SGD rule. The uncompiled ``auto`` providers apply it to the
classifier's weights in their backward (``alexnet_fast.optim.SGD(step_in_backward=True)``), as
training on one GPU does; the others in the optimizer's step.

bf16 means autocast to bfloat16 with TF32 off; tf32 means float32 with TF32 on; fp32 means TF32
off. Warm-up steps (and so compile time, reported separately) are excluded from the timing; two
random batches alternate.

Before its warm-up, each provider's model (initialised from the same seed as eager's) computes
the logits of the first batch in eval mode; a provider whose logits differ from eager's beyond
the benchmark's sanity bound is marked ``mismatch``. The compiled providers' check runs their
model uncompiled (switching it to eval mode and back would compile it twice more).
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alexnet_fast.bench import (Skipped, error_status, format_row, make_row, peak_memory_mb, precision, rel_diff,
                                sanity, synchronize, time_fn)
from alexnet_fast.model import INPUT_SIZE, AlexNet
from alexnet_fast.step import GraphedStep, train_step
from alexnet_fast.train import can_step_in_backward, keeps_autocast_copies, make_sgd

STEP_PROVIDERS = ("eager", "compile", "auto", "auto+compile", "auto+cudagraph")
STEP_DTYPES = ("bf16", "tf32", "fp32")
COMPILED = ("compile", "auto+compile")
NUM_CLASSES = 10
SGD_ARGS = dict(lr=0.01, momentum=0.9, weight_decay=5e-4)  # the fused step on CUDA, as training runs it
WARMUP_STEPS = 3
NUM_BATCHES = 2


@dataclass
class Step:
    fn: object  # one training step on the next batch
    warmup_s: float  # wall time of the warm-up steps: compile time for the compiled providers
    note: str
    logits: torch.Tensor  # of the first batch, in eval mode, before any training step (float32)


def prepare_step(provider: str, layout: str, batch: int, dtype: str, size: int, device: str, seed: int = 0,
                 warmup_steps: int = WARMUP_STEPS) -> Step:
    """Build the model, optimizer and batches for ``provider`` and run the warm-up steps (and the
    CUDA-graph capture); raises Skipped when the provider cannot run on ``device``."""
    if provider not in STEP_PROVIDERS:
        raise ValueError(f"provider must be one of {STEP_PROVIDERS}, got {provider!r}")
    if dtype not in STEP_DTYPES:
        raise ValueError(f"dtype must be one of {STEP_DTYPES}, got {dtype!r}")
    graphed = provider == "auto+cudagraph"
    if graphed and device != "cuda":
        raise Skipped("CUDA graphs need a CUDA device")
    torch.manual_seed(seed)
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    backend = "torch" if provider in ("eager", "compile") else "auto"
    with torch.device(device):  # initialise the 58M parameters where they live
        model = AlexNet(num_classes=NUM_CLASSES, backend=backend).to(memory_format=fmt).train()
    # SGD keeps no step counter on the device, so it needs no capturable flag to be captured.
    amp_dtype = torch.bfloat16 if dtype == "bf16" else None
    compiled = provider in COMPILED
    opt = make_sgd(model.parameters(), device, **SGD_ARGS,
                   autocast_dtype=keeps_autocast_copies(backend, device, amp_dtype, compiled),
                   step_in_backward=can_step_in_backward(backend, device, compiled))
    gen = torch.Generator(device=device).manual_seed(seed)
    images = [torch.randn((batch, 3, size, size), generator=gen, device=device).contiguous(memory_format=fmt)
              for _ in range(NUM_BATCHES)]
    labels = [torch.randint(0, NUM_CLASSES, (batch,), generator=gen, device=device) for _ in range(NUM_BATCHES)]
    amp = amp_dtype is not None
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=amp):
        logits = model(images[0]).float()
    model.train()
    forward = torch.compile(model) if provider in COMPILED else model

    if graphed:
        stepper = GraphedStep(forward, opt, F.cross_entropy, amp_dtype, warmup=warmup_steps)
        note = "whole step replayed from one CUDA graph"
    else:
        def stepper(x, y):
            return train_step(forward, opt, F.cross_entropy, x, y, amp_dtype)
        note = ""
    order = itertools.cycle(range(NUM_BATCHES))

    def run():
        i = next(order)
        return stepper(images[i], labels[i])[0]

    start = time.perf_counter()
    for _ in range(warmup_steps + graphed):  # the graphed step captures on its last warm-up call
        loss = run()
    synchronize(device)
    warmup_s = time.perf_counter() - start
    if not math.isfinite(loss.item()):
        raise RuntimeError(f"the loss is {loss.item()} after {warmup_steps} warm-up steps")
    return Step(run, warmup_s, note, logits)


def selection(cfg) -> dict:
    cuda = cfg.device == "cuda"
    tiny = cfg.quick and not cuda
    dtypes = tuple(d for d in cfg.dtypes if d in STEP_DTYPES) if cfg.dtypes else (
        ("bf16",) if cfg.quick and cuda else ("bf16", "tf32") if cuda else ("fp32",))
    return {
        "dtypes": dtypes,
        "dropped_dtypes": tuple(d for d in cfg.dtypes or () if d not in STEP_DTYPES),
        "layouts": cfg.layouts or (("nchw",) if cfg.quick else ("nchw", "nhwc")),
        "compile_layout": "nhwc" if cfg.layouts is None or "nhwc" in cfg.layouts else cfg.layouts[0],
        "batches": (cfg.batch,) if cfg.batch else ((2,) if tiny else (128,) if cfg.quick else (128, 256)),
        "size": cfg.image_size or (128 if tiny else INPUT_SIZE),
        "providers": tuple(p for p in STEP_PROVIDERS if cfg.providers is None or p in cfg.providers),
        # a CPU step of the 58M-parameter model takes a large fraction of a second
        "warmup_steps": 1 if tiny else WARMUP_STEPS,
        "min_reps": 3 if tiny else 5,
        "warmup_ms": 10 if cfg.quick else 25,
        "rep_ms": 50 if tiny else (100 if cfg.quick else 300),
    }


def compile_plan(sel, cfg) -> tuple:
    """(compiled providers, batch, dtype): torch.compile of the whole model costs ~30 s per
    configuration on the H200, so the compiled providers run for one batch size and one dtype
    (bf16 when selected); --quick keeps only the compiled reference, on CUDA."""
    providers = tuple(p for p in sel["providers"] if p in COMPILED and not (cfg.quick and p == "auto+compile"))
    if cfg.quick and cfg.device != "cuda":
        providers = ()
    dtype = "bf16" if "bf16" in sel["dtypes"] else (sel["dtypes"] or (None,))[0]
    return providers, sel["batches"][0], dtype


def check_config(cfg) -> None:
    from alexnet_fast.bench_ops import check_config as check_sizes

    check_sizes(cfg)


def run(cfg, env: dict, save=None) -> list[dict]:
    """Measure the selected step providers; returns the rows. ``save(rows)``, when given, is
    called with the rows so far after each one, so a run stopped early keeps what it measured."""
    sel = selection(cfg)
    device = cfg.device
    compiled, compile_batch, compile_dtype = compile_plan(sel, cfg)
    if sel["dropped_dtypes"]:
        print(f"training step: {', '.join(sel['dropped_dtypes'])} not measured (runs in {', '.join(STEP_DTYPES)}; "
              "fp16 training would need a loss scaler)", flush=True)
    skipped_compile = [p for p in sel["providers"] if p in COMPILED and p not in compiled]
    if compiled:
        print(f"training step: {', '.join(compiled)} at batch {compile_batch}, {compile_dtype} only "
              "(compile time)", flush=True)
    if skipped_compile:
        print(f"training step: {', '.join(skipped_compile)} not run under --quick"
              f"{' on the CPU' if device != 'cuda' and 'compile' in skipped_compile else ''}", flush=True)
    rows = []
    for batch in sel["batches"]:
        for dtype in sel["dtypes"]:
            auto_ms, eager = {}, {}  # eager: the reference logits, from the first eager row
            for provider, layout in _order(sel, batch, dtype, compiled, compile_batch, compile_dtype):
                if layout == "best":
                    layout = min(auto_ms, key=auto_ms.get) if auto_ms else sel["layouts"][0]
                with precision(dtype):
                    row = _measure(provider, layout, batch, dtype, sel, device, env, eager)
                if provider == "auto" and row["status"] == "ok":
                    auto_ms[layout] = row["ms"]
                rows.append(row)
                print(format_row(row), flush=True)
                if save is not None:
                    save(rows)
                if provider in COMPILED:
                    torch.compiler.reset()
                if device == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _order(sel, batch, dtype, compiled, compile_batch, compile_dtype):
    with_compile = batch == compile_batch and dtype == compile_dtype
    for provider in sel["providers"]:
        if provider in COMPILED:
            if provider in compiled and with_compile:
                yield provider, sel["compile_layout"] if provider == "compile" else "best"
            continue
        for layout in sel["layouts"]:
            yield provider, layout


def _measure(provider, layout, batch, dtype, sel, device, env, eager: dict) -> dict:
    """One step row. ``eager`` holds the reference logits once an eager row has computed them
    (its first call stores them there); without them the row is not compared."""
    size = sel["size"]
    row = make_row(env, kernel="train_step", provider=provider, mode="train", shape=f"{batch}x3x{size}x{size}",
                   dtype=dtype, layout=layout, op="alexnet")
    try:
        step = prepare_step(provider, layout, batch, dtype, size, device, warmup_steps=sel["warmup_steps"])
        timing = time_fn(step.fn, device, sel["warmup_ms"], sel["rep_ms"], sel["min_reps"])
        peak = None if provider == "auto+cudagraph" else peak_memory_mb(step.fn, device)
    except Exception as e:  # a provider that cannot run is reported, never fatal
        row["status"], row["note"] = error_status(e)
        return row
    if provider == "eager":
        eager.setdefault("logits", step.logits)
    check = sanity(rel_diff(step.logits, eager["logits"]), dtype) if "logits" in eager else {
        "status": "ok", "note": "not compared: no eager row in this run"}
    note = "; ".join(n for n in (step.note, check.pop("note")) if n)
    row.update(**check, ms=timing.ms, ms_p20=timing.p20, ms_p80=timing.p80, method=timing.method,
               images_per_s=batch / timing.ms * 1e3, peak_mb=peak, note=note,
               compile_s=step.warmup_s if provider in COMPILED else None)
    return row
