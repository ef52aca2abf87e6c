"""Per-example normalisation layers: `GroupNormalization` and `LayerNormalization` (Keras names and
defaults), over `jaxcnn.ops.group_norm` / `layer_norm`.

Neither has running statistics: training and evaluation compute the same thing, and there is no
`batch_stats` collection. Variables: params `scale` (gamma, ones; with scale=True) and `bias` (beta,
zeros; with center=True), in Keras' order gamma, beta. Statistics are computed in float32 under bfloat16
compute (`dtype`), as the ops do; `param_dtype` is the parameters' dtype.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxcnn import ops
from jaxcnn.layers import _checks
from jaxcnn.ops._args import check_floating

Initializer = Callable[..., Any]


def _affine_params(layer, shape):
  scale = layer.param("scale", layer.scale_init, shape, layer.param_dtype) if layer.scale else None
  bias = layer.param("bias", layer.bias_init, shape, layer.param_dtype) if layer.center else None
  return scale, bias


def _normalise(layer, op, x, scale, bias, **kwargs):
  """op on x, the result in the layer's compute dtype (None: promoted from x and the parameters).

  x goes to the op in its own dtype unless the compute dtype is wider, so the statistics are never taken
  from a rounded-down copy; the op computes them in float32 (or float64) either way.
  """
  _checks.call_op(layer, check_floating, x, "x")
  dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=layer.dtype)
  if jnp.finfo(dtype).bits > jnp.finfo(x.dtype).bits:
    x = x.astype(dtype)
  return _checks.call_op(layer, op, x, scale, bias, **kwargs).astype(dtype)


class GroupNormalization(nn.Module):
  """Group normalisation (Keras `GroupNormalization`), channels last: (N, ..., C) -> same shape.

  The channels form `groups` consecutive groups; each example is normalised over all its positions and
  the channels of each group, with its own mean and biased variance, then scaled and shifted per channel
  (see `jaxcnn.ops.group_norm`). groups = C is instance normalisation, groups = 1 layer normalisation
  over (H, W, C).

  Attributes:
    groups: number of channel groups; must divide C; default 32 (Keras).
    epsilon: added to the variance; default 1e-3 (Keras).
    center: learn a per-channel offset `bias` (beta); default True.
    scale: learn a per-channel multiplier `scale` (gamma); default True.
    scale_init: initializer of `scale`; default ones.
    bias_init: initializer of `bias`; default zeros.
    dtype: compute (output) dtype; default None (the promoted dtype of the input and the parameters).
    param_dtype: dtype of the parameters; default float32.
  """

  groups: int = 32
  epsilon: float = 1e-3
  center: bool = True
  scale: bool = True
  scale_init: Initializer = nn.initializers.ones_init()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _checks.check_positive_int(self, self.groups, "groups")
    _checks.check_positive_float(self, self.epsilon, "epsilon")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, ..., C) with rank >= 2 -> same shape. `train` is accepted and ignored (no running stats)."""
    del train
    _checks.check_min_rank(self, x, 2, "(N, ..., C)")
    channels = x.shape[-1]
    if self.groups > channels or channels % self.groups:
      raise ValueError(f"GroupNormalization: groups ({self.groups}) must divide the number of channels "
                       f"({channels}) of the input {tuple(x.shape)}")
    scale, bias = _affine_params(self, (channels,))
    return _normalise(self, ops.group_norm, x, scale, bias, groups=self.groups, epsilon=self.epsilon)


class LayerNormalization(nn.Module):
  """Layer normalisation (Keras `LayerNormalization`): each position normalised over `axis` with its
  own mean and biased variance, then scaled and shifted per element of those axes; any input shape.

  Attributes:
    axis: the axis or axes to normalise over (negative counts from the end); default -1 (features).
      `scale` and `bias` have the shape of those axes (Keras: (C,) for axis=-1).
    epsilon: added to the variance; default 1e-3 (Keras).
    center: learn an offset `bias` (beta); default True.
    scale: learn a multiplier `scale` (gamma); default True.
    scale_init: initializer of `scale`; default ones.
    bias_init: initializer of `bias`; default zeros.
    dtype: compute (output) dtype; default None (the promoted dtype of the input and the parameters).
    param_dtype: dtype of the parameters; default float32.
  """

  axis: Union[int, Sequence[int]] = -1
  epsilon: float = 1e-3
  center: bool = True
  scale: bool = True
  scale_init: Initializer = nn.initializers.ones_init()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    axes = (self.axis,) if isinstance(self.axis, numbers.Integral) else self.axis
    try:
      ok = len(axes) > 0 and all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes)
    except TypeError:
      ok = False
    if not ok or isinstance(self.axis, bool):
      raise ValueError(f"LayerNormalization: axis must be an int or a non-empty sequence of ints, got "
                       f"{self.axis!r}")
    _checks.check_positive_float(self, self.epsilon, "epsilon")
    super().__post_init__()

  def _axes(self, x) -> tuple[int, ...]:
    axes = (self.axis,) if isinstance(self.axis, numbers.Integral) else tuple(self.axis)
    resolved = []
    for a in axes:
      if not -x.ndim <= a < x.ndim:
        raise ValueError(f"LayerNormalization: axis {self.axis!r} is out of range for an input of rank "
                         f"{x.ndim} (shape {tuple(x.shape)})")
      resolved.append(int(a) % x.ndim)
    if len(set(resolved)) != len(resolved):
      raise ValueError(f"LayerNormalization: axis {self.axis!r} names an axis twice")
    return tuple(sorted(resolved))

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: any shape of rank >= 1 -> same shape. `train` is accepted and ignored."""
    del train
    _checks.check_min_rank(self, x, 1, "(..., C)")
    axes = self._axes(x)
    shape = tuple(x.shape[a] for a in axes)
    scale, bias = _affine_params(self, shape)
    if axes == (x.ndim - 1,):
      return _normalise(self, ops.layer_norm, x, scale, bias, epsilon=self.epsilon)
    # Other axes: move them to the end and merge them into one, normalise, and undo both.
    kept = [a for a in range(x.ndim) if a not in axes]
    moved = jnp.transpose(x, (*kept, *axes))
    flat = moved.reshape(*moved.shape[:len(kept)], int(np.prod(shape)))
    y = _normalise(self, ops.layer_norm, flat,
                   None if scale is None else scale.reshape(-1), None if bias is None else bias.reshape(-1),
                   epsilon=self.epsilon)
    return jnp.transpose(y.reshape(moved.shape), np.argsort((*kept, *axes)))
