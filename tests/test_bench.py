"""The benchmark code on the CPU: roofline formulas, timing statistics, the results CSV upserted by
key, ratios, markdown, the sanity check against eager, and the `bench` command on tiny shapes."""
import csv
import random

import pytest
import torch

from alexnet_fast import bench, bench_ops, bench_step, cli, roofline
from alexnet_fast.model import ALEXNET_CONVS, layer_shapes, min_input_size

TINY = min_input_size()


# ---------------------------------------------------------------------------------------------
# roofline
# ---------------------------------------------------------------------------------------------
def test_conv_work_counts_gemm_passes_and_bytes():
    n, c_in, h, w, c_out, k, s, p = 128, 96, 26, 26, 256, 5, 1, 2
    work = roofline.conv_work((n, c_in, h, w), c_out, k, s, p, "bf16")
    ho = wo = 26
    gemm = 2 * n * c_out * ho * wo * c_in * k * k
    x, wt, y = n * c_in * h * w, c_out * c_in * k * k, n * c_out * ho * wo
    assert work["fwd"] == roofline.Work(2 * (x + wt + c_out + y), gemm)
    # backward: g, out (ReLU mask), x, w read; gx, gw, gb written; dgrad and wgrad GEMMs
    assert work["bwd"] == roofline.Work(2 * (2 * y + 2 * x + 2 * wt + c_out), 2 * gemm)
    assert work["fwd+bwd"] == work["fwd"] + work["bwd"]


def test_first_conv_has_no_input_gradient():
    spec = ALEXNET_CONVS[0]
    shape = (128, 3, 224, 224)
    with_dgrad = roofline.conv_work(shape, spec.c_out, spec.kernel, spec.stride, spec.padding, "fp32")
    without = roofline.conv_work(shape, spec.c_out, spec.kernel, spec.stride, spec.padding, "fp32", input_grad=False)
    assert without["bwd"].flops * 2 == with_dgrad["bwd"].flops
    assert without["bwd"].bytes < with_dgrad["bwd"].bytes
    assert without["fwd"] == with_dgrad["fwd"]
    case = next(c for c in bench_ops.op_cases(128, 224) if c.kernel == spec.name)
    assert not case.input_grad and case.work("fp32")["bwd"] == without["bwd"]


def test_memory_bound_op_bytes():
    shape = (128, 96, 54, 54)
    x = 128 * 96 * 54 * 54
    y = 128 * 96 * 26 * 26
    lrn = roofline.lrn_work(shape, 5, "bf16")
    assert lrn["fwd"].bytes == 2 * 2 * x and lrn["bwd"].bytes == 3 * 2 * x
    pool = roofline.max_pool_work(shape, 3, 2, "fp32")
    assert pool["fwd"] == roofline.Work(4 * (x + y), 8 * y)
    # training forward writes the uint8 offsets, backward reads them
    assert pool["fwd+bwd"].bytes == 4 * (x + y) + y + 4 * (y + x) + y
    fused = roofline.lrn_max_pool_work(shape, 5, 3, 2, "bf16")
    separate = roofline.lrn_work(shape, 5, "bf16")["fwd"].bytes + roofline.max_pool_work(shape, 3, 2, "bf16")["fwd"].bytes
    assert fused["fwd"].bytes == 2 * (x + y) < separate


def test_roofline_fractions():
    work = roofline.Work(bytes=4 * 10**9, flops=10**12)  # 1 ms at 4000 GB/s; 2 ms at 500 TFLOP/s
    r = roofline.roofline(work, ms=4.0, copy_gbps=4000, peak_tflops=500)
    assert r["gbps"] == pytest.approx(1000) and r["tflops"] == pytest.approx(250)
    assert r["frac_bw"] == pytest.approx(0.25) and r["frac_compute"] == pytest.approx(0.5)
    assert r["floor_ms"] == pytest.approx(2.0) and r["frac_roofline"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="ms must be positive"):
        roofline.roofline(work, ms=0, copy_gbps=4000, peak_tflops=500)


def test_compute_ceiling_per_op_and_dtype():
    assert roofline.compute_ceiling_dtype("conv2d_relu", "fp16") == "bf16"
    assert roofline.compute_ceiling_dtype("conv2d_relu", "tf32") == "tf32"
    assert roofline.compute_ceiling_dtype("lrn", "bf16") == "fp32"


