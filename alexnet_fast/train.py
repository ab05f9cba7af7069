"""Training and evaluation: the seed's loop functions, :func:`fit` (``alexnet-fast train``),
``alexnet-fast eval``, and multi-GPU training through torchrun.

``fit`` trains with the data on the device (:class:`alexnet_fast.data.DeviceLoader`), SGD with a
fused (CUDA) or foreach (CPU) step, ReduceLROnPlateau on test top-1, and writes per-epoch metrics,
a curves plot and checkpoints. Under ``torchrun --nproc_per_node=N -m alexnet_fast.train ...`` it
trains with DistributedDataParallel: each process holds its shard of the data on its GPU, uses
``--batch-size`` images per step, metrics are all-reduced, and only rank 0 writes files.

Reproducibility: with a fixed seed a run on the CPU is bit-for-bit repeatable, and a run stopped
after epoch k and resumed from its checkpoint ends with the same weights as an uninterrupted run.
On the GPU, cuDNN's algorithm choice (``cudnn.benchmark``) and atomic adds in some backward
kernels make runs differ in the last bits, so a resumed GPU run matches an uninterrupted one up
to that nondeterminism only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from alexnet_fast.cli import positive_int
from alexnet_fast.metrics import COLUMNS, TOPK, topk_accuracies, topk_correct
from alexnet_fast.step import autocast, train_step

__all__ = [
    "TrainConfig",
    "TrainResult",
    "RECIPES",
    "fit",
    "train_epoch_classification",
    "evaluate_classification",
    "evaluate_checkpoint",
    "data_settings",
    "topk_accuracies",
    "topk_correct",
    "ConfigError",
    "main",
]

AMP_CHOICES = ("off", "bf16", "fp16")
_AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# The seed's scheduler: ReduceLROnPlateau on test top-1.
PLATEAU = dict(mode="max", factor=0.1, patience=5)
# Steps at the start of every epoch left out of images/s and ms/step (compilation, cuDNN autotuning).
TIMING_WARMUP = 3
# Steps between progress-bar updates, the only host synchronizations inside an epoch.
LOG_EVERY = 25
# Eager steps before a --cuda-graph run captures its step: the capture falls on the last step that
# the epoch's timing leaves out.
GRAPH_WARMUP = TIMING_WARMUP - 1


class ConfigError(ValueError):
    """A training setting that cannot work (the message names it and says what is expected)."""


@dataclass
class TrainConfig:
    """Everything that defines a run; every checkpoint stores it. Defaults are the seed's recipe:
    SGD lr 1e-3, momentum 0.9, weight decay 5e-4, batch 64, 120 epochs, 224x224 inputs."""

    data: str = "synthetic"
    data_dir: str = "./data"
    limit: int | None = None  # at most this many training and test images
    data_seed: int = 0  # the synthetic dataset's seed
    input_size: int = 224
    epochs: int = 120
    batch_size: int = 64  # per process
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 5e-4
    backend: str = "auto"
    compile: bool = False
    amp: str = "off"
    channels_last: bool = False
    seed: int = 0
    device: str | None = None  # None: this process's GPU when there is one, else the CPU
    out: str | None = None  # None: write no files
    keep_checkpoints: int = 3  # epoch_NNN.pt files kept (the newest); 0 keeps all
    progress: bool = True
    cuda_graph: bool = False  # replay the training step from a CUDA graph (alexnet_fast.step)


# Presets applied under explicit flags. "fast" is for a GPU: 4x the seed's batch with the
# learning rate scaled linearly, bf16 autocast, channels_last activations.
RECIPES = {
    "seed": {},
    "fast": {"batch_size": 256, "lr": 4e-3, "amp": "bf16", "channels_last": True},
}
# What a resumed run may change; anything else must match the checkpoint's config.
RESUME_MUTABLE = ("epochs", "out", "backend", "compile", "device", "keep_checkpoints", "progress", "data_dir",
                  "cuda_graph")
# Settings added after the checkpoint format was fixed: a checkpoint without them ran with their
# defaults.
ADDED_SETTINGS = ("cuda_graph",)


@dataclass
class TrainResult:
    model: nn.Module  # the trained AlexNet (unwrapped), on the training device
    history: list  # one dict per epoch, keys metrics.COLUMNS
    step_losses: list  # this process's training loss at every step of the run (resumed: since the resume)
    config: TrainConfig
    out: str | None


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def amp_dtype(amp) -> torch.dtype | None:
    """The autocast dtype for ``amp``: "off"/False, "bf16"/True, "fp16"."""
    if amp is False or amp is None:
        return None
    if amp is True:
        return torch.bfloat16
    if amp not in _AMP_DTYPES:
        raise ValueError(f"amp must be one of {AMP_CHOICES} (or a bool), got {amp!r}")
    return _AMP_DTYPES[amp]


def make_sgd(params, device_type: str, lr: float, momentum: float, weight_decay: float,
             autocast_dtype: torch.dtype | None = None, step_in_backward: bool = False) -> torch.optim.SGD:
    """SGD with the step in one fused kernel on CUDA (one pass over parameters, gradients and
    momentum; the foreach step makes three), foreach elsewhere. With ``autocast_dtype`` or
    ``step_in_backward``, :class:`alexnet_fast.optim.SGD`, whose pass also writes the parameters'
    copies in that dtype for our ops (the model must run a backend other than ``torch``,
    uncompiled, to use them), and which steps the Linear weights in the backward if asked."""
    if autocast_dtype is not None or step_in_backward:
        from alexnet_fast.optim import SGD

        return SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, autocast_dtype=autocast_dtype,
                   step_in_backward=step_in_backward)
    step_kind = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **step_kind)


def keeps_autocast_copies(backend: str, device_type: str, amp_dtype: torch.dtype | None,
                          compiled: bool) -> torch.dtype | None:
    """The ``autocast_dtype`` of :func:`make_sgd` for a model of ``backend``: the autocast dtype
    where our ops cast the weights every step, None where nothing would read the copies (PyTorch's
    own ops; no autocast; torch.compile, under which the ops always cast; the CPU, where ``auto``
    runs PyTorch's convolutions and Linears)."""
    return None if backend == "torch" or compiled or device_type != "cuda" else amp_dtype


def can_step_in_backward(backend: str, device_type: str, compiled: bool, world: int = 1, scaled: bool = False) -> bool:
    """The ``step_in_backward`` of :func:`make_sgd` for a model of ``backend``: the classifier's
    weights are stepped in their backward (``alexnet_fast.optim``) where our Linear runs
    (``backend`` not ``torch``, uncompiled) on CUDA, and nothing else needs their gradients: one
    process (DistributedDataParallel reduces gradients after the backward) and no loss scaler."""
    return backend != "torch" and device_type == "cuda" and not compiled and world == 1 and not scaled


def _device_of(model: nn.Module, device) -> torch.device:
    if device is None:
        return next(model.parameters()).device
    return torch.device(device)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if _distributed():
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


def _progress_bar(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


class _StepTimer:
    """Time of the full-size steps after the first ``warmup`` ones: CUDA events on the GPU (no
    synchronization until :meth:`result`), the wall clock on the CPU."""

    def __init__(self, device: torch.device, warmup: int):
        self.cuda = device.type == "cuda"
        self.device = device
        self.warmup = warmup
        self.full_batch = None
        self.steps = self.images = 0
        self.start = self.end = None
        if self.cuda:
            self.start_event = torch.cuda.Event(enable_timing=True)
            self.end_event = torch.cuda.Event(enable_timing=True)

    def _now(self, event_name):
        if self.cuda:
            getattr(self, f"{event_name}_event").record(torch.cuda.current_stream(self.device))
        else:
            setattr(self, event_name, time.perf_counter())

    def before_step(self, step: int, batch: int) -> None:
        if self.full_batch is None:
            self.full_batch = batch
        if step == self.warmup:
            self._now("start")

    def after_step(self, step: int, batch: int) -> None:
        if step >= self.warmup and batch == self.full_batch:
            self._now("end")
            self.steps += 1
            self.images += batch

    def result(self) -> tuple[float, float]:
        """(images per second, ms per step) of this process; NaN when no step was timed."""
        if self.steps == 0:
            return math.nan, math.nan
        if self.cuda:
            self.end_event.synchronize()
            ms = self.start_event.elapsed_time(self.end_event)
        else:
            ms = (self.end - self.start) * 1e3
        return self.images / (ms / 1e3), ms / self.steps


def _accumulate(stats: torch.Tensor, loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
    """stats = [sum of losses, correct@1, correct@3, correct@5, images], all on the device."""
    n = targets.shape[0]
    stats[0] += loss.detach().double() * n
    stats[1:-1] += topk_correct(logits.detach(), targets, TOPK)
    stats[-1] += n


def _summary(stats: torch.Tensor) -> dict:
    values = stats.tolist()
    n = values[-1]
    if n == 0:
        return {"loss": math.nan, **{f"acc{k}": math.nan for k in TOPK}, "images": 0}
    return {
        "loss": values[0] / n,
        **{f"acc{k}": 100.0 * c / n for k, c in zip(TOPK, values[1:-1])},
        "images": int(n),
    }


# ---------------------------------------------------------------------------------------------
# the seed's loop functions
# ---------------------------------------------------------------------------------------------
def train_epoch_classification(
    dataloader,
    model,
    optimizer,
    criterion,
    device=None,
    amp=False,
    *,
    scaler=None,
    desc="Train",
    progress=True,
    step_losses=None,
    step=None,
) -> dict:
    """Train ``model`` for one pass over ``dataloader``; returns ``{"loss", "acc1", "acc3",
    "acc5", "images", "images_per_s", "ms_per_step"}`` (accuracies in percent, all-reduced
    across processes under torch.distributed; throughput of all processes together).

    ``amp``: "off"/False, "bf16"/True or "fp16" (which uses ``scaler``, a GradScaler created here
    when not given). Losses and accuracies are accumulated on the device; the host synchronizes
    only every ``LOG_EVERY`` steps (fewer in short epochs) for the progress bar and at the end.
    ``step_losses``, a list, receives every step's loss (as a 0-d tensor). ``step``, when given,
    runs each training step instead of :func:`alexnet_fast.step.train_step`: a callable
    ``(x, y) -> (loss, logits)`` such as a :class:`alexnet_fast.step.GraphedStep`.
    """
    device = _device_of(model, device)
    dtype = amp_dtype(amp)
    if dtype is torch.float16 and scaler is None:
        scaler = torch.amp.GradScaler(device.type)
    model.train()
    stats = torch.zeros(len(TOPK) + 2, dtype=torch.float64, device=device)
    timer = _StepTimer(device, warmup=min(TIMING_WARMUP, len(dataloader) // 2))
    bar = _progress_bar(len(dataloader), desc, progress)
    log_every = max(1, min(LOG_EVERY, len(dataloader) // 4))
    last_time, last_images = time.perf_counter(), 0
    for index, (x, y) in enumerate(dataloader):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        timer.before_step(index, y.shape[0])
        if step is None:
            loss, logits = train_step(model, optimizer, criterion, x, y, dtype, scaler)
        else:
            loss, logits = step(x, y)
        _accumulate(stats, loss, logits, y)
        if step_losses is not None:
            step_losses.append(loss.clone())  # a graphed step's loss is overwritten by the next replay
        timer.after_step(index, y.shape[0])
        bar.update(1)
        if progress and (index + 1) % log_every == 0:
            now, so_far = time.perf_counter(), _summary(stats)
            rate = (so_far["images"] - last_images) / (now - last_time)
            last_time, last_images = now, so_far["images"]
            bar.set_postfix(loss=f"{so_far['loss']:.4f}", acc1=f"{so_far['acc1']:.1f}%", img_s=f"{rate:,.0f}")
    bar.close()
    rate, ms = timer.result()
    speed = _all_reduce_sum(torch.tensor([rate, ms], dtype=torch.float64, device=device))
    world = torch.distributed.get_world_size() if _distributed() else 1
    metrics = _summary(_all_reduce_sum(stats))
    metrics.update(images_per_s=speed[0].item(), ms_per_step=speed[1].item() / world)
    return metrics


@torch.no_grad()
def evaluate_classification(
    dataloader, model, criterion, device=None, return_preds=False, *, amp=False, progress=False
):
    """Evaluate ``model`` on ``dataloader``: ``{"loss", "acc1", "acc3", "acc5", "images"}``
    (all-reduced across processes under torch.distributed), or with ``return_preds`` the seed's
    ``(metrics, predicted labels, true labels, class probabilities)`` of this process's images."""
    device = _device_of(model, device)
    dtype = amp_dtype(amp)
    model.eval()
    stats = torch.zeros(len(TOPK) + 2, dtype=torch.float64, device=device)
    preds, labels, probs = [], [], []
    for x, y in _progress_iter(dataloader, "Eval", progress):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device.type, dtype):
            logits = model(x)
            loss = criterion(logits, y)
        _accumulate(stats, loss, logits, y)
        if return_preds:
            preds.append(logits.argmax(1))
            labels.append(y)
            probs.append(torch.softmax(logits.float(), 1))
    metrics = _summary(_all_reduce_sum(stats))
    if not return_preds:
        return metrics
    if not preds:
        return metrics, [], [], []
    return metrics, torch.cat(preds).tolist(), torch.cat(labels).tolist(), torch.cat(probs).tolist()


def _progress_iter(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------
# fit: the training run
# ---------------------------------------------------------------------------------------------
def _process_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    values = []
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)):
        text = os.environ.get(name, str(default))
        try:
            values.append(int(text))
        except ValueError:
            raise ConfigError(f"the environment variable {name} must be an integer (torchrun sets it), got {text!r}") from None
    rank, world, local_rank = values
    if world < 1 or not 0 <= rank < world or local_rank < 0:
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local_rank} do not describe a process group")
    return rank, world, local_rank


def _training_device(config: TrainConfig, local_rank: int, world: int) -> torch.device:
    from alexnet_fast.data import DeviceError, default_device

    try:
        device = default_device(config.device)
    except DeviceError as e:
        raise ConfigError(str(e)) from None
    if config.device is None and device.type == "cuda":
        device = torch.device("cuda", local_rank)
    elif device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _rng_state(device: torch.device) -> dict:
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather_rng_states(device: torch.device) -> list:
    """Every process's RNG state, in rank order (collective under torch.distributed)."""
    state = _rng_state(device)
    if not _distributed():
        return [state]
    import torch.distributed as dist

    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states


def _validate_config(config: TrainConfig) -> None:
    from alexnet_fast import backends
    from alexnet_fast.data import DATASETS
    from alexnet_fast.model import fits_input_size, min_input_size

    checks = [
        (config.data in DATASETS, f"data must be one of {DATASETS}, got {config.data!r}"),
        (
            config.backend in backends.BACKENDS,
            f"backend must be one of {backends.BACKENDS}, got {config.backend!r}",
        ),
        (config.amp in AMP_CHOICES, f"amp must be one of {AMP_CHOICES}, got {config.amp!r}"),
        (config.epochs >= 1, f"epochs must be positive, got {config.epochs}"),
        (config.batch_size >= 1, f"batch_size must be positive, got {config.batch_size}"),
        (math.isfinite(config.lr) and config.lr > 0, f"lr must be a positive number, got {config.lr}"),
        (
            math.isfinite(config.momentum) and config.momentum >= 0,
            f"momentum must be a non-negative number, got {config.momentum}",
        ),
        (
            math.isfinite(config.weight_decay) and config.weight_decay >= 0,
            f"weight_decay must be a non-negative number, got {config.weight_decay}",
        ),
        (
            config.limit is None or config.limit >= 1,
            f"limit must be a positive number of images, got {config.limit}",
        ),
        (config.keep_checkpoints >= 0, f"keep_checkpoints must be >= 0, got {config.keep_checkpoints}"),
        (
            fits_input_size(config.input_size),
            f"input_size must be at least {min_input_size()} (AlexNet's smallest input), got {config.input_size}",
        ),
        (config.out is None or config.out != "", "out must name a folder, got an empty string"),
        (not (config.cuda_graph and config.compile), "cuda_graph and compile exclude each other: choose one"),
        (
            not (config.cuda_graph and config.amp == "fp16"),
            "cuda_graph does not run with amp fp16 (its GradScaler needs the host every step); use amp bf16",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _run_dir(checkpoint_path: str) -> str:
    """The run folder a checkpoint belongs to: ``RUN`` for ``RUN/last.pt`` and
    ``RUN/checkpoints/epoch_NNN.pt``."""
    folder = os.path.dirname(os.path.abspath(checkpoint_path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def _epoch_files(directory: str) -> dict[int, str]:
    """{epoch: path} of the ``epoch_NNN.pt`` files in ``directory`` (none when it is missing)."""
    if not os.path.isdir(directory):
        return {}
    found = {}
    for name in os.listdir(directory):
        number = name[len("epoch_"):-len(".pt")]
        if name.startswith("epoch_") and name.endswith(".pt") and number.isdigit():
            found[int(number)] = os.path.join(directory, name)
    return found


def _prune_checkpoints(directory: str, keep: int) -> None:
    if keep == 0:
        return
    files = _epoch_files(directory)
    for epoch in sorted(files)[:-keep]:  # numeric: epoch_1000 after epoch_999
        os.remove(files[epoch])


RUN_FILES = ("last.pt", "metrics.csv", "metrics.jsonl")


def _check_out_dir(out: str, resumed_epoch: int | None, overwrite: bool) -> bool:
    """Refuse an ``out`` that cannot be written, or whose run this one would replace without
    ``overwrite``: another run, or (resuming an earlier epoch of its own run) newer checkpoints.
    Nothing is deleted here: a run replaces the old files once its first checkpoint is written
    (:func:`_drop_replaced_checkpoints`), so a run that fails before that loses nothing. Returns
    whether ``out`` was created here."""
    ckpt_dir = os.path.join(out, "checkpoints")
    for path in (out, ckpt_dir):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ConfigError(f"--out {out}: {path} is a file, not a folder")
    if resumed_epoch is None:
        held = [os.path.join(out, f) for f in RUN_FILES if os.path.exists(os.path.join(out, f))]
        held += sorted(_epoch_files(ckpt_dir).values())
        if held and not overwrite:
            raise FileExistsError(
                f"{out} already holds a training run ({held[0]}); continue it with --resume "
                f"{os.path.join(out, 'last.pt')}, replace it with --overwrite, or choose another --out"
            )
    else:
        newer = [path for epoch, path in sorted(_epoch_files(ckpt_dir).items()) if epoch > resumed_epoch]
        if newer and not overwrite:
            raise FileExistsError(
                f"resuming after epoch {resumed_epoch} would replace the newer checkpoints of {out} "
                f"({', '.join(os.path.basename(p) for p in newer)}); resume from last.pt, pass "
                f"--overwrite to replace them, or choose another --out"
            )
    from alexnet_fast.checkpoint import make_writable_folder

    created = not os.path.exists(out)
    problem = make_writable_folder(out)
    if problem:
        raise ConfigError(f"--out {out} {problem}")
    return created


def _drop_replaced_checkpoints(ckpt_dir: str, epoch: int, resumed: bool) -> None:
    """After the first checkpoint of a run in ``ckpt_dir`` (``epoch``): delete what it replaces,
    the checkpoints of an earlier run in that folder, or (resumed) those after the resumed epoch."""
    for number, path in _epoch_files(ckpt_dir).items():
        if number > epoch or (not resumed and number != epoch):
            os.remove(path)


def fit(config: TrainConfig, resume: str | None = None, overwrite: bool = False) -> TrainResult:
    """Train AlexNet as ``config`` says. With ``resume`` (a checkpoint path) the run continues
    with the checkpoint's config; fields of ``config`` that differ from the defaults may change
    only ``RESUME_MUTABLE`` settings and must otherwise agree with it. Writes
    ``metrics.csv``, ``metrics.jsonl``, ``curves.png``, ``checkpoints/epoch_NNN.pt`` and
    ``last.pt`` into ``config.out`` (nothing when it is None)."""
    from alexnet_fast import checkpoint

    ckpt = None
    if resume is not None:
        ckpt = checkpoint.load_training_checkpoint(resume)
        config = _resumed_config(ckpt["config"], config, resume)
    return _fit(config, ckpt, resume, overwrite)


def _fit(config: TrainConfig, ckpt: dict | None, resume: str | None, overwrite: bool) -> TrainResult:
    from alexnet_fast import AlexNet
    from alexnet_fast.data import DeviceLoader, load_dataset, mix_seed
    from alexnet_fast.metrics import MetricsLog, plot_curves

    _validate_config(config)
    if ckpt is not None and config.epochs <= ckpt["epoch"]:
        raise ConfigError(
            f"{resume} has finished {ckpt['epoch']} epoch(s) and the run is set to {config.epochs}: "
            f"nothing to train; pass --epochs N with N > {ckpt['epoch']} to continue it"
        )
    rank, world, local_rank = _process_info()
    device = _training_device(config, local_rank, world)
    if config.cuda_graph and (device.type != "cuda" or world > 1):
        raise ConfigError(
            f"cuda_graph needs one process on a CUDA device, got {world} process(es) on {device}"
        )
    started_group = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            started_group = True
    main_process = rank == 0
    saved_flags = torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32
    out = config.out if main_process else None
    # resuming continues the run's own folder; another folder holding a run is replaced only with
    # overwrite, and only once this run has written its first checkpoint
    same_run = out is not None and resume is not None and os.path.realpath(out) == os.path.realpath(_run_dir(resume))
    created_out, first_save = False, True
    try:
        problem = None
        if out is not None:
            try:
                created_out = _check_out_dir(out, ckpt["epoch"] if same_run else None, overwrite)
            except (ConfigError, FileExistsError) as e:
                problem = e
        if world > 1:
            # Rank 0 alone checks --out; the others must learn the outcome, or they would wait in
            # their first collective until the launcher's timeout.
            if _all_reduce_sum(torch.tensor([float(problem is not None)], device=device)).item() and problem is None:
                problem = ConfigError(f"process {rank} stops: rank 0 could not use --out {config.out} (its error says why)")
        if problem is not None:
            raise problem
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = True  # fp32 runs use TF32 GEMMs, as cuDNN convs do

        train_set = load_dataset(config.data, "train", config.data_dir, config.limit, config.data_seed)
        test_set = load_dataset(config.data, "test", config.data_dir, config.limit, config.data_seed)
        input_dtype = amp_dtype(config.amp) or torch.float32
        common = dict(
            input_size=config.input_size, device=device, dtype=input_dtype, channels_last=config.channels_last
        )
        train_shard = train_set.shard(rank, world, equal=True)
        # A compiled step is specialized to the batch shape: skip the ragged last batch.
        drop_last = config.compile and len(train_shard) >= config.batch_size
        train_loader = DeviceLoader(
            train_shard,
            config.batch_size,
            train=True,
            seed=mix_seed(config.seed, rank),
            drop_last=drop_last,
            **common,
        )
        test_loader = DeviceLoader(
            test_set.shard(rank, world, equal=False), config.batch_size, train=False, **common
        )

        torch.manual_seed(config.seed)
        model = AlexNet(num_classes=len(train_set.classes), backend=config.backend).to(device)
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = make_sgd(
            model.parameters(), device.type, config.lr, config.momentum, config.weight_decay,
            keeps_autocast_copies(config.backend, device.type, amp_dtype(config.amp), config.compile),
            can_step_in_backward(config.backend, device.type, config.compile, world, scaled=config.amp == "fp16"))
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **PLATEAU)
        scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
        # Dropout streams differ per process; the parameters are the same on every rank.
        torch.manual_seed(mix_seed(config.seed, rank, 1))
        history, start_epoch = [], 0
        if ckpt is not None:
            start_epoch, history = _restore(ckpt, resume, model, optimizer, scheduler, scaler, device, rank, world)
            if main_process:
                print(f"resuming {resume} after epoch {start_epoch}", flush=True)

        train_model = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(
                model,
                device_ids=[device.index] if device.type == "cuda" else None,
                gradient_as_bucket_view=True,
            )
        eval_model = model
        if config.compile:
            train_model, eval_model = torch.compile(train_model), torch.compile(model)
        criterion = nn.CrossEntropyLoss()
        graphed = None
        if config.cuda_graph:
            from alexnet_fast.step import GraphedStep

            graphed = GraphedStep(train_model, optimizer, criterion, amp_dtype(config.amp), warmup=GRAPH_WARMUP)
        log = MetricsLog(out) if out is not None else None
        step_losses = []
        for epoch in range(start_epoch + 1, config.epochs + 1):
            began = time.perf_counter()
            train_loader.set_epoch(epoch)
            lr = optimizer.param_groups[0]["lr"]
            train_m = train_epoch_classification(
                train_loader,
                train_model,
                optimizer,
                criterion,
                device,
                config.amp,
                scaler=scaler,
                desc=f"epoch {epoch}/{config.epochs}",
                progress=config.progress and main_process,
                step_losses=step_losses,
                step=graphed,
            )
            test_m = evaluate_classification(test_loader, eval_model, criterion, device, amp=config.amp)
            scheduler.step(test_m["acc1"])
            row = {
                "epoch": epoch,
                "lr": lr,
                **{f"train_{k}": train_m[k] for k in ("loss", "acc1", "acc3", "acc5", "images")},
                **{f"test_{k}": test_m[k] for k in ("loss", "acc1", "acc3", "acc5", "images")},
                "images_per_s": train_m["images_per_s"],
                "ms_per_step": train_m["ms_per_step"],
                "epoch_s": time.perf_counter() - began,
            }
            assert tuple(row) == COLUMNS
            history.append(row)
            rng_states = _gather_rng_states(device) if config.out is not None else None
            if main_process:
                print(_format_row(row, config.epochs), flush=True)
            if out is not None:
                _save(out, config, epoch, history, model, optimizer, scheduler, scaler, rng_states, world,
                      replaces=first_save, resumed=same_run)
                if first_save:  # the metrics files start over with the run's own rows
                    log.start(history)
                    first_save = False
                else:
                    log.append(row)
                plot_curves(history, os.path.join(out, "curves.png"))
        return TrainResult(
            model, history, torch.stack(step_losses).tolist() if step_losses else [], config, out
        )
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32 = saved_flags
        if created_out and first_save:  # a run that wrote nothing leaves no empty folder behind
            for folder in (os.path.join(out, "checkpoints"), out):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)  # only when empty
        if started_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _format_row(row: dict, epochs: int) -> str:
    speed = (
        ""
        if math.isnan(row["images_per_s"])
        else (f" | {row['images_per_s']:,.0f} img/s {row['ms_per_step']:.2f} ms/step")
    )
    return (
        f"epoch {row['epoch']:>3}/{epochs} | lr {row['lr']:.2e} | train loss {row['train_loss']:.4f} "
        f"top-1 {row['train_acc1']:.2f}% | test loss {row['test_loss']:.4f} top-1 {row['test_acc1']:.2f}% "
        f"top-5 {row['test_acc5']:.2f}%{speed} | {row['epoch_s']:.1f} s"
    )


def _save(out, config, epoch, history, model, optimizer, scheduler, scaler, rng_states, world, replaces: bool,
          resumed: bool) -> None:
    """Write ``checkpoints/epoch_NNN.pt`` and ``last.pt``; with ``replaces`` (the run's first
    checkpoint) then delete the checkpoints it replaces, before pruning to the newest ones."""
    from alexnet_fast import __version__, checkpoint

    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_states,
        "epoch": epoch,
        "config": dataclasses.asdict(config),
        "history": history,
        "world_size": world,
        "torch_version": str(torch.__version__),
        "alexnet_fast_version": __version__,
    }
    ckpt_dir = os.path.join(out, "checkpoints")
    path = os.path.join(ckpt_dir, f"epoch_{epoch:03d}.pt")
    checkpoint.save_checkpoint(path, state)
    checkpoint.link_atomic(path, os.path.join(out, "last.pt"))
    if replaces:
        _drop_replaced_checkpoints(ckpt_dir, epoch, resumed)
    _prune_checkpoints(ckpt_dir, config.keep_checkpoints)


def _restore(ckpt, path, model, optimizer, scheduler, scaler, device, rank, world) -> tuple[int, list]:
    from alexnet_fast import load_seed_state_dict
    from alexnet_fast.checkpoint import CheckpointError

    states = ckpt["rng"]
    try:
        load_seed_state_dict(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler") is not None:
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(states[rank % len(states)], device)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        raise CheckpointError(f"{path}: its saved state does not fit this run ({type(e).__name__}: {e})") from e
    saved_world = ckpt.get("world_size", len(states))
    if saved_world != world and rank == 0:
        print(
            f"note: the checkpoint was written by {saved_world} process(es), this run has {world}: "
            f"data shards and dropout streams change, so the result will differ from an "
            f"uninterrupted run",
            file=sys.stderr,
            flush=True,
        )
    return ckpt["epoch"], list(ckpt["history"])


def _resumed_config(
    saved: dict, requested: TrainConfig, path: str, explicit: dict | None = None
) -> TrainConfig:
    """The checkpoint's config, with ``explicit`` (or, from the API, every field of
    ``requested`` that differs from the defaults) applied where ``RESUME_MUTABLE`` allows. The run
    folder defaults to the checkpoint's own (``RUN/last.pt`` or ``RUN/checkpoints/epoch_NNN.pt``),
    so a moved or copied run continues where it now is."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown, missing = set(saved) - names, names - set(saved) - set(ADDED_SETTINGS)
    if unknown or missing:
        raise ConfigError(
            f"{path}: its config does not match this version's settings "
            f"(unknown: {sorted(unknown) or 'none'}; missing: {sorted(missing) or 'none'})"
        )
    config = TrainConfig(**saved)  # settings added later keep their defaults
    config.out = _run_dir(path)
    if explicit is None:
        defaults = TrainConfig()
        explicit = {k: getattr(requested, k) for k in names if getattr(requested, k) != getattr(defaults, k)}
    conflicts = []
    for key, value in explicit.items():
        if key in RESUME_MUTABLE:
            setattr(config, key, value)
        elif value != getattr(config, key):
            conflicts.append(f"--{key.replace('_', '-')} {value} (the checkpoint has {getattr(config, key)})")
    if conflicts:
        raise ConfigError(
            f"resuming {path} continues its run with its own settings; these differ: {'; '.join(conflicts)}. "
            f"Drop them, or start a new run. A resumed run may change only "
            f"{', '.join('--' + k.replace('_', '-') for k in RESUME_MUTABLE)}"
        )
    return config


# ---------------------------------------------------------------------------------------------
# eval
# ---------------------------------------------------------------------------------------------
def data_settings(
    config: dict | None, data=None, data_dir=None, limit=None, data_seed=None, input_size=None
) -> dict:
    """The data settings of a checkpoint's run (``config``; None for seed weights, which mean
    STL-10 at 224x224), each replaced by the corresponding argument when that is given."""
    saved = config or {}

    def pick(value, key, default):
        return value if value is not None else saved.get(key, default)

    from alexnet_fast.model import fits_input_size, min_input_size

    settings = {
        "data": pick(data, "data", "stl10"),
        "data_dir": pick(data_dir, "data_dir", "./data"),
        "limit": pick(limit, "limit", None),
        "data_seed": pick(data_seed, "data_seed", 0),
        "input_size": pick(input_size, "input_size", 224),
    }
    if not fits_input_size(settings["input_size"]):
        raise ConfigError(
            f"--input-size must be at least {min_input_size()} (AlexNet's smallest input), got {settings['input_size']}"
        )
    return settings


def evaluate_checkpoint(
    path: str,
    data: str | None = None,
    data_dir: str | None = None,
    limit: int | None = None,
    input_size: int | None = None,
    data_seed: int | None = None,
    batch_size: int = 256,
    backend: str = "auto",
    amp: str = "off",
    device=None,
    channels_last: bool = False,
) -> dict:
    """Test-split metrics of the checkpoint ``path`` (a training checkpoint or seed weights). Data
    settings default to those the run trained with (:func:`data_settings`)."""
    from alexnet_fast import checkpoint
    from alexnet_fast.data import DeviceLoader, default_device, load_dataset

    device = default_device(device)
    model, config = checkpoint.load_model(path, backend=backend, device=device)
    d = data_settings(config, data, data_dir, limit, data_seed, input_size)
    test_set = load_dataset(d["data"], "test", d["data_dir"], d["limit"], d["data_seed"])
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    loader = DeviceLoader(
        test_set,
        batch_size,
        train=False,
        input_size=d["input_size"],
        device=device,
        dtype=amp_dtype(amp) or torch.float32,
        channels_last=channels_last,
    )
    return evaluate_classification(loader, model, nn.CrossEntropyLoss(), device, amp=amp)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
TRAIN_DESCRIPTION = """\
Train AlexNet (the seed's model) on the embedded synthetic dataset or STL-10, with the images
held on the device and augmented there. Writes OUT/metrics.csv, metrics.jsonl, curves.png,
checkpoints/epoch_NNN.pt and last.pt after every epoch; --resume OUT/last.pt continues a run.

Multi-GPU: torchrun --nproc_per_node=N -m alexnet_fast.train [flags] trains with
DistributedDataParallel; --batch-size is per GPU, metrics cover all GPUs, rank 0 writes files.

On the CPU a run with a fixed --seed is bit-for-bit reproducible, resumed or not. On the GPU,
cuDNN's algorithm choice and atomic adds in some backward kernels change the last bits."""


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The ``train`` flags. Value flags default to None so the command can tell which were given
    (explicit flags override ``--recipe``; on ``--resume`` they must agree with the checkpoint)."""
    from alexnet_fast.backends import BACKENDS

    d = TrainConfig()
    p.add_argument("--backend", choices=BACKENDS, help=f"kernels the model runs (default {d.backend})")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile the model")
    p.add_argument("--amp", choices=AMP_CHOICES, help=f"autocast dtype (default {d.amp})")
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, help="channels_last model and inputs"
    )
    p.add_argument("--epochs", type=positive_int, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=positive_int, help=f"images per step and process (default {d.batch_size})")
    p.add_argument("--lr", type=float, help=f"SGD learning rate (default {d.lr})")
    p.add_argument("--momentum", type=float, help=f"default {d.momentum}")
    p.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    p.add_argument(
        "--data",
        choices=("synthetic", "stl10"),
        help="synthetic: the embedded STL-10-shaped dataset; stl10: the binary release "
        f"in --data-dir (default {d.data})",
    )
    p.add_argument("--data-dir", help=f"folder holding stl10_binary/ (default {d.data_dir})")
    p.add_argument(
        "--limit",
        type=positive_int,
        help="use at most N training and N test images (synthetic data: generate N of each; "
        "default 5000 and 8000, STL-10's sizes)",
    )
    p.add_argument("--data-seed", type=int, help=f"seed of the synthetic dataset (default {d.data_seed})")
    p.add_argument(
        "--input-size", type=positive_int, help=f"images are resized to this square size (default {d.input_size})"
    )
    p.add_argument(
        "--seed", type=int, help=f"seed of initialization, shuffling, flips, dropout (default {d.seed})"
    )
    p.add_argument(
        "--device",
        help="cpu, cuda or cuda:N (default: the GPU when there is one; under torchrun each process's own)",
    )
    p.add_argument("--out", help="run folder for metrics, curves and checkpoints (default runs/train)")
    p.add_argument(
        "--keep-checkpoints",
        type=int,
        help=f"keep the newest N epoch_NNN.pt files, 0 for all (default {d.keep_checkpoints}; "
        "each holds weights and momentum, about 470 MB)",
    )
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, help="progress bars (default on)")
    p.add_argument(
        "--cuda-graph",
        action=argparse.BooleanOptionalAction,
        help="replay each training step from a CUDA graph, so the host's kernel launches no longer "
        "bound the loop (one GPU; not with --compile, --amp fp16 or torchrun; default off)",
    )
    p.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="seed",
        help="seed: the seed's recipe (batch 64, lr 1e-3, fp32); fast: for a GPU, batch 256, "
        "lr 4e-3, --amp bf16, --channels-last; explicit flags override it",
    )
    p.add_argument("--resume", metavar="PATH", help="continue the run of this checkpoint (e.g. RUN/last.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")


def config_from_args(args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    """(config, explicitly chosen settings: recipe values and given flags)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    explicit = dict(RECIPES[args.recipe])
    explicit.update({k: getattr(args, k) for k in names if getattr(args, k, None) is not None})
    if args.resume is None:
        explicit.setdefault("out", "runs/train")
    return dataclasses.replace(TrainConfig(), **explicit), explicit


def user_errors(command):
    """Run a command so that user mistakes (missing data or checkpoint, damaged files, settings
    that cannot work) print one line and exit with status 2 instead of a traceback."""

    @functools.wraps(command)
    def run(args) -> int:
        from alexnet_fast.backends import BackendUnavailableError
        from alexnet_fast.checkpoint import CheckpointError
        from alexnet_fast.data import DatasetNotFoundError, DeviceError

        try:
            return command(args)
        except (
            ConfigError,
            CheckpointError,
            DatasetNotFoundError,
            DeviceError,
            BackendUnavailableError,
            FileNotFoundError,
            FileExistsError,
        ) as e:
            prog = f"alexnet-fast {args.command}" if hasattr(args, "command") else "python -m alexnet_fast.train"
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2

    return run


@user_errors
def _cmd_train(args) -> int:
    from alexnet_fast import checkpoint

    config, explicit = config_from_args(args)
    ckpt = None
    if args.resume is not None:
        ckpt = checkpoint.load_training_checkpoint(args.resume)
        config = _resumed_config(ckpt["config"], config, args.resume, explicit)
    result = _fit(config, ckpt, args.resume, args.overwrite)
    if result.out is not None and result.history:
        print(f"wrote {result.out}/metrics.csv, curves.png, last.pt")
    return 0


@user_errors
def _cmd_eval(args) -> int:
    m = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        data_dir=args.data_dir,
        limit=args.limit,
        input_size=args.input_size,
        data_seed=args.data_seed,
        batch_size=args.batch_size,
        backend=args.backend,
        amp=args.amp,
        device=args.device,
        channels_last=args.channels_last,
    )
    print(
        f"test: {m['images']} images | loss {m['loss']:.4f} | top-1 {m['acc1']:.2f}% | "
        f"top-3 {m['acc3']:.2f}% | top-5 {m['acc5']:.2f}%"
    )
    return 0


def add_checkpoint_data_arguments(p: argparse.ArgumentParser) -> None:
    """The checkpoint and test-data flags that ``eval`` and ``viz`` share."""
    p.add_argument("--checkpoint", required=True, help="a training checkpoint or a seed state_dict")
    p.add_argument(
        "--data",
        choices=("synthetic", "stl10"),
        help="default: the checkpoint's training data (stl10 for seed weights)",
    )
    p.add_argument("--data-dir", help="folder holding stl10_binary/ (default: the checkpoint's, else ./data)")
    p.add_argument("--limit", type=positive_int, help="use at most N test images (default: the checkpoint's)")
    p.add_argument("--data-seed", type=int, help="seed of the synthetic dataset (default: the checkpoint's)")
    p.add_argument("--input-size", type=positive_int, help="default: the checkpoint's, else 224")


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from alexnet_fast.backends import BACKENDS

    add_checkpoint_data_arguments(p)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--amp", choices=AMP_CHOICES, default="off")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--device", help="default: the GPU when there is one")


def add_commands(subparsers) -> None:
    """Add the ``train`` and ``eval`` subcommands to the ``alexnet-fast`` parser."""
    p = subparsers.add_parser(
        "train",
        help="train AlexNet (synthetic data or STL-10); multi-GPU under torchrun",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(p)
    p.set_defaults(func=_cmd_train)
    p = subparsers.add_parser("eval", help="loss and top-1/3/5 of a checkpoint on the test split")
    add_eval_arguments(p)
    p.set_defaults(func=_cmd_eval)


def main(argv=None) -> int:
    """``python -m alexnet_fast.train [train flags]`` (what torchrun runs)."""
    parser = argparse.ArgumentParser(
        prog="python -m alexnet_fast.train",
        description=TRAIN_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_train_arguments(parser)
    return _cmd_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
