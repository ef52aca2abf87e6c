"""Keras .h5 import of Conv2DTranspose, Conv1DTranspose, DepthwiseConv2D, SeparableConv2D,
GroupNormalization and LayerNormalization: Keras models with random weights, saved by Keras, imported,
and jaxcnn's outputs compared with Keras' own (float32 rounding; see test_keras_import.py for the
tolerance's reasoning)."""
from __future__ import annotations

import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close, import_tensorflow
from jaxcnn import layers as L
from jaxcnn import models
from jaxcnn.interop import load_keras_weights, read_keras_weights

@pytest.fixture(scope="module")
def keras():
  import_tensorflow()
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "tensorflow":
    pytest.skip(f"Keras runs on {keras.backend.backend()}, these checks use the TensorFlow backend")
  return keras


def _randomise(model, seed):
  """Fan-in-scaled random kernels, gammas around 1 and non-zero betas/biases: every weight shows."""
  rng = np.random.default_rng(seed)
  new = []
  for weight in model.get_weights():
    if weight.ndim > 1:
      fan_in = int(np.prod(weight.shape[:-1]))
      new.append(rng.standard_normal(weight.shape).astype(np.float32) * np.float32(np.sqrt(2.0 / fan_in)))
    else:
      new.append((1.0 + 0.3 * rng.standard_normal(weight.shape)).astype(np.float32))
  model.set_weights(new)


def _check(got, expected):
  scale = float(np.max(np.abs(expected)))
  assert scale > 1e-2
  assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)


def _import_and_compare(keras, keras_model, ours, x, tmp_path):
  """Saves keras_model in Keras 3 and legacy whole-model layouts, loads each into `ours`, compares."""
  expected = np.asarray(keras_model(x, training=False))
  template = jax.eval_shape(ours.init, jax.random.key(0), jnp.zeros((1, *x.shape[1:])))
  paths = [tmp_path / "model.weights.h5", tmp_path / "model_full.h5"]
  keras_model.save_weights(paths[0])
  keras_model.save(paths[1])
  for path in paths:
    variables = load_keras_weights(path, template)
    _check(jax.jit(ours.apply)(variables, jnp.asarray(x)), expected)
  return read_keras_weights(paths[0])


@pytest.mark.oracle
def test_new_2d_layers_reproduce_keras(keras, tmp_path):
  kl = keras.layers
  # Keras' auto-names depend on what the session built before, so they are set to jaxcnn's.
  keras_model = keras.Sequential([
      keras.Input((7, 6, 3)),
      kl.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu", name="conv2d_transpose"),
      kl.GroupNormalization(groups=4, name="group_normalization"),
      kl.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="depthwise_conv2d"),
      kl.SeparableConv2D(6, 3, strides=2, depth_multiplier=2, activation="tanh", name="separable_conv2d"),
      kl.LayerNormalization(epsilon=1e-2, name="layer_normalization"),
      kl.Conv2DTranspose(4, (2, 3), strides=(1, 2), padding="valid", output_padding=(0, 1),
                         name="conv2d_transpose_1"),
      kl.DepthwiseConv2D(2, strides=2, use_bias=False, name="depthwise_conv2d_1"),
      kl.LayerNormalization(axis=(1, 2), center=False, name="layer_normalization_1"),
      kl.Cropping2D(((1, 0), (0, 1)), name="cropping2d"),
  ])
  _randomise(keras_model, 0)
  ours = L.Sequential([
      L.Conv2DTranspose(8, 3, strides=2, padding="same", activation="relu"),
      L.GroupNormalization(groups=4),
      L.DepthwiseConv2D(3, depth_multiplier=2, padding="same"),
      L.SeparableConv2D(6, 3, strides=2, depth_multiplier=2, activation="tanh"),
      L.LayerNormalization(epsilon=1e-2),
      L.Conv2DTranspose(4, (2, 3), strides=(1, 2), padding="valid", output_padding=(0, 1)),
      L.DepthwiseConv2D(2, strides=2, use_bias=False),
      L.LayerNormalization(axis=(1, 2), center=False),
      L.Cropping2D(((1, 0), (0, 1))),
  ])
  x = np.random.default_rng(1).normal(size=(2, 7, 6, 3)).astype(np.float32)
  read = _import_and_compare(keras, keras_model, ours, x, tmp_path)
  # The weights arrive in Keras' order under the jaxcnn names, unchanged.
  assert [w.shape for w in read["separable_conv2d"]] == [(3, 3, 16, 2), (1, 1, 32, 6), (6,)]
  assert [w.shape for w in read["conv2d_transpose"]] == [(3, 3, 8, 3), (8,)]


