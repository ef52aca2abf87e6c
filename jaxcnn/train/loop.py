"""The fit loop and evaluation: the only place that compiles training programs.

`fit` reads in pipeline order: config -> job (a multi-process job is joined first) -> data (arrays become
pipelines: validation split, preprocessing) -> strategy (devices) -> state (fresh, or continued from
initial_state with the config's optimizer) -> model and targets checked -> steps -> feeds -> programs ->
resume (the workdir's checkpoint) -> epochs of chunks -> validation -> callbacks and checkpoints ->
result.

Every feed runs the same program: one jitted lax.scan over a chunk of `log_every` steps (steps past a
boundary are masked no-ops), so a run compiles one chunk program whatever its epoch length and wherever
its batches come from (see jaxcnn.train.feed). Host syncs happen only between chunks, at report
boundaries (every `log_every` global steps), checkpoint steps and epoch ends: there the loop reports
progress, checks for a non-finite loss (the device recorded the first bad step), checks for SIGTERM
and Ctrl-C, and checkpoints.

A workdir is used by one run at a time: fit holds its lock (jaxcnn.train.workdir) from before its first
write to its return, and a failed write (disk full, read-only) is a StorageError naming the path and the
last committed checkpoint, which the same call resumes from once the write can succeed.

Epochs: `state.epoch` counts the epochs a state has trained. A fresh run trains epochs [0, epochs);
`fit(..., initial_state=s)` trains `epochs` more, [s.epoch, s.epoch + epochs) (Keras' "fit again"),
with the config's optimizer, schedule and freeze mask starting fresh; a run interrupted in a workdir
resumes from its checkpoint to the same end, and one already at its end trains nothing and says so.
"""
from __future__ import annotations

import collections
import contextlib
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

from jaxcnn.data import pipeline as pipeline_lib
from jaxcnn.errors import (ConfigError, DistributedError, Interrupted, NonFiniteError, Preempted,  # noqa: F401
                           StorageError)
from jaxcnn.ops import forward_only_lowering
from jaxcnn.train import callbacks as callbacks_lib
from jaxcnn.train.checkpoint import Checkpointer
from jaxcnn.train.config import augment_config, augments, best_mode, validate_config
from jaxcnn.train.feed import ResidentFeed, choose_feed, make_feed
from jaxcnn.train.losses import check_output_size, get_loss, has_accuracy, resolve_from_logits
from jaxcnn.train.model import TrainedModel
from jaxcnn.train.optim import logged_learning_rate, make_optimizer, make_schedule
from jaxcnn.train.parallel import Strategy, device_count, fetch, make_strategy, maybe_initialize_distributed
from jaxcnn.train.state import TrainState, create_train_state, init_variables, zero_metric_sums
from jaxcnn.train.step import make_steps, summarize
from jaxcnn.train.workdir import workdir_lock

_LOG = logging.getLogger(__name__)

# Counts traces of the jitted functions by name; tests read it to prove there are no per-epoch recompiles.
TRACE_COUNTS: dict[str, int] = {}


@dataclasses.dataclass(eq=False)
class FitResult(TrainedModel):
  """What fit returns: the trained model (a TrainedModel: predict, evaluate, save) and the run's record.

  Attributes:
    state: the final TrainState (placed on the devices; pmap: the first replica). Passing it (or this
      result) back as `initial_state` trains more; fit never donates it.
    history: {metric: per-epoch list}, with "epoch" (1-based, counting the state's earlier epochs),
      "loss", "accuracy", "lr" and, with validation data, "val_loss", "val_accuracy" (accuracy only for
      losses that have one).
    preprocessing: the preprocessing spec the run applied to its inputs (jaxcnn.data.preprocess
      applies it to raw inputs; format in docs/DESIGN.md), or None for a pipeline without one.
    trained_steps: optimizer steps this call took (0 when the workdir's run was already complete).
    data: {"train_examples", "validation_examples", "batch_size", "steps_per_epoch"}.
    module, config, class_names, input_shape, input_dtype: the TrainedModel's (the model fit trained,
      fit's validated config, the training data's class names, one raw example's shape and dtype).
  """

  state: TrainState
  history: dict[str, list]
  preprocessing: dict | None = None
  trained_steps: int = 0
  data: dict = dataclasses.field(default_factory=dict)
  module: Any = dataclasses.field(default=None, kw_only=True)
  config: Any = dataclasses.field(default=None, kw_only=True)
  class_names: list = dataclasses.field(default_factory=list, kw_only=True)
  input_shape: tuple | None = dataclasses.field(default=None, kw_only=True)
  input_dtype: str | None = dataclasses.field(default=None, kw_only=True)

  def __post_init__(self):
    self.config = validate_config(self.config)
    self._check_loss()


def _count_trace(name: str) -> None:
  TRACE_COUNTS[name] = TRACE_COUNTS.get(name, 0) + 1


# -- data -------------------------------------------------------------------------------------------

_PIPELINE_ATTRS = ("batch_size", "steps_per_epoch", "num_examples", "image_shape", "batches")


