"""Fast per-example normalisation: group normalisation and layer normalisation (channels last).

Neither keeps running statistics: the statistics of each example are used in training and evaluation
alike. Statistics are computed in float32 (float64 for float64 x; also for bfloat16 x) with two passes
(mean, then the mean squared deviation from it).

group_norm reduces the spatial axes of the (N, ..., C) array first, to per-channel sums (N, C), and
adds those up per group; the normalisation and the affine map are then folded into (N, C) vectors, one
multiply-add per element, as in `jaxcnn.ops.batch_norm`. (Reducing a (N, positions, G, C / G) view over
its non-minor axes instead was 6x slower on CPU, forward and backward.) layer_norm's statistics are per
position, so folding the per-channel scale into them would make full-size coefficient arrays: it
computes (x - mean) * rsqrt(var + epsilon) * scale + bias, which XLA fuses into one pass (the folded form
measured 1.2-1.3x slower on CPU, forward and backward).

The argument checks live in the private `_check_*` helpers here, reused by `jaxcnn.reference.group_norm`
/ `layer_norm` so both twins reject the same input with the same message.
"""
from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn.ops._args import check_floating, compute_dtype

__all__ = ["group_norm", "layer_norm"]


def _check_affine(x, scale, bias, channels: int, what: str):
  for name, value in (("scale", scale), ("bias", bias)):
    if value is None:
      continue
    check_floating(value, name)
    if tuple(jnp.shape(value)) != (channels,):
      raise ValueError(f"{name} must have shape ({channels},) to match {what} of x {tuple(jnp.shape(x))}, "
                       f"got shape {tuple(jnp.shape(value))}")


def _check_epsilon(epsilon):
  if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not epsilon > 0.0:
    raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")


def _check_group_norm_args(x, scale, bias, groups, epsilon) -> int:
  """Validates `group_norm`'s arguments; returns the channel count C = x.shape[-1]."""
  if jnp.ndim(x) < 2:
    raise ValueError(f"x must have rank >= 2 (N, ..., C), got shape {tuple(jnp.shape(x))}")
  check_floating(x, "x")
  channels = jnp.shape(x)[-1]
  if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
    raise ValueError(f"groups must be a positive int, got {groups!r}")
  if channels % groups:
    raise ValueError(f"groups={groups} must divide the channels of x (shape {tuple(jnp.shape(x))})")
  _check_affine(x, scale, bias, channels, "the channels")
  _check_epsilon(epsilon)
  return channels


def _check_layer_norm_args(x, scale, bias, epsilon) -> int:
  """Validates `layer_norm`'s arguments; returns the size of the last axis."""
  if jnp.ndim(x) < 1:
    raise ValueError(f"x must have rank >= 1 (..., C), got shape {tuple(jnp.shape(x))}")
  check_floating(x, "x")
  features = jnp.shape(x)[-1]
  _check_affine(x, scale, bias, features, "the last axis")
  _check_epsilon(epsilon)
  return features


def group_norm(x, scale, bias, *, groups: int, epsilon: float = 1e-3):
  """Group normalisation (Wu & He, 2018), channels last, as Keras' `GroupNormalization`.

  The C channels form `groups` consecutive groups of C / groups; each example's values over every
  spatial position and the group's channels are normalised by their own mean and biased variance:
  y = (x - mu[n, g]) / sqrt(sigma2[n, g] + epsilon) * scale[c] + bias[c].
  groups == C is instance normalisation, groups == 1 normalises each example over all its values.

  Args:
    x: (N, ..., C) floating array (e.g. NHWC), rank >= 2.
    scale: (C,) multiplier (gamma), or None for 1.
    bias: (C,) offset (beta), or None for 0.
    groups: keyword only, a positive int dividing C.
    epsilon: added to the variance; default 1e-3 (Keras; PyTorch's GroupNorm uses 1e-5).

  Returns:
    Array of x's shape and dtype.

  Raises:
    ValueError naming the argument: rank < 2, non-float dtype, groups not a positive divisor of C,
    scale/bias of another shape, epsilon <= 0.
  """
  channels = _check_group_norm_args(x, scale, bias, groups, epsilon)
  x = jnp.asarray(x)
  acc = compute_dtype(x.dtype)
  n, per_group = x.shape[0], channels // groups
  spatial = tuple(range(1, x.ndim - 1))
  count = float(np.prod(x.shape[1:-1])) * per_group

  def group_means(values):
    """(N, ..., C) -> (N, C): the mean over each example's positions and its channel's group."""
    sums = jnp.sum(values, axis=spatial) if spatial else values
    means = sums.reshape(n, groups, per_group).sum(axis=-1, keepdims=True) / count
    return jnp.broadcast_to(means, (n, groups, per_group)).reshape(n, channels)

  xf = x.astype(acc)
  shape = (n,) + (1,) * len(spatial) + (channels,)
  mean = group_means(xf)
  var = group_means(jnp.square(xf - mean.reshape(shape)))
  # One multiply-add per element: fold the normalisation and the affine map into (N, C) vectors first.
  inv = lax.rsqrt(var + epsilon)
  if scale is not None:
    inv = inv * jnp.asarray(scale).astype(acc).reshape(1, channels)
  shift = -mean * inv
  if bias is not None:
    shift = shift + jnp.asarray(bias).astype(acc).reshape(1, channels)
  return (xf * inv.reshape(shape) + shift.reshape(shape)).astype(x.dtype)


def layer_norm(x, scale, bias, *, epsilon: float = 1e-3):
  """Layer normalisation over the last axis, as Keras' `LayerNormalization()` (axis=-1).

  y = (x - mu) / sqrt(sigma2 + epsilon) * scale + bias, with mu and the biased variance sigma2 taken
  over the last axis of each position separately.

  Args:
    x: (..., C) floating array, rank >= 1.
    scale: (C,) multiplier (gamma), or None for 1.
    bias: (C,) offset (beta), or None for 0.
    epsilon: added to the variance; default 1e-3 (Keras; PyTorch's LayerNorm uses 1e-5).

  Returns:
    Array of x's shape and dtype.

  Raises:
    ValueError naming the argument: rank 0, non-float dtype, scale/bias of another shape, epsilon <= 0.
  """
  features = _check_layer_norm_args(x, scale, bias, epsilon)
  x = jnp.asarray(x)
  acc = compute_dtype(x.dtype)
  xf = x.astype(acc)
  centred = xf - jnp.mean(xf, axis=-1, keepdims=True)
  y = centred * lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + epsilon)
  shape = (1,) * (x.ndim - 1) + (features,)
  if scale is not None:
    y = y * jnp.asarray(scale).astype(acc).reshape(shape)
  if bias is not None:
    y = y + jnp.asarray(bias).astype(acc).reshape(shape)
  return y.astype(x.dtype)
