"""One run per workdir: the workdir lock, an OS lock that dies with its process.

The lock. `workdir_lock(workdir)` takes an exclusive `fcntl.flock` on `workdir/.lock` (created with the
workdir if missing) and writes the holder into it: pid, host, start time, command. The kernel drops a
flock when its process dies, however it dies (kill -9 included), so a crashed run never blocks its own
resume and there is no stale-lock cleanup to get wrong. A second run on a busy workdir gets a
`WorkdirBusyError` (exit code 2) naming the holder, and has changed nothing: it opened an existing file
and created nothing. The lock is re-entrant within a process (an experiment command holds it for its
whole run, and `fit` inside it takes it again); on a clean release the holder line is cleared.

A multi-process job holds one lock: process 0 takes `workdir/.lock` (and then checks that no process of
an earlier job still holds a `.lock.process-<i>`), the decision is broadcast to every process, and each
process i >= 1 then takes `workdir/.lock.process-<i>` and checks that `.lock` names its own job (a
random token of process 0; this also catches a workdir that is not one directory shared by every
process). Every process learns every other's result (an all-gather) before anything is written, so a
second job is refused, whole, whichever of its processes starts first; and a process of a dead job that
lives on for a few seconds (until its heartbeat times out) still blocks a new job.

On a filesystem shared between hosts, flock is only as good as the filesystem's locking: local
filesystems and NFS (Linux clients map flock to NFS byte-range locks, which the server arbitrates) lock
across processes and hosts; NFS mounted with `local_lock=flock`/`nolock`, and some FUSE filesystems,
lock only within one host. Where flock is not supported at all (ENOLCK, EOPNOTSUPP) the run warns that
its workdir is unprotected and goes on. Where a lock is taken over a `.lock` that still names a holder on
another host (a run that did not end cleanly, or one on a filesystem whose locks do not reach across
hosts), a warning names that holder.

The writes themselves (atomic, one line on failure) are jaxcnn.storage's.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno as errno_lib
import fcntl
import json
import logging
import os
import pathlib
import socket
import sys
import threading
import time
import uuid
import warnings

from jaxcnn.errors import ConfigError, StorageError, WorkdirBusyError
from jaxcnn.storage import NO_LOCKING, check_writable, storage_errors

_LOG = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_PROCESS_LOCK = ".lock.process-{}"


# -- the lock ------------------------------------------------------------------------------------------

def _command() -> str:
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  argv = list(sys.argv)
  if spec is not None and spec.name and argv:
    argv[0] = f"python -m {spec.name}"
  text = " ".join(argv)
  return text if len(text) <= 300 else text[:297] + "..."


def _holder_text(info: dict) -> str:
  when = info.get("started", "?")
  where = f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {when}"
  if info.get("process") is not None:
    where = f"process {info['process']} of a job: " + where
  if info.get("command"):
    where += f" ({info['command']})"
  return where


def _read_info(fd: int) -> dict:
  try:
    raw = os.pread(fd, 65536, 0)
    return json.loads(raw.decode()) if raw.strip() else {}
  except (OSError, ValueError):
    return {}


def _busy(path: pathlib.Path, fd: int, workdir: pathlib.Path) -> WorkdirBusyError:
  info = {}
  deadline = time.monotonic() + 1.0
  while not info and time.monotonic() < deadline:  # the holder writes its line just after locking
    info = _read_info(fd)
    if not info:
      time.sleep(0.02)
  holder = _holder_text(info) if info else "a run that is starting (it has not written its details yet)"
  return WorkdirBusyError(f"workdir {workdir} is in use by another run: {holder}; wait for it to end, stop it, "
                          f"or use another workdir (lock file {path})")


def _open_locked(path: pathlib.Path, workdir: pathlib.Path) -> tuple[int, bool]:
  """(fd, locked) for `path` flocked exclusively by this process; locked is False where the filesystem
  cannot lock (a warning says so). Raises WorkdirBusyError or StorageError."""
  while True:
    with storage_errors(path):
      try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
      except FileNotFoundError:  # the workdir was removed by a run that created it and wrote nothing
        workdir.mkdir(parents=True, exist_ok=True)
        continue
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      err = _busy(path, fd, workdir)
      os.close(fd)
      raise err from None
    except OSError as err:
      if err.errno in NO_LOCKING:
        warnings.warn(f"{path}: this filesystem cannot lock files ({os.strerror(err.errno)}); the workdir is "
                      "not protected against a second run using it at the same time", stacklevel=4)
        return fd, False
      os.close(fd)
      raise
    # A run that removed the file (its unused workdir) between our open and flock: lock the new one.
    try:
      same = os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
      same = False
    if same:
      return fd, True
    os.close(fd)


def _write_info(fd: int, path: pathlib.Path, info: dict) -> None:
  previous = _read_info(fd)
  if previous.get("host") and previous.get("host") != info["host"]:
    _LOG.warning("%s named %s as its holder: that run ended without releasing it, or it is still running and "
                 "this filesystem's locks do not reach across hosts; if it is still running, stop this one",
                 path, _holder_text(previous))
  data = (json.dumps(info) + "\n").encode()
  with storage_errors(path):
    os.pwrite(fd, data, 0)
    os.ftruncate(fd, len(data))
    os.fsync(fd)


def _probe_free(path: pathlib.Path, workdir: pathlib.Path) -> None:
  """Raises WorkdirBusyError when a live process holds `path` (a lock file of another job's process)."""
  try:
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
  except OSError:
    return
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    raise _busy(path, fd, workdir) from None
  except OSError:
    pass
  finally:
    os.close(fd)  # releases the probe's lock


@dataclasses.dataclass
class _Held:
  workdir: pathlib.Path
  files: list  # [(fd, path)]
  created: list  # directories this lock created (outermost first)
  remove_if_unused: bool
  count: int = 1


_HELD: dict[str, _Held] = {}
_GUARD = threading.Lock()


def _make_dirs(workdir: pathlib.Path) -> list[pathlib.Path]:
  """Creates `workdir` and missing parents; returns those created (outermost first)."""
  if workdir.exists() and not workdir.is_dir():
    raise StorageError(f"{workdir}: not a directory (a file is in the workdir's place)", errno=errno_lib.ENOTDIR,
                       filename=workdir)
  missing = []
  for parent in [workdir, *workdir.parents]:
    if parent.exists():
      break
    missing.append(parent)
  with storage_errors(workdir):
    workdir.mkdir(parents=True, exist_ok=True)
  return list(reversed(missing))


def _info(token: str, process: int | None) -> dict:
  info = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "command": _command(), "job": token}
  if process is not None:
    info["process"] = process
  return info