# ---------------------------------------------------------------------------------------------
# cases come from the model's one layer table
# ---------------------------------------------------------------------------------------------
def test_op_cases_follow_the_layer_table():
    cases = bench_ops.op_cases(128, 224)
    table = layer_shapes(128, 224)
    convs = [(c.conv, c.shape) for c in cases if c.conv is not None]
    assert convs == [(spec, shape) for spec, shape in table if not isinstance(spec, str)]
    pooled = {shape for entry, shape in table if entry == "lrn_max_pool2d"}
    for op in ("lrn", "lrn_max_pool2d"):
        assert {c.shape for c in cases if c.op == op} == pooled
    assert len([c for c in cases if c.op == "max_pool2d"]) == 3
    assert [d for c in cases if c.op == "lrn" for d in c.dtypes(bench.DTYPES)].count("tf32") == 0


def test_too_small_image_size_is_rejected():
    cfg = bench.BenchConfig(device="cpu", image_size=TINY - 1)
    with pytest.raises(ValueError, match=f"at least {TINY}"):
        bench_ops.check_config(cfg)
    bench_ops.check_config(bench.BenchConfig(device="cpu", image_size=TINY))


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def test_quantile_matches_torch():
    values = [random.Random(i).uniform(0, 10) for i in range(37)]
    for q in (0.2, 0.5, 0.8):
        assert bench._quantile(values, q) == pytest.approx(torch.quantile(torch.tensor(values, dtype=torch.float64), q).item())


def test_cpu_timing_orders_percentiles():
    calls = []
    t = bench.time_fn(lambda: calls.append(sum(range(2000))), "cpu", warmup_ms=1, rep_ms=5)
    assert 0 < t.p20 <= t.ms <= t.p80
    assert len(calls) >= 6 and "perf_counter" in t.method


# ---------------------------------------------------------------------------------------------
# results CSV, ratios, markdown
# ---------------------------------------------------------------------------------------------
ENV = {"device": "cpu", "gpu": "Test GPU", "torch": "2.x", "git_commit": "abc", "timestamp": "t0", "command": "c"}


def _op_row(provider, ms, kernel="lrn", mode="fwd", status="ok", **kw):
    return bench.make_row(ENV, kernel=kernel, provider=provider, mode=mode, shape="2x96x30x30", dtype="fp32",
                          layout="nchw", op=kernel, status=status, ms=ms, ms_p20=ms, ms_p80=ms, **kw)


def test_upsert_replaces_rows_by_key_and_keeps_the_rest(tmp_path):
    path = tmp_path / "r" / "test-gpu.csv"
    big = 123456789012345  # byte counts survive being read back as floats and written again
    bench.upsert_csv(path, [_op_row("eager", 2.0, min_bytes=big), _op_row("native", 1.0),
                            _op_row("native", 3.0, mode="bwd")])
    with open(path, newline="") as f:
        lines = list(csv.DictReader(f))
    lines[0]["extra_column"] = "kept"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(lines[0]))
        writer.writeheader()
        writer.writerows(lines)
    merged = bench.upsert_csv(path, [_op_row("native", 0.5), _op_row("triton", 0.25)])
    rows = bench.load_rows(path)
    assert [(r["provider"], r["mode"]) for r in rows] == [("eager", "fwd"), ("native", "fwd"), ("native", "bwd"),
                                                          ("triton", "fwd")]
    assert [r["ms"] for r in rows] == [2.0, 0.5, 3.0, 0.25]
    assert rows[0]["extra_column"] == "kept" and rows[0]["gpu"] == "Test GPU" and rows[0]["min_bytes"] == big
    by = {(r["provider"], r["mode"]): r for r in rows}
    assert by[("native", "fwd")]["vs_eager"] == pytest.approx(4.0)
    assert by[("triton", "fwd")]["vs_eager"] == pytest.approx(8.0)
    assert by[("native", "bwd")]["vs_eager"] is None  # no eager bwd row to compare with
    assert len(merged) == 4


def test_step_ratios_use_eager_nchw_and_compile():
    def step(provider, layout, ms):
        return bench.make_row(ENV, kernel="train_step", provider=provider, mode="train", shape="128x3x224x224",
                              dtype="bf16", layout=layout, status="ok", ms=ms)
    rows = [step("eager", "nchw", 12.0), step("eager", "nhwc", 14.0), step("compile", "nhwc", 6.0),
            step("auto+cudagraph", "nchw", 3.0)]
    bench.recompute_ratios(rows)
    assert rows[1]["vs_eager"] == pytest.approx(12 / 14)
    assert rows[3]["vs_eager"] == pytest.approx(4.0) and rows[3]["vs_compile"] == pytest.approx(2.0)


