"""Dataset resolution (offline first) and the `load_arrays` / `make_pipeline` entry points.

What is known about a dataset by name is its spec (`jaxcnn.data.specs`): files, format, shapes, classes,
folders, tfds catalog name. A named dataset is resolved in this order; the first that works wins and the
choice is logged:
  (a) an explicit raw-files directory: `data_dir`, else env JAXCNN_DATA_DIR (the dataset's folder itself,
      or a parent holding one of the spec's folders: `mnist/`, `fashion_mnist/` or `fashion-mnist/`,
      `cifar10/`, ...);
  (b) well-known system locations (/usr/share/datasets/<folder>, where Debian installs
      `dataset-fashion-mnist`);
  (c) the dataset already prepared in the tfds data dir (`tfds_data_dir`, env JAXCNN_TFDS_DIR, or tfds'
      default);
  (d) the tfds catalog download (when `download` is True and the spec names a catalog dataset).
Raw files become the project's own tfds dataset (`jaxcnn.data.builder`), prepared once and reused. Raw
files that are present but invalid raise a DataError naming the file rather than falling through, so a
damaged copy is never silently replaced by another source. When nothing resolves, one DataError says
where each step looked (a failed or impossible download included: network unreachable, a module the
catalog needs missing) and which files to put where; nothing is written in that case.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import math
import os
import pathlib
import shutil
import socket
import urllib.parse
from typing import Mapping

import numpy as np

from jaxcnn.data import augment as _augment
from jaxcnn.data import pipeline as _pipeline
from jaxcnn.data import specs as _specs
from jaxcnn.errors import DataError

logger = logging.getLogger("jaxcnn.data")

SYSTEM_DIRS = (pathlib.Path("/usr/share/datasets"),)
DATA_DIR_ENV = "JAXCNN_DATA_DIR"
TFDS_DIR_ENV = "JAXCNN_TFDS_DIR"
SPLITS = ("train", "validation", "test")
# Modules tfds' catalog builders need to prepare an image dataset, and the package that installs each:
# tfds imports importlib_resources for every catalog builder (it declares it for Python < 3.9 only), and
# encodes the images (and reads the CIFAR files) with TensorFlow.
CATALOG_MODULES = {"importlib_resources": "importlib_resources", "tensorflow": "tensorflow-cpu"}
# Seconds to wait for a catalog download host to answer before calling the network unreachable (tfds
# itself retries a refused connection for minutes).
PROBE_TIMEOUT = 5.0
# The validation slice is fixed by this seed, not the run's, so it never overlaps training data across runs.
_VALIDATION_SEED = 0


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
    spec: the dataset's `DatasetSpec` (None for image folders).
  """

  name: str
  source: str
  path: pathlib.Path
  builder: object = None
  prepared_now: bool = False
  spec: _specs.DatasetSpec | None = None

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
  """A registered dataset's canonical name for any of its spellings ("fashion-mnist" -> "fashion_mnist");
  other names lower-cased with "-" read as "_"."""
  return _specs.spec_for(name).name


def _is_folder_name(name: str) -> bool:
  return os.sep in name or name.startswith(".") or (_specs.get(name) is None and pathlib.Path(name).is_dir())


def _tfds_dir(tfds_data_dir) -> str | None:
  value = tfds_data_dir if tfds_data_dir is not None else os.environ.get(TFDS_DIR_ENV)
  return str(value) if value else None


def _explicit_dir(data_dir):
  return data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)


def _raw_candidates(spec: _specs.DatasetSpec, data_dir) -> list[tuple[str, pathlib.Path]]:
  """(source, directory) pairs to look in, in order: the explicit dir (itself, then subfolders), system dirs."""
  explicit = _explicit_dir(data_dir)
  candidates = []
  if explicit:
    base = pathlib.Path(explicit).expanduser().absolute()
    candidates.append(("raw", base))
    candidates += [("raw", base / folder) for folder in spec.folders]
  for system in SYSTEM_DIRS:
    candidates += [("system", system / folder) for folder in spec.folders]
  return candidates


