"""Fixtures for the data tests: small generated IDX datasets written like the real ones."""
from __future__ import annotations

import gzip
import pathlib

import numpy as np
import pytest

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
  """An IDX file's content: big-endian magic (2051 images / 2049 labels), dims, then uint8 data."""
  array = np.asarray(array, np.uint8)
  if magic is None:
    magic = 2051 if array.ndim == 3 else 2049
  header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
  return header + array.tobytes()


def make_split(count: int, seed: int, hw=(6, 5)) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (count, H, W), labels (count,)): image i's first pixel is i % 256 (to identify it)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (count, *hw), dtype=np.uint8)
  images[:, 0, 0] = np.arange(count) % 256
  labels = rng.integers(0, 10, count).astype(np.uint8)
  return images, labels


def write_idx_dir(directory: pathlib.Path, splits: dict, *, compress: bool = True) -> pathlib.Path:
  """Writes {split: (images, labels)} as the standard four IDX files (gzip'd unless compress=False)."""
  directory.mkdir(parents=True, exist_ok=True)
  for split, (images, labels) in splits.items():
    for name, array in zip(IDX_NAMES[split], (images, labels)):
      content = idx_bytes(array)
      if compress:
        (directory / f"{name}.gz").write_bytes(gzip.compress(content, mtime=0))
      else:
        (directory / name).write_bytes(content)
  return directory


@pytest.fixture
def tiny_idx(tmp_path) -> tuple[pathlib.Path, dict]:
  """A raw dir `tiny_digits/` (60 train, 20 test, 6x5 images) and the arrays written to it."""
  splits = {"train": make_split(60, 0), "test": make_split(20, 1)}
  return write_idx_dir(tmp_path / "raw" / "tiny_digits", splits), splits
