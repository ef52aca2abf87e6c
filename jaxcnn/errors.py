"""Errors that jaxcnn raises on purpose, and the exit codes experiments map them to.

Every error here also derives from the builtin class a caller would expect (`ValueError`,
`RuntimeError`, `FloatingPointError`, `OSError`), so code that only knows the builtin classes still
catches them. Experiments print `str(err)` as one line (no traceback) and exit with `err.exit_code`.
The exit codes of every command, in one place:

  0    done, or stopped by SIGTERM after committing a checkpoint (`Preempted`; the same command resumes)
  1    an unexpected failure (a bug: the traceback is printed)
  2    bad input: data, config, a checkpoint of another model (`DataError`, `ConfigError`,
       `CheckpointError`), or a workdir another run is using (`WorkdirBusyError`)
  3    the loss became NaN/Inf (`NonFiniteError`)
  4    a peer process of a multi-process job died or could not be reached (`DistributedError`)
  5    the workdir could not be written: disk full, quota, read-only, no permission (`StorageError`; the
       last committed checkpoint is intact and the same command resumes once the write can succeed)
  130  Ctrl-C (SIGINT): the first commits a checkpoint at the next step boundary (`Interrupted`), a
       second stops at once
"""
from __future__ import annotations


class JaxcnnError(Exception):
  """Base class; `exit_code` is what an experiment's `main()` exits with."""

  exit_code: int = 1


class DataError(JaxcnnError, ValueError):
  """A dataset could not be resolved, read or validated (names the file and the problem)."""

  exit_code = 2


class ConfigError(JaxcnnError, ValueError):
  """A configuration value is unknown, of the wrong type, or out of range."""

  exit_code = 2


class CheckpointError(JaxcnnError, RuntimeError):
  """A checkpoint is damaged, or belongs to another model/config."""

  exit_code = 2


class WorkdirBusyError(JaxcnnError, RuntimeError):
  """Another run (a live process) holds the workdir's lock; names it (pid, host, start time, command).

  Nothing in the workdir was changed by the run that got this error.
  """

  exit_code = 2


class StorageError(JaxcnnError, OSError):
  """A file of the run could not be written (disk full, quota, read-only, permission): names the path and
  the OS error, e.g. `<path>: No space left on device`.

  Attributes:
    errno: the OS error number (errno.ENOSPC, ...), or None when unknown.
    filename: the path that could not be written.
  """

  exit_code = 5

  def __init__(self, message: str, *, errno: int | None = None, filename=None):
    super().__init__(message)
    self.errno, self.filename = errno, None if filename is None else str(filename)

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""


class Preempted(JaxcnnError):
  """Training stopped on SIGTERM after committing a checkpoint; re-running the same command resumes.

  exit_code 0: a preempted run ended cleanly (experiments exit with it and print no "error:").
  """

  exit_code = 0


class Interrupted(Preempted):
  """Training stopped on Ctrl-C (SIGINT) after committing a checkpoint, as for SIGTERM; exit code 130."""

  exit_code = 130


class NonFiniteError(JaxcnnError, FloatingPointError):
  """Training produced a NaN/Inf loss (or saw NaN/Inf inputs); names the step."""

  exit_code = 3


class DistributedError(JaxcnnError, RuntimeError):
  """A peer process of a multi-process run failed or could not be reached."""

  exit_code = 4
