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


# The environment a session-wide persistent compilation cache gives subprocesses: the experiment commands
# read JAXCNN_COMPILATION_CACHE; every other JAX process (the training workers) reads JAX's own variables,
# with the thresholds jaxcnn/_compile_cache.py uses (every program stored; a size limit, hence file locks).
def _compilation_cache_env(directory: str) -> dict[str, str]:
  from jaxcnn import _compile_cache
  return {_compile_cache.ENV_VAR: directory, "JAX_COMPILATION_CACHE_DIR": directory,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
          "JAX_COMPILATION_CACHE_MAX_SIZE": str(_compile_cache.MAX_BYTES)}


@pytest.fixture(scope="session", autouse=True)
def _session_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for the session's subprocesses: a command or worker the tests start
  many times compiles its programs once, and no test writes the user's own cache. The test process itself
  compiles as before (jax read its configuration at import). xdist workers share the directory (JAX locks
  it). An explicit JAXCNN_COMPILATION_CACHE (a directory, or "off") is kept, and then nothing is set."""
  if "JAXCNN_COMPILATION_CACHE" not in os.environ:
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
      base = base.parent  # the directory every worker's basetemp lives in
    directory = base / "jax-compilation"
    directory.mkdir(parents=True, exist_ok=True)
    for key, value in _compilation_cache_env(str(directory)).items():
      os.environ.setdefault(key, value)
  yield


def pytest_collection_modifyitems(config, items):
  """Tests marked `slow` run only with JAXCNN_SLOW_TESTS=1 (the default run stays under ~10 min)."""
  if os.environ.get("JAXCNN_SLOW_TESTS") == "1":
    return
  skip = pytest.mark.skip(reason="slow test: set JAXCNN_SLOW_TESTS=1 to run it")
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(skip)
