"""Benchmarks of every op and of the training step against eager PyTorch, cuDNN and torch.compile,
measured in one run: the timer, the metadata every result carries, the results CSV (upserted by
key), markdown tables, plots, and the ``alexnet-fast bench`` command.

The measurements live in ``bench_ops`` (per op, with the roofline of ``roofline``) and
``bench_step`` (the whole training step). Method: on CUDA ``triton.testing.do_bench`` (CUDA events,
L2 flushed before every call, warm-up excluded), median with the 20th/80th percentiles; on the CPU
the same statistics of ``time.perf_counter`` around each call.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import itertools
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from alexnet_fast.cli import positive_int

KEY = ("kernel", "provider", "mode", "shape", "dtype", "layout")
FIELDS = KEY + (
    "op", "status", "ms", "ms_p20", "ms_p80", "images_per_s", "vs_eager", "vs_compile",
    "min_bytes", "flops", "gbps", "tflops", "frac_bw", "frac_compute", "floor_ms", "frac_roofline",
    "ceil_gbps", "ceil_tflops", "peak_mb", "compile_s", "rel_err", "note", "method",
    "device", "gpu", "driver", "torch", "cuda", "cudnn", "triton", "git_commit", "timestamp", "command",
)
NUMERIC = {
    "ms", "ms_p20", "ms_p80", "images_per_s", "vs_eager", "vs_compile", "min_bytes", "flops", "gbps",
    "tflops", "frac_bw", "frac_compute", "floor_ms", "frac_roofline", "ceil_gbps", "ceil_tflops",
    "peak_mb", "compile_s", "rel_err",
}
DTYPES = ("fp32", "tf32", "bf16", "fp16")
LAYOUTS = ("nchw", "nhwc")
DEFAULT_OUT = Path("benchmarks") / "results"
# Statuses: ok; skipped (the provider cannot run here, with the reason); failed (it raised);
# mismatch (it ran, but its output or gradients differ from eager beyond the sanity bound, and
# where that was checked, from the float64 result by more than EXACT_FACTOR times eager does).
PROBLEM_STATUSES = ("failed", "mismatch")
# Normwise difference from eager beyond which a provider's result is flagged "mismatch": a bound
# that catches a broken kernel, not the tests' tolerance (tests/conftest.py holds those).
SANITY_TOL = {"fp32": 1e-2, "tf32": 1e-2, "bf16": 5e-2, "fp16": 2e-2}
# Beyond that bound, a result at most this many times as far from the float64 result as eager's
# is ok (see sanity).
EXACT_FACTOR = 2.0


def rel_diff(out, ref) -> float:
    """||out - ref|| / ||ref|| in float32; infinite for another shape or a non-finite result."""
    if out.shape != ref.shape:
        return math.inf
    out, ref = out.detach().float(), ref.detach().float()
    err = ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return err if math.isfinite(err) else math.inf


def sanity(rel_err: float, dtype: str, from_exact: tuple[float, float] | None = None) -> dict:
    """The status and note of a result ``rel_err`` away from eager. Beyond the bound,
    ``from_exact`` = (the result's, eager's) normwise distance from the float64 result, when
    given, decides: a result at most EXACT_FACTOR times as far from it as eager is ok. In reduced
    precision two correct kernels can differ by more than the bound: rounding moves outputs near
    zero across a ReLU, which flips its mask, and a gradient that sums many masked values (a
    weight gradient) moves with it. Eager's own TF32 gradients of conv1 are 1.4e-2 from float64,
    and Triton's correct TF32 ones differ from eager's by 1.2-1.3 times that (BENCHMARKS.md)."""
    tol = SANITY_TOL[dtype]
    if rel_err <= tol:
        return {"status": "ok", "note": "", "rel_err": rel_err}
    note = f"differs from eager by {rel_err:.2g} (bound {tol:g})"
    if from_exact is None:
        return {"status": "mismatch", "note": note, "rel_err": rel_err}
    mine, eager = from_exact
    ok = mine <= EXACT_FACTOR * eager
    note += (f"; from float64 by {mine:.2g}, eager by {eager:.2g}"
             f" ({'within' if ok else 'beyond'} {EXACT_FACTOR:g}x eager's)")
    return {"status": "ok" if ok else "mismatch", "note": note, "rel_err": rel_err}


class Skipped(Exception):
    """A provider cannot run this case here; the message is the reason."""


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Timing:
    ms: float
    p20: float
    p80: float
    method: str


def _cpu_timing(fn, warmup_ms: float, rep_ms: float, min_reps: int = 5) -> Timing:
    start = time.perf_counter()
    fn()
    estimate_ms = max((time.perf_counter() - start) * 1e3, 1e-3)
    for _ in range(min(100, int(warmup_ms / estimate_ms))):  # the estimating call warmed up too
        fn()
    reps = max(min_reps, min(1000, int(rep_ms / estimate_ms)))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return Timing(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8),
                  f"perf_counter, {reps} calls after warm-up")


def _quantile(values, q: float) -> float:
    """Linear-interpolated quantile (what torch.quantile and triton's do_bench use)."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def time_fn(fn, device_type: str, warmup_ms: float = 25, rep_ms: float = 100, min_reps: int = 5) -> Timing:
    """Median and 20th/80th percentile milliseconds of ``fn()``, warm-up excluded. ``min_reps``
    applies on the CPU, where one call can outlast ``rep_ms``."""
    if device_type != "cuda":
        return _cpu_timing(fn, warmup_ms, rep_ms, min_reps)
    try:
        from triton.testing import do_bench
    except ImportError as e:
        raise RuntimeError(f"timing on CUDA uses triton.testing.do_bench; install triton ({e})") from e
    ms, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8], return_mode="median")
    return Timing(ms, p20, p80, f"triton do_bench (CUDA events, L2 flushed per call), rep {rep_ms} ms")


