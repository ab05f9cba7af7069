"""Writes examples/walkthrough.ipynb (nbformat 4) from the cells below: edit here, then run
``python examples/make_walkthrough.py``. tests/test_notebook.py checks the two agree."""

import json
import os
import sys

PARAMETERS = """\
import torch
import matplotlib.pyplot as plt  # noqa: F401  (makes Jupyter show the returned figures inline)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# A GPU runs the full-size recipe in a minute; the CPU gets a smaller, shorter run.
ON_GPU = DEVICE == "cuda"
LIMIT = 5000 if ON_GPU else 400  # training and test images
INPUT_SIZE = 224 if ON_GPU else 96
EPOCHS = 10 if ON_GPU else 5
BATCH_SIZE = 64 if ON_GPU else 32
LR = 1e-2
BACKEND = "auto"  # or "torch", "native", "triton": the same model, other kernels"""

CELLS = [
    (
        "markdown",
        """\
# alexnet_fast: a walkthrough

Train the seed's AlexNet (LRN after conv1/conv2, overlapping max-pools, 224×224 inputs) briefly on the
embedded synthetic dataset, then look at what it learned: the data, the training curves, predictions,
first-layer filters, feature maps, embeddings and the confusion matrix. Everything here is the
package's API; `alexnet-fast train` and `alexnet-fast viz` do the same from the command line.""",
    ),
    ("code", PARAMETERS, {"tags": ["parameters"]}),
    (
        "markdown",
        """\
## The data

The synthetic dataset has STL-10's shape (uint8 3×96×96 images, ten classes), generated
deterministically from a seed: a shape, a colour and a texture per class, placed at random on a
noisy background. `DeviceLoader` keeps the uint8 images on the training device and flips, resizes
(96→224, bilinear) and normalizes every batch there, as the seed's transforms did image by image.""",
    ),
    (
        "code",
        """\
from alexnet_fast import viz
from alexnet_fast.data import DeviceLoader, make_synthetic

train_loader = DeviceLoader(make_synthetic("train", LIMIT), BATCH_SIZE, train=True, input_size=INPUT_SIZE,
                            device=DEVICE)
images, labels = next(iter(train_loader))
viz.show_batch_images_rgb(images, labels, n=16, title="a training batch (flipped at random)",
                          class_names=train_loader.classes)""",
    ),
    (
        "markdown",
        """\
## Training

`fit` is what `alexnet-fast train` runs: SGD with momentum 0.9 and weight decay 5e-4,
ReduceLROnPlateau on test top-1, cross-entropy. With `out=...` it also writes metrics, curves and
checkpoints; here it keeps everything in memory.""",
    ),
    (
        "code",
        """\
from alexnet_fast.train import TrainConfig, fit

config = TrainConfig(data="synthetic", limit=LIMIT, input_size=INPUT_SIZE, epochs=EPOCHS,
                     batch_size=BATCH_SIZE, lr=LR, backend=BACKEND, device=DEVICE)
result = fit(config)
model = result.model""",
    ),
    (
        "code",
        """\
from alexnet_fast.metrics import plot_curves

plot_curves(result.history)""",
    ),
    (
        "code",
        """\
from matplotlib.figure import Figure

fig = Figure(figsize=(9, 3), layout="constrained")
ax = fig.subplots()
ax.plot(result.step_losses)
ax.set(xlabel="step", ylabel="training loss", title="loss at every step")
fig""",
    ),
    ("markdown", "## Predictions on the test split"),
    (
        "code",
        """\
test_loader = DeviceLoader(make_synthetic("test", LIMIT), 256, train=False, input_size=INPUT_SIZE,
                           device=DEVICE)
viz.visualize_test_predictions_rgb(model, test_loader, n=16)""",
    ),
    ("code", "viz.visualize_test_predictions_rgb(model, test_loader, n=16, only_errors=True)"),
    ("markdown", "## First-layer filters\n\nconv1's 96 filters (11×11 RGB), each scaled to its own range."),
    ("code", "viz.visualize_conv_filters(model)"),
    (
        "markdown",
        """\
## Feature maps

Our layers fuse conv+ReLU and LRN+max-pool; `feature_maps` recomputes the stages in between.
`layer_stages` lists what can be shown.""",
    ),
    (
        "code",
        """\
for index, stage, description in viz.layer_stages(model):
    print(f"features[{index}] {stage:9} {description}")
image = next(iter(test_loader))[0][0]
viz.visualize_feature_maps(model, 0, image, stage="pre_relu")""",
    ),
    ("code", "viz.visualize_feature_maps(model, 0, image)"),
    ("code", 'viz.visualize_feature_maps(model, 1, image, stage="lrn")'),
    (
        "markdown",
        "## Embeddings\n\nThe 9216-d output of `features` + `avgpool` for the test images, mapped to 2-D.",
    ),
    (
        "code",
        """\
embeddings, embedding_labels = viz.get_embeddings(model, test_loader)
viz.plot_embeddings(embeddings, embedding_labels, "tsne", test_loader.classes)""",
    ),
    ("code", 'viz.plot_embeddings(embeddings, embedding_labels, "pca", test_loader.classes)'),
    ("markdown", "## Confusion matrix"),
    (
        "code",
        """\
from alexnet_fast.train import evaluate_classification

metrics, predictions, truth, _ = evaluate_classification(test_loader, model, torch.nn.CrossEntropyLoss(),
                                                         return_preds=True)
print({k: round(v, 3) for k, v in metrics.items()})
counts = viz.confusion_matrix(predictions, truth, len(test_loader.classes))
viz.plot_confusion_matrix(counts, test_loader.classes)""",
    ),
]


def notebook() -> dict:
    cells = []
    for i, (kind, source, *extra) in enumerate(CELLS):
        cell = {
            "cell_type": kind,
            "id": f"cell-{i:02d}",
            "metadata": extra[0] if extra else {},
            "source": source.splitlines(keepends=True),
        }
        if kind == "code":
            cell.update(execution_count=None, outputs=[])
        cells.append(cell)
    return {
        "cells": cells,
        "metadata": {
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python", "pygments_lexer": "ipython3"},
        },
        "nbformat": 4,
        "nbformat_minor": 5,
    }


def render() -> str:
    return json.dumps(notebook(), indent=1, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    path = (
        sys.argv[1]
        if len(sys.argv) > 1
        else os.path.join(os.path.dirname(os.path.abspath(__file__)), "walkthrough.ipynb")
    )
    with open(path, "w", encoding="utf-8") as f:
        f.write(render())
    print(f"wrote {path}")
