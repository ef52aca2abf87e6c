"""Input pipelines: global batches of {"image", "label", "mask"} as a pure function of (seed, epoch, step).

Two implementations share one interface (`InputPipeline`):
- `ResidentPipeline`: the split lives on device as uint8; shuffling, batching, normalisation and
  augmentation run inside jit (`batch_fn` is pure, so a whole epoch can be one `lax.scan`).
- `StreamingPipeline`: a host thread reads this process's shard of each global batch (numpy, bounded
  prefetch) and the batch is assembled into a global array; normalisation and augmentation then run on
  device with the same jitted transform, so both paths give the same values for the same examples.

Shuffled (training) pipelines drop the remainder; unshuffled (eval) pipelines cover every example in
ceil(N/B) steps, the last batch padded with example 0 and `mask` 0 there.
"""
from __future__ import annotations

import dataclasses
import math
import queue
import threading
from typing import Callable, Iterator, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.data import augment as _augment
from jaxcnn.errors import DataError

NORMALIZE_MODES = ("featurewise", "scale", "none")
_PREFETCH = 2


class InputPipeline(Protocol):
  """What the training engine consumes (see docs/DESIGN.md, "Data")."""

  batch_size: int
  steps_per_epoch: int
  num_examples: int
  image_shape: tuple[int, int, int]
  num_classes: int
  class_names: list[str]
  stats: dict | None
  resident: bool

  def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    ...


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


def _effective_augment(augment, normalize: str) -> _augment.AugmentConfig:
  """The augment config with normalize="featurewise" folded in as featurewise center + std."""
  if augment is not None and not isinstance(augment, _augment.AugmentConfig):
    raise ValueError(f"augment: expected an AugmentConfig or None, got {type(augment).__name__}")
  config = augment if augment is not None else _augment.AugmentConfig()
  if normalize == "featurewise":
    config = dataclasses.replace(config, featurewise_center=True, featurewise_std_normalization=True)
  return config


def _scale(normalize: str) -> float:
  """Pixel scale applied before augmentation: "none" keeps 0..255, the others map to 0..1."""
  return 1.0 if normalize == "none" else 1.0 / 255.0


def _check_stats(stats, channels: int) -> dict:
  try:
    mean = np.asarray(stats["mean"], np.float32)
    std = np.asarray(stats["std"], np.float32)
  except (KeyError, TypeError) as err:
    raise ValueError(f"stats: expected a mapping with 'mean' and 'std', got {stats!r}") from err
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(f"stats: expected 'mean' and 'std' of shape ({channels},), got {mean.shape} and {std.shape}")
  return {"mean": mean, "std": std}


def make_transform(config: _augment.AugmentConfig, normalize: str) -> Callable:
  """(rng, uint8 batch, stats) -> float32 batch: scale, augment, standardise (pure, jittable)."""
  scale = _scale(normalize)

  def transform(rng, images_u8, stats):
    images = images_u8.astype(jnp.float32) * scale
    return _augment.augment_batch(rng, images, config, stats)

  return transform


def _keys(seed: int):
  """(shuffle key, augmentation key) derived from the seed."""
  return tuple(jax.random.split(jax.random.key(seed), 2))


_FEISTEL_ROUNDS = 8


