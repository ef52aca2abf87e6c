"""Keras `.h5` weight files read with h5py alone (arrays only: no pickle, no eval, no Keras needed).

Two layouts are understood:

  Keras 3 (`model.save_weights("x.weights.h5")`): a `layers` group with one subgroup per layer, keyed
    by class (`conv2d`, `conv2d_1`, ...), each holding `vars/0`, `vars/1`, ... in the layer's weight
    order; the layer's own name is the `name` attribute of its `vars` group. A nested model appears as
    `layers/<model>/layers/<layer>/vars`; its layers are named "<model name>/<layer name>".
  Legacy Keras 2 HDF5 (what `keras.applications` weight files and `model.save("x.h5")` write): the
    `layer_names` attribute lists the layers in order (under `model_weights` for a whole saved model);
    each layer group's `weight_names` attribute lists its datasets in weight order.

Within a layer, weights are taken in Keras' order (the order Keras itself loads them in, whatever the
dataset names, which differ between Keras versions), and matched to a jaxcnn layer's variables in this
order:

  Conv1D / Conv2D / Dense       kernel, bias        kernels are HWIO / (in, out) in both libraries
  Conv1DTranspose / Conv2DTranspose  kernel, bias   kernel (k..., filters, C) in both libraries
  DepthwiseConv2D               depthwise_kernel, bias
  SeparableConv2D               depthwise_kernel, pointwise_kernel, bias
  BatchNormalization            gamma, beta, moving_mean, moving_variance
                             -> scale, bias, mean (batch_stats), var (batch_stats)
  GroupNormalization / LayerNormalization   gamma, beta -> scale, bias

Both libraries are channels-last (NHWC), so a Dense kernel after Flatten reads the flattened features
in the same (h, w, c) order and needs no permutation. Files saved from a `channels_first` Keras model
are not supported.
"""
from __future__ import annotations

import logging
import pathlib
from typing import Any, Mapping, Optional

import numpy as np

from jaxcnn.errors import DataError

logger = logging.getLogger("jaxcnn.interop")

# A jaxcnn layer's variables in the order Keras stores the corresponding weights (see module docstring).
_KERAS_ORDER = ("kernel", "depthwise_kernel", "pointwise_kernel", "scale", "bias", "mean", "var")
_COLLECTIONS = ("params", "batch_stats")
# Messages list at most this many layers per category, so a whole wrong architecture stays readable.
_LISTED = 30


def _decode(value) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _open(path):
  import h5py  # local: only this module needs it, and `import jaxcnn.interop` stays light.
  path = pathlib.Path(path)
  if not path.is_file():
    raise DataError(f"{path}: Keras weights file not found")
  try:
    return h5py.File(path, "r")
  except OSError as err:
    raise DataError(f"{path}: not a readable HDF5 file ({err})") from None


def _array(dataset, path, where) -> np.ndarray:
  import h5py
  if not isinstance(dataset, h5py.Dataset):
    raise DataError(f"{path}: {where} is not a dataset")
  if dataset.dtype.kind not in "fiu":
    raise DataError(f"{path}: {where} holds {dataset.dtype}, not numbers")
  # HDF5 can point a dataset at another file (external link), at raw bytes of any file (external
  # storage) or at other datasets (virtual): a weight must come from this file itself.
  if pathlib.Path(dataset.file.filename).resolve() != pathlib.Path(path).resolve():
    raise DataError(f"{path}: {where} links to another file ({dataset.file.filename}); refusing it")
  if dataset.external or dataset.is_virtual:
    raise DataError(f"{path}: {where} keeps its data in external files; refusing it")
  return np.asarray(dataset[()])


def _read_keras3(group, prefix, path, out) -> None:
  """Fills `out` from a Keras 3 `layers` group (recursing into nested models)."""
  for key in group:  # h5py iterates keys alphabetically; the layer order does not matter here
    layer = group[key]
    if "vars" not in layer:
      raise DataError(f"{path}: layers/{key} has no 'vars' group (not a Keras 3 weights file?)")
    name = _decode(layer["vars"].attrs.get("name", key))
    full = f"{prefix}{name}"
    count = len(layer["vars"])
    if any(str(i) not in layer["vars"] for i in range(count)):
      raise DataError(f"{path}: layers/{key}/vars is not numbered 0..{count - 1}")
    weights = [_array(layer["vars"][str(i)], path, f"layers/{key}/vars/{i}") for i in range(count)]
    if weights:
      if full in out:
        raise DataError(f"{path}: layer name {full!r} appears twice")
      out[full] = weights
    if "layers" in layer:
      _read_keras3(layer["layers"], f"{full}/", path, out)