def _check_pipeline(data, name: str) -> None:
  missing = [a for a in _PIPELINE_ATTRS if not hasattr(data, a)]
  if missing:
    raise ConfigError(f"fit: {name} is not an InputPipeline (missing {', '.join(missing)}); pass "
                      "jaxcnn.data pipelines or an (inputs, targets) tuple of arrays")
  if int(data.steps_per_epoch) < 1:
    raise ConfigError(f"fit: {name} has no full batch ({data.num_examples} examples, batch_size "
                      f"{data.batch_size})")


def _pipeline(name: str, inputs, targets, **kwargs):
  """A ResidentPipeline over arrays; a bad array is a ConfigError naming `name` (the fit argument)."""
  try:
    return pipeline_lib.ResidentPipeline(inputs, targets, **kwargs)
  except ValueError as err:
    raise ConfigError(f"{name}: {err}") from None


def _as_arrays(data, name: str):
  if len(data) != 2:
    raise ConfigError(f"fit: {name} tuple must be (inputs, targets), got {len(data)} items")
  return np.asarray(data[0]), np.asarray(data[1])


def _check_pipeline_preprocessing(pipeline, config) -> None:
  """A pipeline brings its own preprocessing: config keys that say otherwise are an error, not ignored."""
  mode = getattr(pipeline, "normalize", None)
  if config.normalize != "auto" and mode != config.normalize:
    raise ConfigError(f"config: normalize={config.normalize!r} but train_data was built with "
                      f"normalize={mode!r}; a pipeline applies its own preprocessing: build it with the "
                      "config's, or leave normalize='auto'")
  if augments(config) and getattr(pipeline, "augment", None) != augment_config(config):
    raise ConfigError("config: augmentation keys are set but train_data was built with other augmentation "
                      f"({getattr(pipeline, 'augment', 'none')}); a pipeline applies its own: build it with "
                      "jaxcnn.train.augment_config(config), or leave the keys at their defaults")


@dataclasses.dataclass
class _Data:
  train: Any
  val: Any
  preprocessing: dict | None


def _prepare_data(train_data, val_data, config, preprocessing=None) -> _Data:
  """(train, val) pipelines: arrays are split (Keras: the last validation_split of them, before
  shuffling) and preprocessed with statistics of the training portion; pipelines are checked."""
  if isinstance(train_data, tuple):
    if config.batch_size is None:
      raise ConfigError("config: batch_size is required when train_data is an (inputs, targets) tuple")
    inputs, targets = _as_arrays(train_data, "train_data")
    n_val = int(len(inputs) * float(config.validation_split))
    if n_val and val_data is not None:
      raise ConfigError("fit: give either config.validation_split or val_data, not both")
    if n_val:
      val_data = (inputs[-n_val:], targets[-n_val:])
      inputs, targets = inputs[:-n_val], targets[:-n_val]
    # Training batches are full (drop_remainder): padding rows would enter BatchNorm statistics.
    train = _pipeline("train_data", inputs, targets, batch_size=int(config.batch_size), seed=int(config.seed),
                      shuffle=bool(config.shuffle), augment=augment_config(config), normalize=config.normalize,
                      preprocessing=preprocessing, drop_remainder=True)
  else:
    _check_pipeline(train_data, "train_data")
    if float(config.validation_split) > 0:
      raise ConfigError("config: validation_split applies to (inputs, targets) arrays; for a pipeline, pass "
                        "val_data")
    if config.batch_size is not None and int(config.batch_size) != int(train_data.batch_size):
      raise ConfigError(f"config: batch_size={config.batch_size} differs from train_data.batch_size="
                        f"{train_data.batch_size}")
    _check_pipeline_preprocessing(train_data, config)
    train = train_data
  spec = getattr(train, "preprocessing", None)
  val = val_data
  if isinstance(val_data, tuple):
    inputs, targets = _as_arrays(val_data, "val_data")
    # Validation data is prepared with the training portion's statistics, never its own.
    val = _pipeline("val_data", inputs, targets, batch_size=int(config.validation_batch_size or train.batch_size),
                    seed=int(config.seed), shuffle=False, preprocessing=spec, normalize=config.normalize,
                    num_classes=getattr(train, "num_classes", None) or None)
  if val is not None:
    _check_pipeline(val, "val_data")
  return _Data(train, val, spec)


# -- state --------------------------------------------------------------------------------------------

def _raw_dtype(pipeline) -> str:
  """The raw inputs' dtype name: the preprocessing spec's, else what the model sees."""
  spec = getattr(pipeline, "preprocessing", None)
  return str(spec["input_dtype"]) if spec is not None else np.dtype(_input_dtype(pipeline)).name


def _input_dtype(pipeline):
  """The dtype the model sees: float32 for pixels and floats, other integer inputs unchanged."""
  spec = getattr(pipeline, "preprocessing", None)
  if spec is None:
    return jnp.float32
  dtype = np.dtype(spec["input_dtype"])
  return jnp.float32 if dtype == np.uint8 or np.issubdtype(dtype, np.floating) else dtype


def _first_line(err: Exception) -> str:
  text = str(err).strip()
  return text.splitlines()[0] if text else type(err).__name__


