"""Argument checking and normalisation shared by `jaxcnn.ops` and `jaxcnn.reference`.

Both sets of ops accept the same arguments and must reject bad ones with the same `ValueError`, so the
parsing lives here once. Nothing here computes on arrays: padding is resolved to explicit
((lo, hi), ...) pairs from static shapes, and the two op sets then compute independently.
"""
from __future__ import annotations

from typing import Sequence, Union

import jax.numpy as jnp

PairOrInt = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence]


def check_rank(x, rank: int, name: str, layout: str):
  """Raises ValueError unless `x` has `rank` dims (`layout` names them, e.g. "(N, H, W, C)")."""
  ndim = jnp.ndim(x)
  if ndim != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(jnp.shape(x))}")


def check_floating(x, name: str):
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def normalize_tuple(value: PairOrInt, n: int, name: str, *, minimum: int = 1) -> tuple[int, ...]:
  """An int or a length-`n` sequence of ints -> a length-`n` tuple, each >= `minimum`."""
  if isinstance(value, (int,)) and not isinstance(value, bool):
    out = (int(value),) * n
  else:
    try:
      out = tuple(int(v) for v in value)
    except TypeError:
      raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}") from None
    if len(out) != n or any(isinstance(v, bool) for v in value):
      raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
  if any(v < minimum for v in out):
    raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
  return out


def same_padding(size: int, window: int, stride: int, dilation: int = 1) -> tuple[int, int]:
  """TensorFlow "SAME": out = ceil(size / stride); odd total padding puts the extra on the high side."""
  effective = (window - 1) * dilation + 1
  out = -(-size // stride)
  total = max((out - 1) * stride + effective - size, 0)
  return total // 2, total - total // 2


def resolve_padding(padding: Padding, spatial: Sequence[int], window: Sequence[int],
                    strides: Sequence[int], dilation: Sequence[int] | None = None,
                    name: str = "padding") -> tuple[tuple[int, int], ...]:
  """Resolves "valid" | "same" | int | pairs into explicit ((lo, hi), ...) per spatial dim.

  Accepted forms, for n spatial dims: "valid"; "same" (TensorFlow semantics); an int p (p on every
  side); a sequence of n ints (symmetric per dim); a sequence of n (lo, hi) pairs.
  """
  n = len(spatial)
  dilation = tuple(dilation) if dilation is not None else (1,) * n
  if isinstance(padding, str):
    mode = padding.lower()
    if mode == "valid":
      return ((0, 0),) * n
    if mode == "same":
      return tuple(same_padding(s, k, st, d) for s, k, st, d in zip(spatial, window, strides, dilation))
    raise ValueError(f"{name} must be 'valid', 'same', an int or (lo, hi) pairs, got {padding!r}")
  if isinstance(padding, bool):
    raise ValueError(f"{name} must be 'valid', 'same', an int or (lo, hi) pairs, got {padding!r}")
  if isinstance(padding, int):
    pairs = ((padding, padding),) * n
  else:
    try:
      items = list(padding)
    except TypeError:
      raise ValueError(f"{name} must be 'valid', 'same', an int or (lo, hi) pairs, got {padding!r}") from None
    if len(items) != n:
      raise ValueError(f"{name} must give {n} spatial dims, got {padding!r}")
    pairs = []
    for item in items:
      if isinstance(item, int) and not isinstance(item, bool):
        pairs.append((item, item))
      else:
        try:
          lo, hi = item
          pairs.append((int(lo), int(hi)))
        except (TypeError, ValueError):
          raise ValueError(f"{name} entries must be ints or (lo, hi) pairs, got {padding!r}") from None
    pairs = tuple(pairs)
  if any(v < 0 for pair in pairs for v in pair):
    raise ValueError(f"{name} must be non-negative, got {padding!r}")
  return tuple(pairs)


def output_size(size: int, window: int, stride: int, pad: tuple[int, int], dilation: int = 1) -> int:
  """floor((size + lo + hi - effective_window) / stride) + 1."""
  effective = (window - 1) * dilation + 1
  return (size + pad[0] + pad[1] - effective) // stride + 1


def check_window_fits(spatial, window, pads, dilation, name: str):
  """Raises ValueError when a (dilated) window is larger than the padded input along some dim."""
  for axis, (s, k, p, d) in enumerate(zip(spatial, window, pads, dilation)):
    effective = (k - 1) * d + 1
    if s + p[0] + p[1] < effective:
      raise ValueError(
          f"{name} {tuple(window)} (effective {effective} along spatial dim {axis}) is larger than the "
          f"padded input ({s} + {p[0]} + {p[1]} = {s + p[0] + p[1]})")
