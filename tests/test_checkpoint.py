"""Checkpoint files: atomic writes, validated reads with clear errors, seed state_dicts."""

import os
import pickle

import pytest
import torch

from alexnet_fast import AlexNet, checkpoint
from alexnet_fast.checkpoint import CheckpointError


def _state(value=1.0):
    """A small but complete training-checkpoint state."""
    return {
        "model": {"w": torch.full((3,), value)},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {"best": 0.0},
        "rng": [{"cpu": torch.get_rng_state(), "cuda": None}],
        "epoch": 2,
        "config": {"lr": 0.01},
        "history": [{"epoch": 1, "train_loss": 2.0}],
    }


def test_save_then_load_round_trip(tmp_path):
    path = str(tmp_path / "sub" / "ckpt.pt")
    checkpoint.save_checkpoint(path, _state(3.0))
    got = checkpoint.load_training_checkpoint(path)
    assert got["format"] == checkpoint.FORMAT and got["version"] == checkpoint.VERSION
    assert torch.equal(got["model"]["w"], torch.full((3,), 3.0))
    assert got["epoch"] == 2 and got["history"][0]["train_loss"] == 2.0
    assert os.listdir(tmp_path / "sub") == ["ckpt.pt"]


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, _state(1.0))
    before = open(path, "rb").read()
    bad = _state(2.0)
    bad["config"] = {"callback": lambda: None}  # lambdas cannot be pickled: torch.save fails mid-write
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        checkpoint.save_checkpoint(path, bad)
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_save_requires_the_training_state(tmp_path):
    state = _state()
    del state["optimizer"]
    with pytest.raises(ValueError, match="optimizer"):
        checkpoint.save_checkpoint(str(tmp_path / "x.pt"), state)


def test_link_atomic_replaces_the_target(tmp_path):
    a, b = str(tmp_path / "a.pt"), str(tmp_path / "last.pt")
    checkpoint.save_checkpoint(a, _state(1.0))
    with open(b, "w") as f:
        f.write("old")
    checkpoint.link_atomic(a, b)
    assert open(a, "rb").read() == open(b, "rb").read()
    assert sorted(os.listdir(tmp_path)) == ["a.pt", "last.pt"]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.load_training_checkpoint(str(tmp_path / "nope.pt"))


@pytest.mark.parametrize("damage", ["random_bytes", "truncated", "empty", "text"])
def test_damaged_files_give_a_clear_error(tmp_path, damage):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_checkpoint(path, _state())
    raw = open(path, "rb").read()
    content = {
        "random_bytes": bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()),
        "truncated": raw[: len(raw) // 2],
        "empty": b"",
        "text": b"epoch=3\n",
    }[damage]
    with open(path, "wb") as f:
        f.write(content)
    for load in (checkpoint.load_training_checkpoint, checkpoint.load_weights):
        with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
            load(path)


def test_pickled_objects_are_refused(tmp_path):
    path = str(tmp_path / "objects.pt")
    torch.save({"when": __import__("datetime").date(2020, 1, 1)}, path)
    with pytest.raises(CheckpointError, match="safe .weights_only. load refuses"):
        checkpoint.load_weights(path)


def test_foreign_and_incomplete_checkpoints(tmp_path):
    foreign = str(tmp_path / "foreign.pt")
    torch.save({"epoch": 3, "weights": [1, 2]}, foreign)
    with pytest.raises(CheckpointError, match="not an alexnet_fast training checkpoint"):
        checkpoint.load_training_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="neither"):
        checkpoint.load_weights(foreign)

    newer = str(tmp_path / "newer.pt")
    torch.save({**_state(), "format": checkpoint.FORMAT, "version": checkpoint.VERSION + 1}, newer)
    with pytest.raises(CheckpointError, match="newer alexnet_fast"):
        checkpoint.load_training_checkpoint(newer)

    partial = str(tmp_path / "partial.pt")
    state = {**_state(), "format": checkpoint.FORMAT, "version": checkpoint.VERSION}
    del state["scheduler"]
    torch.save(state, partial)
    with pytest.raises(CheckpointError, match="lacks.*scheduler"):
        checkpoint.load_training_checkpoint(partial)


@pytest.mark.parametrize("key, value", [("rng", []), ("optimizer", {}), ("history", None), ("config", "abc"),
                                        ("scheduler", [1])])
def test_damaged_entries_are_refused(tmp_path, key, value):
    path = str(tmp_path / "damaged.pt")
    torch.save({**_state(), key: value, "format": checkpoint.FORMAT, "version": checkpoint.VERSION}, path)
    with pytest.raises(CheckpointError, match=f"damaged training checkpoint.*'{key}'"):
        checkpoint.load_training_checkpoint(path)


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder.*last.pt"):
        checkpoint.load_weights(str(tmp_path))


def test_weights_only_files_cannot_resume_but_load_for_eval(tmp_path):
    torch.manual_seed(0)
    model = AlexNet(num_classes=7, backend="torch").eval()
    x = torch.randn(2, 3, 72, 72)
    expected = model(x)
    layouts = {
        "bare.pt": model.state_dict(),
        "wrapped.pt": {"model_state_dict": model.state_dict(), "epoch": 4},
        "ddp.pt": {f"module.{k}": v for k, v in model.state_dict().items()},
    }
    for name, obj in layouts.items():
        path = str(tmp_path / name)
        torch.save(obj, path)
        with pytest.raises(CheckpointError, match="model weights only"):
            checkpoint.load_training_checkpoint(path)
        loaded, config = checkpoint.load_model(path, backend="torch")
        assert config is None and not loaded.training
        assert loaded.classifier.classifier[6].out_features == 7
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
        os.remove(path)


def test_weights_that_are_not_alexnet(tmp_path):
    path = str(tmp_path / "other.pt")
    torch.save(
        {"classifier.classifier.6.weight": torch.randn(10, 4096), "conv.weight": torch.randn(2, 2)}, path
    )
    with pytest.raises(CheckpointError, match="do not fit AlexNet"):
        checkpoint.load_model(path)
    torch.save({"fc.weight": torch.randn(10, 5)}, path)
    with pytest.raises(CheckpointError, match="not AlexNet's"):
        checkpoint.load_model(path)