def _lock_single(workdir: pathlib.Path, token: str, check=None) -> list:
  """Takes `.lock`; `check()` (if given) runs once it is held and before anything is written to it."""
  path = workdir / LOCK_NAME
  fd, _ = _open_locked(path, workdir)
  try:
    if check is not None:
      check()
    _write_info(fd, path, _info(token, None))
    check_writable(workdir)
  except BaseException:
    os.close(fd)
    raise
  return [(fd, path)]


_ERROR_CLASSES = {1: WorkdirBusyError, 2: StorageError, 3: ConfigError}
_MESSAGE_BYTES = 2048


def _encode(status: int, message: str):
  import numpy as np
  raw = message.encode()[:_MESSAGE_BYTES - 1]
  out = np.zeros(_MESSAGE_BYTES, np.uint8)
  out[0] = status
  out[1:1 + len(raw)] = np.frombuffer(raw, np.uint8)
  return out


def _decode(array) -> tuple[int, str]:
  import numpy as np
  array = np.asarray(array, np.uint8)
  return int(array[0]), bytes(array[1:]).rstrip(b"\0").decode(errors="replace")


def _status_of(err: Exception) -> int:
  return next(code for code, cls in _ERROR_CLASSES.items() if isinstance(err, cls))


def _lock_job(workdir: pathlib.Path) -> list:
  """The job's lock (see the module docstring): process 0 takes `.lock`, each other process its own file."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils

  index, count = jax.process_index(), jax.process_count()
  files, status, message = [], 0, ""
  token = uuid.uuid4().hex
  if index == 0:
    try:
      # `.lock` first (a live job is named by its process 0), then no process of an earlier job left alive.
      files = _lock_single(workdir, token, check=lambda: [_probe_free(other, workdir)
                                                          for other in sorted(workdir.glob(".lock.process-*"))])
    except (WorkdirBusyError, StorageError, ConfigError) as err:
      status, message = _status_of(err), str(err)
  decided = multihost_utils.broadcast_one_to_all(
      np.concatenate([_encode(status, message), np.frombuffer(token.encode(), np.uint8)]))
  status, message = _decode(decided[:_MESSAGE_BYTES])
  token = bytes(np.asarray(decided[_MESSAGE_BYTES:], np.uint8)).decode()
  if status:
    raise _ERROR_CLASSES[status](message)
  if index:
    try:
      path = workdir / _PROCESS_LOCK.format(index)
      fd, _ = _open_locked(path, workdir)
      files = [(fd, path)]
      _write_info(fd, path, _info(token, index))
      _check_job_token(workdir, token, index)
    except (WorkdirBusyError, StorageError, ConfigError) as err:
      status, message = _status_of(err), str(err)
  results = multihost_utils.process_allgather(_encode(status, message))
  failed = [(i, *_decode(row)) for i, row in enumerate(np.asarray(results).reshape(count, -1)) if row[0]]
  if failed:
    for fd, _ in files:
      os.close(fd)
    process, status, message = failed[0]
    raise _ERROR_CLASSES[status](message if message.startswith("multi-process:") else
                                 f"multi-process: process {process}: {message}")
  return files


def _check_job_token(workdir: pathlib.Path, token: str, index: int) -> None:
  """Raises ConfigError when `.lock` does not name this job: the processes do not share one workdir."""
  path = workdir / LOCK_NAME
  deadline = time.monotonic() + 10.0  # a shared filesystem may show process 0's write a little later
  while True:
    try:
      if json.loads(path.read_text()).get("job") == token:
        return
    except (OSError, ValueError):
      pass
    if time.monotonic() > deadline:
      raise ConfigError(f"multi-process: process {index} does not see the workdir lock {path} that process 0 of "
                        "its job took: the workdir must be one directory every process shares")
    time.sleep(0.1)


def _release(held: _Held) -> None:
  unused = held.remove_if_unused and all(p.name.startswith(LOCK_NAME) for p in held.workdir.iterdir())
  for fd, path in held.files:
    with contextlib.suppress(OSError):
      if unused:
        path.unlink()  # while still holding it: a run that opened it meanwhile retries (see _open_locked)
      else:
        os.ftruncate(fd, 0)  # a cleanly released lock names no holder
    os.close(fd)
  if unused:
    for directory in reversed(held.created):
      with contextlib.suppress(OSError):
        directory.rmdir()  # only if empty: another process of the job may not have removed its file yet


@contextlib.contextmanager
def workdir_lock(workdir, *, remove_if_unused: bool = False):
  """Holds the workdir's lock while active (re-entrant within a process); see the module docstring.

  Creates the workdir (and parents) if missing, takes the lock, records the holder and checks that the
  workdir can be written, before anything else is written.

  Args:
    workdir: the run's directory.
    remove_if_unused: on release by the outermost holder, remove the lock file(s) and the directories this
      lock created when nothing else was written in the workdir (a command that failed its checks leaves no
      workdir behind).

  Raises:
    WorkdirBusyError: another live run (or another job's process) holds the lock (exit code 2).
    StorageError: the workdir cannot be created or written (exit code 5).
    ConfigError: in a multi-process job, the processes do not share the workdir.
  """
  workdir = pathlib.Path(workdir).absolute()
  key = os.path.realpath(workdir)
  with _GUARD:
    held = _HELD.get(key)
    if held is not None:
      held.count += 1
  if held is None:
    import jax
    created = _make_dirs(workdir)
    try:
      files = _lock_job(workdir) if jax.process_count() > 1 else _lock_single(workdir, uuid.uuid4().hex)
    except BaseException:
      if created and created[-1] == workdir:  # this call made the workdir: the lock files in it are its own
        for lock_file in workdir.glob(LOCK_NAME + "*"):
          with contextlib.suppress(OSError):
            lock_file.unlink()
      for directory in reversed(created):  # a refused run leaves nothing it created
        with contextlib.suppress(OSError):
          directory.rmdir()
      raise
    held = _Held(workdir, files, created, remove_if_unused)
    with _GUARD:
      _HELD[key] = held
  try:
    yield workdir
  finally:
    with _GUARD:
      held.count -= 1
      last = held.count == 0
      if last:
        del _HELD[key]
    if last:
      _release(held)


def holds_lock(workdir) -> bool:
  """Whether this process holds `workdir`'s lock."""
  with _GUARD:
    return os.path.realpath(pathlib.Path(workdir).absolute()) in _HELD
