"""Losses by Keras names, from_logits against the model's final activation, accuracy by target kind.

Hand-computed cases pin the arithmetic (probabilities are clipped to [1e-7, 1 - 1e-7], never squashed
again); the oracle test checks every Keras-named loss against Keras 3's own functions, from logits and
from probabilities, saturated probabilities included.
"""
from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close, import_tensorflow
from jaxcnn import layers as L
from jaxcnn import train
from jaxcnn.errors import ConfigError
from jaxcnn.train import losses

EPS = 1e-7


def _probabilities(seed=0, shape=(6, 4)):
  logits = np.random.default_rng(seed).normal(size=shape).astype(np.float32) * 3
  return logits, np.array(jax.nn.softmax(logits, axis=-1))


# -- the losses by hand ----------------------------------------------------------------------------------

def test_categorical_losses_on_probabilities_take_the_clipped_log_without_a_second_softmax():
  probs = jnp.array([[0.7, 0.2, 0.1], [0.0, 1.0, 0.0]])
  ids = jnp.array([0, 0])
  # Example 1 puts probability 0 on its class: clipped to 1e-7, a large finite loss (Keras: 16.118).
  expected = [-np.log(0.7), -np.log(EPS)]
  assert_close(train.sparse_categorical_crossentropy(probs, ids), expected)
  assert_close(train.categorical_crossentropy(probs, jax.nn.one_hot(ids, 3)), expected)
  # Soft labels: -sum_k y_k log p_k.
  soft = jnp.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])
  assert_close(train.categorical_crossentropy(probs, soft),
               [-(0.5 * np.log(0.7) + 0.5 * np.log(0.2)), -(0.5 * np.log(1 - EPS) + 0.5 * np.log(EPS))])
  # The Keras names with from_logits=True are the logits losses.
  logits, _ = _probabilities()
  labels = jnp.array([0, 1, 2, 3, 0, 1])
  assert_close(train.sparse_categorical_crossentropy(logits, labels, from_logits=True),
               train.softmax_cross_entropy(logits, labels))
  assert_close(train.categorical_crossentropy(logits, jax.nn.one_hot(labels, 4), from_logits=True),
               train.softmax_cross_entropy(logits, labels))
  # (B, 1) integer ids are squeezed, as Keras does.
  assert_close(train.sparse_categorical_crossentropy(probs, ids[:, None]), expected)


def test_binary_crossentropy_on_probabilities_and_logits():
  p = jnp.array([[0.9], [0.0], [1.0]])
  t = jnp.array([1, 1, 1])
  assert_close(train.binary_crossentropy(p, t), [-np.log(0.9), -np.log(EPS), -np.log(1 - EPS)], rtol=1e-4)
  logits = jnp.array([[0.0], [3.0]])
  assert_close(train.binary_crossentropy(logits, jnp.array([1, 0]), from_logits=True),
               train.sigmoid_binary_cross_entropy(logits, jnp.array([1, 0])))
  # Per example: the mean over every non-batch axis (an autoencoder's pixels).
  images = jnp.full((2, 2, 2, 1), 0.5)
  assert_close(train.binary_crossentropy(images, jnp.ones((2, 2, 2, 1))), [np.log(2.0)] * 2)
  # bfloat16 probabilities are computed in float32: 1 - 1e-7 is 1.0 in bfloat16, log(1 - 1) is -inf.
  loss = train.binary_crossentropy(jnp.ones((2, 1), jnp.bfloat16), jnp.zeros((2,)))
  assert loss.dtype == jnp.float32 and np.all(np.isfinite(loss))


def test_regression_losses_and_long_names():
  outputs = jnp.arange(8.0).reshape(2, 2, 2)
  assert_close(train.mae(outputs, jnp.ones((2, 2, 2))), [(1 + 0 + 1 + 2) / 4, (3 + 4 + 5 + 6) / 4])
  assert train.mean_absolute_error is train.mae and train.mean_squared_error is train.mse
  assert train.get_loss("mean_squared_error") is train.mse and train.get_loss("mae") is train.mae
  assert_close(train.mse(jnp.ones((3, 1)), jnp.zeros((3,))), [1.0, 1.0, 1.0])  # (B,) targets for (B, 1)


def test_every_loss_name_is_known_and_gives_one_value_per_example():
  assert set(train.LOSSES) == {
      "softmax_cross_entropy", "sigmoid_binary_cross_entropy", "mse", "sparse_categorical_crossentropy",
      "categorical_crossentropy", "binary_crossentropy", "mean_squared_error", "mae", "mean_absolute_error"}
  _, probs = _probabilities(1)
  ids = jnp.array([0, 1, 2, 3, 0, 1])
  targets = {"softmax_cross_entropy": ids, "sparse_categorical_crossentropy": ids,
             "categorical_crossentropy": jax.nn.one_hot(ids, 4)}
  for name in train.LOSSES:
    target = targets.get(name, jnp.asarray(probs > 0.25, jnp.float32))
    loss = train.get_loss(name)(jnp.asarray(probs), target)
    assert loss.shape == (6,) and loss.dtype == jnp.float32 and np.all(np.isfinite(loss)), name


