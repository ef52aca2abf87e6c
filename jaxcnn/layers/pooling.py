"""Pooling layers over `jaxcnn.ops`: 2-D on (N, H, W, C), 1-D on (N, L, C), and global pools.

Keras names and defaults: pool_size 2, strides None (= pool_size), padding "valid". Padding "same"
follows TensorFlow; an int or ((lo, hi), ...) pairs follow PyTorch (padded positions are ignored by max
pooling; average pooling excludes them from the count unless count_include_pad=True).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from jaxcnn import ops
from jaxcnn.layers import _checks

PairOrInt = Union[int, Sequence[int]]


def _check_pool_fields(layer, n: int):
  _checks.check_tuple(layer, layer.pool_size, n, "pool_size")
  _checks.check_optional_tuple(layer, layer.strides, n, "strides")
  _checks.check_padding_mode(layer, layer.padding)


class MaxPool2D(nn.Module):
  """2-D max pooling: (N, H, W, C) -> (N, H', W', C).

  Attributes:
    pool_size: int or (ph, pw); default 2.
    strides: int, (sh, sw), or None (default) for strides = pool_size.
    padding: "valid" (default), "same" (TensorFlow), an int or ((top, bottom), (left, right)) (PyTorch;
      padded positions never win the max).
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  pool_size: PairOrInt = 2
  strides: Optional[PairOrInt] = None
  padding: Any = "valid"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _check_pool_fields(self, 2)
    super().__post_init__()

  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, H', W', C). `train` is accepted and ignored."""
    del train
    _checks.check_input_rank(self, x, 4, "(N, H, W, C)")
    x = _checks.cast_input(self, x)
    return _checks.call_op(self, ops.max_pool2d, x, self.pool_size, strides=self.strides,
                           padding=self.padding)


class AvgPool2D(nn.Module):
  """2-D average pooling: (N, H, W, C) -> (N, H', W', C).

  Attributes:
    pool_size: int or (ph, pw); default 2.
    strides: int, (sh, sw), or None (default) for strides = pool_size.
    padding: "valid" (default), "same" (TensorFlow: padding excluded from the average), an int or
      ((top, bottom), (left, right)) (PyTorch).
    count_include_pad: with explicit padding, divide by the full window size (PyTorch's default) rather
      than by the number of real elements; default False.
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  pool_size: PairOrInt = 2
  strides: Optional[PairOrInt] = None
  padding: Any = "valid"
  count_include_pad: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _check_pool_fields(self, 2)
    super().__post_init__()

  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, H', W', C). `train` is accepted and ignored."""
    del train
    _checks.check_input_rank(self, x, 4, "(N, H, W, C)")
    x = _checks.cast_input(self, x)
    return _checks.call_op(self, ops.avg_pool2d, x, self.pool_size, strides=self.strides,
                           padding=self.padding, count_include_pad=self.count_include_pad)


class MaxPool1D(nn.Module):
  """1-D max pooling: (N, L, C) -> (N, L', C).

  Attributes:
    pool_size: int or (p,); default 2.
    strides: int, (s,), or None (default) for strides = pool_size.
    padding: "valid" (default), "same" (TensorFlow), an int or ((lo, hi),) (PyTorch).
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  pool_size: PairOrInt = 2
  strides: Optional[PairOrInt] = None
  padding: Any = "valid"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _check_pool_fields(self, 1)
    super().__post_init__()

  def __call__(self, x, train: bool = False):
    """x: (N, L, C) -> (N, L', C). `train` is accepted and ignored."""
    del train
    _checks.check_input_rank(self, x, 3, "(N, L, C)")
    x = _checks.cast_input(self, x)
    return _checks.call_op(self, ops.max_pool1d, x, self.pool_size, strides=self.strides,
                           padding=self.padding)


class AvgPool1D(nn.Module):
  """1-D average pooling: (N, L, C) -> (N, L', C).

  Attributes:
    pool_size: int or (p,); default 2.
    strides: int, (s,), or None (default) for strides = pool_size.
    padding: "valid" (default), "same" (TensorFlow), an int or ((lo, hi),) (PyTorch).
    count_include_pad: with explicit padding, divide by the full window size; default False.
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  pool_size: PairOrInt = 2
  strides: Optional[PairOrInt] = None
  padding: Any = "valid"
  count_include_pad: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _check_pool_fields(self, 1)
    super().__post_init__()

  def __call__(self, x, train: bool = False):
    """x: (N, L, C) -> (N, L', C). `train` is accepted and ignored."""
    del train
    _checks.check_input_rank(self, x, 3, "(N, L, C)")
    x = _checks.cast_input(self, x)
    return _checks.call_op(self, ops.avg_pool1d, x, self.pool_size, strides=self.strides,
                           padding=self.padding, count_include_pad=self.count_include_pad)


class GlobalAvgPool2D(nn.Module):
  """Mean over the spatial axes: (N, H, W, C) -> (N, C).

  Attributes:
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, C). `train` is accepted and ignored."""
    del train
    _checks.check_input_rank(self, x, 4, "(N, H, W, C)")
    x = _checks.cast_input(self, x)
    return _checks.call_op(self, ops.global_avg_pool2d, x)


class GlobalMaxPool2D(nn.Module):
  """Max over the spatial axes: (N, H, W, C) -> (N, C).

  Attributes:
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, C). `train` is accepted and ignored."""
    del train
    _checks.check_input_rank(self, x, 4, "(N, H, W, C)")
    x = _checks.cast_input(self, x)
    return _checks.call_op(self, ops.global_max_pool2d, x)


class GlobalAvgPool1D(nn.Module):
  """Mean over the length axis: (N, L, C) -> (N, C).

  Attributes:
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __call__(self, x, train: bool = False):
    """x: (N, L, C) -> (N, C). `train` is accepted and ignored."""
    del train
    _checks.check_input_rank(self, x, 3, "(N, L, C)")
    x = _checks.cast_input(self, x)
    return _checks.call_op(self, ops.global_avg_pool1d, x)


class GlobalMaxPool1D(nn.Module):
  """Max over the length axis: (N, L, C) -> (N, C).

  Attributes:
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __call__(self, x, train: bool = False):
    """x: (N, L, C) -> (N, C). `train` is accepted and ignored."""
    del train
    _checks.check_input_rank(self, x, 3, "(N, L, C)")
    x = _checks.cast_input(self, x)
    return _checks.call_op(self, ops.global_max_pool1d, x)
