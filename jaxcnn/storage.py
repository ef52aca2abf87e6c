"""Writing a run's files: atomic writes, and a failed write as one line naming the path.

Every file a run writes goes through `write_atomic`/`atomic_path` (a temporary file beside it, fsync,
rename: a file is whole or absent, never half-written, even if the process dies) or, for writers with
their own files (Orbax, TensorBoard), through `storage_errors`. A write that fails for lack of space,
quota, permission, or on a read-only filesystem raises `jaxcnn.errors.StorageError` (exit code 5) naming
the path and the OS error, e.g. `runs/x/checkpoints/12: No space left on device; the disk is full: ...`,
instead of the error's own traceback. `check_writable` refuses an unwritable directory before a run
starts.

`inject_faults(fn)` installs a test hook: `fn(path)` is called at every write site before it writes (and
may raise an OSError, e.g. ENOSPC), so the reliability tests can fail each write site in turn without a
full disk.
"""
from __future__ import annotations

import contextlib
import errno as errno_lib
import logging
import os
import pathlib
import re
import sys

from jaxcnn.errors import StorageError

_LOG = logging.getLogger(__name__)

# OS errors that mean "this storage cannot take the write" (as opposed to a bug).
STORAGE_ERRNOS = frozenset({errno_lib.ENOSPC, errno_lib.EDQUOT, errno_lib.EROFS, errno_lib.EACCES, errno_lib.EPERM,
                            errno_lib.EIO, errno_lib.EFBIG, errno_lib.ENOTDIR, errno_lib.EISDIR})
# flock errors meaning "this filesystem cannot lock files" (NFS without a lock daemon, some FUSE and
# network mounts), as opposed to a lock held by another process: the workdir lock and the dataset
# preparation lock warn and go on unlocked.
NO_LOCKING = frozenset({errno_lib.ENOLCK, errno_lib.EOPNOTSUPP, errno_lib.ENOSYS, errno_lib.EINVAL})
_HINTS = {
    errno_lib.ENOSPC: "the disk is full: free space on it, or use another workdir",
    errno_lib.EDQUOT: "the disk quota is exhausted: free space, or use another workdir",
    errno_lib.EROFS: "a read-only file system: use a writable workdir",
    errno_lib.EACCES: "no permission to write there: use a writable workdir",
    errno_lib.EPERM: "no permission to write there: use a writable workdir",
}


# -- fault injection (tests) ---------------------------------------------------------------------------

_FAULT_HOOK = None


@contextlib.contextmanager
def inject_faults(fn):
  """While active, `fn(path)` is called before every write of a run (atomic files, Orbax saves, TensorBoard
  events, the writability probe); an OSError it raises is handled as that write's own failure. For
  tests: a full disk at one write site, without a full disk."""
  global _FAULT_HOOK
  previous, _FAULT_HOOK = _FAULT_HOOK, fn
  try:
    yield
  finally:
    _FAULT_HOOK = previous


def _fault(path) -> None:
  if _FAULT_HOOK is not None:
    _FAULT_HOOK(pathlib.Path(path))


# -- storage errors ------------------------------------------------------------------------------------

def _errno_in_text(text: str) -> int | None:
  """The OS error number an error message reports (tensorstore: `[os_error_code='28']`, or the text)."""
  match = re.search(r"os_error_code='?(\d+)", text)
  if match and int(match.group(1)) in STORAGE_ERRNOS:
    return int(match.group(1))
  for code in (errno_lib.ENOSPC, errno_lib.EDQUOT, errno_lib.EROFS):
    if os.strerror(code) in text:
      return code
  return None


def storage_error(err: BaseException, path=None) -> StorageError | None:
  """`err` as a StorageError naming `path` (or the OS error's own file), or None when `err` is not a
  storage failure. Knows OSErrors and the errors Orbax/tensorstore raise for a failed write (a ValueError
  `RESOURCE_EXHAUSTED: ... No space left on device [os_error_code='28']`)."""
  if isinstance(err, StorageError):
    return err
  if isinstance(err, OSError) and err.errno in STORAGE_ERRNOS:
    code = err.errno
    where = path if path is not None else err.filename
  else:
    code = _errno_in_text(str(err))
    if code is None:
      return None
    where = path
    if where is None:
      match = re.search(r'(?:Failed writing|local file): "([^"]+)"', str(err))
      where = match.group(1) if match else "the workdir"
  hint = _HINTS.get(code)
  message = f"{where}: {os.strerror(code)}" + (f"; {hint}" if hint else "")
  return StorageError(message, errno=code, filename=where)


