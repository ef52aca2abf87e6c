"""Raw-file validation (jaxcnn.data.idx through resolve): each defect is a one-line DataError naming the file."""
from __future__ import annotations

import gzip
import os
import pathlib

import numpy as np
import pytest
from conftest import idx_bytes, make_split, write_idx_dir

from jaxcnn.data import idx, load_arrays, resolve
from jaxcnn.errors import DataError


def _resolve_error(raw_dir: pathlib.Path, name: str, tfds_dir: pathlib.Path) -> str:
  with pytest.raises(DataError) as info:
    resolve(name, data_dir=raw_dir, tfds_data_dir=tfds_dir, download=False)
  message = str(info.value)
  assert "\n" not in message
  assert not tfds_dir.exists()  # nothing written when the raw files are bad
  assert info.value.exit_code == 2
  return message


def test_uncompressed_files_are_accepted(tmp_path):
  splits = {"train": make_split(12, 0), "test": make_split(4, 1)}
  raw = write_idx_dir(tmp_path / "plain", splits, compress=False)
  images, labels = load_arrays("tiny_digits", "test", data_dir=raw, tfds_data_dir=tmp_path / "tfds")
  np.testing.assert_array_equal(images[..., 0], splits["test"][0])
  np.testing.assert_array_equal(labels, splits["test"][1])


def test_truncated_gzip(tiny_idx, tmp_path):
  raw, _ = tiny_idx
  path = raw / "t10k-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-30])
  message = _resolve_error(raw, "tiny_digits", tmp_path / "tfds")
  assert message.startswith(f"{path}: truncated")


def test_corrupt_gzip(tiny_idx, tmp_path):
  raw, _ = tiny_idx
  path = raw / "train-labels-idx1-ubyte.gz"
  path.write_bytes(b"\x1f\x8b" + os.urandom(40))
  message = _resolve_error(raw, "tiny_digits", tmp_path / "tfds")
  assert message.startswith(f"{path}: ") and ("corrupt" in message or "truncated" in message)


def test_truncated_content_behind_a_valid_gzip(tiny_idx, tmp_path):
  raw, splits = tiny_idx
  path = raw / "train-images-idx3-ubyte.gz"
  path.write_bytes(gzip.compress(idx_bytes(splits["train"][0])[:-7]))
  message = _resolve_error(raw, "tiny_digits", tmp_path / "tfds")
  assert message == f"{path}: truncated: header (60, 6, 5) needs 1800 data bytes, found 1793"


@pytest.mark.parametrize("file,magic", [("train-images-idx3-ubyte.gz", 2049), ("t10k-labels-idx1-ubyte.gz", 2051)])
def test_wrong_magic_number(tiny_idx, tmp_path, file, magic):
  raw, splits = tiny_idx
  array = splits["train"][0] if "images" in file and "train" in file else splits["test"][1]
  path = raw / file
  path.write_bytes(gzip.compress(idx_bytes(array, magic=magic)))
  message = _resolve_error(raw, "tiny_digits", tmp_path / "tfds")
  assert message.startswith(f"{path}: wrong magic number {magic} (expected ")


def test_label_count_differs_from_image_count(tiny_idx, tmp_path):
  raw, splits = tiny_idx
  path = raw / "train-labels-idx1-ubyte.gz"
  path.write_bytes(gzip.compress(idx_bytes(splits["train"][1][:59])))
  message = _resolve_error(raw, "tiny_digits", tmp_path / "tfds")
  assert message == f"{path}: holds 59 labels but train-images-idx3-ubyte.gz holds 60 images"


def test_label_value_ten(tiny_idx, tmp_path):
  raw, splits = tiny_idx
  labels = splits["test"][1].copy()
  labels[7] = 10
  path = raw / "t10k-labels-idx1-ubyte.gz"
  path.write_bytes(gzip.compress(idx_bytes(labels)))
  message = _resolve_error(raw, "tiny_digits", tmp_path / "tfds")
  assert message == f"{path}: label 10 at index 7 is outside 0..9"


