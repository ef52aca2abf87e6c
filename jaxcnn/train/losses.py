"""Losses by name (jaxcnn's logits losses and Keras' names), the metric each supports, and the check that
no model output is squashed twice.

Every loss maps model outputs and targets to one value per example, shape (B,), so the step can weight
them by the batch mask and reduce over the *global* batch itself (axes between the batch and the last
one, e.g. the pixels of an autoencoder's output, are averaged per example, as Keras' mean reduction
does). All losses take `(outputs, targets)`, the order of optax and of the step; Keras' functions take
`(y_true, y_pred)`.

  logits losses (the outputs are logits; the loss applies softmax/sigmoid itself)
    softmax_cross_entropy            integer ids (B,) or one-hot/soft labels (B, K)
    sigmoid_binary_cross_entropy     0/1 (or soft) targets shaped like the outputs
  Keras names, with Keras' `from_logits` (default False: the outputs are probabilities)
    sparse_categorical_crossentropy  integer ids (B,) (or (B, 1))
    categorical_crossentropy         one-hot/soft labels (B, K)
    binary_crossentropy              0/1 (or soft) targets shaped like the outputs
  regression (no from_logits, no accuracy)
    mse = mean_squared_error, mae = mean_absolute_error

On probabilities (from_logits=False) the cross-entropies are computed as Keras 3 computes them: the
probabilities (renormalised to sum to 1 for the categorical ones) are clipped to [1e-7, 1 - 1e-7]
(`keras.backend.epsilon()`) before the log, so a saturated softmax/sigmoid gives a large finite loss
rather than inf; they never apply a second softmax or sigmoid. Probabilities are numerically worse
than logits where the model saturates (the clipped region has zero gradient), which is why a model
without a final softmax/sigmoid, trained from logits, is the default everywhere in jaxcnn.

`resolve_from_logits(model, loss, from_logits)` decides, before anything is compiled, whether the
outputs are logits, from the model's final activation (`output_activation`), and refuses a logits loss
on a model that ends in softmax/sigmoid (a silent double squash) and probabilities from a model that
has no squashing output.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import optax

from jaxcnn.errors import ConfigError

LOGITS_LOSSES = ("softmax_cross_entropy", "sigmoid_binary_cross_entropy")
KERAS_CROSSENTROPY = ("sparse_categorical_crossentropy", "categorical_crossentropy", "binary_crossentropy")
REGRESSION_LOSSES = ("mse", "mean_squared_error", "mae", "mean_absolute_error")
LOSSES = LOGITS_LOSSES + KERAS_CROSSENTROPY + REGRESSION_LOSSES

# The losses whose predictions are argmax over classes (softmax outputs) and thresholded (sigmoid outputs).
_CATEGORICAL = ("softmax_cross_entropy", "sparse_categorical_crossentropy", "categorical_crossentropy")
_BINARY = ("sigmoid_binary_cross_entropy", "binary_crossentropy")

# keras.backend.epsilon(): the clip that keeps log() of probabilities finite.
EPSILON = 1e-7


def _mean_over_features(x: jax.Array) -> jax.Array:
  """(B, ...) -> (B,): mean over every axis but the first."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


def _at_least_float32(x: jax.Array) -> jax.Array:
  """Probabilities in float32 (or wider): 1 - 1e-7 rounds to 1 in bfloat16, and log(1 - 1) is -inf."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_class_outputs(outputs: jax.Array, loss_name: str, argument: str = "outputs") -> None:
  if outputs.ndim < 2:
    raise ValueError(f"{loss_name}: {argument} must be (B, K) (class scores last), got shape {outputs.shape}")


def _class_ids(outputs: jax.Array, labels: jax.Array, loss_name: str) -> jax.Array:
  """Integer labels of outputs' shape but the last axis, as int32; a trailing 1 is squeezed (Keras)."""
  if labels.ndim == outputs.ndim and labels.shape[-1] == 1 and outputs.shape[-1] != 1:
    labels = labels[..., 0]
  if labels.shape == outputs.shape and not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"{loss_name}: labels of shape {labels.shape} look one-hot or soft; this loss takes "
                     f"integer class ids of shape {outputs.shape[:-1]} (one-hot labels go to "
                     "categorical_crossentropy)")
  if labels.shape != outputs.shape[:-1]:
    raise ValueError(f"{loss_name}: labels shape {labels.shape} does not match the outputs' batch shape "
                     f"{outputs.shape[:-1]} (integer class ids)")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    # A cast would truncate 1.7 to class 1 without a word.
    raise ValueError(f"{loss_name}: labels of shape {labels.shape} must be integer class ids, got dtype "
                     f"{labels.dtype}")
  return labels.astype(jnp.int32)