def _start_state(model, pipeline, config, initial, run_steps: int) -> TrainState:
  """A fresh state, or `initial`'s weights, step, rng and epoch with the config's optimizer (new state)."""
  shape, dtype = tuple(pipeline.image_shape), _input_dtype(pipeline)
  if initial is None:
    try:
      return create_train_state(model, shape, config, total_steps=run_steps, input_dtype=dtype)
    except (ValueError, TypeError) as err:
      raise ConfigError(f"model: cannot take train_data inputs {shape}: {_first_line(err)}") from None
  if not isinstance(initial, TrainState):
    raise ConfigError("initial_state: expected a TrainState or a TrainedModel (a FitResult, a loaded model), "
                      f"got {type(initial).__name__}")
  epoch, epoch_step = int(fetch(initial.epoch)), int(fetch(initial.epoch_step))
  if epoch_step:
    raise ConfigError(f"initial_state: stopped in the middle of epoch {epoch + 1} (step {epoch_step}); "
                      "continue that run from its workdir instead")
  expected = jax.eval_shape(lambda: init_variables(model, shape, int(config.seed), dtype))["params"]
  shapes = lambda tree: jax.tree.map(lambda x: tuple(np.shape(x)), tree)  # noqa: E731
  if jax.tree.structure(expected) != jax.tree.structure(initial.params) or shapes(expected) != shapes(initial.params):
    raise ConfigError("initial_state: its params do not fit the model (another architecture or input shape)")
  tx = make_optimizer(config, initial.params, run_steps)
  _LOG.info("continuing from initial_state at step %d (epoch %d): %d more epochs, optimizer %s started fresh",
            int(fetch(initial.step)), epoch, int(config.epochs), config.optimizer)
  return initial.replace(opt_state=tx.init(initial.params), tx=tx)


def _abstract_batch(feed, pipeline):
  """The shapes and dtypes of a training batch as the program sees it, or None when unknown."""
  if isinstance(feed, ResidentFeed):
    return jax.eval_shape(pipeline.batch_fn, feed.constants, jnp.int32(0), jnp.int32(0))
  if hasattr(pipeline, "read") and hasattr(pipeline, "transform"):
    raw = pipeline.read(0, 0, 0, int(pipeline.batch_size))
    return jax.eval_shape(pipeline.transform, raw, jnp.int32(0), jnp.int32(0))
  return None


def _check_model_and_targets(model, state, batch, pipeline, config) -> None:
  """The model takes the inputs and the loss takes its outputs and the targets: checked abstractly,
  before anything compiles, each failure a ConfigError naming the argument."""
  if batch is None:
    return
  x = batch["image"]
  try:
    outputs = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), state.variables(), x)
  except (ValueError, TypeError) as err:
    raise ConfigError(f"model: cannot take train_data inputs {tuple(x.shape[1:])} {x.dtype}: "
                      f"{_first_line(err)}") from None
  if config.target not in batch:
    raise ConfigError(f"config: target={config.target!r} is not a batch key ({', '.join(batch)})")
  target = batch[config.target]
  what = f"train_data: targets {tuple(target.shape[1:])} {target.dtype} do not fit loss={config.loss!r} " \
         f"for model outputs {tuple(getattr(outputs, 'shape', ())[1:])}"
  shape = getattr(outputs, "shape", None)
  if shape:
    check_output_size(model, config.loss, shape[-1])
  # A loss that does not fit the model's last activation is the loss's fault, not the targets': its own
  # message (a softmax applied twice, probabilities read as logits).
  from_logits = resolve_from_logits(model, config.loss, config.from_logits)
  try:
    loss_fn = get_loss(config.loss, from_logits=from_logits)
    jax.eval_shape(loss_fn, outputs, target)
  except (ValueError, TypeError) as err:
    raise ConfigError(f"{what}: {_first_line(err)}") from None
  classes = getattr(pipeline, "num_classes", None)
  if (jnp.issubdtype(target.dtype, jnp.integer) and target.ndim == outputs.ndim - 1 and classes
      and classes > outputs.shape[-1]):
    raise ConfigError(f"{what}: class ids go up to {classes - 1} but the model has {outputs.shape[-1]} outputs")


# -- the compiled programs -------------------------------------------------------------------------------

def _add_sums(a: dict, b: dict) -> dict:
  return {k: a[k] + b[k] for k in a}


def _train_program(strategy: Strategy, train_step, feed, chunk: int, batch_size: int):
  """(state, first_bad, constants, chunk inputs, n) -> (state, first_bad): `n` steps of one chunk.

  first_bad is the int32 (global, 1-based) number of the first step whose loss was non-finite, or 0.
  """

  def one_step(state, first_bad, batch):
    new, m = train_step(state, batch)
    bad = ~jnp.isfinite(m["loss_sum"])
    first_bad = jnp.where(bad & (first_bad == 0), state.step + 1, first_bad)
    new = new.replace(epoch_step=state.epoch_step + 1, metric_sums=_add_sums(state.metric_sums, m))
    return new, first_bad

  def train_chunk(state, first_bad, constants, xs, n):
    _count_trace("train_chunk")
    offset = strategy.row_offset(batch_size)

    def body(carry, item):
      i, x = item

      def active(c):
        s, fb = c
        return one_step(s, fb, strategy.constrain(feed.batch(constants, x, s.epoch, s.epoch_step, offset)))
      return jax.lax.cond(i < n, active, lambda c: c, carry), None

    return jax.lax.scan(body, (state, first_bad), (jnp.arange(chunk), xs))[0]

  return strategy.compile(train_chunk, per_replica=(0, 1, 3), donate=(0,))


