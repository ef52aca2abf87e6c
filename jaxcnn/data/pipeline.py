"""Input pipelines: global batches as a pure function of (seed, epoch, step), and the preprocessing spec.

A batch is {"image": inputs, "label": targets, "mask": float32 (B,)}, whatever the data is:
- "image" holds the model's inputs: uint8 images (N, H, W, C) (or (N, H, W), given a channel axis)
  become float32 after preprocessing; float arrays of any rank ((N, H, W, C) images, (N, L, C)
  waveforms, (N, F) features) are never reshaped and pass as float32; other integer inputs (token ids)
  pass unchanged.
- "label" holds the targets, unchanged: int32 class ids (N,), float32 one-hot or soft labels (N, K), or
  float32 arrays shaped like the model's output (autoencoders trained on (noisy, clean), regression).
- "mask" is 1 for real examples and 0 for the padding of the last batch of an evaluation pipeline.

Two implementations share one interface (`InputPipeline`) and give identical batches for the same
(seed, epoch, step):
- `ResidentPipeline` over in-memory arrays: `batch_fn(device_arrays(), epoch, step)` gathers a batch
  inside jit, so a run of steps can be one lax.scan;
- `StreamingPipeline` over a `HostSource` (an image folder, a large array source): `read` fetches rows
  of a batch on the host.
Both draw the example order from one permutation of (seed, epoch) (`shuffle_positions`, a Feistel
network evaluated on device by `batch_fn` and in numpy by `read`), and both finish a batch with the same
pure on-device `transform` (scale -> augment -> standardise). So a batch assembled from rows that several
processes read on their hosts equals the batch one process gathers on its devices. Shuffled (training)
pipelines drop the remainder; unshuffled (evaluation) pipelines cover every example in ceil(N/B) steps.

The preprocessing a pipeline applies is a JSON-able spec (`pipeline.preprocessing`; format in
docs/DESIGN.md, "Preprocessing"), computed from the training portion and reused for validation and test
data; `preprocess(spec, inputs)` applies it to raw inputs (what predict/evaluate need later).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import queue
import threading
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.data import augment as _augment
from jaxcnn.errors import DataError

NORMALIZE_MODES = ("auto", "featurewise", "scale", "none")
PREPROCESSING_FORMAT = "jaxcnn.preprocessing/1"
# ImageDataGenerator divides by (std + 1e-6); keeping its epsilon keeps results comparable.
_EPSILON = 1e-6
_PREFETCH = 2


class InputPipeline(Protocol):
  """What the training engine consumes (see docs/DESIGN.md, "Data").

  Every pipeline offers `batches`; the engine also uses, where present, `read` + `transform` (batches
  fed from the host in chunks) and `device_arrays` + `batch_fn` (batches gathered on device).
  """

  batch_size: int
  steps_per_epoch: int
  num_examples: int
  image_shape: tuple[int, ...]
  num_classes: int | None
  class_names: list[str]
  stats: dict | None
  resident: bool

  def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    ...


# -- argument checks ------------------------------------------------------------------------------------

def _check_batch_size(batch_size, process_count: int = 1) -> int:
  if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
  if batch_size % process_count:
    raise ValueError(f"batch_size: {batch_size} is not divisible by the process count {process_count}")
  return int(batch_size)


def _check_seed(seed) -> int:
  if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
    raise ValueError(f"seed: expected an int, got {seed!r}")
  return int(seed)


def _check_normalize(normalize) -> str:
  if normalize not in NORMALIZE_MODES:
    raise ValueError(f"normalize: expected one of {NORMALIZE_MODES}, got {normalize!r}")
  return normalize


def _is_pixels(dtype) -> bool:
  return np.dtype(dtype) == np.uint8


def resolve_normalize(normalize: str, dtype) -> str:
  """The normalisation applied to inputs of `dtype`: "auto" is "featurewise" for uint8, "none" otherwise.

  Raises:
    ValueError: an unknown mode, or "featurewise"/"scale" for inputs that are neither uint8 nor float.
  """
  _check_normalize(normalize)
  dtype = np.dtype(dtype)
  if normalize == "auto":
    return "featurewise" if _is_pixels(dtype) else "none"
  if normalize != "none" and not (_is_pixels(dtype) or np.issubdtype(dtype, np.floating)):
    raise ValueError(f"normalize: {normalize!r} applies to uint8 or float inputs, got dtype {dtype}")
  return normalize


def _scale(normalize: str, dtype=np.uint8) -> float:
  """The factor inputs are multiplied by first: 1/255 for "scale", and for "featurewise" uint8 pixels."""
  mode = resolve_normalize(normalize, dtype)
  if mode == "scale" or (mode == "featurewise" and _is_pixels(dtype)):
    return 1.0 / 255.0
  return 1.0


def _effective_augment(augment, normalize: str) -> _augment.AugmentConfig:
  """The augment config with normalize="featurewise" folded in as featurewise center + std."""
  if augment is not None and not isinstance(augment, _augment.AugmentConfig):
    raise ValueError(f"augment: expected an AugmentConfig or None, got {type(augment).__name__}")
  config = augment if augment is not None else _augment.AugmentConfig()
  if normalize == "featurewise":
    config = dataclasses.replace(config, featurewise_center=True, featurewise_std_normalization=True)
  return config


def _stats_shape(input_shape) -> tuple[int, ...]:
  """Featurewise statistics are per channel: one value per entry of the inputs' last axis."""
  return tuple(input_shape[-1:])


