"""Checkpoints: atomic writes, validated reads, and the seed's bare state_dicts.

A training checkpoint is a ``torch.save`` d dict with a format marker and version, the model,
optimizer, scheduler (and fp16 grad-scaler) states, the RNG state of every process, the number of
finished epochs, the run's config and its metric history. It is written to a temporary file in
the same folder, flushed to disk and renamed over the target, so a crash mid-write leaves the
previous file intact. Reading checks all of that and raises :class:`CheckpointError` for anything
else, so a damaged or foreign file never silently starts a fresh run.

Files holding only model weights (a bare state_dict, as the seed saved them, or a dict with a
``model_state_dict`` entry) load for evaluation and visualization, not for resuming.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

FORMAT = "alexnet_fast.training_checkpoint"
VERSION = 1
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "rng", "epoch", "config", "history")


class CheckpointError(ValueError):
    """The file is not a usable checkpoint: unreadable, truncated, foreign or incomplete."""


def save_checkpoint(path: str, state: dict) -> None:
    """Write a training checkpoint holding ``state`` (the keys of ``REQUIRED_KEYS``, plus any
    others) atomically to ``path``."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise ValueError(f"state is missing {missing} (a training checkpoint holds {REQUIRED_KEYS})")
    payload = {"format": FORMAT, "version": VERSION, **state}
    write_atomic(path, lambda f: torch.save(payload, f))


def make_writable_folder(path: str) -> str | None:
    """Create the folder ``path`` (with its parents) if needed; None when files can be written
    there, else what is wrong (to follow the path in a message)."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        return f"cannot be created: {e.strerror or e}"
    if not os.access(path, os.W_OK | os.X_OK):
        return "is not writable"
    return None


def write_atomic(path: str, write) -> None:
    """Call ``write(f)`` on a temporary binary file next to ``path``, flush it to disk and rename
    it over ``path``: readers see the old file or the new one, never a part."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def link_atomic(src: str, dst: str) -> None:
    """Make ``dst`` the same file as ``src`` (a hard link, a copy where links are unsupported),
    replacing ``dst`` atomically."""
    directory = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(directory, f".{os.path.basename(dst)}.{os.getpid()}.tmp")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # file systems without hard links, or src on another device
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _read(path: str):
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder; give a checkpoint file, e.g. {os.path.join(path, 'last.pt')}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (
        Exception
    ) as e:  # torch raises many types for damaged files: RuntimeError, EOFError, UnpicklingError...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        refused = [line for line in lines if "Unsupported global" in line]
        if refused:
            raise CheckpointError(
                f"{path} holds Python objects other than tensors and plain containers, which a safe "
                f"(weights_only) load refuses: {refused[0]}"
            ) from e
        # weights_only errors bury the cause after a long preamble
        reason = next((line for line in lines if line.startswith("Unsupported")), lines[0])
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (damaged, truncated, or not written by "
            f"torch.save): {reason}"
        ) from e


def _is_state_dict(obj) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _validate_training(path: str, obj: dict) -> dict:
    version = obj.get("version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{path} has an invalid format version {version!r}")
    if version > VERSION:
        raise CheckpointError(
            f"{path} was written by a newer alexnet_fast (checkpoint format {version}; this version "
            f"reads up to {VERSION}): upgrade alexnet_fast to use it"
        )
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise CheckpointError(f"{path} is an incomplete training checkpoint: it lacks {missing}")
    if not _is_state_dict(obj["model"]):
        raise CheckpointError(f"{path}: its 'model' entry is not a state_dict of tensors")
    if not isinstance(obj["epoch"], int) or obj["epoch"] < 1:
        raise CheckpointError(f"{path}: its epoch {obj['epoch']!r} is not a positive int")
    shapes = {
        "optimizer": _is_dict_with(obj["optimizer"], "state", "param_groups"),
        "scheduler": isinstance(obj["scheduler"], dict),
        "config": isinstance(obj["config"], dict) and all(isinstance(k, str) for k in obj["config"]),
        "history": isinstance(obj["history"], list) and all(isinstance(r, dict) for r in obj["history"]),
        "rng": isinstance(obj["rng"], list) and len(obj["rng"]) > 0
        and all(_is_dict_with(r, "cpu") and isinstance(r["cpu"], torch.Tensor) for r in obj["rng"]),
    }
    damaged = [key for key, ok in shapes.items() if not ok]
    if damaged:
        raise CheckpointError(f"{path} is a damaged training checkpoint: its {damaged} entries are not what training saves")
    return obj


def _is_dict_with(obj, *keys: str) -> bool:
    return isinstance(obj, dict) and all(k in obj for k in keys)


def load_training_checkpoint(path: str) -> dict:
    """A validated training checkpoint (on the CPU), for ``--resume``."""
    obj = _read(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _validate_training(path, obj)
    if _is_state_dict(obj) or (isinstance(obj, dict) and _is_state_dict(obj.get("model_state_dict"))):
        raise CheckpointError(
            f"{path} holds model weights only (no optimizer, scheduler or epoch), so training cannot "
            f"resume from it; evaluate or visualize it with `alexnet-fast eval|viz --checkpoint {path}`"
        )
    raise CheckpointError(f"{path} is not an alexnet_fast training checkpoint (no '{FORMAT}' format marker)")


def load_weights(path: str) -> tuple[dict, dict | None]:
    """(model state_dict, training config or None) from a training checkpoint or a weights-only
    file (a bare state_dict, or a dict with a ``model_state_dict`` entry)."""
    obj = _read(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        ckpt = _validate_training(path, obj)
        return ckpt["model"], ckpt["config"]
    if _is_state_dict(obj):
        return obj, None
    if isinstance(obj, dict) and _is_state_dict(obj.get("model_state_dict")):
        return obj["model_state_dict"], None
    raise CheckpointError(
        f"{path} is neither an alexnet_fast training checkpoint nor a model state_dict "
        f"(a dict of tensors); got {type(obj).__name__}"
    )


def load_model(path: str, backend: str | None = "auto", device="cpu"):
    """(AlexNet with the weights of ``path`` in eval mode on ``device``, the training config or
    None). The number of classes comes from the weights; seed checkpoints load as they are."""
    from alexnet_fast.model import AlexNet, load_seed_state_dict

    state_dict, config = load_weights(path)
    head = [v for k, v in state_dict.items() if k.endswith("classifier.6.weight")]
    if len(head) != 1 or head[0].dim() != 2:
        raise CheckpointError(f"{path}: its weights are not AlexNet's (no classifier.classifier.6.weight)")
    model = AlexNet(num_classes=head[0].shape[0], backend=backend)
    try:
        load_seed_state_dict(model, state_dict)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit AlexNet: {e}") from e
    return model.to(device).eval(), config
