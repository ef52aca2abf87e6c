"""Architecture specs: a `Sequential` of jaxcnn layers as JSON, and back.

    spec = architecture_spec(model)          # JSON-able dict; ValueError naming what cannot be written
    model = from_architecture_spec(spec)     # the same layers, names and settings

A spec is `{"class": "Sequential", "layers": [layer, ...]}`, each layer `{"class": <jaxcnn.layers name>,
"name": <its name>, "config": {field: value}}` (a nested Sequential is a layer whose entry has "layers"
instead of "config"; the same instance listed twice is `{"same_as": <index of its first entry>}`).
Every dataclass field of the layer is written except the initializers (`*_init`): a saved model carries
its variables, so how they were first drawn does not change what it computes; a rebuilt layer has the
default initializers. Values: None, bools, ints, finite floats, strings, tuples/lists (written as lists,
read back as tuples), dtypes (`{"dtype": "float32"}`) and activations (`{"activation": "relu"}` for the
functions of `ACTIVATIONS`, `{"function": "jax.nn.relu"}` for a jax.nn/jax.numpy function given as
such). Anything else (a custom nn.Module, a lambda, a functools.partial) is refused with a ValueError
naming the layer's path and field, at the time the spec is written.
"""
from __future__ import annotations

import dataclasses
import math
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

_SKIPPED_FIELDS = ("parent", "name")


def _layer_classes() -> dict[str, type]:
  """{class name: class} of every module class jaxcnn.layers exports (aliases map to their class)."""
  import jaxcnn.layers as layers_lib
  out = {}
  for name in layers_lib.__all__:
    value = getattr(layers_lib, name)
    if isinstance(value, type) and issubclass(value, nn.Module):
      out.setdefault(value.__name__, value)
  return out


def _function_name(fn) -> str | None:
  """'jax.nn.relu' / 'jax.numpy.tanh' when `fn` is that public function, else None."""
  for prefix, module in (("jax.nn", jax.nn), ("jax.numpy", jnp)):
    name = getattr(fn, "__name__", None)
    if name and getattr(module, name, None) is fn:
      return f"{prefix}.{name}"
  return None