@pytest.mark.parametrize("call, message", [
    (lambda: train.sparse_categorical_crossentropy(jnp.ones((4, 3)) / 3, jnp.array([0.0, 1.7, 2.0, 0.2])),
     r"sparse_categorical_crossentropy: labels of shape \(4,\) must be integer class ids, got dtype float32"),
    (lambda: train.sparse_categorical_crossentropy(jnp.ones((4, 3)) / 3, jnp.eye(4, 3)),
     r"sparse_categorical_crossentropy: labels of shape \(4, 3\) look one-hot.*categorical_crossentropy"),
    (lambda: train.sparse_categorical_crossentropy(jnp.ones((4, 3)) / 3, jnp.zeros((5,), jnp.int32)),
     r"sparse_categorical_crossentropy: labels shape \(5,\) does not match the outputs' batch shape \(4,\)"),
    (lambda: train.sparse_categorical_crossentropy(jnp.ones((4,)), jnp.zeros((4,), jnp.int32)),
     r"sparse_categorical_crossentropy: outputs must be \(B, K\)"),
    (lambda: train.categorical_crossentropy(jnp.ones((4, 3)) / 3, jnp.zeros((4,), jnp.int32)),
     r"categorical_crossentropy: labels of shape \(4,\) are class ids.*sparse_categorical_crossentropy"),
    (lambda: train.categorical_crossentropy(jnp.ones((4, 3)) / 3, jnp.zeros((4, 5))),
     r"categorical_crossentropy: labels shape \(4, 5\) does not match outputs shape \(4, 3\)"),
    (lambda: train.binary_crossentropy(jnp.ones((4, 2)) / 2, jnp.zeros((4,))),
     r"binary_crossentropy: targets shape \(4,\) does not match outputs shape \(4, 2\)"),
    (lambda: train.mae(jnp.ones((4, 28, 28, 1)), jnp.ones((4, 28, 28))),
     r"mae: targets shape \(4, 28, 28\) does not match outputs shape \(4, 28, 28, 1\)"),
    (lambda: train.get_loss("hinge"), r"loss: unknown loss 'hinge'"),
    (lambda: train.get_loss("softmax_cross_entropy", from_logits=False),
     r"from_logits: loss 'softmax_cross_entropy' always takes logits.*sparse_categorical_crossentropy"),
    (lambda: train.get_loss("mse", from_logits=True), r"from_logits: applies to the cross-entropy losses"),
])
def test_bad_targets_raise_value_errors_naming_the_argument(call, message):
  with pytest.raises(ValueError, match=message):
    call()


# -- accuracy by target kind --------------------------------------------------------------------------------

def test_accuracy_follows_the_target_kind():
  probs = jnp.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.2, 0.5, 0.3]])
  ids = jnp.array([0, 1, 1])
  for name in ("softmax_cross_entropy", "sparse_categorical_crossentropy", "categorical_crossentropy"):
    assert list(losses.count_correct(name, probs, ids)) == [1, 0, 1], name
    # One-hot and soft labels: argmax of both.
    assert list(losses.count_correct(name, probs, jax.nn.one_hot(ids, 3) * 0.8 + 0.05)) == [1, 0, 1], name
  assert list(losses.count_correct("sparse_categorical_crossentropy", probs, ids[:, None])) == [1, 0, 1]
  # Binary: probabilities at 0.5, logits at 0.
  p = jnp.array([[0.6], [0.4], [0.3]])
  t = jnp.array([1, 1, 0])
  assert list(losses.count_correct("binary_crossentropy", p, t, from_logits=False)) == [1, 0, 1]
  assert list(losses.count_correct("binary_crossentropy", p, t, from_logits=True)) == [1, 1, 0]
  assert list(losses.count_correct("sigmoid_binary_cross_entropy", jnp.array([[0.5], [-0.5], [-2.0]]), t)) == [1, 0, 1]
  for name in ("mse", "mean_squared_error", "mae", "mean_absolute_error"):
    assert losses.count_correct(name, p, t) is None and not losses.has_accuracy(name)
  assert all(losses.has_accuracy(name) for name in losses.LOGITS_LOSSES + losses.KERAS_CROSSENTROPY)


# -- the model's final activation ---------------------------------------------------------------------------