def _log_probabilities(outputs: jax.Array, from_logits: bool) -> jax.Array:
  """log p over the last axis: log_softmax of logits, or Keras' renormalised, clipped log of probabilities."""
  if from_logits:
    return jax.nn.log_softmax(outputs, axis=-1)
  outputs = _at_least_float32(outputs)
  probabilities = outputs / jnp.sum(outputs, axis=-1, keepdims=True)
  return jnp.log(jnp.clip(probabilities, EPSILON, 1.0 - EPSILON))


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Cross-entropy of softmax(logits) against labels.

  Args:
    logits: (B, K) float.
    labels: (B,) integer class ids, or (B, K) float probabilities (one-hot or smoothed).

  Returns:
    (B,) float32 loss per example.
  """
  if logits.ndim < 2:
    raise ValueError(f"softmax_cross_entropy: logits must be (B, K) (class scores last), got shape {logits.shape}")
  if labels.ndim == logits.ndim - 1:
    if labels.shape != logits.shape[:-1]:
      raise ValueError(f"softmax_cross_entropy: labels shape {labels.shape} does not match the logits' batch "
                       f"shape {logits.shape[:-1]}")
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      # A cast would truncate 1.7 to class 1 without a word.
      raise ValueError(f"softmax_cross_entropy: labels of shape {labels.shape} must be integer class ids, "
                       f"got dtype {labels.dtype}")
    return _mean_over_features(optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32)))
  if labels.shape != logits.shape:
    raise ValueError(f"softmax_cross_entropy: labels shape {labels.shape} matches neither logits "
                     f"{logits.shape} nor its batch shape {logits.shape[:-1]}")
  return _mean_over_features(optax.softmax_cross_entropy(logits, labels))


def sparse_categorical_crossentropy(outputs: jax.Array, labels: jax.Array, from_logits: bool = False) -> jax.Array:
  """Keras' sparse categorical cross-entropy: -log p[label].

  Args:
    outputs: (B, K) float: probabilities (a softmax output; from_logits=False, the default, as in Keras)
      or logits (from_logits=True).
    labels: (B,) integer class ids ((B, 1) is accepted, as in Keras).
    from_logits: whether `outputs` are logits.

  Returns:
    (B,) float32 loss per example.

  Raises:
    ValueError: outputs not (B, K); labels not integer, or not of outputs' batch shape.
  """
  _check_class_outputs(outputs, "sparse_categorical_crossentropy")
  ids = _class_ids(outputs, labels, "sparse_categorical_crossentropy")
  log_p = _log_probabilities(outputs, from_logits)
  return _mean_over_features(-jnp.take_along_axis(log_p, ids[..., None], axis=-1)[..., 0])


def categorical_crossentropy(outputs: jax.Array, labels: jax.Array, from_logits: bool = False) -> jax.Array:
  """Keras' categorical cross-entropy: -sum_k labels_k log p_k.

  Args:
    outputs: (B, K) float: probabilities (from_logits=False, the default, as in Keras) or logits.
    labels: (B, K) one-hot or soft labels (integer class ids go to sparse_categorical_crossentropy).
    from_logits: whether `outputs` are logits.

  Returns:
    (B,) float32 loss per example.

  Raises:
    ValueError: outputs not (B, K); labels not of outputs' shape.
  """
  _check_class_outputs(outputs, "categorical_crossentropy")
  if labels.shape != outputs.shape:
    if labels.shape == outputs.shape[:-1] or (labels.ndim == outputs.ndim and labels.shape[-1] == 1):
      raise ValueError(f"categorical_crossentropy: labels of shape {labels.shape} are class ids; this loss "
                       f"takes one-hot or soft labels of the outputs' shape {outputs.shape} (class ids go "
                       "to sparse_categorical_crossentropy)")
    raise ValueError(f"categorical_crossentropy: labels shape {labels.shape} does not match outputs shape "
                     f"{outputs.shape}")
  log_p = _log_probabilities(outputs, from_logits)
  return _mean_over_features(-jnp.sum(labels.astype(log_p.dtype) * log_p, axis=-1))


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Binary cross-entropy of sigmoid(logits), averaged over the non-batch axes.

  Args:
    logits: (B, ...) float; (B, 1) for one binary target per example.
    labels: 0/1 (or soft) targets of logits' shape, or (B,) when logits is (B, 1).

  Returns:
    (B,) float32 loss per example.
  """
  labels = _labels_like(logits, labels, "sigmoid_binary_cross_entropy")
  return _mean_over_features(optax.sigmoid_binary_cross_entropy(logits, labels))


