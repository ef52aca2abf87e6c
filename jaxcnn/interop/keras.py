"""Keras `.h5` weight files read with h5py alone (arrays only: no pickle, no eval, no Keras needed).

Two layouts are understood:

  Keras 3 (`model.save_weights("x.weights.h5")`): a `layers` group with one subgroup per layer, keyed
    by class (`conv2d`, `conv2d_1`, ...), each holding `vars/0`, `vars/1`, ... in the layer's weight
    order; the layer's own name is the `name` attribute of its `vars` group. A nested model appears as
    `layers/<model>/layers/<layer>/vars`; its layers are named "<model name>/<layer name>".
  Legacy Keras 2 HDF5 (what `keras.applications` weight files and `model.save("x.h5")` write): the
    `layer_names` attribute lists the layers in order (under `model_weights` for a whole saved model);
    each layer group's `weight_names` attribute lists its datasets in weight order. A nested model is
    one group whose weight names carry its layers' paths; its layers are named "<model>/<layer>" too.

A jaxcnn layer path (e.g. "vgg16/block1_conv1" inside a Sequential) takes the file layer of that name,
or else the one file layer whose name ends the same way (see `load_keras_weights`).

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


def _legacy_layer_names(name: str, weight_names: list[str]) -> list[str]:
  """The layer each weight of legacy group `name` belongs to: `name` itself, or "name/<layer>" for a
  nested model, which the legacy format saves as one group whose weight names carry its layers' paths
  ("backbone/c1/kernel" from Keras 3, "c1/kernel:0" from Keras 2). A weight whose parent path ends in
  `name` (or that has no path) is the layer's own ("sequential/head/kernel" in group "head")."""
  owners = []
  for weight_name in weight_names:
    parent = weight_name.rsplit("/", 1)[0] if "/" in weight_name else ""
    if not parent or parent.rsplit("/", 1)[-1] == name:
      owners.append(name)
    else:
      owners.append(f"{name}/{parent[len(name) + 1:] if parent.startswith(name + '/') else parent}")
  return owners


def _read_legacy(group, path, out) -> None:
  """Fills `out` from a legacy HDF5 group with a `layer_names` attribute (nested models split up)."""
  for name in (_decode(n) for n in group.attrs["layer_names"]):
    if name not in group:
      raise DataError(f"{path}: layer {name!r} is listed in layer_names but has no group")
    layer = group[name]
    weight_names = [_decode(n) for n in layer.attrs.get("weight_names", [])]
    for weight_name, owner in zip(weight_names, _legacy_layer_names(name, weight_names)):
      if weight_name not in layer:
        raise DataError(f"{path}: weight {weight_name!r} of layer {name!r} is listed but missing")
      out.setdefault(owner, []).append(_array(layer[weight_name], path, f"{name}/{weight_name}"))


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


def _common_ending(a: str, b: str) -> int:
  """How many trailing "/"-separated parts two layer paths share ("vgg16/block1_conv1", "block1_conv1": 1)."""
  a_parts, b_parts = a.split("/"), b.split("/")
  count = 0
  while count < min(len(a_parts), len(b_parts)) and a_parts[-1 - count] == b_parts[-1 - count]:
    count += 1
  return count


def _match_layers(layers, file_layers, rename) -> tuple[dict[str, str], dict[str, list[str]]]:
  """({model layer: file layer}, {model layer: the file layers it could equally be}).

  A renamed layer takes its rename and a layer whose path is a file layer's name takes that one. Any
  other layer takes the file layer whose name shares the longest "/"-ending with its path (a model
  nested differently from the file: "vgg16/block1_conv1" and "block1_conv1", or "block1_conv1" and
  "vgg16/block1_conv1"), if that one is unique, not taken by name, and wanted by no other layer.
  """
  matched = {layer: rename[layer] for layer in layers if layer in rename}
  matched.update({layer: layer for layer in layers if layer not in rename and layer in file_layers})
  taken = set(matched.values())
  free = [name for name in file_layers if name not in taken]
  wanted, ambiguous = {}, {}
  for layer in layers:
    if layer in matched:
      continue
    endings = {name: _common_ending(layer, name) for name in free}
    longest = max(endings.values(), default=0)
    if longest == 0:
      continue
    best = [name for name, count in endings.items() if count == longest]
    if len(best) == 1:
      wanted[layer] = best[0]
    else:
      ambiguous[layer] = best
  for layer, name in wanted.items():
    rivals = [other for other, theirs in wanted.items() if theirs == name]
    if len(rivals) == 1:
      matched[layer] = name
    else:
      ambiguous[layer] = [name]
  return matched, ambiguous


def _closest(names, candidates) -> str:
  """"a ~ b, c ~ d": for each name the most similar candidate (difflib), or "a (nothing close)"."""
  import difflib
  candidates = list(candidates)
  shown = []
  for name in list(names)[:_LISTED]:
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.3)
    if not close:  # compare the last parts: a prefix of the model's nesting dwarfs a short layer name
      tails = {c.rsplit("/", 1)[-1]: c for c in candidates}
      tail = difflib.get_close_matches(name.rsplit("/", 1)[-1], list(tails), n=1, cutoff=0.3)
      close = [tails[tail[0]]] if tail else []
    shown.append(f"{name} ~ {close[0]}" if close else f"{name} (nothing close)")
  return ", ".join(shown)


