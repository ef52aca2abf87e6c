"""Raw dataset files: IDX (MNIST family) and the CIFAR binary version, read and validated with numpy.

Validation is of the decompressed content (re-packaged .gz files differ byte-wise from the originals
while holding the same data): IDX magic numbers, dimensions, counts, images-vs-labels agreement, the
label range and, where the dataset's spec (`jaxcnn.data.specs`) states them, the example counts and the
SHA-256 of each decompressed file. Every failure is a one-line `DataError` that names the file and the
problem. Nothing here is unpickled or evaluated.

A spec names its format by one of the objects here, `IDX` or `CIFAR_BINARY` (`FORMATS` by name); a
format finds a dataset's files in a directory, describes them, and reads and validates one split.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pathlib
import zlib

import numpy as np

from jaxcnn.errors import DataError

# The MNIST family's file names (MNIST, Fashion-MNIST, and IDX datasets not in the registry).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049

# CIFAR binary version: each record is 1 label byte + the pixel bytes (3 planes of H x W: R, G, B), and
# each batch file holds _CIFAR_PER_FILE records.
CIFAR10_BIN_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
_CIFAR_PER_FILE = 10000


def _names(files: dict) -> list[str]:
  return [name for names in files.values() for name in names]


def find_idx_files(directory: pathlib.Path, names: dict = IDX_FILES) -> dict[str, pathlib.Path] | None:
  """{basename: path} of the IDX files `names` ({split: basenames}) in `directory` (.gz or uncompressed),
  or None if any is missing."""
  found = {}
  for name in _names(names):
    for candidate in (directory / f"{name}.gz", directory / name):
      if candidate.is_file():
        found[name] = candidate
        break
    else:
      return None
  return found


def missing_idx_files(directory: pathlib.Path, names: dict = IDX_FILES) -> list[str]:
  """The IDX basenames (as .gz) not present in `directory` in either form."""
  return [f"{name}.gz" for name in _names(names)
          if not ((directory / f"{name}.gz").is_file() or (directory / name).is_file())]


def read_bytes(path: pathlib.Path) -> bytes:
  """The decompressed content of `path` (.gz is decompressed); DataError when truncated or corrupt."""
  try:
    raw = path.read_bytes()
  except OSError as err:
    raise DataError(f"{path}: cannot be read ({err.strerror or err})") from None
  if path.suffix != ".gz":
    return raw
  try:
    return gzip.decompress(raw)
  except EOFError:
    raise DataError(f"{path}: truncated gzip file (the compressed stream ends early)") from None
  except (OSError, zlib.error) as err:
    raise DataError(f"{path}: corrupt gzip file ({err})") from None


def read_image_hw(path: pathlib.Path) -> tuple[int, int]:
  """(rows, cols) from an IDX images file's header, reading only its first 16 bytes."""
  try:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
      header = f.read(16)
  except EOFError:
    raise DataError(f"{path}: truncated gzip file (the compressed stream ends early)") from None
  except (OSError, zlib.error) as err:
    raise DataError(f"{path}: corrupt or unreadable file ({err})") from None
  if len(header) < 16:
    raise DataError(f"{path}: truncated IDX file ({len(header)} bytes, shorter than its header)")
  got = int.from_bytes(header[:4], "big")
  if got != _IMAGES_MAGIC:
    raise DataError(f"{path}: wrong magic number {got} (expected {_IMAGES_MAGIC} for an IDX images file)")
  return int.from_bytes(header[8:12], "big"), int.from_bytes(header[12:16], "big")


