"""Sequential: passes train to every layer, Keras-style names, shared layers, bad input; Keras oracle."""
from __future__ import annotations

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close, import_tensorflow

from jaxcnn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, Sequential

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compute(fn, *args):
  """fn(*args) as one jitted program compiled cheaply (fn may return a pytree)."""
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


def _x(*shape, seed=1):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_textbook_model_reads_as_keras():
  model = Sequential([Conv2D(32, 3, activation="relu"), MaxPool2D(2), Flatten(), Dense(10)])
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32))
  assert sorted(variables["params"]) == ["conv2d", "dense"]
  assert variables["params"]["dense"]["kernel"].shape == (3 * 3 * 32, 10)


def test_sequential_passes_train_to_every_layer():
  inner = Sequential([Dropout(0.5)])  # nested: train must reach it too
  model = Sequential([Dense(16), BatchNorm(), inner])
  x = _x(4, 3)

  def program(x):
    variables = model.init(jax.random.key(0), x)
    eval_y, eval_updates = model.apply(variables, x, mutable=["batch_stats"])
    train_y, train_updates = model.apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)},
                                         mutable=["batch_stats"])
    features = model.apply(variables, x, method=lambda m, v: m.layers[1](m.layers[0](v)))
    return variables, eval_y, eval_updates, train_y, train_updates, features

  variables, eval_y, eval_updates, train_y, train_updates, features = _compute(program, x)
  # Eval: Dropout is the identity and the running statistics stay put.
  assert_close(eval_y, features)
  np.testing.assert_array_equal(eval_updates["batch_stats"]["batch_norm"]["mean"],
                                variables["batch_stats"]["batch_norm"]["mean"])
  # Train: about half the units dropped and the statistics moved.
  assert 0.2 < float(np.mean(train_y == 0)) < 0.8
  assert np.all(train_updates["batch_stats"]["batch_norm"]["mean"] != 0)


def test_layer_names_are_keras_style_and_explicit_names_kept():
  model = Sequential([Conv2D(2, 3), Conv2D(2, 3, name="dense"), MaxPool2D(1), Dense(3), Flatten(),
                      Dense(4)])
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 6, 6, 1), jnp.float32))
  # "dense" is taken by the user's name, so the first unnamed Dense becomes dense_1.
  assert sorted(variables["params"]) == ["conv2d", "dense", "dense_1", "dense_2"]
  assert variables["params"]["dense"]["kernel"].shape == (3, 3, 2, 2)
  assert [layer.name for layer in model.layers] == ["conv2d", "dense", "max_pool2d", "dense_1", "flatten",
                                                    "dense_2"]


def test_shared_layer_is_one_set_of_variables():
  shared = Dense(4)
  model = Sequential([shared, shared])
  x = _x(2, 4)
  variables, y = _compute(lambda x: model.init_with_output(jax.random.key(0), x)[::-1], x)
  assert list(variables["params"]) == ["dense"]
  kernel, bias = (np.asarray(variables["params"]["dense"][k]) for k in ("kernel", "bias"))
  assert_close(y, (x @ kernel + bias[None, :]) @ kernel + bias[None, :], jnp.float32)


def test_sequential_bad_input():
  with pytest.raises(ValueError, match="Sequential: layer 1 is not a flax module"):
    Sequential([Dense(2), jax.nn.relu])
  with pytest.raises(ValueError, match=r"Sequential: layer 0 \(Dense\) does not accept the `train` argument"):
    Sequential([nn.Dense(2)])
  with pytest.raises(ValueError, match="Sequential: layers must be a list or tuple of modules"):
    Sequential(Dense(2))


@pytest.mark.oracle
def test_conv_batch_norm_match_keras():
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  import_tensorflow()
  keras = pytest.importorskip("keras")
  x = _x(2, 6, 6, 3)
  k_conv = keras.layers.Conv2D(4, 3, padding="same")
  k_bn = keras.layers.BatchNormalization()
  k_conv.build((None, 6, 6, 3))
  k_bn.build((None, 6, 6, 4))
  kernel, bias = _x(3, 3, 3, 4, seed=2), _x(4, seed=3)
  gamma, beta, moving_mean, moving_var = _x(4, seed=4), _x(4, seed=5), _x(4, seed=6), 1.0 + _x(4, seed=7) ** 2
  k_conv.set_weights([kernel, bias])
  k_bn.set_weights([gamma, beta, moving_mean, moving_var])
  keras_eval = np.asarray(k_bn(k_conv(x), training=False))
  keras_train = np.asarray(k_bn(k_conv(x), training=True))
  keras_mean, keras_var = (np.asarray(w) for w in k_bn.get_weights()[2:])

  model = Sequential([Conv2D(4, 3, padding="same"), BatchNorm()])
  variables = {"params": {"conv2d": {"kernel": kernel, "bias": bias}, "batch_norm": {"scale": gamma, "bias": beta}},
               "batch_stats": {"batch_norm": {"mean": moving_mean, "var": moving_var}}}
  ours_eval, (ours_train, updates) = _compute(
      lambda v, x: (model.apply(v, x), model.apply(v, x, train=True, mutable=["batch_stats"])), variables, x)
  assert_close(ours_eval, keras_eval, atol=1e-4, rtol=1e-4)
  assert_close(ours_train, keras_train, atol=1e-4, rtol=1e-4)
  assert_close(updates["batch_stats"]["batch_norm"]["mean"], keras_mean, atol=1e-5, rtol=1e-5)
  assert_close(updates["batch_stats"]["batch_norm"]["var"], keras_var, atol=1e-5, rtol=1e-5)