@pytest.mark.oracle
def test_conv1d_transpose_reproduces_keras(keras, tmp_path):
  kl = keras.layers
  keras_model = keras.Sequential([
      keras.Input((9, 3)),
      kl.Conv1DTranspose(5, 3, strides=2, padding="same", activation="relu", name="conv1d_transpose"),
      kl.Conv1DTranspose(2, 4, strides=3, padding="valid", output_padding=1, name="conv1d_transpose_1"),
  ])
  _randomise(keras_model, 2)
  ours = L.Sequential([L.Conv1DTranspose(5, 3, strides=2, padding="same", activation="relu"),
                       L.Conv1DTranspose(2, 4, strides=3, padding="valid", output_padding=1)])
  x = np.random.default_rng(3).normal(size=(2, 9, 3)).astype(np.float32)
  read = _import_and_compare(keras, keras_model, ours, x, tmp_path)  # outputs compared to Keras' inside
  # Keras' Conv1DTranspose layout (kernel, out_channels, in_channels), read under the jaxcnn names.
  assert [w.shape for w in read["conv1d_transpose"]] == [(3, 5, 3), (5,)]
  assert [w.shape for w in read["conv1d_transpose_1"]] == [(4, 2, 5), (2,)]


@pytest.mark.oracle
def test_keras_io_denoising_autoencoder_reproduces_keras(keras, tmp_path):
  # The keras.io recipe as written there (sigmoid output); the registered model returns its logits.
  kl = keras.layers
  keras_model = keras.Sequential([
      keras.Input((28, 28, 1)),
      kl.Conv2D(32, 3, activation="relu", padding="same", name="conv2d"),
      kl.MaxPooling2D(2, padding="same", name="max_pool2d"),
      kl.Conv2D(32, 3, activation="relu", padding="same", name="conv2d_1"),
      kl.MaxPooling2D(2, padding="same", name="max_pool2d_1"),
      kl.Conv2DTranspose(32, 3, strides=2, activation="relu", padding="same", name="conv2d_transpose"),
      kl.Conv2DTranspose(32, 3, strides=2, activation="relu", padding="same", name="conv2d_transpose_1"),
      kl.Conv2D(1, 3, activation="sigmoid", padding="same", name="conv2d_2"),
  ])
  _randomise(keras_model, 4)
  assert keras_model.count_params() == 28_353
  ours = models.get("conv_transpose_autoencoder")
  x = np.random.default_rng(5).uniform(size=(2, 28, 28, 1)).astype(np.float32)
  expected = np.asarray(keras_model(x, training=False))
  path = tmp_path / "autoencoder.weights.h5"
  keras_model.save_weights(path)
  template = jax.eval_shape(ours.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  variables = load_keras_weights(path, template)
  _check(jax.jit(lambda v, x: jax.nn.sigmoid(ours.apply(v, x)))(variables, jnp.asarray(x)), expected)


def test_legacy_weight_order_of_a_separable_conv(tmp_path):
  """A legacy file lists depthwise_kernel, pointwise_kernel, bias: they land in those variables."""
  rng = np.random.default_rng(6)
  weights = [rng.normal(size=s).astype(np.float32) for s in ((3, 3, 2, 1), (1, 1, 2, 4), (4,))]
  path = tmp_path / "legacy.h5"
  with h5py.File(path, "w") as handle:
    handle.attrs["layer_names"] = np.array([b"separable_conv2d"])
    group = handle.create_group("separable_conv2d")
    names = [b"depthwise_kernel:0", b"pointwise_kernel:0", b"bias:0"]
    for name, weight in zip(names, weights):
      group.create_dataset(name.decode(), data=weight)
    group.attrs["weight_names"] = np.array(names)
  model = L.Sequential([L.SeparableConv2D(4, 3)])
  variables = load_keras_weights(path, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 5, 5, 2))))
  params = variables["params"]["separable_conv2d"]
  for name, weight in zip(("depthwise_kernel", "pointwise_kernel", "bias"), weights):
    np.testing.assert_array_equal(params[name], weight)