def _eval_program(strategy: Strategy, eval_step, feed, chunk: int, batch_size: int):
  """(state, sums, constants, chunk inputs, n, first step) -> sums over `n` evaluation batches.

  A forward pass only: traced with `ops.forward_only_lowering` (XLA's fused convolutions on CPU)."""

  def eval_chunk(state, sums, constants, xs, n, start):
    _count_trace("eval_chunk")
    offset = strategy.row_offset(batch_size)

    def body(carry, item):
      i, x = item

      def active(c):
        batch = feed.batch(constants, x, jnp.int32(0), start + i, offset)
        return _add_sums(c, eval_step(state, strategy.constrain(batch)))
      return jax.lax.cond(i < n, active, lambda c: c, carry), None

    with forward_only_lowering():
      return jax.lax.scan(body, sums, (jnp.arange(chunk), xs))[0]

  return strategy.compile(eval_chunk, per_replica=(0, 1, 3))


def _next_epoch_program(strategy: Strategy):
  """The epoch rollover: epoch + 1, step within epoch 0, metric sums 0."""

  def next_epoch(state):
    _count_trace("next_epoch")
    return state.replace(epoch=state.epoch + 1, epoch_step=jnp.zeros_like(state.epoch_step),
                         metric_sums=jax.tree.map(jnp.zeros_like, state.metric_sums))

  return strategy.compile(next_epoch, per_replica=(0,), donate=(0,))


def _chunk_plan(global_step: int, epoch_step: int, steps_per_epoch: int, chunk: int, every: int):
  """[(first step in the epoch, steps)] up to the epoch's end, each chunk ending at the next host sync:
  a report (every `chunk` global steps), a checkpoint (every `every`, 0: none) or the epoch's end."""
  plan = []
  while epoch_step < steps_per_epoch:
    n = min(chunk - global_step % chunk, steps_per_epoch - epoch_step)
    if every:
      n = min(n, every - global_step % every)
    plan.append((epoch_step, n))
    global_step, epoch_step = global_step + n, epoch_step + n
  return plan


class _Evaluator:
  """Metric sums of a model over every batch of an (unshuffled) pipeline, through one chunk program."""

  def __init__(self, strategy: Strategy, eval_step, pipeline, feed_mode: str, chunk: int):
    steps = int(pipeline.steps_per_epoch)
    self.strategy = strategy
    kind = choose_feed(pipeline, strategy, feed_mode)
    # Device-resident data: the whole split in one chunk; from the host, chunks of the report length.
    self.chunk = steps if kind is ResidentFeed else min(steps, chunk)
    self.feed = kind(pipeline, strategy, self.chunk)
    self.plan = [(s, min(self.chunk, steps - s)) for s in range(0, steps, self.chunk)]
    self.program = _eval_program(strategy, eval_step, self.feed, self.chunk, int(pipeline.batch_size))

  def __call__(self, state) -> dict:
    sums = self.strategy.place_state(zero_metric_sums())
    with contextlib.closing(self.feed.chunks(0, self.plan)) as chunks:
      for (start, n), xs in zip(self.plan, chunks):
        sums = self.program(state, sums, self.feed.constants, xs, self.strategy.scalar(np.int32(n)),
                            self.strategy.scalar(np.int32(start)))
    return jax.tree.map(self.strategy.fetch, sums)


# -- SIGTERM and Ctrl-C ---------------------------------------------------------------------------------

class _PreemptionFlag:
  """While active (main thread only): SIGTERM or a first Ctrl-C (SIGINT) sets `requested` (the loop
  checkpoints at the next step boundary and stops); a second Ctrl-C raises KeyboardInterrupt at once.
  The old handlers are restored after. A SIGINT ignored by the parent (SIG_IGN: a background job) stays
  ignored."""

  def __init__(self):
    self.requested: str | None = None  # the signal's name
    self._old: dict = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        if signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
          continue
        self._old[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum, frame):
    if signum == signal.SIGINT and self.requested is not None:
      _LOG.warning("Ctrl-C again: stopping at once (the checkpoints committed so far are kept)")
      raise KeyboardInterrupt
    if self.requested is None:
      self.requested = signal.Signals(signum).name
      again = "; Ctrl-C again stops at once" if signum == signal.SIGINT else ""
      _LOG.warning("%s received: checkpointing at the next step boundary, then stopping%s", self.requested, again)

  def __exit__(self, *exc):
    for signum, old in self._old.items():
      signal.signal(signum, old)
    self._old = {}


# -- history ---------------------------------------------------------------------------------------------

def _load_history(workdir: pathlib.Path | None, epochs_done: int) -> dict[str, list]:
  """The saved history's first `epochs_done` epochs (later ones were not checkpointed), or {}."""
  if workdir is None or epochs_done <= 0 or not (workdir / "history.json").exists():
    return {}
  try:
    saved = json.loads((workdir / "history.json").read_text())
  except ValueError:
    _LOG.warning("history.json in %s is unreadable; starting a new history", workdir)
    return {}
  return {k: list(v)[:epochs_done] for k, v in saved.items()}