def _encode(value, where: str):
  from jaxcnn.layers.activations import ACTIVATIONS
  if value is None or isinstance(value, (bool, str)):
    return value
  if isinstance(value, (int, np.integer)):
    return int(value)
  if isinstance(value, (float, np.floating)):
    if not math.isfinite(float(value)):
      raise ValueError(f"{where}: {value!r} is not a finite number (JSON cannot hold it)")
    return float(value)
  if isinstance(value, (tuple, list)):
    return [_encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
  if isinstance(value, np.dtype) or (isinstance(value, type) and _is_dtype(value)):
    return {"dtype": np.dtype(value).name}
  if callable(value):
    for name, fn in ACTIVATIONS.items():
      if fn is value:
        return {"activation": name}
    name = _function_name(value)
    if name is not None:
      return {"function": name}
  raise ValueError(f"{where}: {value!r} cannot be written to an architecture spec (values: None, numbers, "
                   "strings, tuples, dtypes, activations by name)")


def _is_dtype(value) -> bool:
  try:
    np.dtype(value)
  except TypeError:
    return False
  return True


def _decode(value):
  from jaxcnn.layers.activations import ACTIVATIONS
  if isinstance(value, list):
    return tuple(_decode(v) for v in value)
  if isinstance(value, dict):
    if set(value) == {"dtype"}:
      name = str(value["dtype"])
      return getattr(jnp, name) if isinstance(getattr(jnp, name, None), type) else np.dtype(name)
    if set(value) == {"activation"}:
      return ACTIVATIONS[value["activation"]]
    if set(value) == {"function"}:
      prefix, _, name = str(value["function"]).rpartition(".")
      module = {"jax.nn": jax.nn, "jax.numpy": jnp}.get(prefix)
      if module is None or not callable(getattr(module, name, None)):
        raise ValueError(f"unknown function {value['function']!r}")
      return getattr(module, name)
    raise ValueError(f"unknown value {value!r}")
  return value


def _fields(layer: nn.Module):
  return [f for f in dataclasses.fields(layer) if f.init and f.name not in _SKIPPED_FIELDS]


def architecture_spec(model: nn.Module) -> dict:
  """The JSON-able spec of a `Sequential` built from jaxcnn layers (format in the module docstring).

  Raises:
    ValueError: `model` is not a Sequential, or contains a module that is not a jaxcnn layer or a field
      value that cannot be written (the message names the layer's path, its class and the field).
  """
  from jaxcnn.layers.sequential import Sequential
  if not isinstance(model, Sequential):
    raise ValueError(f"architecture: {type(model).__module__}.{type(model).__qualname__} is not a "
                     "jaxcnn.layers.Sequential; only Sequential stacks of jaxcnn layers are written as specs")
  return _sequential_spec(model, type(model).__name__, _layer_classes())


def _sequential_spec(model, path: str, classes: dict[str, type]) -> dict:
  from jaxcnn.layers.sequential import Sequential
  entries, seen = [], {}
  for index, layer in enumerate(model.layers):
    name = layer.name or f"layers[{index}]"
    where = f"{path}/{name}"
    if id(layer) in seen:
      entries.append({"same_as": seen[id(layer)]})
      continue
    seen[id(layer)] = index
    cls = type(layer)
    if classes.get(cls.__name__) is not cls:
      raise ValueError(f"architecture: layer {where!r} is a {cls.__module__}.{cls.__qualname__}, not a jaxcnn "
                       "layer, so it cannot be written to a spec")
    if isinstance(layer, Sequential):
      entry = _sequential_spec(layer, where, classes)
      entry["name"] = layer.name
    else:
      entry = {"class": cls.__name__, "name": layer.name,
               "config": {f.name: _encode(getattr(layer, f.name), f"architecture: layer {where!r} field {f.name!r}")
                          for f in _fields(layer) if not f.name.endswith("_init")}}
    entries.append(entry)
  return {"class": "Sequential", "layers": entries}


def from_architecture_spec(spec: dict) -> nn.Module:
  """The Sequential an `architecture_spec` describes.

  Raises:
    ValueError: not a spec, an unknown layer class or field, or a value the layer refuses (one line).
  """
  return _build(spec, "architecture", _layer_classes())


def _build(spec, where: str, classes: dict[str, type], name: str | None = None) -> nn.Module:
  from jaxcnn.layers.sequential import Sequential
  if not isinstance(spec, dict) or spec.get("class") != "Sequential" or not isinstance(spec.get("layers"), list):
    raise ValueError(f"{where}: expected {{'class': 'Sequential', 'layers': [...]}}, got {str(spec)[:80]}")
  built: list[nn.Module] = []
  for index, entry in enumerate(spec["layers"]):
    at = f"{where}.layers[{index}]"
    if not isinstance(entry, dict):
      raise ValueError(f"{at}: expected a layer entry, got {entry!r}")
    if "same_as" in entry:
      ref = entry["same_as"]
      if not (isinstance(ref, int) and 0 <= ref < index):
        raise ValueError(f"{at}: same_as={ref!r} does not name an earlier layer")
      built.append(built[ref])
      continue
    layer_name = entry.get("name")
    if entry.get("class") == "Sequential":
      built.append(_build(entry, at, classes, layer_name))
      continue
    cls = classes.get(entry.get("class"))
    if cls is None or not isinstance(entry.get("config"), dict):
      raise ValueError(f"{at}: unknown layer class {entry.get('class')!r} (a spec names jaxcnn.layers classes)")
    known = {f.name for f in _fields(cls)}
    unknown = sorted(set(entry["config"]) - known)
    if unknown:
      raise ValueError(f"{at}: {cls.__name__} has no field(s) {', '.join(unknown)}")
    try:
      kwargs = {k: _decode(v) for k, v in entry["config"].items()}
      built.append(cls(**kwargs, name=layer_name))
    except (TypeError, ValueError) as err:
      text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
      raise ValueError(f"{at} ({cls.__name__}): {text}") from None
  return Sequential(built, name=name)


__all__ = ["architecture_spec", "from_architecture_spec"]