@contextlib.contextmanager
def storage_errors(path):
  """Inside: a failed write of the storage (see `storage_error`) is raised as a StorageError naming `path`
  (the original error is kept as its `original` attribute); other errors pass unchanged."""
  try:
    _fault(path)
    yield
  except Exception as err:  # noqa: BLE001  (Orbax reports storage failures as ValueError)
    translated = storage_error(err, path)
    if translated is None or translated is err:
      raise
    translated.original = err
    raise translated from None


def _fsync_path(path: pathlib.Path) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary path beside `path` to write; on success it is fsynced and renamed to `path`
  (whole or absent, even if the process dies); on failure it is removed, and a storage failure is raised
  as a StorageError naming `path`. Parent folders are created."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  with storage_errors(path):
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      yield tmp
      _fsync_path(tmp)
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(OSError):
        tmp.unlink()
      raise


def write_atomic(path, content: str | bytes) -> None:
  """Writes `content` (text as UTF-8) to `path` atomically (see `atomic_path`)."""
  data = content.encode() if isinstance(content, str) else content
  with atomic_path(path) as tmp:
    tmp.write_bytes(data)


def check_writable(directory) -> None:
  """Creates `directory` if needed and writes, syncs and removes a probe file in it.

  Raises:
    StorageError: a file is in its place, or it cannot be written (read-only, no permission, full).
  """
  directory = pathlib.Path(directory)
  if directory.exists() and not directory.is_dir():
    raise StorageError(f"{directory}: not a directory (a file is in the workdir's place)",
                       errno=errno_lib.ENOTDIR, filename=directory)
  probe = directory / f".write-probe-{os.getpid()}"
  with storage_errors(directory):
    try:
      directory.mkdir(parents=True, exist_ok=True)
      with open(probe, "wb") as f:
        f.write(b"jaxcnn")
        f.flush()
        os.fsync(f.fileno())
    finally:
      with contextlib.suppress(OSError):
        probe.unlink()


# -- Orbax's background noise on a failed write -----------------------------------------------------------

class _StorageNoiseFilter(logging.Filter):
  """Drops Orbax's logged tracebacks of a failed write: the run reports it as one StorageError line.

  With `orbax_tasks_only`, only asyncio's reports of an abandoned Orbax task ("Task exception was never
  retrieved ... coro=<... defined at .../orbax/...>") are dropped; any other asyncio error passes.
  """

  def __init__(self, orbax_tasks_only: bool = False):
    super().__init__()
    self._orbax_tasks_only = orbax_tasks_only

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    message = record.getMessage()
    if self._orbax_tasks_only and not (message.startswith("Task exception was never retrieved")
                                       and re.search(r"defined at \S*orbax", message)):
      return True
    texts = [message]
    if record.exc_info and record.exc_info[1] is not None:
      texts.append(str(record.exc_info[1]))
    if any(_errno_in_text(t) is not None for t in texts):
      _LOG.debug("dropped a logged traceback of a failed Orbax write: %s", message.splitlines()[0])
      return False
    return True


_quieted = False


def quiet_orbax_storage_noise() -> None:
  """Keeps a failed Orbax write from printing its tracebacks (installed once, by the Checkpointer).

  A failed asynchronous save makes Orbax log each failing background thread's traceback, tensorstore
  report writes still in flight to the event loop Orbax has already closed ("Event loop is closed"), and
  the interpreter report their abandoned coroutines at exit, and asyncio report the failed tasks nobody
  awaited when they are collected ("Task exception was never retrieved"): dozens of tracebacks around the one error
  the save raises, which the Checkpointer translates. Only those are dropped: records and unraisable
  exceptions of other origins pass as before.
  """
  global _quieted
  if _quieted:
    return
  _quieted = True
  logging.getLogger("absl").addFilter(_StorageNoiseFilter())
  logging.getLogger("asyncio").addFilter(_StorageNoiseFilter(orbax_tasks_only=True))
  previous = sys.unraisablehook

  def hook(unraisable):
    exc, obj = unraisable.exc_value, unraisable.object
    code = getattr(obj, "cr_code", None)
    from_orbax = code is not None and "orbax" in code.co_filename
    closed_loop = isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and obj is None
    if from_orbax or closed_loop:
      _LOG.debug("dropped an unraisable exception of an abandoned Orbax write: %r", exc)
      return
    previous(unraisable)

  sys.unraisablehook = hook


