"""How every experiment command runs: flags, the multi-process job, workdir, logging, error -> exit code.

An experiment module defines `get_config()` (an ml_collections ConfigDict whose `train` is fit's config)
and `main(config, workdir)` and ends with `if __name__ == "__main__": run(__name__, get_config, main)`.
Then

  python -m experiments.<name> [--workdir=DIR] [--config.key=value ...]

overrides any config value (as in the Flax examples and big_vision), e.g. `--config.train.weight_decay=1e-4`
on every command. Several processes run the same command to form one job (see `run`). Errors that jaxcnn raises on
purpose (`jaxcnn.errors.JaxcnnError`) are printed as one line, without a traceback, and the process exits
with the error's code (the table is in jaxcnn/errors.py): 2 for bad data/config or a busy workdir, 3 for
a non-finite loss, 4 for a lost peer, 5 for a workdir that cannot be written (a full disk), 130 for
Ctrl-C. Command-line mistakes (an unknown `--config.key`, a value of the wrong type, a stray argument)
are config errors too: one line, exit 2.

A command holds its workdir's lock (jaxcnn.train.workdir) from the start to the end of the run: a second
command on the same workdir is refused at once (exit 2, one line naming the holder) and changes nothing.
A command that fails its checks before writing anything leaves no workdir behind.

Every command compiles through JAX's persistent compilation cache (jaxcnn/_compile_cache.py), so a second
run loads its programs instead of compiling them: by default in $XDG_CACHE_HOME/jaxcnn/jax-compilation
(~/.cache/...), moved or turned off with `--config.compilation_cache=DIR|off` (a key every experiment's
config gets) or JAXCNN_COMPILATION_CACHE=DIR|off; summary.json's timing.compilation_cache counts the
hits and misses.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import platform
import sys
import time
from typing import Any, Callable

# When this process started running Python code of the project (before jax is imported): the origin of
# the end-to-end times experiments report.
PROCESS_START = time.time()

# Quiet TensorFlow/absl C++ logs should anything import them; the MNIST path never imports TensorFlow.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxcnn import errors  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The MNIST files that ship with the repo (see experiments/data/mnist/README.md).
SHIPPED_DATA = REPO_ROOT / "experiments" / "data"


def default_workdir(name: str) -> pathlib.Path:
  """runs/<name>/<UTC timestamp>, relative to the current directory."""
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  return pathlib.Path("runs") / name / stamp


def device_info() -> dict[str, Any]:
  """Device kind and count, process count, host: what summary.json records about the machine."""
  import jax
  devices = jax.devices()
  return {
      "device_kind": devices[0].device_kind,
      "platform": devices[0].platform,
      "device_count": len(devices),
      "process_count": jax.process_count(),
      "host": platform.node(),
      "jax_version": jax.__version__,
  }


def write_json(path: pathlib.Path, payload: dict[str, Any]) -> None:
  """Writes JSON atomically (tmp file, fsync, rename), so a killed run or a full disk never leaves half a
  file; a failed write is a StorageError naming `path`."""
  from jaxcnn.storage import write_atomic
  write_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=_jsonable) + "\n")


def _jsonable(value):
  try:
    import numpy as np
    if isinstance(value, np.generic):
      return value.item()
    if isinstance(value, np.ndarray):
      return value.tolist()
  except ImportError:  # pragma: no cover
    pass
  if isinstance(value, pathlib.Path):
    return str(value)
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _usage_error(message: str) -> None:
  """A command-line mistake: one line on stderr, exit code 2 (as for any other config error)."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(errors.ConfigError.exit_code)


def _override_keys(argv: list[str]) -> list[str]:
  """The dotted keys of every `--config.<key>[=value]` argument (flag parsing stops at `--`)."""
  keys = []
  for arg in argv[1:]:
    if arg == "--":
      break
    for prefix in ("--config.", "-config.", "--noconfig.", "-noconfig."):
      if arg.startswith(prefix):
        keys.append(arg[len(prefix):].split("=", 1)[0])
  return keys


def check_overrides(config, argv: list[str]) -> None:
  """Exits 2 with one line naming the key when an override names a key the config lacks.

  ml_collections would otherwise fail with a KeyError traceback while the flag is being defined.
  """
  for key in _override_keys(argv):
    node = config
    for i, part in enumerate(key.split(".")):
      if not hasattr(node, "keys") or part not in node.keys():
        where = ".".join(key.split(".")[:i]) or "config"
        known = ", ".join(sorted(node.keys())) if hasattr(node, "keys") else "none (not a ConfigDict)"
        _usage_error(f"--config.{key}: unknown config key {part!r} in {where}; known keys: {known}")
      node = node[part]


def _parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing with a bad value (e.g. --config.train.epochs=abc) reported as one line and exit 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as err:
    _usage_error(str(err))