class _Custom(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return jax.nn.softmax(nn.Dense(3)(x.reshape(x.shape[0], -1)))


@pytest.mark.parametrize("model, expected", [
    (L.Sequential([L.Flatten(), L.Dense(10, activation="softmax")]), "softmax"),
    (L.Sequential([L.Dense(10), L.Activation("softmax"), L.Dropout(0.1)]), "softmax"),
    (L.Sequential([L.Conv2D(1, 3, padding="same", activation="sigmoid")]), "sigmoid"),
    (L.Sequential([L.Conv2D(1, 3, activation="sigmoid"), L.UpSampling2D(2), L.Flatten()]), "sigmoid"),
    (L.Sequential([L.Sequential([L.Flatten(), L.Dense(2, activation="SoftMax")]), L.Dropout(0.5)]), "softmax"),
    (L.Sequential([L.Dense(4, activation="softmax"), L.Sequential([L.Flatten()])]), "softmax"),
    (L.Sequential([L.Dense(4, activation=jax.nn.sigmoid)]), "sigmoid"),
    (L.Sequential([L.Dense(4, activation=functools.partial(jax.nn.softmax, axis=-1))]), "softmax"),
    (L.Sequential([L.Dense(10, activation="softmax"), L.Dense(10)]), None),
    (L.Sequential([L.Dense(10, activation="relu")]), None),
    (L.Sequential([L.Dense(10, activation="softmax"), L.BatchNorm()]), None),
    (_Custom(), None),
])
def test_output_activation_reads_the_last_activation(model, expected):
  assert train.output_activation(model) == expected


def _softmax_model():
  return L.Sequential([L.Flatten(), L.Dense(3, activation="softmax", name="predictions")])


def _logits_model():
  return L.Sequential([L.Flatten(), L.Dense(3)])


def test_from_logits_resolution_table():
  softmax, plain, custom = _softmax_model(), _logits_model(), _Custom()
  resolve = train.resolve_from_logits
  for loss in ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy"):
    assert resolve(softmax, loss) is False and resolve(softmax, loss, False) is False
    assert resolve(plain, loss) is True and resolve(plain, loss, True) is True
    assert resolve(custom, loss) is True and resolve(custom, loss, False) is False  # trusted
  for loss in losses.LOGITS_LOSSES:
    assert resolve(plain, loss) is True and resolve(custom, loss, True) is True
  for loss in losses.REGRESSION_LOSSES:
    assert resolve(softmax, loss) is None and resolve(plain, loss) is None


@pytest.mark.parametrize("model, loss, from_logits, message", [
    (_softmax_model(), "softmax_cross_entropy", None,
     r"^loss='softmax_cross_entropy' takes logits, but the model ends in softmax \(layer 'predictions'\): "
     r"the softmax would be applied twice"),
    (L.Sequential([L.Conv2D(1, 3, activation="sigmoid")]), "sigmoid_binary_cross_entropy", None,
     r"^loss='sigmoid_binary_cross_entropy' takes logits, but the model ends in sigmoid \(layer 'conv2d'\).*"
     r"binary_crossentropy"),
    (_softmax_model(), "categorical_crossentropy", True,
     r"^loss='categorical_crossentropy' with from_logits=True takes logits, but the model ends in softmax"),
    (_logits_model(), "sparse_categorical_crossentropy", False,
     r"^loss='sparse_categorical_crossentropy' with from_logits=False takes probabilities, but the model's "
     r"last activation \(layer 'dense'\) is no softmax or sigmoid"),
    (_logits_model(), "softmax_cross_entropy", False, r"^from_logits=False: loss='softmax_cross_entropy' always"),
    (_logits_model(), "mse", True, r"^from_logits=True applies to the cross-entropy losses, not to loss='mse'"),
    (_logits_model(), "hinge", None, r"^loss: unknown loss 'hinge'"),
    (_logits_model(), "binary_crossentropy", 1, r"^from_logits: expected True, False or None"),
])
def test_make_steps_refuses_a_double_squash_and_logits_read_as_probabilities(model, loss, from_logits, message):
  with pytest.raises(ConfigError, match=message) as info:
    train.make_steps(model, loss=loss, from_logits=from_logits)
  assert "\n" not in str(info.value)


def test_config_key_from_logits():
  assert train.DEFAULTS["from_logits"] is None
  assert train.validate_config({"from_logits": False, "loss": "binary_crossentropy"}).from_logits is False
  with pytest.raises(ConfigError, match=r"from_logits='no' \(expected True, False or None \(auto\)\)"):
    train.validate_config({"from_logits": "no"})
  with pytest.raises(ConfigError, match=r"loss='hinge'"):
    train.validate_config({"loss": "hinge"})


@pytest.mark.parametrize("loss, labels", [
    ("sparse_categorical_crossentropy", jnp.array([0, 1, 2, 1])),
    ("categorical_crossentropy", jax.nn.one_hot(jnp.array([0, 1, 2, 1]), 3)),
])
def test_a_softmax_model_trains_on_its_probabilities(loss, labels):
  """The step's loss on a softmax model is the probability loss of its outputs, and the same weights
  without the softmax, trained from logits, give the same loss and gradients (to float32 rounding)."""
  softmax = L.Sequential([L.Flatten(), L.Dense(3, activation="softmax", name="head")])
  logits = L.Sequential([L.Flatten(), L.Dense(3, name="head")])
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 2, 1)), jnp.float32)
  batch = {"image": x, "label": labels, "mask": jnp.ones((4,))}
  metrics = {}
  for name, model in (("softmax", softmax), ("logits", logits)):
    state = train.create_train_state(model, (2, 2, 1), dict(optimizer="sgd", learning_rate=0.1, seed=0))
    train_step, eval_step = train.make_steps(model, loss=loss)
    new, metrics[name] = jax.jit(train_step)(state, batch)
    metrics[name]["kernel"] = new.params["head"]["kernel"]
  probs = softmax.apply({"params": state.params}, x)
  assert_close(metrics["softmax"]["loss_sum"], jnp.sum(train.get_loss(loss)(probs, labels)))
  for key in ("loss_sum", "correct_sum", "kernel"):
    assert_close(metrics["softmax"][key], metrics["logits"][key], rtol=1e-5, atol=1e-6)