def test_markdown_shows_providers_roofline_and_skips():
    rows = [_op_row("eager", 2.0, frac_roofline=0.1, floor_ms=0.2), _op_row("native", 1.0, frac_roofline=0.2),
            _op_row("triton", None, status="skipped", note="no triton here")]
    bench.recompute_ratios(rows)
    text = bench.markdown(rows)
    header = next(line for line in text.splitlines() if line.startswith("| op |"))
    assert "eager" in header and "native" in header and "triton" not in header  # only measured providers
    assert "| 2.000 (10%) | 1.000 (20%) | 2.00 |" in text
    assert "skipped triton (1 rows): no triton here" in text
    assert bench.markdown([]) == "No results.\n"


# ---------------------------------------------------------------------------------------------
# per-op runs: sanity check against eager, providers that fail are reported
# ---------------------------------------------------------------------------------------------
def _cfg(**kw):
    return bench.BenchConfig(device="cpu", quick=True, batch=1, image_size=TINY, **kw)


def test_op_bench_modes_rotate_and_match_eager():
    case = next(c for c in bench_ops.op_cases(1, TINY) if c.kernel == "conv2")
    ob = bench_ops.OpBench(case, "fp32", "nhwc", "cpu")
    assert ob.sets[0][0].is_contiguous(memory_format=torch.channels_last)
    assert all(bool(t.ne(0).any()) for t in ob.sets[0])  # random data, never zeros
    for mode in roofline.MODES:
        prepared = ob.prepare("eager", mode)
        assert prepared.check["rel_err"] == 0.0
        prepared.plain()()


def test_wrong_or_failing_provider_is_flagged_not_fatal(monkeypatch):
    real = bench_ops.provider_fn

    def fake(case, provider, device):
        fn = real(case, "eager", device)
        if provider == "native":
            return lambda *args: fn(*args) * 1.5
        if provider == "triton":
            raise NotImplementedError("no kernel for this layout")
        if provider == "auto":
            def broken(*args):
                raise RuntimeError("kernel crashed")
            return broken
        return fn

    monkeypatch.setattr(bench_ops, "provider_fn", fake)
    rows = bench_ops.run(_cfg(providers=("eager", "native", "triton", "auto"), modes=("fwd",)), ENV)
    ops = [r for r in rows if r["kernel"] != "ceiling"]
    status = {(r["provider"]): r["status"] for r in ops}
    assert status == {"eager": "ok", "native": "mismatch", "triton": "skipped", "auto": "failed"}
    native = next(r for r in ops if r["provider"] == "native")
    assert native["rel_err"] == pytest.approx(0.5, rel=1e-3) and "differs from eager" in native["note"]
    assert next(r for r in ops if r["provider"] == "auto")["note"] == "RuntimeError: kernel crashed"
    assert {r["provider"] for r in rows if r["kernel"] == "ceiling"} == {"copy", "matmul"}


def test_beyond_the_bound_the_float64_result_decides(monkeypatch):
    """Two results on either side of float64, each as close to it as the other, can differ by more
    than the bound (reduced precision flips ReLU masks); the row is then ok, and a result much
    further from float64 than eager is still flagged. Eager and `native` are scaled off the true
    result by relative amounts, in every dtype but the float64 reference's."""
    real = bench_ops.provider_fn
    scale = {"eager": 1.008, "native": 0.992, "triton": 0.95}

    def fake(case, provider, device):
        fn = real(case, "eager", device)
        s = scale[provider]
        return lambda *args: fn(*args) * (1.0 if args[0].dtype == torch.float64 else s)

    monkeypatch.setattr(bench_ops, "provider_fn", fake)
    case = next(c for c in bench_ops.op_cases(1, TINY) if c.kernel == "lrn")
    ob = bench_ops.OpBench(case, "fp32", "nchw", "cpu")
    for mode in ("fwd", "fwd+bwd"):
        near = ob.prepare("native", mode).check
        assert near["rel_err"] == pytest.approx(0.016 / 1.008, rel=1e-3)  # beyond the bound (0.01)
        assert near["status"] == "ok", near
        assert "from float64 by 0.008, eager by 0.008 (within 2x eager's)" in near["note"]
        far = ob.prepare("triton", mode).check
        assert far["status"] == "mismatch", far
        assert "from float64 by 0.05, eager by 0.008 (beyond 2x eager's)" in far["note"]
    assert ob.prepare("eager", "fwd+bwd").check == {"status": "ok", "note": "", "rel_err": 0.0}
    assert bench.sanity(0.5, "bf16") == {"status": "mismatch", "note": "differs from eager by 0.5 (bound 0.05)",
                                         "rel_err": 0.5}