def _join_job(config) -> None:
  """Joins the multi-process job the environment describes (JAX_* variables, a TPU VM), first thing.

  Uses the config's `train.distributed_init_timeout_s` / `train.heartbeat_timeout_s`. Afterwards only
  process 0 prints: the other processes' stdout is discarded and their logs show warnings only (errors
  still reach stderr from every process).
  """
  from jaxcnn.train import DEFAULTS, maybe_initialize_distributed
  train = config.get("train", {}) if hasattr(config, "get") else {}
  multi = maybe_initialize_distributed(
      int(train.get("distributed_init_timeout_s", DEFAULTS["distributed_init_timeout_s"])),
      int(train.get("heartbeat_timeout_s", DEFAULTS["heartbeat_timeout_s"])))
  if multi:
    import jax
    if jax.process_index() != 0:
      sys.stdout = open(os.devnull, "w")  # noqa: SIM115  (for the life of the process)
      logging.getLogger().setLevel(logging.WARNING)


def _shared_workdir(name: str, given: str | None) -> pathlib.Path:
  """The run directory: --workdir, else runs/<name>/<UTC timestamp> chosen by process 0 for every process."""
  if given:
    return pathlib.Path(given)
  import jax
  if jax.process_count() == 1:
    return default_workdir(name)
  import numpy as np
  from jax.experimental import multihost_utils
  stamp = int(multihost_utils.broadcast_one_to_all(np.int64(time.time())))
  when = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
  return pathlib.Path("runs") / name / when


def _exit(code: int, *, at_once: bool = False) -> None:
  """Exits with `code`; `at_once` skips waiting for background threads (an abandoned Orbax save: what
  was committed is kept, the rest is ignored on resume, as after a kill) and their noise at shutdown."""
  sys.stdout.flush()
  sys.stderr.flush()
  if at_once:
    logging.shutdown()
    os._exit(code)
  sys.exit(code)


# -- the persistent compilation cache (jaxcnn/_compile_cache.py) ----------------------------------------

def _add_compilation_cache_key(config) -> None:
  """Gives every experiment's config the key `compilation_cache`: "" (JAXCNN_COMPILATION_CACHE, else the
  per-user directory), a directory, or "off"."""
  if "compilation_cache" not in config.keys():
    with config.unlocked():
      config.compilation_cache = ""


def _enable_compilation_cache(config) -> None:
  """Turns on the persistent compilation cache before anything compiles (see jaxcnn/_compile_cache.py)."""
  from jaxcnn import _compile_cache
  setting = config.get("compilation_cache", "") if hasattr(config, "get") else ""
  if not isinstance(setting, str):
    _usage_error(f"--config.compilation_cache={setting!r}: expected a directory, 'off' or ''")
  _compile_cache.enable(setting)


def compilation_cache_info() -> dict[str, Any]:
  """This process' compilation cache: directory, hits, misses, seconds saved (for summary.json)."""
  from jaxcnn import _compile_cache
  return _compile_cache.stats()


def _report_compilation_cache() -> None:
  from jaxcnn import _compile_cache
  print(_compile_cache.describe())


def run(name: str, get_config: Callable[[], Any], main: Callable[[Any, pathlib.Path], Any]) -> None:
  """Parses flags, joins a multi-process job, sets up logging and the workdir, calls `main(config, workdir)`,
  maps errors to exit codes.

  The job is joined before anything else touches a device (data, model summaries): every process of a
  job runs this same command (the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
  variables, or a multi-host TPU VM, describe it). Then the workdir's lock is taken (every process of
  the job shares it); a workdir in which nothing else was written (the config or data failed their
  checks) is removed again at the end.
  """
  module_name = name.rsplit(".", 1)[-1] if name != "__main__" else pathlib.Path(sys.argv[0]).stem
  default_config = get_config()
  _add_compilation_cache_key(default_config)
  check_overrides(default_config, sys.argv)
  config_flags.DEFINE_config_dict("config", default_config, f"{module_name} configuration.")
  flags.DEFINE_string("workdir", None, f"Run directory (default runs/{module_name}/<timestamp>); "
                      "re-running with the same workdir resumes from its latest checkpoint. In a "
                      "multi-process job: a directory every process can write (a shared file system).")

  def _main(argv):
    if len(argv) > 1:
      _usage_error(f"unexpected arguments: {' '.join(argv[1:])} (settings are --config.<key>=<value>)")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
      logging.getLogger(noisy).setLevel(logging.WARNING)
    config = flags.FLAGS.config
    try:
      _enable_compilation_cache(config)
      _join_job(config)
      workdir = _shared_workdir(module_name, flags.FLAGS.workdir)
      from jaxcnn.train.workdir import workdir_lock
      with workdir_lock(workdir, remove_if_unused=True):
        main(config, workdir)
      _report_compilation_cache()
    except errors.JaxcnnError as err:
      # A stop on SIGTERM/Ctrl-C that committed its checkpoint is reported as such, not as an error.
      print(str(err) if isinstance(err, errors.Preempted) else f"error: {err}", file=sys.stderr)
      _exit(err.exit_code, at_once=isinstance(err, errors.StorageError))
    except KeyboardInterrupt:
      print("interrupted: stopped at once; the checkpoints committed so far are kept (re-run the same command "
            "to resume)", file=sys.stderr)
      _exit(130, at_once=True)
    except Exception as err:  # noqa: BLE001  (a failed write that no write site translated)
      from jaxcnn.storage import storage_error
      translated = storage_error(err)
      if translated is None:
        raise
      print(f"error: {translated}", file=sys.stderr)
      _exit(translated.exit_code, at_once=True)

  app.run(_main, flags_parser=_parse_flags)
