"""Errors that jaxcnn raises on purpose, and the exit codes experiments map them to.

Every error here is a `ValueError` or `RuntimeError` subclass, so code that only knows the builtin
classes still catches them. Experiments print `str(err)` as one line and exit with `err.exit_code`
(no traceback): 2 for bad input (data, config, shapes), 3 for training that went non-finite.
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


class NonFiniteError(JaxcnnError, FloatingPointError):
  """Training produced a NaN/Inf loss (or saw NaN/Inf inputs); names the step."""

  exit_code = 3


class DistributedError(JaxcnnError, RuntimeError):
  """A peer process of a multi-process run failed or could not be reached."""

  exit_code = 4
