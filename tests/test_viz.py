"""Visualizations: denormalization, feature maps and their stages, dead (all-zero) maps without
NaNs, confusion matrix, embeddings, and the ``viz`` command's files."""

import os
import re

import numpy as np
import pytest
import torch

from alexnet_fast import AlexNet, cli, data, viz
from alexnet_fast.model import LRN_PARAMS, POOL_PARAMS

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return AlexNet(backend="torch").eval()


@pytest.fixture(scope="module")
def test_loader():
    return data.DeviceLoader(
        data.make_synthetic("test", 24, seed=1), 8, train=False, input_size=72, device="cpu"
    )


def _image_arrays(fig):
    return [im.get_array() for ax in fig.axes for im in ax.get_images()]


def test_denormalize_inverts_the_pipeline():
    arrays = data.make_synthetic("test", 2, seed=0)
    x, _ = next(iter(data.DeviceLoader(arrays, 2, train=False, input_size=96, device="cpu")))
    for img, raw in zip(x, arrays.images):
        back = viz.denormalize_rgb(img)
        assert back.shape == (96, 96, 3)
        torch.testing.assert_close(back, raw.permute(1, 2, 0).float() / 255, rtol=0, atol=1e-5)
    assert viz.denormalize_rgb(x).shape == (96, 96, 3)  # a batch: its first image
    with pytest.raises(ValueError, match="img_tensor"):
        viz.denormalize_rgb(torch.zeros(1, 96, 96))


def test_feature_map_stages_agree_with_the_layers(model):
    image = torch.randn(3, 72, 72)
    pre = viz.feature_maps(model, image, 0, "pre_relu")
    post = viz.feature_maps(model, image, 0, "output")
    assert (pre < 0).any() and (pre > 0).any()
    torch.testing.assert_close(post, pre.clamp_min(0))
    after_lrn = viz.feature_maps(model, image, 1, "lrn")
    pooled = viz.feature_maps(model, image, 1, "output")
    expected_lrn = torch.nn.functional.local_response_norm(
        post.unsqueeze(0),
        **{
            "size": LRN_PARAMS["size"],
            "alpha": LRN_PARAMS["alpha"],
            "beta": LRN_PARAMS["beta"],
            "k": LRN_PARAMS["k"],
        },
    )[0]
    torch.testing.assert_close(after_lrn, expected_lrn)
    torch.testing.assert_close(pooled, torch.nn.functional.max_pool2d(after_lrn, **POOL_PARAMS))
    stages = viz.layer_stages(model)
    assert (0, "pre_relu", "conv1 before ReLU") in stages and (1, "lrn", "after conv1's LRN") in stages
    assert len(stages) == 5 * 2 + 2 * 2 + 1


def test_feature_map_argument_errors(model):
    image = torch.randn(3, 72, 72)
    with pytest.raises(ValueError, match="layer_idx"):
        viz.feature_maps(model, image, 8)
    with pytest.raises(ValueError, match="stage"):
        viz.feature_maps(model, image, 0, "post_pool")
    with pytest.raises(ValueError, match="pre_relu"):
        viz.feature_maps(model, image, 1, "pre_relu")
    with pytest.raises(ValueError, match="'lrn' needs an LRN layer"):
        viz.feature_maps(model, image, 0, "lrn")
    with pytest.raises(ValueError, match="one .3, H, W. or"):
        viz.feature_maps(model, torch.randn(2, 3, 72, 72), 0)


def test_dead_feature_maps_and_constant_filters_have_no_nans():
    """A conv whose ReLU output is all zero (a dead layer) and constant filters scale to 0, not 0/0."""
    torch.manual_seed(1)
    dead = AlexNet(backend="torch").eval()
    with torch.no_grad():
        dead.features[0].net[0].bias.fill_(-1e4)
        dead.features[0].net[0].weight[:4] = 0.5
    fig = viz.visualize_feature_maps(dead, 0, torch.randn(3, 72, 72), num_maps=8)
    arrays = _image_arrays(fig)
    assert len(arrays) == 8 and all(
        np.isfinite(np.asarray(a)).all() and np.asarray(a).max() == 0 for a in arrays
    )
    assert "(all 0)" in fig.axes[0].get_title()
    fig = viz.visualize_feature_maps(dead, 1, torch.randn(3, 72, 72), num_maps=4, stage="lrn")
    assert all(np.isfinite(np.asarray(a)).all() for a in _image_arrays(fig))
    fig = viz.visualize_conv_filters(dead, num_filters=8)
    arrays = [np.asarray(a) for a in _image_arrays(fig)]
    assert len(arrays) == 8 and all(np.isfinite(a).all() for a in arrays)
    assert arrays[0].max() == 0 and arrays[5].max() == 1  # constant filter vs a random one


def test_filters_of_other_layers_and_bad_input(model):
    fig = viz.visualize_conv_filters(model.features[2], num_filters=5)  # 96 input channels: channel mean
    assert len(_image_arrays(fig)) == 5
    with pytest.raises(TypeError, match="layer must be"):
        viz.visualize_conv_filters("conv1")


