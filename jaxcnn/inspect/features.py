"""Intermediate activations of a model, captured with flax's `capture_intermediates`.

    maps = feature_maps(model, variables, x[:1])      # {"conv2d": (1, 26, 26, 32), "conv2d_1": ...}
    plot_feature_maps(maps, "feature_maps.png", image=x[0])

The model runs in eval mode (train=False: BatchNorm uses its running statistics, dropout is off), so
the maps are what inference sees. Nothing is mutated: the captured values come back in a separate
`intermediates` collection that is dropped afterwards.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcnn.layers import Conv2D

__all__ = ["feature_maps"]


def _check_layer_types(layer_types) -> tuple[type, ...]:
  types = (layer_types,) if isinstance(layer_types, type) else tuple(layer_types)
  if not types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in types):
    raise ValueError(f"layer_types: expected flax Module classes (e.g. (Conv2D,)), got {layer_types!r}")
  return types


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()):
  """(path, output) of every captured `__call__` output, in capture (call) order."""
  for key, value in tree.items():
    if key == "__call__":
      yield prefix, value
    elif isinstance(value, Mapping):
      yield from _flatten(value, prefix + (str(key),))


def feature_maps(model: nn.Module, variables: Mapping, x, *,
                 layer_types: type | Sequence[type] = (Conv2D,)) -> dict[str, jax.Array]:
  """The outputs of every layer of the given types for input `x`, in the order the layers run.

  Args:
    model: a flax.linen Module whose `__call__(x, train=False)` accepts `train` (every registered model).
    variables: the model's variables ({"params": ..., "batch_stats": ...}).
    x: float input (N, H, W, C), e.g. one normalised test image as a batch of 1.
    layer_types: Module classes whose outputs are captured. Default (Conv2D,): each convolution's output
      (after its own activation, if it has one; before any BatchNorm that follows it).

  Returns:
    {layer path: output array}; the path is the '/'-joined module names below the model (e.g.
    "conv2d_1", or "block1/conv" in nested models). A layer called twice keeps its last output.

  Raises:
    ValueError: x is not a 4-D float array, variables has no "params", layer_types is not a tuple of
      Module classes, or no layer of those types ran.
  """
  types = _check_layer_types(layer_types)
  x = jnp.asarray(x)
  if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x: expected a float (N, H, W, C) batch, got shape {x.shape} dtype {x.dtype}")
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables: expected a mapping with a 'params' collection (model.init's result)")

  def wanted(module: nn.Module, method_name: str) -> bool:
    return method_name == "__call__" and isinstance(module, types)

  # One compiled program: op-by-op dispatch would compile every primitive of the model separately.
  @jax.jit
  def capture(variables, x):
    return model.apply(variables, x, train=False, capture_intermediates=wanted, mutable=["intermediates"])[1]

  captured = capture(dict(variables), x)
  maps = {}
  for path, outputs in _flatten(captured.get("intermediates", {})):
    if not path:  # the model itself, when it is one of the wanted types
      path = (type(model).__name__,)
    maps["/".join(path)] = outputs[-1]
  if not maps:
    raise ValueError(f"layer_types: no layer of type {', '.join(t.__name__ for t in types)} ran in "
                     f"{type(model).__name__}")
  return maps
