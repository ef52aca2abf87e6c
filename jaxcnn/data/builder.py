"""The project's own tfds builder: raw files (IDX or CIFAR binary) -> a prepared array_record dataset.

tfds' catalog builders check the SHA-256 of the *compressed* downloads, which re-packaged copies fail;
this builder reads raw files that the dataset's format (`jaxcnn.data.idx`) has validated by content
instead. Features are `tfds.features.Tensor`s and the file format is array_record, so preparing and
reading need no TensorFlow. One builder config per (dataset, raw content digest): a changed raw
directory gets a new config, hence a fresh preparation, rather than silently reusing stale data. tfds
writes into a temporary directory and renames it when done, so a half-prepared dataset is never taken as
prepared. Several processes resolving the same raw directory at once (two runs started together on a
fresh machine, the workers of a test session) prepare it once: the first takes an exclusive lock on
`<config dir>.lock` beside the dataset (`preparing_lock`), the others wait for it and then find it
prepared. Preparing local files downloads nothing, so tfds' "Downloading and preparing dataset" lines
are left out (the data layer logs one line saying what it prepares from where), and tfds' progress bars
are shown only on a terminal (`progress_bars`).
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import fcntl
import io
import logging
import os
import pathlib
import sys

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from jaxcnn.data import idx, specs
from jaxcnn.storage import NO_LOCKING

SPLITS = ("train", "test")
_DIGEST_CHARS = 16
logger = logging.getLogger("jaxcnn.data")


@dataclasses.dataclass(eq=False)
class RawConfig(tfds.core.BuilderConfig):
  """A builder config for one raw dataset directory.

  Attributes:
    dataset: the dataset's name (a registered spec's, or another IDX dataset's: `specs.spec_for`).
    kind: the name of the spec's raw format ("idx" or "cifar_binary", `idx.FORMATS`).
    raw_dir: the directory holding the raw files.
    image_shape: (H, W, C) of the images.
    class_names: the class names, in label order.
  """

  dataset: str = ""
  kind: str = "idx"
  raw_dir: str = ""
  image_shape: tuple = (28, 28, 1)
  class_names: tuple = ()


def make_config(dataset: str, kind: str, raw_dir: pathlib.Path, files, image_shape, class_names) -> RawConfig:
  """The RawConfig for `dataset` read from `files` in `raw_dir`; its name carries the content digest."""
  digest = idx.digest_files(files)
  return RawConfig(
      name=f"{dataset}_{digest[:_DIGEST_CHARS]}", version="1.1.0",
      description=f"{dataset} prepared from raw {kind} files in {raw_dir} (content sha256 {digest})",
      dataset=dataset, kind=kind, raw_dir=str(raw_dir), image_shape=tuple(image_shape),
      class_names=tuple(class_names))


class JaxcnnRaw(tfds.core.GeneratorBasedBuilder):
  """A dataset's validated raw files (IDX, CIFAR binary) as a tfds dataset (array_record)."""

  VERSION = tfds.core.Version("1.1.0")
  # tfds locates a builder's source through importlib_resources, which is not installed everywhere;
  # this builder's code path is simply this file (it ships no checksums file: nothing is downloaded).
  code_path = epath.Path(__file__)
  RELEASE_NOTES = {
      "1.0.0": "Raw IDX / CIFAR binary files validated by decompressed content.",
      "1.1.0": "Images stored as raw bytes.",
  }

  def _info(self) -> tfds.core.DatasetInfo:
    config = self.builder_config
    info = self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            # Stored as one bytes value (not tfds' default of one int64 per pixel): 8x smaller on disk
            # and read back with a single np.frombuffer.
            "image": tfds.features.Tensor(shape=tuple(config.image_shape), dtype=np.uint8,
                                          encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.Tensor(shape=(), dtype=np.int64),
        }),
        supervised_keys=("image", "label"),
        # Keep the raw files' order, so split i is example i of the raw split (and validation slices agree).
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(class_names=list(config.class_names), raw_dir=config.raw_dir),
    )
    # These datasets are built from the user's raw files, never fetched from tfds' GCS bucket: the bucket
    # lookup tfds makes for every builder of an unprepared directory is skipped (with GCS disabled it found
    # nothing and left an empty tmp*tfds directory in the system temp dir at every preparation).
    info.initialize_from_bucket = lambda: None
    return info

  def is_prepared(self) -> bool:
    """Whether the dataset is prepared, without tfds' warning that a folder not prepared yet "has no
    dataset_info.json" (the data layer asks before every preparation)."""
    return is_prepared(self)

  def _log_download_bytes(self) -> None:
    """Nothing is downloaded: `jaxcnn.data.resolve` logs what it prepares from where instead."""

  def _log_download_done(self) -> None:
    """See `_log_download_bytes`."""

  def _split_generators(self, dl_manager):
    del dl_manager  # the raw files are local; nothing is downloaded
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    images, labels = read_raw_split(self.builder_config, split)
    for i in range(images.shape[0]):
      yield i, {"image": images[i], "label": np.int64(labels[i])}


