"""jaxcnn.interop: Keras .h5 weight import.

Hand-written files (h5py only) pin down where each Keras weight lands; the oracle tests save real
Keras models (the textbook CIFAR-10 CNN, VGG16) with random weights in every layout Keras writes and
check that the imported jaxcnn model reproduces Keras' own predictions.
"""
from __future__ import annotations

import logging
import os

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close, import_tensorflow
from jaxcnn import models
from jaxcnn._compile import run_once
from jaxcnn.errors import DataError
from jaxcnn.interop import load_keras_weights, read_keras_weights
from jaxcnn.layers import Activation, BatchNorm, Conv2D, Dense, Flatten, MaxPool2D, Sequential


def _tiny_model():
  """(N, 6, 6, 2) -> conv2d (3x3x2x4, bias) -> batch_norm -> pool -> flatten (3*3*4 = 36) -> dense (36x3)."""
  return Sequential([Conv2D(4, 3, padding="same"), BatchNorm(), MaxPool2D(2), Flatten(), Dense(3)])


def _tiny_template():
  return jax.eval_shape(_tiny_model().init, jax.random.key(0), jnp.zeros((1, 6, 6, 2)))


def _tiny_weights(seed=0):
  """Keras-ordered weights per Keras layer name for the tiny model, all distinct values."""
  rng = np.random.default_rng(seed)
  shapes = {"conv2d": [(3, 3, 2, 4), (4,)], "batch_normalization": [(4,)] * 4, "dense": [(36, 3), (3,)]}
  return {name: [rng.normal(size=s).astype(np.float32) for s in layer] for name, layer in shapes.items()}


def _write_keras3(path, layers, *, class_keys=None):
  """A Keras 3 `.weights.h5` file: layers/<class key>/vars/<i>, the layer name in vars.attrs."""
  with h5py.File(path, "w") as handle:
    group = handle.create_group("layers")
    for index, (name, weights) in enumerate(layers.items()):
      key = class_keys[index] if class_keys else f"key_{index}"
      variables = group.create_group(key).create_group("vars")
      variables.attrs["name"] = name
      for i, weight in enumerate(weights):
        variables.create_dataset(str(i), data=weight)
    group.create_group("max_pooling2d").create_group("vars").attrs["name"] = "max_pooling2d"
    handle.create_group("vars").attrs["name"] = "sequential"


def _write_legacy(path, layers, *, under=None):
  """A legacy Keras 2 file as keras.applications ships them: layer_names, per-layer weight_names."""
  with h5py.File(path, "w") as handle:
    root = handle.create_group(under) if under else handle
    names = list(layers) + ["max_pooling2d"]
    root.attrs["layer_names"] = np.array([n.encode() for n in names])
    for name in names:
      group = root.create_group(name)
      weight_names = []
      for i, weight in enumerate(layers.get(name, [])):
        # Old Keras names (e.g. "conv2d_W_1:0") say nothing reliable: only the listed order counts.
        weight_name = f"{name}_{'WXYZ'[i]}_1:0"
        group.create_dataset(weight_name, data=weight)
        weight_names.append(weight_name.encode())
      group.attrs["weight_names"] = np.array(weight_names, dtype="S")


def _check_tiny(variables, weights):
  params, stats = variables["params"], variables["batch_stats"]
  np.testing.assert_array_equal(params["conv2d"]["kernel"], weights["conv2d"][0])
  np.testing.assert_array_equal(params["conv2d"]["bias"], weights["conv2d"][1])
  gamma, beta, moving_mean, moving_var = weights["batch_normalization"]
  np.testing.assert_array_equal(params["batch_norm"]["scale"], gamma)
  np.testing.assert_array_equal(params["batch_norm"]["bias"], beta)
  np.testing.assert_array_equal(stats["batch_norm"]["mean"], moving_mean)
  np.testing.assert_array_equal(stats["batch_norm"]["var"], moving_var)
  np.testing.assert_array_equal(params["dense"]["kernel"], weights["dense"][0])
  np.testing.assert_array_equal(params["dense"]["bias"], weights["dense"][1])
  assert params["dense"]["kernel"].dtype == jnp.float32


RENAME = {"batch_norm": "batch_normalization"}