def _prepare_raw(spec: _specs.DatasetSpec, raw_dir: pathlib.Path, files, tfds_dir):
  """(builder, prepared_now): the content-named builder, prepared from the validated files if needed."""
  from jaxcnn.data import builder as _builder  # tfds is imported only when a dataset is resolved

  shape = spec.format.image_shape(spec, files)
  config = _builder.make_config(spec.name, spec.format.name, raw_dir, files, shape, spec.class_names)
  make = functools.partial(_builder.make_builder, config, tfds_dir)
  builder, prepared = _builder.open_prepared(make)
  # The config is named by content digest: a prepared dataset of identical content needs no re-validation.
  if prepared:
    return builder, False
  # Reads both splits fully, raising the DataError that names a bad file before anything is written
  # (the lock file below included).
  spec.format.validate(spec, raw_dir)
  with _builder.preparing_lock(builder):
    # Another process may have prepared it while this one validated or waited for the lock.
    builder, prepared = _builder.open_prepared(make)
    if prepared:
      return builder, False
    logger.info("%s: preparing from %s (%s) into %s", spec.name, raw_dir, spec.format.description,
                builder.data_dir)
    return builder, _builder.prepare(builder)


def _hide_accelerators_from_tf():
  """Keeps TensorFlow (needed by the catalog builders) off GPUs/TPUs, which JAX owns."""
  try:
    import tensorflow as tf  # noqa: PLC0415  (only on the catalog path)
  except ImportError:
    return
  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):  # already initialised, or no such device type: nothing to hide
      pass


def _missing_catalog_modules() -> list[str]:
  """The packages to install for the tfds catalog to prepare a dataset, of those in CATALOG_MODULES."""
  return [package for module, package in CATALOG_MODULES.items() if importlib.util.find_spec(module) is None]


def _unreachable(urls) -> str | None:
  """"<host>:<port> (<reason>)" of the first download host (or its proxy) that does not accept a
  connection within PROBE_TIMEOUT seconds, else None."""
  import requests  # noqa: PLC0415  (what tfds downloads with; its proxy settings are the ones that apply)

  probed = set()
  for url in urls:
    proxy = requests.utils.select_proxy(url, requests.utils.get_environ_proxies(url))
    target = urllib.parse.urlsplit(proxy if proxy else url)
    if not target.hostname:
      continue
    address = (target.hostname, target.port or (443 if target.scheme == "https" else 80))
    if address in probed:
      continue
    probed.add(address)
    try:
      socket.create_connection(address, timeout=PROBE_TIMEOUT).close()
    except OSError as err:
      reason = err.strerror or str(err) or type(err).__name__
      return f"{address[0]}:{address[1]}{' (a proxy)' if proxy else ''} ({reason})"
  return None


def _downloads_with_tfds(builder) -> bool:
  """Whether `builder.download_and_prepare` is tfds' own, which imports CATALOG_MODULES and fetches the
  builder's URLs; a replaced one (tfds.testing.mock_data's no-op, a stand-in) may need neither."""
  method = getattr(type(builder), "download_and_prepare", None)
  return getattr(method, "__module__", None) == "tensorflow_datasets.core.dataset_builder"


