"""Datasets and the on-device image pipeline: synthetic data, STL-10's binary layout, the seed's
transforms, shuffling/flipping, sharding, the DataLoader path."""

import os

import numpy as np
import pytest
import torch

from alexnet_fast import data
from alexnet_fast.data import DatasetNotFoundError, DeviceLoader, ImageArrays

MIN_STD = min(data.IMAGENET_STD)


# ---------------------------------------------------------------------------------------------
# synthetic
# ---------------------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_stl10_shaped():
    a = data.make_synthetic("train", 150, seed=3)
    b = data.make_synthetic("train", 150, seed=3)
    assert a.images.shape == (150, 3, 96, 96) and a.images.dtype == torch.uint8
    assert a.labels.dtype == torch.int64 and a.labels.shape == (150,)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.classes == data.SYNTHETIC_CLASSES and len(a.classes) == 10
    assert set(a.labels.tolist()) == set(range(10))
    other = data.make_synthetic("train", 150, seed=4)
    assert not torch.equal(a.images, other.images)
    test = data.make_synthetic("test", 150, seed=3)
    assert not torch.equal(a.images, test.images)
    # images use the whole range, not a constant
    assert a.images.float().std() > 30


def test_synthetic_limit_is_a_prefix():
    full = data.make_synthetic("test", 250, seed=1)
    part = data.load_dataset("synthetic", "test", limit=130, seed=1)
    assert torch.equal(part.images, full.images[:130]) and torch.equal(part.labels, full.labels[:130])


def test_synthetic_classes_are_learnable():
    """A nearest-class-mean classifier on 24x24 thumbnails, trained on one part and tested on
    another, is far above chance: the classes carry signal an AlexNet can pick up quickly."""
    train = data.make_synthetic("train", 400, seed=0)
    test = data.make_synthetic("test", 200, seed=0)

    def features(images):
        x = torch.nn.functional.avg_pool2d(images.float() / 255, 4).flatten(1)
        return x - x.mean(1, keepdim=True)

    f_train, f_test = features(train.images), features(test.images)
    means = torch.stack([f_train[train.labels == c].mean(0) for c in range(10)])
    pred = torch.cdist(f_test, means).argmin(1)
    accuracy = (pred == test.labels).float().mean().item()
    assert accuracy > 0.3, accuracy  # chance is 0.1


