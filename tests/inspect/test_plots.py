"""jaxcnn.inspect figures (plots) and feature_maps: valid PNGs, hand-checked values, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxcnn import inspect, models
from jaxcnn.inspect import plots
from jaxcnn.layers import BatchNorm, Conv2D, Dense, Flatten, MaxPool2D, Sequential

HISTORY = {"epoch": [1, 2, 3], "loss": [0.9, 0.4, 0.2], "accuracy": [0.7, 0.88, 0.94],
           "val_loss": [0.5, 0.35, 0.3], "val_accuracy": [0.85, 0.9, 0.91], "lr": [1e-3, 5e-4, 1e-5]}


def _png(path):
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == "PNG"
    return image.size, len(image.convert("RGB").getcolors(maxcolors=1 << 20) or ())


# -- plot_history ------------------------------------------------------------------------------------

def test_plot_history_two_panels(tmp_path):
  size, colours = _png(plots.plot_history(HISTORY, tmp_path / "h.png"))
  assert size == (1100, 420) and colours > 50
  # Loss only (e.g. an autoencoder): one panel, half as wide.
  size, _ = _png(plots.plot_history({"loss": [1.0, 0.5], "val_loss": [1.1, 0.7]}, tmp_path / "l.png"))
  assert size == (550, 420)


@pytest.mark.parametrize("history, match", [
    ({}, "'loss' series"),
    ({"loss": []}, "non-empty"),
    ({"loss": [1.0, 0.5], "val_loss": [1.0]}, r"history\['val_loss'\]: expected 2 values"),
    ([1.0, 2.0], "mapping"),
])
def test_plot_history_bad_input(tmp_path, history, match):
  with pytest.raises(ValueError, match=match):
    plots.plot_history(history, tmp_path / "h.png")


def test_plots_refuse_non_png_paths(tmp_path):
  with pytest.raises(ValueError, match=r"path: expected a \.png"):
    plots.plot_history(HISTORY, tmp_path / "h.jpg")
  assert not (tmp_path / "h.jpg").exists()


# -- confusion matrix ------------------------------------------------------------------------------------

def test_confusion_matrix_counts_by_hand():
  labels = np.array([0, 0, 1, 2, 2, 2])
  predicted = np.array([0, 1, 1, 2, 0, 2])
  cm = plots.confusion_matrix(labels, predicted, 3)
  np.testing.assert_array_equal(cm, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
  assert cm.dtype == np.int64 and np.trace(cm) == 4 and cm.sum() == 6


@pytest.mark.parametrize("labels, predicted, k, match", [
    ([0, 3], [0, 1], 3, r"labels: values must lie in \[0, 3\)"),
    ([0, 1], [0, -1], 3, "predictions: values"),
    ([0, 1], [0], 3, "shapes differ"),
    ([0.0, 1.0], [0, 1], 3, "integer"),
    ([0, 1], [0, 1], 0, "num_classes"),
])
def test_confusion_matrix_bad_input(labels, predicted, k, match):
  with pytest.raises(ValueError, match=match):
    plots.confusion_matrix(np.asarray(labels), np.asarray(predicted), k)


def test_plot_confusion_matrix(tmp_path):
  rng = np.random.default_rng(0)
  cm = rng.integers(0, 50, size=(10, 10)) + np.diag(rng.integers(800, 1000, size=10))
  size, colours = _png(plots.plot_confusion_matrix(cm, [str(i) for i in range(10)], tmp_path / "cm.png"))
  assert size[0] >= 600 and size[1] >= 500 and colours > 50
  names = ["T-shirt/top", "Trouser", "Pullover"]
  _png(plots.plot_confusion_matrix(np.eye(3, dtype=int) * 5, names, tmp_path / "named.png"))
  with pytest.raises(ValueError, match="class_names: expected 3 names"):
    plots.plot_confusion_matrix(np.eye(3), names[:2], tmp_path / "x.png")
  with pytest.raises(ValueError, match="square"):
    plots.plot_confusion_matrix(np.ones((2, 3)), names, tmp_path / "x.png")
  with pytest.raises(ValueError, match="non-negative integer"):
    plots.plot_confusion_matrix(np.eye(3) * 0.5, names, tmp_path / "x.png")


# -- filters, feature maps, image grids ----------------------------------------------------------------

@pytest.mark.parametrize("cin", [1, 3, 8])
def test_plot_filters(tmp_path, cin):
  kernel = np.random.default_rng(cin).normal(size=(3, 3, cin, 12))
  size, colours = _png(plots.plot_filters(kernel, tmp_path / "f.png"))
  assert size[0] > 500 and size[1] > 200 and colours > 20


def test_plot_filters_bad_input(tmp_path):
  with pytest.raises(ValueError, match="kernel_hwio: expected 4-D"):
    plots.plot_filters(np.zeros((3, 3, 4)), tmp_path / "f.png")
  with pytest.raises(ValueError, match="NaN or Inf"):
    plots.plot_filters(np.full((3, 3, 1, 2), np.nan), tmp_path / "f.png")
  with pytest.raises(ValueError, match="max_filters"):
    plots.plot_filters(np.zeros((3, 3, 1, 2)), tmp_path / "f.png", max_filters=0)


def test_plot_feature_maps_and_images(tmp_path):
  rng = np.random.default_rng(1)
  maps = {"conv2d": rng.normal(size=(1, 26, 26, 32)), "conv2d_1": rng.normal(size=(11, 11, 8))}
  size, _ = _png(plots.plot_feature_maps(maps, tmp_path / "fm.png", image=rng.random((1, 28, 28, 1))))
  assert size[0] > 1000 and size[1] > 200
  size, _ = _png(plots.plot_images([rng.random((20, 30)), rng.normal(size=(20, 30, 3)),
                                    rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)],
                                   ["grey", "signed colour", "uint8"], tmp_path / "grid.png", cols=2,
                                   title="grid"))
  assert size[0] > 500
  with pytest.raises(ValueError, match="maps: expected a non-empty"):
    plots.plot_feature_maps({}, tmp_path / "fm.png")
  with pytest.raises(ValueError, match="one example"):
    plots.plot_feature_maps({"a": np.zeros((2, 4, 4, 3))}, tmp_path / "fm.png")
  with pytest.raises(ValueError, match="image: expected 1 or 3 channels"):
    plots.plot_feature_maps({"a": np.zeros((4, 4, 3))}, tmp_path / "fm.png", image=np.zeros((4, 4, 2)))
  with pytest.raises(ValueError, match="titles: expected 1"):
    plots.plot_images([np.zeros((4, 4))], [], tmp_path / "g.png")


def test_signed_scaling_puts_zero_at_mid_grey():
  image = np.array([[-2.0, 0.0, 2.0, 1.0]])
  scaled = plots._scale_signed(image, percentile=100)
  np.testing.assert_allclose(scaled, [[0.0, 0.5, 1.0, 0.75]])
  np.testing.assert_allclose(plots._scale_signed(np.zeros((2, 2))), 0.5)


def test_plot_functions_are_reexported():
  for name in ("plot_history", "plot_confusion_matrix", "plot_filters", "plot_feature_maps", "plot_images",
               "confusion_matrix", "feature_maps"):
    assert callable(getattr(inspect, name))


# -- feature_maps ------------------------------------------------------------------------------------------

def test_feature_maps_are_the_conv_outputs_in_call_order():
  model = Sequential([Conv2D(4, 3, activation="relu"), MaxPool2D(2), Conv2D(6, 3), Flatten(), Dense(3)])
  x = jax.random.normal(jax.random.key(0), (2, 12, 12, 1))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  maps = inspect.feature_maps(model, variables, x)
  assert list(maps) == ["conv2d", "conv2d_1"]
  assert maps["conv2d"].shape == (2, 10, 10, 4) and maps["conv2d_1"].shape == (2, 3, 3, 6)
  # The first map by hand: relu(conv(x, kernel) + bias) with the layer's own variables.
  params = variables["params"]["conv2d"]
  expected = jax.nn.relu(jax.lax.conv_general_dilated(x, params["kernel"], (1, 1), "VALID",
                                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
                         + params["bias"].reshape(1, 1, 1, -1))
  np.testing.assert_allclose(maps["conv2d"], expected, rtol=1e-5, atol=1e-5)
  # Other layer types on request.
  pooled = inspect.feature_maps(model, variables, x, layer_types=MaxPool2D)
  assert list(pooled) == ["max_pool2d"] and pooled["max_pool2d"].shape == (2, 5, 5, 4)


def test_feature_maps_run_in_eval_mode_of_a_registered_model():
  model = models.get("mnist_bn_cnn")
  x = jnp.ones((1, 28, 28, 1))
  variables = jax.jit(model.init)(jax.random.key(0), x)
  maps = inspect.feature_maps(model, variables, x)
  assert [m.shape for m in maps.values()] == [(1, 26, 26, 32), (1, 24, 24, 32), (1, 10, 10, 64), (1, 8, 8, 64)]
  # Eval mode: the running statistics are not touched, and the same input gives the same maps.
  again = inspect.feature_maps(model, variables, x, layer_types=(BatchNorm,))
  assert len(again) == 5
  np.testing.assert_array_equal(maps["conv2d"], inspect.feature_maps(model, variables, x)["conv2d"])


def test_feature_maps_bad_input():
  model = Sequential([Conv2D(2, 3)])
  variables = model.init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)))
  with pytest.raises(ValueError, match="x: expected a float"):
    inspect.feature_maps(model, variables, jnp.zeros((5, 5, 1)))
  with pytest.raises(ValueError, match="x: expected a float"):
    inspect.feature_maps(model, variables, jnp.zeros((1, 5, 5, 1), jnp.int32))
  with pytest.raises(ValueError, match="'params' collection"):
    inspect.feature_maps(model, {}, jnp.zeros((1, 5, 5, 1)))
  with pytest.raises(ValueError, match="layer_types: expected flax Module classes"):
    inspect.feature_maps(model, variables, jnp.zeros((1, 5, 5, 1)), layer_types=(int,))
  with pytest.raises(ValueError, match="no layer of type Dense"):
    inspect.feature_maps(model, variables, jnp.zeros((1, 5, 5, 1)), layer_types=Dense)


def test_montage_puts_each_tile_below_its_label_band_and_leaves_the_rest_white():
  tiles = [np.full((2, 3, 3), value) for value in (0.0, 0.2, 0.4, 0.6, 0.8)]
  canvas, origins = plots._montage(tiles, cols=2, band=1, gap=1)
  assert canvas.shape == (3 * (1 + 2), 2 * 3 + 1, 3)  # 3 rows of (band + tile), 2 tiles and a gap wide
  assert origins == [(1, 0), (1, 4), (4, 0), (4, 4), (7, 0)]
  covered = np.zeros(canvas.shape[:2], bool)
  for tile, (top, left) in zip(tiles, origins):
    np.testing.assert_array_equal(canvas[top:top + 2, left:left + 3], tile)
    covered[top:top + 2, left:left + 3] = True
  assert np.all(canvas[~covered] == 1.0)
