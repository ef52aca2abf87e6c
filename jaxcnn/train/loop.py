"""The fit loop and evaluation: the only place that jits.

Reads in pipeline order: config -> data -> layout (devices) -> state -> steps -> resume -> compile ->
epochs (chunks of steps, host sync between chunks) -> validation -> callbacks/checkpoints -> result.

Host syncs happen only at report boundaries: every `log_every` global steps, at checkpoint steps and at
epoch ends. There the loop reports progress, checks for a non-finite loss (the device recorded the
first bad step), checks for SIGTERM, and checkpoints. With a device-resident pipeline (`batch_fn`) each
chunk is ONE jitted lax.scan of `log_every` steps (steps past the boundary are masked no-ops), so a run
compiles one chunk program whatever its epoch length.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import signal
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.errors import ConfigError, DistributedError, JaxcnnError, NonFiniteError
from jaxcnn.train import callbacks as callbacks_lib
from jaxcnn.train.checkpoint import Checkpointer
from jaxcnn.train.config import best_mode, validate_config
from jaxcnn.train.losses import has_accuracy
from jaxcnn.train.optim import make_schedule
from jaxcnn.train.parallel import AXIS, Layout, fetch, make_layout, maybe_initialize_distributed
from jaxcnn.train.state import TrainState, create_train_state, zero_metric_sums
from jaxcnn.train.step import make_steps, summarize

_LOG = logging.getLogger(__name__)

# Counts traces of the jitted functions by name; tests read it to prove there are no per-epoch recompiles.
TRACE_COUNTS: dict[str, int] = {}


class Preempted(JaxcnnError):
  """Training stopped on SIGTERM after saving a checkpoint; re-running the command resumes.

  exit_code 0: a preempted run ended cleanly (experiments exit with it).
  """

  exit_code = 0


@dataclasses.dataclass
class FitResult:
  """What fit returns.

  Attributes:
    state: the final TrainState (placed on the devices; pmap: the first replica).
    history: {metric: per-epoch list}, with "epoch" (1-based), "loss", "accuracy", "lr" and, with
      validation data, "val_loss", "val_accuracy" (accuracy only for losses that have one).
  """

  state: TrainState
  history: dict[str, list]


def _count_trace(name: str) -> None:
  TRACE_COUNTS[name] = TRACE_COUNTS.get(name, 0) + 1


# -- data -------------------------------------------------------------------------------------------

_PIPELINE_ATTRS = ("batch_size", "steps_per_epoch", "num_examples", "image_shape", "batches")


def _check_pipeline(data, name: str) -> None:
  missing = [a for a in _PIPELINE_ATTRS if not hasattr(data, a)]
  if missing:
    raise ConfigError(f"fit: {name} is not an InputPipeline (missing {', '.join(missing)}); pass "
                      "jaxcnn.data pipelines or an (images, labels) tuple")
  if int(data.steps_per_epoch) < 1:
    raise ConfigError(f"fit: {name} has no full batch ({data.num_examples} examples, batch_size "
                      f"{data.batch_size})")


def _resolve_data(train_data, val_data, config):
  """InputPipelines for (train, val); (images, labels) tuples go through jaxcnn.data.from_arrays."""
  if isinstance(train_data, tuple):
    if len(train_data) != 2:
      raise ConfigError("fit: train_data tuple must be (images_uint8, labels)")
    if config.batch_size is None:
      raise ConfigError("config: batch_size is required when train_data is an (images, labels) tuple")
    from jaxcnn import data as data_lib
    images, labels = np.asarray(train_data[0]), np.asarray(train_data[1])
    n_val = int(len(images) * float(config.validation_split))
    if n_val and val_data is not None:
      raise ConfigError("fit: give either config.validation_split or val_data, not both")
    if n_val:
      # Keras convention: the last fraction of the arrays, before any shuffling, is held out.
      val_data = (images[-n_val:], labels[-n_val:])
      images, labels = images[:-n_val], labels[:-n_val]
    train_data = data_lib.from_arrays(images, labels, batch_size=config.batch_size, seed=config.seed,
                                      shuffle=config.shuffle)
  elif float(config.validation_split) > 0:
    raise ConfigError("config: validation_split applies to (images, labels) tuples; for a pipeline, pass "
                      "val_data (or build it with the data layer's validation_split)")
  if isinstance(val_data, tuple):
    from jaxcnn import data as data_lib
    # Validation data is normalised with the training statistics, never its own.
    val_data = data_lib.from_arrays(np.asarray(val_data[0]), np.asarray(val_data[1]),
                                    batch_size=config.batch_size or train_data.batch_size, seed=config.seed,
                                    shuffle=False, stats=getattr(train_data, "stats", None))
  _check_pipeline(train_data, "train_data")
  if val_data is not None:
    _check_pipeline(val_data, "val_data")
  if config.batch_size is not None and int(config.batch_size) != int(train_data.batch_size):
    raise ConfigError(f"config: batch_size={config.batch_size} differs from train_data.batch_size="
                      f"{train_data.batch_size}")
  return train_data, val_data


# -- compiled functions -------------------------------------------------------------------------------

def _add_sums(a: dict, b: dict) -> dict:
  return {k: a[k] + b[k] for k in a}


def _compile_train(layout: Layout, train_step, data, chunk: int, use_scan: bool):
  """The jitted training program: (state, first_bad[, arrays], n | batch) -> (state, first_bad).

  first_bad is the int32 (global, 1-based) number of the first step whose loss was non-finite, or 0.
  """

  def one_step(state, first_bad, batch):
    new, m = train_step(state, batch)
    bad = ~jnp.isfinite(m["loss_sum"])
    first_bad = jnp.where(bad & (first_bad == 0), state.step + 1, first_bad)
    new = new.replace(epoch_step=state.epoch_step + 1, metric_sums=_add_sums(state.metric_sums, m))
    return new, first_bad

  if layout.mode == "pmap":
    def pstep(state, first_bad, batch):
      _count_trace("train_step")
      return one_step(state, first_bad, batch)
    return jax.pmap(pstep, axis_name=AXIS, donate_argnums=(0,))

  if not use_scan:
    def step(state, first_bad, batch):
      _count_trace("train_step")
      return one_step(state, first_bad, batch)
    return jax.jit(step, donate_argnums=(0,),
                   in_shardings=(layout.replicated, layout.replicated, layout.batch_sharding),
                   out_shardings=(layout.replicated, layout.replicated))

  batch_sharding = layout.batch_sharding

  def run_chunk(state, first_bad, arrays, n):
    _count_trace("train_chunk")

    def body(carry, i):
      def active(c):
        s, fb = c
        batch = data.batch_fn(arrays, s.epoch, s.epoch_step)
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return one_step(s, fb, batch)
      return jax.lax.cond(i < n, active, lambda c: c, carry), None

    (state, first_bad), _ = jax.lax.scan(body, (state, first_bad), jnp.arange(chunk))
    return state, first_bad

  return jax.jit(run_chunk, donate_argnums=(0,),
                 out_shardings=(layout.replicated, layout.replicated))


def _compile_eval(layout: Layout, eval_step):
  """The jitted eval accumulation: (state, sums, batch) -> sums."""

  def acc(state, sums, batch):
    _count_trace("eval_step")
    return _add_sums(sums, eval_step(state, batch))

  if layout.mode == "pmap":
    return jax.pmap(acc, axis_name=AXIS)
  return jax.jit(acc, in_shardings=(layout.replicated, layout.replicated, layout.batch_sharding),
                 out_shardings=layout.replicated)


def _compile_next_epoch(layout: Layout):
  """The jitted epoch rollover: epoch + 1, step within epoch 0, metric sums 0."""

  def next_epoch(state):
    _count_trace("next_epoch")
    return state.replace(epoch=state.epoch + 1, epoch_step=jnp.zeros_like(state.epoch_step),
                         metric_sums=jax.tree.map(jnp.zeros_like, state.metric_sums))

  if layout.mode == "pmap":
    return jax.pmap(next_epoch, axis_name=AXIS, donate_argnums=(0,))
  return jax.jit(next_epoch, donate_argnums=(0,), out_shardings=layout.replicated)


def _put_scalar(layout: Layout, value):
  """A small pytree replicated like the state."""
  return layout.put_state(jax.tree.map(jnp.asarray, value))


def _evaluate_sums(layout: Layout, eval_fn, state, data) -> dict:
  sums = _put_scalar(layout, zero_metric_sums())
  for batch in data.batches(0):
    sums = eval_fn(state, sums, layout.put_batch(batch))
  return jax.tree.map(lambda x: fetch(x[0] if layout.mode == "pmap" else x), sums)


# -- SIGTERM -------------------------------------------------------------------------------------------

class _PreemptionFlag:
  """Sets `requested` on SIGTERM while active (main thread only); restores the old handler after."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._old = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame):
    self.requested = True
    _LOG.warning("SIGTERM received: checkpointing at the next step boundary, then stopping")

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


