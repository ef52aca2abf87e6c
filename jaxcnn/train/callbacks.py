"""Callbacks for `fit`: early stopping, CSV/JSON logs, TensorBoard events, and progress reporting.

A callback sees the end of every epoch with that epoch's metrics (`logs`, e.g. {"loss", "accuracy",
"val_loss", "val_accuracy", "lr"}) and may ask the loop to stop (`stop_training = True`). Callbacks run
on every process; the file writers write only from process 0.
"""
from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import pathlib
import sys
import time

import jax
import numpy as np

_LOG = logging.getLogger(__name__)


@contextlib.contextmanager
def root_logger_left_alone():
  """While active, absl's logging (what orbax logs through) cannot configure the root logger.

  absl.logging calls `logging.basicConfig()` on its first message when the root logger has no handler,
  which puts a stderr handler there for good and turns a later `logging.basicConfig(level=INFO)` of the
  user into a no-op. Inside this context an unconfigured root logger holds `logging.lastResort`, the
  handler Python uses anyway when there is none (warnings and errors to the current stderr), so
  nothing prints differently; it is removed on exit. A root logger with handlers is not touched. Also
  usable as a decorator (fit runs under it: orbax logs while checkpointing).
  """
  root = logging.getLogger()
  placeholder = None if root.handlers else (logging.lastResort or logging.NullHandler())
  if placeholder is not None:
    root.addHandler(placeholder)
  try:
    yield
  finally:
    if placeholder is not None:
      root.removeHandler(placeholder)


# orbax logs through absl while it is imported (jaxcnn.train.checkpoint imports it; this module is
# imported first by jaxcnn.train).
with root_logger_left_alone():
  import orbax.checkpoint  # noqa: E402,F401


class Callback:
  """Base class: override the hooks you need. `stop_training = True` ends fit after this epoch."""

  stop_training: bool = False

  def on_train_begin(self, history: dict) -> None:
    """Called once before the first epoch with the history so far (non-empty on resume)."""

  def on_epoch_end(self, epoch: int, logs: dict, state) -> None:
    """Called after epoch `epoch` (0-based) with its metrics and the (placed) train state."""

  def on_train_end(self, state):
    """Called once at the end; may return a replacement state (e.g. the best weights), else None."""
    return None


class EarlyStopping(Callback):
  """Stops when `monitor` has not improved by more than `min_delta` for `patience` epochs.

  Args:
    monitor: the metric watched (default "val_loss").
    patience: epochs without improvement tolerated (default 0: stop at the first).
    min_delta: the smallest change that counts as an improvement (default 0).
    mode: "min", "max" or "auto" (default: max for accuracies, min otherwise).
    restore_best: at the end, return the state (params, batch_stats) of the best epoch (default False).
  """

  def __init__(self, monitor: str = "val_loss", patience: int = 0, min_delta: float = 0.0, mode: str = "auto",
               restore_best: bool = False):
    if not isinstance(patience, int) or patience < 0:
      raise ValueError(f"EarlyStopping: patience={patience!r} must be an integer >= 0")
    if not (isinstance(min_delta, (int, float)) and min_delta >= 0):
      raise ValueError(f"EarlyStopping: min_delta={min_delta!r} must be a number >= 0")
    if mode not in ("auto", "min", "max"):
      raise ValueError(f"EarlyStopping: mode={mode!r} must be 'auto', 'min' or 'max'")
    self.monitor, self.patience, self.min_delta, self.restore_best = monitor, patience, float(min_delta), restore_best
    self.mode = mode if mode != "auto" else ("max" if "acc" in monitor else "min")
    self.best, self.best_epoch, self.wait, self.stop_training = None, None, 0, False
    self._best_weights = None

  def _improved(self, value: float) -> bool:
    if self.best is None:
      return True
    return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

  def on_train_begin(self, history: dict) -> None:
    for epoch, value in enumerate(history.get(self.monitor, [])):
      self._observe(epoch, value, None)

  def _observe(self, epoch: int, value: float, state) -> None:
    if self._improved(value):
      self.best, self.best_epoch, self.wait = value, epoch, 0
      if self.restore_best and state is not None:
        # A host copy: the device state is donated to the next step.
        self._best_weights = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    else:
      self.wait += 1
      if self.wait > self.patience:
        self.stop_training = True

  def on_epoch_end(self, epoch: int, logs: dict, state) -> None:
    if self.monitor not in logs:
      raise ValueError(f"EarlyStopping: monitor={self.monitor!r} is not among the epoch metrics "
                       f"{', '.join(sorted(logs))}")
    value = float(logs[self.monitor])
    if not math.isfinite(value):
      self.stop_training = True
      return
    self._observe(epoch, value, state)

  def on_train_end(self, state):
    if not self.restore_best or self._best_weights is None:
      return None
    # The best weights placed like the current ones (shardings/replicas preserved).
    place = lambda new, old: jax.device_put(np.asarray(new), old.sharding)  # noqa: E731
    return state.replace(params=jax.tree.map(place, self._best_weights["params"], state.params),
                         batch_stats=jax.tree.map(place, self._best_weights["batch_stats"], state.batch_stats))