def _read_legacy(group, path, out) -> None:
  """Fills `out` from a legacy HDF5 group with a `layer_names` attribute."""
  for name in (_decode(n) for n in group.attrs["layer_names"]):
    if name not in group:
      raise DataError(f"{path}: layer {name!r} is listed in layer_names but has no group")
    layer = group[name]
    weight_names = [_decode(n) for n in layer.attrs.get("weight_names", [])]
    weights = []
    for weight_name in weight_names:
      if weight_name not in layer:
        raise DataError(f"{path}: weight {weight_name!r} of layer {name!r} is listed but missing")
      weights.append(_array(layer[weight_name], path, f"{name}/{weight_name}"))
    if weights:
      out[name] = weights


def read_keras_weights(path) -> dict[str, list[np.ndarray]]:
  """The weights of a Keras `.h5` file, per layer, in Keras' weight order.

  Args:
    path: a Keras 3 `.weights.h5` file, a legacy Keras 2 weights file (e.g. from
      `keras.applications`), or a legacy whole-model `.h5` file (its `model_weights` group is read).

  Returns:
    {layer name: [arrays in Keras order]} for every layer that has weights (pooling, flatten and input
    layers have none and are left out), e.g. {"block1_conv1": [kernel (3, 3, 3, 64), bias (64,)], ...}.

  Raises:
    DataError: the file is missing, not HDF5, or in neither layout (the message names the file).
  """
  out: dict[str, list[np.ndarray]] = {}
  with _open(path) as handle:
    if "layer_names" in handle.attrs:
      _read_legacy(handle, path, out)
    elif "model_weights" in handle and "layer_names" in handle["model_weights"].attrs:
      _read_legacy(handle["model_weights"], path, out)
    elif "layers" in handle:
      _read_keras3(handle["layers"], "", path, out)
    else:
      raise DataError(f"{path}: not a Keras weights file (no 'layer_names' attribute, no "
                      f"'model_weights' or 'layers' group; top-level keys: {sorted(handle)})")
  return out


def _layers_of(variables) -> dict[str, list[tuple[str, str, Any]]]:
  """{layer path "a/b": [(collection, variable name, leaf) in Keras order]} of a flax variables dict."""
  from flax import traverse_util
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise ValueError("variables: expected a flax variables dict with a 'params' collection (as returned "
                     f"by model.init or jax.eval_shape(model.init, ...)), got {type(variables).__name__}")
  unknown = sorted(set(variables) - set(_COLLECTIONS))
  if unknown:
    raise ValueError(f"variables: collections {unknown} cannot be loaded from Keras (known: "
                     f"{', '.join(_COLLECTIONS)})")
  layers: dict[str, list[tuple[str, str, Any]]] = {}
  for collection in _COLLECTIONS:
    for keys, leaf in traverse_util.flatten_dict(dict(variables.get(collection, {}))).items():
      layer = "/".join(keys[:-1])
      if keys[-1] not in _KERAS_ORDER:
        raise ValueError(f"variables: {collection} variable {'/'.join(keys)!r} has no Keras counterpart "
                         f"(known variable names: {', '.join(_KERAS_ORDER)})")
      layers.setdefault(layer, []).append((collection, keys[-1], leaf))
  for entries in layers.values():
    entries.sort(key=lambda entry: _KERAS_ORDER.index(entry[1]))
  return layers


def _shape(shape) -> str:
  return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _listing(names) -> str:
  names = list(names)
  shown = ", ".join(names[:_LISTED])
  return shown + (f", ... ({len(names) - _LISTED} more)" if len(names) > _LISTED else "")