def _check_stats(stats, channels) -> dict:
  shape = tuple(channels) if isinstance(channels, tuple) else (int(channels),)
  try:
    mean = np.asarray(stats["mean"], np.float32)
    std = np.asarray(stats["std"], np.float32)
  except (KeyError, TypeError) as err:
    raise ValueError(f"stats: expected a mapping with 'mean' and 'std', got {stats!r}") from err
  if mean.shape != shape or std.shape != shape:
    raise ValueError(f"stats: expected 'mean' and 'std' of shape {shape}, got {mean.shape} and {std.shape}")
  return {"mean": mean, "std": std}


def _check_finite(array: np.ndarray, name: str) -> None:
  finite = np.isfinite(array)
  if not finite.all():
    bad = np.argwhere(~finite.reshape(array.shape[0], -1).all(axis=1))[:, 0]
    raise ValueError(f"{name}: {int((~finite).sum())} non-finite values (NaN/Inf), in {len(bad)} examples "
                     f"starting with example {int(bad[0])}")


def _check_arrays(images, labels) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) as the pipelines hold them; ValueError naming the argument when they cannot be.

  uint8 (N, H, W) images gain a channel axis; float inputs become float32 and keep their shape; integer
  targets become int32 (class ids when 1-D: >= 0), float targets float32; floats must be finite.
  """
  x = np.asarray(images)
  y = np.asarray(labels)
  if _is_pixels(x.dtype) and x.ndim == 3:
    x = x[..., None]
  if x.ndim < 2:
    raise ValueError(f"images: expected one example per row, shape (N, ...) with examples of rank >= 1, "
                     f"got shape {x.shape}")
  if not (x.dtype == bool or np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
    raise ValueError(f"images: expected numeric inputs (uint8 pixels, floats), got dtype {x.dtype}")
  if x.shape[0] == 0:
    raise ValueError("images: the dataset is empty (N = 0)")
  if y.ndim < 1 or y.shape[0] != x.shape[0]:
    raise ValueError(f"labels: expected shape ({x.shape[0]},) or ({x.shape[0]}, ...) to match images, "
                     f"got {y.shape}")
  if np.issubdtype(x.dtype, np.floating):
    _check_finite(x, "images")
    x = x.astype(np.float32, copy=False)
  elif x.dtype != bool and not _is_pixels(x.dtype):
    x = x.astype(np.int32, copy=False)
  if y.dtype == bool or np.issubdtype(y.dtype, np.integer):
    if y.ndim == 1 and y.min() < 0:
      raise ValueError(f"labels: class ids must be >= 0, got {y.min()}")
    y = y.astype(np.int32, copy=False)
  elif np.issubdtype(y.dtype, np.floating):
    _check_finite(y, "labels")
    y = y.astype(np.float32, copy=False)
  else:
    raise ValueError(f"labels: expected integer class ids or float targets, got dtype {y.dtype}")
  return x, y


def _steps(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
  if drop_remainder:
    if num_examples < batch_size:
      raise ValueError(f"batch_size: {batch_size} exceeds the {num_examples} examples of a training "
                       "pipeline (which drops the remainder, leaving no batch)")
    return num_examples // batch_size
  return math.ceil(num_examples / batch_size)


def _check_position(epoch, start_step, steps_per_epoch: int):
  if not isinstance(epoch, (int, np.integer)) or epoch < 0:
    raise ValueError(f"epoch: expected an int >= 0, got {epoch!r}")
  if not isinstance(start_step, (int, np.integer)) or not 0 <= start_step <= steps_per_epoch:
    raise ValueError(f"start_step: expected an int in [0, {steps_per_epoch}], got {start_step!r}")


def _classes(labels: np.ndarray | None, class_names, num_classes) -> tuple[list[str], int | None]:
  """(class_names, num_classes) from explicit values, 1-D class ids' range, or one-hot labels' width.

  Targets that are not class labels (regression, reconstruction) have no classes: ([], None).
  """
  if labels is not None and class_names is None and num_classes is None:
    if labels.ndim == 2 and np.issubdtype(labels.dtype, np.floating):
      num_classes = labels.shape[1]
    elif labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
      return [], None
  if class_names is not None:
    class_names = [str(c) for c in class_names]
    if num_classes is not None and num_classes != len(class_names):
      raise ValueError(f"num_classes: {num_classes} disagrees with {len(class_names)} class_names")
    num_classes = len(class_names)
  elif num_classes is None:
    num_classes = int(labels.max()) + 1
  if (labels is not None and labels.size and labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer)
      and labels.max() >= num_classes):
    raise ValueError(f"labels: class id {int(labels.max())} out of range for {num_classes} classes")
  if class_names is None:
    class_names = [str(i) for i in range(num_classes)]
  return class_names, int(num_classes)


# -- the preprocessing spec -------------------------------------------------------------------------------

_SPEC_KEYS = ("format", "input_dtype", "input_shape", "normalize", "scale", "samplewise_center",
              "samplewise_std_normalization", "mean", "std", "epsilon")


def _make_spec(dtype, input_shape, normalize: str, augment: _augment.AugmentConfig, stats) -> dict:
  """The preprocessing spec: what `preprocess` applies to raw inputs (JSON-able)."""
  return {
      "format": PREPROCESSING_FORMAT,
      "input_dtype": np.dtype(dtype).name,
      "input_shape": [int(d) for d in input_shape],
      "normalize": normalize,
      "scale": _scale(normalize, dtype),
      "samplewise_center": bool(augment.samplewise_center),
      "samplewise_std_normalization": bool(augment.samplewise_std_normalization),
      "mean": [float(v) for v in np.ravel(stats["mean"])] if augment.featurewise_center else None,
      "std": [float(v) for v in np.ravel(stats["std"])] if augment.featurewise_std_normalization else None,
      "epsilon": _EPSILON,
  }


def check_preprocessing(spec) -> dict:
  """`spec` checked and copied (a preprocessing spec; see docs/DESIGN.md).

  Raises:
    ValueError: not a mapping, another format, or a field missing or of the wrong kind.
  """
  if not isinstance(spec, Mapping):
    raise ValueError(f"preprocessing: expected a preprocessing spec (a mapping), got {type(spec).__name__}")
  if spec.get("format") != PREPROCESSING_FORMAT:
    raise ValueError(f"preprocessing: format {spec.get('format')!r} is not {PREPROCESSING_FORMAT!r}")
  missing = [k for k in _SPEC_KEYS if k not in spec]
  if missing:
    raise ValueError(f"preprocessing: missing {', '.join(missing)}")
  spec = {k: spec[k] for k in _SPEC_KEYS}
  try:
    np.dtype(spec["input_dtype"])
  except TypeError:
    raise ValueError(f"preprocessing: input_dtype {spec['input_dtype']!r} is not a dtype") from None
  shape = spec["input_shape"]
  if not isinstance(shape, (list, tuple)) or not all(isinstance(d, int) and d > 0 for d in shape):
    raise ValueError(f"preprocessing: input_shape {shape!r} is not a list of positive ints")
  channels = _stats_shape(shape)
  for key in ("mean", "std"):
    value = spec[key]
    if value is not None and np.shape(value) != (channels[0] if channels else 1,):
      raise ValueError(f"preprocessing: {key} has {np.size(value)} values; inputs {tuple(shape)} need "
                       f"{channels[0] if channels else 1}")
  if spec["normalize"] not in NORMALIZE_MODES[1:]:
    raise ValueError(f"preprocessing: normalize {spec['normalize']!r} is not one of {NORMALIZE_MODES[1:]}")
  spec["input_shape"] = [int(d) for d in shape]
  return spec


def _scaled(spec: dict, x):
  """Raw inputs -> the values augmentation sees: float32 times spec["scale"] (other integers untouched)."""
  dtype = np.dtype(spec["input_dtype"])
  if not (_is_pixels(dtype) or np.issubdtype(dtype, np.floating)):
    return x
  x = x.astype(jnp.float32)
  return x * spec["scale"] if spec["scale"] != 1.0 else x


def _standardized(spec: dict, x):
  """Samplewise then featurewise standardisation, as ImageDataGenerator orders them."""
  eps = spec["epsilon"]
  axes = tuple(range(1, x.ndim))
  if spec["samplewise_center"]:
    x = x - jnp.mean(x, axis=axes, keepdims=True)
  if spec["samplewise_std_normalization"]:
    x = x / (jnp.std(x, axis=axes, keepdims=True) + eps)
  per_channel = (1,) * (x.ndim - 1) + (-1,)
  if spec["mean"] is not None:
    x = x - jnp.asarray(spec["mean"], jnp.float32).reshape(per_channel if x.ndim > 1 else ())
  if spec["std"] is not None:
    x = x / (jnp.asarray(spec["std"], jnp.float32).reshape(per_channel if x.ndim > 1 else ()) + eps)
  return x


def preprocess(spec: Mapping, inputs):
  """Raw inputs prepared exactly as the run that made `spec` prepared them (pure and jittable).

  Args:
    spec: a preprocessing spec (a pipeline's `.preprocessing`, `FitResult.preprocessing`).
    inputs: (N, *spec["input_shape"]) raw inputs of the trained kind: uint8 pixels when the run saw
      uint8, floats when it saw floats (a float copy of uint8 images would be scaled twice).

  Returns:
    The model's inputs: float32 (N, ...) (other integer inputs unchanged).

  Raises:
    ValueError: the spec is invalid, or `inputs` has another example shape or kind of dtype.
  """
  spec = check_preprocessing(spec)
  x = jnp.asarray(inputs)
  shape, dtype = tuple(spec["input_shape"]), np.dtype(spec["input_dtype"])
  if _is_pixels(dtype) and x.ndim == len(shape) and shape[-1] == 1 and tuple(x.shape[1:]) == shape[:-1]:
    x = x[..., None]  # (N, H, W) pixels, as the run was given them
  if tuple(x.shape[1:]) != shape:
    raise ValueError(f"inputs: expected shape (N, {', '.join(map(str, shape))}), got {tuple(x.shape)}")

  def kind(d):
    d = np.dtype(d)
    return "uint8" if _is_pixels(d) else "float" if np.issubdtype(d, np.floating) else d.name

  if kind(x.dtype) != kind(dtype):
    raise ValueError(f"inputs: dtype {np.dtype(x.dtype).name}, but the run was trained on {dtype.name} inputs "
                     f"(preprocessing: {spec['normalize']}, scale {spec['scale']:g}); pass {dtype.name} inputs")
  return _standardized(spec, _scaled(spec, x))


def feature_stats(read: Callable[[int, int], np.ndarray], count: int, scale: float,
                  chunk: int = 1024) -> dict[str, np.ndarray]:
  """Per-channel (last axis) mean and std of scaled inputs, accumulated in float64.

  Args:
    read: (start, stop) -> raw inputs of examples [start, stop).
    count: number of examples.
    scale: the factor applied first (in float32, as the device applies it).
  """
  total = total_sq = None
  values = 0
  for start in range(0, count, chunk):
    part = (np.asarray(read(start, min(start + chunk, count))).astype(np.float32) * np.float32(scale))
    part = part.astype(np.float64)
    flat = part.reshape(-1, part.shape[-1]) if part.ndim > 1 else part.reshape(-1, 1)
    sums, sums_sq = flat.sum(axis=0), np.square(flat).sum(axis=0)
    total = sums if total is None else total + sums
    total_sq = sums_sq if total_sq is None else total_sq + sums_sq
    values += flat.shape[0]
  mean = total / values
  std = np.sqrt(np.maximum(total_sq / values - np.square(mean), 0.0))
  return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}


# -- example order ---------------------------------------------------------------------------------------

def _keys(seed: int):
  """(shuffle key, augmentation key) derived from the seed."""
  return tuple(jax.random.split(jax.random.key(seed), 2))


_FEISTEL_ROUNDS = 8


def _mix(x, key):
  """A 32-bit integer hash of x under key (lowbias32 finaliser); uint32 in, uint32 out (jnp or numpy)."""
  x = x ^ key
  x = x * x.dtype.type(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * x.dtype.type(0x846CA68B)
  return x ^ (x >> 16)


def _feistel_bits(num_examples: int) -> int:
  bits = max(2, math.ceil(math.log2(num_examples)) if num_examples > 1 else 2)
  bits += bits % 2
  if bits > 32:
    raise ValueError(f"num_examples: {num_examples} exceeds the 2^32 examples a shuffle can index")
  return bits


def _encrypt(x, round_keys, bits: int):
  half = bits // 2
  low = x.dtype.type((1 << half) - 1)
  left, right = x >> half, x & low
  for r in range(_FEISTEL_ROUNDS):
    left, right = right, left ^ (_mix(right, round_keys[r]) & low)
  return (left << half) | right


def shuffle_positions(positions, key, num_examples: int):
  """Where each position of a random permutation of range(num_examples) points; pure and jittable.

  A Feistel network over the smallest even number of bits covering num_examples is a bijection of
  [0, 2^bits); re-applying it to values >= num_examples ("cycle walking") restricts it to a bijection of
  [0, num_examples). A batch so costs O(batch) work instead of sorting the whole split every step, which
  is what `jax.random.permutation` would do inside a per-step batch_fn. `shuffle_positions_host` is the
  same permutation in numpy.

  Args:
    positions: int array of positions in [0, num_examples).
    key: PRNG key of the permutation (e.g. fold_in(shuffle_key, epoch)).
    num_examples: the permutation's size (static).

  Returns:
    uint32 array like positions: the example index at each position.
  """
  bits = _feistel_bits(num_examples)
  round_keys = jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)
  limit = jnp.uint32(num_examples)
  first = _encrypt(jnp.asarray(positions).astype(jnp.uint32), round_keys, bits)
  return jax.lax.while_loop(lambda x: jnp.any(x >= limit),
                            lambda x: jnp.where(x >= limit, _encrypt(x, round_keys, bits), x), first)


def shuffle_positions_host(positions, key, num_examples: int) -> np.ndarray:
  """`shuffle_positions` in numpy (the same permutation for the same key), for host-side readers."""
  return _feistel_host(positions, np.asarray(jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)), num_examples)


def _feistel_host(positions, round_keys: np.ndarray, num_examples: int) -> np.ndarray:
  bits = _feistel_bits(num_examples)
  x = _encrypt(np.asarray(positions).astype(np.uint32), round_keys, bits)
  limit = np.uint32(num_examples)
  while np.any(x >= limit):
    x = np.where(x >= limit, _encrypt(x, round_keys, bits), x)
  return x


# -- what both pipelines share -------------------------------------------------------------------------

class _Pipeline:
  """Configuration, example order and the on-device transform common to both pipelines."""

  def _setup(self, *, dtype, input_shape, num_examples: int, batch_size: int, seed, shuffle: bool,
             augment, normalize: str, stats, preprocessing, drop_remainder, stats_fn):
    self.seed = _check_seed(seed)
    self.shuffle = bool(shuffle)
    self.num_examples = int(num_examples)
    self.image_shape = tuple(int(d) for d in input_shape)
    self.drop_remainder = self.shuffle if drop_remainder is None else bool(drop_remainder)
    self.steps_per_epoch = _steps(self.num_examples, batch_size, self.drop_remainder)
    if preprocessing is not None:
      spec = check_preprocessing(preprocessing)
      if spec["input_shape"] != list(self.image_shape) or np.dtype(spec["input_dtype"]) != np.dtype(dtype):
        raise ValueError(f"preprocessing: made for {spec['input_dtype']} inputs {tuple(spec['input_shape'])}, "
                         f"these are {np.dtype(dtype).name} {self.image_shape}")
      self.normalize = spec["normalize"]
      config = _effective_augment(augment, "none")
      self.stats = {k: np.asarray(spec[k], np.float32) for k in ("mean", "std") if spec[k] is not None} or None
    else:
      self.normalize = resolve_normalize(normalize, dtype)
      config = _effective_augment(augment, self.normalize)
      if stats is not None:
        self.stats = _check_stats(stats, _stats_shape(self.image_shape))
      elif config.needs_stats:
        self.stats = stats_fn(_scale(self.normalize, dtype))
      else:
        self.stats = None
      spec = _make_spec(dtype, self.image_shape, self.normalize, config, self.stats)
    self.preprocessing = spec
    # What is left of the AugmentConfig once standardisation lives in the spec: the random transforms.
    self.augment = dataclasses.replace(config, featurewise_center=False, featurewise_std_normalization=False,
                                       samplewise_center=False, samplewise_std_normalization=False)
    self._augments = self.augment.is_geometric or self.augment.horizontal_flip or self.augment.vertical_flip
    if self._augments and len(self.image_shape) != 3:
      raise ValueError(f"augment: shifts, rotations, zooms and flips apply to image inputs (N, H, W, C); these "
                       f"inputs are (N, {', '.join(map(str, self.image_shape))})")
    if self._augments and not (_is_pixels(dtype) or np.issubdtype(np.dtype(dtype), np.floating)):
      raise ValueError(f"augment: applies to uint8 or float images, these are {np.dtype(dtype).name}")
    self._key_pair = None
    self._round_key_cache: tuple[int, object] | None = None
    self.position = (0, 0)

  @property
  def _shuffle_key(self):
    # Made on first use: building a pipeline touches no device (a multi-process job joins first).
    if self._key_pair is None:
      with jax.ensure_compile_time_eval():  # concrete even when first asked for inside a trace
        self._key_pair = _keys(self.seed)
    return self._key_pair[0]

  @property
  def _augment_key(self):
    self._shuffle_key  # noqa: B018  (creates the pair)
    return self._key_pair[1]

  def _round_keys(self, epoch: int) -> np.ndarray:
    """The Feistel round keys of `epoch`'s permutation (what `indices` derives inside jit), cached."""
    cached = self._round_key_cache
    if cached is None or cached[0] != epoch:
      with jax.ensure_compile_time_eval():
        key = jax.random.fold_in(self._shuffle_key, epoch)
        cached = (epoch, np.asarray(jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)))
      self._round_key_cache = cached
    return cached[1]

  def _host_positions(self, epoch: int, step: int, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
    """(example indices (stop-start,), mask float32) of rows [start, stop) of batch `step` of `epoch`."""
    positions = step * self.batch_size + np.arange(start, stop)
    mask = positions < self.num_examples
    positions = np.where(mask, positions, 0)
    if self.shuffle:
      positions = _feistel_host(positions, self._round_keys(epoch), self.num_examples)
    return positions.astype(np.int64), mask.astype(np.float32)

  def order(self, epoch: int) -> np.ndarray:
    """Global example order of `epoch` (int64 (N,)): the permutation of (seed, epoch), or 0..N-1."""
    positions = np.arange(self.num_examples)
    if not self.shuffle:
      return positions
    return _feistel_host(positions, self._round_keys(epoch), self.num_examples).astype(np.int64)

  def transform(self, batch: dict, epoch, step, offset=0) -> dict:
    """A raw batch (as `read` returns it) finished on device: scaled, augmented, standardised; pure.

    Args:
      batch: {"image": raw inputs, "label": targets, "mask"} of rows [offset, offset + b) of the global
        batch (all of it by default).
      epoch, step: the batch's position (int32 scalars): they key its random augmentation.
      offset: the first row's index in the global batch (int32 scalar; pmap devices hold slices).

    Returns:
      {"image": model inputs, "label": targets, "mask": float32}.
    """
    x = _scaled(self.preprocessing, batch["image"])
    if self._augments:
      rng = jax.random.fold_in(jax.random.fold_in(self._augment_key, epoch), step)
      height, width = self.image_shape[0], self.image_shape[1]
      # Drawn for the whole global batch, then sliced: a row gets the same transform on any layout.
      params = _augment.draw_params(rng, self.batch_size, height, width, self.augment)
      rows = x.shape[0]
      if rows != self.batch_size:
        params = jax.tree.map(lambda p: jax.lax.dynamic_slice_in_dim(p, offset, rows), params)
      x = _augment.apply_transforms(x, params, self.augment)
    x = _standardized(self.preprocessing, x)
    return {"image": x, "label": batch["label"], "mask": batch["mask"]}


# -- resident -----------------------------------------------------------------------------------------

class ResidentPipeline(_Pipeline):
  """In-memory arrays, gathered into batches inside jit (placed on device on first use).

  Attributes: batch_size, steps_per_epoch, num_examples, image_shape (one example's input shape),
  num_classes and class_names (classification targets; None and [] otherwise), stats ({"mean", "std"}
  float32 (C,) or None), preprocessing (the spec), normalize (the resolved mode), shuffle, resident
  (True), sharding, position ((epoch, next step) after the last batch `batches` yielded).
  """

  resident = True

  def __init__(self, images, labels, *, batch_size: int, seed: int, shuffle: bool = True,
               augment: _augment.AugmentConfig | None = None, normalize: str = "auto",
               stats: Mapping | None = None, sharding=None, class_names: Sequence[str] | None = None,
               num_classes: int | None = None, drop_remainder: bool | None = None,
               preprocessing: Mapping | None = None):
    images, labels = _check_arrays(images, labels)
    self.batch_size = _check_batch_size(batch_size)
    self.class_names, self.num_classes = _classes(labels, class_names, num_classes)
    self._setup(dtype=images.dtype, input_shape=images.shape[1:], num_examples=images.shape[0],
                batch_size=self.batch_size, seed=seed, shuffle=shuffle, augment=augment, normalize=normalize,
                stats=stats, preprocessing=preprocessing, drop_remainder=drop_remainder,
                stats_fn=lambda scale: feature_stats(lambda a, b: images[a:b], len(images), scale))
    self.sharding = sharding
    self._host = {"images": images, "labels": labels}
    self._device = None
    self._jitted = None

  def host_arrays(self) -> dict:
    """The arrays on the host: {"images": inputs (N, ...), "labels": targets (N, ...)}."""
    return self._host

  def device_arrays(self) -> dict:
    """The arrays on device, {"images", "labels"} (replicated over `sharding`'s mesh when given)."""
    if self._device is None:
      place = (jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec())
               if isinstance(self.sharding, jax.sharding.NamedSharding) else None)
      self._device = jax.device_put(self._host, place) if place is not None else jax.device_put(self._host)
    return self._device

  def indices(self, epoch, step, *, index_layout=None):
    """(example indices int32 (B,), mask float32 (B,)) of batch `step` of `epoch`; pure and jittable.
    `index_layout` (see `batch_fn`) lays out every value up to the shuffled indices."""
    layout = index_layout if index_layout is not None else (lambda x: x)
    epoch = jnp.asarray(epoch, jnp.int32)
    step = jnp.asarray(step, jnp.int32)
    positions = layout(step * self.batch_size + jnp.arange(self.batch_size, dtype=jnp.int32))
    mask = layout(positions < self.num_examples)
    positions = layout(jnp.where(mask, positions, 0))
    if self.shuffle:
      positions = shuffle_positions(positions, jax.random.fold_in(self._shuffle_key, epoch), self.num_examples)
    return layout(positions.astype(jnp.int32)), mask.astype(jnp.float32)

  def batch_fn(self, arrays, epoch, step, *, index_layout=None) -> dict:
    """Batch `step` of `epoch` from `device_arrays()`; pure and jittable (epoch, step int32 scalars).

    Args:
      arrays: `device_arrays()`.
      epoch, step: int32 scalars.
      index_layout: inside a partitioned program, a function laying out the batch's example indices
        (e.g. a replicated sharding constraint). The shuffle's cycle walk is a loop whose condition
        reads every index: left to the partitioner with the batch split over devices, the condition
        becomes a cross-device reduction inside a loop, which XLA:CPU's executor can run out of order
        with the program's other collectives and deadlock. Computed whole on every device, the loop
        needs no communication (a batch's indices are a few hundred integers).

    Returns:
      {"image": model inputs (B, ...), "label": targets (B, ...), "mask": float32 (B,)}.
    """
    index, mask = self.indices(epoch, step, index_layout=index_layout)
    raw = {"image": jnp.take(arrays["images"], index, axis=0), "label": jnp.take(arrays["labels"], index, axis=0),
           "mask": mask}
    return self.transform(raw, epoch, step)

  def read(self, epoch: int, step: int, start: int = 0, stop: int | None = None) -> dict:
    """Raw rows [start, stop) of batch `step` of `epoch`, on the host (numpy), for `transform`."""
    index, mask = self._host_positions(epoch, step, start, self.batch_size if stop is None else stop)
    return {"image": self._host["images"][index], "label": self._host["labels"][index], "mask": mask}

  def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """Yields batches start_step .. steps_per_epoch-1 of `epoch` (identical to `batch_fn`)."""
    _check_position(epoch, start_step, self.steps_per_epoch)
    if self._jitted is None:
      layout = None
      if isinstance(self.sharding, jax.sharding.NamedSharding):
        whole = jax.sharding.NamedSharding(self.sharding.mesh, jax.sharding.PartitionSpec())
        layout = functools.partial(jax.lax.with_sharding_constraint, shardings=whole)
      batch_fn = functools.partial(self.batch_fn, index_layout=layout)
      self._jitted = (jax.jit(batch_fn, out_shardings=self.sharding) if self.sharding is not None
                      else jax.jit(batch_fn))
    arrays = self.device_arrays()
    for step in range(start_step, self.steps_per_epoch):
      batch = self._jitted(arrays, np.int32(epoch), np.int32(step))
      self.position = (epoch, step + 1)
      yield batch