class _FileLogger(Callback):
  def __init__(self, path):
    self.path = pathlib.Path(path)
    self.history: dict = {}

  def on_train_begin(self, history: dict) -> None:
    self.history = history

  def on_epoch_end(self, epoch: int, logs: dict, state) -> None:
    if jax.process_index() != 0:
      return
    self.write(self.history)

  def write(self, history: dict) -> None:
    """Replaces the file with `history`, whole or not at all (even if the run is killed or the disk fills)."""
    from jaxcnn.storage import atomic_path
    with atomic_path(self.path) as tmp:
      self._write(tmp, history)


class CSVLogger(_FileLogger):
  """Rewrites `path` after every epoch: a header, then one row per epoch of the whole history."""

  def _write(self, path: pathlib.Path, history: dict) -> None:
    keys = list(history)
    with open(path, "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(keys)
      for row in zip(*(history[k] for k in keys)):
        writer.writerow(row)


class JSONLogger(_FileLogger):
  """Rewrites `path` after every epoch with the whole history: {metric: [per-epoch values]}."""

  def _write(self, path: pathlib.Path, history: dict) -> None:
    path.write_text(json.dumps(history, indent=1))


FILE_LOGGERS = (CSVLogger, JSONLogger)


class TensorBoard(Callback):
  """Writes every epoch metric as a TensorBoard scalar under `logdir` (an events file per run, x-axis =
  epoch), flushed at each epoch's end.

  Written in the calling thread (jaxcnn.train.tfevents, not a background thread), so a failed write (a
  full disk) is raised here as a StorageError naming the folder, not lost in a thread.
  """

  def __init__(self, logdir):
    self.logdir = pathlib.Path(logdir)
    self._writer = None

  def on_epoch_end(self, epoch: int, logs: dict, state) -> None:
    if jax.process_index() != 0:
      return
    from jaxcnn.storage import storage_errors
    from jaxcnn.train.tfevents import EventFileWriter
    with storage_errors(self.logdir):
      if self._writer is None:
        self._writer = EventFileWriter(self.logdir)
      self._writer.add_scalars(epoch + 1, {key: float(value) for key, value in logs.items()})
      self._writer.flush()

  def on_train_end(self, state):
    self.close()
    return None

  def close(self) -> None:
    """Closes the events file (fit does at the end of training, also when it stops on an error)."""
    if self._writer is not None:
      writer, self._writer = self._writer, None
      from jaxcnn.storage import storage_errors
      with storage_errors(self.logdir):
        writer.close()


class _StdoutHandler(logging.StreamHandler):
  """Writes to whatever `sys.stdout` is when a record is emitted (Jupyter's and pytest's captures replace
  it after import), as logging's own last-resort handler does for stderr."""

  def __init__(self):
    logging.Handler.__init__(self)  # not StreamHandler's: it would pin the stream of this moment

  @property
  def stream(self):
    return sys.stdout


def _progress_logger() -> logging.Logger:
  """The `jaxcnn.progress` logger: INFO lines to stdout through its own handler, never to the root logger
  (so it prints whether or not logging was configured, and a later `logging.basicConfig` still works)."""
  logger = logging.getLogger("jaxcnn.progress")
  if not any(isinstance(h, _StdoutHandler) for h in logger.handlers):
    handler = _StdoutHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  logger.propagate = False
  return logger


PROGRESS_LOG = _progress_logger()


def _format_metrics(metrics: dict) -> str:
  """"loss=0.1234 accuracy=0.9500 val_loss=... lr=0.001": 4 decimals, the learning rate (%g) last."""
  parts = [f"{key}={float(value):.4f}" for key, value in metrics.items() if key not in ("epoch", "lr")]
  if "lr" in metrics:
    parts.append(f"lr={float(metrics['lr']):g}")
  return " ".join(parts)


class Progress:
  """Progress of the steps and epochs, on process 0 only.

  On a terminal (stderr is a TTY) a tqdm bar; elsewhere (a pipe, a file, Jupyter, pytest) plain lines,
  with no escape codes, to stdout through the `jaxcnn.progress` logger (its own handler; the root
  logger is neither used nor changed): one per report (every `log_every` steps) and one per epoch.

      step 50/1266 epoch 1/3 loss=0.4171 accuracy=0.8712
      epoch 1/3 loss=0.2520 accuracy=0.9231 val_loss=0.0811 val_accuracy=0.9747 lr=0.001 (41.2 s)

  The loop calls `report` at each host sync and `end_epoch` once at the end of each epoch, after
  validation, with that epoch's logs; `close` at the end. To silence it or send it elsewhere, use
  mode="none" or configure the `jaxcnn.progress` logger (it does not propagate).

  Args:
    mode: "auto" (bar when stderr is a TTY, else lines), "bar", "log" or "none".
    total_steps: steps of the whole run.
    initial_step: the step a resumed run starts at (default 0).
  """

  def __init__(self, mode: str, total_steps: int, initial_step: int = 0):
    if mode not in ("auto", "bar", "log", "none"):
      raise ValueError(f"Progress: mode={mode!r} must be 'auto', 'bar', 'log' or 'none'")
    if jax.process_index() != 0:
      mode = "none"
    if mode == "auto":
      mode = "bar" if sys.stderr.isatty() else "log"
    self.mode, self.total = mode, total_steps
    self._bar = None
    if mode == "bar":
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True)
    self._last = initial_step
    self._epoch_started = time.perf_counter()

  def report(self, step: int, epoch: int, epochs: int, metrics: dict) -> None:
    """Shows `metrics` (this epoch's so far) at global `step` of epoch `epoch` (0-based) of `epochs`."""
    text = _format_metrics(metrics)
    if self._bar is not None:
      self._bar.update(step - self._last)
      self._bar.set_postfix_str(f"epoch {epoch + 1}/{epochs} {text}")
    elif self.mode == "log":
      PROGRESS_LOG.info("step %d/%d epoch %d/%d %s", step, self.total, epoch + 1, epochs, text)
    self._last = step

  def end_epoch(self, epoch: int, epochs: int, logs: dict, seconds: float | None = None) -> None:
    """One line for epoch `epoch` (0-based) of `epochs`: its train and validation metrics and duration.

    Args:
      epoch: the epoch that ended, 0-based.
      epochs: the run's number of epochs.
      logs: the epoch's metrics as fit gives them to callbacks ("epoch" is left out of the line).
      seconds: the epoch's wall time; None (default): the time since the previous end_epoch (or since
        this Progress was made, for the first), which includes compilation and validation.
    """
    now = time.perf_counter()
    if seconds is None:
      seconds = now - self._epoch_started
    self._epoch_started = now
    line = f"epoch {epoch + 1}/{epochs} {_format_metrics(logs)} ({seconds:.1f} s)"
    if self._bar is not None:
      self._bar.write(line)  # above the bar, which is redrawn below it
    elif self.mode == "log":
      PROGRESS_LOG.info("%s", line)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
