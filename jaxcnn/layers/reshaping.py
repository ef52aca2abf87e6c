"""Spatial reshaping layers: `UpSampling2D` and `ZeroPadding2D` on (N, H, W, C)."""
from __future__ import annotations

from typing import Any, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from jaxcnn import ops
from jaxcnn.layers import _checks

_INTERPOLATIONS = ("nearest", "bilinear")


class UpSampling2D(nn.Module):
  """Spatial upsampling: (N, H, W, C) -> (N, H * sh, W * sw, C).

  Attributes:
    size: int or (sh, sw) integer factors; default 2.
    interpolation: "nearest" (default; repeats pixels) or "bilinear" (half-pixel centres, as Keras
      UpSampling2D and torch's align_corners=False).
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  size: Union[int, Sequence[int]] = 2
  interpolation: str = "nearest"
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _checks.check_tuple(self, self.size, 2, "size")
    if self.interpolation not in _INTERPOLATIONS:
      raise ValueError(f"UpSampling2D: interpolation must be one of {', '.join(_INTERPOLATIONS)}, "
                       f"got {self.interpolation!r}")
    super().__post_init__()

  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, H * sh, W * sw, C). `train` is accepted and ignored."""
    del train
    _checks.check_input_rank(self, x, 4, "(N, H, W, C)")
    x = _checks.cast_input(self, x)
    return _checks.call_op(self, ops.upsample2d, x, self.size, method=self.interpolation)


class ZeroPadding2D(nn.Module):
  """Zero padding of the spatial axes: (N, H, W, C) -> (N, H + top + bottom, W + left + right, C).

  Attributes:
    padding: int p (p on every side; default 1), (ph, pw) (symmetric per axis) or
      ((top, bottom), (left, right)).
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  padding: Any = 1
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> padded (N, H', W', C). `train` is accepted and ignored."""
    del train
    _checks.check_input_rank(self, x, 4, "(N, H, W, C)")
    x = _checks.cast_input(self, x)
    return _checks.call_op(self, ops.zero_pad2d, x, self.padding)
