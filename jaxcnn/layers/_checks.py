"""Construction- and call-time checks shared by the layers.

Every message starts with the layer's class name, so a failure deep inside a model points at the layer
that was misused rather than at the functional op underneath it.
"""
from __future__ import annotations

import numbers

import jax.numpy as jnp
from flax.linen import dtypes as nn_dtypes

from jaxcnn.ops._args import normalize_tuple


def check_input_rank(layer, x, rank: int, layout: str):
  """Raises ValueError unless `x` has exactly `rank` dims; `layout` names them, e.g. "(N, H, W, C)"."""
  if jnp.ndim(x) != rank:
    raise ValueError(
        f"{type(layer).__name__} expects input of rank {rank} {layout}, got shape {tuple(jnp.shape(x))}")


def check_min_rank(layer, x, rank: int, layout: str):
  """Raises ValueError unless `x` has at least `rank` dims."""
  if jnp.ndim(x) < rank:
    raise ValueError(
        f"{type(layer).__name__} expects input of rank >= {rank} {layout}, got shape {tuple(jnp.shape(x))}")


def check_positive_int(layer, value, name: str):
  """Raises ValueError unless `value` is an int >= 1 (bools are rejected)."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"{type(layer).__name__}: {name} must be an int >= 1, got {value!r}")


def check_tuple(layer, value, n: int, name: str, *, minimum: int = 1) -> tuple[int, ...]:
  """`normalize_tuple` with the layer's name in the message."""
  try:
    return normalize_tuple(value, n, name, minimum=minimum)
  except ValueError as err:
    raise ValueError(f"{type(layer).__name__}: {err}") from None


def check_optional_tuple(layer, value, n: int, name: str):
  """Like `check_tuple`, but None passes (pool strides default to the pool size)."""
  if value is None:
    return None
  return check_tuple(layer, value, n, name)


def check_rate(layer, value, name: str = "rate"):
  """Raises ValueError unless 0 <= value < 1."""
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= float(value) < 1.0:
    raise ValueError(f"{type(layer).__name__}: {name} must be a number in [0, 1), got {value!r}")


def check_positive_float(layer, value, name: str, *, allow_zero: bool = False):
  """Raises ValueError unless `value` is a real number > 0 (or >= 0 with allow_zero)."""
  ok = not isinstance(value, bool) and isinstance(value, numbers.Real)
  ok = ok and (float(value) >= 0.0 if allow_zero else float(value) > 0.0)
  if not ok:
    bound = ">= 0" if allow_zero else "> 0"
    raise ValueError(f"{type(layer).__name__}: {name} must be a number {bound}, got {value!r}")


def check_padding_mode(layer, padding, name: str = "padding"):
  """Rejects an unknown padding string at construction; numeric forms are checked by the op."""
  if isinstance(padding, str) and padding.lower() not in ("valid", "same"):
    raise ValueError(
        f"{type(layer).__name__}: {name} must be 'valid', 'same', an int or (lo, hi) pairs, got {padding!r}")


def call_op(layer, op, *args, **kwargs):
  """Calls a functional op, prefixing any ValueError it raises with the layer's class name."""
  try:
    return op(*args, **kwargs)
  except ValueError as err:
    raise ValueError(f"{type(layer).__name__}: {err}") from err


def promote(layer, x, *params):
  """(x, *params) in the layer's compute dtype, flax.linen's rule: `layer.dtype`, or the promoted dtype
  of x and the parameters when it is None. Parameters may be None (absent). x must be floating: an
  integer input is an error here, as in the ops, not something to convert silently."""
  check_floating_input(layer, x)
  return tuple(nn_dtypes.promote_dtype(x, *params, dtype=layer.dtype))


def cast_input(layer, x):
  """x in the layer's compute dtype (`layer.dtype`; None keeps x's own) for layers without parameters."""
  if layer.dtype is None:
    return x
  check_floating_input(layer, x)
  return jnp.asarray(x, layer.dtype)


def check_floating_input(layer, x):
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{type(layer).__name__}: x must be a floating-point array, got dtype "
                     f"{jnp.result_type(x)}")