def binary_crossentropy(outputs: jax.Array, targets: jax.Array, from_logits: bool = False) -> jax.Array:
  """Keras' binary cross-entropy, averaged over the non-batch axes.

  Args:
    outputs: (B, ...) float: probabilities (a sigmoid output; from_logits=False, the default, as in
      Keras) or logits (from_logits=True); (B, 1) for one binary target per example.
    targets: 0/1 (or soft) targets of outputs' shape, or (B,) when outputs is (B, 1).
    from_logits: whether `outputs` are logits.

  Returns:
    (B,) float32 loss per example.

  Raises:
    ValueError: targets not of outputs' shape.
  """
  targets = _labels_like(outputs, targets, "binary_crossentropy")
  if from_logits:
    return _mean_over_features(optax.sigmoid_binary_cross_entropy(outputs, targets))
  p = jnp.clip(_at_least_float32(outputs), EPSILON, 1.0 - EPSILON)
  targets = targets.astype(p.dtype)
  return _mean_over_features(-(targets * jnp.log(p) + (1.0 - targets) * jnp.log(1.0 - p)))


def mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean squared error over the non-batch axes (Keras: mse, mean_squared_error).

  Args:
    outputs: (B, ...) float.
    targets: float of outputs' shape, or (B,) when outputs is (B, 1).

  Returns:
    (B,) float32 loss per example.
  """
  targets = _labels_like(outputs, targets, "mse")
  return _mean_over_features(optax.squared_error(outputs, targets))


mean_squared_error = mse


def mae(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean absolute error over the non-batch axes (Keras: mae, mean_absolute_error).

  Args:
    outputs: (B, ...) float.
    targets: float of outputs' shape, or (B,) when outputs is (B, 1).

  Returns:
    (B,) float32 loss per example.
  """
  targets = _labels_like(outputs, targets, "mae")
  return _mean_over_features(jnp.abs(outputs - targets))


mean_absolute_error = mae


def _labels_like(outputs: jax.Array, labels: jax.Array, loss_name: str) -> jax.Array:
  """Targets cast to outputs' dtype and shape ((B,) targets are accepted for (B, 1) outputs)."""
  if labels.shape != outputs.shape:
    if outputs.ndim == 2 and outputs.shape[1] == 1 and labels.shape == outputs.shape[:1]:
      labels = labels[:, None]
    else:
      raise ValueError(f"{loss_name}: targets shape {labels.shape} does not match outputs "
                       f"shape {outputs.shape}")
  return labels.astype(outputs.dtype)


def has_accuracy(name: str) -> bool:
  """Whether loss `name` comes with an accuracy metric (every loss but the regression ones)."""
  return name not in REGRESSION_LOSSES


def count_correct(name: str, outputs: jax.Array, labels: jax.Array, from_logits: bool = True) -> jax.Array | None:
  """(B,) float32 1.0 where the prediction is right, or None when `name` has no accuracy (mse, mae).

  Categorical losses: argmax(outputs) == label for integer ids ((B,), or (B, 1) for the sparse loss),
  argmax of both for one-hot/soft labels (B, K); logits and probabilities have the same argmax.
  Binary losses: each output is thresholded (at 0 on logits, at 0.5 on probabilities) and compared with
  its target > 0.5, averaged over the non-batch axes. Axes between the batch and the classes are
  averaged too, so the result is always (B,).
  """
  if name in _CATEGORICAL:
    if labels.ndim == outputs.ndim and labels.shape[-1] == outputs.shape[-1] and outputs.shape[-1] != 1:
      labels = jnp.argmax(labels, axis=-1)
    elif labels.ndim == outputs.ndim and labels.shape[-1] == 1:
      labels = labels[..., 0]
    return _mean_over_features((jnp.argmax(outputs, axis=-1) == labels).astype(jnp.float32))
  if name in _BINARY:
    labels = _labels_like(outputs, labels, name)
    predicted = outputs > (0.0 if from_logits else 0.5)
    return _mean_over_features((predicted == (labels > 0.5)).astype(jnp.float32))
  return None


_FUNCTIONS = {
    "softmax_cross_entropy": softmax_cross_entropy, "sigmoid_binary_cross_entropy": sigmoid_binary_cross_entropy,
    "sparse_categorical_crossentropy": sparse_categorical_crossentropy,
    "categorical_crossentropy": categorical_crossentropy, "binary_crossentropy": binary_crossentropy,
    "mse": mse, "mean_squared_error": mse, "mae": mae, "mean_absolute_error": mae,
}