def _parse_idx(path: pathlib.Path, content: bytes, magic: int, ndim: int) -> np.ndarray:
  """The uint8 array of an IDX file's content, after checking its magic number, header and length."""
  if len(content) < 4 + 4 * ndim:
    raise DataError(f"{path}: truncated IDX file ({len(content)} bytes, shorter than its header)")
  got = int.from_bytes(content[:4], "big")
  if got != magic:
    kind = "images" if magic == _IMAGES_MAGIC else "labels"
    raise DataError(f"{path}: wrong magic number {got} (expected {magic} for an IDX {kind} file)")
  dims = tuple(int.from_bytes(content[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  body = memoryview(content)[4 + 4 * ndim:]
  expected = int(np.prod(dims))
  if len(body) != expected:
    problem = "truncated" if len(body) < expected else "has trailing bytes"
    raise DataError(f"{path}: {problem}: header {dims} needs {expected} data bytes, found {len(body)}")
  return np.frombuffer(body, np.uint8).reshape(dims)


def read_idx_split(files: dict[str, pathlib.Path], split: str, spec) -> tuple[np.ndarray, np.ndarray]:
  """Reads and validates one split of an IDX dataset.

  Args:
    files: {basename: path} from `find_idx_files`.
    split: "train" or "test".
    spec: the dataset's `DatasetSpec`: its file names, class count (the label range) and, where given,
      image shape, example counts and decompressed SHA-256s, all checked.

  Returns:
    (images uint8 (N, H, W, 1), labels int32 (N,)).
  """
  dataset, num_classes = spec.name, len(spec.class_names)
  arrays = []
  for name, magic, ndim in zip(spec.files[split], (_IMAGES_MAGIC, _LABELS_MAGIC), (3, 1)):
    path = files[name]
    content = read_bytes(path)
    array = _parse_idx(path, content, magic, ndim)
    if array.shape[0] == 0:
      raise DataError(f"{path}: holds no examples (the header's count is 0)")
    if ndim == 3 and 0 in array.shape[1:]:
      raise DataError(f"{path}: images are {array.shape[1]}x{array.shape[2]} (a zero dimension)")
    if spec.counts is not None:
      count, expected = array.shape[0], spec.counts[split]
      if count != expected:
        other = "test" if split == "train" else "train"
        hint = (f" (that is the {other} split's count: are the train and test files swapped?)"
                if count == spec.counts[other] else "")
        raise DataError(f"{path}: holds {count} {dataset} examples, expected {expected} "
                        f"for the {split} split{hint}")
    if ndim == 3 and spec.image_shape is not None and array.shape[1:] != tuple(spec.image_shape[:2]):
      raise DataError(f"{path}: images are {array.shape[1]}x{array.shape[2]}, expected "
                      f"{spec.image_shape[0]}x{spec.image_shape[1]} for {dataset}")
    arrays.append((path, array, content))
  (image_path, images, image_bytes), (label_path, labels, label_bytes) = arrays
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"{label_path}: holds {labels.shape[0]} labels but {image_path.name} holds "
                    f"{images.shape[0]} images")
  if labels.size and labels.max() >= num_classes:
    bad = int(np.argmax(labels >= num_classes))
    raise DataError(f"{label_path}: label {int(labels[bad])} at index {bad} is outside 0..{num_classes - 1}")
  if spec.sha256 is not None:
    for path, content in ((image_path, image_bytes), (label_path, label_bytes)):
      base = path.name[:-3] if path.suffix == ".gz" else path.name
      got = hashlib.sha256(content).hexdigest()
      if got != spec.sha256[base]:
        raise DataError(f"{path}: SHA-256 of the decompressed content is {got}, expected "
                        f"{spec.sha256[base]} for {dataset} (a different or altered file)")
  return images[..., None], labels.astype(np.int32)


def find_cifar_bin(directory: pathlib.Path, names: dict = CIFAR10_BIN_FILES,
                   archive_folder: str | None = "cifar-10-batches-bin") -> pathlib.Path | None:
  """The folder holding the CIFAR binary batches `names`: `directory` itself or its `archive_folder`."""
  candidates = [directory] + ([directory / archive_folder] if archive_folder else [])
  for candidate in candidates:
    if all((candidate / name).is_file() for name in _names(names)):
      return candidate
  return None


def read_cifar_split(directory: pathlib.Path, names, image_shape=(32, 32, 3), num_classes: int = 10):
  """The CIFAR binary batches `names` in `directory`: (images uint8 (N, H, W, C), labels int32 (N,))."""
  height, width, channels = image_shape
  record = 1 + height * width * channels
  images, labels = [], []
  for name in names:
    path = directory / name
    content = read_bytes(path)
    if len(content) != record * _CIFAR_PER_FILE:
      raise DataError(f"{path}: {len(content)} bytes, expected {_CIFAR_PER_FILE} records of "
                      f"{record} bytes ({record * _CIFAR_PER_FILE}); truncated or not a "
                      "CIFAR binary batch")
    records = np.frombuffer(content, np.uint8).reshape(_CIFAR_PER_FILE, record)
    if records[:, 0].max() >= num_classes:
      bad = int(np.argmax(records[:, 0] >= num_classes))
      raise DataError(f"{path}: label {int(records[bad, 0])} in record {bad} is outside 0..{num_classes - 1}")
    labels.append(records[:, 0].astype(np.int32))
    images.append(records[:, 1:].reshape(-1, channels, height, width).transpose(0, 2, 3, 1))
  return np.concatenate(images), np.concatenate(labels)


def read_cifar10_split(directory: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  """One split of the CIFAR-10 binary version: (images uint8 (N, 32, 32, 3), labels int32 (N,))."""
  return read_cifar_split(directory, CIFAR10_BIN_FILES[split])


@dataclasses.dataclass(frozen=True)
class IdxFormat:
  """IDX files (.gz or uncompressed), one images and one labels file per split."""

  name: str = "idx"
  description: str = "raw IDX files"

  def find(self, spec, directory: pathlib.Path):
    """(raw dir, files) when `directory` holds the spec's files, else the reason it does not."""
    files = find_idx_files(directory, spec.files)
    if files is None:
      missing = missing_idx_files(directory, spec.files)
      if len(missing) == len(_names(spec.files)):
        return "no IDX files"
      return f"missing {', '.join(missing)}"
    return directory, list(files.values())

  def expected_files(self, spec) -> str:
    return ", ".join(f"{name}.gz" for name in _names(spec.files))

  def image_shape(self, spec, files) -> tuple[int, int, int]:
    """(H, W, 1) from the training images file's header alone (cheap)."""
    images_file = next(f for f in files if (f.name[:-3] if f.suffix == ".gz" else f.name) == spec.files["train"][0])
    return (*read_image_hw(images_file), 1)

  def read_split(self, spec, raw_dir: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    files = find_idx_files(raw_dir, spec.files)
    if files is None:
      raise DataError(f"{raw_dir}: IDX files missing: {', '.join(missing_idx_files(raw_dir, spec.files))}")
    return read_idx_split(files, split, spec)

  def validate(self, spec, raw_dir: pathlib.Path) -> None:
    """Reads both splits fully; one prepared dataset holds one image shape, so a test file of another
    size is the wrong file."""
    files = find_idx_files(raw_dir, spec.files)
    shapes = {split: self.read_split(spec, raw_dir, split)[0].shape[1:] for split in ("train", "test")}
    if shapes["train"] != shapes["test"]:
      test_file, train_file = files[spec.files["test"][0]], files[spec.files["train"][0]]
      raise DataError(f"{test_file}: images are {shapes['test'][0]}x{shapes['test'][1]} but {train_file.name} "
                      f"holds {shapes['train'][0]}x{shapes['train'][1]} images")


@dataclasses.dataclass(frozen=True)
class CifarBinaryFormat:
  """The CIFAR binary version: batch files of (label byte, R, G and B planes) records, found in a dataset
  folder itself or in the archive's top folder (`spec.archive_folder`)."""

  name: str = "cifar_binary"
  description: str = "raw CIFAR binary batches"

  def find(self, spec, directory: pathlib.Path):
    found = find_cifar_bin(directory, spec.files, spec.archive_folder)
    if found is None:
      return "no CIFAR binary batches"
    return found, [found / name for name in _names(spec.files)]

  def expected_files(self, spec) -> str:
    return ", ".join(_names(spec.files))

  def image_shape(self, spec, files) -> tuple[int, int, int]:
    return tuple(spec.image_shape)

  def read_split(self, spec, raw_dir: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    return read_cifar_split(raw_dir, spec.files[split], spec.image_shape, len(spec.class_names))

  def validate(self, spec, raw_dir: pathlib.Path) -> None:
    for split in ("train", "test"):
      self.read_split(spec, raw_dir, split)


IDX = IdxFormat()
CIFAR_BINARY = CifarBinaryFormat()
FORMATS = {fmt.name: fmt for fmt in (IDX, CIFAR_BINARY)}


def digest_files(paths) -> str:
  """SHA-256 over the names and raw (as stored) bytes of `paths`: identifies a raw directory's content."""
  digest = hashlib.sha256()
  for path in sorted(pathlib.Path(p) for p in paths):
    digest.update(f"{path.name}\0".encode())
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        digest.update(block)
    digest.update(b"\0")
  return digest.hexdigest()
