"""Core layers: `Dense`, `Flatten`, `Dropout`."""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from jaxcnn import ops
from jaxcnn.layers import _checks
from jaxcnn.layers.activations import ActivationLike, resolve_activation

Initializer = Callable[..., Any]


class Dense(nn.Module):
  """Fully connected layer on the last axis: (N, ..., features) -> (N, ..., units), then the activation.

  Variables: params `kernel` (features, units) and, with use_bias, `bias` (units,) -- Keras' layout.

  Attributes:
    units: number of outputs.
    activation: a Keras activation name, a callable, or None (default: none).
    use_bias: add a learned bias; default True.
    kernel_init: kernel initializer; default glorot uniform (Keras).
    bias_init: bias initializer; default zeros.
    dtype: the compute dtype; default None: the promoted dtype of the input and the parameters (as
      flax.linen.Dense). The output has this dtype.
    param_dtype: dtype of the parameters; default float32.
  """

  units: int
  activation: ActivationLike = None
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.glorot_uniform()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _checks.check_positive_int(self, self.units, "units")
    resolve_activation(self.activation, "Dense")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, ..., features) -> (N, ..., units). `train` is accepted and ignored."""
    del train
    _checks.check_min_rank(self, x, 2, "(N, ..., features)")
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.units), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.units,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = _checks.promote(self, x, kernel, bias)
    y = jnp.tensordot(x, kernel, axes=((x.ndim - 1,), (0,)))
    if bias is not None:
      # Explicit reshape: the library must work under jax_numpy_rank_promotion="raise".
      y = y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (self.units,))
    activation = resolve_activation(self.activation, "Dense")
    return activation(y) if activation is not None else y


class Flatten(nn.Module):
  """Flattens all but the batch axis: (N, d1, d2, ...) -> (N, d1 * d2 * ...), row-major (as Keras).

  Attributes:
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, ...) with rank >= 2 -> (N, prod(...)). `train` is accepted and ignored."""
    del train
    _checks.check_min_rank(self, x, 2, "(N, ...)")
    x = _checks.cast_input(self, x)
    return jnp.reshape(x, (x.shape[0], -1))


class Dropout(nn.Module):
  """Inverted dropout: in training, zeroes each element with probability `rate` and scales the rest by
  1 / (1 - rate); the identity in evaluation. Any input shape.

  The mask is drawn from the `dropout` rng stream, so training calls need
  `apply(..., rngs={"dropout": key})`; evaluation calls need no rng.

  Attributes:
    rate: drop probability in [0, 1); 0 makes the layer the identity.
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  rate: float
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _checks.check_rate(self, self.rate)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: any shape -> same shape. Drops only when train=True."""
    x = _checks.cast_input(self, x)
    if not train or self.rate == 0.0:
      return x
    return _checks.call_op(self, ops.dropout, x, self.rate, rng=self.make_rng("dropout"))