def _trim_logs(callbacks, loop: "_Loop", last_good_step: int | None, first_epoch: int) -> None:
  """After a failed write: history.json and metrics.csv cut back to the epochs the last committed
  checkpoint holds, so that no file lists an epoch the workdir cannot resume from (the resume would cut
  them back the same way). Best effort: on a disk that cannot take even the shorter file, it stays as it
  was (the resume still trims it); a log with no committed epoch left is removed."""
  if jax.process_index() != 0 or loop._start is None:
    return
  keep = (loop.epochs_at(last_good_step) if last_good_step is not None else first_epoch) - first_epoch
  for cb in callbacks:
    if not isinstance(cb, callbacks_lib.FILE_LOGGERS) or len(cb.history.get("epoch", [])) <= keep:
      continue
    with contextlib.suppress(StorageError, OSError):
      if keep <= 0:
        cb.path.unlink(missing_ok=True)
      else:
        cb.write({key: list(values)[:keep] for key, values in cb.history.items()})


def _with_accuracy(loss: str) -> bool:
  return has_accuracy(loss)


# -- fit -------------------------------------------------------------------------------------------------

@callbacks_lib.root_logger_left_alone()
def fit(model, train_data, *, config, workdir=None, val_data=None, callbacks: Sequence[Any] = (),
        initial_state: TrainState | TrainedModel | None = None) -> FitResult:
  """Trains `model` on `train_data`; resumes from `workdir`'s latest checkpoint when there is one.

  Args:
    model: a flax.linen Module, `__call__(x, train=False)`, taking the (preprocessed) inputs.
    train_data: an (inputs, targets) tuple of arrays, or an InputPipeline (jaxcnn.data). Arrays: inputs
      uint8 images (N, H, W, C) / (N, H, W), or float (or integer) arrays of any rank the model takes
      ((N, H, W, C), (N, L, C), ...; never reshaped); targets int class ids (N,), one-hot or soft labels
      (N, K), or float arrays shaped like the model's outputs. They are split by
      config.validation_split, preprocessed by config.normalize (statistics of the training portion) and
      augmented on device by the augmentation keys; a pipeline brings its own preprocessing.
    config: a dict/ConfigDict of training settings (keys and defaults: jaxcnn.train.DEFAULTS),
      validated before anything runs.
    workdir: the run's directory (checkpoints/, checkpoint_digests/, best/, history.json, metrics.csv,
      tb/, and .lock: one run at a time), or None (default) for a run that saves nothing.
    val_data: (inputs, targets) arrays or an InputPipeline evaluated after every epoch, or None.
    callbacks: Callback instances (EarlyStopping, CSVLogger, ...) called after every epoch.
    initial_state: a TrainState, or a TrainedModel (a FitResult, or `jaxcnn.train.load`'s), to continue
      from: its weights, batch statistics, step, rng and epoch count are kept and `config.epochs` more
      epochs trained with the config's optimizer, schedule and freeze mask (a fresh optimizer state); a
      TrainedModel also brings its preprocessing.
      Never donated. A checkpoint of this run in workdir takes precedence (the run resumes).

  Returns:
    FitResult(state, history, preprocessing, trained_steps, data): a TrainedModel (predict, evaluate,
    save; jaxcnn.train.model) with the run's record.

  Raises:
    ConfigError: bad config values, data, model inputs or targets (before anything is compiled).
    CheckpointError: workdir holds checkpoints of another model.
    NonFiniteError: the loss became NaN/Inf; names the step; the last good checkpoint stays the latest.
    Preempted: SIGTERM arrived; a checkpoint of the current step was committed first (exit code 0).
    Interrupted: Ctrl-C (SIGINT) arrived; as for SIGTERM (exit code 130). A second Ctrl-C raises
      KeyboardInterrupt at once, without waiting for a save in flight.
    WorkdirBusyError: another live run holds workdir's lock (jaxcnn.train.workdir); nothing was written.
    StorageError: a file of the run could not be written (disk full, read-only, permission): names the path
      and the last committed checkpoint, which is intact; an unwritable workdir is refused before training.
    DistributedError: a peer process of a multi-process run failed.
  """
  # config -> job -> data
  config = validate_config(config)
  multi = maybe_initialize_distributed(config.distributed_init_timeout_s, config.heartbeat_timeout_s)
  if isinstance(initial_state, TrainedModel):
    data = _prepare_data(train_data, val_data, config, initial_state.preprocessing)
    initial_state = initial_state.state
  else:
    data = _prepare_data(train_data, val_data, config)
  if config.best_metric and data.val is None and config.best_metric.startswith("val_"):
    raise ConfigError(f"config: best_metric={config.best_metric!r} needs val_data")
  strategy = make_strategy(config.parallel, int(data.train.batch_size))
  if data.val is not None and int(data.val.batch_size) % strategy.num_devices:
    raise ConfigError(f"fit: val_data.batch_size={data.val.batch_size} is not divisible by the "
                      f"{strategy.num_devices} devices")
  steps_per_epoch, chunk = int(data.train.steps_per_epoch), int(config.log_every)
  run_steps = steps_per_epoch * int(config.epochs)
  workdir = pathlib.Path(workdir).absolute() if workdir is not None else None

  # model -> state (the caller's is never donated)
  state = _start_state(model, data.train, config, initial_state, run_steps)
  first_epoch, first_step = int(fetch(state.epoch)), int(fetch(state.step))
  last_epoch = first_epoch + int(config.epochs)
  state = strategy.place_state(state, copy=initial_state is not None)

  # feed -> programs (compiled once: the chunk length is fixed, the number of active steps an argument)
  feed = make_feed(data.train, strategy, config.feed, chunk)
  _check_model_and_targets(model, strategy.local_state(state), _abstract_batch(feed, data.train), data.train,
                           config)
  train_step, eval_step = make_steps(model, loss=config.loss, target=config.target, axis_name=strategy.axis_name,
                                     compute_dtype=config.compute_dtype, from_logits=config.from_logits)
  loop = _Loop(strategy, config, feed, steps_per_epoch=steps_per_epoch, first_step=first_step,
               last_epoch=last_epoch, schedule=make_schedule(config, run_steps),
               train_fn=_train_program(strategy, train_step, feed, chunk, int(data.train.batch_size)),
               next_epoch_fn=_next_epoch_program(strategy),
               evaluate_val=(_Evaluator(strategy, eval_step, data.val, config.feed, chunk)
                             if data.val is not None else None))

  # lock -> checkpoint -> resume -> epochs (nothing was written before this point)
  with workdir_lock(workdir) if workdir is not None else contextlib.nullcontext():
    return _train(model, config, data, strategy, loop, state, workdir, callbacks, multi, steps_per_epoch,
                  first_epoch)