def test_train_step_arguments():
    with pytest.raises(bench.Skipped, match="CUDA"):
        bench_step.prepare_step("auto+cudagraph", "nchw", 2, "fp32", TINY, "cpu")
    with pytest.raises(ValueError, match="dtype must be one of"):
        bench_step.prepare_step("eager", "nchw", 2, "fp16", TINY, "cpu")


def test_step_rows_are_checked_against_eager(monkeypatch):
    """A provider whose model computes other logits than eager's is flagged, not timed as if it
    were right: here auto's fused LRN->max-pool loses its LRN."""
    from alexnet_fast import model as model_module

    real = model_module.ops.lrn_max_pool2d

    def without_lrn(x, size, alpha, beta, k, kernel_size, stride, backend=None):
        if backend == "torch":
            return real(x, size, alpha, beta, k, kernel_size, stride, backend=backend)
        return model_module.ops.max_pool2d(x, kernel_size, stride, backend=backend)

    cfg = bench.BenchConfig(device="cpu", quick=True, batch=1, image_size=TINY, providers=("eager", "auto"),
                            layouts=("nchw",))
    rows = bench_step.run(cfg, ENV)
    assert [(r["provider"], r["status"]) for r in rows] == [("eager", "ok"), ("auto", "ok")]
    assert rows[0]["rel_err"] == 0 and rows[1]["rel_err"] < bench.SANITY_TOL["fp32"]
    monkeypatch.setattr(model_module.ops, "lrn_max_pool2d", without_lrn)
    rows = bench_step.run(cfg, ENV)
    assert [(r["provider"], r["status"]) for r in rows] == [("eager", "ok"), ("auto", "mismatch")]
    assert "differs from eager" in rows[1]["note"]
    rows = bench_step.run(bench.BenchConfig(device="cpu", quick=True, batch=1, image_size=TINY,
                                            providers=("auto",), layouts=("nchw",)), ENV)
    assert rows[0]["status"] == "ok" and rows[0]["note"] == "not compared: no eager row in this run"