# -- history ---------------------------------------------------------------------------------------------

def _load_history(workdir: pathlib.Path | None, epochs_done: int) -> dict[str, list]:
  """The saved history's first `epochs_done` epochs (later ones were not checkpointed), or {}."""
  if workdir is None or not (workdir / "history.json").exists():
    return {}
  try:
    saved = json.loads((workdir / "history.json").read_text())
  except ValueError:
    _LOG.warning("history.json in %s is unreadable; starting a new history", workdir)
    return {}
  return {k: list(v)[:epochs_done] for k, v in saved.items()}


def _with_accuracy(loss: str) -> bool:
  return has_accuracy(loss)


# -- fit -------------------------------------------------------------------------------------------------

@callbacks_lib.root_logger_left_alone()
def fit(model, train_data, *, config, workdir=None, val_data=None, callbacks: Sequence[Any] = (),
        initial_state: TrainState | None = None) -> FitResult:
  """Trains `model` on `train_data`; resumes from `workdir`'s latest checkpoint when there is one.

  Args:
    model: a flax.linen Module mapping (B, H, W, C) float32 to outputs (logits), `__call__(x, train=False)`.
    train_data: an InputPipeline (jaxcnn.data), or an (images uint8 (N,H,W,C), labels (N,)) tuple that is
      split by config.validation_split and batched with config.batch_size.
    config: a dict/ConfigDict of training settings (keys and defaults: jaxcnn.train.config.DEFAULTS),
      validated before anything runs.
    workdir: the run's directory (checkpoints/, checkpoint_digests/, best/, history.json, metrics.csv,
      tb/), or None (default) for a run that saves nothing.
    val_data: an InputPipeline or (images, labels) evaluated after every epoch, or None (default).
    callbacks: Callback instances (EarlyStopping, CSVLogger, ...) called after every epoch.
    initial_state: a TrainState to start from instead of a fresh one (e.g. pretrained, for fine-tuning);
      a checkpoint in workdir still takes precedence.

  Returns:
    FitResult(state, history).

  Raises:
    ConfigError: bad config values or data (before anything is compiled).
    CheckpointError: workdir holds checkpoints of another model.
    NonFiniteError: the loss became NaN/Inf; names the step; the last good checkpoint stays the latest.
    Preempted: SIGTERM arrived; a checkpoint of the current step was committed first (exit code 0).
    DistributedError: a peer process of a multi-process run failed.
  """
  # config -> data
  config = validate_config(config)
  multi = maybe_initialize_distributed(config.distributed_init_timeout_s, config.heartbeat_timeout_s)
  train_data, val_data = _resolve_data(train_data, val_data, config)
  if config.best_metric and val_data is None and config.best_metric.startswith("val_"):
    raise ConfigError(f"config: best_metric={config.best_metric!r} needs val_data")
  layout = make_layout(config.parallel, int(train_data.batch_size))
  if val_data is not None and int(val_data.batch_size) % layout.num_devices:
    raise ConfigError(f"fit: val_data.batch_size={val_data.batch_size} is not divisible by the "
                      f"{layout.num_devices} devices")
  steps_per_epoch, epochs = int(train_data.steps_per_epoch), int(config.epochs)
  total_steps = steps_per_epoch * epochs
  workdir = pathlib.Path(workdir).absolute() if workdir is not None else None

  # model -> state -> steps
  state = initial_state if initial_state is not None else create_train_state(
      model, train_data.image_shape, config, total_steps=total_steps)
  state = layout.put_state(state)
  train_step, eval_step = make_steps(model, loss=config.loss, target=config.target,
                                     axis_name=AXIS if layout.mode == "pmap" else None,
                                     compute_dtype=config.compute_dtype, from_logits=config.from_logits)
  schedule = make_schedule(config, total_steps)

  # resume
  checkpointer = None
  if workdir is not None:
    checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, async_save=config.async_checkpointing,
                                best_metric=config.best_metric, best_mode=best_mode(config))
    if layout.mode == "pmap":
      restored = checkpointer.restore_latest(layout.get_state(state))
      state = layout.put_state(restored) if restored is not None else state
    else:
      state = checkpointer.restore_latest(state) or state
  host_state = layout.get_state(state)
  start_epoch, start_step = int(fetch(host_state.epoch)), int(fetch(host_state.epoch_step))
  global_step = int(fetch(host_state.step))
  history = _load_history(workdir, start_epoch)
  if global_step:
    _LOG.info("resuming at step %d (epoch %d, batch %d)", global_step, start_epoch + 1, start_step)

  callbacks = list(callbacks)
  if workdir is not None:
    callbacks += [callbacks_lib.JSONLogger(workdir / "history.json"),
                  callbacks_lib.CSVLogger(workdir / "metrics.csv"), callbacks_lib.TensorBoard(workdir / "tb")]

  # compile (once: the chunk length is fixed and the number of active steps is an argument)
  use_scan = hasattr(train_data, "batch_fn") and layout.mode != "pmap" and not multi
  chunk = int(config.log_every)
  train_fn = _compile_train(layout, train_step, train_data, chunk, use_scan)
  eval_fn = _compile_eval(layout, eval_step) if val_data is not None else None
  next_epoch_fn = _compile_next_epoch(layout)
  arrays = layout.put_state(train_data.device_arrays()) if use_scan else None
  first_bad = _put_scalar(layout, jnp.zeros((), jnp.int32))
  with_acc = _with_accuracy(config.loss)

  def boundary_after(step: int, epoch_step: int) -> int:
    """Steps until the next host sync: a report, a checkpoint, or the end of the epoch."""
    n = min(chunk - step % chunk, steps_per_epoch - epoch_step)
    if config.checkpoint_every_steps:
      n = min(n, config.checkpoint_every_steps - step % config.checkpoint_every_steps)
    return n

  def sync(state, first_bad, epoch: int):
    """The host sync: non-finite check, progress, preemption; returns host metrics so far this epoch."""
    host = layout.get_state(state)
    bad = int(fetch(first_bad[0] if layout.mode == "pmap" else first_bad))
    if bad:
      loss_sum = float(fetch(host.metric_sums["loss_sum"]))
      kind = "inf" if math.isinf(loss_sum) else "nan"
      last = None
      if checkpointer is not None:
        checkpointer.wait()  # a save still in flight is of a good state: let it commit and count
        last = checkpointer.last_good_step
      raise NonFiniteError(f"loss became {kind} at step {bad} (epoch {epoch + 1}); last good checkpoint: "
                           + (f"step {last}" if last is not None else "none"))
    return summarize(jax.tree.map(fetch, host.metric_sums), with_accuracy=with_acc)

  progress = callbacks_lib.Progress(config.progress, total_steps, global_step)
  for cb in callbacks:
    cb.on_train_begin(history)
  stop = False
  try:
    with _PreemptionFlag() as preemption:
      for epoch in range(start_epoch, epochs):
        epoch_step = start_step if epoch == start_epoch else 0
        batches = None if use_scan else iter(train_data.batches(epoch, epoch_step))
        metrics = None
        # steps of this epoch, in chunks between host syncs
        while epoch_step < steps_per_epoch:
          n = boundary_after(global_step, epoch_step)
          if use_scan:
            state, first_bad = train_fn(state, first_bad, arrays, jnp.int32(n))
          else:
            for _ in range(n):
              state, first_bad = train_fn(state, first_bad, layout.put_batch(next(batches)))
          global_step, epoch_step = global_step + n, epoch_step + n
          metrics = sync(state, first_bad, epoch)
          progress.report(global_step, epoch, epochs, metrics)
          at_checkpoint = bool(config.checkpoint_every_steps) and global_step % config.checkpoint_every_steps == 0
          if checkpointer is not None and epoch_step < steps_per_epoch and (at_checkpoint or preemption.requested):
            checkpointer.save(layout.get_state(state))
          if preemption.requested:
            _stop_preempted(checkpointer, layout, state)

        # epoch end: metrics, validation, history, callbacks, checkpoint
        if metrics is None:  # resumed exactly at the end of an epoch: no step ran in it here
          metrics = sync(state, first_bad, epoch)
        logs = {"epoch": epoch + 1, **metrics, "lr": float(schedule(global_step - 1))}
        if val_data is not None:
          logs.update(summarize(_evaluate_sums(layout, eval_fn, state, val_data), "val_", with_acc))
        progress.end_epoch(epoch, epochs, logs)
        for key, value in logs.items():
          history.setdefault(key, []).append(value)
        for cb in callbacks:
          cb.on_epoch_end(epoch, logs, layout.get_state(state))
        state = next_epoch_fn(state)
        if checkpointer is not None:
          checkpointer.save(layout.get_state(state))
          checkpointer.save_best(layout.get_state(state), logs)
        stop = any(getattr(cb, "stop_training", False) for cb in callbacks)
        if preemption.requested:
          _stop_preempted(checkpointer, layout, state)
        if stop:
          _LOG.info("stopping early after epoch %d", epoch + 1)
          break
  except jax.errors.JaxRuntimeError as err:
    if multi:
      raise DistributedError(f"multi-process: a collective failed at step ~{global_step} (a peer process "
                             f"probably died): {str(err).splitlines()[0]}") from err
    raise
  finally:
    progress.close()
    if checkpointer is not None:
      checkpointer.close()

  final = layout.get_state(state)
  for cb in callbacks:
    replaced = cb.on_train_end(final)
    if replaced is not None:
      final = replaced
  return FitResult(final, history)


