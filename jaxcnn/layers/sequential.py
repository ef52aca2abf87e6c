"""`Sequential`: a stack of layers applied in order, as in Keras.

    model = Sequential([Conv2D(32, 3, activation="relu"), MaxPool2D(2), Flatten(), Dense(10)])
    variables = model.init(jax.random.key(0), x)                # x: (N, 28, 28, 1)
    logits = model.apply(variables, x)                           # eval: train=False
    logits, updates = model.apply(variables, x, train=True, rngs={"dropout": key},
                                  mutable=["batch_stats"])       # train: dropout on, BN stats move

Layers keep the names they were given (`Dense(10, name="predictions")`); unnamed ones get Keras-style
names from their class and position among layers of that class (`conv2d`, `conv2d_1`, `max_pool2d`,
`dense`, ...), and those names are the keys of the variable dicts and the rows of `jaxcnn.summary`.
"""
from __future__ import annotations

import inspect
import re
from typing import Sequence

import flax.linen as nn


def _snake_case(class_name: str) -> str:
  """"MaxPool2D" -> "max_pool2d", "Conv2D" -> "conv2d", "BatchNorm" -> "batch_norm",
  "Conv2DTranspose" -> "conv2d_transpose" (Keras' names)."""
  return re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", class_name).lower()


def _accepts_train(layer: nn.Module) -> bool:
  try:
    parameters = inspect.signature(type(layer).__call__).parameters
  except (TypeError, ValueError):
    return False
  return "train" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


class Sequential(nn.Module):
  """Applies `layers` in order, passing `train` to each: x -> layers[-1](... layers[0](x, train) ...).

  Shapes are whatever the layers make of them. Shared layers are allowed: the same layer instance
  listed twice is one set of variables applied twice.

  Attributes:
    layers: a sequence of Flax modules whose `__call__(x, train=...)` accepts `train` (every
      jaxcnn.layers module does; wrap a plain function in `Activation`).
  """

  layers: Sequence[nn.Module]

  # Keep the names layers were given (or that __post_init__ gave them) instead of flax's `layers_<i>`.
  preserve_adopted_names = True

  def __post_init__(self):
    if isinstance(self.layers, nn.Module) or not isinstance(self.layers, (list, tuple)):
      raise ValueError(f"Sequential: layers must be a list or tuple of modules, got {self.layers!r}")
    for index, layer in enumerate(self.layers):
      if not isinstance(layer, nn.Module):
        raise ValueError(f"Sequential: layer {index} is not a flax module (got {layer!r}); wrap a "
                         "function in jaxcnn.layers.Activation")
      if not _accepts_train(layer):
        raise ValueError(f"Sequential: layer {index} ({type(layer).__name__}) does not accept the "
                         "`train` argument; Sequential passes train to every layer")
    object.__setattr__(self, "layers", self._name_layers(tuple(self.layers)))
    super().__post_init__()

  @staticmethod
  def _name_layers(layers):
    """Gives every free, unnamed layer a Keras-style name; the same instance twice gets one name."""
    taken = {layer.name for layer in layers if layer.name is not None}
    counts: dict[str, int] = {}
    renamed: dict[int, nn.Module] = {}
    named = []
    for layer in layers:
      # Layers already bound to a parent (built inside another module's compact method) or named by
      # the user keep their identity; flax owns their naming.
      if layer.name is not None or layer.parent is not None:
        named.append(layer)
        continue
      if id(layer) not in renamed:
        base = _snake_case(type(layer).__name__)
        while True:
          count = counts.get(base, 0)
          counts[base] = count + 1
          candidate = base if count == 0 else f"{base}_{count}"
          if candidate not in taken:
            break
        taken.add(candidate)
        renamed[id(layer)] = layer.clone(name=candidate, parent=None)
      named.append(renamed[id(layer)])
    return tuple(named)

  def __call__(self, x, train: bool = False):
    """x: the first layer's input -> the last layer's output; `train` goes to every layer."""
    for layer in self.layers:
      x = layer(x, train=train)
    return x