def _train(model, config, data: _Data, strategy: Strategy, loop: "_Loop", state, workdir, callbacks, multi: bool,
           steps_per_epoch: int, first_epoch: int) -> FitResult:
  """fit's part that writes to the workdir (under its lock): resume, the epochs, the end of training."""
  loop.checkpointer, state = _resume(workdir, config, strategy, state)
  resumed_at = int(fetch(strategy.local_state(state).step))
  callbacks = list(callbacks)
  if workdir is not None:
    callbacks += [callbacks_lib.JSONLogger(workdir / "history.json"),
                  callbacks_lib.CSVLogger(workdir / "metrics.csv"), callbacks_lib.TensorBoard(workdir / "tb")]
  try:
    state, history, global_step = loop.run(state, callbacks, workdir, first_epoch)
    final = strategy.local_state(state)
    for cb in callbacks:
      replaced = cb.on_train_end(final)
      if replaced is not None:
        final = replaced
  except jax.errors.JaxRuntimeError as err:
    if multi:
      raise DistributedError(f"multi-process: a collective failed at step ~{loop.global_step} (a peer process "
                             f"probably died): {_first_line(err)}") from err
    raise
  except StorageError as err:
    last = loop.checkpointer.last_good_step if loop.checkpointer is not None else None
    _trim_logs(callbacks, loop, last, first_epoch)
    where = (f"the last committed checkpoint, step {last}, is intact: the same command resumes from it"
             if last is not None else "no checkpoint was committed: the same command starts the run again")
    raise StorageError(f"{err}; {where}", errno=err.errno, filename=err.filename) from None
  finally:
    for cb in callbacks:
      if isinstance(cb, callbacks_lib.TensorBoard):
        with contextlib.suppress(StorageError):
          cb.close()  # also when training stopped on an error (a full disk already reported)

  counts = {"train_examples": int(data.train.num_examples),
            "validation_examples": int(data.val.num_examples) if data.val is not None else 0,
            "batch_size": int(data.train.batch_size), "steps_per_epoch": steps_per_epoch}
  return FitResult(final, history, data.preprocessing, global_step - resumed_at, counts, module=model, config=config,
                   class_names=list(getattr(data.train, "class_names", None) or []),
                   input_shape=tuple(data.train.image_shape), input_dtype=_raw_dtype(data.train))


def _resume(workdir, config, strategy: Strategy, state):
  """(checkpointer or None, state): the workdir's latest good checkpoint restored into `state`'s layout."""
  if workdir is None:
    return None, state
  checkpointer = Checkpointer(workdir, keep=config.keep_checkpoints, async_save=config.async_checkpointing,
                              best_metric=config.best_metric, best_mode=best_mode(config))
  restored = checkpointer.restore_latest(strategy.local_state(state))
  if restored is not None:
    state = strategy.from_local(restored)
  return checkpointer, state