def _mix(x, key):
  """A 32-bit integer hash of x under key (lowbias32 finaliser); uint32 in, uint32 out."""
  x = x ^ key
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def shuffle_positions(positions, key, num_examples: int):
  """Where each position of a random permutation of range(num_examples) points; pure and jittable.

  A Feistel network over the smallest even number of bits covering num_examples is a bijection of
  [0, 2^bits); re-applying it to values >= num_examples ("cycle walking") restricts it to a bijection of
  [0, num_examples). A batch so costs O(batch) work instead of sorting the whole split every step, which
  is what `jax.random.permutation` would do inside a per-step batch_fn.

  Args:
    positions: int array of positions in [0, num_examples).
    key: PRNG key of the permutation (e.g. fold_in(shuffle_key, epoch)).
    num_examples: the permutation's size (static).

  Returns:
    uint32 array like positions: the example index at each position.
  """
  bits = max(2, math.ceil(math.log2(num_examples)) if num_examples > 1 else 2)
  bits += bits % 2
  if bits > 32:
    raise ValueError(f"num_examples: {num_examples} exceeds the 2^32 examples a shuffle can index")
  half = bits // 2
  low = jnp.uint32((1 << half) - 1)
  round_keys = jax.random.bits(key, (_FEISTEL_ROUNDS,), jnp.uint32)

  def encrypt(x):
    left, right = x >> half, x & low
    for r in range(_FEISTEL_ROUNDS):
      left, right = right, left ^ (_mix(right, round_keys[r]) & low)
    return (left << half) | right

  limit = jnp.uint32(num_examples)
  first = encrypt(jnp.asarray(positions).astype(jnp.uint32))
  return jax.lax.while_loop(lambda x: jnp.any(x >= limit), lambda x: jnp.where(x >= limit, encrypt(x), x), first)


def _check_arrays(images, labels) -> tuple[np.ndarray, np.ndarray]:
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.dtype != np.uint8:
    raise ValueError(f"images: expected uint8 pixels 0..255, got dtype {images.dtype}")
  if images.ndim == 3:
    images = images[..., None]
  if images.ndim != 4:
    raise ValueError(f"images: expected shape (N, H, W, C) or (N, H, W), got {images.shape}")
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(f"labels: expected shape ({images.shape[0]},) to match images, got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels: expected integer class ids, got dtype {labels.dtype}")
  if images.shape[0] == 0:
    raise ValueError("images: the dataset is empty (N = 0)")
  if labels.min() < 0:
    raise ValueError(f"labels: class ids must be >= 0, got {labels.min()}")
  return images, labels.astype(np.int32)


def _steps(num_examples: int, batch_size: int, drop_remainder: bool) -> int:
  if drop_remainder:
    if num_examples < batch_size:
      raise ValueError(f"batch_size: {batch_size} exceeds the {num_examples} examples of a training "
                       "pipeline (which drops the remainder, leaving no batch)")
    return num_examples // batch_size
  return math.ceil(num_examples / batch_size)


