"""One spec per named dataset: its raw files and their format, what it holds, where it is looked for.

Everything the data layer knows about a dataset by name lives in its `DatasetSpec`, in `REGISTRY`:
resolution (`jaxcnn.data.resolve`) looks in the spec's folders for the spec's files, reads them with the
spec's format, checks what the spec states (image shape, counts, checksums, label range), prepares them
with the project's tfds builder, falls back to the spec's tfds catalog name, and when nothing is found
says which files to put where. Adding a dataset is one `register(DatasetSpec(...))`; a name that is not
registered is read as an MNIST-like IDX dataset from raw directories only (`spec_for`).
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

from jaxcnn.data import idx


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the data layer knows about one named dataset.

  Attributes:
    name: the canonical name ("fashion_mnist"); lower case, "_" between words.
    format: how the raw files are found and read: `idx.IDX` or `idx.CIFAR_BINARY`.
    files: {"train": basenames, "test": basenames} of the raw files (IDX: images then labels, each
      accepted as `<name>.gz` or uncompressed).
    class_names: the class names in label order; labels must lie in 0..len(class_names)-1.
    image_shape: (H, W, C) the images must have, or None to take it from the files.
    aliases: other accepted spellings ("fashion-mnist"); names are matched case-insensitively with "-"
      read as "_".
    folders: names of the dataset's folder under a raw-files directory (`data_dir`, $JAXCNN_DATA_DIR)
      and under each system directory (`SYSTEM_DIRS`, /usr/share/datasets); the first is the one the
      "not found" message asks for.
    archive_folder: the top folder of the dataset's official archive (CIFAR-10's
      cifar-10-batches-bin), looked in inside each dataset folder too; None if there is none.
    counts: {"train": N, "test": N} examples each split must hold, or None (not checked).
    sha256: {basename: SHA-256 of the decompressed file} for IDX datasets, or None (not checked).
    catalog: the tensorflow_datasets catalog name to prepare or download, or None (raw files only).
    hint: the files to put in place, as the "not found" message says it; "" for the format's list.
  """

  name: str
  format: object
  files: Mapping[str, tuple[str, ...]]
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int] | None = None
  aliases: tuple[str, ...] = ()
  folders: tuple[str, ...] = ()
  archive_folder: str | None = None
  counts: Mapping[str, int] | None = None
  sha256: Mapping[str, str] | None = None
  catalog: str | None = None
  hint: str = ""

  @property
  def expected_files(self) -> str:
    """The files to put in place, for messages."""
    return self.hint or self.format.expected_files(self)

  @property
  def missing_folder(self) -> str:
    """Where, under a raw-files directory, the "not found" message asks the files to go."""
    return "/".join(p for p in (self.folders[0], self.archive_folder) if p)


def _key(name: str) -> str:
  return name.strip().lower().replace("-", "_")


REGISTRY: dict[str, DatasetSpec] = {}
_BY_KEY: dict[str, DatasetSpec] = {}


def register(spec: DatasetSpec) -> DatasetSpec:
  """Adds `spec` to the registry under its name and aliases; returns it."""
  if not spec.folders:
    spec = dataclasses.replace(spec, folders=_default_folders(spec.name))
  keys = {_key(n) for n in (spec.name, *spec.aliases)}
  taken = sorted(k for k in keys if k in _BY_KEY and _BY_KEY[k].name != spec.name)
  if taken:
    raise ValueError(f"spec: {spec.name!r}: name or alias {taken[0]!r} is already registered")
  if set(spec.files) != {"train", "test"}:
    raise ValueError(f"spec: {spec.name!r}: files needs 'train' and 'test' entries, got {sorted(spec.files)}")
  REGISTRY[spec.name] = spec
  for key in keys:
    _BY_KEY[key] = spec
  return spec


def get(name: str) -> DatasetSpec | None:
  """The registered spec of `name` (or one of its aliases), or None."""
  return _BY_KEY.get(_key(name))


def names() -> list[str]:
  """The canonical names of the registered datasets."""
  return sorted(REGISTRY)


def _default_folders(name: str) -> tuple[str, ...]:
  return tuple(dict.fromkeys((name, name.replace("_", "-"))))


def spec_for(name: str) -> DatasetSpec:
  """The registered spec of `name`, else an MNIST-like IDX spec (standard file names, 10 classes, shape
  from the files, nothing else checked) read from raw directories only."""
  spec = get(name)
  if spec is not None:
    return spec
  key = _key(name)
  return DatasetSpec(name=key, format=idx.IDX, files=idx.IDX_FILES, class_names=tuple(str(i) for i in range(10)),
                     folders=_default_folders(key))


MNIST = register(DatasetSpec(
    name="mnist", format=idx.IDX, files=idx.IDX_FILES, image_shape=(28, 28, 1),
    class_names=tuple(str(i) for i in range(10)), folders=("mnist",),
    counts={"train": 60000, "test": 10000},
    sha256={
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    catalog="mnist"))

FASHION_MNIST = register(DatasetSpec(
    name="fashion_mnist", aliases=("fashion-mnist",), format=idx.IDX, files=idx.IDX_FILES,
    image_shape=(28, 28, 1),
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
    # Debian's dataset-fashion-mnist installs /usr/share/datasets/fashion-mnist.
    folders=("fashion_mnist", "fashion-mnist"),
    counts={"train": 60000, "test": 10000},
    sha256={
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
    catalog="fashion_mnist"))

CIFAR10 = register(DatasetSpec(
    name="cifar10", aliases=("cifar-10",), format=idx.CIFAR_BINARY, files=idx.CIFAR10_BIN_FILES,
    image_shape=(32, 32, 3),
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    folders=("cifar10", "cifar-10", "cifar-10-batches-bin"), archive_folder="cifar-10-batches-bin",
    # Counts follow from the files: every batch holds 10000 records (checked by the format).
    catalog="cifar10",
    hint="data_batch_1.bin ... data_batch_5.bin and test_batch.bin (CIFAR-10 binary version)"))
