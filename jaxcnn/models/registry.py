"""The model registry: factories registered by name, built with `get(name, **kwargs)`.

    @register("my_cnn", input_shape=(28, 28, 1))
    def my_cnn(num_classes=10, **kwargs) -> nn.Module: ...

    model = get("my_cnn", num_classes=10)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))

Every registered model maps NHWC float input to logits (no softmax inside; losses take logits) through
`model.apply(variables, x, train=...)`, keeps running statistics in `batch_stats` and draws dropout
masks from the `dropout` rng.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Callable

import flax.linen as nn

TASKS = ("classification", "reconstruction")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A registered model.

  Attributes:
    name: the registry name.
    factory: `factory(num_classes=..., **kwargs) -> nn.Module`.
    input_shape: an (H, W, C) input the model is built for, the smallest sensible one (tests and
      summaries use it; models that are size-agnostic accept larger inputs too).
    task: "classification" (outputs (N, num_classes) logits) or "reconstruction" (outputs logits of
      the input's shape, e.g. an autoencoder; apply a sigmoid loss against the target image).
  """

  name: str
  factory: Callable[..., nn.Module]
  input_shape: tuple[int, int, int]
  task: str = "classification"


_REGISTRY: dict[str, ModelSpec] = {}


def register(name: str, *, input_shape, task: str = "classification"):
  """Decorator registering `factory` under `name`.

  Args:
    name: the registry name (a non-empty string, not yet registered).
    input_shape: (H, W, C) of the smallest sensible input (see `ModelSpec.input_shape`).
    task: "classification" (default) or "reconstruction".

  Returns:
    The decorator; it returns the factory unchanged.

  Raises:
    ValueError: an empty or already registered name, a bad input_shape, an unknown task.
  """
  if not isinstance(name, str) or not name:
    raise ValueError(f"register: name must be a non-empty string, got {name!r}")
  if name in _REGISTRY:
    raise ValueError(f"register: model {name!r} is already registered")
  try:
    shape = tuple(int(d) for d in input_shape)
  except TypeError:
    raise ValueError(f"register({name!r}): input_shape must be (H, W, C), got {input_shape!r}") from None
  if len(shape) != 3 or any(d < 1 for d in shape):
    raise ValueError(f"register({name!r}): input_shape must be (H, W, C) positive ints, got {input_shape!r}")
  if task not in TASKS:
    raise ValueError(f"register({name!r}): task must be one of {', '.join(TASKS)}, got {task!r}")

  def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    if not callable(factory):
      raise ValueError(f"register({name!r}): the decorated object must be callable, got {factory!r}")
    _REGISTRY[name] = ModelSpec(name=name, factory=factory, input_shape=shape, task=task)
    return factory

  return decorator


def names() -> list[str]:
  """The registered model names, sorted."""
  return sorted(_REGISTRY)


def spec(name: str) -> ModelSpec:
  """The `ModelSpec` of a registered model; ValueError listing the known names for an unknown one."""
  try:
    return _REGISTRY[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(names())}") from None


def get(name: str, **kwargs) -> nn.Module:
  """Builds the registered model `name` with the factory's keyword arguments.

  Args:
    name: a registered name (see `names()`).
    **kwargs: passed to the factory, e.g. num_classes=10, bn_momentum=0.9, axis_name="batch".

  Returns:
    An unbound flax.linen Module mapping (N, H, W, C) float input to logits.

  Raises:
    ValueError: an unknown name (the message lists the known names), a keyword the factory does not
      accept (the message lists those it does), or a bad value the factory rejects.
  """
  model_spec = spec(name)
  parameters = inspect.signature(model_spec.factory).parameters
  if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
    accepted = [p for p, v in parameters.items() if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
      raise ValueError(f"model {name!r} got unknown argument(s) {', '.join(unknown)}; it accepts: "
                       f"{', '.join(accepted)}")
  model = model_spec.factory(**kwargs)
  if isinstance(model, nn.Module):
    # Recorded on the instance (not a dataclass field: equality and hashing are unchanged), so that a
    # trained model can be saved as "registry name + arguments" and rebuilt by `get` (jaxcnn.train.load).
    object.__setattr__(model, "_jaxcnn_registry_entry", (name, dict(kwargs)))
  return model


def registry_entry(model) -> tuple[str, dict] | None:
  """(name, kwargs) when `model` is the instance `get(name, **kwargs)` returned, else None (any other
  module, including clones of a registry model)."""
  return getattr(model, "_jaxcnn_registry_entry", None)


def check_num_classes(num_classes, model: str) -> int:
  """Raises ValueError unless num_classes is an int >= 1 (models call this before building)."""
  if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f"{model}: num_classes must be an int >= 1, got {num_classes!r}")
  return num_classes