def graph_replays(calls, stream=None):
    """Each of ``calls`` (zero-argument callables) captured in its own CUDA graph on ``stream`` (a
    new side stream if None), after a warm-up call there (compilation, autotuning, the
    allocator); returns a callable that replays them in turn. Timing the replays measures the
    kernels without the host's per-call work (Python, dispatch, autograd), which otherwise
    dominates ops of tens of microseconds."""
    import torch

    graphs = []
    for call in calls:
        side = stream or torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            call()
        graphs.append(graph)
    order = itertools.cycle(graphs)
    return lambda: next(order).replay()


def format_row(row: dict) -> str:
    """One progress line for a result row."""
    head = (f"{row['kernel']:<14} {row['shape']:<16} {row['dtype']:<4} {row['layout']:<4} {row['mode']:<7} "
            f"{row['provider']:<14}")
    if row["status"] in ("skipped", "failed"):
        return f"{head} {row['status']}: {row['note']}"
    line = f"{head} {row['ms']:9.4f} ms [{row['ms_p20']:.4f}-{row['ms_p80']:.4f}]"
    for field, fmt in (("gbps", " {:7.4g} GB/s"), ("tflops", " {:6.4g} TFLOP/s"), ("frac_roofline", " {:4.0%} of roofline"),
                       ("images_per_s", " {:,.0f} img/s"), ("compile_s", " compile {:.1f} s"), ("peak_mb", " peak {:.0f} MB")):
        if row.get(field):
            line += fmt.format(row[field])
    if row["status"] == "mismatch":
        line += f" MISMATCH: {row['note']}"
    return line


def synchronize(device_type: str) -> None:
    if device_type == "cuda":
        import torch

        torch.cuda.synchronize()


@contextlib.contextmanager
def precision(dtype: str):
    """TF32 on for "tf32" and off otherwise (so "fp32" is true fp32), cuDNN autotuning on; the
    previous flags come back afterwards."""
    import torch

    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.benchmark)
    tf32 = dtype == "tf32"
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.benchmark) = saved


def peak_memory_mb(fn, device_type: str) -> float | None:
    """Peak bytes ``fn()`` allocates beyond what is allocated before it (its inputs), in MB."""
    if device_type != "cuda":
        return None
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def error_status(e: BaseException) -> tuple[str, str]:
    """(status, note) for an exception a provider raised: a missing piece is a skip, anything
    else a failure."""
    from alexnet_fast.backends import BackendUnavailableError

    status = "skipped" if isinstance(e, (Skipped, ImportError, NotImplementedError, BackendUnavailableError)) else "failed"
    lines = str(e).strip().splitlines()
    msg = lines[0] if lines else ""
    note = msg if isinstance(e, Skipped) else f"{type(e).__name__}: {msg}"
    return status, note[:300]