def load_keras_weights(path, variables, *, rename: Optional[Mapping[str, str]] = None,
                       strict: bool = True, min_fraction: float = 0.5) -> dict:
  """Loads a Keras `.h5` weights file into a jaxcnn model's variables, matching layers by name.

      template = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
      variables = load_keras_weights("vgg16_weights.h5", template)
      logits = model.apply(variables, images)

  Layers are matched by name: a jaxcnn layer path ("conv2d_1", or "vgg16/block1_conv1" inside a nested
  Sequential) takes the file layer of that name (a nested Keras model's layers are named
  "<model>/<layer>"); failing that, the file layer whose name ends the same way, compared by
  "/"-separated parts with the longest common ending winning, when exactly one file layer fits. So a
  `Sequential([vgg16 backbone, Dense(2)])` takes the backbone of a file of VGG16 alone, and a flat
  model takes the layers of a nested Keras model. Two equally good candidates are an error (use rename).

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
    min_fraction: with strict=False, the smallest fraction of the file's layers (those with weights)
      that must be loaded; default 0.5. A load below it, and any load that matches no layer at all,
      is an error naming the closest names, since it almost always means the names did not line up
      (Keras auto-names, a nesting prefix) rather than that most of the file is unwanted. 0 allows any
      partial load.

  Returns:
    A new variables dict of the same structure, with the file's weights as jax arrays of the
    template's dtypes.

  Raises:
    DataError: the file is unreadable, or it does not fit the model: the message lists the jaxcnn
      layers missing from the file, the file's layers the model lacks (with the closest file name of
      each missing layer), each layer whose weight count or shapes differ (jaxcnn vs file), layers
      with two equally good file layers, or (strict=False) a load of less than min_fraction of the file.
    ValueError: `variables` is not a flax variables dict, or holds variables with no Keras counterpart;
      a bad rename or min_fraction.
  """
  import jax.numpy as jnp
  from flax import traverse_util
  if rename is not None and not isinstance(rename, Mapping):
    raise ValueError(f"rename: expected a mapping {{jaxcnn layer: Keras layer}}, got {rename!r}")
  if isinstance(min_fraction, bool) or not isinstance(min_fraction, (int, float)) or not 0 <= min_fraction <= 1:
    raise ValueError(f"min_fraction: expected a number in [0, 1], got {min_fraction!r}")
  rename = dict(rename or {})
  layers = _layers_of(variables)
  unknown_renames = sorted(set(rename) - set(layers))
  if unknown_renames:
    raise ValueError(f"rename: {unknown_renames} are not layers of the model (its layers: "
                     f"{_listing(layers)})")
  file_layers = read_keras_weights(path)
  if not file_layers and layers:
    raise DataError(f"{path}: the file holds no layer with weights; nothing to load into the model's "
                    f"{_listing(layers)}")
  matched, ambiguous = _match_layers(layers, file_layers, rename)

  missing, mismatched, loaded = [], [], {}
  for layer, entries in layers.items():
    keras_name = matched.get(layer)
    if keras_name is None or keras_name not in file_layers:
      if layer not in ambiguous:
        missing.append(layer)
      continue
    weights = file_layers[keras_name]
    ours = [tuple(leaf.shape) for _, _, leaf in entries]
    theirs = [tuple(w.shape) for w in weights]
    if ours != theirs:
      described = ", ".join(f"{name} {_shape(shape)}" for (_, name, _), shape in zip(entries, ours))
      shown = layer if keras_name == layer else f"{layer} (file {keras_name})"
      mismatched.append(f"{shown}: jaxcnn [{described}] vs file [{', '.join(map(_shape, theirs))}]")
      continue
    loaded[layer] = keras_name
  # File layers a model layer asked for (loaded or mismatched) are reported once, not also as unexpected.
  claimed = set(matched.values())
  unexpected = [name for name in file_layers if name not in claimed]
  bare_missing = [layer for layer in missing if layer not in rename]
  missing_shown = [f"{layer} (as {rename[layer]})" if layer in rename else layer for layer in missing]

  problems = []
  if mismatched:
    problems.append(f"mismatched shapes: {'; '.join(mismatched)}")
  if ambiguous:
    problems.append("ambiguous (pass rename): " + "; ".join(
        f"{layer} could be {' or '.join(names)}" for layer, names in ambiguous.items()))
  if strict and missing:
    problems.append(f"missing from the file: {_listing(missing_shown)}")
  if strict and unexpected:
    problems.append(f"unexpected in the file: {_listing(unexpected)}")
  if strict and bare_missing and unexpected:
    problems.append(f"closest file names: {_closest(bare_missing, unexpected)}")
  if not strict and not problems and file_layers:
    used = len(set(loaded.values()))
    if not used or used < min_fraction * len(file_layers):
      problems.append(f"only {used} of the file's {len(file_layers)} layers with weights match the model "
                      f"(min_fraction={min_fraction}); model layers not in the file, with the closest file "
                      f"names: {_closest(missing, unexpected) if unexpected else _listing(missing_shown)}; "
                      "pass rename={jaxcnn layer: Keras layer}")
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
  by_ending = [f"{layer} <- {name}" for layer, name in loaded.items() if name != layer and layer not in rename]
  if by_ending:
    logger.info("%s: layers matched by the end of their path: %s", path, _listing(by_ending))

  flat = {collection: traverse_util.flatten_dict(dict(variables.get(collection, {})))
          for collection in _COLLECTIONS if collection in variables}
  for layer, keras_name in loaded.items():
    prefix = tuple(layer.split("/")) if layer else ()
    for (collection, name, leaf), weight in zip(layers[layer], file_layers[keras_name]):
      flat[collection][prefix + (name,)] = jnp.asarray(weight, dtype=leaf.dtype)
  return {collection: traverse_util.unflatten_dict(leaves) for collection, leaves in flat.items()}