@pytest.mark.parametrize("layout", ["keras3", "legacy", "legacy_model"])
def test_weights_land_in_their_variables(tmp_path, layout):
  weights = _tiny_weights()
  path = tmp_path / "tiny.h5"
  if layout == "keras3":
    _write_keras3(path, weights)
  else:
    _write_legacy(path, weights, under="model_weights" if layout == "legacy_model" else None)
  read = read_keras_weights(path)
  assert list(sorted(read)) == sorted(weights)  # layers without weights are left out
  variables = load_keras_weights(path, _tiny_template(), rename=RENAME)
  _check_tiny(variables, weights)


def test_loaded_tiny_model_matches_numpy(tmp_path):
  """Prediction check by hand: conv (same) -> BN (eval) -> 2x2 max pool -> flatten (h, w, c) -> dense."""
  weights = _tiny_weights(3)
  weights["batch_normalization"][3] = np.abs(weights["batch_normalization"][3]) + 0.5  # a variance
  path = tmp_path / "tiny.weights.h5"
  _write_keras3(path, weights)
  variables = load_keras_weights(path, _tiny_template(), rename=RENAME)
  x = np.random.default_rng(4).normal(size=(2, 6, 6, 2)).astype(np.float32)
  got = _tiny_model().apply(variables, jnp.asarray(x))

  kernel, bias = (w.astype(np.float64) for w in weights["conv2d"])
  padded = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  conv = np.zeros((2, 6, 6, 4)) + bias
  for i in range(3):
    for j in range(3):
      conv += padded[:, i:i + 6, j:j + 6, :] @ kernel[i, j]
  gamma, beta, mean, var = (w.astype(np.float64) for w in weights["batch_normalization"])
  normed = (conv - mean) / np.sqrt(var + 1e-3) * gamma + beta
  pooled = normed.reshape(2, 3, 2, 3, 2, 4).max(axis=(2, 4))
  dense_kernel, dense_bias = (w.astype(np.float64) for w in weights["dense"])
  expected = pooled.reshape(2, 36) @ dense_kernel + dense_bias
  assert_close(got, expected)


def test_strict_false_keeps_missing_layers_and_ignores_extra(tmp_path, caplog):
  weights = _tiny_weights()
  dense = weights.pop("dense")
  weights["extra_head"] = dense
  path = tmp_path / "backbone.weights.h5"
  _write_keras3(path, weights)
  initial = _tiny_model().init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
  with caplog.at_level(logging.INFO, logger="jaxcnn.interop"):
    variables = load_keras_weights(path, initial, rename=RENAME, strict=False)
  np.testing.assert_array_equal(variables["params"]["conv2d"]["kernel"], weights["conv2d"][0])
  np.testing.assert_array_equal(variables["params"]["dense"]["kernel"], initial["params"]["dense"]["kernel"])
  assert "keep their values: dense" in caplog.text and "not loaded: extra_head" in caplog.text
  # Abstract templates have no values to keep.
  with pytest.raises(ValueError, match=r"variables: layers dense are not in .* have no values"):
    load_keras_weights(path, _tiny_template(), rename=RENAME, strict=False)


def test_other_architecture_lists_missing_unexpected_and_mismatched(tmp_path):
  weights = _tiny_weights()
  weights["conv2d"] = [np.zeros((5, 5, 2, 8), np.float32), np.zeros((8,), np.float32)]
  weights["fc1"] = weights.pop("dense")
  path = tmp_path / "other.weights.h5"
  _write_keras3(path, weights)
  with pytest.raises(DataError) as info:
    load_keras_weights(path, _tiny_template(), rename=RENAME)
  message = str(info.value)
  assert str(path) in message
  assert "mismatched shapes: conv2d: jaxcnn [kernel (3, 3, 2, 4), bias (4,)] vs file [(5, 5, 2, 8), (8,)]" in message
  assert "missing from the file: dense" in message
  assert "unexpected in the file: fc1" in message
  # Shapes must match even when not strict.
  with pytest.raises(DataError, match="mismatched shapes: conv2d"):
    load_keras_weights(path, _tiny_template(), rename=RENAME, strict=False)


