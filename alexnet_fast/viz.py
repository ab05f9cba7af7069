"""Pictures of the data, the predictions and the network (``alexnet-fast viz``).

Every plotting function returns a ``matplotlib.figure.Figure`` (shown inline in a notebook) and
writes it as a PNG when given ``save_path``. Figures are built without pyplot, so nothing here
needs a display or changes matplotlib's backend.

The seed's names are kept: ``denormalize_rgb``, ``show_batch_images_rgb``,
``visualize_test_predictions_rgb``, ``visualize_conv_filters``, ``visualize_feature_maps``,
``get_embeddings``. Our model fuses conv+ReLU and LRN+max-pool into single layers, so
``feature_maps`` recomputes the intermediate results (before the ReLU, after the LRN) from a
layer's input.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from alexnet_fast.data import IMAGENET_MEAN, IMAGENET_STD

STAGES = ("output", "pre_relu", "lrn")


def denormalize_rgb(img_tensor: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """A normalized (3, H, W) image (or the first of an (N, 3, H, W) batch) as an (H, W, 3)
    float tensor in [0, 1] on the CPU, ready for ``imshow``."""
    if img_tensor.dim() == 4:
        img_tensor = img_tensor[0]
    if img_tensor.dim() != 3 or img_tensor.shape[0] != 3:
        raise ValueError(f"img_tensor must be (3, H, W) or (N, 3, H, W), got shape {tuple(img_tensor.shape)}")
    img = img_tensor.detach().float().cpu()
    img = img * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    return img.permute(1, 2, 0).clamp(0, 1)


def _unit_range(t: torch.Tensor, dims) -> torch.Tensor:
    """Scale to [0, 1] over ``dims``; constant slices (a dead ReLU channel is all zeros) become 0
    instead of 0/0."""
    lo, hi = t.amin(dims, keepdim=True), t.amax(dims, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (t - lo) / span.clamp_min(torch.finfo(t.dtype).tiny), torch.zeros_like(t))


def _grid(n: int, cols: int, cell=(2.0, 2.2), title: str | None = None):
    from matplotlib.figure import Figure

    cols = max(1, min(cols, n))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(cell[0] * cols, cell[1] * rows + (0.4 if title else 0)), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes:
        ax.axis("off")
    if title:
        fig.suptitle(title, weight="bold")
    return fig, axes


def _finish(fig, save_path):
    if save_path is not None:
        fig.savefig(save_path, dpi=100)
    return fig


def _class_name(label: int, class_names) -> str:
    return class_names[label] if class_names is not None else str(label)


def show_batch_images_rgb(
    images,
    labels,
    preds=None,
    n: int = 16,
    title: str | None = None,
    class_names=None,
    save_path: str | None = None,
    cols: int = 8,
):
    """A grid of the first ``n`` normalized images with their labels (and predictions, green when
    right, red when wrong)."""
    n = min(n, len(images))
    if n == 0:
        raise ValueError("images is empty: nothing to show")
    fig, axes = _grid(n, cols, title=title)
    for i in range(n):
        ax = axes[i]
        ax.imshow(denormalize_rgb(images[i]).numpy())
        y = int(labels[i])
        if preds is None:
            ax.set_title(f"y={_class_name(y, class_names)}", fontsize=9)
        else:
            p = int(preds[i])
            ax.set_title(
                f"y={_class_name(y, class_names)}\npred={_class_name(p, class_names)}",
                fontsize=9,
                color="green" if p == y else "red",
            )
    return _finish(fig, save_path)


def _model_device_dtype(model):
    p = next(model.parameters())
    return p.device, p.dtype


@torch.no_grad()
def visualize_test_predictions_rgb(
    model,
    test_loader,
    device=None,
    n: int = 16,
    only_errors: bool = False,
    class_names=None,
    save_path: str | None = None,
):
    """Run ``model`` over ``test_loader`` and show ``n`` images with true and predicted labels
    (only misclassified ones with ``only_errors``). Class names default to the loader's
    ``classes``."""
    model_device, dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    if class_names is None:
        class_names = getattr(test_loader, "classes", None) or getattr(
            getattr(test_loader, "dataset", None), "classes", None
        )
    model.eval()
    images, labels, preds = [], [], []
    seen = 0
    for x, y in test_loader:
        x, y = x.to(device, dtype), y.to(device)
        p = model(x).argmax(1)
        keep = (p != y) if only_errors else torch.ones_like(y, dtype=torch.bool)
        images.append(x[keep].cpu())
        labels.append(y[keep].cpu())
        preds.append(p[keep].cpu())
        seen += y.shape[0]
        if sum(len(t) for t in labels) >= n:
            break
    images, labels, preds = torch.cat(images), torch.cat(labels), torch.cat(preds)
    if len(labels) == 0:
        fig, axes = _grid(1, 1, cell=(4.0, 1.5))
        axes[0].text(0.5, 0.5, f"no misclassified images among {seen} test images", ha="center", va="center")
        return _finish(fig, save_path)
    title = (
        f"misclassified test images ({len(labels) if len(labels) < n else f'first {n}'} of {seen} seen)"
        if only_errors
        else "test images: true (y) and predicted labels"
    )
    return show_batch_images_rgb(
        images, labels, preds, n=n, title=title, class_names=class_names, save_path=save_path
    )


def _first_conv(layer):
    from torch import nn

    from alexnet_fast.model import AlexNet, ConvReLU

    if isinstance(layer, AlexNet):
        layer = layer.features[0]
    if isinstance(layer, ConvReLU):
        layer = layer.net[0]
    if isinstance(layer, nn.Conv2d):
        return layer.weight
    if isinstance(layer, torch.Tensor) and layer.dim() == 4:
        return layer
    raise TypeError(
        f"layer must be an AlexNet, a ConvReLU, an nn.Conv2d or a 4-D weight tensor, "
        f"got {type(layer).__name__}"
    )


def visualize_conv_filters(
    layer, num_filters: int | None = None, save_path: str | None = None, cols: int = 12
):
    """The filters of a convolution (by default AlexNet's first layer, 96 RGB 11x11 filters), each
    scaled to its own range; filters with other than 3 input channels show their channel mean."""
    weight = _first_conv(layer).detach().float().cpu()
    num_filters = weight.shape[0] if num_filters is None else min(num_filters, weight.shape[0])
    weight = weight[:num_filters]
    rgb = weight.shape[1] == 3
    shown = _unit_range(weight if rgb else weight.mean(1, keepdim=True), (1, 2, 3))
    fig, axes = _grid(
        num_filters, cols, cell=(1.0, 1.05), title=f"{num_filters} filters, {tuple(weight.shape[1:])} each"
    )
    for i in range(num_filters):
        img = shown[i].permute(1, 2, 0).numpy()
        axes[i].imshow(img if rgb else img[..., 0], cmap=None if rgb else "gray", interpolation="nearest")
        axes[i].set_title(str(i), fontsize=7)
    return _finish(fig, save_path)


def layer_stages(model) -> list[tuple[int, str, str]]:
    """``(index in model.features, stage, description)`` of every feature map one can look at."""
    from alexnet_fast.model import ConvReLU, LRNMaxPool

    out, conv = [], 0
    for i, layer in enumerate(model.features):
        if isinstance(layer, ConvReLU):
            conv += 1
            out.append((i, "pre_relu", f"conv{conv} before ReLU"))
            out.append((i, "output", f"conv{conv} after ReLU"))
        elif isinstance(layer, LRNMaxPool):
            if layer.lrn:
                out.append((i, "lrn", f"after conv{conv}'s LRN"))
            out.append((i, "output", f"after conv{conv}'s {'LRN + ' if layer.lrn else ''}max-pool"))
        else:
            out.append((i, "output", f"after conv{conv}'s max-pool"))
    return out


@torch.no_grad()
def feature_maps(model, image: torch.Tensor, layer_idx: int, stage: str = "output") -> torch.Tensor:
    """(C, H, W) float32 CPU feature maps of ``model.features[layer_idx]`` for one normalized image
    (3, H, W) or (1, 3, H, W). ``stage``: "output" (the layer's output), "pre_relu" (a conv layer
    before its ReLU), "lrn" (an LRN + max-pool layer after the LRN, before the pool)."""
    from alexnet_fast import ops
    from alexnet_fast.model import LRN_PARAMS, ConvReLU, LRNMaxPool

    if not 0 <= layer_idx < len(model.features):
        raise ValueError(f"layer_idx must be in [0, {len(model.features)}), got {layer_idx}")
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    layer = model.features[layer_idx]
    if stage == "pre_relu" and not isinstance(layer, ConvReLU):
        raise ValueError(
            f"stage 'pre_relu' needs a conv layer; features[{layer_idx}] is {type(layer).__name__}"
        )
    if stage == "lrn" and not (isinstance(layer, LRNMaxPool) and layer.lrn):
        raise ValueError(f"stage 'lrn' needs an LRN layer; features[{layer_idx}] is {type(layer).__name__}")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be one (3, H, W) or (1, 3, H, W) image, got shape {tuple(image.shape)}")
    device, dtype = _model_device_dtype(model)
    model.eval()
    x = image.to(device, dtype)
    for i in range(layer_idx):
        x = model.features[i](x)
    if stage == "pre_relu":
        conv = layer.net[0]
        x = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    elif stage == "lrn":
        x = ops.lrn(x, **LRN_PARAMS, backend=layer.backend)
    else:
        x = layer(x)
    return x[0].float().cpu()


def visualize_feature_maps(
    model,
    layer_idx: int,
    input_image: torch.Tensor,
    device=None,
    num_maps: int = 16,
    stage: str = "output",
    save_path: str | None = None,
    cols: int = 8,
):
    """The first ``num_maps`` channels of :func:`feature_maps` for one image, each scaled to its
    own range (all-zero channels, common after ReLU, show as black and say so)."""
    if device is not None:
        model = model.to(device)
    maps = feature_maps(model, input_image, layer_idx, stage)
    num_maps = min(num_maps, maps.shape[0])
    names = {(i, s): d for i, s, d in layer_stages(model)}
    title = f"features[{layer_idx}] {names.get((layer_idx, stage), stage)}: {tuple(maps.shape)}"
    fig, axes = _grid(num_maps, cols, cell=(1.6, 1.75), title=title)
    shown = _unit_range(maps[:num_maps], (1, 2))
    for c in range(num_maps):
        axes[c].imshow(shown[c].numpy(), cmap="viridis", vmin=0, vmax=1)
        peak = maps[c].abs().max().item()
        axes[c].set_title(
            f"ch {c}" + (" (all 0)" if peak == 0 else f" max {maps[c].max().item():.2g}"), fontsize=8
        )
    return _finish(fig, save_path)


@torch.no_grad()
def get_embeddings(model, dataloader, device=None):
    """(embeddings (N, 9216) float32, labels (N,)) as numpy arrays: the ``features`` + ``avgpool``
    output, flattened, of every image of ``dataloader``."""
    model_device, dtype = _model_device_dtype(model)
    device = torch.device(device) if device is not None else model_device
    model.eval()
    embeddings, labels = [], []
    for x, y in dataloader:
        feats = model.avgpool(model.features_forward(x.to(device, dtype)))
        embeddings.append(torch.flatten(feats, 1).float().cpu())
        labels.append(y.cpu())
    return torch.cat(embeddings).numpy(), torch.cat(labels).numpy()


def project_embeddings(embeddings, method: str = "tsne", seed: int = 0):
    """(N, 2) projection of (N, D) embeddings by t-SNE (after PCA to 50 dimensions) or PCA."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    n = embeddings.shape[0]
    if method not in ("tsne", "pca"):
        raise ValueError(f"method must be 'tsne' or 'pca', got {method!r}")
    if n < 3:
        raise ValueError(f"projecting embeddings needs at least 3 images, got {n}")
    if method == "pca":
        return PCA(n_components=2, random_state=seed).fit_transform(embeddings)
    reduced = embeddings
    if embeddings.shape[1] > 50 and n > 50:
        reduced = PCA(n_components=50, random_state=seed).fit_transform(embeddings)
    perplexity = min(30.0, (n - 1) / 3)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced)


