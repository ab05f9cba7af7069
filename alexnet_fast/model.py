"""AlexNet (the seed's variant) built from our ops, and the layer table tests and benchmarks share.

The module tree reproduces the seed's state_dict keys exactly (``features.{0,2,4,5,6}.net.0.*`` for
the convolutions, ``classifier.classifier.{1,4,6}.*`` for the Linears), so a seed checkpoint loads
as it is; the backend changes which kernels run, never the parameters.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch
from torch import nn

from alexnet_fast import backends, linear, ops, reference


@dataclass(frozen=True)
class ConvSpec:
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    padding: int
    lrn_pool: bool  # followed by LRN -> max-pool (conv1, conv2)
    pool: bool  # followed by a plain max-pool (conv5)

    def out_size(self, size: int) -> int:
        return reference.conv_output_size(size, self.kernel, self.stride, self.padding)


# The seed's convolutions, in order. LRN(5, 1e-4, 0.75, 2.0) and max-pools 3x3/2 follow as marked.
ALEXNET_CONVS = (
    ConvSpec("conv1", 3, 96, 11, 4, 0, lrn_pool=True, pool=False),
    ConvSpec("conv2", 96, 256, 5, 1, 2, lrn_pool=True, pool=False),
    ConvSpec("conv3", 256, 384, 3, 1, 1, lrn_pool=False, pool=False),
    ConvSpec("conv4", 384, 384, 3, 1, 1, lrn_pool=False, pool=False),
    ConvSpec("conv5", 384, 256, 3, 1, 1, lrn_pool=False, pool=True),
)
LRN_PARAMS = dict(size=5, alpha=1e-4, beta=0.75, k=2.0)
POOL_PARAMS = dict(kernel_size=3, stride=2)
AVGPOOL_SIZE = (6, 6)
INPUT_SIZE = 224


def layer_shapes(batch: int = 128, size: int = INPUT_SIZE):
    """Input shape (N, C, H, W) of every op of the features stack, in order, as
    ``[(spec_or_op_name, input_shape), ...]``: the one table tests and benchmarks use."""
    rows = []
    for spec in ALEXNET_CONVS:
        rows.append((spec, (batch, spec.c_in, size, size)))
        size = spec.out_size(size)
        if spec.lrn_pool or spec.pool:
            rows.append(("lrn_max_pool2d" if spec.lrn_pool else "max_pool2d", (batch, spec.c_out, size, size)))
            size = reference.pool_output_size(size, 3, 2, 0, False)
    return rows


def fits_input_size(size: int) -> bool:
    """Whether an image of ``size`` x ``size`` gives every layer of the features stack at least
    its window (the padded input of each convolution, the input of each 3x3 pool)."""
    for layer, (_, _, h, _) in layer_shapes(1, size):
        window, padding = (layer.kernel, layer.padding) if isinstance(layer, ConvSpec) else (POOL_PARAMS["kernel_size"], 0)
        if h + 2 * padding < window:
            return False
    return True


@functools.lru_cache(maxsize=None)
def min_input_size() -> int:
    """AlexNet's smallest input side (67 for the seed's layers)."""
    return next(s for s in itertools.count(1) if fits_input_size(s))


class _BackendModule(nn.Module):
    def __init__(self, backend: str | None):
        super().__init__()
        self.backend = backend


class ConvReLU(_BackendModule):
    """Conv2d + bias + ReLU in one op. ``net[0]`` holds the parameters (the seed's key layout)."""

    def __init__(self, c_in, c_out, kernel, stride=1, padding=0, backend=None):
        super().__init__(backend)
        self.net = nn.Sequential(nn.Conv2d(c_in, c_out, kernel, stride, padding))

    def forward(self, x, pool: str | None = None):
        """relu(conv(x)); followed in one op (as :meth:`AlexNet.features_forward` runs it) by the
        seed's LRN and max-pool with ``pool="lrn_max_pool2d"`` (``ops.conv2d_relu_lrn_max_pool2d``)
        or its max-pool with ``pool="max_pool2d"`` (``ops.conv2d_relu_max_pool2d``)."""
        conv = self.net[0]
        args = (x, conv.weight, conv.bias, conv.stride, conv.padding)
        pooling = dict(kernel_size=POOL_PARAMS["kernel_size"], pool_stride=POOL_PARAMS["stride"],
                       backend=self.backend)
        if pool == "lrn_max_pool2d":
            return ops.conv2d_relu_lrn_max_pool2d(*args, **LRN_PARAMS, **pooling)
        if pool == "max_pool2d":
            return ops.conv2d_relu_max_pool2d(*args, **pooling)
        if pool is not None:
            raise ValueError(f"pool must be None, 'lrn_max_pool2d' or 'max_pool2d', got {pool!r}")
        return ops.conv2d_relu(*args, backend=self.backend)


class LRNMaxPool(_BackendModule):
    """LRN followed by an overlapping max-pool, fused into one op (a plain max-pool when
    ``lrn=False``)."""

    def __init__(self, lrn=True, backend=None):
        super().__init__(backend)
        self.lrn = lrn

    def forward(self, x):
        if self.lrn:
            return ops.lrn_max_pool2d(x, **LRN_PARAMS, **POOL_PARAMS, backend=self.backend)
        return ops.max_pool2d(x, **POOL_PARAMS, backend=self.backend)

    def extra_repr(self):
        return f"lrn={self.lrn}, {LRN_PARAMS if self.lrn else ''} {POOL_PARAMS}"


class MaxPool(_BackendModule):
    def forward(self, x):
        return ops.max_pool2d(x, **POOL_PARAMS, backend=self.backend)


class ClassifierHead(_BackendModule):
    """Dropout, Linear, ReLU x 2, Linear. Backends other than ``torch`` run the Linears through
    ``alexnet_fast.linear`` (float32 weight gradients straight from the products under autocast)."""

    def __init__(self, num_classes: int, backend: str | None = None):
        super().__init__(backend)
        c_last = ALEXNET_CONVS[-1].c_out
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(c_last * AVGPOOL_SIZE[0] * AVGPOOL_SIZE[1], 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )
        for m in self.classifier:
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = torch.flatten(x, 1)
        if backends.uses_reference(self.backend):
            return self.classifier(x)
        for m in self.classifier:
            x = linear.linear(x, m.weight, m.bias) if isinstance(m, nn.Linear) else m(x)
        return x


class AlexNet(nn.Module):
    """The seed's AlexNet: 224x224 input (227 works too), LRN after conv1/conv2, overlapping
    3x3/2 max-pools, adaptive 6x6 average pool, 9216 -> 4096 -> 4096 -> num_classes.

    ``backend`` ("auto", "torch", "native", "triton", or None for the global default) picks the
    kernels and can be changed after construction through ``model.backend``.
    """

    def __init__(self, num_classes: int = 10, backend: str | None = "auto", lrn: bool = True):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        layers = []
        for spec in ALEXNET_CONVS:
            layers.append(ConvReLU(spec.c_in, spec.c_out, spec.kernel, spec.stride, spec.padding))
            if spec.lrn_pool:
                layers.append(LRNMaxPool(lrn=lrn))
            elif spec.pool:
                layers.append(MaxPool(None))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(AVGPOOL_SIZE)
        self.classifier = ClassifierHead(num_classes)
        self.backend = backend

    @property
    def backend(self) -> str | None:
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        if name is not None and name not in backends.BACKENDS:
            raise ValueError(f"backend must be None or one of {backends.BACKENDS}, got {name!r}")
        self._backend = name
        for m in self.modules():
            if isinstance(m, _BackendModule):
                m.backend = name

    def features_forward(self, x):
        """``self.features(x)``, where a convolution and the pool after it (of the same backend)
        run as one op, ``ConvReLU(x, pool=...)``: its backward saves a pass."""
        layers = list(self.features)
        i = 0
        while i < len(layers):
            layer, after = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            pool = None
            if (isinstance(layer, ConvReLU) and isinstance(after, (LRNMaxPool, MaxPool))
                    and after.backend == layer.backend):
                pool = "lrn_max_pool2d" if isinstance(after, LRNMaxPool) and after.lrn else "max_pool2d"
            x = layer(x, pool=pool) if pool else layer(x)
            i += 2 if pool else 1
        return x

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"x must be an (N, 3, H, W) image batch, got shape {tuple(x.shape)}")
        return self.classifier(self.avgpool(self.features_forward(x)))


_PREFIXES = ("module.", "_orig_mod.")


def load_seed_state_dict(model: AlexNet, state_dict: dict, strict: bool = True):
    """Load a state_dict saved from the seed's model (or from DDP/torch.compile wrappers of ours,
    whose keys carry ``module.`` / ``_orig_mod.`` prefixes) into ``model``."""
    if not isinstance(state_dict, dict):
        raise TypeError(f"state_dict must be a dict of tensors, got {type(state_dict).__name__}")
    cleaned = {}
    for key, value in state_dict.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return model.load_state_dict(cleaned, strict=strict)
