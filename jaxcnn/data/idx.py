"""Raw dataset files: IDX (MNIST family) and the CIFAR-10 binary version, read and validated with numpy.

Validation is of the decompressed content (re-packaged .gz files differ byte-wise from the originals
while holding the same data): IDX magic numbers, dimensions, counts, images-vs-labels agreement, the
label range and, for datasets known by name, the SHA-256 of each decompressed file. Every failure is a
one-line `DataError` that names the file and the problem. Nothing here is unpickled or evaluated.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pathlib
import zlib

import numpy as np

from jaxcnn.errors import DataError

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049
_IDX_CLASSES = 10

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclasses.dataclass(frozen=True)
class KnownIdx:
  """What a dataset known by name must hold: counts per split, image size, decompressed SHA-256s."""

  counts: dict
  image_hw: tuple[int, int]
  sha256: dict
  class_names: tuple[str, ...]
  folder_names: tuple[str, ...]


KNOWN_IDX = {
    "mnist": KnownIdx(
        counts={"train": 60000, "test": 10000}, image_hw=(28, 28),
        sha256={
            "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        },
        class_names=tuple(str(i) for i in range(10)), folder_names=("mnist",)),
    "fashion_mnist": KnownIdx(
        counts={"train": 60000, "test": 10000}, image_hw=(28, 28),
        sha256={
            "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        },
        class_names=FASHION_MNIST_CLASSES, folder_names=("fashion_mnist", "fashion-mnist")),
}

# CIFAR-10 binary version: each record is 1 label byte + 3072 pixel bytes (3 planes of 32x32, R, G, B).
CIFAR10_BIN_FILES = {
    "train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
    "test": ("test_batch.bin",),
}
_CIFAR_RECORD = 1 + 32 * 32 * 3
_CIFAR_PER_FILE = 10000


def find_idx_files(directory: pathlib.Path) -> dict[str, pathlib.Path] | None:
  """{basename: path} of the four IDX files in `directory` (.gz or uncompressed), or None if any is missing."""
  found = {}
  for names in IDX_FILES.values():
    for name in names:
      for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
          found[name] = candidate
          break
      else:
        return None
  return found


def missing_idx_files(directory: pathlib.Path) -> list[str]:
  """The IDX basenames (as .gz) not present in `directory` in either form."""
  return [f"{name}.gz" for names in IDX_FILES.values() for name in names
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


def read_idx_split(files: dict[str, pathlib.Path], split: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads and validates one split of an IDX dataset.

  Args:
    files: {basename: path} from `find_idx_files`.
    split: "train" or "test".
    dataset: the dataset's name; names in KNOWN_IDX also get count, size and SHA-256 checks.

  Returns:
    (images uint8 (N, H, W, 1), labels int32 (N,)).
  """
  known = KNOWN_IDX.get(dataset)
  arrays = []
  for name, magic, ndim in zip(IDX_FILES[split], (_IMAGES_MAGIC, _LABELS_MAGIC), (3, 1)):
    path = files[name]
    content = read_bytes(path)
    array = _parse_idx(path, content, magic, ndim)
    if array.shape[0] == 0:
      raise DataError(f"{path}: holds no examples (the header's count is 0)")
    if ndim == 3 and 0 in array.shape[1:]:
      raise DataError(f"{path}: images are {array.shape[1]}x{array.shape[2]} (a zero dimension)")
    if known is not None:
      count = array.shape[0]
      if count != known.counts[split]:
        other = "test" if split == "train" else "train"
        hint = (f" (that is the {other} split's count: are the train and test files swapped?)"
                if count == known.counts[other] else "")
        raise DataError(f"{path}: holds {count} {dataset} examples, expected {known.counts[split]} "
                        f"for the {split} split{hint}")
      if ndim == 3 and array.shape[1:] != known.image_hw:
        raise DataError(f"{path}: images are {array.shape[1]}x{array.shape[2]}, expected "
                        f"{known.image_hw[0]}x{known.image_hw[1]} for {dataset}")
    arrays.append((path, array, content))
  (image_path, images, image_bytes), (label_path, labels, label_bytes) = arrays
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"{label_path}: holds {labels.shape[0]} labels but {image_path.name} holds "
                    f"{images.shape[0]} images")
  if labels.size and labels.max() >= _IDX_CLASSES:
    bad = int(np.argmax(labels >= _IDX_CLASSES))
    raise DataError(f"{label_path}: label {int(labels[bad])} at index {bad} is outside 0..{_IDX_CLASSES - 1}")
  if known is not None:
    for path, content in ((image_path, image_bytes), (label_path, label_bytes)):
      base = path.name[:-3] if path.suffix == ".gz" else path.name
      got = hashlib.sha256(content).hexdigest()
      if got != known.sha256[base]:
        raise DataError(f"{path}: SHA-256 of the decompressed content is {got}, expected "
                        f"{known.sha256[base]} for {dataset} (a different or altered file)")
  return images[..., None], labels.astype(np.int32)


def find_cifar10_bin(directory: pathlib.Path) -> pathlib.Path | None:
  """The folder holding the CIFAR-10 binary batches: `directory` itself or its cifar-10-batches-bin/."""
  for candidate in (directory, directory / "cifar-10-batches-bin"):
    if all((candidate / name).is_file() for names in CIFAR10_BIN_FILES.values() for name in names):
      return candidate
  return None


def read_cifar10_split(directory: pathlib.Path, split: str) -> tuple[np.ndarray, np.ndarray]:
  """One split of the CIFAR-10 binary version: (images uint8 (N, 32, 32, 3), labels int32 (N,))."""
  images, labels = [], []
  for name in CIFAR10_BIN_FILES[split]:
    path = directory / name
    content = read_bytes(path)
    if len(content) != _CIFAR_RECORD * _CIFAR_PER_FILE:
      raise DataError(f"{path}: {len(content)} bytes, expected {_CIFAR_PER_FILE} records of "
                      f"{_CIFAR_RECORD} bytes ({_CIFAR_RECORD * _CIFAR_PER_FILE}); truncated or not a "
                      "CIFAR-10 binary batch")
    records = np.frombuffer(content, np.uint8).reshape(_CIFAR_PER_FILE, _CIFAR_RECORD)
    if records[:, 0].max() >= 10:
      bad = int(np.argmax(records[:, 0] >= 10))
      raise DataError(f"{path}: label {int(records[bad, 0])} in record {bad} is outside 0..9")
    labels.append(records[:, 0].astype(np.int32))
    images.append(records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
  return np.concatenate(images), np.concatenate(labels)


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
