"""scripts/gpu.sh (``make bench-gpu``) deals its jobs to the GPUs: run here with a stand-in for
Python that reports GPUs and records each command with the GPU it was given."""
import os
import stat
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVS = "conv1,conv2,conv3,conv4,conv5"
POOLS = "lrn,max_pool2d,lrn_max_pool2d"


def _run(tmp_path, gpus: int, stages: str, **env_vars) -> list[tuple[str, str]]:
    """(GPU, command) of every call gpu.sh made, in order."""
    calls = tmp_path / "calls.log"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'case "$*" in *device_count*) echo {gpus} ;; *import\\ xdist*) exit 1 ;;\n'
        f'  *) echo "$CUDA_VISIBLE_DEVICES|$*" >> {calls}; sleep 0.3 ;; esac\n'  # a job takes time
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PY": str(fake), "RESULTS_DIR": str(tmp_path / "results"), **env_vars}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu.sh"), *stages.split()], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert not (tmp_path / "results" / ".jobs").exists(), "the job queue is left behind"
    return [tuple(line.split("|", 1)) for line in calls.read_text().splitlines()]


def _ops_jobs(calls):
    jobs = []
    for gpu, cmd in calls:
        if "bench --ops" in cmd:
            words = cmd.split()
            dtype = words[words.index("--dtype") + 1]
            kernels = words[words.index("--kernels") + 1] if "--kernels" in words else ""
            jobs.append((dtype, kernels))
    return jobs


def test_two_gpus_share_the_jobs(tmp_path):
    calls = _run(tmp_path, 2, "test step ops train")
    assert {gpu for gpu, _ in calls} == {"0", "1"}
    expected = {(d, CONVS) for d in ("bf16", "fp32", "tf32", "fp16")} | {(d, POOLS) for d in ("bf16", "fp32", "fp16")}
    jobs = _ops_jobs(calls)
    assert sorted(jobs) == sorted(expected)  # each once; TF32 only for the convolutions
    assert sum("-m pytest tests -k cuda" in cmd for _, cmd in calls) == 1
    assert sum("bench --train-step" in cmd for _, cmd in calls) == 1
    assert sum("cli train" in cmd and "--cuda-graph" in cmd for _, cmd in calls) == 1


def test_one_gpu_runs_one_ops_job(tmp_path):
    calls = _run(tmp_path, 1, "ops step")
    assert {gpu for gpu, _ in calls} == {"0"}
    assert _ops_jobs(calls) == [("bf16,fp32,tf32,fp16", "")]


def test_core_scope_is_the_one_gpu_call(tmp_path):
    """SCOPE=core: by default build, tests, sanitizers, the step at B=128 in three dtypes and the
    pooling ops in bf16 and fp32; an explicit setting still overrides it."""
    calls = _run(tmp_path, 1, "", SCOPE="core")
    cmds = [cmd for _, cmd in calls]
    assert any("pip install" in c for c in cmds) and any("-m pytest tests -k cuda" in c for c in cmds)
    step = next(c for c in cmds if "bench --train-step" in c)
    assert "--batch-size 128 --dtype bf16,tf32,fp32" in step
    assert _ops_jobs(calls) == [("bf16,fp32", "lrn,max_pool2d,lrn_max_pool2d")]
    assert not any("cli train" in c for c in cmds)
    (tmp_path / "again").mkdir()
    calls = _run(tmp_path / "again", 1, "ops", SCOPE="core", BENCH_DTYPES="fp16")
    assert _ops_jobs(calls) == [("fp16", "lrn,max_pool2d,lrn_max_pool2d")]


def test_unknown_scope_is_refused(tmp_path):
    env = {**os.environ, "SCOPE": "everything", "RESULTS_DIR": str(tmp_path / "results")}
    run = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu.sh")], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and "SCOPE must be full or core" in run.stderr
