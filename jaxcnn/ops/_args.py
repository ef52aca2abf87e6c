"""Argument checking and normalisation shared by `jaxcnn.ops` and `jaxcnn.reference`.

Both sets of ops accept the same arguments and must reject bad ones with the same `ValueError`, so the
parsing lives here once. Nothing here computes on arrays: padding is resolved to explicit
((lo, hi), ...) pairs from static shapes, and the two op sets then compute independently.
"""
from __future__ import annotations

import numbers
from typing import Sequence, Union

import jax.numpy as jnp

PairOrInt = Union[int, Sequence[int]]
Padding = Union[str, int, Sequence]


def pad_spatial(x, pads, value=0.0):
  """x (N, *spatial, C) with the spatial dims padded by `pads` ((lo, hi) per dim) cells of `value`."""
  if not any(lo or hi for lo, hi in pads):
    return x
  return jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=value)


def check_rank(x, rank: int, name: str, layout: str):
  """Raises ValueError unless `x` has `rank` dims (`layout` names them, e.g. "(N, H, W, C)")."""
  ndim = jnp.ndim(x)
  if ndim != rank:
    raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(jnp.shape(x))}")


def check_floating(x, name: str):
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{name} must be a floating-point array, got dtype {jnp.result_type(x)}")


def _is_int(value) -> bool:
  """True for Python and NumPy integers; False for bools, floats (2.5 must not truncate to 2), strings."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def compute_dtype(dtype):
  """The dtype to accumulate sums and statistics in: float32, or float64 for float64 inputs."""
  return jnp.promote_types(dtype, jnp.float32)


def normalize_tuple(value: PairOrInt, n: int, name: str, *, minimum: int = 1) -> tuple[int, ...]:
  """An int or a length-`n` sequence of ints -> a length-`n` tuple, each >= `minimum`."""
  if _is_int(value):
    out = (int(value),) * n
  else:
    try:
      items = tuple(value)
    except TypeError:
      raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}") from None
    if isinstance(value, str) or len(items) != n or not all(_is_int(v) for v in items):
      raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    out = tuple(int(v) for v in items)
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
        except (TypeError, ValueError):
          raise ValueError(f"{name} entries must be ints or (lo, hi) pairs, got {padding!r}") from None
        if not (_is_int(lo) and _is_int(hi)):
          raise ValueError(f"{name} entries must be ints or (lo, hi) pairs, got {padding!r}")
        pairs.append((int(lo), int(hi)))
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


def parse_pool_args(x, pool_size: PairOrInt, strides: PairOrInt | None, padding: Padding, n: int,
                    layout: str):
  """Checks a pooling call and returns (window, strides, ((lo, hi), ...)) for its `n` spatial dims.

  `strides=None` means strides = pool_size (Keras and PyTorch). Every padding side must be smaller than
  the window, so that every window holds at least one real cell (PyTorch asks for at most half).
  """
  check_rank(x, n + 2, "x", layout)
  check_floating(x, "x")
  window = normalize_tuple(pool_size, n, "pool_size")
  stride = window if strides is None else normalize_tuple(strides, n, "strides")
  spatial = tuple(jnp.shape(x)[1:-1])
  pads = resolve_padding(padding, spatial, window, stride)
  for axis, (k, (lo, hi)) in enumerate(zip(window, pads)):
    if max(lo, hi) >= k:
      raise ValueError(f"padding {padding!r} must be smaller than pool_size {window} on every side "
                       f"(spatial dim {axis} pads ({lo}, {hi}) for a window of {k})")
  check_window_fits(spatial, window, pads, (1,) * n, "pool_size")
  return window, stride, pads


def parse_conv_args(x, w, b, strides: PairOrInt, padding: Padding, dilation: PairOrInt, groups: int,
                    n: int, layout: str, kernel_layout: str):
  """Validates a convolution's arguments; returns (strides, pads, dilation) as static tuples.

  Args:
    x: input, rank n + 2 (`layout`, channels last).
    w: kernel, rank n + 2 (`kernel_layout`: spatial..., C_in / groups, C_out).
    b: bias of shape (C_out,), or None.
    strides: int or n ints, each >= 1.
    padding: "valid" | "same" | int | n (lo, hi) pairs (see `resolve_padding`).
    dilation: int or n ints, each >= 1.
    groups: int >= 1 dividing both C_in and C_out.
    n: number of spatial dims.
    layout: names x's dims for messages, e.g. "(N, H, W, C)".
    kernel_layout: names w's dims for messages, e.g. "(kh, kw, C_in/groups, C_out)".

  Raises:
    ValueError naming the argument: wrong rank, non-float dtype, bad groups, channel or bias mismatch,
    negative padding, kernel larger than the padded input.
  """
  check_rank(x, n + 2, "x", layout)
  check_rank(w, n + 2, "w", kernel_layout)
  check_floating(x, "x")
  check_floating(w, "w")
  if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
    raise ValueError(f"groups must be a positive int, got {groups!r}")
  x_shape, w_shape = tuple(jnp.shape(x)), tuple(jnp.shape(w))
  c_in, c_per_group, c_out = x_shape[-1], w_shape[-2], w_shape[-1]
  if c_in % groups:
    raise ValueError(f"groups={groups} must divide the input channels of x (shape {x_shape})")
  if c_out % groups:
    raise ValueError(f"groups={groups} must divide the output channels of w (shape {w_shape})")
  if c_per_group * groups != c_in:
    raise ValueError(
        f"channel mismatch: x has {c_in} channels (shape {x_shape}) but w (shape {w_shape}) expects "
        f"C_in/groups * groups = {c_per_group} * {groups} = {c_per_group * groups}")
  if b is not None:
    check_floating(b, "b")
    if tuple(jnp.shape(b)) != (c_out,):
      raise ValueError(f"b must have shape ({c_out},) to match w's output channels, got {tuple(jnp.shape(b))}")
  strides = normalize_tuple(strides, n, "strides")
  dilation = normalize_tuple(dilation, n, "dilation")
  spatial, window = x_shape[1:-1], w_shape[:-2]
  pads = resolve_padding(padding, spatial, window, strides, dilation)
  check_window_fits(spatial, window, pads, dilation, "kernel of w")
  return strides, pads, dilation