class ResidentPipeline:
  """A split held on device as uint8; batches are computed inside jit.

  Attributes: batch_size, steps_per_epoch, num_examples, image_shape (H, W, C), num_classes,
  class_names, stats ({"mean", "std"} float32 (C,) or None), shuffle, resident (True), sharding,
  position ((epoch, next step) after the last batch `batches` yielded).
  """

  resident = True

  def __init__(self, images, labels, *, batch_size: int, seed: int, shuffle: bool = True,
               augment: _augment.AugmentConfig | None = None, normalize: str = "featurewise",
               stats: Mapping | None = None, sharding=None, class_names: Sequence[str] | None = None,
               num_classes: int | None = None, drop_remainder: bool | None = None):
    images, labels = _check_arrays(images, labels)
    self.batch_size = _check_batch_size(batch_size)
    self.seed = _check_seed(seed)
    self.shuffle = bool(shuffle)
    self.normalize = _check_normalize(normalize)
    self.augment = _effective_augment(augment, self.normalize)
    self.num_examples = int(images.shape[0])
    self.image_shape = tuple(int(d) for d in images.shape[1:])
    self.class_names, self.num_classes = _classes(labels, class_names, num_classes)
    self.drop_remainder = self.shuffle if drop_remainder is None else bool(drop_remainder)
    self.steps_per_epoch = _steps(self.num_examples, self.batch_size, self.drop_remainder)
    self.sharding = sharding
    if stats is not None:
      self.stats = _check_stats(stats, self.image_shape[-1])
    elif self.augment.needs_stats:
      self.stats = _augment.compute_stats(images.astype(np.float32) * _scale(self.normalize))
    else:
      self.stats = None
    self._transform = make_transform(self.augment, self.normalize)
    self._shuffle_key, self._augment_key = _keys(self.seed)
    # Replicated over the batch sharding's mesh, so every device can gather any example.
    place = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
             if isinstance(sharding, jax.sharding.NamedSharding) else None)
    arrays = {"images": images, "labels": labels}
    if self.stats is not None:
      arrays["stats"] = self.stats
    self._arrays = jax.device_put(arrays, place) if place is not None else jax.device_put(arrays)
    self._jitted = (jax.jit(self.batch_fn, out_shardings=sharding) if sharding is not None
                    else jax.jit(self.batch_fn))
    self.position = (0, 0)

  def device_arrays(self) -> dict:
    """The device-resident pytree: {"images": uint8 (N,H,W,C), "labels": int32 (N,), "stats"?: {...}}."""
    return self._arrays

  def indices(self, epoch, step):
    """(example indices int32 (B,), mask float32 (B,)) of batch `step` of `epoch`; pure and jittable."""
    epoch = jnp.asarray(epoch, jnp.int32)
    step = jnp.asarray(step, jnp.int32)
    positions = step * self.batch_size + jnp.arange(self.batch_size, dtype=jnp.int32)
    mask = positions < self.num_examples
    positions = jnp.where(mask, positions, 0)
    if self.shuffle:
      positions = shuffle_positions(positions, jax.random.fold_in(self._shuffle_key, epoch), self.num_examples)
    return positions.astype(jnp.int32), mask.astype(jnp.float32)

  def batch_fn(self, arrays, epoch, step) -> dict:
    """Batch `step` of `epoch` from `device_arrays()`; pure and jittable (epoch, step int32 scalars).

    Returns:
      {"image": float32 (B, H, W, C), "label": int32 (B,), "mask": float32 (B,)}.
    """
    index, mask = self.indices(epoch, step)
    images = jnp.take(arrays["images"], index, axis=0)
    labels = jnp.take(arrays["labels"], index, axis=0)
    rng = jax.random.fold_in(jax.random.fold_in(self._augment_key, epoch), step)
    image = self._transform(rng, images, arrays.get("stats"))
    return {"image": image, "label": labels, "mask": mask}

  def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """Yields batches start_step .. steps_per_epoch-1 of `epoch` (identical to `batch_fn`)."""
    _check_position(epoch, start_step, self.steps_per_epoch)
    for step in range(start_step, self.steps_per_epoch):
      batch = self._jitted(self._arrays, np.int32(epoch), np.int32(step))
      self.position = (epoch, step + 1)
      yield batch


def _check_position(epoch, start_step, steps_per_epoch: int):
  if not isinstance(epoch, (int, np.integer)) or epoch < 0:
    raise ValueError(f"epoch: expected an int >= 0, got {epoch!r}")
  if not isinstance(start_step, (int, np.integer)) or not 0 <= start_step <= steps_per_epoch:
    raise ValueError(f"start_step: expected an int in [0, {steps_per_epoch}], got {start_step!r}")


def _classes(labels: np.ndarray | None, class_names, num_classes) -> tuple[list[str], int]:
  """(class_names, num_classes) from explicit values or the labels' range."""
  if class_names is not None:
    class_names = [str(c) for c in class_names]
    if num_classes is not None and num_classes != len(class_names):
      raise ValueError(f"num_classes: {num_classes} disagrees with {len(class_names)} class_names")
    num_classes = len(class_names)
  elif num_classes is None:
    num_classes = int(labels.max()) + 1
  if labels is not None and labels.size and labels.max() >= num_classes:
    raise ValueError(f"labels: class id {int(labels.max())} out of range for {num_classes} classes")
  if class_names is None:
    class_names = [str(i) for i in range(num_classes)]
  return class_names, int(num_classes)


class HostSource(Protocol):
  """Random-access examples on the host: len() and read(indices) -> (uint8 (n,H,W,C), int32 (n,))."""

  def __len__(self) -> int:
    ...

  def read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ...


