"""Losses (per-example, from optax) and the metric each loss supports.

Every loss maps model outputs and targets to one value per example, shape (B,), so the step can weight
them by the batch mask and reduce over the *global* batch itself. Models return logits; the losses
apply softmax/sigmoid themselves.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

LOSSES = ("softmax_cross_entropy", "sigmoid_binary_cross_entropy", "mse")


def _mean_over_features(x: jax.Array) -> jax.Array:
  """(B, ...) -> (B,): mean over every axis but the first."""
  return jnp.mean(x.reshape(x.shape[0], -1), axis=1)


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
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
  if labels.shape != logits.shape:
    raise ValueError(f"softmax_cross_entropy: labels shape {labels.shape} matches neither logits "
                     f"{logits.shape} nor its batch shape {logits.shape[:-1]}")
  return optax.softmax_cross_entropy(logits, labels)


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


def mse(outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """Mean squared error over the non-batch axes.

  Args:
    outputs: (B, ...) float.
    targets: float of outputs' shape, or (B,) when outputs is (B, 1).

  Returns:
    (B,) float32 loss per example.
  """
  targets = _labels_like(outputs, targets, "mse")
  return _mean_over_features(optax.squared_error(outputs, targets))


def _labels_like(outputs: jax.Array, labels: jax.Array, loss_name: str) -> jax.Array:
  """Targets cast to outputs' dtype and shape ((B,) targets are accepted for (B, 1) outputs)."""
  if labels.shape != outputs.shape:
    if outputs.ndim == 2 and outputs.shape[1] == 1 and labels.shape == outputs.shape[:1]:
      labels = labels[:, None]
    else:
      raise ValueError(f"{loss_name}: targets shape {labels.shape} does not match outputs "
                       f"shape {outputs.shape}")
  return labels.astype(outputs.dtype)


def count_correct(name: str, outputs: jax.Array, labels: jax.Array) -> jax.Array | None:
  """(B,) float32 1.0 where the prediction is right, or None when `name` has no accuracy (mse).

  softmax: argmax(logits) == label (integer labels, or argmax of one-hot labels); sigmoid: each
  output's sign agrees with its 0/1 target, averaged over the non-batch axes.
  """
  if name == "softmax_cross_entropy":
    if labels.ndim == outputs.ndim:
      labels = jnp.argmax(labels, axis=-1)
    return (jnp.argmax(outputs, axis=-1) == labels).astype(jnp.float32)
  if name == "sigmoid_binary_cross_entropy":
    labels = _labels_like(outputs, labels, name)
    return _mean_over_features(((outputs > 0) == (labels > 0.5)).astype(jnp.float32))
  return None


def get_loss(name: str) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """The per-example loss function called `name` (one of LOSSES).

  Raises:
    ValueError: `name` is not a known loss.
  """
  losses = {"softmax_cross_entropy": softmax_cross_entropy,
            "sigmoid_binary_cross_entropy": sigmoid_binary_cross_entropy, "mse": mse}
  if name not in losses:
    raise ValueError(f"loss: unknown loss {name!r}; expected one of {', '.join(LOSSES)}")
  return losses[name]