def load_keras_weights(path, variables, *, rename: Optional[Mapping[str, str]] = None,
                       strict: bool = True) -> dict:
  """Loads a Keras `.h5` weights file into a jaxcnn model's variables, matching layers by name.

      template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
      variables = load_keras_weights("vgg16_weights.h5", template)
      logits = model.apply(variables, images)

  Args:
    path: the `.h5` file (any layout `read_keras_weights` reads).
    variables: the model's variables dict ({"params": ..., "batch_stats": ...}), concrete arrays or
      `jax.ShapeDtypeStruct`s from `jax.eval_shape`: only shapes and dtypes are used, except that with
      strict=False the layers the file lacks keep these values (so they must be arrays then). A layer
      is a module path joined by "/" (e.g. "block1_conv1", "conv2d_1").
    rename: {jaxcnn layer path: Keras layer name} for layers named differently in the two; default
      None (same names). E.g. Keras' auto-names in a session that built other models (`conv2d_4`).
    strict: True (default): every jaxcnn layer must be found in the file and every layer of the file
      used. False: jaxcnn layers the file lacks keep their values and unused file layers are ignored
      (both are logged), e.g. to load a Keras backbone under a new head. Shapes must match either way.

  Returns:
    A new variables dict of the same structure, with the file's weights as jax arrays of the
    template's dtypes.

  Raises:
    DataError: the file is unreadable, or it does not fit the model: the message lists the jaxcnn
      layers missing from the file, the file's layers the model lacks, and each layer whose weight
      count or shapes differ (jaxcnn vs file).
    ValueError: `variables` is not a flax variables dict, or holds variables with no Keras counterpart.
  """
  import jax.numpy as jnp
  from flax import traverse_util
  if rename is not None and not isinstance(rename, Mapping):
    raise ValueError(f"rename: expected a mapping {{jaxcnn layer: Keras layer}}, got {rename!r}")
  rename = dict(rename or {})
  layers = _layers_of(variables)
  unknown_renames = sorted(set(rename) - set(layers))
  if unknown_renames:
    raise ValueError(f"rename: {unknown_renames} are not layers of the model (its layers: "
                     f"{_listing(layers)})")
  file_layers = read_keras_weights(path)

  missing, mismatched, loaded = [], [], {}
  for layer, entries in layers.items():
    keras_name = rename.get(layer, layer)
    if keras_name not in file_layers:
      missing.append(layer if keras_name == layer else f"{layer} (as {keras_name})")
      continue
    weights = file_layers[keras_name]
    ours = [tuple(leaf.shape) for _, _, leaf in entries]
    theirs = [tuple(w.shape) for w in weights]
    if ours != theirs:
      described = ", ".join(f"{name} {_shape(shape)}" for (_, name, _), shape in zip(entries, ours))
      mismatched.append(f"{layer}: jaxcnn [{described}] vs file [{', '.join(map(_shape, theirs))}]")
      continue
    loaded[layer] = keras_name
  # File layers a model layer asked for (loaded or mismatched) are reported once, not also as unexpected.
  claimed = {rename.get(layer, layer) for layer in layers}
  unexpected = [name for name in file_layers if name not in claimed]

  problems = []
  if mismatched:
    problems.append(f"mismatched shapes: {'; '.join(mismatched)}")
  if strict and missing:
    problems.append(f"missing from the file: {_listing(missing)}")
  if strict and unexpected:
    problems.append(f"unexpected in the file: {_listing(unexpected)}")
  if problems:
    raise DataError(f"{path}: Keras weights do not fit the model; " + "; ".join(problems))
  if missing:
    concrete = all(hasattr(leaf, "__array__") for layer in missing for _, _, leaf in layers[layer])
    if not concrete:
      raise ValueError(f"variables: layers {_listing(missing)} are not in {path} and have no values of "
                       "their own (pass initialised variables, not jax.eval_shape structures)")
    logger.info("%s: layers not in the file keep their values: %s", path, _listing(missing))
  if unexpected:
    logger.info("%s: file layers not loaded: %s", path, _listing(unexpected))

  flat = {collection: traverse_util.flatten_dict(dict(variables.get(collection, {})))
          for collection in _COLLECTIONS if collection in variables}
  for layer, keras_name in loaded.items():
    prefix = tuple(layer.split("/")) if layer else ()
    for (collection, name, leaf), weight in zip(layers[layer], file_layers[keras_name]):
      flat[collection][prefix + (name,)] = jnp.asarray(weight, dtype=leaf.dtype)
  return {collection: traverse_util.unflatten_dict(leaves) for collection, leaves in flat.items()}
