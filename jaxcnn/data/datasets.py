"""Dataset resolution (offline first) and the `load_arrays` / `make_pipeline` entry points.

A named dataset is resolved in this order; the first that works wins and the choice is logged:
  (a) an explicit raw-files directory: `data_dir`, else env JAXCNN_DATA_DIR (the dataset's folder itself,
      or a parent holding `mnist/`, `fashion_mnist/` or `fashion-mnist/`, `cifar10/`);
  (b) well-known system locations (/usr/share/datasets/<name>, where Debian installs
      `dataset-fashion-mnist`);
  (c) the dataset already prepared in the tfds data dir (`tfds_data_dir`, env JAXCNN_TFDS_DIR, or tfds'
      default);
  (d) the tfds catalog download (when `download` is True).
Raw files become the project's own tfds dataset (`jaxcnn.data.builder`), prepared once and reused. Raw
files that are present but invalid raise a DataError naming the file rather than falling through, so a
damaged copy is never silently replaced by another source. When nothing resolves, one DataError says
where each step looked and which files to put where; nothing is written in that case.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import shutil
import sys
from typing import Mapping

import numpy as np

from jaxcnn.data import augment as _augment
from jaxcnn.data import idx
from jaxcnn.data import pipeline as _pipeline
from jaxcnn.errors import DataError

logger = logging.getLogger("jaxcnn.data")

SYSTEM_DIRS = (pathlib.Path("/usr/share/datasets"),)
DATA_DIR_ENV = "JAXCNN_DATA_DIR"
TFDS_DIR_ENV = "JAXCNN_TFDS_DIR"
CATALOG = ("mnist", "fashion_mnist", "cifar10")
SPLITS = ("train", "validation", "test")
# The validation slice is fixed by this seed, not the run's, so it never overlaps training data across runs.
_VALIDATION_SEED = 0
_CIFAR10_FOLDERS = ("cifar10", "cifar-10", "cifar-10-batches-bin")


@dataclasses.dataclass
class Resolved:
  """Where a dataset was found.

  Attributes:
    name: the canonical dataset name (or the image folder's path).
    source: "raw" (data_dir / JAXCNN_DATA_DIR), "system", "tfds" (already prepared), "download"
      (tfds catalog), or "image_folder".
    path: the raw directory, image folder, or prepared tfds directory.
    builder: the tfds builder to read from (None for image folders).
    prepared_now: True when this call prepared the tfds dataset.
  """

  name: str
  source: str
  path: pathlib.Path
  builder: object = None
  prepared_now: bool = False

  def read(self, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W, C), labels int32 (N,)) of a stored split ("train" or "test")."""
    return _read_builder(self.builder, split)

  @property
  def class_names(self) -> list[str]:
    features = self.builder.info.features
    if "label" in features and hasattr(features["label"], "names"):
      return list(features["label"].names)
    return list(self.builder.info.metadata["class_names"])


def canonical_name(name: str) -> str:
  """"fashion-mnist" -> "fashion_mnist"; other names unchanged (lower-cased)."""
  return name.strip().lower().replace("-", "_")


def _is_folder_name(name: str) -> bool:
  return os.sep in name or name.startswith(".") or (canonical_name(name) not in CATALOG and pathlib.Path(name).is_dir())


def _folder_names(name: str) -> tuple[str, ...]:
  if name in idx.KNOWN_IDX:
    return idx.KNOWN_IDX[name].folder_names
  if name == "cifar10":
    return _CIFAR10_FOLDERS
  return tuple(dict.fromkeys((name, name.replace("_", "-"))))


def _tfds_dir(tfds_data_dir) -> str | None:
  value = tfds_data_dir if tfds_data_dir is not None else os.environ.get(TFDS_DIR_ENV)
  return str(value) if value else None


def _expected_files(name: str) -> str:
  if name == "cifar10":
    return "data_batch_1.bin ... data_batch_5.bin and test_batch.bin (CIFAR-10 binary version)"
  return ", ".join(f"{n}.gz" for names in idx.IDX_FILES.values() for n in names)


def _raw_candidates(name: str, data_dir) -> list[tuple[str, pathlib.Path]]:
  """(source, directory) pairs to look in, in order: the explicit dir (itself, then subfolders), system dirs."""
  explicit = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
  candidates = []
  if explicit:
    base = pathlib.Path(explicit).expanduser().absolute()
    candidates.append(("raw", base))
    candidates += [("raw", base / folder) for folder in _folder_names(name)]
  for system in SYSTEM_DIRS:
    candidates += [("system", system / folder) for folder in _folder_names(name)]
  return candidates


def _find_raw(name: str, directory: pathlib.Path):
  """(kind, raw dir, files) when `directory` holds the dataset's raw files, else (None, reason)."""
  if not directory.is_dir():
    return None, "absent"
  if name == "cifar10":
    found = idx.find_cifar10_bin(directory)
    if found is None:
      return None, "no CIFAR-10 binary batches"
    files = [found / n for names in idx.CIFAR10_BIN_FILES.values() for n in names]
    return ("cifar10_bin", found, files), None
  files = idx.find_idx_files(directory)
  if files is None:
    missing = idx.missing_idx_files(directory)
    if len(missing) == 4:
      return None, "no IDX files"
    return None, f"missing {', '.join(missing)}"
  return ("idx", directory, list(files.values())), None


def _raw_layout(name: str, kind: str, files) -> tuple[tuple, tuple]:
  """(image_shape, class_names) of a raw dataset, from the IDX header alone (cheap)."""
  if kind == "cifar10_bin":
    return (32, 32, 3), idx.CIFAR10_CLASSES
  images_file = next(f for f in files if f.name.startswith("train-images"))
  known = idx.KNOWN_IDX.get(name)
  class_names = known.class_names if known else tuple(str(i) for i in range(10))
  return (*idx.read_image_hw(images_file), 1), class_names


def _validate_raw(name: str, kind: str, raw_dir: pathlib.Path, files):
  """Reads both splits fully, raising the DataError that names a bad file before anything is written."""
  by_name = {(f.name[:-3] if f.suffix == ".gz" else f.name): f for f in files}
  shapes = {}
  for split in ("train", "test"):
    if kind == "cifar10_bin":
      idx.read_cifar10_split(raw_dir, split)
    else:
      shapes[split] = idx.read_idx_split(by_name, split, name)[0].shape[1:]
  if kind != "cifar10_bin" and shapes["train"] != shapes["test"]:
    # One prepared dataset holds one image shape; a test file of another size is the wrong file.
    test_file, train_file = by_name[idx.IDX_FILES["test"][0]], by_name[idx.IDX_FILES["train"][0]]
    raise DataError(f"{test_file}: images are {shapes['test'][0]}x{shapes['test'][1]} but {train_file.name} "
                    f"holds {shapes['train'][0]}x{shapes['train'][1]} images")


def _prepare_raw(name: str, kind: str, raw_dir: pathlib.Path, files, tfds_dir):
  """(builder, prepared_now): the content-named builder, prepared from the validated files if needed."""
  from jaxcnn.data import builder as _builder  # tfds is imported only when a dataset is resolved

  shape, class_names = _raw_layout(name, kind, files)
  builder = _builder.make_builder(_builder.make_config(name, kind, raw_dir, files, shape, class_names),
                                  tfds_dir)
  # The config is named by content digest: a prepared dataset of identical content needs no re-validation.
  if builder.is_prepared():
    return builder, False
  _validate_raw(name, kind, raw_dir, files)
  return builder, _builder.prepare(builder)


def _hide_accelerators_from_tf():
  """Keeps TensorFlow (needed by some catalog builders) off GPUs/TPUs, which JAX owns."""
  try:
    import tensorflow as tf  # noqa: PLC0415  (only on the catalog path)
  except ImportError:
    return
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # already initialised, or no such device type: nothing to hide
      pass


def _catalog(name: str, tfds_dir, download: bool, looked: list) -> Resolved | None:
  import tensorflow_datasets as tfds  # noqa: PLC0415

  shown_dir = tfds_dir or "tfds' default data dir"
  try:
    builder = tfds.builder(name, data_dir=tfds_dir)
  except Exception as err:  # unknown to the catalog, or its code failed to load
    looked.append(f"tfds catalog: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return None
  if builder.is_prepared():
    return Resolved(name, "tfds", pathlib.Path(str(builder.data_dir)), builder)
  looked.append(f"tfds data dir {shown_dir}: not prepared")
  if not download:
    looked.append("tfds download: disabled (download=False)")
    return None
  root = pathlib.Path(str(builder.data_dir_root))
  created = [p for p in (root / builder.name, root / "downloads") if not p.exists()]
  _hide_accelerators_from_tf()
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception as err:  # offline, blocked, or a failed checksum: reported, and its leftovers removed
    for path in created:
      shutil.rmtree(path, ignore_errors=True)
    message = str(err).splitlines()[0] if str(err) else ""
    looked.append(f"tfds download: failed ({type(err).__name__}: {message[:200]})")
    return None
  return Resolved(name, "download", pathlib.Path(str(builder.data_dir)), builder, prepared_now=True)


def resolve(name: str, *, data_dir=None, tfds_data_dir=None, download: bool = True) -> Resolved:
  """Finds a dataset: raw dir, then system dirs, then the prepared tfds dir, then a tfds download.

  Args:
    name: "mnist", "fashion_mnist" (or "fashion-mnist"), "cifar10", another IDX dataset's name (raw
      dirs only), or an image folder's path.
    data_dir: raw-files directory (the dataset's folder or a parent of it); default env JAXCNN_DATA_DIR.
    tfds_data_dir: where tfds datasets are prepared; default env JAXCNN_TFDS_DIR, else tfds' default.
    download: allow step (d), the tfds catalog download. Default True.

  Returns:
    A Resolved (source, path, builder, ...).

  Raises:
    DataError: raw files present but invalid (names the file), or nothing resolved (says where it
      looked and the exact files to put where).
  """
  if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
    raise ValueError(f"name: expected a dataset name or an image folder path, got {name!r}")
  name = str(name)
  if _is_folder_name(name):
    path = pathlib.Path(name).expanduser()
    if not path.is_dir():
      raise DataError(f"{path}: image folder not found (expected <folder>/<split>/<class>/<image files>)")
    logger.info("%s: resolved as an image folder", path)
    return Resolved(str(path), "image_folder", path)
  name = canonical_name(name)
  tfds_dir = _tfds_dir(tfds_data_dir)
  looked = []
  for source, directory in _raw_candidates(name, data_dir):
    found, reason = _find_raw(name, directory)
    if found is None:
      looked.append(f"{directory}: {reason}")
      continue
    kind, raw_dir, files = found
    builder, prepared_now = _prepare_raw(name, kind, raw_dir, files, tfds_dir)
    logger.info("%s: resolved from %s dir %s (prepared tfds at %s%s)", name,
                "raw" if source == "raw" else "system", raw_dir, builder.data_dir,
                ", prepared now" if prepared_now else "")
    return Resolved(name, source, raw_dir, builder, prepared_now)
  if not any(source == "raw" for source, _ in _raw_candidates(name, data_dir)):
    looked.insert(0, f"raw dir: none given (data_dir=None, ${DATA_DIR_ENV} unset)")
  if name in CATALOG:
    resolved = _catalog(name, tfds_dir, download, looked)
    if resolved is not None:
      logger.info("%s: resolved from tfds %s at %s", name,
                  "download" if resolved.source == "download" else "data dir", resolved.path)
      return resolved
  else:
    looked.append("tfds catalog: not a catalog dataset")
  explicit = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
  folder = _folder_names(name)[0] if name != "cifar10" else "cifar10/cifar-10-batches-bin"
  if explicit:
    where = f"{pathlib.Path(explicit).expanduser().absolute() / folder}/"
  else:
    where = f"<dir>/{folder}/ and pass data_dir=<dir> (or set {DATA_DIR_ENV}=<dir>)"
  raise DataError(f"{name}: dataset not found; looked in {'; '.join(looked)}. Put {_expected_files(name)} "
                  f"in {where}")


def _read_builder(builder, split: str) -> tuple[np.ndarray, np.ndarray]:
  from jaxcnn.data import builder as _builder  # noqa: PLC0415

  from tensorflow_datasets.core import file_adapters  # noqa: PLC0415

  if builder.info.file_format == file_adapters.FileFormat.ARRAY_RECORD:
    return _builder.read_split(builder, split)
  # A catalog dataset prepared as tfrecord can only be read through TensorFlow.
  import tensorflow_datasets as tfds  # noqa: PLC0415

  _hide_accelerators_from_tf()
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return np.asarray(data["image"], np.uint8), np.asarray(data["label"], np.int32)


def _validation_order(count: int) -> np.ndarray:
  return np.random.default_rng(_VALIDATION_SEED).permutation(count)


def split_validation(count: int, validation_split: float) -> tuple[np.ndarray, np.ndarray]:
  """(train indices, validation indices) of a training split of `count` examples, both sorted.

  The validation slice is the last ceil(validation_split * count) entries of a fixed permutation (so
  it is class-balanced even when files are stored class by class) and does not depend on the run seed.
  """
  if not isinstance(validation_split, (int, float)) or isinstance(validation_split, bool) or \
      not 0 <= validation_split < 1:
    raise ValueError(f"validation_split: expected a fraction in [0, 1), got {validation_split!r}")
  held = math.ceil(validation_split * count)
  order = _validation_order(count)
  return np.sort(order[:count - held]), np.sort(order[count - held:])


def _check_split(split: str, validation_split: float) -> str:
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
  if split == "validation" and not validation_split:
    raise ValueError("split: 'validation' needs validation_split > 0 (a held-out slice of train)")
  return split


def _resize(images: np.ndarray, image_size) -> np.ndarray:
  from PIL import Image  # noqa: PLC0415

  from jaxcnn.data.folder import _check_size  # noqa: PLC0415

  height, width = _check_size(image_size)
  if images.shape[1:3] == (height, width):
    return images
  out = np.empty((images.shape[0], height, width, images.shape[3]), np.uint8)
  for i, image in enumerate(images):
    plane = image[..., 0] if image.shape[-1] == 1 else image
    resized = np.asarray(Image.fromarray(plane).resize((width, height), Image.Resampling.BILINEAR))
    out[i] = resized.reshape(height, width, images.shape[3])
  return out


def load_arrays(name: str, split: str, *, data_dir=None, tfds_data_dir=None, download: bool = True,
                validation_split: float = 0.0, image_size=None) -> tuple[np.ndarray, np.ndarray]:
  """One split of a named dataset as host arrays.

  Args:
    name: see `resolve`.
    split: "train" (minus the validation slice when validation_split > 0), "validation", or "test".
    data_dir, tfds_data_dir, download: see `resolve`.
    validation_split: fraction of train held out as "validation". Default 0.0.
    image_size: (height, width) to resize to; default the dataset's own size (64x64 for image folders).

  Returns:
    (images uint8 (N, H, W, C), labels int32 (N,)).
  """
  images, labels, _ = _load(name, split, data_dir=data_dir, tfds_data_dir=tfds_data_dir, download=download,
                            validation_split=validation_split, image_size=image_size)
  return images, labels


def _folder_root(path: pathlib.Path, split: str) -> pathlib.Path:
  stored = "train" if split == "validation" else split
  if (path / stored).is_dir():
    return path / stored
  if stored == "train":
    return path
  raise DataError(f"{path / stored}: no '{stored}' folder (expected {path}/{stored}/<class>/<image files>)")


def _open_folder(resolved: Resolved, split: str, image_size, keep_decoded):
  """(ImageFolder of the stored split, class names of train)."""
  from jaxcnn.data import folder as _folder  # noqa: PLC0415

  size = (64, 64) if image_size is None else image_size
  stored = "train" if split == "validation" else split
  class_names = None
  if stored != "train":
    train_root = _folder_root(resolved.path, "train")
    class_names = sorted(p.name for p in train_root.iterdir() if p.is_dir() and not p.name.startswith("."))
  return _folder.image_folder(_folder_root(resolved.path, split), image_size=size, class_names=class_names,
                              keep_decoded=keep_decoded)


def _load(name, split, *, data_dir, tfds_data_dir, download, validation_split, image_size):
  """(images, labels, class_names) of a split (train minus validation, validation, or test)."""
  _check_split(split, validation_split)
  resolved = resolve(name, data_dir=data_dir, tfds_data_dir=tfds_data_dir, download=download)
  stored = "train" if split == "validation" else split
  if resolved.source == "image_folder":
    folder = _open_folder(resolved, split, image_size, keep_decoded=True)
    images, labels, class_names = folder.images, folder.labels, folder.class_names
  else:
    images, labels = resolved.read(stored)
    class_names = resolved.class_names
    if image_size is not None:
      images = _resize(images, image_size)
  if stored == "train" and validation_split:
    keep, held = split_validation(images.shape[0], validation_split)
    chosen = held if split == "validation" else keep
    images, labels = images[chosen], labels[chosen]
  return images, labels, class_names


class _Subset:
  """A HostSource restricted to some indices of another."""

  def __init__(self, source, indices):
    self.source = source
    self.indices = np.asarray(indices)
    self.labels = source.labels[self.indices]

  def __len__(self):
    return len(self.indices)

  def read(self, indices):
    return self.source.read(self.indices[np.asarray(indices)])


def make_pipeline(name: str, split: str, *, batch_size: int, seed: int, data_dir=None,
                  validation_split: float = 0.0, augment: _augment.AugmentConfig | None = None,
                  normalize: str = "featurewise", shuffle: bool | None = None, resident="auto",
                  image_size=None, process_index: int | None = None, process_count: int | None = None,
                  sharding=None, stats: Mapping | None = None, tfds_data_dir=None,
                  download: bool = True):
  """An InputPipeline over a split of a named dataset or an image folder.

  Args:
    name: "mnist", "fashion_mnist", "cifar10", another IDX dataset's name, or an image folder's path.
    split: "train", "validation" (held-out slice of train; needs validation_split > 0), or "test".
    batch_size: global batch size.
    seed: batches are a pure function of (seed, epoch, step).
    data_dir: raw-files directory (see `resolve`); default env JAXCNN_DATA_DIR.
    validation_split: fraction of train held out as "validation". Default 0.0.
    augment: AugmentConfig applied on device (typically for "train" only). Default None.
    normalize: "featurewise" (per-channel mean/std of the training portion, excluding the validation
      slice), "scale" (x/255) or "none". Default "featurewise".
    shuffle: shuffle and drop the remainder; default True for "train", False otherwise (every example,
      last batch padded and masked).
    resident: True (device-resident), False (streaming host pipeline) or "auto" (resident when the
      decoded split fits in 1 GiB: MNIST, Fashion-MNIST, CIFAR-10 and small image folders). Default "auto".
    image_size: (height, width) to resize to; default the dataset's size, (64, 64) for image folders.
    process_index, process_count: this process's shard for streaming; default jax's.
    sharding: NamedSharding for the global batch (batch axis sharded), or None.
    stats: {"mean", "std"} from another pipeline of the run (`pipeline.stats`); default computed from
      the training portion.
    tfds_data_dir: where tfds datasets are prepared (see `resolve`).
    download: allow the tfds catalog download. Default True.

  Returns:
    A ResidentPipeline or StreamingPipeline; `.stats` holds the normalisation statistics used and, for
    image folders, `.skipped` the files that could not be decoded.
  """
  from jaxcnn.data import folder as _folder  # noqa: PLC0415

  _check_split(split, validation_split)
  if resident not in (True, False, "auto"):
    raise ValueError(f"resident: expected True, False or 'auto', got {resident!r}")
  _pipeline._check_normalize(normalize)
  shuffle = split == "train" if shuffle is None else bool(shuffle)
  config = _pipeline._effective_augment(augment, normalize)
  scale = _pipeline._scale(normalize)
  common = dict(batch_size=batch_size, seed=seed, shuffle=shuffle, augment=augment, normalize=normalize,
                sharding=sharding)
  resolved = resolve(name, data_dir=data_dir, tfds_data_dir=tfds_data_dir, download=download)
  stored = "train" if split == "validation" else split

  if resolved.source == "image_folder":
    folder = _open_folder(resolved, split, image_size, keep_decoded=resident)
    source = folder
    if stored == "train" and validation_split:
      keep, held = split_validation(len(folder), validation_split)
      source = _Subset(folder, held if split == "validation" else keep)
    if stats is None and config.needs_stats:
      train_source = source
      if split != "train":
        train_folder = folder if stored == "train" else _open_folder(resolved, "train", image_size, False)
        train_source = (_Subset(train_folder, split_validation(len(train_folder), validation_split)[0])
                        if validation_split else train_folder)
      stats = _pipeline._stats_of_source(train_source, scale)
    if folder.images is not None:
      images, labels = source.read(np.arange(len(source)))
      result = _pipeline.ResidentPipeline(images, labels, class_names=folder.class_names, stats=stats, **common)
    else:
      result = _pipeline.StreamingPipeline(source, image_shape=folder.image_shape,
                                           class_names=folder.class_names, stats=stats,
                                           process_index=process_index, process_count=process_count, **common)
    result.skipped = list(folder.skipped)
    return result

  images, labels, class_names = _load(name, split, data_dir=data_dir, tfds_data_dir=tfds_data_dir,
                                      download=download, validation_split=validation_split,
                                      image_size=image_size)
  if stats is None and config.needs_stats:
    train_images = images if split == "train" else _load(
        name, "train", data_dir=data_dir, tfds_data_dir=tfds_data_dir, download=download,
        validation_split=validation_split, image_size=image_size)[0]
    stats = _pipeline._stats_of_source(_pipeline.ArraySource(train_images, np.zeros(len(train_images), int)),
                                       scale)
  if resident == "auto":
    resident = images.nbytes <= _folder.RESIDENT_BYTES
  if resident:
    result = _pipeline.ResidentPipeline(images, labels, class_names=class_names, stats=stats, **common)
  else:
    result = _pipeline.StreamingPipeline(_pipeline.ArraySource(images, labels), image_shape=images.shape[1:],
                                         class_names=class_names, stats=stats, process_index=process_index,
                                         process_count=process_count, **common)
  result.skipped = []
  return result
