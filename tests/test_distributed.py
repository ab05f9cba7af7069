"""Multi-process training through torchrun: two CPU processes with the gloo backend."""

import os
import subprocess
import sys

import pytest
import torch

from alexnet_fast import checkpoint
from alexnet_fast.metrics import read_metrics_csv
from alexnet_fast.train import evaluate_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_processes_on_the_cpu(tmp_path):
    """Two processes train, log once and checkpoint both RNG streams; a refused --out stops both."""
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "alexnet_fast.train",
        "--device",
        "cpu",
        "--backend",
        "torch",
        "--data",
        "synthetic",
        "--limit",
        "18",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--input-size",
        "72",
        "--out",
        str(out),
        "--no-progress",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("epoch   1/1") == 1  # only rank 0 logs

    (row,) = read_metrics_csv(str(out / "metrics.csv"))
    # 18 training images: 9 per rank, 3 steps of at most 4 each; metrics summed over both ranks
    assert row["train_images"] == 18 and row["test_images"] == 18
    ckpt = checkpoint.load_training_checkpoint(str(out / "last.pt"))
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["cpu"], ckpt["rng"][1]["cpu"])  # separate dropout streams

    # The same command again: rank 0 refuses the folder that now holds a run, and every process
    # stops with an error instead of waiting for rank 0 in its first collective.
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert again.returncode != 0
    assert "already holds a training run" in again.stderr, again.stderr[-3000:]
    assert "process 1 stops: rank 0 could not use --out" in again.stderr, again.stderr[-3000:]
    assert all(not k.startswith("module.") for k in ckpt["model"])
    assert sorted(os.listdir(out / "checkpoints")) == ["epoch_001.pt"]

    # The all-reduced test metrics equal one process evaluating the saved weights on all 18 images.
    single = evaluate_checkpoint(str(out / "last.pt"), device="cpu", backend="torch")
    assert single["images"] == 18
    assert single["loss"] == pytest.approx(row["test_loss"], rel=1e-5)
    assert single["acc1"] == pytest.approx(row["test_acc1"]) and single["acc5"] == pytest.approx(
        row["test_acc5"]
    )
