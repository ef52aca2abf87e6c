"""Fast pooling ops: max and average pools over NHWC (2-D) and NLC (1-D) inputs, and global pools.

Lowerings, chosen statically from shapes (all of them jit-friendly):
  - sums with stride == window along a dim: the window's strided slices of that dim added, one dim at
    a time (one fused pass; faster than reshape + reduce, which XLA CPU hands to a library call with a
    fixed overhead: 2x2 average of 32x28x28x16, forward, 0.10 vs 0.16-0.21 ms; of 128x32x32x32,
    0.59 vs 0.93 ms).
  - max with stride == window on every spatial dim: crop what "valid" drops, reshape each spatial dim
    into (out, window) and reduce the window axes. One fused reduction; its backward is a hand-written
    `jax.custom_vjp` that compares each of the window's strided views with the maximum and sends the gradient to the first match in row-major order (as PyTorch; ties
    stay deterministic). Autodiff of the reduction would split the gradient among tied cells, which
    costs a count pass and a divide: with ReLU in front, fwd+bwd of 2x2 max pooling on 128x26x26x32
    inside lax.scan went from 30-43 ms to 12-19 ms on a loaded 2-core CPU.
  - otherwise (overlapping or gapped windows), separably, one spatial dim at a time (for max, a dim
    whose stride equals its window still uses the reshape):
      max: combine the `window` strided slices of that dim with `maximum`;
      sum: a 1-D `lax.reduce_window` add along that dim.
`lax.reduce_window` max is avoided: on XLA CPU its backward (select_and_scatter) is slow, and slower
still inside `lax.scan`; the add variant's backward is a plain pad + window sum and is the fastest sum.
Measured on a 128x26x26x32 float32 input, forward + backward under jit (ms):
  3x3/2 max: reduce_window 48, per-tap slices 46, separable slices 11, separable reduce_window 46
  3x3/1 max: reduce_window 119, per-tap slices 87, separable slices 44
  2x2/2 max: reduce_window 42, reshape 10
  3x3/2 sum: reduce_window 14, per-tap slices 48, separable slices 15, separable reduce_window 7
  3x3/1 sum: reduce_window 28-38, separable slices 48, separable reduce_window 23

Padding follows `jaxcnn.ops._args.resolve_padding`: "valid"; "same" (TensorFlow: out = ceil(in/stride),
the odd cell on the bottom/right); an int or (lo, hi) pairs (PyTorch). Padded cells never win a max;
average pools divide by the number of real cells in each window, or by the full window with
`count_include_pad=True` (PyTorch's default; with "same" padding that counts the padded cells too).
"""
from __future__ import annotations

import functools
import itertools
import operator
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn.ops._args import (PairOrInt, Padding, check_floating, check_rank, compute_dtype, pad_spatial,
                              parse_pool_args)

__all__ = [
    "max_pool2d", "avg_pool2d", "global_avg_pool2d", "global_max_pool2d",
    "max_pool1d", "avg_pool1d", "global_avg_pool1d", "global_max_pool1d",
]

_LAYOUTS = {1: "(N, L, C)", 2: "(N, H, W, C)"}


