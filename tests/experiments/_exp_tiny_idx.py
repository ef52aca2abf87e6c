"""Tiny IDX datasets for the experiment smoke runs: the first examples of real files, re-packed.

(A helper module with a unique name rather than a conftest.py: other test folders import their own
conftest by name, which a second tests/**/conftest.py would shadow.)

A dataset name the data layer does not know (e.g. "tiny_digits") skips its full-size count and checksum
checks, so a few hundred real images go through exactly the path a full dataset takes (raw IDX dir ->
tfds preparation -> arrays -> pipelines), in seconds.
"""
from __future__ import annotations

import gzip
import pathlib
import struct

import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED_MNIST = REPO_ROOT / "experiments" / "data" / "mnist"
_FILES = {"train": "train", "test": "t10k"}


def _read_idx(path: pathlib.Path, ndim: int) -> np.ndarray:
  content = gzip.decompress(path.read_bytes())
  dims = struct.unpack(f">{ndim}I", content[4:4 + 4 * ndim])
  return np.frombuffer(content, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _write_idx(path: pathlib.Path, array: np.ndarray) -> None:
  magic = 0x0803 if array.ndim == 3 else 0x0801
  header = struct.pack(f">I{array.ndim}I", magic, *array.shape)
  path.write_bytes(gzip.compress(header + np.ascontiguousarray(array, np.uint8).tobytes(), mtime=0))


def write_tiny_idx(source: pathlib.Path, target: pathlib.Path, counts: dict[str, int]) -> pathlib.Path:
  """Copies the first counts[split] examples of the IDX files in `source` to `target`; returns target."""
  target.mkdir(parents=True, exist_ok=True)
  for split, prefix in _FILES.items():
    images = _read_idx(source / f"{prefix}-images-idx3-ubyte.gz", 3)[:counts[split]]
    labels = _read_idx(source / f"{prefix}-labels-idx1-ubyte.gz", 1)[:counts[split]]
    _write_idx(target / f"{prefix}-images-idx3-ubyte.gz", images)
    _write_idx(target / f"{prefix}-labels-idx1-ubyte.gz", labels)
  return target




@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory) -> dict[str, str]:
  """Config overrides for a 320/96-example slice of the shipped MNIST, named "tiny_digits"."""
  root = tmp_path_factory.mktemp("tiny_digits")
  write_tiny_idx(SHIPPED_MNIST, root / "tiny_digits", {"train": 320, "test": 96})
  return {"dataset": "tiny_digits", "data_dir": str(root), "tfds_data_dir": str(root / "tfds")}