# ---------------------------------------------------------------------------------------------
# what every result row carries
# ---------------------------------------------------------------------------------------------
def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def _run(cmd, cwd=None) -> str:
    try:
        res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def git_commit() -> str:
    """Short commit of the checkout this package runs from, "+dirty" with uncommitted changes to
    tracked files; "unknown" when it is not a git checkout (an installed wheel)."""
    root = Path(__file__).resolve().parent.parent
    top = _run(["git", "rev-parse", "--show-toplevel"], cwd=root)
    if not top or Path(top).resolve() != root:
        return "unknown"
    sha = _run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root)
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root)
    return (sha or "unknown") + ("+dirty" if dirty else "")


def driver_version() -> str:
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
        m = re.search(r"Kernel Module\s+([\d.]+)", text)
        if m:
            return m.group(1)
    except OSError:
        pass
    out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out else "unknown"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device_type: str, command: str) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    cuda = device_type == "cuda"
    return {
        "device": device_type,
        "gpu": torch.cuda.get_device_name() if cuda else f"CPU {cpu_name()}",
        "driver": driver_version() if cuda else "",
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "",
        "cudnn": str(torch.backends.cudnn.version() or "") if cuda else "",
        "triton": triton_version,
        "git_commit": git_commit(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command,
    }


def make_row(env: dict, **fields) -> dict:
    row = {name: None for name in FIELDS}
    row.update(env)
    row.update(fields)
    return row


# ---------------------------------------------------------------------------------------------
# the results CSV
# ---------------------------------------------------------------------------------------------
def row_key(row: dict) -> tuple:
    return tuple(str(row.get(k) or "") for k in KEY)


def _parse(name: str, value: str):
    if name in NUMERIC:
        return float(value) if value not in ("", None) else None
    return value


def _format(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        # whole numbers (byte and FLOP counts read back as floats) keep every digit
        return str(int(value)) if value.is_integer() else f"{value:.6g}"
    return str(value)


class ResultsError(ValueError):
    """A results CSV that cannot be read: missing, not a file, or not written by this benchmark."""


def load_rows(path) -> list[dict]:
    """The rows of a results CSV, numbers parsed; raises ResultsError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise ResultsError(f"no results CSV at {path}" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except UnicodeDecodeError:
        raise ResultsError(f"{path} is not a results CSV of alexnet-fast bench: not UTF-8 text") from None
    except csv.Error as e:
        raise ResultsError(f"{path} is a damaged results CSV: {e}") from None
    missing = [k for k in (*KEY, "status", "ms") if k not in (reader.fieldnames or ())]
    if missing:
        raise ResultsError(f"{path} is not a results CSV of alexnet-fast bench: it has no {missing} columns")
    try:
        return [{k: _parse(k, v) for k, v in row.items()} for row in rows]
    except ValueError as e:  # a number that is not one
        raise ResultsError(f"{path} is a damaged results CSV: {e}") from None


def upsert_csv(path, rows) -> list[dict]:
    """Merge ``rows`` into the CSV at ``path``: a row whose key (kernel, provider, mode, shape,
    dtype, layout) is already there replaces it in place, new keys are appended. Ratios are
    recomputed over the merged table. Returns the merged rows."""
    path = Path(path)
    merged = load_rows(path) if path.exists() else []
    index = {row_key(r): i for i, r in enumerate(merged)}
    for row in rows:
        key = row_key(row)
        if key in index:
            merged[index[key]] = row
        else:
            index[key] = len(merged)
            merged.append(row)
    recompute_ratios(merged)
    extra = sorted({k for r in merged for k in r} - set(FIELDS))
    fields = list(FIELDS) + extra
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in merged:
            writer.writerow({k: _format(row.get(k)) for k in fields})
    os.replace(tmp, path)
    return merged


def _ok(row) -> bool:
    return row is not None and row.get("status") in ("ok", "mismatch") and bool(row.get("ms"))


def recompute_ratios(rows) -> None:
    """``vs_eager`` / ``vs_compile``: how many times faster than the eager / torch.compile row of
    the same case (for the training step: eager NCHW, and compile in any layout)."""
    index = {row_key(r): r for r in rows}
    compile_steps = {}
    for r in rows:
        if r.get("kernel") == "train_step" and r.get("provider") == "compile" and _ok(r):
            compile_steps.setdefault((r["shape"], r["dtype"]), r)
    for r in rows:
        r["vs_eager"] = r["vs_compile"] = None
        if not _ok(r) or r.get("kernel") == "ceiling":
            continue
        k = dict(zip(KEY, row_key(r)))
        if r["kernel"] == "train_step":
            eager = index.get(row_key({**k, "provider": "eager", "layout": "nchw"}))
            comp = compile_steps.get((r["shape"], r["dtype"]))
        else:
            eager = index.get(row_key({**k, "provider": "eager"}))
            comp = index.get(row_key({**k, "provider": "compile"}))
        if _ok(eager):
            r["vs_eager"] = eager["ms"] / r["ms"]
        if _ok(comp):
            r["vs_compile"] = comp["ms"] / r["ms"]


# ---------------------------------------------------------------------------------------------
# markdown
# ---------------------------------------------------------------------------------------------
OP_PROVIDER_ORDER = ("eager", "cudnn_fused", "cudnn_s2d", "compile", "native", "triton", "auto")
OURS = ("native", "triton", "auto")


def _fmt(v, spec=".3f", empty="–") -> str:
    return empty if v is None else format(v, spec)


def _table(header, body) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return lines


def _unique(rows, field) -> list[str]:
    return sorted({str(r[field]) for r in rows if r.get(field)})


def markdown(rows, dtypes=None, layouts=None, modes=None) -> str:
    """Markdown tables of result rows: environment and ceilings, per-op times with the fraction
    of the roofline, the training step with images/s and ratios, and what was skipped."""
    rows = [r for r in rows if (dtypes is None or r["dtype"] in dtypes or r["kernel"] == "ceiling")
            and (layouts is None or r["layout"] in layouts or r["kernel"] == "ceiling")
            and (modes is None or r["mode"] in modes or r["kernel"] in ("ceiling", "train_step"))]
    if not rows:
        return "No results.\n"
    out = []
    times = _unique(rows, "timestamp")
    env = [("", "gpu"), ("driver", "driver"), ("torch", "torch"), ("CUDA", "cuda"), ("cuDNN", "cudnn"),
           ("triton", "triton"), ("commit", "git_commit")]
    out.append("Measured on " + "; ".join(f"{label} {', '.join(_unique(rows, f))}".strip() for label, f in env
                                          if _unique(rows, f))
               + (f"; {times[0]} to {times[-1]}" if times else "") + ".")
    out.append("")
    out.append("Commands: " + ", ".join(f"`{c}`" for c in _unique(rows, "command")))
    out.append("")

    ceilings = [r for r in rows if r["kernel"] == "ceiling" and _ok(r)]
    if ceilings:
        out.append("**Ceilings** (measured in the same run)")
        out.append("")
        body = [(r["provider"], r["dtype"], r["shape"],
                 f"{r['gbps']:.4g} GB/s" if r["provider"] == "copy" else f"{r['tflops']:.4g} TFLOP/s")
                for r in ceilings]
        out += _table(("ceiling", "dtype", "size", "rate"), body)
        out.append("")

    op_rows = [r for r in rows if r["kernel"] not in ("ceiling", "train_step")]
    if op_rows:
        out += _op_table(op_rows)
        out.append("")
    step_rows = [r for r in rows if r["kernel"] == "train_step"]
    if step_rows:
        out += _step_table(step_rows)
        out.append("")
    skipped = {}
    for r in rows:
        if r.get("status") in ("skipped",) + PROBLEM_STATUSES:
            skipped.setdefault((r["status"], r["provider"], r.get("note") or ""), 0)
            skipped[(r["status"], r["provider"], r.get("note") or "")] += 1
    if skipped:
        out.append("**Not measured or flagged**")
        out.append("")
        out += [f"- {status} {provider} ({n} rows): {note}" for (status, provider, note), n in sorted(skipped.items())]
        out.append("")
    return "\n".join(out)


def _op_table(op_rows) -> list[str]:
    groups = {}
    for r in op_rows:
        groups.setdefault((r["kernel"], r["shape"], r["dtype"], r["layout"], r["mode"]), {})[r["provider"]] = r
    providers = [p for p in OP_PROVIDER_ORDER if any(_ok(g.get(p)) for g in groups.values())]
    header = ["op", "input", "dtype", "layout", "mode", "floor ms"] + providers + ["ours vs eager", "ours vs compile"]
    body = []
    for (kernel, shape, dtype, layout, mode), g in groups.items():
        oks = [r for r in g.values() if _ok(r)]
        if not oks:
            continue
        floor = next((r["floor_ms"] for r in oks if r.get("floor_ms")), None)
        cells = []
        for p in providers:
            r = g.get(p)
            if not _ok(r):
                cells.append("skip" if r is not None and r["status"] == "skipped" else "–")
                continue
            cell = f"{r['ms']:.3f}"
            if r.get("frac_roofline"):
                cell += f" ({r['frac_roofline']:.0%})"
            cells.append(cell + (" !" if r["status"] == "mismatch" else ""))
        ours = [g[p] for p in OURS if _ok(g.get(p))]
        best = min(ours, key=lambda r: r["ms"]) if ours else None
        body.append([kernel, shape, dtype, layout, mode, _fmt(floor)] + cells
                    + [_fmt(best and best.get("vs_eager"), ".2f"), _fmt(best and best.get("vs_compile"), ".2f")])
    lines = ["**Per op**: median ms (fraction of the roofline); floor = max(min bytes / copy rate, "
             "FLOPs / matrix-product rate); ours = the fastest of native, triton, auto; ! = mismatch: "
             "differs from eager beyond the sanity bound, and from float64 more than eager does "
             f"(x{EXACT_FACTOR:g})", ""]
    return lines + _table(header, body)


def _step_table(step_rows) -> list[str]:
    body = []
    for r in step_rows:
        if not _ok(r):
            continue
        batch = r["shape"].split("x")[0]
        body.append([batch, r["dtype"], r["provider"], r["layout"],
                     f"{r['ms']:.2f} ({r['ms_p20']:.2f}–{r['ms_p80']:.2f})",
                     f"{r['images_per_s']:,.0f}", _fmt(r.get("vs_eager"), ".2f"), _fmt(r.get("vs_compile"), ".2f"),
                     _fmt(r.get("compile_s"), ".0f", ""), _fmt(r.get("peak_mb") and r["peak_mb"] / 1024, ".1f", "")])
    lines = ["**Training step** (forward, backward, SGD step; bf16 = autocast; ratios against eager "
             "NCHW and torch.compile of the reference model, same batch and dtype)", ""]
    return lines + _table(("batch", "dtype", "provider", "layout", "ms/step (p20–p80)", "images/s",
                           "vs eager", "vs compile", "compile s", "peak GiB"), body)


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def write_plots(rows, out_dir, name: str) -> list[Path]:
    """PNG plots of ``rows``: speedup over eager per op and provider, the roofline scatter, and
    the training step. Returns the files written (none without matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return []

    out_dir = Path(out_dir)
    written = []
    ops = [r for r in rows if r["kernel"] not in ("ceiling", "train_step") and _ok(r)]
    speed = [r for r in ops if r.get("vs_eager") and r["provider"] != "eager"]
    if speed:
        mode = "fwd+bwd" if any(r["mode"] == "fwd+bwd" for r in speed) else speed[0]["mode"]
        speed = [r for r in speed if r["mode"] == mode]
        panels = sorted({(r["dtype"], r["layout"]) for r in speed})
        fig = Figure(figsize=(12, 3.2 * len(panels)), layout="constrained")
        for i, (dtype, layout) in enumerate(panels):
            ax = fig.add_subplot(len(panels), 1, i + 1)
            sel = [r for r in speed if (r["dtype"], r["layout"]) == (dtype, layout)]
            cases = list(dict.fromkeys(f"{r['kernel']}\n{r['shape']}" for r in sel))
            provs = [p for p in OP_PROVIDER_ORDER if any(r["provider"] == p for r in sel)]
            width = 0.8 / max(1, len(provs))
            for j, p in enumerate(provs):
                xs, ys = [], []
                for r in sel:
                    if r["provider"] == p:
                        xs.append(cases.index(f"{r['kernel']}\n{r['shape']}") + j * width - 0.4 + width / 2)
                        ys.append(r["vs_eager"])
                ax.bar(xs, ys, width, label=p)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_yscale("log")
            ax.set_xticks(range(len(cases)), cases, fontsize=7)
            ax.set_ylabel("speedup vs eager")
            ax.set_title(f"{mode}, {dtype}, {layout}")
            ax.legend(fontsize=7, ncols=len(provs))
        written.append(out_dir / f"{name}-speedup.png")
        fig.savefig(written[-1], dpi=110)

    ceilings = {(r["provider"], r["dtype"]): r for r in rows if r["kernel"] == "ceiling" and _ok(r)}
    points = [r for r in ops if r.get("flops") and r.get("min_bytes") and r.get("tflops")]
    if points:
        fig = Figure(figsize=(9, 6), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        markers = dict(zip(("conv2d_relu", "lrn", "max_pool2d", "lrn_max_pool2d"), "osD^"))
        colors = dict(zip(OP_PROVIDER_ORDER, ("C0", "C1", "C2", "C3", "C4", "C5", "C6")))
        intensity = [r["flops"] / r["min_bytes"] for r in points]
        lo, hi = min(intensity) / 2, max(intensity) * 2
        copy = ceilings.get(("copy", "fp32"))
        for (kind, dtype), c in ceilings.items():
            if kind == "matmul":
                ax.axhline(c["tflops"], linestyle="--", linewidth=0.8, color="gray")
                ax.annotate(f"{dtype} matmul {c['tflops']:.3g}", (lo, c["tflops"]), fontsize=7, va="bottom")
        if copy:
            ax.plot([lo, hi], [lo * copy["gbps"] / 1e3, hi * copy["gbps"] / 1e3], color="gray", linewidth=0.8)
        seen = set()
        for r, ai in zip(points, intensity):
            label = r["provider"] if r["provider"] not in seen else None
            seen.add(r["provider"])
            ax.scatter(ai, r["tflops"], s=14, marker=markers.get(r["op"], "o"),
                       color=colors.get(r["provider"], "k"), label=label, alpha=0.7)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("FLOP per minimum byte")
        ax.set_ylabel("TFLOP/s achieved")
        ax.set_title("Roofline (o conv+ReLU, s LRN, D max-pool, ^ LRN->max-pool); lines: measured ceilings")
        ax.legend(fontsize=8)
        written.append(out_dir / f"{name}-roofline.png")
        fig.savefig(written[-1], dpi=110)

    steps = [r for r in rows if r["kernel"] == "train_step" and _ok(r)]
    if steps:
        fig = Figure(figsize=(9, 0.3 * len(steps) + 1.5), layout="constrained")
        ax = fig.add_subplot(1, 1, 1)
        labels = [f"B{r['shape'].split('x')[0]} {r['dtype']} {r['provider']} {r['layout']}" for r in steps]
        ax.barh(range(len(steps)), [r["images_per_s"] for r in steps],
                color=[_step_color(r["provider"]) for r in steps])
        ax.set_yticks(range(len(steps)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("images/s (training step)")
        written.append(out_dir / f"{name}-train-step.png")
        fig.savefig(written[-1], dpi=110)
    return written


def _step_color(provider: str) -> str:
    order = ("eager", "compile", "auto", "auto+compile", "auto+cudagraph")
    return f"C{order.index(provider)}" if provider in order else "gray"


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
@dataclass
class BenchConfig:
    """What to run; None means the section's default (see bench_ops / bench_step)."""
    device: str
    quick: bool = False
    dtypes: tuple | None = None
    layouts: tuple | None = None
    modes: tuple | None = None
    batch: int | None = None
    image_size: int | None = None
    providers: tuple | None = None
    kernels: tuple | None = None  # per-op cases by kernel name (conv1, lrn, ...)


def _choices(allowed, what):
    def parse(text: str) -> tuple:
        items = tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip()))
        bad = [s for s in items if s not in allowed]
        if not items or bad:
            raise argparse.ArgumentTypeError(
                f"{what} must be a comma-separated list of {', '.join(allowed)}; got {text!r}")
        return items
    return parse


PROVIDERS = ("eager", "cudnn_fused", "cudnn_s2d", "compile", "native", "triton", "auto", "auto+compile", "auto+cudagraph")
MODES = ("fwd", "bwd", "fwd+bwd")


def add_commands(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark the ops and the training step against eager, cuDNN and torch.compile",
        description="Benchmark every op (per AlexNet layer) and the whole training step against eager "
                    "PyTorch, cuDNN's fused conv+ReLU and torch.compile, in one run, with the roofline. "
                    "Results are upserted into OUT/<gpu-or-cpu-name>.csv; plots and a markdown summary go next to it. "
                    "Without --ops or --train-step both run.")
    p.add_argument("--ops", action="store_true", help="per-op benchmarks (conv+ReLU per layer, LRN, max-pool, LRN->max-pool)")
    p.add_argument("--train-step", action="store_true", help="the whole training step of the seed AlexNet")
    p.add_argument("--quick", action="store_true",
                   help="fewer repetitions, modes and layouts, one dtype, no per-op torch.compile; "
                        "tiny shapes on the CPU")
    p.add_argument("--dtype", type=_choices(DTYPES, "--dtype"), help=f"comma-separated, from {', '.join(DTYPES)}")
    p.add_argument("--layout", type=_choices(LAYOUTS, "--layout"), help="nchw and/or nhwc (channels_last)")
    p.add_argument("--mode", type=_choices(MODES, "--mode"), help="per-op modes: fwd, bwd, fwd+bwd")
    p.add_argument("--batch-size", type=positive_int, help="batch size (default 128 for ops, 128 and 256 for the step)")
    p.add_argument("--image-size", type=positive_int, help="input height/width (default 224)")
    p.add_argument("--providers", type=_choices(PROVIDERS, "--providers"), help=f"comma-separated, from {', '.join(PROVIDERS)}")
    p.add_argument("--kernels", type=lambda text: tuple(dict.fromkeys(s.strip() for s in text.split(",") if s.strip())),
                   help="per-op cases to run, comma-separated (conv1..conv5, lrn, max_pool2d, lrn_max_pool2d; "
                        "default all)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda when available")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results directory (default {DEFAULT_OUT})")
    p.add_argument("--markdown", nargs="?", const="", metavar="CSV",
                   help="print the markdown tables of a results CSV (default: this device's CSV in OUT), "
                        "filtered by --dtype/--layout/--mode; alone, without --ops/--train-step, nothing "
                        "is run (e.g. --markdown benchmarks/results/nvidia-h200.csv on any machine)")
    p.add_argument("--merge", nargs="+", metavar="CSV",
                   help="upsert these results CSVs (e.g. of runs on several GPUs) into OUT/<name of the "
                        "first>.csv and write its markdown and plots; nothing is run")
    p.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    p.set_defaults(func=run_command)


def command_line(args) -> str:
    """The command, rebuilt from the parsed arguments (so it reads the same however it was called)."""
    parts = ["alexnet-fast", "bench"]
    for flag, value in (("--ops", args.ops), ("--train-step", args.train_step), ("--quick", args.quick)):
        if value:
            parts.append(flag)
    for flag, value in (("--dtype", args.dtype), ("--layout", args.layout), ("--mode", args.mode),
                        ("--providers", args.providers), ("--kernels", args.kernels)):
        if value:
            parts += [flag, ",".join(value)]
    for flag, value in (("--batch-size", args.batch_size), ("--image-size", args.image_size), ("--device", args.device)):
        if value:
            parts += [flag, str(value)]
    if Path(args.out) != DEFAULT_OUT:
        parts += ["--out", str(args.out)]
    return shlex.join(parts)


def write_reports(merged: list[dict], csv_path: Path, name: str, plots: bool = True) -> list[Path]:
    """The markdown summary (and plots) of the merged rows, next to their CSV; returns the paths."""
    md_path = csv_path.with_suffix(".md")
    md_path.write_text(markdown(merged))
    written = [csv_path, md_path]
    if plots:
        written += write_plots(merged, csv_path.parent, name)
    return written


def merge_command(args) -> int:
    """``--merge A.csv B.csv ...``: upsert result CSVs (e.g. of runs on several GPUs of one machine)
    into OUT/<name of the first>.csv, then write its markdown and plots."""
    paths = [Path(p) for p in args.merge]
    csv_path = Path(args.out) / paths[0].name
    try:  # every input is read (and so checked) before anything is written
        inputs = [load_rows(p) for p in paths if p.resolve() != csv_path.resolve()]
        if csv_path.exists():
            load_rows(csv_path)
    except ResultsError as e:
        print(f"error: --merge: {e}", file=sys.stderr)
        return 2
    if not _writable_folder(args.out):
        return 2
    merged = []
    for rows in inputs:
        merged = upsert_csv(csv_path, rows)
    if not merged:
        merged = load_rows(csv_path)
    written = write_reports(merged, csv_path, csv_path.stem, plots=not args.no_plots)
    print(f"merged {len(paths)} CSVs into {csv_path} ({len(merged)} rows); wrote {', '.join(str(p) for p in written)}")
    return 0


def _writable_folder(out) -> bool:
    """Create ``out`` if needed; False (with the error printed) when it cannot hold results."""
    from alexnet_fast.checkpoint import make_writable_folder

    problem = make_writable_folder(str(out))
    if problem:
        print(f"error: --out {out} {problem}", file=sys.stderr)
    return problem is None


def run_command(args) -> int:
    import torch

    if args.merge:
        if args.ops or args.train_step or args.markdown is not None:
            print("error: --merge runs nothing: give it alone, with --out (and --no-plots)", file=sys.stderr)
            return 2
        return merge_command(args)

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    env = environment(device, command_line(args))
    name = slug(env["gpu"])
    csv_path = Path(args.out) / f"{name}.csv"
    if args.markdown is not None and not (args.ops or args.train_step):
        path = Path(args.markdown) if args.markdown else csv_path
        if not path.exists():
            print(f"error: no results at {path}; run `alexnet-fast bench` first", file=sys.stderr)
            return 2
        try:
            rows = load_rows(path)
        except ResultsError as e:
            print(f"error: --markdown: {e}", file=sys.stderr)
            return 2
        print(markdown(rows, args.dtype, args.layout, args.mode))
        return 0

    from alexnet_fast import bench_ops, bench_step

    cfg = BenchConfig(device=device, quick=args.quick, dtypes=args.dtype, layouts=args.layout, modes=args.mode,
                      batch=args.batch_size, image_size=args.image_size, providers=args.providers,
                      kernels=args.kernels)
    run_ops = args.ops or not args.train_step
    run_step = args.train_step or not args.ops
    try:
        if run_ops:
            bench_ops.check_config(cfg)
        if run_step:
            bench_step.check_config(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not _writable_folder(args.out):
        return 2
    if csv_path.exists():  # results are merged into it after every row: it must be readable first
        try:
            load_rows(csv_path)
        except ResultsError as e:
            print(f"error: --out: {e}; move it away or choose another --out", file=sys.stderr)
            return 2
    print(f"alexnet-fast bench on {env['gpu']} (torch {env['torch']}, triton {env['triton'] or '-'}, "
          f"cuDNN {env['cudnn'] or '-'}, driver {env['driver'] or '-'}, commit {env['git_commit']})", flush=True)
    start = time.perf_counter()
    rows = []

    def save(new_rows):  # the CSV is brought up to date as rows come, so a stopped run loses nothing
        upsert_csv(csv_path, rows + new_rows)

    if run_ops:
        rows += bench_ops.run(cfg, env, save)
        print(f"-- ops done in {time.perf_counter() - start:.0f} s", flush=True)
    if run_step:
        t = time.perf_counter()
        rows += bench_step.run(cfg, env, save)
        print(f"-- training step done in {time.perf_counter() - t:.0f} s", flush=True)
    merged = upsert_csv(csv_path, rows)
    written = write_reports(merged, csv_path, name, plots=not args.no_plots)
    print()
    # --markdown with a run: the whole merged table (this device's CSV); without: this run's rows
    print(markdown(merged, args.dtype, args.layout, args.mode) if args.markdown is not None else markdown(rows))
    print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - start:.0f} s")
    problems = [r for r in rows if r.get("status") in PROBLEM_STATUSES]
    if problems:
        print(f"{len(problems)} rows failed or mismatched eager; see the status and note columns")
    return 1 if problems else 0
