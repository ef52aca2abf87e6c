"""Fast pooling ops: max and average pools over NHWC (2-D) and NLC (1-D) inputs, and global pools.

Lowerings, chosen statically from shapes (all of them jit-friendly):
  - sums with stride == window along a dim: the window's strided slices of that dim added, one dim at
    a time (one fused pass; reshape + reduce would go to a library call with a fixed overhead on XLA
    CPU).
  - max with stride == window on every spatial dim: crop what "valid" drops, reshape each spatial dim
    into (out, window) and reduce the window axes. One fused reduction. Its derivative is that of each
    tile's first maximum in row-major order (as PyTorch; ties stay deterministic): a `jax.custom_jvp`
    whose tangent is a linear primitive (`jaxcnn.ops._primitive.linear`) that reads the tangent at
    those maxima, and whose transpose, the backward pass, compares each of the tile's strided views
    with the maximum and writes the cotangent to the first match. Autodiff of the reduction would split
    the gradient among tied cells, which costs a count pass and a divide.
  - otherwise (overlapping or gapped windows), separably, one spatial dim at a time (for max, a dim
    whose stride equals its window still uses the reshape):
      max: combine the `window` strided slices of that dim with `maximum`;
      sum: a 1-D `lax.reduce_window` add along that dim.
`lax.reduce_window` max is avoided: on XLA CPU its backward (select_and_scatter) is slow, and slower
still inside `lax.scan`; the add variant's backward is a plain pad + window sum and is the fastest sum.
The measurements behind these choices are in benchmarks/README.md.

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

from jaxcnn.ops import _primitive
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
      # (a library call with fixed overhead on XLA CPU).
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


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _max_tiles(x, window):
  """Max over non-overlapping windows (tiles): (N, *spatial, C) -> (N, *(spatial // window), C).

  The derivative of each tile is that of its first maximum in row-major order (cropped cells have
  none): the tangent is `_route_to_first_max`, a linear primitive whose transpose is a hand-written
  scatter of the cotangent onto those maxima.
  """
  return _reduce_tiles(x, window, jnp.max)


@_max_tiles.defjvp
def _max_tiles_jvp(window, primals, tangents):
  (x,), (tx,) = primals, tangents
  y = _reduce_tiles(x, window, jnp.max)
  return y, _route_to_first_max(tx, x, y, window=window)


def _first_maxima(x, y, window):
  """One boolean (N, *out, C) array per position within a tile (row-major): True where that position
  holds the tile's maximum y and no earlier position does."""
  taken = None
  hits = []
  for view in _tile_views(x, window, y.shape[1:-1]):
    hit = view == y
    if taken is None:
      taken = hit
    else:
      hit = hit & ~taken
      taken = taken | hit
    hits.append(hit)
  return hits


def _route_forward(t, x, y, *, window):
  """t's value at each tile's first maximum of x: (N, *spatial, C) -> (N, *out, C); linear in t."""
  zero = jnp.zeros((), t.dtype)
  total = None
  for hit, view in zip(_first_maxima(x, y, window), _tile_views(t, window, y.shape[1:-1])):
    term = jnp.where(hit, view, zero)
    total = term if total is None else total + term
  return total


def _route_transpose(g, x, y, t_aval, *, window):
  """The transpose of `_route_forward` in t: each tile's g written to its first maximum, zeros
  elsewhere (one select per tile position, interleaved back into place by a reshape)."""
  del t_aval
  out = y.shape[1:-1]
  zero = jnp.zeros((), g.dtype)
  grads = [jnp.where(hit, g, zero) for hit in _first_maxima(x, y, window)]
  n = len(window)
  # (N, *out, taps, C) -> (N, *out, *window, C) -> (N, o1, k1, o2, k2, ..., C) -> (N, o1*k1, ..., C)
  tiles = jnp.stack(grads, axis=-2).reshape(x.shape[0], *out, *window, x.shape[-1])
  order = [0, *itertools.chain.from_iterable((1 + d, 1 + n + d) for d in range(n)), 2 * n + 1]
  dx = tiles.transpose(order).reshape(x.shape[0], *(o * k for o, k in zip(out, window)), x.shape[-1])
  return jnp.pad(dx, ((0, 0), *((0, size - o * k) for size, o, k in zip(x.shape[1:-1], out, window)),
                      (0, 0)))


def _route_batch(bind, args, dims, *, window):
  """vmap: every operand's mapped axis joins the batch axis (unmapped operands are broadcast first)."""
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
  folded = []
  for a, d in zip(args, dims):
    a = jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
    n = a.shape[1]
    folded.append(a.reshape(size * n, *a.shape[2:]))
  out = bind(*folded, window=window)
  return out.reshape(size, n, *out.shape[1:]), 0


_route_to_first_max = _primitive.linear("jaxcnn_route_to_first_max", _route_forward, _route_transpose,
                                        _route_batch)


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