# ---------------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------------
def test_bench_command_quick_on_cpu(tmp_path, capsys):
    common = ["bench", "--quick", "--device", "cpu", "--batch-size", "1", "--image-size", str(TINY),
              "--out", str(tmp_path)]
    assert cli.main(common + ["--ops", "--providers", "eager,cudnn_fused,cudnn_s2d,auto", "--mode", "fwd", "--no-plots"]) == 0
    assert "Per op" in capsys.readouterr().out
    assert cli.main(common + ["--train-step", "--providers", "eager,auto+cudagraph"]) == 0
    assert "Training step" in capsys.readouterr().out
    path = next(tmp_path.glob("cpu-*.csv"))
    rows = bench.load_rows(path)
    ok = [r for r in rows if r["status"] == "ok"]
    assert {r["kernel"] for r in ok} >= {"ceiling", "conv1", "lrn", "max_pool2d", "lrn_max_pool2d", "train_step"}
    assert all(r["ms"] > 0 and r["timestamp"] and r["torch"] == torch.__version__ and r["git_commit"]
               and r["command"].startswith("alexnet-fast bench ") and "--quick" in r["command"] for r in ok)
    assert all(r["frac_roofline"] > 0 and r["min_bytes"] > 0 for r in ok if r["kernel"] not in ("ceiling", "train_step"))
    assert all(r["vs_eager"] > 0 for r in ok if r["provider"] == "auto")
    skipped = {r["provider"]: r["note"] for r in rows if r["status"] == "skipped"}
    assert all("CUDA" in skipped[p] for p in ("cudnn_fused", "cudnn_s2d", "auto+cudagraph"))
    # plots come from the merged results of both runs
    assert {p.name.split("-")[-1] for p in tmp_path.glob("*.png")} == {"speedup.png", "roofline.png", "step.png"}
    assert path.with_suffix(".md").read_text().count("| op | input |") == 1

    # a rerun of part of it replaces its rows and keeps the others
    before = {bench.row_key(r): r["timestamp"] for r in rows}
    assert cli.main(common + ["--ops", "--no-plots", "--providers", "eager", "--mode", "fwd"]) == 0
    after = bench.load_rows(path)
    assert [bench.row_key(r) for r in after] == list(before)
    capsys.readouterr()
    assert cli.main(["bench", "--markdown", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "| op | input |" in capsys.readouterr().out


def test_bench_command_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--dtype", "fp8"])
    assert "--dtype must be a comma-separated list of fp32, tf32, bf16, fp16" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["bench", "--providers", "eager,cublas"])
    assert cli.main(["bench", "--device", "cpu", "--image-size", "16", "--out", str(tmp_path)]) == 2
    assert f"at least {TINY}" in capsys.readouterr().err
    assert cli.main(["bench", "--markdown", "--device", "cpu", "--out", str(tmp_path / "none")]) == 2
    capsys.readouterr()
    assert cli.main(["bench", "--ops", "--device", "cpu", "--kernels", "lrn,conv9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--kernels must be a comma-separated list of conv1, " in err and err.count(" lrn,") == 1
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert cli.main(["bench", "--quick", "--device", "cpu", "--out", str(afile / "sub")]) == 2
    assert "--out" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"a,b\n1,2\n", None])
def test_unreadable_results_are_refused_before_anything_is_written(tmp_path, capsys, content):
    """--markdown, --merge and a run into an --out whose CSV is damaged: one line, nothing written."""
    bad = tmp_path / "bad.csv"
    if content is None:  # a results CSV whose numbers are not numbers
        bench.upsert_csv(bad, [_op_row("eager", 1.0)])
        bad.write_text(bad.read_text().replace(",ok,1,", ",ok,one,", 1))
    else:
        bad.write_bytes(content)
    assert cli.main(["bench", "--markdown", str(bad)]) == 2
    assert f"{bad}" in capsys.readouterr().err
    out = tmp_path / "merged"
    assert cli.main(["bench", "--merge", str(bad), "--out", str(out)]) == 2
    assert "--merge" in capsys.readouterr().err and not out.exists()
    assert cli.main(["bench", "--markdown", str(tmp_path)]) == 2
    assert "folder" in capsys.readouterr().err


def test_bench_kernels_selects_the_op_cases(tmp_path):
    args = ["bench", "--quick", "--device", "cpu", "--batch-size", "1", "--image-size", str(TINY), "--no-plots",
            "--ops", "--mode", "fwd", "--providers", "eager", "--kernels", "lrn,conv1", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    rows = bench.load_rows(next(tmp_path.glob("cpu-*.csv")))
    assert {r["kernel"] for r in rows} == {"ceiling", "conv1", "lrn"}
    assert all("--kernels lrn,conv1" in r["command"] for r in rows)


def test_merge_results_of_several_runs(tmp_path, capsys):
    """Runs on several GPUs write separate CSVs; --merge upserts them into one, with its reports."""
    common = ["bench", "--quick", "--device", "cpu", "--batch-size", "1", "--image-size", str(TINY), "--no-plots",
              "--ops", "--mode", "fwd"]
    assert cli.main(common + ["--providers", "eager", "--out", str(tmp_path / "a")]) == 0
    assert cli.main(common + ["--providers", "native", "--out", str(tmp_path / "b")]) == 0
    a, b = next((tmp_path / "a").glob("cpu-*.csv")), next((tmp_path / "b").glob("cpu-*.csv"))
    capsys.readouterr()
    out = tmp_path / "all"
    assert cli.main(["bench", "--merge", str(a), str(b), "--out", str(out), "--no-plots"]) == 0
    merged = bench.load_rows(out / a.name)
    keys = {bench.row_key(r) for r in bench.load_rows(a)} | {bench.row_key(r) for r in bench.load_rows(b)}
    assert {bench.row_key(r) for r in merged} == keys
    assert {r["provider"] for r in merged if r["kernel"] == "lrn"} == {"eager", "native"}
    assert (out / a.name).with_suffix(".md").exists()
    assert cli.main(["bench", "--merge", str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    assert "no results CSV" in capsys.readouterr().err
    assert cli.main(["bench", "--merge", str(a), "--ops", "--out", str(out)]) == 2


def test_op_rows_are_saved_as_they_come(tmp_path, monkeypatch):
    """A run stopped part-way (a time limit) keeps the rows measured so far in its CSV."""
    from alexnet_fast import bench_ops

    calls = []
    real_measure = bench_ops._measure

    def measure_then_stop(*args, **kwargs):
        if len(calls) >= 2:
            raise KeyboardInterrupt  # stands in for the run being killed
        row = real_measure(*args, **kwargs)
        calls.append(row["kernel"])
        return row

    monkeypatch.setattr(bench_ops, "_measure", measure_then_stop)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["bench", "--quick", "--device", "cpu", "--batch-size", "1", "--image-size", str(TINY), "--no-plots",
                  "--ops", "--mode", "fwd", "--providers", "eager", "--out", str(tmp_path)])
    rows = bench.load_rows(next(tmp_path.glob("cpu-*.csv")))
    assert len(calls) == 2 and {r["kernel"] for r in rows if r["provider"] == "eager"} == set(calls)