class ArraySource:
  """A HostSource over in-memory numpy arrays (uint8 images (N,H,W,C), int labels (N,))."""

  def __init__(self, images, labels):
    self.images, self.labels = _check_arrays(images, labels)

  def __len__(self) -> int:
    return int(self.images.shape[0])

  def read(self, indices):
    return self.images[indices], self.labels[indices]


class StreamingPipeline:
  """A host pipeline over a HostSource: per-process shards, background reading, prefetch to device.

  Batch `step` of `epoch` holds positions [step*B, (step+1)*B) of a permutation drawn from
  (seed, epoch) (the identity when shuffle is False); this process reads the positions p with
  p % process_count == process_index, so processes read disjoint data that together is the batch.

  Attributes: as ResidentPipeline (resident False), plus process_index, process_count, local_batch_size.
  """

  resident = False

  def __init__(self, source: HostSource, *, image_shape, batch_size: int, seed: int, shuffle: bool = True,
               augment: _augment.AugmentConfig | None = None, normalize: str = "featurewise",
               stats: Mapping | None = None, sharding=None, class_names: Sequence[str] | None = None,
               num_classes: int | None = None, drop_remainder: bool | None = None,
               process_index: int | None = None, process_count: int | None = None,
               stats_source: HostSource | None = None):
    self.process_index = jax.process_index() if process_index is None else int(process_index)
    self.process_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= self.process_index < self.process_count:
      raise ValueError(f"process_index: expected 0 <= index < process_count ({self.process_count}), "
                       f"got {self.process_index}")
    self.source = source
    self.batch_size = _check_batch_size(batch_size, self.process_count)
    self.local_batch_size = self.batch_size // self.process_count
    self.seed = _check_seed(seed)
    self.shuffle = bool(shuffle)
    self.normalize = _check_normalize(normalize)
    self.augment = _effective_augment(augment, self.normalize)
    self.num_examples = len(source)
    if self.num_examples == 0:
      raise ValueError("source: the dataset is empty (N = 0)")
    self.image_shape = tuple(int(d) for d in image_shape)
    labels = getattr(source, "labels", None)
    if labels is None and class_names is None and num_classes is None:
      raise ValueError("class_names / num_classes: one is required for a source without in-memory labels")
    self.class_names, self.num_classes = _classes(labels, class_names, num_classes)
    self.drop_remainder = self.shuffle if drop_remainder is None else bool(drop_remainder)
    self.steps_per_epoch = _steps(self.num_examples, self.batch_size, self.drop_remainder)
    self.sharding = sharding
    if stats is not None:
      self.stats = _check_stats(stats, self.image_shape[-1])
    elif self.augment.needs_stats:
      self.stats = _stats_of_source(stats_source or source, _scale(self.normalize))
    else:
      self.stats = None
    self._stats_device = jax.device_put(self.stats) if self.stats is not None else None
    self._augment_key = _keys(self.seed)[1]
    transform = make_transform(self.augment, self.normalize)

    def finish(images_u8, labels, mask, epoch, step):
      rng = jax.random.fold_in(jax.random.fold_in(self._augment_key, epoch), step)
      return {"image": transform(rng, images_u8, self._stats_device), "label": labels, "mask": mask}

    self._finish = jax.jit(finish, out_shardings=sharding) if sharding is not None else jax.jit(finish)
    self._order_cache = None
    self.position = (0, 0)

  def order(self, epoch: int) -> np.ndarray:
    """Global example order of `epoch` (int64 (N,)): a permutation from (seed, epoch), or 0..N-1."""
    if not self.shuffle:
      return np.arange(self.num_examples)
    # Kept for the epoch being read: every step of an epoch needs the same permutation.
    cached = self._order_cache
    if cached is None or cached[0] != epoch:
      cached = (epoch, np.random.default_rng([self.seed, int(epoch)]).permutation(self.num_examples))
      self._order_cache = cached
    return cached[1]

  def local_indices(self, epoch: int, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(example indices (B/P,), mask float32 (B/P,)) this process reads for batch `step` of `epoch`."""
    order = self.order(epoch)
    positions = step * self.batch_size + np.arange(self.batch_size)
    positions = positions[positions % self.process_count == self.process_index]
    mask = positions < self.num_examples
    index = np.where(mask, order[np.where(mask, positions, 0)], order[0])
    return index, mask.astype(np.float32)

  def _read(self, epoch: int, step: int) -> tuple[np.ndarray, ...]:
    index, mask = self.local_indices(epoch, step)
    images, labels = self.source.read(index)
    if images.shape[1:] != self.image_shape:
      raise DataError(f"source: example shape {images.shape[1:]} differs from the pipeline's {self.image_shape}")
    return images, labels.astype(np.int32), mask

  def _to_global(self, local: np.ndarray):
    if self.sharding is None:
      return jax.device_put(local)
    return jax.make_array_from_process_local_data(self.sharding, local)

  def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict]:
    """Yields batches start_step .. steps_per_epoch-1 of `epoch`, read ahead by a background thread.

    An error in the reading thread is raised here, in the consumer.
    """
    _check_position(epoch, start_step, self.steps_per_epoch)
    for step, host in _prefetch(lambda s: self._read(epoch, s), range(start_step, self.steps_per_epoch)):
      images, labels, mask = (self._to_global(a) for a in host)
      batch = self._finish(images, labels, mask, np.int32(epoch), np.int32(step))
      self.position = (epoch, step + 1)
      yield batch


_DONE = object()


def _prefetch(read: Callable[[int], object], steps: range, size: int = _PREFETCH):
  """Yields (step, read(step)) with reads running in a thread at most `size` batches ahead."""
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


def _stats_of_source(source: HostSource, scale: float, chunk: int = 1024) -> dict:
  """Per-channel mean/std over every example of a HostSource, read in chunks."""
  total = None
  count = 0
  for start in range(0, len(source), chunk):
    images, _ = source.read(np.arange(start, min(start + chunk, len(source))))
    part = images.astype(np.float64) * scale
    sums = np.stack([part.sum(axis=(0, 1, 2)), np.square(part).sum(axis=(0, 1, 2))])
    total = sums if total is None else total + sums
    count += part.shape[0] * part.shape[1] * part.shape[2]
  mean = total[0] / count
  std = np.sqrt(np.maximum(total[1] / count - np.square(mean), 0.0))
  return {"mean": mean.astype(np.float32), "std": std.astype(np.float32)}


def from_arrays(images, labels, *, batch_size: int, seed: int, shuffle: bool = True,
                augment: _augment.AugmentConfig | None = None, normalize: str = "featurewise",
                sharding=None, class_names: Sequence[str] | None = None, stats: Mapping | None = None,
                num_classes: int | None = None, drop_remainder: bool | None = None) -> ResidentPipeline:
  """A device-resident InputPipeline over in-memory arrays.

  Args:
    images: uint8 (N, H, W, C) or (N, H, W) pixels 0..255.
    labels: integer class ids (N,).
    batch_size: global batch size.
    seed: shuffling and augmentation seed; batches are a pure function of (seed, epoch, step).
    shuffle: shuffle each epoch and drop the remainder (training); False covers every example in
      ceil(N/B) steps with a padded, masked last batch (eval). Default True.
    augment: AugmentConfig applied on device, or None. Default None.
    normalize: "featurewise" (per-channel mean/std of these images, or of `stats`), "scale" (x/255),
      or "none" (raw 0..255 as float32). Default "featurewise".
    sharding: NamedSharding for the batch (batch axis sharded) or None (default device).
    class_names: names of the classes; default "0".."K-1" with K = max label + 1 (or num_classes).
    stats: {"mean", "std"} (C,) from another pipeline (e.g. the training one); default computed here.
    num_classes: number of classes when class_names is not given. Default max label + 1.
    drop_remainder: override whether the last partial batch is dropped; default = shuffle.
  """
  return ResidentPipeline(images, labels, batch_size=batch_size, seed=seed, shuffle=shuffle, augment=augment,
                          normalize=normalize, stats=stats, sharding=sharding, class_names=class_names,
                          num_classes=num_classes, drop_remainder=drop_remainder)