def _linked_mnist(shared: pathlib.Path, target: pathlib.Path, mapping=None) -> pathlib.Path:
  """target/ with links to the real MNIST files; `mapping` {name: source name} swaps some."""
  target.mkdir()
  for names in idx.IDX_FILES.values():
    for name in names:
      source = (mapping or {}).get(name, name)
      (target / f"{name}.gz").symlink_to(shared / "mnist" / f"{source}.gz")
  return target


def test_swapped_train_and_test_files(shared_datasets, tmp_path):
  swap = {"train-images-idx3-ubyte": "t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte": "train-images-idx3-ubyte",
          "train-labels-idx1-ubyte": "t10k-labels-idx1-ubyte", "t10k-labels-idx1-ubyte": "train-labels-idx1-ubyte"}
  raw = _linked_mnist(shared_datasets, tmp_path / "mnist", swap)
  message = _resolve_error(raw, "mnist", tmp_path / "tfds")
  assert message == (f"{raw / 'train-images-idx3-ubyte.gz'}: holds 10000 mnist examples, expected 60000 for "
                     "the train split (that is the test split's count: are the train and test files swapped?)")


def test_known_dataset_with_altered_content_fails_its_sha256(shared_datasets, tmp_path):
  raw = _linked_mnist(shared_datasets, tmp_path / "mnist")
  labels_path = raw / "t10k-labels-idx1-ubyte.gz"
  content = bytearray(gzip.decompress(labels_path.read_bytes()))
  content[8] = (content[8] + 1) % 10  # still a valid label: only the digest can tell
  labels_path.unlink()
  labels_path.write_bytes(gzip.compress(bytes(content)))
  message = _resolve_error(raw, "mnist", tmp_path / "tfds")
  assert message.startswith(f"{labels_path}: SHA-256 of the decompressed content is ")
  assert "expected ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2 for mnist" in message


def test_known_dataset_must_have_its_counts(tmp_path):
  splits = {"train": make_split(60, 0, hw=(28, 28)), "test": make_split(20, 1, hw=(28, 28))}
  raw = write_idx_dir(tmp_path / "mnist", splits)
  message = _resolve_error(raw, "mnist", tmp_path / "tfds")
  assert message == (f"{raw / 'train-images-idx3-ubyte.gz'}: holds 60 mnist examples, expected 60000 for "
                     "the train split")


def test_cifar10_binary_records(tmp_path, monkeypatch):
  monkeypatch.setattr(idx, "_CIFAR_PER_FILE", 3)  # real batches hold 10000 records; 3 keep the test small
  raw = tmp_path / "cifar10" / "cifar-10-batches-bin"
  raw.mkdir(parents=True)
  rng = np.random.default_rng(0)
  expected = {}
  for split, names in idx.CIFAR10_BIN_FILES.items():
    records = rng.integers(0, 256, (len(names) * 3, 3073), dtype=np.uint8)
    records[:, 0] %= 10
    expected[split] = records
    for i, name in enumerate(names):
      (raw / name).write_bytes(records[3 * i:3 * i + 3].tobytes())
  images, labels = idx.read_cifar10_split(raw, "train")
  assert images.shape == (15, 32, 32, 3) and labels.shape == (15,)
  np.testing.assert_array_equal(labels, expected["train"][:, 0])
  # planes are R, G, B of 32x32 each: pixel (row 1, col 2) green is byte 1 + 1024 + 32 + 2
  np.testing.assert_array_equal(images[:, 1, 2, 1], expected["train"][:, 1 + 1024 + 32 + 2])
  loaded, loaded_labels = load_arrays("cifar10", "test", data_dir=tmp_path, tfds_data_dir=tmp_path / "tfds",
                                      download=False)
  np.testing.assert_array_equal(loaded_labels, expected["test"][:, 0])
  np.testing.assert_array_equal(loaded[:, 0, 0], expected["test"][:, [1, 1025, 2049]])
  bad = raw / "test_batch.bin"
  bad.write_bytes(bad.read_bytes()[:-5])
  with pytest.raises(DataError, match=r"test_batch.bin: 9214 bytes, expected 3 records of 3073 bytes"):
    idx.read_cifar10_split(raw, "test")