def test_predictions_and_errors(model, test_loader, tmp_path):
    fig = viz.visualize_test_predictions_rgb(model, test_loader, n=6, save_path=str(tmp_path / "p.png"))
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 6 and all("pred=" in t for t in titles)
    assert any(name in titles[0] for name in data.SYNTHETIC_CLASSES)  # class names from the loader
    assert open(tmp_path / "p.png", "rb").read(8) == PNG
    errors = viz.visualize_test_predictions_rgb(model, test_loader, n=4, only_errors=True)
    colors = [ax.title.get_color() for ax in errors.axes if ax.get_title()]
    assert colors and all(c == "red" for c in colors)


def test_errors_only_when_there_are_none(test_loader):
    class Oracle(torch.nn.Module):
        """Predicts the right class of every synthetic test image (by looking up its labels)."""

        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones(()))
            self.labels = iter(y for _, y in test_loader)

        def forward(self, x):
            return torch.nn.functional.one_hot(next(self.labels), 10).float() * self.scale

    fig = viz.visualize_test_predictions_rgb(Oracle(), test_loader, n=4, only_errors=True)
    assert "no misclassified images among 24" in fig.axes[0].texts[0].get_text()


def test_confusion_matrix():
    preds = [0, 1, 1, 2, 2, 2, 0]
    labels = [0, 1, 2, 2, 2, 0, 0]
    cm = viz.confusion_matrix(preds, labels, 3)
    expected = np.zeros((3, 3), dtype=np.int64)
    for p, y in zip(preds, labels):
        expected[y, p] += 1
    assert np.array_equal(cm, expected)
    fig = viz.plot_confusion_matrix(np.zeros((3, 3), dtype=np.int64), ["a", "b", "c"])  # empty rows: no 0/0
    assert all(np.isfinite(np.asarray(a)).all() for a in _image_arrays(fig))
    with pytest.raises(ValueError, match="same shape"):
        viz.confusion_matrix([0, 1], [0], 2)


@pytest.mark.parametrize("method", ["tsne", "pca"])
def test_embeddings(model, test_loader, method, tmp_path):
    embeddings, labels = viz.get_embeddings(model, test_loader)
    assert embeddings.shape == (24, 9216) and labels.shape == (24,)
    assert np.isfinite(embeddings).all()
    points = viz.project_embeddings(embeddings, method)
    assert points.shape == (24, 2) and np.isfinite(points).all()
    viz.plot_embeddings(embeddings, labels, method, data.SYNTHETIC_CLASSES, save_path=str(tmp_path / "e.png"))
    assert open(tmp_path / "e.png", "rb").read(8) == PNG
    with pytest.raises(ValueError, match="method"):
        viz.project_embeddings(embeddings, "umap")


def test_viz_command_writes_every_picture(tmp_path, capsys):
    weights = str(tmp_path / "seed.pt")
    torch.manual_seed(0)
    torch.save(AlexNet().state_dict(), weights)
    out = tmp_path / "pictures"
    assert (
        cli.main(
            [
                "viz",
                "--checkpoint",
                weights,
                "--out",
                str(out),
                "--data",
                "synthetic",
                "--limit",
                "20",
                "--input-size",
                "72",
                "--device",
                "cpu",
                "--backend",
                "torch",
                "--projection",
                "both",
                "--num-images",
                "8",
            ]
        )
        == 0
    )
    expected = {
        "batch.png",
        "predictions.png",
        "errors.png",
        "filters.png",
        "confusion_matrix.png",
        "embeddings_tsne.png",
        "embeddings_pca.png",
        "feature_maps_00_pre_relu.png",
        "feature_maps_00_output.png",
        "feature_maps_01_lrn.png",
        "feature_maps_01_output.png",
        "feature_maps_07_output.png",
    }
    written = set(os.listdir(out))
    assert (
        expected <= written and len(written) == len(expected) + 10
    )  # conv2..conv5 stages, conv2's LRN and pool
    assert all(open(out / name, "rb").read(8) == PNG for name in written)
    assert len(capsys.readouterr().out.splitlines()) == len(written)


@pytest.mark.parametrize("flags, message", [
    (["--layers", "a,b"], "--layers must be 'all' or comma-separated"),
    (["--layers", "99"], "--layers must be among the feature indices"),
    (["--image-index", "20"], r"--image-index must be in \[0, 20\)"),
    (["--limit", "2"], "at least 3 test images"),
    (["--input-size", "66"], "--input-size must be at least 67"),
])
def test_viz_arguments_are_checked_before_anything_is_written(tmp_path, capsys, flags, message):
    weights = str(tmp_path / "seed.pt")
    torch.save(AlexNet().state_dict(), weights)
    out = tmp_path / "pictures"
    args = ["viz", "--checkpoint", weights, "--out", str(out), "--data", "synthetic", "--limit", "20",
            "--input-size", "72", "--device", "cpu", "--backend", "torch", "--num-images", "4"]
    assert cli.main(args + flags) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and len(err.splitlines()) == 1, err
    assert not out.exists()