def _stop_preempted(checkpointer, layout, state):
  if checkpointer is None:
    raise Preempted("SIGTERM: stopped without a checkpoint (no workdir)")
  step = checkpointer.save(layout.get_state(state))
  checkpointer.wait()
  raise Preempted(f"SIGTERM: checkpoint step {step} saved in {checkpointer.workdir}; re-run to resume")


def evaluate(state_or_variables, model, data, *, loss: str = "softmax_cross_entropy",
             target: str = "label", parallel: str = "auto") -> dict[str, float]:
  """Loss and accuracy of `model` on every example of `data` (padded batches count only real examples).

  Args:
    state_or_variables: a TrainState, a {"params": ..., "batch_stats": ...} dict, or a params pytree.
    model: the flax.linen Module.
    data: an InputPipeline.
    loss: the loss name (default "softmax_cross_entropy"; "mse" reports no accuracy).
    target: the batch key compared with the outputs (default "label").
    parallel: "auto"/"jit" (every device), "none" (one device) or "pmap".

  Returns:
    {"loss": float, "accuracy": float} (no "accuracy" for mse).
  """
  _check_pipeline(data, "data")
  if isinstance(state_or_variables, TrainState):
    params, batch_stats = state_or_variables.params, state_or_variables.batch_stats
  elif isinstance(state_or_variables, dict) and "params" in state_or_variables:
    params, batch_stats = state_or_variables["params"], state_or_variables.get("batch_stats", {})
  else:
    params, batch_stats = state_or_variables, {}
  import optax
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=(),
                     rng=jnp.zeros((2,), jnp.uint32), epoch=jnp.zeros((), jnp.int32),
                     epoch_step=jnp.zeros((), jnp.int32), metric_sums=zero_metric_sums(), tx=optax.identity())
  layout = make_layout(validate_config({"parallel": parallel}).parallel, int(data.batch_size))
  _, eval_step = make_steps(model, loss=loss, target=target, axis_name=AXIS if layout.mode == "pmap" else None)
  sums = _evaluate_sums(layout, _compile_eval(layout, eval_step), layout.put_state(state), data)
  return summarize(sums, with_accuracy=_with_accuracy(loss))