# -- oracle: Keras 3's own losses --------------------------------------------------------------------------

def _keras():
  import_tensorflow()
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  return pytest.importorskip("keras")


@pytest.mark.oracle
def test_keras_named_losses_match_keras_from_logits_both_ways():
  keras = _keras()
  rng = np.random.default_rng(5)
  logits, probs = _probabilities(6, (8, 5))
  probs[0] = [0.0, 1.0, 0.0, 0.0, 0.0]  # saturated: clipping decides the loss
  probs[1] = [1.0, 0.0, 0.0, 0.0, 0.0]
  ids = rng.integers(0, 5, 8).astype(np.int32)
  ids[0] = 0
  one_hot = np.eye(5, dtype=np.float32)[ids]
  soft = rng.dirichlet(np.ones(5), 8).astype(np.float32)
  cases = [("sparse_categorical_crossentropy", ids), ("categorical_crossentropy", one_hot),
           ("categorical_crossentropy", soft)]
  for name, target in cases:
    ours = train.get_loss(name, from_logits=False)(jnp.asarray(probs), jnp.asarray(target))
    theirs = getattr(keras.losses, name)(target, probs, from_logits=False)
    assert_close(ours, np.asarray(theirs), err_msg=f"{name} on probabilities")
    ours = train.get_loss(name, from_logits=True)(jnp.asarray(logits), jnp.asarray(target))
    theirs = getattr(keras.losses, name)(target, logits, from_logits=True)
    assert_close(ours, np.asarray(theirs), err_msg=f"{name} on logits")

  # Binary: one target per example (B, 1) and per pixel (B, H, W, 1); Keras means over the last axis,
  # its loss reduction over the rest, so the per-example value is the mean over the non-batch axes.
  for shape in ((8, 1), (4, 3, 3, 1)):
    z = rng.normal(size=shape).astype(np.float32) * 4
    p = np.array(jax.nn.sigmoid(z))
    p.reshape(-1)[:2] = [0.0, 1.0]
    t = rng.uniform(size=shape).astype(np.float32)
    t.reshape(-1)[:2] = [1.0, 0.0]
    for from_logits, outputs in ((False, p), (True, z)):
      ours = train.binary_crossentropy(jnp.asarray(outputs), jnp.asarray(t), from_logits=from_logits)
      theirs = np.asarray(keras.losses.binary_crossentropy(t, outputs, from_logits=from_logits))
      assert_close(ours, theirs.reshape(shape[0], -1).mean(axis=1), err_msg=f"binary {shape} {from_logits}")
      # Keras' binary accuracy: outputs > 0.5 on probabilities.
      if not from_logits and shape == (8, 1):
        correct = losses.count_correct("binary_crossentropy", jnp.asarray(outputs), jnp.asarray(t > 0.5),
                                       from_logits=False)
        assert_close(correct, np.asarray(keras.metrics.binary_accuracy((t > 0.5).astype(np.float32), outputs))
                     .reshape(-1))
    y, target = rng.normal(size=shape).astype(np.float32), rng.normal(size=shape).astype(np.float32)
    for name, fn in (("mean_squared_error", train.mse), ("mean_absolute_error", train.mae)):
      theirs = np.asarray(getattr(keras.losses, name)(target, y))
      assert_close(fn(jnp.asarray(y), jnp.asarray(target)), theirs.reshape(shape[0], -1).mean(axis=1))