def _reduce_windows(x, window: Sequence[int], strides: Sequence[int], kind: str):
  """Reduces every (window, strides) window of the (already padded) spatial dims of `x`.

  kind "max" takes the maximum, "sum" the sum. Returns (N, *out, C), out = (size - k) // s + 1.
  """
  spatial = x.shape[1:-1]
  out = tuple((size - k) // s + 1 for size, k, s in zip(spatial, window, strides))
  reduce = jnp.max if kind == "max" else jnp.sum
  if kind == "max" and tuple(window) == tuple(strides):
    return _max_tiles(x, tuple(window))
  for d, (o, k, s) in enumerate(zip(out, window, strides)):
    axis = 1 + d
    if k == s and kind == "sum":
      # The k strided slices of this dim added: one fused pass, faster than the reshape's reduction
      # (a library call with fixed overhead on XLA CPU) on every measured shape.
      pieces = [lax.slice_in_dim(x, tap, tap + (o - 1) * s + 1, stride=s, axis=axis) for tap in range(k)]
      x = functools.reduce(operator.add, pieces)
      continue
    if k == s:
      x = lax.slice_in_dim(x, 0, o * k, axis=axis)
      x = reduce(x.reshape(*x.shape[:axis], o, k, *x.shape[axis + 1:]), axis=axis + 1)
      continue
    if kind == "sum":
      dims = [1] * x.ndim
      dims[axis] = k
      step = [1] * x.ndim
      step[axis] = s
      x = lax.reduce_window(x, np.zeros((), x.dtype), lax.add, dims, step, "VALID")
      continue
    acc = None
    for tap in range(k):
      piece = lax.slice_in_dim(x, tap, tap + (o - 1) * s + 1, stride=s, axis=axis)
      acc = piece if acc is None else jnp.maximum(acc, piece)
    x = acc
  return x


def _reduce_tiles(x, window, reduce):
  """Non-overlapping windows: crop the cells no window reaches, split each dim into (out, k), reduce."""
  out = tuple(size // k for size, k in zip(x.shape[1:-1], window))
  x = x[(slice(None), *(slice(0, o * k) for o, k in zip(out, window)), slice(None))]
  split = [x.shape[0]]
  for o, k in zip(out, window):
    split += [o, k]
  x = x.reshape(*split, x.shape[-1])
  return reduce(x, axis=tuple(2 + 2 * d for d in range(len(window))))


def _tile_views(x, window, out):
  """The prod(window) strided views (N, *out, C) of x, one per position within a tile, row-major."""
  views = []
  for offset in itertools.product(*(range(k) for k in window)):
    limit = (x.shape[0], *(a + (o - 1) * k + 1 for a, o, k in zip(offset, out, window)), x.shape[-1])
    views.append(lax.slice(x, (0, *offset, 0), limit, (1, *window, 1)))
  return views


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_tiles(x, window):
  """Max over non-overlapping windows (tiles): (N, *spatial, C) -> (N, *(spatial // window), C).

  The gradient of each tile goes to its first maximum in row-major order; cropped cells get none.
  """
  return _reduce_tiles(x, window, jnp.max)


def _max_tiles_forward(x, window):
  y = _reduce_tiles(x, window, jnp.max)
  return y, (x, y)


def _max_tiles_backward(window, residuals, g):
  x, y = residuals
  out = y.shape[1:-1]
  zero = jnp.zeros((), g.dtype)
  taken = None
  grads = []
  for view in _tile_views(x, window, out):
    hit = view == y
    if taken is None:
      taken = hit
    else:
      hit = hit & ~taken
      taken = taken | hit
    grads.append(jnp.where(hit, g, zero))
  n = len(window)
  # (N, *out, taps, C) -> (N, *out, *window, C) -> (N, o1, k1, o2, k2, ..., C) -> (N, o1*k1, ..., C)
  tiles = jnp.stack(grads, axis=-2).reshape(x.shape[0], *out, *window, x.shape[-1])
  order = [0, *itertools.chain.from_iterable((1 + d, 1 + n + d) for d in range(n)), 2 * n + 1]
  dx = tiles.transpose(order).reshape(x.shape[0], *(o * k for o, k in zip(out, window)), x.shape[-1])
  dx = jnp.pad(dx, ((0, 0), *((0, size - o * k) for size, o, k in zip(x.shape[1:-1], out, window)), (0, 0)))
  return (dx,)


_max_tiles.defvjp(_max_tiles_forward, _max_tiles_backward)


def _real_cell_counts(spatial, window, strides, pads):
  """(1, *out, 1) float64 numpy array: how many real (unpadded) cells each window covers."""
  counts = np.ones((), np.float64)
  for size, k, s, (lo, hi) in zip(spatial, window, strides, pads):
    out = (size + lo + hi - k) // s + 1
    starts = np.arange(out) * s - lo
    per_dim = np.minimum(starts + k, size) - np.maximum(starts, 0)
    counts = np.multiply.outer(counts, per_dim.astype(np.float64))
  return counts.reshape(1, *counts.shape, 1)


def _max_pool(x, pool_size, strides, padding, n):
  window, strides, pads = parse_pool_args(x, pool_size, strides, padding, n, _LAYOUTS[n])
  x = jnp.asarray(x)
  x = pad_spatial(x, pads, -jnp.inf)
  return _reduce_windows(x, window, strides, "max")


def _avg_pool(x, pool_size, strides, padding, count_include_pad, n):
  window, strides, pads = parse_pool_args(x, pool_size, strides, padding, n, _LAYOUTS[n])
  x = jnp.asarray(x)
  dtype = x.dtype
  spatial = x.shape[1:-1]
  # Sum in (at least) float32 even for bfloat16 inputs: a window of k*k rounded terms loses bits otherwise.
  sums = _reduce_windows(pad_spatial(x.astype(compute_dtype(dtype)), pads, 0.0), window, strides, "sum")
  if count_include_pad:
    return (sums * (1.0 / float(np.prod(window)))).astype(dtype)
  inverse = 1.0 / _real_cell_counts(spatial, window, strides, pads)
  return (sums * jnp.asarray(inverse, sums.dtype)).astype(dtype)


def max_pool2d(x, pool_size: PairOrInt, *, strides: PairOrInt | None = None, padding: Padding = "valid"):
  """2-D max pooling over NHWC input.

  Args:
    x: (N, H, W, C) floating array.
    pool_size: window size, an int or (kh, kw).
    strides: an int or (sh, sw); None (default) means strides = pool_size.
    padding: "valid" (default), "same" (TensorFlow: out = ceil(in / stride)), an int, (ph, pw) or
      ((top, bottom), (left, right)) (PyTorch). Padded cells never win; each side must be smaller
      than the window.

  Returns:
    (N, Ho, Wo, C) array of x's dtype.
  """
  return _max_pool(x, pool_size, strides, padding, 2)


def avg_pool2d(x, pool_size: PairOrInt, *, strides: PairOrInt | None = None, padding: Padding = "valid",
               count_include_pad: bool = False):
  """2-D average pooling over NHWC input.

  Args:
    x: (N, H, W, C) floating array.
    pool_size: window size, an int or (kh, kw).
    strides: an int or (sh, sw); None (default) means strides = pool_size.
    padding: "valid" (default), "same" (TensorFlow), an int, (ph, pw) or ((top, bottom), (left, right))
      (PyTorch); padded cells are zeros. Each side must be smaller than the window.
    count_include_pad: False (default; TensorFlow "same" and Keras) divides each window's sum by the
      number of real cells in it; True (PyTorch's default) divides by kh * kw.

  Returns:
    (N, Ho, Wo, C) array of x's dtype (sums are accumulated in float32, or float64 for float64 x).
  """
  return _avg_pool(x, pool_size, strides, padding, count_include_pad, 2)


def max_pool1d(x, pool_size: PairOrInt, *, strides: PairOrInt | None = None, padding: Padding = "valid"):
  """1-D max pooling over (N, L, C) input; arguments as `max_pool2d` with one spatial dim.

  Args:
    x: (N, L, C) floating array.
    pool_size: window length, an int or (k,).
    strides: an int or (s,); None (default) means strides = pool_size.
    padding: "valid" (default), "same", an int or ((lo, hi),).

  Returns:
    (N, Lo, C) array of x's dtype.
  """
  return _max_pool(x, pool_size, strides, padding, 1)


def avg_pool1d(x, pool_size: PairOrInt, *, strides: PairOrInt | None = None, padding: Padding = "valid",
               count_include_pad: bool = False):
  """1-D average pooling over (N, L, C) input; arguments as `avg_pool2d` with one spatial dim.

  Args:
    x: (N, L, C) floating array.
    pool_size: window length, an int or (k,).
    strides: an int or (s,); None (default) means strides = pool_size.
    padding: "valid" (default), "same", an int or ((lo, hi),).
    count_include_pad: divide by the window length (True) or by the real cells in it (False, default).

  Returns:
    (N, Lo, C) array of x's dtype.
  """
  return _avg_pool(x, pool_size, strides, padding, count_include_pad, 1)


def _global_pool(x, n, kind):
  check_rank(x, n + 2, "x", _LAYOUTS[n])
  check_floating(x, "x")
  x = jnp.asarray(x)
  axes = tuple(range(1, n + 1))
  if kind == "max":
    return jnp.max(x, axis=axes)
  return jnp.mean(x.astype(compute_dtype(x.dtype)), axis=axes).astype(x.dtype)


def global_avg_pool2d(x):
  """Mean over H and W: (N, H, W, C) -> (N, C), accumulated in float32, returned in x's dtype."""
  return _global_pool(x, 2, "avg")


def global_max_pool2d(x):
  """Maximum over H and W: (N, H, W, C) -> (N, C)."""
  return _global_pool(x, 2, "max")


def global_avg_pool1d(x):
  """Mean over L: (N, L, C) -> (N, C), accumulated in float32, returned in x's dtype."""
  return _global_pool(x, 1, "avg")


def global_max_pool1d(x):
  """Maximum over L: (N, L, C) -> (N, C)."""
  return _global_pool(x, 1, "max")