def test_weight_count_mismatch_is_reported(tmp_path):
  weights = _tiny_weights()
  path = tmp_path / "bias.weights.h5"
  _write_keras3(path, weights)
  no_bias = Sequential([Conv2D(4, 3, padding="same", use_bias=False), BatchNorm(), MaxPool2D(2), Flatten(),
                        Dense(3)])
  template = jax.eval_shape(no_bias.init, jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
  with pytest.raises(DataError, match=r"conv2d: jaxcnn \[kernel \(3, 3, 2, 4\)\] vs file \[\(3, 3, 2, 4\), \(4,\)\]"):
    load_keras_weights(path, template, rename=RENAME)


def test_names_without_rename_are_missing(tmp_path):
  path = tmp_path / "tiny.weights.h5"
  _write_keras3(path, _tiny_weights())
  with pytest.raises(DataError, match=r"missing from the file: batch_norm; unexpected in the file: "
                                      r"batch_normalization"):
    load_keras_weights(path, _tiny_template())
  with pytest.raises(DataError, match=r"missing from the file: batch_norm \(as bn\)"):
    load_keras_weights(path, _tiny_template(), rename={"batch_norm": "bn"})


def test_bad_files(tmp_path):
  with pytest.raises(DataError, match=r"absent.h5: Keras weights file not found"):
    read_keras_weights(tmp_path / "absent.h5")
  text = tmp_path / "text.h5"
  text.write_text("not hdf5")
  with pytest.raises(DataError, match=r"text.h5: not a readable HDF5 file"):
    read_keras_weights(text)
  other = tmp_path / "other.h5"
  with h5py.File(other, "w") as handle:
    handle.create_dataset("x", data=np.zeros(3))
  with pytest.raises(DataError, match=r"other.h5: not a Keras weights file .*top-level keys: \['x'\]"):
    read_keras_weights(other)
  strings = tmp_path / "strings.h5"
  with h5py.File(strings, "w") as handle:
    handle.create_group("layers/dense/vars").create_dataset("0", data=np.array([b"a", b"b"]))
  with pytest.raises(DataError, match=r"strings.h5: layers/dense/vars/0 holds .*not numbers"):
    read_keras_weights(strings)
  gap = tmp_path / "gap.h5"
  with h5py.File(gap, "w") as handle:
    handle.create_group("layers/dense/vars").create_dataset("1", data=np.zeros(3))
  with pytest.raises(DataError, match=r"gap.h5: layers/dense/vars is not numbered 0..0"):
    read_keras_weights(gap)
  listed = tmp_path / "listed.h5"
  with h5py.File(listed, "w") as handle:
    handle.attrs["layer_names"] = np.array([b"dense"])
    handle.create_group("dense").attrs["weight_names"] = np.array([b"dense/kernel:0"])
  with pytest.raises(DataError, match=r"listed.h5: weight 'dense/kernel:0' of layer 'dense' is listed but"):
    read_keras_weights(listed)


def test_bad_arguments(tmp_path):
  path = tmp_path / "tiny.weights.h5"
  _write_keras3(path, _tiny_weights())
  with pytest.raises(ValueError, match=r"variables: expected a flax variables dict with a 'params'"):
    load_keras_weights(path, [1, 2])
  with pytest.raises(ValueError, match=r"variables: collections \['cache'\] cannot be loaded"):
    load_keras_weights(path, {"params": {}, "cache": {}})
  with pytest.raises(ValueError, match=r"variables: params variable 'dense/weights' has no Keras counterpart"):
    load_keras_weights(path, {"params": {"dense": {"weights": np.zeros(3)}}})
  with pytest.raises(ValueError, match=r"rename: \['conv9'\] are not layers of the model"):
    load_keras_weights(path, _tiny_template(), rename={"conv9": "conv2d"})
  with pytest.raises(ValueError, match=r"rename: expected a mapping"):
    load_keras_weights(path, _tiny_template(), rename=[("a", "b")])


# ---------------------------------------------------------------------------------------------------
# Oracle: real Keras models, random weights, Keras' own predictions.
#
# Tolerance: both sides compute in float32, but with different summation orders (oneDNN vs XLA/im2col),
# so each layer's output differs by a few float32 ulps of its dot products (~1e-6 relative); through
# VGG16's 16 layers these grow to ~1e-5 relative. Comparing at rtol 1e-4 of the largest logit is
# still four orders of magnitude below the effect of a single misplaced weight (O(1) relative).


def _keras():
  import_tensorflow()
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "tensorflow":
    pytest.skip(f"Keras runs on {keras.backend.backend()}, these checks use the TensorFlow backend")
  return keras


def _randomise(model, seed):
  """He-scaled random kernels and non-zero biases, so every weight shows in the predictions."""
  rng = np.random.default_rng(seed)
  new = []
  for weight in model.get_weights():
    if weight.ndim > 1:
      fan_in = int(np.prod(weight.shape[:-1]))
      new.append(rng.standard_normal(weight.shape, dtype=np.float32) * np.float32(np.sqrt(2.0 / fan_in)))
    else:
      new.append(rng.standard_normal(weight.shape, dtype=np.float32) * np.float32(0.1))
  model.set_weights(new)


def _save_all_layouts(keras, model, tmp_path):
  """The files Keras writes: Keras 3 weights, a legacy whole model, a legacy weights-only file."""
  paths = [tmp_path / "model.weights.h5", tmp_path / "model_full.h5"]
  model.save_weights(paths[0])
  model.save(paths[1])
  try:  # the legacy weights-only writer keras.applications files come from (private in Keras 3)
    from keras.src.legacy.saving import legacy_h5_format
  except ImportError:
    return paths
  paths.append(tmp_path / "model_legacy.h5")
  with h5py.File(paths[2], "w") as handle:
    legacy_h5_format.save_weights_to_hdf5_group(handle, model)
  return paths


def _check_predictions(got, expected):
  scale = float(np.max(np.abs(expected)))
  assert scale > 1e-2  # the comparison means something only if the logits are not ~0
  assert_close(got, expected, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.oracle
def test_textbook_cifar_cnn_reproduces_keras(tmp_path):
  keras = _keras()
  layers = keras.layers
  # The course's CIFAR-10 CNN (keras examples/cifar10_cnn.py) as listed: separate Activation layers,
  # the second convolution of each block "valid", a softmax at the end. Layers with weights get jaxcnn
  # Sequential's names (Keras' auto-names depend on what the session built before).
  model = keras.Sequential([
      keras.Input((32, 32, 3)),
      layers.Conv2D(32, (3, 3), padding="same", name="conv2d"), layers.Activation("relu"),
      layers.Conv2D(32, (3, 3), name="conv2d_1"), layers.Activation("relu"),
      layers.MaxPooling2D(pool_size=(2, 2)), layers.Dropout(0.25),
      layers.Conv2D(64, (3, 3), padding="same", name="conv2d_2"), layers.Activation("relu"),
      layers.Conv2D(64, (3, 3), name="conv2d_3"), layers.Activation("relu"),
      layers.MaxPooling2D(pool_size=(2, 2)), layers.Dropout(0.25),
      layers.Flatten(), layers.Dense(512, name="dense"), layers.Activation("relu"), layers.Dropout(0.5),
      layers.Dense(10, name="dense_1"), layers.Activation("softmax"),
  ])
  assert model.count_params() == 1_250_858
  _randomise(model, 0)
  # Small inputs keep the random network's logits moderate, so its softmax is not one-hot.
  x = np.random.default_rng(1).uniform(0, 0.05, size=(4, 32, 32, 3)).astype(np.float32)
  expected_logits = np.asarray(keras.Model(model.inputs[0], model.layers[-2].output)(x, training=False))
  expected = np.asarray(model(x, training=False))
  ours = models.get("cifar10_cnn", num_classes=10)
  # The listing's softmax as a layer: the registry model nests, its layers are "sequential/conv2d", ...
  # and take the file's "conv2d", ... by the end of their paths.
  with_softmax = Sequential([ours, Activation("softmax")])
  template = jax.eval_shape(ours.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  nested_template = jax.eval_shape(with_softmax.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  for path in _save_all_layouts(keras, model, tmp_path):
    variables = load_keras_weights(path, template)
    _check_predictions(jax.jit(ours.apply)(variables, jnp.asarray(x)), expected_logits)
    probabilities = jax.jit(with_softmax.apply)(load_keras_weights(path, nested_template), jnp.asarray(x))
    assert 0.05 < float(np.max(expected)) < 0.95  # a softmax that is not saturated
    assert_close(probabilities, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.oracle
def test_vgg16_reproduces_keras_applications(tmp_path):
  keras = _keras()
  # 64x64 keeps a 2x2x512 map before Flatten (so the Flatten -> fc1 order is exercised) at ~1/12 of
  # the 224x224 cost; classifier_activation=None gives logits, as jaxcnn models do.
  model = keras.applications.VGG16(weights=None, include_top=True, input_shape=(64, 64, 3), classes=10,
                                   classifier_activation=None)
  _randomise(model, 2)
  x = np.random.default_rng(3).uniform(0, 1, size=(2, 64, 64, 3)).astype(np.float32)
  expected = np.asarray(model(x, training=False))
  path = tmp_path / "vgg16.weights.h5"
  model.save_weights(path)
  ours = models.get("vgg16", num_classes=10, input_shape=(64, 64, 3))
  template = jax.eval_shape(ours.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  variables = load_keras_weights(path, template)
  _check_predictions(jax.jit(ours.apply)(variables, jnp.asarray(x)), expected)

  # The headless backbone file (as keras.applications ships for transfer learning) loads into
  # include_top=False; into the full model it reports the missing head.
  headless = keras.applications.VGG16(weights=None, include_top=False, input_shape=(64, 64, 3))
  headless.set_weights(model.get_weights()[:len(headless.get_weights())])
  headless_path = tmp_path / "vgg16_notop.weights.h5"
  headless.save_weights(headless_path)
  backbone = models.get("vgg16", include_top=False)
  apply_backbone = jax.jit(backbone.apply)  # one compile for both backbone checks below
  features = apply_backbone(load_keras_weights(headless_path, jax.eval_shape(
      backbone.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))), jnp.asarray(x))
  _check_predictions(features, np.asarray(headless(x, training=False)))
  with pytest.raises(DataError, match=r"missing from the file: fc1, fc2, predictions$"):
    load_keras_weights(headless_path, template)

  # Transfer learning: the backbone under a new head in a Sequential. Its layers are
  # "vgg16/block1_conv1", ... and take the file's "block1_conv1", ... by the end of their paths.
  transfer = Sequential([backbone, Flatten(), Dense(2)])
  initial = run_once(transfer.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))  # runs once: cheap compile
  moved = load_keras_weights(headless_path, initial, strict=False)
  assert sorted(moved["params"]) == ["dense", "vgg16"]
  _check_predictions(apply_backbone({"params": moved["params"]["vgg16"]}, jnp.asarray(x)),
                     np.asarray(headless(x, training=False)))
  np.testing.assert_array_equal(moved["params"]["dense"]["kernel"], initial["params"]["dense"]["kernel"])


def test_nested_keras3_models_name_layers_by_path(tmp_path):
  """Keras 3 writes a nested model as layers/<key>/layers/<key>/vars (checked against Keras 3.15)."""
  path = tmp_path / "nested.weights.h5"
  kernel, bias, head = (np.full(shape, value, np.float32) for shape, value in
                        (((3, 3, 3, 4), 1.0), ((4,), 2.0), ((144, 2), 3.0)))
  with h5py.File(path, "w") as handle:
    handle.create_group("layers/dense/vars").attrs["name"] = "head"
    handle["layers/dense/vars"].create_dataset("0", data=head)
    handle["layers/dense/vars"].create_dataset("1", data=np.zeros(2, np.float32))
    handle.create_group("layers/sequential/vars").attrs["name"] = "backbone"
    inner = handle.create_group("layers/sequential/layers/conv2d/vars")
    inner.attrs["name"] = "conv"
    inner.create_dataset("0", data=kernel)
    inner.create_dataset("1", data=bias)
  read = read_keras_weights(path)
  assert sorted(read) == ["backbone/conv", "head"]
  template = {"params": {"backbone": {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32),
                                               "bias": jax.ShapeDtypeStruct((4,), jnp.float32)}},
                         "head": {"kernel": jax.ShapeDtypeStruct((144, 2), jnp.float32),
                                  "bias": jax.ShapeDtypeStruct((2,), jnp.float32)}}}
  variables = load_keras_weights(path, template)
  np.testing.assert_array_equal(variables["params"]["backbone"]["conv"]["bias"], bias)
  np.testing.assert_array_equal(variables["params"]["head"]["kernel"], head)


def test_legacy_nested_models_are_split_into_their_layers(tmp_path):
  """The legacy format saves a nested model as one group; its weight names carry the layers' paths
  (Keras 3: "backbone/c1/kernel"; Keras 2: "c1/kernel:0"), a top-level layer's may carry the model's
  name ("sequential/head/kernel")."""
  path = tmp_path / "nested_legacy.h5"
  arrays = {}
  with h5py.File(path, "w") as handle:
    groups = {"backbone": ["backbone/c1/kernel", "backbone/c1/bias", "backbone/bn/gamma", "backbone/bn/beta"],
              "features": ["conv/kernel:0", "conv/bias:0"], "head": ["sequential/head/kernel", "sequential/head/bias"]}
    handle.attrs["layer_names"] = np.array([name.encode() for name in groups])
    for index, (name, weight_names) in enumerate(groups.items()):
      group = handle.create_group(name)
      group.attrs["weight_names"] = np.array([w.encode() for w in weight_names])
      for offset, weight_name in enumerate(weight_names):
        arrays[weight_name] = np.full((2,), 10 * index + offset, np.float32)
        group.create_dataset(weight_name, data=arrays[weight_name])
  read = read_keras_weights(path)
  assert sorted(read) == ["backbone/bn", "backbone/c1", "features/conv", "head"]
  np.testing.assert_array_equal(read["backbone/bn"][1], arrays["backbone/bn/beta"])
  np.testing.assert_array_equal(read["features/conv"][0], arrays["conv/kernel:0"])
  np.testing.assert_array_equal(read["head"][1], arrays["sequential/head/bias"])


def test_layers_match_by_the_end_of_their_path(tmp_path, caplog):
  weights = _tiny_weights()
  path = tmp_path / "tiny.weights.h5"
  _write_keras3(path, weights)
  nested = Sequential([_tiny_model()])  # layers sequential/conv2d, sequential/batch_norm, sequential/dense
  template = jax.eval_shape(nested.init, jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
  with caplog.at_level(logging.INFO, logger="jaxcnn.interop"):
    variables = load_keras_weights(path, template, rename={"sequential/batch_norm": "batch_normalization"})
  _check_tiny({c: tree["sequential"] for c, tree in variables.items()}, weights)
  assert "matched by the end of their path: sequential/conv2d <- conv2d, sequential/dense <- dense" in caplog.text
  # The other way round: a flat model takes a nested file's layers.
  _write_keras3(path, {f"backbone/{name}": layer for name, layer in weights.items()})
  _check_tiny(load_keras_weights(path, _tiny_template(), rename={"batch_norm": "backbone/batch_normalization"}),
              weights)
  # Two equally good candidates: an error, not a guess.
  _write_keras3(path, {"a/conv2d": weights["conv2d"], "b/conv2d": weights["conv2d"],
                       "batch_normalization": weights["batch_normalization"], "dense": weights["dense"]})
  with pytest.raises(DataError, match=r"ambiguous \(pass rename\): conv2d could be a/conv2d or b/conv2d"):
    load_keras_weights(path, _tiny_template(), rename=RENAME, strict=False)


def test_a_load_that_matches_too_little_is_an_error_naming_the_closest_layers(tmp_path):
  weights = _tiny_weights()
  initial = _tiny_model().init(jax.random.key(0), jnp.zeros((1, 6, 6, 2)))
  path = tmp_path / "session.weights.h5"
  # Keras' auto-names from a session that had built other models: nothing lines up.
  _write_keras3(path, {"conv2d_7": weights["conv2d"], "batch_normalization_3": weights["batch_normalization"],
                       "dense_2": weights["dense"]})
  with pytest.raises(DataError, match=r"only 0 of the file's 3 layers with weights match the model "
                                      r"\(min_fraction=0.5\); .*closest file names: conv2d ~ conv2d_7, "
                                      r"batch_norm ~ batch_normalization_3, dense ~ dense_2; pass rename"):
    load_keras_weights(path, initial, strict=False)
  with pytest.raises(DataError, match=r"only 0 of the file's 3 layers"):
    load_keras_weights(path, initial, strict=False, min_fraction=0.0)  # nothing at all is never a load
  # Strict loads name the closest file layers too.
  with pytest.raises(DataError, match=r"closest file names: conv2d ~ conv2d_7, batch_norm ~ "
                                      r"batch_normalization_3, dense ~ dense_2$"):
    load_keras_weights(path, initial)
  # One layer of three is below the default half; a stated lower fraction accepts it.
  _write_keras3(path, {"conv2d": weights["conv2d"], "bn": weights["batch_normalization"], "fc": weights["dense"]})
  with pytest.raises(DataError, match=r"only 1 of the file's 3 layers .*batch_norm ~ bn"):
    load_keras_weights(path, initial, strict=False)
  variables = load_keras_weights(path, initial, strict=False, min_fraction=0.3)
  np.testing.assert_array_equal(variables["params"]["conv2d"]["kernel"], weights["conv2d"][0])
  np.testing.assert_array_equal(variables["params"]["dense"]["kernel"], initial["params"]["dense"]["kernel"])
  for bad in (1.5, -0.1, "half", True):
    with pytest.raises(ValueError, match=r"min_fraction: expected a number in \[0, 1\]"):
      load_keras_weights(path, initial, strict=False, min_fraction=bad)
  empty = tmp_path / "empty.weights.h5"
  _write_keras3(empty, {})
  with pytest.raises(DataError, match=r"empty.weights.h5: the file holds no layer with weights"):
    load_keras_weights(empty, initial, strict=False)


def _bn_safe_randomise(model, seed):
  """_randomise, with every BatchNormalization's moving variance made positive."""
  _randomise(model, seed)
  for layer in model._flatten_layers():
    if layer.__class__.__name__ == "BatchNormalization":
      gamma, beta, mean, var = layer.get_weights()
      layer.set_weights([gamma, beta, mean, np.abs(var) + 0.5])


@pytest.mark.oracle
def test_nested_keras_models_and_transfer_loads(tmp_path):
  """Real Keras files: a nested model in every layout into the nested jaxcnn model (Keras' predictions)
  and into a flat one; the backbone's own file under a new head (strict=False); Keras auto-names that
  match nothing: an error naming the closest names."""
  keras = _keras()
  layers = keras.layers
  backbone = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3, name="c1"),
                               layers.BatchNormalization(name="bn"), layers.Activation("relu")], name="backbone")
  model = keras.Sequential([keras.Input((8, 8, 3)), backbone, layers.Flatten(), layers.Dense(2, name="head")])
  _bn_safe_randomise(model, 4)
  x = np.random.default_rng(5).uniform(size=(3, 8, 8, 3)).astype(np.float32)
  expected = np.asarray(model(x, training=False))

  ours = Sequential([Sequential([Conv2D(4, 3, name="c1"), BatchNorm(name="bn"), Activation("relu")],
                                name="backbone"), Flatten(), Dense(2, name="head")])
  flat = Sequential([Conv2D(4, 3, name="c1"), BatchNorm(name="bn"), Activation("relu"), Flatten(),
                     Dense(2, name="head")])
  template = jax.eval_shape(ours.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  flat_template = jax.eval_shape(flat.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  for path in _save_all_layouts(keras, model, tmp_path):
    assert sorted(read_keras_weights(path)) == ["backbone/bn", "backbone/c1", "head"], path
    _check_predictions(jax.jit(ours.apply)(load_keras_weights(path, template), jnp.asarray(x)), expected)
    _check_predictions(jax.jit(flat.apply)(load_keras_weights(path, flat_template), jnp.asarray(x)), expected)

  # Transfer: the backbone's own file (layers "c1", "bn") under a new head.
  backbone_path = tmp_path / "backbone.weights.h5"
  backbone.save_weights(backbone_path)
  initial = ours.init(jax.random.key(1), jnp.zeros((1, 8, 8, 3)))
  moved = load_keras_weights(backbone_path, initial, strict=False)
  np.testing.assert_array_equal(moved["params"]["backbone"]["c1"]["kernel"], backbone.get_weights()[0])
  np.testing.assert_array_equal(moved["batch_stats"]["backbone"]["bn"]["var"], backbone.get_weights()[5])
  np.testing.assert_array_equal(moved["params"]["head"]["kernel"], initial["params"]["head"]["kernel"])

  # A model built with auto-names in a busy session: nothing lines up, and the error says what is close.
  other = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3, name="conv2d_7"),
                            layers.BatchNormalization(name="batch_normalization_3"), layers.Flatten(),
                            layers.Dense(2, name="dense_2")])
  other_path = tmp_path / "other.weights.h5"
  other.save_weights(other_path)
  plain = Sequential([Conv2D(4, 3), BatchNorm(), Flatten(), Dense(2)])
  with pytest.raises(DataError, match=r"only 0 of the file's 3 layers with weights match the model .*"
                                      r"conv2d ~ conv2d_7, batch_norm ~ batch_normalization_3, dense ~ dense_2"):
    load_keras_weights(other_path, plain.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))), strict=False)
