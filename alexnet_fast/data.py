"""Datasets as uint8 arrays, and the batched image pipeline that runs on the training device.

A split is an :class:`ImageArrays`: uint8 images (N, 3, 96, 96), int64 labels and class names.
Two sources give them:

* ``stl10``: the official STL-10 binary release in ``<root>/stl10_binary/`` (what
  ``torchvision.datasets.STL10(root, download=True)`` leaves behind), read by torchvision's own
  ``STL10`` class with ``download=False``. Nothing is downloaded here.
* ``synthetic``: an STL-10-shaped dataset generated deterministically from a seed, with ten
  learnable classes (a shape, a colour and a texture per class, placed at random, with noise).

:class:`DeviceLoader` keeps a split on the training device and yields ``(images, labels)``
batches like a DataLoader over the seed's transforms (``Resize((224, 224))``, random horizontal
flip, ``ToTensor``, ImageNet ``Normalize``), computed batched on the device: shuffles and flips
come from a device generator, so no per-batch work happens on the host. ``get_stl10_loaders``
keeps the seed's signature and can also return ``torch.utils.data.DataLoader`` s for per-image
transforms of your own.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 96  # STL-10 images are 96x96
DATASETS = ("synthetic", "stl10")
SPLITS = ("train", "test")
STL10_CLASSES = ("airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck")
STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin")
SYNTHETIC_CLASSES = (
    "disk",
    "square",
    "ring",
    "triangle",
    "cross",
    "stripes",
    "checkerboard",
    "diamond",
    "two-dots",
    "frame",
)
# STL-10's own split sizes, so a synthetic epoch costs what a real one does.
SYNTHETIC_SIZES = {"train": 5000, "test": 8000}


class DeviceError(ValueError):
    """A device that is not cpu, cuda or cuda:N, or a GPU this machine does not have."""


def default_device(device=None) -> torch.device:
    """``device`` (checked), or the GPU when there is one and the CPU otherwise."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in ("cpu", "cuda"):
        raise DeviceError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} was requested but CUDA is not available")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s)")
    return parsed


class DatasetNotFoundError(FileNotFoundError):
    """The STL-10 binary release is missing from the given folder, or its files are damaged."""


