"""Helpers shared by the tests: dtype tolerances, data location, oracle imports, dataset reads once.

Import as `from helpers import assert_close` (tests/ is on sys.path through conftest.py). Test file
basenames must be unique across tests/ subfolders (they are imported as top-level modules).
"""
from __future__ import annotations

import functools
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The real datasets live beside the checkout in this workplace's CI; a user's machine has none, and the
# tests that need them skip there.
SHARED_DATASETS = REPO_ROOT.parent / "shared" / "datasets"

# Tolerances by dtype: float32 ops with O(100)-term sums accumulate ~1e-6 relative rounding, so 1e-5
# relative/absolute is tight yet safe; bfloat16 keeps 8 mantissa bits (eps 2^-8 ~ 4e-3), and a sum of
# O(100) rounded products drifts by a few eps, hence 5e-2.
_TOLERANCES = {
    jnp.dtype(jnp.float32): dict(rtol=1e-5, atol=1e-5),
    jnp.dtype(jnp.bfloat16): dict(rtol=5e-2, atol=5e-2),
    jnp.dtype(jnp.float16): dict(rtol=1e-2, atol=1e-2),
    jnp.dtype(jnp.float64): dict(rtol=1e-10, atol=1e-10),
}


def tolerance(dtype) -> dict:
  """rtol/atol for comparing results computed in `dtype` (see the table above for why)."""
  return dict(_TOLERANCES[jnp.dtype(dtype)])


def assert_close(actual, expected, dtype=None, **override):
  """np.testing.assert_allclose with the dtype's tolerance (dtype defaults to `actual`'s)."""
  dtype = dtype if dtype is not None else jnp.result_type(actual)
  tol = tolerance(dtype)
  tol.update(override)
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), **tol)


def import_torch():
  """torch, or a skip with the reason (it is in the `test` extra)."""
  return pytest.importorskip("torch", reason="PyTorch oracle not installed (pip install -e '.[test]')")


def import_tensorflow():
  """tensorflow, or a skip with the reason (tensorflow-cpu is in the `test` extra)."""
  return pytest.importorskip("tensorflow", reason="TensorFlow oracle not installed (pip install -e '.[test]')")


_READS: dict = {}


def read_once(read):
  """`read` (a dataset reader) answering each distinct call once per process: a real dataset is tens of
  thousands of records, and the recipes' tests read the same ones in every run of a recipe. A failed
  read is not kept, so it fails again. The results are shared: callers must not write into them."""
  @functools.wraps(read)
  def cached(*args, **kwargs):
    key = (read.__module__, read.__qualname__, repr(args), repr(sorted(kwargs.items())))
    if key not in _READS:
      _READS[key] = read(*args, **kwargs)
    return _READS[key]
  return cached
