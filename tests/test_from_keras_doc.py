"""docs/from_keras.md: every jaxcnn translation of a course listing runs as written, on tiny data.

The blocks are executed unchanged except for their sizes (one epoch, batches of 16, 48-pixel images, a
few dozen examples): `jaxcnn.data.load_arrays` is replaced by one returning the first examples of the
shipped MNIST (random CIFAR-10-shaped images for "cifar10"), the image folder and the VGG16 weights file
the listings read are made in a temporary working directory.
"""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from helpers import read_once

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
DOC = REPO_ROOT / "docs" / "from_keras.md"
SHIPPED = REPO_ROOT / "experiments" / "data"
LISTINGS = ("mnist_cnn", "cifar10_cnn", "cats_vs_dogs", "batchnorm", "autoencoder", "feature_maps",
            "vgg16_transfer", "conv1d", "pytorch")
TINY = [(r"epochs=\d+", "epochs=1"), (r"batch_size=\d+", "batch_size=16"), (r"SIZE = 150", "SIZE = 48"),
        (r"= 512, 128,", "= 64, 32,")]


def _translations() -> dict[str, str]:
  text = DOC.read_text()
  found = re.findall(r"<!-- jaxcnn: (\w+) -->\n```python\n(.*?)```", text, re.S)
  return dict(found)


def test_every_course_listing_has_a_translation():
  assert tuple(_translations()) == LISTINGS


def _write_vgg16_notop(path: pathlib.Path) -> dict:
  """A legacy Keras weights file (the layout of keras.applications' downloads) of VGG16 without its top,
  random weights; returns them {layer: (kernel, bias)}."""
  import h5py
  import jax
  import jax.numpy as jnp

  from jaxcnn import models
  # Random weights of the model's shapes (traced, not compiled: run op by op, VGG16's init compiles
  # dozens of random-number programs).
  shapes = jax.eval_shape(models.get("vgg16", include_top=False).init, jax.random.key(7),
                          jnp.zeros((1, 48, 48, 3)))["params"]
  rng = np.random.default_rng(7)
  weights = {name: tuple(rng.normal(0.0, 0.05, p[k].shape).astype(np.float32) for k in ("kernel", "bias"))
             for name, p in shapes.items()}
  with h5py.File(path, "w") as handle:
    handle.attrs["layer_names"] = [name.encode() for name in weights]
    for name, (kernel, bias) in weights.items():
      group = handle.create_group(name)
      group.attrs["weight_names"] = [f"{name}/kernel:0".encode(), f"{name}/bias:0".encode()]
      group.create_dataset(f"{name}/kernel:0", data=kernel)
      group.create_dataset(f"{name}/bias:0", data=bias)
  return weights


@pytest.fixture
def tiny_world(tmp_path, monkeypatch):
  from PIL import Image

  from jaxcnn import data
  real = read_once(data.load_arrays)  # a real dataset is read once per process, not once per listing

  def load_arrays(name, split, **kwargs):
    if name == "cifar10":
      rng = np.random.default_rng(0 if split == "train" else 1)
      n = 32 if split == "train" else 16
      return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int32)
    if name == "mnist":
      kwargs.setdefault("data_dir", str(SHIPPED))
    x, y = real(name, split, **kwargs)
    return x[:64 if split == "train" else 32].copy(), y[:64 if split == "train" else 32].copy()

  monkeypatch.setattr(data, "load_arrays", load_arrays)
  rng = np.random.default_rng(0)
  for label in ("cats", "dogs"):
    folder = tmp_path / "cats_and_dogs" / "train" / label
    folder.mkdir(parents=True)
    for i in range(8):
      Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(folder / f"{label}.{i}.png")
  monkeypatch.chdir(tmp_path)
  return tmp_path


def _run(name: str) -> dict:
  code = _translations()[name]
  for pattern, replacement in TINY:
    code = re.sub(pattern, replacement, code)
  namespace: dict = {}
  exec(compile(code, f"docs/from_keras.md:{name}", "exec"), namespace)
  return namespace


def _finite(result):
  assert all(np.isfinite(v).all() for k, v in result.history.items() if k != "epoch"), result.history


def test_mnist_cnn(tiny_world):
  ns = _run("mnist_cnn")
  _finite(ns["result"])
  np.testing.assert_allclose(ns["probabilities"].sum(axis=1), 1.0, rtol=1e-5)
  assert set(ns["score"]) == {"loss", "accuracy"}
  np.testing.assert_array_equal(ns["again"].predict(ns["x_test"]), ns["result"].predict(ns["x_test"]))
  assert ns["more"].history["epoch"] == [2]          # one more epoch than the first run's one


def test_cifar10_cnn(tiny_world):
  ns = _run("cifar10_cnn")
  _finite(ns["result"])
  assert ns["result"].config.horizontal_flip and ns["result"].from_logits is True


def test_cats_vs_dogs(tiny_world):
  ns = _run("cats_vs_dogs")
  _finite(ns["result"])
  assert ns["labels"].tolist() == [0] * 8 + [1] * 8
  assert ns["p_dog"].shape == (4,) and ((0 <= ns["p_dog"]) & (ns["p_dog"] <= 1)).all()


def test_batchnorm(tiny_world):
  ns = _run("batchnorm")
  _finite(ns["result"])
  assert ns["result"].variables["batch_stats"]


def test_autoencoder(tiny_world):
  ns = _run("autoencoder")
  _finite(ns["result"])
  assert ns["denoised"].shape == ns["x_test"].shape
  assert 0 <= ns["denoised"].min() and ns["denoised"].max() <= 1


def test_feature_maps(tiny_world):
  ns = _run("feature_maps")
  assert {k: v.shape for k, v in ns["activations"].items()} == {"conv2d": (1, 26, 26, 32), "conv2d_1": (1, 11, 11, 64)}
  assert ns["filters"].shape == (3, 3, 1, 32) and (tiny_world / "filters.png").is_file()
  assert ns["edges"].shape == (1, 28, 28, 1)


def test_vgg16_transfer(tiny_world):
  weights = _write_vgg16_notop(tiny_world / "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")
  ns = _run("vgg16_transfer")
  _finite(ns["result"])
  trained = ns["result"].variables["params"]
  for name, (kernel, bias) in weights.items():          # loaded from the file, and frozen
    np.testing.assert_array_equal(np.asarray(trained["vgg16"][name]["kernel"]), kernel)
    np.testing.assert_array_equal(np.asarray(trained["vgg16"][name]["bias"]), bias)


def test_conv1d(tiny_world):
  ns = _run("conv1d")
  _finite(ns["result"])
  assert ns["x_train"].shape == (64, 32, 1) and set(ns["result"].evaluate(ns["x_train"], ns["y_train"])) == {
      "loss", "accuracy"}


def test_pytorch(tiny_world):
  ns = _run("pytorch")
  _finite(ns["result"])
  assert ns["predicted"].shape == (64,) and np.isfinite(float(ns["loss"]))
