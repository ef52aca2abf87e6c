"""The persistent JAX compilation cache the experiment commands use: compile a program once per machine.

JAX can store every compiled XLA executable on disk and load it instead of compiling again when a later
process builds the same program (same computation, devices, flags, jax/jaxlib version). The experiment
commands turn it on by default, in a per-user directory:

  $XDG_CACHE_HOME/jaxcnn/jax-compilation    (~/.cache/jaxcnn/jax-compilation without XDG_CACHE_HOME)

Where it lives, in order of precedence:

  1. the setting passed to `enable` (the commands' `--config.compilation_cache=DIR|off`; "" = not set),
  2. the environment variable JAXCNN_COMPILATION_CACHE=DIR|off,
  3. JAX's own `jax_compilation_cache_dir` (JAX_COMPILATION_CACHE_DIR) when that is already set,
  4. the per-user directory above.

"off" (or "0", "false", "no", "none") disables it. Several processes may share the directory (the
processes of a multi-process job, several commands at once): the cache's size limit is set, which makes
JAX guard every read and write with a file lock (`filelock`), so no process reads a half-written entry.
Every program is stored whatever its compile time or size (JAX's defaults skip programs compiling in
under a second, and a command compiles dozens of those). A directory that cannot be created or written
is reported with one warning line on stderr and the command runs without the cache.

`stats()` counts this process' cache hits and misses (JAX monitoring events) for the run summary.
"""
from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import threading
from typing import Any

ENV_VAR = "JAXCNN_COMPILATION_CACHE"
OFF_VALUES = frozenset({"off", "0", "false", "no", "none", "disabled"})
# The cache's size limit: beyond it JAX evicts the least recently used entries. Setting a limit is also
# what turns on JAX's file lock around cache reads and writes (safe sharing between processes).
MAX_BYTES = 4 << 30

_HIT = "/jax/compilation_cache/cache_hits"
_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
_SAVED = "/jax/compilation_cache/compile_time_saved_sec"

_lock = threading.Lock()
_state: dict[str, Any] = {"enabled": False, "dir": None, "source": None, "warning": None}
_counts = {"hits": 0, "requests": 0, "seconds_saved": 0.0}
_listening = False


def default_dir() -> pathlib.Path:
  """$XDG_CACHE_HOME/jaxcnn/jax-compilation, or ~/.cache/jaxcnn/jax-compilation."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "jaxcnn" / "jax-compilation"


def resolve(setting: str | None = None) -> tuple[pathlib.Path | None, str]:
  """(directory or None when disabled, where the choice came from: "config", "env", "jax" or "default").

  Args:
    setting: an explicit DIR or "off"; None or "" defers to the environment and the defaults.
  """
  import jax

  for value, source in ((setting, "config"), (os.environ.get(ENV_VAR), "env")):
    if value is not None and str(value).strip():
      value = str(value).strip()
      if value.lower() in OFF_VALUES:
        return None, source
      return pathlib.Path(value).expanduser(), source
  if jax.config.jax_compilation_cache_dir:
    return pathlib.Path(jax.config.jax_compilation_cache_dir), "jax"
  return default_dir(), "default"


def _check_writable(path: pathlib.Path) -> str | None:
  """None when `path` can be created and written, else the reason in a few words."""
  try:
    path.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".probe-", dir=path)
    os.close(fd)
    os.unlink(probe)
  except OSError as err:
    return err.strerror or type(err).__name__
  return None


def _listen(event: str, *args, **kwargs) -> None:
  if event == _HIT:
    with _lock:
      _counts["hits"] += 1
  elif event == _REQUEST:
    with _lock:
      _counts["requests"] += 1


def _listen_duration(event: str, duration: float, *args, **kwargs) -> None:
  if event == _SAVED:
    with _lock:
      _counts["seconds_saved"] += max(float(duration), 0.0)


def enable(setting: str | None = None) -> dict[str, Any]:
  """Configures JAX's persistent compilation cache for this process (before its first compilation);
  returns `stats()`.

  Args:
    setting: DIR, "off", or None/"" for the environment variable and defaults (see the module docstring).

  A directory that cannot be written is reported as one warning line on stderr; the process then runs
  without the cache (compiling as it would have without one).
  """
  import jax
  import jax.monitoring

  global _listening
  path, source = resolve(setting)
  _state.update(enabled=False, dir=None, source=source, warning=None)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
  else:
    problem = _check_writable(path)
    if problem is not None:
      _state["warning"] = f"cannot write {path}: {problem}"
      print(f"warning: compilation cache off: cannot write {path} ({problem}); set {ENV_VAR}=DIR or "
            f"--config.compilation_cache=DIR to move it, or =off", file=sys.stderr)
      jax.config.update("jax_enable_compilation_cache", False)
    else:
      jax.config.update("jax_enable_compilation_cache", True)
      jax.config.update("jax_compilation_cache_dir", str(path))
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
      jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
      _state.update(enabled=True, dir=str(path))
  if not _listening:
    jax.monitoring.register_event_listener(_listen)
    jax.monitoring.register_event_duration_secs_listener(_listen_duration)
    _listening = True
  return stats()


def stats() -> dict[str, Any]:
  """{"enabled", "dir", "source", "hits", "misses", "seconds_saved", "warning"} for this process:
  hits are programs loaded from the cache, misses programs compiled (and stored) while it was on."""
  with _lock:
    hits, requests, saved = _counts["hits"], _counts["requests"], _counts["seconds_saved"]
  return {"enabled": _state["enabled"], "dir": _state["dir"], "source": _state["source"], "hits": hits,
          "misses": requests - hits, "seconds_saved": round(saved, 3), "warning": _state["warning"]}


def describe(info: dict[str, Any] | None = None) -> str:
  """One line for a command's report, e.g. "compilation cache: 31 hits, 2 misses (~/.cache/...)"."""
  info = stats() if info is None else info
  if not info["enabled"]:
    return "compilation cache: off" + (f" ({info['warning']})" if info["warning"] else "")
  return (f"compilation cache: {info['hits']} hits, {info['misses']} misses, "
          f"{info['seconds_saved']:.1f} s of compilation saved ({info['dir']})")
