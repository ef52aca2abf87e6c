"""Dataset specs (jaxcnn.data.specs): every registered spec is complete and agrees with its tfds catalog
builder, and a new dataset is one registered entry that resolution then follows."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
from conftest import idx_bytes, make_split

from jaxcnn.data import idx, load_arrays, make_pipeline, resolve, specs
from jaxcnn.data import datasets as resolve_module
from jaxcnn.errors import DataError


@pytest.fixture
def registry(monkeypatch):
  """The registry, restored after the test."""
  monkeypatch.setattr(specs, "REGISTRY", dict(specs.REGISTRY))
  monkeypatch.setattr(specs, "_BY_KEY", dict(specs._BY_KEY))
  monkeypatch.setattr(resolve_module, "SYSTEM_DIRS", ())
  monkeypatch.delenv("JAXCNN_DATA_DIR", raising=False)


def test_registered_datasets():
  assert specs.names() == ["cifar10", "fashion_mnist", "mnist"]
  assert specs.get("Fashion-MNIST") is specs.FASHION_MNIST and specs.get("cifar-10") is specs.CIFAR10
  assert specs.get("tiny_digits") is None
  unknown = specs.spec_for("Tiny-Digits")
  assert (unknown.name, unknown.format, unknown.folders, unknown.catalog) == (
      "tiny_digits", idx.IDX, ("tiny_digits", "tiny-digits"), None)


@pytest.mark.parametrize("name", specs.names())
def test_each_spec_is_complete_and_matches_its_catalog_builder(name, tmp_path):
  import tensorflow_datasets as tfds

  spec = specs.REGISTRY[name]
  assert set(spec.files) == {"train", "test"} and all(spec.files.values())
  assert spec.format in idx.FORMATS.values() and spec.folders and spec.image_shape
  assert spec.counts is None or set(spec.counts) == {"train", "test"}
  assert spec.sha256 is None or set(spec.sha256) == {n for names in spec.files.values() for n in names}
  builder = tfds.builder(spec.catalog, data_dir=str(tmp_path))  # the code only: nothing is downloaded
  features = builder.info.features
  assert tuple(features["image"].shape) == spec.image_shape
  assert features["label"].num_classes == len(spec.class_names)
  if name != "cifar10":  # CIFAR-10's names come from the archive's batches.meta.txt when prepared
    assert list(features["label"].names) == list(spec.class_names)


def test_register_refuses_a_taken_name_and_incomplete_files(registry):
  with pytest.raises(ValueError, match=r"spec: 'digits2': name or alias 'mnist' is already registered"):
    specs.register(specs.DatasetSpec(name="digits2", aliases=("MNIST",), format=idx.IDX, files=idx.IDX_FILES,
                                     class_names=("a", "b")))
  with pytest.raises(ValueError, match=r"files needs 'train' and 'test' entries, got \['train'\]"):
    specs.register(specs.DatasetSpec(name="half", format=idx.IDX, files={"train": ("a", "b")},
                                     class_names=("a", "b")))


def test_a_new_idx_dataset_is_one_entry(registry, tmp_path):
  names = {"train": ("letters-train-images", "letters-train-labels"),
           "test": ("letters-test-images", "letters-test-labels")}
  specs.register(specs.DatasetSpec(
      name="tiny_letters", aliases=("letters",), format=idx.IDX, files=names, image_shape=(6, 5, 1),
      class_names=("a", "b", "c"), folders=("tiny-letters",), counts={"train": 9, "test": 3}))
  raw = tmp_path / "raw" / "tiny-letters"
  raw.mkdir(parents=True)
  splits = {}
  for split, count in (("train", 9), ("test", 3)):
    images, _ = make_split(count, 5)
    labels = np.arange(count, dtype=np.uint8) % 3
    splits[split] = images, labels
    for name, array in zip(names[split], (images, labels)):
      (raw / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
  tfds_dir = tmp_path / "tfds"
  resolved = resolve("Letters", data_dir=raw.parent, tfds_data_dir=tfds_dir)  # by alias, in its folder
  assert (resolved.name, resolved.path, resolved.spec.name) == ("tiny_letters", raw, "tiny_letters")
  assert resolved.class_names == ["a", "b", "c"]
  pipeline = make_pipeline("tiny_letters", "test", batch_size=3, seed=0, data_dir=raw.parent, tfds_data_dir=tfds_dir)
  assert pipeline.num_classes == 3 and pipeline.image_shape == (6, 5, 1)
  images, labels = load_arrays("tiny_letters", "train", data_dir=raw.parent, tfds_data_dir=tfds_dir)
  np.testing.assert_array_equal(images[..., 0], splits["train"][0])
  np.testing.assert_array_equal(labels, splits["train"][1])
  # What the spec states is checked: the label range (3 classes) and the counts.
  bad = tmp_path / "bad" / "tiny-letters"
  bad.mkdir(parents=True)
  for split in ("train", "test"):
    images, labels = splits[split]
    labels = labels + (split == "test")  # label 3 in the test split
    for name, array in zip(names[split], (images, labels)):
      (bad / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
  with pytest.raises(DataError, match=r"letters-test-labels.gz: label 3 at index 2 is outside 0..2$"):
    resolve("tiny_letters", data_dir=bad, tfds_data_dir=tmp_path / "tfds2", download=False)
  with pytest.raises(DataError, match=r"^tiny_letters: dataset not found; .*tfds catalog: not a catalog dataset\. "
                     r"Put letters-train-images.gz, letters-train-labels.gz, letters-test-images.gz, "
                     r"letters-test-labels.gz in .*/empty/tiny-letters/$"):
    resolve("tiny_letters", data_dir=tmp_path / "empty", tfds_data_dir=tmp_path / "tfds3")


def test_a_new_cifar_binary_dataset_is_one_entry(registry, tmp_path, monkeypatch):
  monkeypatch.setattr(idx, "_CIFAR_PER_FILE", 4)  # records per batch file (10000 in the real batches)
  specs.register(specs.DatasetSpec(
      name="tiny_cifar", format=idx.CIFAR_BINARY, files={"train": ("train_1.bin", "train_2.bin"), "test": ("t.bin",)},
      image_shape=(4, 3, 3), class_names=("x", "y"), archive_folder="tiny-cifar-bin",
      hint="train_1.bin, train_2.bin and t.bin"))
  raw = tmp_path / "tiny_cifar" / "tiny-cifar-bin"
  raw.mkdir(parents=True)
  rng = np.random.default_rng(0)
  written = {}
  for name in ("train_1.bin", "train_2.bin", "t.bin"):
    records = rng.integers(0, 256, (4, 1 + 4 * 3 * 3), dtype=np.uint8)
    records[:, 0] %= 2
    (raw / name).write_bytes(records.tobytes())
    written[name] = records
  images, labels = load_arrays("tiny_cifar", "test", data_dir=tmp_path, tfds_data_dir=tmp_path / "tfds")
  assert images.shape == (4, 4, 3, 3)
  np.testing.assert_array_equal(labels, written["t.bin"][:, 0])
  # planes are R, G, B of 4x3 each: pixel (row 1, col 2) blue is byte 1 + 2 * 12 + 3 + 2
  np.testing.assert_array_equal(images[:, 1, 2, 2], written["t.bin"][:, 1 + 24 + 3 + 2])
  with pytest.raises(DataError, match=r"Put train_1.bin, train_2.bin and t.bin in .*/none/tiny_cifar/tiny-cifar-bin/$"):
    resolve("tiny_cifar", data_dir=tmp_path / "none", tfds_data_dir=tmp_path / "tfds")