def _catalog(spec: _specs.DatasetSpec, tfds_dir, download: bool, looked: list) -> Resolved | None:
  import tensorflow_datasets as tfds  # noqa: PLC0415

  from jaxcnn.data import builder as _builder  # noqa: PLC0415

  shown_dir = tfds_dir or "tfds' default data dir"
  try:
    builder, prepared = _builder.open_prepared(functools.partial(tfds.builder, spec.catalog, data_dir=tfds_dir))
  except Exception as err:  # unknown to the catalog, or its code failed to load
    looked.append(f"tfds catalog: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return None
  if prepared:
    return Resolved(spec.name, "tfds", pathlib.Path(str(builder.data_dir)), builder, spec=spec)
  looked.append(f"tfds data dir {shown_dir}: not prepared")
  if not download:
    looked.append("tfds download: disabled (download=False)")
    return None
  if _downloads_with_tfds(builder):  # checked before tfds' own download code, which needs and does both
    missing = _missing_catalog_modules()
    if missing:
      looked.append(f"tfds download: not possible, the catalog's {spec.catalog} needs {', '.join(missing)} "
                    f"(pip install {' '.join(missing)})")
      return None
    unreachable = _unreachable(builder.url_infos or {})
    if unreachable:
      looked.append(f"tfds download: failed (cannot reach {unreachable}: network unreachable or blocked)")
      return None
  root = pathlib.Path(str(builder.data_dir_root))
  created = [p for p in (root / builder.name, root / "downloads") if not p.exists()]
  _hide_accelerators_from_tf()
  logger.info("%s: downloading and preparing the tfds catalog's %s into %s", spec.name, spec.catalog,
              builder.data_dir)
  try:
    with _builder.progress_bars():
      # A prepared array_record dataset is read without TensorFlow; GCS holds tfrecord copies only.
      builder.download_and_prepare(file_format="array_record",
                                   download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except Exception as err:  # offline, blocked, or a failed checksum: reported, and its leftovers removed
    for path in created:
      shutil.rmtree(path, ignore_errors=True)
    message = str(err).splitlines()[0] if str(err) else ""
    looked.append(f"tfds download: failed ({type(err).__name__}: {message[:200]})")
    return None
  return Resolved(spec.name, "download", pathlib.Path(str(builder.data_dir)), builder, prepared_now=True,
                  spec=spec)


def resolve(name: str, *, data_dir=None, tfds_data_dir=None, download: bool = True) -> Resolved:
  """Finds a dataset: raw dir, then system dirs, then the prepared tfds dir, then a tfds download.

  Args:
    name: a registered dataset's name or alias ("mnist", "fashion_mnist" or "fashion-mnist", "cifar10":
      `jaxcnn.data.specs.names()`), another IDX dataset's name (raw dirs only), or an image folder's path.
    data_dir: raw-files directory (the dataset's folder or a parent of it); default env JAXCNN_DATA_DIR.
    tfds_data_dir: where tfds datasets are prepared; default env JAXCNN_TFDS_DIR, else tfds' default.
    download: allow step (d), the tfds catalog download. Default True.

  Returns:
    A Resolved (source, path, builder, spec, ...).

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
  spec = _specs.spec_for(name)
  tfds_dir = _tfds_dir(tfds_data_dir)
  looked = []
  candidates = _raw_candidates(spec, data_dir)
  for source, directory in candidates:
    found = spec.format.find(spec, directory) if directory.is_dir() else "absent"
    if isinstance(found, str):
      looked.append(f"{directory}: {found}")
      continue
    raw_dir, files = found
    builder, prepared_now = _prepare_raw(spec, raw_dir, files, tfds_dir)
    logger.info("%s: resolved from %s dir %s (prepared tfds at %s%s)", spec.name,
                "raw" if source == "raw" else "system", raw_dir, builder.data_dir,
                ", prepared now" if prepared_now else "")
    return Resolved(spec.name, source, raw_dir, builder, prepared_now, spec=spec)
  if not any(source == "raw" for source, _ in candidates):
    looked.insert(0, f"raw dir: none given (data_dir=None, ${DATA_DIR_ENV} unset)")
  if spec.catalog:
    resolved = _catalog(spec, tfds_dir, download, looked)
    if resolved is not None:
      logger.info("%s: resolved from tfds %s at %s", spec.name,
                  "download" if resolved.source == "download" else "data dir", resolved.path)
      return resolved
  else:
    looked.append("tfds catalog: not a catalog dataset")
  explicit = _explicit_dir(data_dir)
  if explicit:
    where = f"{pathlib.Path(explicit).expanduser().absolute() / spec.missing_folder}/"
  else:
    where = f"<dir>/{spec.missing_folder}/ and pass data_dir=<dir> (or set {DATA_DIR_ENV}=<dir>)"
  raise DataError(f"{spec.name}: dataset not found; looked in {'; '.join(looked)}. Put {spec.expected_files} "
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