class _Loop:
  """The epochs of a run: chunks of steps between host syncs, then validation, history, callbacks and
  checkpoints at each epoch's end."""

  def __init__(self, strategy: Strategy, config, feed, *, steps_per_epoch: int, first_step: int, last_epoch: int,
               schedule, train_fn, next_epoch_fn, evaluate_val):
    self.strategy, self.config, self.feed = strategy, config, feed
    self.steps_per_epoch, self.first_step, self.last_epoch = steps_per_epoch, first_step, last_epoch
    self.train_fn, self.next_epoch_fn, self.evaluate_val = train_fn, next_epoch_fn, evaluate_val
    self.learning_rate = logged_learning_rate(config, schedule)  # step -> float, for the logs
    self.with_acc = _with_accuracy(config.loss)
    self.checkpointer: Checkpointer | None = None
    self.global_step = 0
    self._start = None  # (epoch, epoch step, global step) where run() started

  def epochs_at(self, step: int) -> int:
    """The epochs completed (counting the state's earlier ones) at global step `step` of this run, or at
    the step it resumed from."""
    epoch, epoch_step, global_step = self._start
    return epoch + (max(step - global_step, 0) + epoch_step) // self.steps_per_epoch

  def run(self, state, callbacks, workdir, first_epoch: int):
    """Trains from `state`'s position to the last epoch; returns (state, history, global step)."""
    strategy, config = self.strategy, self.config
    host = strategy.local_state(state)
    start_epoch, start_step = int(fetch(host.epoch)), int(fetch(host.epoch_step))
    self.global_step = int(fetch(host.step))
    self._start = (start_epoch, start_step, self.global_step)
    history = _load_history(workdir, start_epoch - first_epoch)
    if start_epoch >= self.last_epoch:
      _LOG.info("the run in %s is already complete (epoch %d of %d): nothing to train", workdir, start_epoch,
                self.last_epoch)
    elif self.global_step > self.first_step:
      _LOG.info("resuming at step %d (epoch %d, batch %d)", self.global_step, start_epoch + 1, start_step)
    first_bad = strategy.place_state(jnp.zeros((), jnp.int32))
    total = self.first_step + self.steps_per_epoch * (self.last_epoch - first_epoch)
    progress = callbacks_lib.Progress(config.progress, total, self.global_step)
    for cb in callbacks:
      cb.on_train_begin(history)
    stopped_at_once = False
    try:
      with _PreemptionFlag() as preemption:
        for epoch in range(start_epoch, self.last_epoch):
          state, first_bad, metrics = self._epoch(state, first_bad, epoch, start_step if epoch == start_epoch else 0,
                                                  progress, preemption)
          state, stop = self._end_epoch(state, first_bad, epoch, metrics, history, callbacks, progress, preemption)
          if stop:
            _LOG.info("stopping early after epoch %d", epoch + 1)
            break
    except KeyboardInterrupt:
      stopped_at_once = True  # a second Ctrl-C: no waiting for a save in flight (it commits or is ignored)
      raise
    finally:
      progress.close()
      if self.checkpointer is not None:
        if stopped_at_once:
          self.checkpointer.abandon()
        else:
          self.checkpointer.close()
    return state, history, self.global_step

  def _epoch(self, state, first_bad, epoch: int, epoch_step: int, progress, preemption):
    """The epoch's steps from `epoch_step`, in chunks between host syncs (the feed prepares each chunk one
    ahead); returns (state, first_bad, the epoch's metrics so far or None when no step ran)."""
    config, strategy, checkpointer = self.config, self.strategy, self.checkpointer
    plan = _chunk_plan(self.global_step, epoch_step, self.steps_per_epoch, int(config.log_every),
                       config.checkpoint_every_steps)
    metrics = None
    with contextlib.closing(self.feed.chunks(epoch, plan)) as chunks:
      for (_, n), xs in zip(plan, chunks):
        state, first_bad = self.train_fn(state, first_bad, self.feed.constants, xs, strategy.scalar(np.int32(n)))
        self.global_step, epoch_step = self.global_step + n, epoch_step + n
        metrics = self._sync(state, first_bad, epoch)
        progress.report(self.global_step, epoch, self.last_epoch, metrics)
        every = config.checkpoint_every_steps
        at_checkpoint = bool(every) and self.global_step % every == 0
        if checkpointer is not None and epoch_step < self.steps_per_epoch and (at_checkpoint or preemption.requested):
          checkpointer.save(strategy.local_state(state))
        if preemption.requested:
          _stop_preempted(checkpointer, strategy, state, preemption.requested)
    return state, first_bad, metrics

  def _end_epoch(self, state, first_bad, epoch: int, metrics, history: dict, callbacks, progress, preemption):
    """Metrics, validation, history, callbacks, the rollover and its checkpoint; returns (state, stop)."""
    strategy, checkpointer = self.strategy, self.checkpointer
    if metrics is None:  # resumed exactly at the end of an epoch: no step ran in it here
      metrics = self._sync(state, first_bad, epoch)
    lr = self.learning_rate(max(self.global_step - 1 - self.first_step, 0))
    logs = {"epoch": epoch + 1, **metrics, "lr": lr}
    if self.evaluate_val is not None:
      logs.update(summarize(self.evaluate_val(state), "val_", self.with_acc))
    progress.end_epoch(epoch, self.last_epoch, logs)
    for key, value in logs.items():
      history.setdefault(key, []).append(value)
    for cb in callbacks:
      cb.on_epoch_end(epoch, logs, strategy.local_state(state))
    state = self.next_epoch_fn(state)
    if checkpointer is not None:
      checkpointer.save(strategy.local_state(state))
      checkpointer.save_best(strategy.local_state(state), logs)
    if preemption.requested:
      _stop_preempted(checkpointer, strategy, state, preemption.requested)
    return state, any(getattr(cb, "stop_training", False) for cb in callbacks)

  def _sync(self, state, first_bad, epoch: int) -> dict:
    """The host sync: the non-finite check; returns host metrics of the epoch so far."""
    host = self.strategy.local_state(state)
    bad = int(self.strategy.fetch(first_bad))
    if bad:
      loss_sum = float(fetch(host.metric_sums["loss_sum"]))
      kind = "inf" if math.isinf(loss_sum) else "nan"
      last = None
      if self.checkpointer is not None:
        self.checkpointer.wait()  # a save still in flight is of a good state: let it commit and count
        last = self.checkpointer.last_good_step
      raise NonFiniteError(f"loss became {kind} at step {bad} (epoch {epoch + 1}); last good checkpoint: "
                           + (f"step {last}" if last is not None else "none"))
    return summarize(jax.tree.map(fetch, host.metric_sums), with_accuracy=self.with_acc)


