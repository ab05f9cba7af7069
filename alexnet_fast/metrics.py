"""Top-k accuracy, the per-epoch metric log (CSV and JSON lines) and the training-curves plot."""

from __future__ import annotations

import csv
import io
import json
import os

import torch

TOPK = (1, 3, 5)
# Columns of metrics.csv, in order; a history row is a dict with these keys.
COLUMNS = (
    "epoch",
    "lr",
    "train_loss",
    "train_acc1",
    "train_acc3",
    "train_acc5",
    "train_images",
    "test_loss",
    "test_acc1",
    "test_acc3",
    "test_acc5",
    "test_images",
    "images_per_s",
    "ms_per_step",
    "epoch_s",
)


@torch.no_grad()
def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks=TOPK) -> torch.Tensor:
    """How many rows of ``logits`` have their target among the top-k scores, for each k in
    ``ks``, as a float64 tensor on the logits' device (no host synchronization). k larger than
    the number of classes counts every row."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"logits must be (N, C) and targets (N,), got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    maxk = min(max(ks), logits.shape[1])
    top = logits.topk(maxk, dim=1).indices
    hit = (top == targets.view(-1, 1)).to(torch.float64)
    cum = hit.cumsum(1).sum(0)
    return torch.stack([cum[min(k, maxk) - 1] for k in ks])


def topk_accuracies(logits: torch.Tensor, targets: torch.Tensor, ks=TOPK) -> dict:
    """``{"acc1": %, "acc3": %, ...}``: top-k accuracy in percent for each k in ``ks``."""
    counts = topk_correct(logits, targets, ks).tolist()
    n = max(targets.shape[0], 1)
    return {f"acc{k}": 100.0 * c / n for k, c in zip(ks, counts)}


class MetricsLog:
    """``metrics.csv`` and ``metrics.jsonl`` in ``out_dir``, one row per epoch.

    ``start(history)`` rewrites both files, atomically, with the rows of ``history`` (empty for a
    new run, the checkpoint's rows when resuming, so rows of a longer interrupted run never
    linger), and ``append(row)`` adds one epoch."""

    def __init__(self, out_dir: str):
        self.csv_path = os.path.join(out_dir, "metrics.csv")
        self.jsonl_path = os.path.join(out_dir, "metrics.jsonl")

    def start(self, history: list[dict]) -> None:
        from alexnet_fast.checkpoint import write_atomic

        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, COLUMNS)
        writer.writeheader()
        writer.writerows(history)
        write_atomic(self.csv_path, lambda f: f.write(text.getvalue().encode()))
        write_atomic(self.jsonl_path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in history).encode()))

    def append(self, row: dict) -> None:
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow(row)
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics_csv(path: str) -> list[dict]:
    """The rows of a ``metrics.csv``, numbers as floats (``epoch`` as int)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in rows]


def plot_curves(history: list[dict], path: str | None = None):
    """Loss and top-1/top-5 accuracy per epoch, train and test, as a matplotlib Figure (saved as
    a PNG to ``path`` when given)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    marker = "o" if len(history) < 30 else None
    for split, style in (("train", "-"), ("test", "--")):
        ax_loss.plot(epochs, [row[f"{split}_loss"] for row in history], style, marker=marker, label=split)
        for k, color in ((1, "C0"), (5, "C2")):
            ax_acc.plot(
                epochs,
                [row[f"{split}_acc{k}"] for row in history],
                style,
                color=color,
                marker=marker,
                label=f"{split} top-{k}",
            )
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy", ylim=(0, 100))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
        if epochs:
            ax.set_xlim(min(epochs) - 0.5, max(epochs) + 0.5)
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
