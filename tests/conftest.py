"""Test setup: 4 host CPU devices and strict JAX rank promotion, before any test imports jax.

XLA_FLAGS must be set before jax is imported, so it is done here, at collection time.
"""
from __future__ import annotations

import os
import pathlib
import sys

# 4 host devices for the data-parallel tests. On a loaded 2-core machine the 4 device threads of one
# cross-device sum can be scheduled far apart; XLA's CPU collectives abort the process after 40 s by
# default, so the tests allow 5 minutes before calling a collective stuck.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=300 "
                      "--xla_cpu_collective_timeout_seconds=300")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from helpers import SHARED_DATASETS  # noqa: E402


@pytest.fixture(scope="session")
def shared_datasets() -> pathlib.Path:
  """../shared/datasets (real MNIST / Fashion-MNIST IDX files); skips where it is absent."""
  if not (SHARED_DATASETS / "mnist").is_dir():
    pytest.skip(f"real datasets not found at {SHARED_DATASETS}")
  return SHARED_DATASETS


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` run only with JAXCNN_SLOW_TESTS=1 (the default run stays under ~10 min)."""
  if os.environ.get("JAXCNN_SLOW_TESTS") == "1":
    return
  skip = pytest.mark.skip(reason="slow test: set JAXCNN_SLOW_TESTS=1 to run it")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
