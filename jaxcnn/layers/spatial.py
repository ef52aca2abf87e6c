"""Layers on spatial feature maps (N, H, W, C): `Cropping2D` and `SpatialDropout2D` (Keras names and
defaults)."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from jaxcnn import ops
from jaxcnn.layers import _checks
from jaxcnn.ops._args import check_floating, resolve_padding


def _crops(layer, cropping):
  """((top, bottom), (left, right)) from an int, (ch, cw) or pairs; ValueError naming the layer."""
  try:
    # The same forms as padding (an int, one int per dim, (lo, hi) per dim), all >= 0.
    return resolve_padding(cropping, (1, 1), (1, 1), (1, 1), name="cropping")
  except ValueError as err:
    raise ValueError(f"{type(layer).__name__}: {err}") from None


class Cropping2D(nn.Module):
  """Crops rows and columns off the spatial edges: (N, H, W, C) -> (N, H - top - bottom,
  W - left - right, C).

  Attributes:
    cropping: int c (c on every side), (ch, cw) (symmetric per axis) or ((top, bottom), (left, right));
      default ((0, 0), (0, 0)) (Keras).
  """

  cropping: Any = ((0, 0), (0, 0))

  def __post_init__(self):
    if isinstance(self.cropping, str):
      raise ValueError(f"Cropping2D: cropping must be an int, (ch, cw) or ((top, bottom), (left, right)), "
                       f"got {self.cropping!r}")
    _crops(self, self.cropping)
    super().__post_init__()

  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> cropped (N, H', W', C). `train` is accepted and ignored."""
    del train
    _checks.check_input_rank(self, x, 4, "(N, H, W, C)")
    (top, bottom), (left, right) = _crops(self, self.cropping)
    _, h, w, _ = x.shape
    if top + bottom >= h or left + right >= w:
      raise ValueError(f"Cropping2D: cropping {self.cropping!r} leaves nothing of an input of shape "
                       f"{tuple(x.shape)} (rows {h} - {top} - {bottom}, columns {w} - {left} - {right})")
    return lax.slice(x, (0, top, left, 0), (x.shape[0], h - bottom, w - right, x.shape[3]))


class SpatialDropout2D(nn.Module):
  """Channel-wise dropout (Keras `SpatialDropout2D`): in training, each example's channels are zeroed
  whole with probability `rate` and the kept ones scaled by 1 / (1 - rate); the identity in evaluation.
  (N, H, W, C) -> same shape.

  Neighbouring pixels of a feature map are strongly correlated, so dropping single pixels (`Dropout`)
  barely regularises a convolution; dropping whole maps does. The mask (N, 1, 1, C) is drawn from the
  `dropout` rng stream (`apply(..., rngs={"dropout": key})` in training).

  Attributes:
    rate: drop probability in [0, 1); 0 makes the layer the identity.
    dtype: compute dtype; default None (the input's).
  """

  rate: float
  dtype: Any = None

  def __post_init__(self):
    _checks.check_rate(self, self.rate)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> same shape. Drops only when train=True."""
    _checks.check_input_rank(self, x, 4, "(N, H, W, C)")
    _checks.call_op(self, check_floating, x, "x")
    if self.dtype is not None:
      x = jnp.asarray(x, self.dtype)
    if not train or self.rate == 0.0:
      return x
    # ops.dropout of ones is the scaled mask: 0 for a dropped channel, 1 / (1 - rate) for a kept one.
    mask = _checks.call_op(self, ops.dropout, jnp.ones((x.shape[0], 1, 1, x.shape[3]), x.dtype), self.rate,
                           rng=self.make_rng("dropout"))
    return x * mask