def _stop_preempted(checkpointer, strategy: Strategy, state, signame: str):
  """Raises Preempted (SIGTERM) or Interrupted (SIGINT) once the current step's checkpoint is committed."""
  error = Interrupted if signame == "SIGINT" else Preempted
  if checkpointer is None:
    raise error(f"{signame}: stopped without a checkpoint (no workdir)")
  step = checkpointer.save(strategy.local_state(state))
  checkpointer.wait()
  raise error(f"{signame}: checkpoint step {step} saved in {checkpointer.workdir}; re-run to resume")


def evaluate(state_or_variables, model, data, *, loss: str = "softmax_cross_entropy",
             target: str = "label", parallel: str = "auto", preprocessing: dict | None = None,
             batch_size: int | None = None) -> dict[str, float]:
  """Loss and accuracy of `model` on every example of `data` (padded batches count only real examples).

  Compiled once: arrays run through the inference runtime shared by every call with the same model,
  preprocessing, batch size, loss, target and parallel mode (and by TrainedModel.evaluate), so a repeated
  call on arrays of the same shapes traces and compiles nothing, whatever their number of examples; a
  pipeline's evaluation program is kept for later calls on the same pipeline object (the last few).

  Args:
    state_or_variables: a TrainState, a {"params": ..., "batch_stats": ...} dict, or a params pytree.
    model: the flax.linen Module.
    data: an InputPipeline, or (inputs, targets) arrays prepared with `preprocessing`.
    loss: the loss name (default "softmax_cross_entropy"; "mse" reports no accuracy).
    target: the batch key compared with the outputs (default "label").
    parallel: "auto"/"jit" (every device), "none" (one device) or "pmap".
    preprocessing: for arrays: the run's preprocessing spec (FitResult.preprocessing); None: "auto".
    batch_size: for arrays: the evaluation batch (default 256, rounded to the device count).

  Returns:
    {"loss": float, "accuracy": float} (no "accuracy" for mse).
  """
  from jaxcnn.train.model import _inference_runtime, _no_optimizer
  if isinstance(state_or_variables, TrainState):
    params, batch_stats = state_or_variables.params, state_or_variables.batch_stats
  elif isinstance(state_or_variables, dict) and "params" in state_or_variables:
    params, batch_stats = state_or_variables["params"], state_or_variables.get("batch_stats", {})
  else:
    params, batch_stats = state_or_variables, {}
  parallel = validate_config({"parallel": parallel}).parallel
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=(),
                     rng=jnp.zeros((2,), jnp.uint32), epoch=jnp.zeros((), jnp.int32),
                     epoch_step=jnp.zeros((), jnp.int32), metric_sums=zero_metric_sums(), tx=_no_optimizer())
  if isinstance(data, tuple):
    devices = device_count(parallel)
    batch = batch_size or max(devices, 256 // devices * devices)
    inputs, targets = _as_arrays(data, "data")
    pipeline = _pipeline("data", inputs, targets, batch_size=int(batch), seed=0, shuffle=False,
                         preprocessing=preprocessing)
    runtime = _inference_runtime(model, pipeline.preprocessing, int(batch), parallel=parallel, loss=loss,
                                 target=target)
    sums = runtime.metric_sums(runtime.place(state), pipeline)
  else:
    _check_pipeline(data, "data")
    evaluator = _pipeline_evaluator(data, model, loss, target, parallel)
    sums = evaluator(evaluator.strategy.place_state(state))
  return summarize(sums, with_accuracy=_with_accuracy(loss))


# Evaluators of pipelines kept for later `evaluate` calls on the same pipeline object, most recent last.
_PIPELINE_EVALUATORS: "collections.OrderedDict[tuple, tuple[Any, _Evaluator]]" = collections.OrderedDict()
_PIPELINE_EVALUATORS_KEPT = 4


def _pipeline_evaluator(pipeline, model, loss: str, target: str, parallel: str) -> "_Evaluator":
  key = (id(pipeline), model, loss, target, parallel)
  entry = _PIPELINE_EVALUATORS.pop(key, None)
  if entry is None:
    strategy = make_strategy(parallel, int(pipeline.batch_size))
    _, eval_step = make_steps(model, loss=loss, target=target, axis_name=strategy.axis_name)
    # The pipeline is held with its evaluator, so its id cannot be reused while the entry exists.
    entry = (pipeline, _Evaluator(strategy, eval_step, pipeline, "auto", int(pipeline.steps_per_epoch)))
  _PIPELINE_EVALUATORS[key] = entry
  while len(_PIPELINE_EVALUATORS) > _PIPELINE_EVALUATORS_KEPT:
    _PIPELINE_EVALUATORS.popitem(last=False)
  return entry[1]