def plot_embeddings(
    embeddings, labels, method: str = "tsne", class_names=None, seed: int = 0, save_path: str | None = None
):
    """2-D t-SNE or PCA map of the embeddings, one colour per class."""
    import numpy as np
    from matplotlib.figure import Figure

    points = project_embeddings(embeddings, method, seed)
    labels = np.asarray(labels)
    fig = Figure(figsize=(8, 7), layout="constrained")
    ax = fig.subplots()
    classes = range(len(class_names)) if class_names is not None else sorted(set(labels.tolist()))
    for c in classes:
        sel = labels == c
        ax.scatter(
            points[sel, 0],
            points[sel, 1],
            s=8,
            alpha=0.75,
            color=f"C{c % 10}" if c < 10 else None,
            label=_class_name(c, class_names),
        )
    ax.legend(markerscale=2, fontsize=8, loc="best")
    ax.set_title(
        f"{'t-SNE' if method == 'tsne' else 'PCA'} of {embeddings.shape[1]}-d embeddings "
        f"({len(labels)} test images)"
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return _finish(fig, save_path)


def confusion_matrix(preds, labels, num_classes: int):
    """(num_classes, num_classes) int64 numpy counts: row = true class, column = prediction."""
    import numpy as np

    preds, labels = np.asarray(preds, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    if preds.shape != labels.shape:
        raise ValueError(f"preds and labels must have the same shape, got {preds.shape} and {labels.shape}")
    return np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes).reshape(
        num_classes, num_classes
    )


def plot_confusion_matrix(cm, class_names=None, save_path: str | None = None):
    """The confusion matrix, coloured by the share of each true class (row), annotated with counts."""
    import numpy as np
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    k = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=float), where=rows > 0)
    fig = Figure(figsize=(1.0 + 0.75 * k, 0.6 + 0.7 * k), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label="share of the true class")
    names = [_class_name(i, class_names) for i in range(k)]
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set(xlabel="predicted", ylabel="true")
    for i in range(k):
        for j in range(k):
            ax.text(
                j,
                i,
                str(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if share[i, j] > 0.5 else "black",
            )
    accuracy = np.trace(cm) / max(cm.sum(), 1) * 100
    ax.set_title(f"confusion matrix: {cm.sum()} test images, top-1 {accuracy:.1f}%")
    return _finish(fig, save_path)


# ---------------------------------------------------------------------------------------------
# alexnet-fast viz
# ---------------------------------------------------------------------------------------------
def write_all(
    model,
    train_loader,
    test_loader,
    out_dir: str,
    projections=("tsne",),
    layers=None,
    image_index: int = 0,
    num_images: int = 16,
) -> list[str]:
    """Write every picture for ``model`` into ``out_dir``; returns the paths written. The arguments
    are checked before anything is written."""
    from alexnet_fast.train import evaluate_classification

    check_pictures(model, test_loader.images.shape[0], projections, layers, image_index)
    os.makedirs(out_dir, exist_ok=True)
    classes = test_loader.classes
    written = []

    def path(name):
        written.append(os.path.join(out_dir, name))
        return written[-1]

    x, y = next(iter(train_loader))
    show_batch_images_rgb(
        x,
        y,
        n=num_images,
        title="training batch (augmented, denormalized)",
        class_names=classes,
        save_path=path("batch.png"),
    )
    visualize_test_predictions_rgb(
        model, test_loader, n=num_images, class_names=classes, save_path=path("predictions.png")
    )
    visualize_test_predictions_rgb(
        model, test_loader, n=num_images, only_errors=True, class_names=classes, save_path=path("errors.png")
    )
    visualize_conv_filters(model, save_path=path("filters.png"))
    image = next(iter(_single_image_loader(test_loader, image_index)))
    for idx, stage, _ in layer_stages(model):
        if layers is None or idx in layers:
            visualize_feature_maps(
                model, idx, image, stage=stage, save_path=path(f"feature_maps_{idx:02d}_{stage}.png")
            )
    _, preds, labels, _ = evaluate_classification(
        test_loader, model, torch.nn.CrossEntropyLoss(), return_preds=True
    )
    plot_confusion_matrix(
        confusion_matrix(preds, labels, len(classes)), classes, save_path=path("confusion_matrix.png")
    )
    embeddings, emb_labels = get_embeddings(model, test_loader)
    for method in projections:
        plot_embeddings(embeddings, emb_labels, method, classes, save_path=path(f"embeddings_{method}.png"))
    return written


def check_pictures(model, n_test: int, projections, layers, image_index: int, names=None) -> None:
    """Raise ValueError for :func:`write_all` arguments that cannot work with ``n_test`` test images.
    ``names`` maps "layers" and "image_index" to what the messages call them (a command's flags)."""
    name = {"layers": "layers", "image_index": "image_index", **(names or {})}
    if not 0 <= image_index < n_test:
        raise ValueError(f"{name['image_index']} must be in [0, {n_test}) (the test images), got {image_index}")
    known = {idx for idx, _, _ in layer_stages(model)}
    if layers is not None and not set(layers) <= known:
        raise ValueError(f"{name['layers']} must be among the feature indices {sorted(known)}, got {sorted(layers)}")
    if projections and n_test < 3:
        raise ValueError(f"projecting embeddings needs at least 3 test images, got {n_test}")


def _single_image_loader(loader, index: int):
    """The normalized test image ``index`` of a DeviceLoader, through the loader's own pipeline."""
    from alexnet_fast.data import DeviceLoader, ImageArrays

    arrays = ImageArrays(loader.images[index : index + 1], loader.labels[index : index + 1], loader.classes)
    single = DeviceLoader(
        arrays,
        1,
        train=False,
        input_size=loader.input_size,
        device=loader.device,
        dtype=loader.dtype,
        channels_last=loader.channels_last,
    )
    return (x[0] for x, _ in single)


def _cmd_viz(args) -> int:
    from alexnet_fast.train import user_errors

    return user_errors(_viz)(args)


def _viz(args) -> int:
    from alexnet_fast import checkpoint
    from alexnet_fast.data import DeviceLoader, default_device, load_dataset
    from alexnet_fast.train import ConfigError, data_settings

    try:
        layers = None if args.layers == "all" else {int(v) for v in args.layers.split(",")}
    except ValueError:
        raise ConfigError(f"--layers must be 'all' or comma-separated feature indices such as 0,1; got {args.layers!r}") from None
    device = default_device(args.device)
    model, config = checkpoint.load_model(args.checkpoint, backend=args.backend, device=device)
    d = data_settings(config, args.data, args.data_dir, args.limit, args.data_seed, args.input_size)
    train_set = load_dataset(d["data"], "train", d["data_dir"], args.num_images, d["data_seed"])
    test_set = load_dataset(d["data"], "test", d["data_dir"], d["limit"], d["data_seed"])
    common = dict(input_size=d["input_size"], device=device)
    train_loader = DeviceLoader(train_set, args.num_images, train=True, **common)
    test_loader = DeviceLoader(test_set, args.batch_size, train=False, **common)
    projections = ("tsne", "pca") if args.projection == "both" else (args.projection,)
    try:
        check_pictures(model, len(test_set), projections, layers, args.image_index,
                       names={"layers": "--layers", "image_index": "--image-index"})
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for p in write_all(
        model, train_loader, test_loader, args.out, projections, layers, args.image_index, args.num_images
    ):
        print(p)
    return 0


def add_commands(subparsers) -> None:
    """Add the ``viz`` subcommand to the ``alexnet-fast`` parser."""
    from alexnet_fast.backends import BACKENDS
    from alexnet_fast.cli import positive_int
    from alexnet_fast.train import add_checkpoint_data_arguments

    p = subparsers.add_parser(
        "viz", help="PNG pictures of data, predictions, filters, feature maps, embeddings"
    )
    add_checkpoint_data_arguments(p)
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument(
        "--projection",
        choices=("tsne", "pca", "both"),
        default="tsne",
        help="how to map the 9216-d embeddings to 2-D (default tsne)",
    )
    p.add_argument(
        "--layers", default="all", help="features indices whose maps to draw, e.g. 0,1 (default all)"
    )
    p.add_argument("--image-index", type=int, default=0, help="test image whose feature maps to draw")
    p.add_argument("--num-images", type=positive_int, default=16, help="images per grid")
    p.add_argument("--batch-size", type=positive_int, default=128)
    p.add_argument("--backend", choices=BACKENDS, default="auto")
    p.add_argument("--device", help="default: the GPU when there is one")
    p.set_defaults(func=_cmd_viz)
