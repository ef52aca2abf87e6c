"""Activation functions by Keras name, and the `Activation` layer.

Names follow Keras (`activation="relu"`); where Keras and JAX defaults differ, Keras wins so that a
model transcribed from Keras behaves the same: `gelu` is the exact erf form (`approximate=False`, as in
Keras and PyTorch; JAX defaults to the tanh approximation) and `leaky_relu` has negative slope 0.2 (Keras;
PyTorch uses 0.01 -- pass a callable such as `functools.partial(jax.nn.leaky_relu, negative_slope=0.01)`
for that).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcnn.layers import _checks


def _linear(x):
  return x


def _softmax(x):
  # Keras' softmax normalises over the last (channel/class) axis.
  return jax.nn.softmax(x, axis=-1)


ACTIVATIONS: dict[str, Callable] = {
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "softmax": _softmax,
    "elu": jax.nn.elu,
    "selu": jax.nn.selu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=0.2),
    "swish": jax.nn.silu,
    "silu": jax.nn.silu,
    "linear": _linear,
}

ActivationLike = Union[str, Callable, None]


def resolve_activation(activation: ActivationLike, owner: str = "activation") -> Callable | None:
  """Returns the function for a Keras activation name, a callable unchanged, or None for None.

  Args:
    activation: one of `ACTIVATIONS`' names (case-insensitive), a callable `f(x) -> y`, or None.
    owner: what to name in the error message (the layer that received the argument).

  Raises:
    ValueError: an unknown name (the message lists the known names) or a value that is neither a
      string, a callable nor None.
  """
  if activation is None or callable(activation):
    return activation
  if isinstance(activation, str):
    try:
      return ACTIVATIONS[activation.lower()]
    except KeyError:
      known = ", ".join(sorted(ACTIVATIONS))
      raise ValueError(f"{owner}: unknown activation {activation!r}; known names: {known}") from None
  raise ValueError(f"{owner}: activation must be a name, a callable or None, got {activation!r}")


class Activation(nn.Module):
  """Applies an activation elementwise (softmax: over the last axis); any input shape.

  Attributes:
    activation: a Keras name (see `ACTIVATIONS`) or a callable `f(x) -> y`; checked at construction.
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  activation: Union[str, Callable]
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.activation is None:
      raise ValueError("Activation: activation must be a name or a callable, got None")
    resolve_activation(self.activation, "Activation")
    super().__post_init__()

  def __call__(self, x, train: bool = False):
    """x: any shape -> same shape. `train` is accepted and ignored."""
    del train
    return resolve_activation(self.activation, "Activation")(_checks.cast_input(self, x))
