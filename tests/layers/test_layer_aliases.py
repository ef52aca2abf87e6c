"""Keras' layer names are the jaxcnn classes themselves: a model written with them is the same model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxcnn
from jaxcnn import layers as L

ALIASES = {
    "MaxPooling2D": "MaxPool2D", "AveragePooling2D": "AvgPool2D", "GlobalAveragePooling2D": "GlobalAvgPool2D",
    "GlobalMaxPooling2D": "GlobalMaxPool2D", "MaxPooling1D": "MaxPool1D", "AveragePooling1D": "AvgPool1D",
    "GlobalAveragePooling1D": "GlobalAvgPool1D", "GlobalMaxPooling1D": "GlobalMaxPool1D",
    "BatchNormalization": "BatchNorm",
}


def test_keras_names_are_the_same_classes_and_exported():
  for keras_name, name in ALIASES.items():
    assert getattr(L, keras_name) is getattr(L, name), keras_name
    assert keras_name in L.__all__


def _pair(keras_names: bool):
  pick = (lambda k: getattr(L, k)) if keras_names else (lambda k: getattr(L, ALIASES[k]))
  image = L.Sequential([
      L.Conv2D(4, 3, padding="same"), pick("BatchNormalization")(), L.Activation("relu"),
      pick("MaxPooling2D")(2), pick("AveragePooling2D")(2, padding="same"), L.Conv2D(6, 1),
      pick("GlobalAveragePooling2D")(), L.Dense(3)])
  wave = L.Sequential([
      L.Conv1D(4, 3), pick("MaxPooling1D")(2), pick("AveragePooling1D")(2), pick("GlobalMaxPooling1D")(),
      L.Dense(2)])
  return image, wave


def test_a_model_in_keras_names_has_the_same_parameters_outputs_and_summary():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
  w = jnp.asarray(np.random.default_rng(1).normal(size=(2, 12, 3)), jnp.float32)
  (keras_image, keras_wave), (image, wave) = _pair(True), _pair(False)
  for keras_model, model, inputs in ((keras_image, image, x), (keras_wave, wave, w)):
    ours = model.init(jax.random.key(0), inputs)
    theirs = keras_model.init(jax.random.key(0), inputs)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
      np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(model.apply(ours, inputs), keras_model.apply(theirs, inputs))
    table = jaxcnn.summary(keras_model, inputs.shape[1:], print_fn=None)
    assert str(table) == str(jaxcnn.summary(model, inputs.shape[1:], print_fn=None))
  # GlobalMaxPooling2D too, and the summary counts BatchNormalization's statistics as non-trainable.
  table = jaxcnn.summary(L.Sequential([L.Conv2D(4, 3), L.BatchNormalization(), L.GlobalMaxPooling2D()]),
                         (6, 6, 1), print_fn=None)
  assert table.output_shape == (None, 4) and table.non_trainable_params == 8