def read_raw_split(config: RawConfig, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (N, H, W, C), labels int32 (N,)) of one split straight from the validated raw files."""
  if config.kind not in idx.FORMATS:
    raise ValueError(f"kind: unknown raw format {config.kind!r} (known: {sorted(idx.FORMATS)})")
  return idx.FORMATS[config.kind].read_split(specs.spec_for(config.dataset), pathlib.Path(config.raw_dir), split)


def is_prepared(builder) -> bool:
  """tfds' test of a prepared dataset (its dataset_info.json and features.json), without its warning."""
  return all((builder.data_path / name).is_file() for name in ("dataset_info.json", "features.json"))


def open_prepared(make):
  """(builder, prepared): the builder `make()` returns, and whether its dataset is prepared.

  A builder reads its dataset's info once, when it is made: one made just before another process finished
  preparing the same dataset describes an unprepared one (no splits) although the files are now there.
  Such a builder is made again, so a prepared dataset always comes with a builder that can read it.
  """
  builder = make()
  if not is_prepared(builder):
    return builder, False
  if not builder.info.splits:
    builder = make()
  return builder, True


@contextlib.contextmanager
def progress_bars(enabled: bool | None = None):
  """tfds' progress bars on (True) or off (False) inside the block, restored after it; default on only
  when stderr (where tqdm draws) is a terminal, so logs and pipes get no bar redraws or escape codes."""
  from tensorflow_datasets.core.utils import tqdm_utils  # noqa: PLC0415

  if enabled is None:
    enabled = _is_terminal(sys.stderr)
  before = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(enabled)
  try:
    yield
  finally:
    tfds.display_progress_bar(before)


def _is_terminal(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):  # replaced or closed streams
    return False


# Set while this builder is made or prepares a dataset (see _OwnConfigNotice).
_OWN_WORK = contextvars.ContextVar("jaxcnn_raw_own_work", default=False)