def mix_seed(*values: int) -> int:
    """A 63-bit seed derived from integers, stable across runs, machines and Python versions."""
    digest = hashlib.blake2b(repr(tuple(int(v) for v in values)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class ImageArrays:
    """One split of a dataset: ``images`` uint8 (N, 3, H, W), ``labels`` int64 (N,) in
    ``[0, len(classes))``, and ``classes``, the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(
                f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int64 of shape ({self.images.shape[0]},), got {self.labels.dtype} "
                f"{tuple(self.labels.shape)}"
            )
        self.classes = tuple(self.classes)

    def __len__(self) -> int:
        return self.labels.shape[0]

    def head(self, n: int | None) -> "ImageArrays":
        """The first ``n`` images (all of them when ``n`` is None)."""
        if n is None:
            return self
        if n < 1:
            raise ValueError(f"limit must be a positive number of images, got {n}")
        return ImageArrays(self.images[:n], self.labels[:n], self.classes)

    def shard(self, rank: int, world_size: int, equal: bool) -> "ImageArrays":
        """Rank ``rank``'s part of the split: every ``world_size``-th image. ``equal=True`` drops
        the last ``len % world_size`` images so every rank runs the same number of steps."""
        if world_size == 1:
            return self
        n = len(self) - len(self) % world_size if equal else len(self)
        if n < world_size:
            raise ValueError(f"{len(self)} images cannot be shared by {world_size} processes")
        return ImageArrays(self.images[rank:n:world_size], self.labels[rank:n:world_size], self.classes)

    def to(self, device) -> "ImageArrays":
        return ImageArrays(self.images.to(device), self.labels.to(device), self.classes)


# ---------------------------------------------------------------------------------------------
# STL-10 from the official binary release
# ---------------------------------------------------------------------------------------------
def _stl10_missing_message(root: str) -> str:
    folder = os.path.join(os.path.abspath(root), "stl10_binary")
    missing = [f for f in STL10_FILES if not os.path.isfile(os.path.join(folder, f))]
    problem = (
        f"missing {', '.join(missing)}"
        if missing
        else "its files do not match the official release's checksums (damaged or partly downloaded)"
    )
    return (
        f"STL-10 not found in {folder}: {problem}. "
        f"Expected the official binary release ({', '.join(STL10_FILES)}) as "
        f"`torchvision.datasets.STL10(root, download=True)` leaves it. Fetch it once on a machine "
        f'with internet access: python -c "import torchvision; torchvision.datasets.STL10('
        f"'{root}', download=True)\" (or extract http://ai.stanford.edu/~acoates/stl10/stl10_binary.tar.gz "
        f"into {os.path.abspath(root)}), then pass --data-dir {root}; or train on the embedded "
        f"dataset with --data synthetic."
    )


def load_stl10(root: str, split: str = "train") -> ImageArrays:
    """A split of the STL-10 release in ``<root>/stl10_binary``, read by torchvision's ``STL10``
    (which checks every file's md5 first). Raises :class:`DatasetNotFoundError` naming the folder
    and how to get the dataset when it is missing or damaged."""
    import numpy as np
    from torchvision.datasets import STL10

    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        ds = STL10(root, split=split, download=False)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted"
        raise DatasetNotFoundError(_stl10_missing_message(root)) from e
    images = torch.from_numpy(np.ascontiguousarray(ds.data))
    labels = torch.from_numpy(ds.labels.astype(np.int64))
    return ImageArrays(images, labels, getattr(ds, "classes", STL10_CLASSES))


# ---------------------------------------------------------------------------------------------
# the synthetic dataset
# ---------------------------------------------------------------------------------------------
# Images are generated in chunks seeded by (seed, split, chunk index), so a shorter dataset is a
# prefix of a longer one and --limit never changes which images a run sees.
_CHUNK = 100  # 10 images of each class per chunk
_PALETTE = torch.tensor(
    [
        (0.90, 0.20, 0.20),
        (0.20, 0.80, 0.30),
        (0.20, 0.40, 0.95),
        (0.95, 0.85, 0.20),
        (0.85, 0.25, 0.80),
        (0.20, 0.85, 0.85),
        (1.00, 0.55, 0.10),
        (0.92, 0.92, 0.92),
        (0.55, 0.30, 0.90),
        (0.60, 0.95, 0.30),
    ]
)


def _shape_mask(cls: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Class ``cls``'s shape in the object's own coordinates (u, v), about [-1, 1]^2."""
    au, av = u.abs(), v.abs()
    if cls == 0:  # disk
        return u * u + v * v < 1
    if cls == 1:  # square
        return (au < 0.8) & (av < 0.8)
    if cls == 2:  # ring
        r2 = u * u + v * v
        return (r2 > 0.36) & (r2 < 1)
    if cls == 3:  # triangle, pointing up
        return (v < 0.8) & (au < (v + 0.9) * 0.55)
    if cls == 4:  # cross
        return ((au < 0.25) & (av < 1)) | ((av < 0.25) & (au < 1))
    if cls == 5:  # horizontal stripes
        return (au < 1) & (av < 1) & (torch.sin(v * 3 * math.pi) > 0)
    if cls == 6:  # checkerboard
        return (au < 1) & (av < 1) & ((torch.floor(u * 2) + torch.floor(v * 2)) % 2 == 0)
    if cls == 7:  # diamond
        return au + av < 1
    if cls == 8:  # two dots
        return ((au - 0.5) ** 2 + v * v) < 0.16
    box = torch.maximum(au, av)  # frame
    return (box > 0.65) & (box < 1)


def _synthetic_chunk(seed: int, split: str, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(mix_seed(seed, SPLITS.index(split), chunk))
    n, size, k = _CHUNK, IMAGE_SIZE, _CHUNK // len(SYNTHETIC_CLASSES)
    # Generated class by class (contiguous slices, no gathers), shuffled at the end.
    labels = torch.arange(n) // k

    def uniform(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*shape, generator=g)

    radius = uniform(16, 32, n, 1, 1)
    cx = radius + torch.rand(n, 1, 1, generator=g) * (size - 2 * radius)
    cy = radius + torch.rand(n, 1, 1, generator=g) * (size - 2 * radius)
    angle = uniform(-math.pi / 12, math.pi / 12, n, 1, 1)
    grid = torch.arange(size, dtype=torch.float32) + 0.5
    dx, dy = grid.view(1, 1, -1) - cx, grid.view(1, -1, 1) - cy
    u = (dx * torch.cos(angle) + dy * torch.sin(angle)) / radius
    v = (dy * torch.cos(angle) - dx * torch.sin(angle)) / radius
    mask = torch.empty(n, size, size, dtype=torch.bool)
    for cls in range(len(SYNTHETIC_CLASSES)):
        rows = slice(cls * k, (cls + 1) * k)
        mask[rows] = _shape_mask(cls, u[rows], v[rows])

    # Background: a dark colour with a gentle linear gradient in a random direction.
    background = uniform(0.0, 0.45, n, 3, 1, 1)
    direction = uniform(0, 2 * math.pi, n, 1, 1)
    ramp = torch.cos(direction) * (grid.view(1, 1, -1) / size - 0.5) + torch.sin(direction) * (
        grid.view(1, -1, 1) / size - 0.5
    )
    background = background + 0.15 * ramp.unsqueeze(1)
    foreground = (_PALETTE[labels] + 0.08 * torch.randn(n, 3, generator=g)).view(n, 3, 1, 1)
    image = torch.where(mask.unsqueeze(1), foreground, background)
    image.add_(torch.randn(n, 3, size, size, generator=g), alpha=0.05).clamp_(0, 1).mul_(255).round_()
    order = torch.randperm(n, generator=g)
    return image.to(torch.uint8)[order], labels[order]


def make_synthetic(split: str = "train", num_images: int | None = None, seed: int = 0) -> ImageArrays:
    """The synthetic dataset's ``split``: uint8 (N, 3, 96, 96) images of ten classes
    (``SYNTHETIC_CLASSES``), the same for the same ``seed`` on every machine. ``num_images``
    defaults to STL-10's split size."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    n = SYNTHETIC_SIZES[split] if num_images is None else num_images
    if n < 1:
        raise ValueError(f"num_images must be positive, got {n}")
    chunks = [_synthetic_chunk(seed, split, c) for c in range(math.ceil(n / _CHUNK))]
    images = torch.cat([c[0] for c in chunks])[:n]
    labels = torch.cat([c[1] for c in chunks])[:n]
    return ImageArrays(images, labels, SYNTHETIC_CLASSES)


def load_dataset(
    name: str, split: str, root: str = "./data", limit: int | None = None, seed: int = 0
) -> ImageArrays:
    """``split`` of dataset ``name`` ("synthetic" or "stl10"), at most ``limit`` images."""
    if name == "synthetic":
        return make_synthetic(split, limit, seed)
    if name == "stl10":
        return load_stl10(root, split).head(limit)
    raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")


# ---------------------------------------------------------------------------------------------
# the image pipeline on the device
# ---------------------------------------------------------------------------------------------
def normalization(device, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of shape (1, 3, 1, 1) with ``uint8 * scale + shift`` equal to the seed's
    ``Normalize(mean, std)(ToTensor()(image))``."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (1 / (255 * std_t)).to(device), (-mean_t / std_t).to(device)


def preprocess(
    images: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    input_size: int = 224,
    flip: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """uint8 (B, 3, H, W) images to a normalized (B, 3, input_size, input_size) batch of ``dtype``:
    horizontally flipped where the bool (B,) ``flip`` is set, normalized, resized bilinearly.

    The order differs from the seed's (resize, flip, normalize) where that is cheaper and exact:
    a horizontal flip commutes with a bilinear resize, and so does the per-channel affine
    normalization; working at 96x96 touches 5x fewer pixels. The one difference is that the seed's
    PIL resize rounds to uint8 before normalizing; here the resize stays in float32 (a difference
    of at most half a grey level)."""
    from torchvision.transforms.v2 import functional as TF

    if flip is not None:
        images = torch.where(flip.view(-1, 1, 1, 1), TF.horizontal_flip(images), images)
    if channels_last:
        # Converting the small uint8 batch makes every later op produce channels_last for free.
        images = images.contiguous(memory_format=torch.channels_last)
    x = torch.addcmul(shift, images, scale)
    if x.shape[-1] != input_size or x.shape[-2] != input_size:
        # transforms.Resize antialiases by default, which only acts when shrinking; upsampling
        # 96 -> 224 is plain bilinear either way.
        x = TF.resize(
            x,
            [input_size, input_size],
            interpolation=TF.InterpolationMode.BILINEAR,
            antialias=input_size < min(x.shape[-2:]),
        )
    return x.to(dtype)


class DeviceLoader:
    """``(images, labels)`` batches of an :class:`ImageArrays` held on ``device`` as uint8.

    ``train=True`` reshuffles and flips at random each epoch, with permutation and flips drawn on
    the device from a generator seeded by ``(seed, epoch)``: a run is reproducible and resumable
    from any epoch. Call :meth:`set_epoch` before each epoch (as with ``DistributedSampler``);
    without it each iteration starts the next epoch. ``classes`` names the labels.
    """

    def __init__(
        self,
        arrays: ImageArrays,
        batch_size: int,
        *,
        train: bool,
        input_size: int = 224,
        device=None,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(input_size, int) or input_size < 1:
            raise ValueError(f"input_size must be a positive int, got {input_size!r}")
        if drop_last and len(arrays) < batch_size:
            raise ValueError(
                f"drop_last with batch_size {batch_size} leaves no batch of {len(arrays)} images"
            )
        self.device = torch.device(device) if device is not None else arrays.images.device
        self.images = arrays.images.to(self.device)
        self.labels = arrays.labels.to(self.device)
        self.classes = arrays.classes
        self.batch_size = batch_size
        self.train = train
        self.input_size = input_size
        self.dtype = dtype
        self.channels_last = channels_last
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._scale, self._shift = normalization(self.device)

    def __len__(self) -> int:
        n = self.labels.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_images(self) -> int:
        """Images per epoch (after drop_last)."""
        return len(self) * self.batch_size if self.drop_last else self.labels.shape[0]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        n = self.labels.shape[0]
        order = flips = None
        if self.train:
            g = torch.Generator(device=self.device).manual_seed(mix_seed(self.seed, epoch))
            order = torch.randperm(n, generator=g, device=self.device)
            flips = torch.rand(n, generator=g, device=self.device) < 0.5
        for i in range(len(self)):
            batch = slice(i * self.batch_size, min((i + 1) * self.batch_size, n))
            if order is None:
                images, labels = self.images[batch], self.labels[batch]
            else:
                idx = order[batch]
                images, labels = self.images.index_select(0, idx), self.labels.index_select(0, idx)
            x = preprocess(
                images,
                self._scale,
                self._shift,
                self.input_size,
                flips[batch] if flips is not None else None,
                self.dtype,
                self.channels_last,
            )
            yield x, labels


# ---------------------------------------------------------------------------------------------
# the DataLoader path (per-image transforms) and the seed's entry point
# ---------------------------------------------------------------------------------------------
def seed_transform(input_size: int = 224, train: bool = True):
    """The seed's per-image transforms as ``torchvision.transforms.v2`` on uint8 (3, H, W) tensors."""
    from torchvision.transforms import v2

    steps = [v2.Resize((input_size, input_size), antialias=True)]
    if train:
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return v2.Compose(steps)


class ArrayDataset(torch.utils.data.Dataset):
    """``(transform(image), label)`` pairs of an :class:`ImageArrays`; ``transform`` receives a
    uint8 (3, H, W) tensor, as ``torchvision.transforms.v2`` transforms accept."""

    def __init__(self, arrays: ImageArrays, transform=None):
        self.arrays = arrays
        self.transform = transform
        self.classes = arrays.classes

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, index: int):
        image = self.arrays.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.arrays.labels[index])


def get_stl10_loaders(
    data_root: str = "./data",
    batch_size: int = 64,
    num_workers: int = 0,
    input_size: int = 224,
    *,
    dataset: str = "stl10",
    pipeline: str = "device",
    device=None,
    limit: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    train_transform=None,
    test_transform=None,
):
    """(train_loader, test_loader) over STL-10 in ``data_root`` (or the synthetic dataset with
    ``dataset="synthetic"``), yielding normalized ``(images, labels)`` batches as the seed's did.

    ``pipeline="device"`` (default) gives :class:`DeviceLoader` s on ``device`` (CUDA when
    available): data and augmentation live on the device and ``num_workers`` is unused.
    ``pipeline="dataloader"`` gives ``torch.utils.data.DataLoader`` s applying
    ``train_transform`` / ``test_transform`` (default: :func:`seed_transform`) image by image in
    ``num_workers`` worker processes; batches stay on the CPU.
    """
    if pipeline not in ("device", "dataloader"):
        raise ValueError(f"pipeline must be 'device' or 'dataloader', got {pipeline!r}")
    train = load_dataset(dataset, "train", data_root, limit, seed)
    test = load_dataset(dataset, "test", data_root, limit, seed)
    if pipeline == "device":
        if train_transform is not None or test_transform is not None:
            raise ValueError("train_transform/test_transform apply to pipeline='dataloader' only")
        common = dict(
            input_size=input_size,
            device=default_device(device),
            dtype=dtype,
            channels_last=channels_last,
            seed=seed,
        )
        return (
            DeviceLoader(train, batch_size, train=True, **common),
            DeviceLoader(test, batch_size, train=False, **common),
        )
    pin = torch.cuda.is_available()
    train_ds = ArrayDataset(train, train_transform or seed_transform(input_size, train=True))
    test_ds = ArrayDataset(test, test_transform or seed_transform(input_size, train=False))
    return (
        torch.utils.data.DataLoader(
            train_ds, batch_size, shuffle=True, num_workers=num_workers, pin_memory=pin
        ),
        torch.utils.data.DataLoader(
            test_ds, batch_size, shuffle=False, num_workers=num_workers, pin_memory=pin
        ),
    )
