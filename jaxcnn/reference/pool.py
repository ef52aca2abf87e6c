"""Reference pooling: every window gathered explicitly by index arithmetic, then max / mean.

The padded input is built by writing x into a filled array; window cell (o, t) of a spatial dim reads
padded index o * stride + t. Average pools count the real cells of each window by gathering a 0/1
mask of real cells the same way. Everything is computed in float32 (float64 for float64 x) and cast
back to x's dtype.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxcnn.ops._args import PairOrInt, Padding, check_floating, check_rank, compute_dtype, parse_pool_args

__all__ = [
    "max_pool2d", "avg_pool2d", "global_avg_pool2d", "global_max_pool2d",
    "max_pool1d", "avg_pool1d", "global_avg_pool1d", "global_max_pool1d",
]

_LAYOUTS = {1: "(N, L, C)", 2: "(N, H, W, C)"}


def _padded(x, pads, fill):
  """x written into a `fill`-valued array with `pads` extra cells around each spatial dim."""
  shape = (x.shape[0], *(s + lo + hi for s, (lo, hi) in zip(x.shape[1:-1], pads)), x.shape[-1])
  index = (slice(None), *(slice(lo, lo + s) for s, (lo, _) in zip(x.shape[1:-1], pads)), slice(None))
  return jnp.full(shape, fill, x.dtype).at[index].set(x)


def _gather_windows(xp, window, strides):
  """(N, *padded, C) -> (N, o1, k1, o2, k2, ..., C): element [n, o1, t1, ...] = xp[n, o1*s1 + t1, ...]."""
  n = len(window)
  indices = []
  for d, (size, k, s) in enumerate(zip(xp.shape[1:-1], window, strides)):
    out = (size - k) // s + 1
    index = jnp.arange(out)[:, None] * s + jnp.arange(k)[None, :]
    shape = [1] * (2 * n)
    shape[2 * d], shape[2 * d + 1] = out, k
    indices.append(index.reshape(shape))
  return xp[(slice(None), *indices, slice(None))]


def _window_axes(n):
  return tuple(2 + 2 * d for d in range(n))


def _max_pool(x, pool_size, strides, padding, n):
  window, strides, pads = parse_pool_args(x, pool_size, strides, padding, n, _LAYOUTS[n])
  x = jnp.asarray(x)
  patches = _gather_windows(_padded(x.astype(compute_dtype(x.dtype)), pads, -jnp.inf), window, strides)
  return jnp.max(patches, axis=_window_axes(n)).astype(x.dtype)


def _avg_pool(x, pool_size, strides, padding, count_include_pad, n):
  window, strides, pads = parse_pool_args(x, pool_size, strides, padding, n, _LAYOUTS[n])
  x = jnp.asarray(x)
  acc = compute_dtype(x.dtype)
  patches = _gather_windows(_padded(x.astype(acc), pads, 0.0), window, strides)
  sums = jnp.sum(patches, axis=_window_axes(n))
  if count_include_pad:
    count = 1.0
    for k in window:
      count *= k
  else:
    real = _padded(jnp.ones((1, *x.shape[1:-1], 1), acc), pads, 0.0)
    count = jnp.sum(_gather_windows(real, window, strides), axis=_window_axes(n))
  return (sums / count).astype(x.dtype)


def max_pool2d(x, pool_size: PairOrInt, *, strides: PairOrInt | None = None, padding: Padding = "valid"):
  """Reference 2-D max pool; same arguments and result as `jaxcnn.ops.max_pool2d`.

  Args:
    x: (N, H, W, C) floating array.
    pool_size: an int or (kh, kw).
    strides: an int or (sh, sw); None (default) means strides = pool_size.
    padding: "valid" (default), "same", an int, (ph, pw) or ((top, bottom), (left, right)); padded cells
      are -inf.

  Returns:
    (N, Ho, Wo, C) array of x's dtype.
  """
  return _max_pool(x, pool_size, strides, padding, 2)


def avg_pool2d(x, pool_size: PairOrInt, *, strides: PairOrInt | None = None, padding: Padding = "valid",
               count_include_pad: bool = False):
  """Reference 2-D average pool; same arguments and result as `jaxcnn.ops.avg_pool2d`.

  Args:
    x: (N, H, W, C) floating array.
    pool_size: an int or (kh, kw).
    strides: an int or (sh, sw); None (default) means strides = pool_size.
    padding: "valid" (default), "same", an int, (ph, pw) or ((top, bottom), (left, right)); zeros.
    count_include_pad: divide by kh * kw (True) or by the real cells of each window (False, default).

  Returns:
    (N, Ho, Wo, C) array of x's dtype.
  """
  return _avg_pool(x, pool_size, strides, padding, count_include_pad, 2)


def max_pool1d(x, pool_size: PairOrInt, *, strides: PairOrInt | None = None, padding: Padding = "valid"):
  """Reference 1-D max pool over (N, L, C); arguments as `max_pool2d` with one spatial dim.

  Args:
    x: (N, L, C) floating array.
    pool_size: an int or (k,).
    strides: an int or (s,); None (default) means strides = pool_size.
    padding: "valid" (default), "same", an int or ((lo, hi),).

  Returns:
    (N, Lo, C) array of x's dtype.
  """
  return _max_pool(x, pool_size, strides, padding, 1)


def avg_pool1d(x, pool_size: PairOrInt, *, strides: PairOrInt | None = None, padding: Padding = "valid",
               count_include_pad: bool = False):
  """Reference 1-D average pool over (N, L, C); arguments as `avg_pool2d` with one spatial dim.

  Args:
    x: (N, L, C) floating array.
    pool_size: an int or (k,).
    strides: an int or (s,); None (default) means strides = pool_size.
    padding: "valid" (default), "same", an int or ((lo, hi),).
    count_include_pad: divide by k (True) or by the real cells of each window (False, default).

  Returns:
    (N, Lo, C) array of x's dtype.
  """
  return _avg_pool(x, pool_size, strides, padding, count_include_pad, 1)


def _global_pool(x, n, kind):
  check_rank(x, n + 2, "x", _LAYOUTS[n])
  check_floating(x, "x")
  x = jnp.asarray(x)
  # Flatten the spatial dims and reduce the one axis: a different route from the fast op's multi-axis
  # reduction, the same numbers.
  flat = x.astype(compute_dtype(x.dtype)).reshape(x.shape[0], -1, x.shape[-1])
  if kind == "max":
    return jnp.max(flat, axis=1).astype(x.dtype)
  return (jnp.sum(flat, axis=1) / flat.shape[1]).astype(x.dtype)


def global_avg_pool2d(x):
  """Reference mean over H and W: (N, H, W, C) -> (N, C)."""
  return _global_pool(x, 2, "avg")


def global_max_pool2d(x):
  """Reference maximum over H and W: (N, H, W, C) -> (N, C)."""
  return _global_pool(x, 2, "max")


def global_avg_pool1d(x):
  """Reference mean over L: (N, L, C) -> (N, C)."""
  return _global_pool(x, 1, "avg")


def global_max_pool1d(x):
  """Reference maximum over L: (N, L, C) -> (N, C)."""
  return _global_pool(x, 1, "max")
