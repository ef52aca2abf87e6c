"""Fixtures of the experiment smoke runs (tiny slices of real datasets; see _exp_tiny_idx)."""
from __future__ import annotations

import pytest
from _exp_tiny_idx import SHIPPED_MNIST, write_tiny_idx


@pytest.fixture(scope="session")
def tiny_digits(tmp_path_factory) -> dict[str, str]:
  """Config overrides for a 320/96-example slice of the shipped MNIST, named "tiny_digits"."""
  root = tmp_path_factory.mktemp("tiny_digits")
  write_tiny_idx(SHIPPED_MNIST, root / "tiny_digits", {"train": 320, "test": 96})
  return {"dataset": "tiny_digits", "data_dir": str(root), "tfds_data_dir": str(root / "tfds")}