def get_loss(name: str, *, from_logits: Optional[bool] = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The per-example loss function called `name` (one of LOSSES), `fn(outputs, targets) -> (B,)`.

  Args:
    name: the loss name.
    from_logits: for the Keras cross-entropies, whether the outputs are logits (None: Keras' default,
      False); the logits losses accept None or True; the regression losses only None.

  Raises:
    ValueError: `name` is not a known loss, or from_logits does not apply to it.
  """
  if name not in _FUNCTIONS:
    raise ValueError(f"loss: unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
  if from_logits is not None and not isinstance(from_logits, bool):
    raise ValueError(f"from_logits: expected True, False or None, got {from_logits!r}")
  if name in LOGITS_LOSSES and from_logits is False:
    raise ValueError(f"from_logits: loss {name!r} always takes logits; for probabilities use "
                     f"{_keras_equivalent(name)!r} with from_logits=False")
  if name in REGRESSION_LOSSES and from_logits is not None:
    raise ValueError(f"from_logits: applies to the cross-entropy losses, not to {name!r}")
  if name in KERAS_CROSSENTROPY:
    return functools.partial(_FUNCTIONS[name], from_logits=bool(from_logits))
  return _FUNCTIONS[name]


def _keras_equivalent(name: str) -> str:
  return "binary_crossentropy" if name in _BINARY else "sparse_categorical_crossentropy"


# -- which outputs a model produces ----------------------------------------------------------------------

# Layers after the final activation that keep its outputs probabilities (they move, drop, pool or pad
# values but do not rescale them), by class name so that aliases and newer layers of the same name count.
_PASS_THROUGH = frozenset({
    "Flatten", "Reshape", "Permute", "Dropout", "SpatialDropout1D", "SpatialDropout2D", "Identity",
    "MaxPool1D", "MaxPool2D", "AvgPool1D", "AvgPool2D", "GlobalAvgPool1D", "GlobalAvgPool2D",
    "GlobalMaxPool1D", "GlobalMaxPool2D", "UpSampling1D", "UpSampling2D", "ZeroPadding1D",
    "ZeroPadding2D", "Cropping1D", "Cropping2D",
})
_UNKNOWN = "unknown"


def _squash_name(activation) -> str | None:
  """"softmax" | "sigmoid" | None (no squash) | _UNKNOWN (a callable that cannot be identified)."""
  from jaxcnn.layers.activations import ACTIVATIONS
  if activation is None:
    return None
  if isinstance(activation, str):
    name = activation.lower()
    return name if name in ("softmax", "sigmoid") else None
  base = activation.func if isinstance(activation, functools.partial) else activation
  for name in ("softmax", "sigmoid"):
    if base is ACTIVATIONS[name] or base is getattr(jax.nn, name):
      return name
  if any(base is fn for fn in ACTIVATIONS.values()):
    return None
  return _UNKNOWN


def _final_activation(model) -> tuple[str | None, str]:
  """(softmax | sigmoid | None | _UNKNOWN, the deciding layer's path) of a jaxcnn Sequential, read from
  its last layer with an activation, through nested Sequentials and _PASS_THROUGH layers."""
  from jaxcnn.layers import Sequential
  if not isinstance(model, Sequential):
    return _UNKNOWN, type(model).__name__
  return _scan_layers(model.layers, Sequential) or (None, type(model).__name__)


def _scan_layers(layers, sequential_type) -> tuple[str | None, str] | None:
  """_final_activation over `layers` from the last; None when every layer passes values through."""
  for layer in reversed(layers):
    name = layer.name or type(layer).__name__
    if isinstance(layer, sequential_type):
      found = _scan_layers(layer.layers, sequential_type)
      if found is None:
        continue
      return found[0], f"{name}/{found[1]}"
    if type(layer).__name__ in _PASS_THROUGH:
      continue
    if hasattr(layer, "activation"):
      return _squash_name(layer.activation), name
    return _UNKNOWN, name
  return None


def output_activation(model) -> str | None:
  """"softmax" or "sigmoid" when `model` ends in that activation, else None.

  Read from a jaxcnn `Sequential`: its last layer with an activation (Dense/Conv `activation=`, an
  `Activation` layer), looking through nested Sequentials and layers that only move values (Flatten,
  Reshape, Dropout, pooling, upsampling, padding). None also for what cannot be inspected: other
  modules (a custom `nn.Module`, VGG16, ResNets), a Sequential whose last layers compute something else
  (e.g. a BatchNorm), an unrecognised callable activation.
  """
  found, _ = _final_activation(model)
  return found if found in ("softmax", "sigmoid") else None


def check_output_size(model, loss: str, outputs: int) -> None:
  """Refuses a model whose outputs cannot learn: a softmax over one output per example.

  softmax of a single value is 1.0 whatever the value, so a model ending in Dense(1, activation="softmax")
  (Keras accepts it; its accuracy stays at the majority class) or a softmax cross-entropy over one logit
  has a constant loss and zero gradients: training would run and learn nothing.

  Raises:
    ConfigError: naming the layer or the loss, and the two-class alternatives.
  """
  if outputs != 1:
    return
  found, where = _final_activation(model)
  two_classes = ("for two classes end in Dense(1, activation='sigmoid') with loss='binary_crossentropy' "
                 "(or Dense(1) with loss='sigmoid_binary_cross_entropy'), or in 2 outputs with a softmax loss")
  if found == "softmax":
    raise ConfigError(f"the model ends in a softmax over 1 output (layer {where!r}): the softmax of one value is "
                      f"always 1.0, so nothing can be learned; {two_classes}")
  if loss in _CATEGORICAL:
    raise ConfigError(f"loss={loss!r} takes a softmax over the model's outputs, but the model has 1 output per "
                      f"example: the softmax of one value is always 1.0, so the loss is constant and nothing "
                      f"can be learned; {two_classes}")


def resolve_from_logits(model, loss: str, from_logits: Optional[bool] = None) -> Optional[bool]:
  """Whether `model`'s outputs go to `loss` as logits, checked against the model's final activation.

  from_logits=None (auto) is False when the model ends in softmax/sigmoid, True otherwise. Refused, so
  that a softmax is never applied twice and probabilities are never read as logits (Keras only warns
  about the first):

    loss                               model ends in      None (auto)   True         False
    softmax_cross_entropy,             softmax/sigmoid    ConfigError   ConfigError  ConfigError
      sigmoid_binary_cross_entropy     anything else      True          True         ConfigError
    sparse_categorical_crossentropy,   softmax/sigmoid    False         ConfigError  False
      categorical_crossentropy,        no squash          True          True         ConfigError
      binary_crossentropy              not inspectable    True          True         False (trusted)
    mse, mae (and long names)          anything           None          ConfigError  ConfigError

  "Not inspectable" is any model `output_activation` cannot read (a custom nn.Module, VGG16, ResNet,
  a Sequential ending in another module): auto takes its outputs as logits, and an explicit
  from_logits=False is trusted, so a custom module that ends in a softmax must say so.

  Returns:
    True/False for the cross-entropies, None for the regression losses.

  Raises:
    ConfigError: one of the refused combinations (one line naming the loss and the final activation),
      an unknown loss, or a from_logits that is not None/True/False.
  """
  if loss not in LOSSES:
    raise ConfigError(f"loss: unknown loss {loss!r}; expected one of {', '.join(LOSSES)}")
  if from_logits is not None and not isinstance(from_logits, bool):
    raise ConfigError(f"from_logits: expected True, False or None (auto), got {from_logits!r}")
  if loss in REGRESSION_LOSSES:
    if from_logits is not None:
      raise ConfigError(f"from_logits={from_logits} applies to the cross-entropy losses, not to loss={loss!r}; "
                        "leave it None")
    return None
  found, where = _final_activation(model)
  squashed = found in ("softmax", "sigmoid")
  ends_in = f"the model ends in {found} (layer {where!r})"
  if loss in LOGITS_LOSSES:
    if squashed:
      raise ConfigError(f"loss={loss!r} takes logits, but {ends_in}: the {found} would be applied twice; "
                        f"use loss={_keras_equivalent(loss)!r} (or its one-hot twin) on the probabilities, or "
                        f"drop the model's {found}")
    if from_logits is False:
      raise ConfigError(f"from_logits=False: loss={loss!r} always takes logits; for probabilities use "
                        f"loss={_keras_equivalent(loss)!r}")
    return True
  if from_logits is None:
    return not squashed
  if from_logits and squashed:
    raise ConfigError(f"loss={loss!r} with from_logits=True takes logits, but {ends_in}: the {found} would "
                      "be applied twice; set from_logits=False (or None: auto)")
  if not from_logits and found is None:
    raise ConfigError(f"loss={loss!r} with from_logits=False takes probabilities, but the model's last "
                      f"activation (layer {where!r}) is no softmax or sigmoid, so its outputs are logits; "
                      "set from_logits=True (or None: auto), or end the model in a softmax/sigmoid")
  return from_logits
