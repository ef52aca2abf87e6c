"""Reference group and layer normalisation: the textbook formulas with explicit sums and counts.

Group norm loops over the groups, flattening each example's slice of a group to one row; layer norm
sums along the last axis. Argument checks are shared with `jaxcnn.ops.groupnorm` (same errors); the
arithmetic is written here independently, in float32 (float64 for float64 x).
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxcnn.ops._args import compute_dtype
from jaxcnn.ops.groupnorm import _check_group_norm_args, _check_layer_norm_args

__all__ = ["group_norm", "layer_norm"]


def _affine(y, scale, bias, acc):
  """y * scale + bias along the last axis (each optional)."""
  shape = (1,) * (y.ndim - 1) + (-1,)
  if scale is not None:
    y = y * jnp.asarray(scale).astype(acc).reshape(shape)
  if bias is not None:
    y = y + jnp.asarray(bias).astype(acc).reshape(shape)
  return y


def group_norm(x, scale, bias, *, groups: int, epsilon: float = 1e-3):
  """Reference group normalisation; same arguments and results as `jaxcnn.ops.group_norm`.

  For example n and group g (channels g * C/G ... (g + 1) * C/G - 1): v = all of x[n]'s values in those
  channels, count = len(v), mu = sum(v) / count, sigma2 = sum((v - mu)^2) / count,
  y = (v - mu) / sqrt(sigma2 + epsilon), then y * scale + bias per channel.

  Args:
    x: (N, ..., C) floating array.
    scale: (C,) multiplier, or None for 1.
    bias: (C,) offset, or None for 0.
    groups: keyword only, a positive int dividing C.
    epsilon: default 1e-3.

  Returns:
    Array of x's shape and dtype.
  """
  channels = _check_group_norm_args(x, scale, bias, groups, epsilon)
  x = jnp.asarray(x)
  acc = compute_dtype(x.dtype)
  n = x.shape[0]
  per_group = channels // groups
  positions = x.astype(acc).reshape(n, -1, channels)
  normalised = []
  for g in range(groups):
    part = positions[:, :, g * per_group:(g + 1) * per_group]
    values = part.reshape(n, -1)
    count = values.shape[1]
    mu = jnp.sum(values, axis=1) / count
    sigma2 = jnp.sum((values - mu[:, None]) ** 2, axis=1) / count
    normalised.append((part - mu[:, None, None]) / jnp.sqrt(sigma2[:, None, None] + epsilon))
  y = _affine(jnp.concatenate(normalised, axis=-1), scale, bias, acc)
  return y.reshape(x.shape).astype(x.dtype)


def layer_norm(x, scale, bias, *, epsilon: float = 1e-3):
  """Reference layer normalisation over the last axis; same arguments and results as
  `jaxcnn.ops.layer_norm`: mu = sum(x) / C, sigma2 = sum((x - mu)^2) / C along the last axis,
  y = (x - mu) / sqrt(sigma2 + epsilon) * scale + bias.

  Args:
    x: (..., C) floating array.
    scale: (C,) multiplier, or None for 1.
    bias: (C,) offset, or None for 0.
    epsilon: default 1e-3.

  Returns:
    Array of x's shape and dtype.
  """
  features = _check_layer_norm_args(x, scale, bias, epsilon)
  x = jnp.asarray(x)
  acc = compute_dtype(x.dtype)
  xf = x.astype(acc)
  mu = jnp.sum(xf, axis=-1, keepdims=True) / features
  sigma2 = jnp.sum((xf - mu) ** 2, axis=-1, keepdims=True) / features
  y = _affine((xf - mu) / jnp.sqrt(sigma2 + epsilon), scale, bias, acc)
  return y.astype(x.dtype)
