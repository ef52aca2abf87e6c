"""Test setup: 4 host CPU devices (1 for the processes the tests start, unless a test asks for more),
strict JAX rank promotion, one persistent compilation cache for the session, and the test tiers (default,
extended, slow), before any test imports jax.

XLA_FLAGS and JAX's cache variables must be set before jax is imported, so it is done here, at
collection time.
"""
from __future__ import annotations

import os
import pathlib
import re
import shutil
import sys
import tempfile

# 4 host devices for the data-parallel tests. On a loaded 2-core machine the 4 device threads of one
# cross-device sum can be scheduled far apart; XLA's CPU collectives abort the process after 40 s by
# default, so the tests allow 5 minutes before calling a collective stuck.
# The first process of the session (the xdist controller) records the flags in JAXCNN_TEST_XLA_FLAGS, which
# its workers inherit: XLA_FLAGS itself is changed for child processes below.
os.environ.setdefault("JAXCNN_TEST_XLA_FLAGS", os.environ.get(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=4 "
    "--xla_cpu_collective_call_terminate_timeout_seconds=300 --xla_cpu_collective_timeout_seconds=300"))
os.environ["XLA_FLAGS"] = os.environ["JAXCNN_TEST_XLA_FLAGS"]
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent compilation cache for the whole session: the test processes (every xdist worker) and
# every command or worker process a test starts. Compiling is most of the suite's time on a CPU, and many
# tests compile the same programs (the same tiny model and config through fit, the same command); each is
# compiled once and then loaded, as a user's second run loads it (jaxcnn/_compile_cache.py). A cached
# program is the executable the compiler produced, so no result changes. The directory is made here by
# the first process (the xdist controller, whose environment the workers inherit) and removed when it
# exits. An explicit JAXCNN_COMPILATION_CACHE (a directory, or "off") is kept, and then nothing is set.
_SESSION_CACHE_OWNER = False
if "JAXCNN_COMPILATION_CACHE" not in os.environ and "JAXCNN_TEST_COMPILATION_CACHE" not in os.environ:
  os.environ["JAXCNN_TEST_COMPILATION_CACHE"] = tempfile.mkdtemp(prefix="jaxcnn-test-compilation-")
  _SESSION_CACHE_OWNER = True
if "JAXCNN_TEST_COMPILATION_CACHE" in os.environ:
  # JAX's own variables (read by jax at import, here and in every subprocess) and jaxcnn's (read by the
  # experiment commands, which store every program as a user's run does). The test processes store only
  # programs that took a second or more to compile: with the size limit (which every process sharing the
  # directory must set alike: JAX keeps its access-time files only then), JAX rescans the whole directory
  # under a file lock at every write, and writing the thousands of small programs made a session half as
  # fast again.
  _directory = os.environ["JAXCNN_TEST_COMPILATION_CACHE"]
  for _key, _value in {"JAXCNN_COMPILATION_CACHE": _directory, "JAX_COMPILATION_CACHE_DIR": _directory,
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "1",
                       "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
                       "JAX_COMPILATION_CACHE_MAX_SIZE": str(4 << 30)}.items():
    os.environ.setdefault(_key, _value)

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

# The processes the tests start (experiment commands, scripts) see one CPU device, as a user's command on a
# laptop does, unless a test asks for more: the multi-device and multi-process command tests set their own
# XLA_FLAGS. One device compiles a fifth less than four (no SPMD partitioning, no collectives), and most
# of the suite's time is those processes compiling. This process keeps its 4 devices: XLA reads the flags
# once, when its CPU backend starts, which is made to happen here, before the variable changes.
jax.devices()
os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+",
                                 "--xla_force_host_platform_device_count=1", os.environ["JAXCNN_TEST_XLA_FLAGS"])

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from helpers import SHARED_DATASETS  # noqa: E402


@pytest.fixture(scope="session")
def shared_datasets() -> pathlib.Path:
  """../shared/datasets (real MNIST / Fashion-MNIST IDX files); skips where it is absent."""
  if not (SHARED_DATASETS / "mnist").is_dir():
    pytest.skip(f"real datasets not found at {SHARED_DATASETS}")
  return SHARED_DATASETS


def pytest_unconfigure(config):
  """The process that made the session's compilation cache removes it."""
  if _SESSION_CACHE_OWNER:
    shutil.rmtree(os.environ["JAXCNN_TEST_COMPILATION_CACHE"], ignore_errors=True)


# Test modules whose tests share an expensive computation (a module-scoped reference run, a per-model or
# per-op result cached by the module): under `pytest -n N --dist loadgroup` (pyproject's addopts) each
# group runs on one worker, so the shared computation is done once, not once per worker. The value names
# the parameter that keys the cache (its tests form one group per value), or None: one group per module.
_SHARED_WORK_GROUPS = {
    "test_registry.py": "name", "test_transforms.py": "name",
    "test_fit.py": None, "test_trained_model.py": None, "test_rel_storage.py": None,
    "test_rel_checkpoint.py": None, "test_rel_kill.py": None, "test_exp_transfer.py": None,
}


def _group_shared_work(items) -> None:
  for item in items:
    module = item.path.name
    if module not in _SHARED_WORK_GROUPS:
      continue
    key = _SHARED_WORK_GROUPS[module]
    params = getattr(getattr(item, "callspec", None), "params", {})
    group = module if key is None or key not in params else f"{module}:{params[key]}"
    item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_modifyitems(config, items):
  """Groups tests that share work (above) and skips the tiers the run does not ask for.

  - `extended`: a repetition of a check the default run makes (another example of the same code path, the
    command-line twin of an in-process test, a bigger model through the same engine); run with
    JAXCNN_EXTENDED_TESTS=1. CI runs them after the default run (.ci/run).
  - `slow`: long checks (the full kill campaign, full-data loads, every model through every path); run
    with JAXCNN_SLOW_TESTS=1, which runs the extended tier too.
  """
  _group_shared_work(items)
  slow = os.environ.get("JAXCNN_SLOW_TESTS") == "1"
  extended = slow or os.environ.get("JAXCNN_EXTENDED_TESTS") == "1"
  skip_slow = pytest.mark.skip(reason="slow test: set JAXCNN_SLOW_TESTS=1 to run it")
  skip_extended = pytest.mark.skip(reason="extended test: set JAXCNN_EXTENDED_TESTS=1 to run it")
  for item in items:
    if "slow" in item.keywords and not slow:
      item.add_marker(skip_slow)
    elif "extended" in item.keywords and not extended:
      item.add_marker(skip_extended)