# ---------------------------------------------------------------------------------------------
# STL-10 in the official binary layout
# ---------------------------------------------------------------------------------------------
def _write_stl10(root, n_train=12, n_test=10, n_unlabeled=3, seed=0):
    """Tiny files in the official layout: images as uint8 3x96x96 column-major (the release's
    order), labels 1..10, class names one per line."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "stl10_binary")
    os.makedirs(folder)
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images.transpose(0, 1, 3, 2).tofile(os.path.join(folder, f"{split}_X.bin"))
        (labels + 1).tofile(os.path.join(folder, f"{split}_y.bin"))
        arrays[split] = (images, labels)
    rng.integers(0, 256, (n_unlabeled, 3, 96, 96), dtype=np.uint8).tofile(
        os.path.join(folder, "unlabeled_X.bin")
    )
    with open(os.path.join(folder, "class_names.txt"), "w") as f:
        f.write("\n".join(data.STL10_CLASSES) + "\n")
    return arrays


@pytest.fixture
def stl10_root(tmp_path, monkeypatch):
    """A tiny STL-10 in the official layout. torchvision checks the md5 of every file against the
    2.6 GB release, which tiny files cannot match, so the check is patched to pass: everything
    else (the reader, the layout, our conversion) is the real code path."""
    from torchvision.datasets import STL10

    arrays = _write_stl10(str(tmp_path))
    monkeypatch.setattr(STL10, "_check_integrity", lambda self: True)
    return str(tmp_path), arrays


def test_stl10_reads_the_official_layout(stl10_root):
    root, arrays = stl10_root
    for split in ("train", "test"):
        got = data.load_stl10(root, split)
        images, labels = arrays[split]
        assert got.images.dtype == torch.uint8 and got.images.shape == images.shape
        assert got.images.is_contiguous()
        assert np.array_equal(got.images.numpy(), images)
        assert np.array_equal(got.labels.numpy(), labels.astype(np.int64))
        assert got.classes == data.STL10_CLASSES
    assert len(data.load_dataset("stl10", "test", root, limit=4)) == 4


def test_stl10_missing_folder_says_where_and_how(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        data.load_stl10(str(tmp_path / "nowhere"), "train")
    message = str(e.value)
    assert os.path.join(str(tmp_path / "nowhere"), "stl10_binary") in message
    assert "train_X.bin" in message and "download=True" in message and "--data synthetic" in message


def test_stl10_damaged_files_are_reported(tmp_path):
    _write_stl10(str(tmp_path))  # real files whose md5 is not the release's
    with pytest.raises(DatasetNotFoundError, match="checksums"):
        data.load_stl10(str(tmp_path), "test")


def test_stl10_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        data.load_stl10(str(tmp_path), "unlabeled")


# ---------------------------------------------------------------------------------------------
# the pipeline
# ---------------------------------------------------------------------------------------------
def _seed_transform(size):
    from PIL import Image
    from torchvision import transforms

    tf = transforms.Compose(
        [
            transforms.Resize((size, size)),
            transforms.ToTensor(),
            transforms.Normalize(data.IMAGENET_MEAN, data.IMAGENET_STD),
        ]
    )
    return lambda images: torch.stack([tf(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])


@pytest.mark.parametrize("size", [224, 80])
def test_device_pipeline_matches_the_seeds_pil_transforms(size):
    """Resize (up or down) + ToTensor + Normalize on PIL images, as the seed did. PIL rounds to
    uint8 after resizing and uses its own fixed-point filter, so the bound is 1.5 grey levels."""
    arrays = data.make_synthetic("test", 6, seed=2)
    x, y = next(iter(DeviceLoader(arrays, 6, train=False, input_size=size, device="cpu")))
    ref = _seed_transform(size)(arrays.images)
    assert x.shape == (6, 3, size, size) and x.dtype == torch.float32
    diff = (x - ref).abs()
    assert diff.max() <= 1.5 / 255 / MIN_STD, diff.max()
    assert diff.mean() <= 0.35 / 255 / MIN_STD, diff.mean()
    assert torch.equal(y, arrays.labels)


def test_train_batches_are_a_flipped_permutation():
    arrays = data.make_synthetic("train", 20, seed=5)
    plain = torch.cat([x for x, _ in DeviceLoader(arrays, 7, train=False, input_size=72, device="cpu")])
    loader = DeviceLoader(arrays, 7, train=True, input_size=72, device="cpu", seed=11)
    assert len(loader) == 3
    loader.set_epoch(4)
    batches = list(loader)
    assert [x.shape[0] for x, _ in batches] == [7, 7, 6]
    seen, flipped = [], 0
    for x, y in batches:
        for img, label in zip(x, y):
            direct = (plain - img).abs().flatten(1).amax(1)
            mirror = (plain.flip(-1) - img).abs().flatten(1).amax(1)
            best = torch.minimum(direct, mirror)
            i = int(best.argmin())
            assert best[i] < 1e-4  # flip and bilinear resize commute up to rounding
            flipped += bool(mirror[i] < direct[i])
            assert label == arrays.labels[i]
            seen.append(i)
    assert sorted(seen) == list(range(20))
    assert 0 < flipped < 20
    # the same epoch gives the same batches; another epoch another order
    loader.set_epoch(4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, loader))
    loader.set_epoch(5)
    assert not torch.equal(next(iter(loader))[1], batches[0][1])


def test_iterating_without_set_epoch_advances_the_epoch():
    loader = DeviceLoader(
        data.make_synthetic("train", 30, seed=0), 30, train=True, input_size=72, device="cpu"
    )
    first, second = next(iter(loader))[1], next(iter(loader))[1]
    assert not torch.equal(first, second)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_channels_last_and_dtype(dtype):
    arrays = data.make_synthetic("test", 5, seed=0)
    ref, _ = next(iter(DeviceLoader(arrays, 5, train=False, input_size=100, device="cpu")))
    x, _ = next(
        iter(
            DeviceLoader(
                arrays, 5, train=False, input_size=100, device="cpu", dtype=dtype, channels_last=True
            )
        )
    )
    assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert ((x.float() - ref).abs().max() / ref.abs().max()) <= tol


def test_drop_last():
    loader = DeviceLoader(
        data.make_synthetic("train", 20, seed=0), 8, train=True, input_size=72, device="cpu", drop_last=True
    )
    assert len(loader) == 2 and loader.num_images == 16
    assert [y.shape[0] for _, y in loader] == [8, 8]


def test_shards_are_disjoint_and_equal():
    arrays = data.make_synthetic("train", 11, seed=0)
    shards = [arrays.shard(r, 3, equal=True) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3]
    uneven = [arrays.shard(r, 3, equal=False) for r in range(3)]
    assert sum(len(s) for s in uneven) == 11
    rows = torch.cat([s.images for s in uneven]).flatten(1)
    assert torch.unique(rows, dim=0).shape[0] == 11


def test_dataloader_path_matches_the_device_path():
    train_dl, test_dl = data.get_stl10_loaders(
        batch_size=4, input_size=72, dataset="synthetic", limit=8, pipeline="dataloader"
    )
    _, test_dev = data.get_stl10_loaders(
        batch_size=4, input_size=72, dataset="synthetic", limit=8, device="cpu"
    )
    assert isinstance(train_dl, torch.utils.data.DataLoader)
    x_dl, y_dl = next(iter(test_dl))
    x_dev, y_dev = next(iter(test_dev))
    assert torch.equal(y_dl, y_dev)
    assert (x_dl - x_dev).abs().max() <= 1.5 / 255 / MIN_STD
    xb, yb = next(iter(train_dl))
    assert xb.shape == (4, 3, 72, 72) and yb.dtype == torch.int64
    assert test_dev.classes == data.SYNTHETIC_CLASSES


def test_bad_arguments():
    good = data.make_synthetic("test", 4)
    with pytest.raises(ValueError, match="images must be uint8"):
        ImageArrays(good.images.float(), good.labels, good.classes)
    with pytest.raises(ValueError, match="labels must be int64"):
        ImageArrays(good.images, good.labels[:2], good.classes)
    with pytest.raises(ValueError, match="dataset must be one of"):
        data.load_dataset("imagenet", "train")
    with pytest.raises(ValueError, match="batch_size"):
        DeviceLoader(good, 0, train=True)
    with pytest.raises(ValueError, match="limit"):
        good.head(0)
    with pytest.raises(ValueError, match="pipeline"):
        data.get_stl10_loaders(dataset="synthetic", limit=4, pipeline="threads")
    with pytest.raises(ValueError, match="num_images"):
        data.make_synthetic("train", 0)