# -- streaming ----------------------------------------------------------------------------------------

class HostSource(Protocol):
  """Random-access examples on the host: len() and read(indices) -> (inputs (n, ...), targets (n, ...))."""

  def __len__(self) -> int:
    ...

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ...


class ArraySource:
  """A HostSource over in-memory numpy arrays (inputs (N, ...), targets (N, ...))."""

  def __init__(self, images, labels):
    self.images, self.labels = _check_arrays(images, labels)

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def read(self, indices):
    return self.images[indices], self.labels[indices]


class StreamingPipeline(_Pipeline):
  """A host pipeline over a HostSource: per-process rows, background reading, prefetch to device.

  Batch `step` of `epoch` holds positions [step*B, (step+1)*B) of the permutation of (seed, epoch) (the
  identity when shuffle is False); process p reads the contiguous rows [p*B/P, (p+1)*B/P) of every
  batch, which its devices hold in a batch-sharded global array, so the processes read disjoint data
  that together is the batch.

  Attributes: as ResidentPipeline (resident False), plus process_index, process_count, local_batch_size.
  """

  resident = False

  def __init__(self, source: HostSource, *, image_shape, batch_size: int, seed: int, shuffle: bool = True,
               augment: _augment.AugmentConfig | None = None, normalize: str = "auto",
               stats: Mapping | None = None, sharding=None, class_names: Sequence[str] | None = None,
               num_classes: int | None = None, drop_remainder: bool | None = None,
               process_index: int | None = None, process_count: int | None = None,
               stats_source: HostSource | None = None, preprocessing: Mapping | None = None):
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index: expected 0 <= index < process_count ({self.process_count}), "
                       f"got {self.process_index}")
    self.source = source
    self.batch_size = _check_batch_size(batch_size, self.process_count)
    self.local_batch_size = self.batch_size // self.process_count
    if len(source) == 0:
      raise ValueError("source: the dataset is empty (N = 0)")
    held = getattr(source, "images", None)
    # The inputs' dtype decides the preprocessing: from the source's arrays, else one example read.
    dtype = np.asarray(held).dtype if held is not None else np.asarray(source.read(np.zeros(1, np.int64))[0]).dtype
    labels = getattr(source, "labels", None)
    if labels is None and class_names is None and num_classes is None:
      raise ValueError("class_names / num_classes: one is required for a source without in-memory labels")
    self.class_names, self.num_classes = _classes(None if labels is None else np.asarray(labels), class_names,
                                                  num_classes)
    stats_from = stats_source or source
    self._setup(dtype=dtype, input_shape=image_shape, num_examples=len(source),
                batch_size=self.batch_size, seed=seed, shuffle=shuffle, augment=augment, normalize=normalize,
                stats=stats, preprocessing=preprocessing, drop_remainder=drop_remainder,
                stats_fn=lambda scale: _stats_of_source(stats_from, scale))
    self.sharding = sharding
    self._finish = None

  def local_rows(self) -> tuple[int, int]:
    """The rows [start, stop) of every global batch this process reads."""
    start = self.process_index * self.local_batch_size
    return start, start + self.local_batch_size

  def local_indices(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(example indices (B/P,), mask float32 (B/P,)) this process reads for batch `step` of `epoch`."""
    return self._host_positions(epoch, step, *self.local_rows())

  def read(self, epoch: int, step: int, start: int | None = None, stop: int | None = None) -> dict:
    """Raw rows [start, stop) (default: this process's rows) of batch `step` of `epoch`, on the host."""
    if start is None:
      start, stop = self.local_rows()
    index, mask = self._host_positions(epoch, step, start, stop)
    images, labels = self.source.read(index)
    images, labels = np.asarray(images), np.asarray(labels)
    if images.shape[1:] != self.image_shape:
      raise DataError(f"source: example shape {images.shape[1:]} differs from the pipeline's {self.image_shape}")
    if np.issubdtype(labels.dtype, np.integer):
      labels = labels.astype(np.int32)
    elif np.issubdtype(labels.dtype, np.floating):
      labels = labels.astype(np.float32)
    return {"image": images, "label": labels, "mask": mask}

  def _to_global(self, local: np.ndarray):
    if self.sharding is None:
      return jax.device_put(local)
    return jax.make_array_from_process_local_data(self.sharding, local)

  def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """Yields batches start_step .. steps_per_epoch-1 of `epoch`, read ahead by a background thread.

    An error in the reading thread is raised here, in the consumer.
    """
    _check_position(epoch, start_step, self.steps_per_epoch)
    if self._finish is None:
      finish = lambda batch, epoch, step: self.transform(batch, epoch, step)  # noqa: E731
      self._finish = (jax.jit(finish, out_shardings=self.sharding) if self.sharding is not None
                      else jax.jit(finish))
    for step, host in prefetch(lambda s: self.read(epoch, s), range(start_step, self.steps_per_epoch)):
      batch = self._finish(jax.tree.map(self._to_global, host), np.int32(epoch), np.int32(step))
      self.position = (epoch, step + 1)
      yield batch


_DONE = object()


def prefetch(read: Callable[[int], object], steps, size: int = _PREFETCH):
  """Yields (step, read(step)) for each of `steps`, with reads running in a thread at most `size` ahead.

  An error raised by `read` is raised here, in the consumer; closing the generator stops the thread.
  """
  slots: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        slots.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def work():
    try:
      for step in steps:
        if stop.is_set() or not put((step, read(step))):
          return
      put(_DONE)
    except BaseException as err:  # handed to the consumer, which re-raises it
      put(err)

  thread = threading.Thread(target=work, name="jaxcnn-data-prefetch", daemon=True)
  thread.start()
  try:
    while True:
      item = slots.get()
      if item is _DONE:
        return
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
    thread.join(timeout=10)


_prefetch = prefetch


def _stats_of_source(source: HostSource, scale: float, chunk: int = 1024) -> dict:
  """Per-channel mean/std over every example of a HostSource, read in chunks."""
  return feature_stats(lambda a, b: source.read(np.arange(a, b))[0], len(source), scale, chunk)


def from_arrays(images, labels, *, batch_size: int, seed: int, shuffle: bool = True,
                augment: _augment.AugmentConfig | None = None, normalize: str = "auto",
                sharding=None, class_names: Sequence[str] | None = None, stats: Mapping | None = None,
                num_classes: int | None = None, drop_remainder: bool | None = None,
                preprocessing: Mapping | None = None) -> ResidentPipeline:
  """A device-resident InputPipeline over in-memory arrays.

  Args:
    images: the inputs, one example per row: uint8 pixels (N, H, W, C) or (N, H, W), or float/integer
      arrays of any rank the model takes ((N, H, W, C), (N, L, C), (N, F)); floats are never reshaped.
    labels: the targets: integer class ids (N,), float one-hot or soft labels (N, K), or float arrays
      shaped like the model's outputs.
    batch_size: global batch size.
    seed: shuffling and augmentation seed; batches are a pure function of (seed, epoch, step).
    shuffle: shuffle each epoch and drop the remainder (training); False covers every example in
      ceil(N/B) steps with a padded, masked last batch (eval). Default True.
    augment: AugmentConfig applied on device (image inputs (N, H, W, C) only), or None. Default None.
    normalize: "auto" (default: "featurewise" for uint8 pixels, "none" for other inputs),
      "featurewise" (per-channel mean/std of these inputs after scaling uint8 by 1/255, or of `stats`),
      "scale" (x/255), or "none" (as float32, unscaled).
    sharding: NamedSharding for the batch (batch axis sharded) or None (default device).
    class_names: names of the classes; default "0".."K-1" for class-id or one-hot targets.
    stats: {"mean", "std"} (C,) from another pipeline (e.g. the training one); default computed here.
    num_classes: number of classes when class_names is not given. Default max label + 1.
    drop_remainder: override whether the last partial batch is dropped; default = shuffle.
    preprocessing: a preprocessing spec to apply instead of `normalize`/`stats` (e.g. the training
      pipeline's `.preprocessing`, for its validation data).
  """
  return ResidentPipeline(images, labels, batch_size=batch_size, seed=seed, shuffle=shuffle, augment=augment,
                          normalize=normalize, stats=stats, sharding=sharding, class_names=class_names,
                          num_classes=num_classes, drop_remainder=drop_remainder, preprocessing=preprocessing)
