"""Fast miscellaneous ops: dropout, 2-D upsampling (nearest / bilinear) and zero padding, NHWC.

Argument checks live in the private `_check_*` / `_parse_*` helpers here, reused by
`jaxcnn.reference.misc` so both twins reject the same input with the same message.
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn.ops._args import check_floating, check_rank, compute_dtype, normalize_tuple, resolve_padding

__all__ = ["dropout", "upsample2d", "zero_pad2d"]

_METHODS = ("nearest", "bilinear")


def _check_dropout_args(x, rate, rng, deterministic) -> bool:
  """Validates dropout's arguments; returns True when the op is the identity."""
  check_floating(x, "x")
  if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate < 1.0:
    raise ValueError(f"rate must be a number in [0, 1), got {rate!r}")
  if deterministic or rate == 0.0:
    return True
  if rng is None:
    raise ValueError("rng is required when dropout is active (rate > 0 and deterministic=False); pass a "
                     "jax.random key")
  return False


def dropout(x, rate: float, *, rng=None, deterministic: bool = False):
  """Inverted dropout: zero each entry with probability `rate`, scale the kept ones by 1 / (1 - rate).

  The mask is `jax.random.bernoulli(rng, 1 - rate, x.shape)` (True = kept): a function of the key
  alone, so a given key drops the same cells on every call, and E[dropout(x)] = x.
  `jaxcnn.reference.dropout` derives the same mask from the key's random bits with its own code.

  Args:
    x: floating array of any shape.
    rate: drop probability, a Python number in [0, 1).
    rng: a `jax.random` key; required unless rate == 0 or deterministic. Default None.
    deterministic: return x unchanged (evaluation); default False.

  Returns:
    Array of x's shape and dtype.
  """
  if _check_dropout_args(x, rate, rng, deterministic):
    return jnp.asarray(x)
  x = jnp.asarray(x)
  keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
  return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


def _parse_upsample_args(x, size, method) -> tuple[int, int]:
  check_rank(x, 4, "x", "(N, H, W, C)")
  check_floating(x, "x")
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
  return normalize_tuple(size, 2, "size")


def _upsample_axis_bilinear(x, scale: int, axis: int):
  """Half-pixel linear upsampling of one axis by an integer `scale`, edges clamped.

  Output o = i * scale + r samples source coordinate i + d_r, d_r = (r + 0.5) / scale - 0.5, which lies
  in (-0.5, 0.5): phase r blends x[i] with its left (d_r < 0) or right (d_r >= 0) neighbour by |d_r|.
  Edge padding makes the missing neighbour at the borders the edge itself (= clamping).
  """
  if scale == 1:
    return x
  size = x.shape[axis]
  padded = jnp.pad(x, [(1, 1) if a == axis else (0, 0) for a in range(x.ndim)], mode="edge")
  left = lax.slice_in_dim(padded, 0, size, axis=axis)
  centre = lax.slice_in_dim(padded, 1, size + 1, axis=axis)
  right = lax.slice_in_dim(padded, 2, size + 2, axis=axis)
  phases = []
  for r in range(scale):
    d = (r + 0.5) / scale - 0.5
    if d < 0:
      phases.append((1.0 + d) * centre - d * left)
    else:
      phases.append((1.0 - d) * centre + d * right)
  stacked = jnp.stack(phases, axis=axis + 1)
  return stacked.reshape(*x.shape[:axis], size * scale, *x.shape[axis + 1:])


def upsample2d(x, size=2, *, method: str = "nearest"):
  """Upsamples H and W by integer factors (Keras UpSampling2D).

  "nearest" repeats each pixel size_h x size_w times. "bilinear" uses half-pixel centres: output row o
  samples source row (o + 0.5) / size_h - 0.5, clamped to [0, H - 1], and blends the two nearest rows
  linearly (likewise for columns); this equals Keras UpSampling2D(interpolation="bilinear"),
  tf.image.resize(method="bilinear") and torch interpolate(mode="bilinear", align_corners=False).

  Args:
    x: (N, H, W, C) floating array.
    size: upsampling factor, an int or (size_h, size_w), each >= 1; default 2.
    method: "nearest" (default) or "bilinear".

  Returns:
    (N, H * size_h, W * size_w, C) array of x's dtype (bilinear blends in float32, float64 for
    float64 x).
  """
  sh, sw = _parse_upsample_args(x, size, method)
  x = jnp.asarray(x)
  n, h, w, c = x.shape
  if method == "nearest":
    tiled = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, sh, w, sw, c))
    return tiled.reshape(n, h * sh, w * sw, c)
  y = _upsample_axis_bilinear(x.astype(compute_dtype(x.dtype)), sh, 1)
  y = _upsample_axis_bilinear(y, sw, 2)
  return y.astype(x.dtype)


def _parse_zero_pad_args(x, padding) -> tuple[tuple[int, int], tuple[int, int]]:
  check_rank(x, 4, "x", "(N, H, W, C)")
  if isinstance(padding, str):
    raise ValueError(f"padding must be an int, (ph, pw) or ((top, bottom), (left, right)), got {padding!r}")
  return resolve_padding(padding, jnp.shape(x)[1:3], (1, 1), (1, 1), name="padding")


def zero_pad2d(x, padding):
  """Pads H and W with zeros (Keras ZeroPadding2D).

  Args:
    x: (N, H, W, C) array.
    padding: an int p (p rows/columns on every side), (ph, pw) (ph rows top and bottom, pw columns
      left and right) or ((top, bottom), (left, right)); non-negative.

  Returns:
    (N, H + top + bottom, W + left + right, C) array of x's dtype.
  """
  (top, bottom), (left, right) = _parse_zero_pad_args(x, padding)
  return jnp.pad(jnp.asarray(x), ((0, 0), (top, bottom), (left, right), (0, 0)))
