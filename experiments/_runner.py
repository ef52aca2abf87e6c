"""What every experiment shares: flags, workdir, logging, error -> exit code, the run summary.

An experiment module defines `get_config()` (an ml_collections ConfigDict) and `main(config, workdir)`
and ends with `if __name__ == "__main__": run(__name__, get_config, main)`. Then

  python -m experiments.<name> [--workdir=DIR] [--config.key=value ...]

overrides any config value (as in the Flax examples and big_vision). Errors that jaxcnn raises on
purpose (`jaxcnn.errors.JaxcnnError`) are printed as one line, without a traceback, and the process exits
with the error's code: 2 for bad data/config, 3 for a non-finite loss.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import platform
import sys
from typing import Any, Callable

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
  """Writes JSON atomically (tmp file + rename), so a killed run never leaves half a file."""
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_jsonable) + "\n")
  os.replace(tmp, path)


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


def run(name: str, get_config: Callable[[], Any], main: Callable[[Any, pathlib.Path], Any]) -> None:
  """Parses flags, sets up logging and the workdir, calls `main(config, workdir)`, maps errors to exit codes."""
  module_name = name.rsplit(".", 1)[-1] if name != "__main__" else pathlib.Path(sys.argv[0]).stem
  config_flags.DEFINE_config_dict("config", get_config(), f"{module_name} configuration.")
  flags.DEFINE_string("workdir", None, f"Run directory (default runs/{module_name}/<timestamp>); "
                      "re-running with the same workdir resumes from its latest checkpoint.")

  def _main(argv):
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    for noisy in ("absl", "jax._src", "orbax", "tensorflow_datasets"):
      logging.getLogger(noisy).setLevel(logging.WARNING)
    config = flags.FLAGS.config
    workdir = pathlib.Path(flags.FLAGS.workdir) if flags.FLAGS.workdir else default_workdir(module_name)
    try:
      main(config, workdir)
    except errors.JaxcnnError as err:
      print(f"error: {err}", file=sys.stderr)
      sys.exit(err.exit_code)
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr)
      sys.exit(130)

  app.run(_main)