class _OwnConfigNotice(logging.Filter):
  """Drops tfds' notices about this builder's own work.

  Every RawConfig is made at run time (one per raw content digest), so tfds would print the whole config
  as a "Using custom data configuration" warning on every load; and while this builder is made or
  prepares local files, tfds' INFO lines ("Load dataset info", "Generating dataset", "Done writing" each
  shard) are its internals. The data
  layer logs which source it resolved and what it prepared instead. Warnings and errors always pass.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    if (_OWN_WORK.get() and record.levelno < logging.WARNING
        and f"{os.sep}tensorflow_datasets{os.sep}" in record.pathname):
      return False
    return not (str(record.msg).startswith("Using custom data configuration")
                and record.args and isinstance(record.args[0], RawConfig))


_NOTICE_FILTER = _OwnConfigNotice()


def make_builder(config: RawConfig, data_dir) -> JaxcnnRaw:
  """The builder for `config`, under tfds data dir `data_dir` (None: tfds' default)."""
  absl_logger = logging.getLogger("absl")
  if _NOTICE_FILTER not in absl_logger.filters:
    absl_logger.addFilter(_NOTICE_FILTER)
  token = _OWN_WORK.set(True)
  try:
    return JaxcnnRaw(config=config, data_dir=None if data_dir is None else str(data_dir))
  finally:
    _OWN_WORK.reset(token)


@contextlib.contextmanager
def preparing_lock(builder: JaxcnnRaw):
  """Holds an exclusive flock on `<config dir>.lock` (the dataset's config folder, plus `.lock`).

  Waits while another process holds it (it is preparing the same content), saying so once. The lock dies
  with its process, so a killed preparation never blocks the next; tfds' temporary directory keeps its
  half-written output from being taken as prepared. On a filesystem that cannot lock, a warning says the
  preparation is unprotected and it goes ahead.
  """
  config_dir = pathlib.Path(str(builder.data_dir)).parent
  path = config_dir.with_name(config_dir.name + ".lock")
  path.parent.mkdir(parents=True, exist_ok=True)
  fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      logger.info("%s: another process is preparing this dataset; waiting for it (lock file %s)",
                  builder.builder_config.dataset, path)
      fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
      if err.errno not in NO_LOCKING:
        raise
      logger.warning("%s: this filesystem cannot lock files (%s); preparing without protection against "
                     "another process preparing the same dataset at once", path, os.strerror(err.errno))
    yield
  finally:
    os.close(fd)  # releases the lock


def prepare(builder: JaxcnnRaw) -> bool:
  """Prepares the dataset unless already prepared; True when it was prepared now."""
  if builder.is_prepared():
    return False
  token = _OWN_WORK.set(True)
  try:
    with progress_bars():
      builder.download_and_prepare(file_format="array_record",
                                   download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  finally:
    _OWN_WORK.reset(token)
  return True


def read_split(builder, split: str, *, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """Reads a prepared array_record split as numpy (no TensorFlow): (images uint8 NHWC, labels int32).

  The records are the tf.train.Example protos tfds wrote; they are parsed here directly, several times
  faster than tfds' generic per-example decoding. This builder's images are raw bytes (each record's size
  is checked against the feature's shape); a catalog builder's are PNG/JPEG files, decoded with PIL.
  """
  from tensorflow_datasets.proto import tf_example_pb2  # noqa: PLC0415  (tfds' own copy; no TensorFlow)

  source = builder.as_data_source(split=split)
  count = len(source)
  feature = builder.info.features["image"]
  shape = tuple(feature.shape)
  encoded = isinstance(feature, tfds.features.Image)
  if encoded and None in shape:
    raise ValueError(f"{builder.data_dir}: images of varying size {shape} cannot be read as one array")
  size = int(np.prod(shape))
  images = np.empty((count, size), np.uint8)
  labels = np.empty((count,), np.int32)
  parse = tf_example_pb2.Example.FromString
  for start in range(0, count, chunk):
    stop = min(start + chunk, count)
    records = source.data_source.__getitems__(list(range(start, stop)))
    for offset, record in enumerate(records):
      features = parse(record).features.feature
      pixels = features["image"].bytes_list.value[0]
      if encoded:
        pixels = _decode_image(pixels, shape, f"{builder.data_dir}: record {start + offset} of split {split!r}")
      elif len(pixels) != size:
        raise ValueError(f"{builder.data_dir}: record {start + offset} of split {split!r} holds "
                         f"{len(pixels)} image bytes, expected {size} for shape {shape}")
      images[start + offset] = np.frombuffer(pixels, np.uint8)
      labels[start + offset] = features["label"].int64_list.value[0]
  return images.reshape(count, *shape), labels


def _decode_image(content: bytes, shape: tuple, where: str) -> bytes:
  """The pixels of an encoded image as bytes of `shape` (H, W, C)."""
  from PIL import Image  # noqa: PLC0415

  with Image.open(io.BytesIO(content)) as image:
    array = np.asarray(image, np.uint8)
  if array.size != int(np.prod(shape)):
    raise ValueError(f"{where}: a {'x'.join(map(str, array.shape))} image, expected {shape}")
  return array.tobytes()
