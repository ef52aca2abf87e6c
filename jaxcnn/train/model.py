"""A trained model you can use: predict, evaluate, save, and `load` to get the same object back.

    result = jaxcnn.train.fit(model, (x_train, y_train), config=...)   # a FitResult is a TrainedModel
    probabilities = result.predict(x_test)          # raw inputs, the run's preprocessing applied
    result.evaluate(x_test, y_test)                 # {"loss": ..., "accuracy": ...}
    result.save("my_model")
    again = jaxcnn.train.load("my_model")           # predictions bitwise equal to result's

`TrainedModel` holds the flax module, its train state (weights, batch statistics, step, rng, epoch), the
run's preprocessing spec, fit's config (loss, from_logits, ...) and the class names. `FitResult` (what
fit returns) is a TrainedModel with the run's history; `load` returns a TrainedModel; both can be
passed to fit as `initial_state` to train more.

Inference runs through the same machinery as fit's validation: the run's Strategy (a mesh over every
device), the host feed (each process reads its rows of every batch, the batch is finished on device by
the pipeline's transform, i.e. the preprocessing spec) and, for `evaluate`, fit's own eval step and
chunk program (`loop._eval_program`). One program call runs a chunk of up to MAX_CHUNK_BATCHES batches
in a lax.scan, and the results are fetched once, at the end of the call. The programs are forward passes
only, traced with `jaxcnn.ops.forward_only_lowering`: on CPU, XLA's own convolution, which it fuses with
the batch norm, activation and pooling after it (the outputs equal `module.apply(..., train=False)`'s
within float32 rounding, not bitwise: that traces the training lowering). Each program is compiled once
per batch size and input shape and shared by every model with the same module and preprocessing (a
model loaded twice compiles once); the last batch is padded (its padding masked out of the metrics and
dropped from the predictions), so a call compiles at most one program and later calls of the same batch
size trace and compile nothing, whatever their number of examples.

The saved format, "jaxcnn.model/1" (a directory):

  model.json     {"format": "jaxcnn.model/1", "versions": {jaxcnn, jax, flax, orbax},
                  "architecture": {"kind": "registry", "name", "kwargs"} | {"kind": "sequential", "spec"}
                                  | {"kind": "module", "class"} (weights only: load(path, model=...)),
                  "input": {"shape", "dtype"} (raw inputs predict takes), "model_input_dtype",
                  "output": {"shape", "activation"}, "preprocessing" (jaxcnn.preprocessing/1, or null),
                  "loss": {"name", "from_logits"}, "class_names", "config" (fit's whole config),
                  "training": {"step", "epoch", "rng"}, "variables": {"sha256", "shapes"}}
  variables/     an Orbax checkpoint (StandardCheckpointer) of {"params", "batch_stats"?}

`load` refuses, with one line naming the file, a path that is not such a directory (a training
workdir, a foreign folder), a missing or garbled model.json, another format version, an architecture
it cannot rebuild, variables whose shapes do not fit the architecture, and variables whose content
digest differs from the one recorded (silent damage).
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging
import math
import os
import pathlib
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.errors import CheckpointError, ConfigError

_LOG = logging.getLogger(__name__)

MODEL_FORMAT = "jaxcnn.model/1"
_FORMAT_PREFIX = "jaxcnn.model/"
MODEL_JSON = "model.json"
VARIABLES_DIR = "variables"
# Default inference batch: large enough to keep the devices busy, small enough for any model on a CPU.
DEFAULT_BATCH = 256


def _first_line(err: Exception) -> str:
  text = str(err).strip()
  return text.splitlines()[0] if text else type(err).__name__


def _model_input_dtype(raw_dtype) -> np.dtype:
  """The dtype the module sees for raw inputs of `raw_dtype`: float32 for pixels and floats (the
  preprocessing casts them), other integer inputs unchanged."""
  dtype = np.dtype(raw_dtype)
  return np.dtype(np.float32) if dtype == np.uint8 or np.issubdtype(dtype, np.floating) else dtype


def _kind(dtype) -> str:
  dtype = np.dtype(dtype)
  return "uint8" if dtype == np.uint8 else "float" if np.issubdtype(dtype, np.floating) else dtype.name


def _inference_batch(batch_size, count: int, devices: int) -> int:
  """`batch_size`, or the default: DEFAULT_BATCH, or the next power of two >= count for fewer examples
  (so small calls of different sizes share a few programs); rounded up to the device count."""
  if batch_size is None:
    batch = DEFAULT_BATCH if count >= DEFAULT_BATCH else 1 << max(count - 1, 0).bit_length()
  else:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
      raise ValueError(f"batch_size: expected a positive integer or None, got {batch_size!r}")
    batch = int(batch_size)
  return -(-batch // devices) * devices


class TrainedModel:
  """A flax module with its trained state and everything needed to use it on raw inputs.

  Attributes:
    module: the flax.linen Module.
    state: its TrainState: params, batch_stats, step, rng and epoch count (a loaded model has no
      optimizer state; fit starts a fresh one when it continues from it).
    preprocessing: the run's preprocessing spec (docs/DESIGN.md, "Preprocessing"), or None (the run's
      pipeline had none: predict takes the module's inputs as they are).
    config: fit's validated config of the run (its loss, from_logits, compute_dtype, parallel, ...).
    class_names: the classes' names ([] for targets that are not classes).
    input_shape, input_dtype: one raw example's shape and the raw inputs' dtype (what predict takes).
  """

  module: Any
  state: Any
  preprocessing: dict | None
  config: Any
  class_names: list
  input_shape: tuple | None
  input_dtype: str | None

  def __init__(self, module, state, *, preprocessing=None, config=None, class_names=(), input_shape=None,
               input_dtype=None):
    from jaxcnn.train.config import validate_config
    self.module, self.state, self.preprocessing = module, state, preprocessing
    self.config = validate_config(config)
    self.class_names = list(class_names)
    self.input_shape = tuple(input_shape) if input_shape is not None else None
    self.input_dtype = input_dtype
    self._check_loss()

  def _check_loss(self) -> None:
    """The config's loss and from_logits fit the module (no double squash): ConfigError otherwise."""
    if self.module is not None:
      self.from_logits  # noqa: B018  (resolve_from_logits raises)

  # -- what the run was ------------------------------------------------------------------------------

  @property
  def variables(self) -> dict:
    """{"params", "batch_stats"?}: what `module.apply` takes."""
    return self.state.variables()

  @property
  def loss(self) -> str:
    return self.config.loss

  @property
  def from_logits(self) -> bool | None:
    """Whether the module's outputs are logits for the loss (resolved as fit resolves it)."""
    from jaxcnn.train.losses import resolve_from_logits
    return resolve_from_logits(self.module, self.loss, self.config.from_logits)

  def _raw_input(self) -> tuple[tuple, np.dtype]:
    if self.preprocessing is not None:
      return tuple(self.preprocessing["input_shape"]), np.dtype(self.preprocessing["input_dtype"])
    if self.input_shape is None or self.input_dtype is None:
      raise ValueError("TrainedModel: neither a preprocessing spec nor input_shape/input_dtype is known")
    return tuple(self.input_shape), np.dtype(self.input_dtype)

  def preprocess(self, inputs):
    """Raw inputs (as given to fit) prepared as the run prepared them: the module's inputs."""
    from jaxcnn.data import pipeline as pipeline_lib
    if self.preprocessing is None:
      raise ValueError("preprocess: the training pipeline carried no preprocessing spec")
    return pipeline_lib.preprocess(self.preprocessing, inputs)

  # -- inference -------------------------------------------------------------------------------------

  def _check_inputs(self, x, name: str = "x") -> np.ndarray:
    shape, dtype = self._raw_input()
    x = np.asarray(x)
    if x.dtype == np.uint8 and x.ndim == len(shape) and shape[-1] == 1 and tuple(x.shape[1:]) == shape[:-1]:
      x = x[..., None]  # (N, H, W) pixels, as fit accepts them
    if x.ndim == len(shape) and tuple(x.shape) == shape:
      raise ValueError(f"{name}: shape {x.shape} is one example; pass a batch (N, {', '.join(map(str, shape))}), "
                       f"e.g. {name}[None]")
    if tuple(x.shape[1:]) != shape or x.shape[0] < 1:
      raise ValueError(f"{name}: expected shape (N, {', '.join(map(str, shape))}) with N >= 1, got {x.shape}")
    if _kind(x.dtype) != _kind(dtype):
      how = ""
      if self.preprocessing is not None and self.preprocessing["scale"] != 1.0:
        how = f" (the run's preprocessing scales them by {self.preprocessing['scale']:g} itself)"
      raise ValueError(f"{name}: dtype {x.dtype.name}, but the model was trained on {dtype.name} inputs; pass "
                       f"{dtype.name} inputs as given to fit{how}")
    return x

  def _inference(self, batch_size, count: int) -> "_Inference":
    """The shared inference runtime for this model's calls of `count` examples at `batch_size`."""
    from jaxcnn.train.parallel import device_count
    parallel = "none" if self.config.parallel == "none" else "jit"
    batch = _inference_batch(batch_size, count, device_count(parallel))
    shape, dtype = self._raw_input()
    spec = self.preprocessing
    if spec is None:  # the module's inputs as they are: the pipeline's own "none" spec
      spec = _pipeline(np.zeros((1, *shape), dtype), np.zeros((1,), np.int32), batch, None).preprocessing
    return _inference_runtime(self.module, spec, batch, parallel=parallel, loss=self.loss, target="label",
                             compute_dtype=self.config.compute_dtype, from_logits=self.config.from_logits)

  def _placed_state(self, runtime: "_Inference"):
    """This model's state placed for `runtime`'s strategy, once per strategy and kept."""
    placed = self.__dict__.setdefault("_placed", {})
    key = (runtime.strategy.name, runtime.strategy.num_devices)
    if key not in placed:
      placed[key] = runtime.place(self.state)
    return placed[key]

  def predict(self, x, batch_size: int | None = None) -> np.ndarray:
    """The module's outputs on raw inputs, the run's preprocessing applied: what the module returns in
    eval mode (probabilities for a model ending in softmax/sigmoid, logits otherwise), computed with the
    forward-only convolution lowering (equal to `module.apply(variables, preprocess(x))` within float32
    rounding; bitwise the same for every model with these weights, saved and loaded or not).

    Args:
      x: raw inputs of the kind fit was given: (N, *input_shape) (uint8 (N, H, W) images too), the same
        dtype kind (uint8 pixels stay uint8: the preprocessing scales them).
      batch_size: examples per batch of the compiled program (default: 256, or the next power of two
        >= N for fewer); the last batch is padded, so one program serves the whole call and later calls
        of that size.

    Returns:
      float32 numpy array (N, *output_shape).

    Raises:
      ValueError: x of another shape or dtype kind than the training inputs; a bad batch_size.
    """
    x = self._check_inputs(x)
    runtime = self._inference(batch_size, len(x))
    return runtime.predict(self._placed_state(runtime), x)

  def evaluate(self, x, y, batch_size: int | None = None) -> dict[str, float]:
    """Loss (the run's loss and from_logits) and, where the loss has one, accuracy over every example.

    Computed as fit computes its validation metrics (its eval step and chunk program, the same
    Strategy), with the padding of the last batch masked out.

    Args:
      x: raw inputs, as for `predict`.
      y: targets of the kind fit was given: int class ids (N,), one-hot/soft labels (N, K), or float
        arrays shaped like the outputs.
      batch_size: as for `predict`.

    Returns:
      {"loss": float, "accuracy": float} ("accuracy" only for losses that have one).

    Raises:
      ValueError: x as for predict; y with another number of examples, or a shape or dtype that does
        not fit the loss (one line naming y).
    """
    from jaxcnn.train.losses import has_accuracy
    from jaxcnn.train.step import summarize
    x = self._check_inputs(x)
    y = self._check_targets(x, y)
    runtime = self._inference(batch_size, len(x))
    sums = runtime.metric_sums(self._placed_state(runtime), runtime.pipeline(x, y))
    return summarize(sums, with_accuracy=has_accuracy(self.loss))

  def _check_targets(self, x, y) -> np.ndarray:
    from jaxcnn.train.losses import get_loss
    y = np.asarray(y)
    if y.ndim < 1 or len(y) != len(x):
      raise ValueError(f"y: expected {len(x)} targets (one per example of x), got shape {y.shape}")
    if np.issubdtype(y.dtype, np.floating):
      y = y.astype(np.float32)
    elif y.dtype == bool or np.issubdtype(y.dtype, np.integer):
      y = y.astype(np.int32)
    else:
      raise ValueError(f"y: expected integer class ids or float targets, got dtype {y.dtype}")
    outputs = self._output_shape()
    # Whether targets of this shape and dtype fit the loss: checked abstractly once per kind of target.
    fits = self.__dict__.setdefault("_target_kinds", {})
    kind = (tuple(y.shape[1:]), y.dtype.str)
    if kind not in fits:
      try:
        jax.eval_shape(get_loss(self.loss, from_logits=self.from_logits), outputs,
                       jax.ShapeDtypeStruct((1, *y.shape[1:]), y.dtype))
        fits[kind] = None
      except (ValueError, TypeError) as err:
        fits[kind] = (f"y: targets {tuple(y.shape[1:])} {y.dtype} do not fit loss={self.loss!r} for model "
                      f"outputs {tuple(outputs.shape[1:])}: {_first_line(err)}")
    if fits[kind] is not None:
      raise ValueError(fits[kind])
    if y.ndim == 1 and np.issubdtype(y.dtype, np.integer) and y.size and (y.min() < 0 or y.max() >= outputs.shape[-1]):
      raise ValueError(f"y: class ids must be in [0, {outputs.shape[-1]}) for the model's {outputs.shape[-1]} "
                       f"outputs, got {int(y.min())}..{int(y.max())}")
    return y

  def _output_shape(self) -> jax.ShapeDtypeStruct:
    """One example's outputs, abstractly (traced once and kept: later calls trace nothing)."""
    if "_outputs" not in self.__dict__:
      shape, dtype = self._raw_input()
      prepared = jax.ShapeDtypeStruct((1, *shape), _model_input_dtype(dtype))
      self.__dict__["_outputs"] = jax.eval_shape(lambda v, a: self.module.apply(v, a, train=False),
                                                 self.variables, prepared)
    return self.__dict__["_outputs"]

  # -- saving ----------------------------------------------------------------------------------------

  def save(self, path, *, architecture: bool = True, overwrite: bool = True) -> pathlib.Path:
    """Writes the model as a "jaxcnn.model/1" directory (module docstring): model.json + variables/.

    Args:
      path: the directory to write (its parent is created). An existing saved jaxcnn model there is
        replaced (overwrite=True, the default, as Keras' save); anything else there is never touched.
      architecture: write how to rebuild the module (default True): its registry name and arguments
        when it came from `jaxcnn.models.get`, else the layer spec of a `jaxcnn.layers.Sequential`.
        False writes the weights alone (for a custom nn.Module): `load(path, model=module)` reads them.

    Returns:
      The directory written.

    Raises:
      ValueError: the architecture cannot be written (a custom module, a lambda activation: the message
        names the layer and says to pass architecture=False and load with model=...).
      CheckpointError: `path` exists and is not a saved jaxcnn model (or overwrite=False).
      StorageError: it cannot be written (disk full, read-only, permissions): one line naming the path;
        nothing half-written is left and a model saved there before is kept.
    """
    from jaxcnn import storage
    from jaxcnn.train.checkpoint import digest_tree
    from jaxcnn.train.parallel import fetch
    path = pathlib.Path(path).expanduser().absolute()
    document = self._document(architecture)
    variables = jax.tree.map(lambda a: np.asarray(fetch(a)), self.variables)
    document["variables"] = {"sha256": digest_tree(variables),
                             "shapes": {k: list(v) for k, v in _shapes(variables).items()}}
    if path.exists() or path.is_symlink():
      if not _is_saved_model(path):
        raise CheckpointError(f"{path}: exists and is not a saved jaxcnn model; not overwritten (choose "
                              "another path or remove it)")
      if not overwrite:
        raise CheckpointError(f"{path}: a saved model is there already (overwrite=False)")
    primary = jax.process_index() == 0
    tmp = path.with_name(f".{path.name}.saving")
    try:
      if primary:
        if tmp.exists():
          shutil.rmtree(tmp)
        # Made here, before Orbax starts: an unwritable place is an OSError now, not a stuck Orbax thread.
        tmp.mkdir(parents=True)
      _sync("jaxcnn: model save starts")
      import orbax.checkpoint as ocp
      with storage.storage_errors(tmp / VARIABLES_DIR), ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp / VARIABLES_DIR, variables)
        checkpointer.wait_until_finished()
      if primary:
        _write_json(tmp / MODEL_JSON, document)
        old = path.with_name(f".{path.name}.replaced")
        if path.exists():
          if old.exists():
            shutil.rmtree(old)
          os.replace(path, old)
        os.replace(tmp, path)
        if old.exists():
          shutil.rmtree(old)
      _sync("jaxcnn: model saved")
    except Exception as err:  # noqa: BLE001  (Orbax reports a full disk as a ValueError)
      if primary:
        shutil.rmtree(tmp, ignore_errors=True)  # never a half-written model left behind
      failed = storage.storage_error(err, path)
      if failed is not None:
        raise failed from None
      if isinstance(err, OSError):
        raise CheckpointError(f"{path}: cannot write the saved model: {err.strerror or _first_line(err)}") from None
      raise
    return path

  def _document(self, architecture: bool) -> dict:
    import flax
    import orbax.checkpoint as ocp

    import jaxcnn
    from jaxcnn.train.losses import output_activation
    from jaxcnn.train.parallel import fetch
    shape, dtype = self._raw_input()
    model_dtype = _model_input_dtype(dtype)
    outputs = jax.eval_shape(lambda v, a: self.module.apply(v, a, train=False), self.variables,
                             jax.ShapeDtypeStruct((1, *shape), model_dtype))
    s = self.state
    return {
        "format": MODEL_FORMAT,
        "versions": {"jaxcnn": jaxcnn.__version__, "jax": jax.__version__, "flax": flax.__version__,
                     "orbax": getattr(ocp, "__version__", "unknown")},
        "architecture": _architecture(self.module, architecture),
        "input": {"shape": [int(d) for d in shape], "dtype": dtype.name},
        "model_input_dtype": model_dtype.name,
        "output": {"shape": [int(d) for d in outputs.shape[1:]], "activation": output_activation(self.module)},
        "preprocessing": self.preprocessing,
        "loss": {"name": self.loss, "from_logits": self.from_logits},
        "class_names": list(self.class_names),
        "config": _jsonable_config(self.config),
        "training": {"step": int(fetch(s.step)), "epoch": int(fetch(s.epoch)),
                     "rng": [int(v) for v in np.ravel(fetch(s.rng))]},
    }


# -- inference programs --------------------------------------------------------------------------------

# A chunk (the batches one program call runs) holds at most this many batches and this many bytes of raw
# inputs: few host round trips per call, a bounded amount of input placed on the devices at once.
MAX_CHUNK_BATCHES = 16
MAX_CHUNK_BYTES = 64 << 20
# Inference runtimes kept (each holds its compiled programs); the least recently used goes first.
_RUNTIME_CACHE_SIZE = 16
_RUNTIMES: "collections.OrderedDict[tuple, _Inference]" = collections.OrderedDict()


@functools.lru_cache(maxsize=None)
def _no_optimizer():
  """The optimizer of states that are only evaluated: one object, so that every such state has the same
  pytree structure (the optimizer is static) and the programs they pass through are traced once."""
  import optax
  return optax.identity()


def _pipeline(x, y, batch: int, spec):
  """The unshuffled, padded pipeline one inference call reads (raw rows read on the host, finished on
  device by the spec's transform); `spec` None: the module's inputs as they are."""
  from jaxcnn.data import pipeline as pipeline_lib
  kwargs = dict(preprocessing=spec) if spec is not None else dict(normalize="none")
  return pipeline_lib.ResidentPipeline(x, y, batch_size=batch, seed=0, shuffle=False, drop_remainder=False,
                                       **kwargs)


def _inference_chunk(batch: int, example_shape, dtype) -> int:
  """Batches per chunk: MAX_CHUNK_BATCHES, fewer where their raw inputs would pass MAX_CHUNK_BYTES."""
  per_batch = batch * math.prod(example_shape) * np.dtype(dtype).itemsize
  return int(max(1, min(MAX_CHUNK_BATCHES, MAX_CHUNK_BYTES // max(per_batch, 1))))


def _inference_runtime(module, spec: dict, batch: int, *, parallel: str, loss: str, target: str = "label",
                       compute_dtype="float32", from_logits=None) -> "_Inference":
  """The runtime (strategy, chunk length, compiled programs) for these settings, made once and shared by
  every later call with the same ones (TrainedModels of the same module and preprocessing, and
  `jaxcnn.train.evaluate` on arrays): a repeated call traces and compiles nothing."""
  try:
    hash(module)
    module_key = module
  except TypeError:  # a module with unhashable fields: itself (the runtime holds it, so its id stays its own)
    module_key = ("id", id(module))
  key = (module_key, json.dumps(spec, sort_keys=True), int(batch), parallel, loss, target, str(compute_dtype),
         from_logits)
  runtime = _RUNTIMES.pop(key, None)
  if runtime is None:
    runtime = _Inference(module, spec, int(batch), parallel=parallel, loss=loss, target=target,
                         compute_dtype=compute_dtype, from_logits=from_logits)
  _RUNTIMES[key] = runtime
  while len(_RUNTIMES) > _RUNTIME_CACHE_SIZE:
    _RUNTIMES.popitem(last=False)
  return runtime


class _Inference:
  """Inference over raw arrays at one batch size: the Strategy, the host feed's chunk length and the
  predict / evaluate programs, each compiled on first use (once per input shape and dtype).

  A call reads its examples through the host feed (this process's rows of each batch, K batches stacked
  and placed one chunk ahead of the program), and each program call runs K batches in one lax.scan: the
  raw batch finished on device by the preprocessing transform, then the module's eval-mode forward pass,
  traced with `ops.forward_only_lowering` (no backward pass: XLA's fused convolutions on CPU). The last
  batch is padded: its padding is masked out of the metrics and dropped from the predictions; the
  unused slots of the last chunk are skipped (lax.cond). Results stay on the devices until the call's
  end, where they are fetched once.
  """

  def __init__(self, module, spec: dict, batch: int, *, parallel: str, loss: str, target: str, compute_dtype,
               from_logits):
    from jaxcnn.train.feed import HostFeed
    from jaxcnn.train.parallel import make_strategy
    self.module, self.spec, self.batch = module, spec, batch
    self.loss, self.target, self.compute_dtype, self.from_logits = loss, target, compute_dtype, from_logits
    self.strategy = make_strategy(parallel, batch)
    shape, dtype = tuple(spec["input_shape"]), np.dtype(spec["input_dtype"])
    self.chunk = _inference_chunk(batch, shape, dtype)
    # The programs finish batches with this template's transform: every call's pipeline has the same
    # spec and batch size, so its transform computes exactly the same.
    template = _pipeline(np.zeros((1, *shape), dtype), np.zeros((1,), np.int32), batch, spec)
    self._feed = HostFeed(template, self.strategy, self.chunk)
    self._programs: dict[str, Any] = {}

  def place(self, state):
    """A TrainState's weights (step, rng, epoch too; no optimizer state) placed for the programs."""
    from jaxcnn.train.state import TrainState, zero_metric_sums
    return self.strategy.place_state(TrainState(
        step=state.step, params=state.params, batch_stats=state.batch_stats, opt_state=(), rng=state.rng,
        epoch=state.epoch, epoch_step=state.epoch_step, metric_sums=zero_metric_sums(), tx=_no_optimizer()))

  def _program(self, kind: str):
    if kind not in self._programs:
      if kind == "predict":
        self._programs[kind] = _predict_program(self.strategy, self.module, self._feed, self.chunk, self.batch)
      else:
        from jaxcnn.train.loop import _eval_program
        from jaxcnn.train.step import make_steps
        _, eval_step = make_steps(self.module, loss=self.loss, target=self.target,
                                  axis_name=self.strategy.axis_name, compute_dtype=self.compute_dtype,
                                  from_logits=self.from_logits)
        self._programs[kind] = _eval_program(self.strategy, eval_step, self._feed, self.chunk, self.batch)
    return self._programs[kind]

  def pipeline(self, x, y):
    """The pipeline of one call over raw inputs x and targets y."""
    return _pipeline(x, y, self.batch, self.spec)

  def _chunks(self, pipeline):
    """(plan, the placed chunks) of one call over `pipeline` (made with this runtime's spec and batch)."""
    from jaxcnn.train.feed import HostFeed
    steps = int(pipeline.steps_per_epoch)
    plan = [(s, min(self.chunk, steps - s)) for s in range(0, steps, self.chunk)]
    return plan, HostFeed(pipeline, self.strategy, self.chunk).chunks(0, plan)

  def predict(self, state, x) -> np.ndarray:
    """The module's eval-mode outputs on raw inputs x (N, ...): float32 numpy (N, ...)."""
    program, strategy = self._program("predict"), self.strategy
    plan, chunks = self._chunks(self.pipeline(x, np.zeros((len(x),), np.int32)))
    with contextlib.closing(chunks):
      outputs = [(program(state, xs, strategy.scalar(np.int32(n))), n) for (_, n), xs in zip(plan, chunks)]
    host = [strategy.fetch(o)[:n] for o, n in outputs]
    return np.concatenate([h.reshape(-1, *h.shape[2:]) for h in host])[:len(x)]

  def metric_sums(self, state, pipeline) -> dict:
    """{"loss_sum", "correct_sum", "count"} over every example of `pipeline` (`self.pipeline`), on the host."""
    from jaxcnn.train.state import zero_metric_sums
    program, strategy = self._program("evaluate"), self.strategy
    plan, chunks = self._chunks(pipeline)
    sums = strategy.place_state(zero_metric_sums())
    with contextlib.closing(chunks):
      for (start, n), xs in zip(plan, chunks):
        sums = program(state, sums, None, xs, strategy.scalar(np.int32(n)), strategy.scalar(np.int32(start)))
    return jax.tree.map(strategy.fetch, sums)


def _predict_program(strategy, module, feed, chunk: int, batch_size: int):
  """(state, chunk of raw batches, n) -> the module's eval-mode outputs (K, B, ...) of the first n
  batches (zeros after), compiled once per input shape."""
  from jaxcnn.ops import forward_only_lowering
  from jaxcnn.train.loop import _count_trace

  def predict_chunk(state, xs, n):
    _count_trace("predict_chunk")
    offset = strategy.row_offset(batch_size)

    def forward(x):
      batch = strategy.constrain(feed.batch(None, x, jnp.int32(0), jnp.int32(0), offset))
      return module.apply(state.variables(), batch["image"], train=False)

    with forward_only_lowering():
      shapes = jax.eval_shape(forward, jax.tree.map(lambda a: a[0], xs))

      def body(carry, item):
        i, x = item
        skip = lambda _: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # noqa: E731
        return carry, jax.lax.cond(i < n, forward, skip, x)

      return jax.lax.scan(body, jnp.zeros((), jnp.int32), (jnp.arange(chunk), xs))[1]

  return strategy.compile(predict_chunk, per_replica=(0,))


# -- the file format -----------------------------------------------------------------------------------

def _shapes(tree) -> dict[str, tuple]:
  return {"/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in p): tuple(np.shape(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def _write_json(path: pathlib.Path, document: dict) -> None:
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
  os.replace(tmp, path)


def _jsonable_config(config) -> dict:
  def plain(value):
    if isinstance(value, (tuple, list)):
      return [plain(v) for v in value]
    if isinstance(value, dict):
      return {k: plain(v) for k, v in value.items()}
    return value
  return plain(config.to_dict())


def _architecture(module, write: bool) -> dict:
  from jaxcnn.layers.serialization import architecture_spec
  from jaxcnn.models.registry import registry_entry
  cls = type(module)
  if not write:
    return {"kind": "module", "class": f"{cls.__module__}.{cls.__qualname__}"}
  entry = registry_entry(module)
  if entry is not None:
    from jaxcnn.layers.serialization import _encode
    try:
      return {"kind": "registry", "name": entry[0],
              "kwargs": {k: _encode(v, f"architecture: argument {k!r}") for k, v in entry[1].items()}}
    except ValueError:
      pass  # an argument JSON cannot hold: the layer spec below, if the model is a Sequential
  try:
    return {"kind": "sequential", "spec": architecture_spec(module)}
  except ValueError as err:
    raise ValueError(f"save: {_first_line(err)}; save(path, architecture=False) writes the weights alone, "
                     f"and jaxcnn.train.load(path, model={cls.__qualname__}(...)) reads them") from None


def _is_saved_model(path: pathlib.Path) -> bool:
  try:
    document = json.loads((path / MODEL_JSON).read_text())
  except (OSError, ValueError):
    return False
  return isinstance(document, dict) and str(document.get("format", "")).startswith(_FORMAT_PREFIX)


def _read_document(path: pathlib.Path) -> dict:
  file = path / MODEL_JSON
  if not path.exists():
    raise CheckpointError(f"{path}: no such saved model (nothing at this path)")
  if not path.is_dir():
    raise CheckpointError(f"{path}: not a saved jaxcnn model (a saved model is a directory holding "
                          f"{MODEL_JSON} and {VARIABLES_DIR}/)")
  if not file.is_file():
    hint = ""
    if (path / "checkpoints").is_dir():
      hint = "; it looks like a training workdir (its trained model, when saved, is in its model/ folder)"
    elif (path / "model" / MODEL_JSON).is_file():
      hint = f"; {path / 'model'} is one"
    raise CheckpointError(f"{path}: no {MODEL_JSON}: not a saved jaxcnn model{hint}")
  try:
    document = json.loads(file.read_text())
  except UnicodeDecodeError:
    raise CheckpointError(f"{file}: not a text JSON file (garbled or binary)") from None
  except json.JSONDecodeError as err:
    raise CheckpointError(f"{file}: not valid JSON ({err.msg}: line {err.lineno} column {err.colno})") from None
  except OSError as err:
    raise CheckpointError(f"{file}: cannot read: {err.strerror}") from None
  if not isinstance(document, dict) or not isinstance(document.get("format"), str):
    raise CheckpointError(f"{file}: not a jaxcnn model file (no 'format' field)")
  found = document["format"]
  if found != MODEL_FORMAT:
    if found.startswith(_FORMAT_PREFIX):
      written = document.get("versions", {}).get("jaxcnn", "?") if isinstance(document.get("versions"), dict) else "?"
      raise CheckpointError(f"{file}: format {found!r} (written by jaxcnn {written}) is not readable here; this "
                            f"jaxcnn reads {MODEL_FORMAT!r}")
    raise CheckpointError(f"{file}: format {found!r} is not a jaxcnn model ({MODEL_FORMAT!r})")
  required = {"architecture": dict, "input": dict, "model_input_dtype": str, "preprocessing": (dict, type(None)),
              "loss": dict, "class_names": list, "config": dict, "training": dict, "variables": dict}
  for key, kind in required.items():
    if not isinstance(document.get(key, _MISSING), kind):
      what = "missing" if key not in document else f"of the wrong kind ({type(document[key]).__name__})"
      raise CheckpointError(f"{file}: field {key!r} is {what}")
  return document


_MISSING = object()


def _build_module(document: dict, file: pathlib.Path, model):
  architecture = document["architecture"]
  if model is not None:
    return model
  kind = architecture.get("kind")
  if kind == "registry":
    from jaxcnn import models
    from jaxcnn.layers.serialization import _decode
    try:
      kwargs = {k: _decode(v) for k, v in dict(architecture.get("kwargs", {})).items()}
      return models.get(str(architecture.get("name")), **kwargs)
    except (ValueError, TypeError) as err:
      raise CheckpointError(f"{file}: architecture: {_first_line(err)}") from None
  if kind == "sequential":
    from jaxcnn.layers.serialization import from_architecture_spec
    try:
      return from_architecture_spec(architecture.get("spec"))
    except (ValueError, TypeError) as err:
      raise CheckpointError(f"{file}: {_first_line(err)}") from None
  if kind == "module":
    raise CheckpointError(f"{file}: the architecture was not saved (a {architecture.get('class')}); pass the "
                          "module: jaxcnn.train.load(path, model=...)")
  raise CheckpointError(f"{file}: architecture kind {kind!r} is not 'registry', 'sequential' or 'module'")


def load(path, *, model=None) -> TrainedModel:
  """A saved model (`TrainedModel.save`), ready to predict, evaluate, save or train more.

  Args:
    path: the directory `save` wrote.
    model: the flax module to load the weights into, instead of the saved architecture (required for
      models saved with architecture=False, e.g. a custom nn.Module); its variables must fit.

  Returns:
    A TrainedModel whose predictions are bitwise equal to the saved one's.

  Raises:
    CheckpointError: one line naming the file: no saved model at `path` (a foreign directory, a training
      workdir), a missing or garbled model.json, another format version, an architecture that cannot be
      rebuilt, variables missing, of other shapes than the architecture's, or damaged (digest).
  """
  import optax
  import orbax.checkpoint as ocp

  from jaxcnn.data.pipeline import check_preprocessing
  from jaxcnn.train.checkpoint import digest_tree
  from jaxcnn.train.config import validate_config
  from jaxcnn.train.state import TrainState, init_variables, zero_metric_sums

  path = pathlib.Path(path).expanduser().absolute()
  file = path / MODEL_JSON
  document = _read_document(path)
  module = _build_module(document, file, model)
  try:
    preprocessing = check_preprocessing(document["preprocessing"]) if document["preprocessing"] is not None else None
    config = validate_config(document["config"])
    shape = tuple(int(d) for d in document["input"]["shape"])
    raw_dtype = np.dtype(document["input"]["dtype"])
    model_dtype = np.dtype(document["model_input_dtype"])
    training = document["training"]
    step, epoch = int(training["step"]), int(training["epoch"])
    rng = np.asarray(training["rng"], np.uint32)
  except (ValueError, TypeError, KeyError) as err:
    raise CheckpointError(f"{file}: {_first_line(err)}") from None

  # The variables' shapes must fit the architecture: compared before anything is read.
  try:
    expected = jax.eval_shape(lambda: init_variables(module, shape, 0, model_dtype))
  except (ValueError, TypeError) as err:
    raise CheckpointError(f"{file}: the architecture cannot take its inputs {shape}: {_first_line(err)}") from None
  expected = {k: v for k, v in expected.items() if k in ("params", "batch_stats")}
  variables_dir = path / VARIABLES_DIR
  if not variables_dir.is_dir():
    raise CheckpointError(f"{variables_dir}: missing (the saved model's weights)")
  want = _shapes(expected)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(variables_dir)
      tree = getattr(metadata, "item_metadata", metadata)
      tree = getattr(tree, "tree", tree)
      have = {k: tuple(v.shape) for k, v in _flat_metadata(tree).items()}
      if not have:
        raise CheckpointError(f"{variables_dir}: cannot read the saved variables (damaged, or not an Orbax "
                              "checkpoint)")
      if have != want:
        raise CheckpointError(f"{variables_dir}: the saved variables do not fit the architecture: "
                              f"{_shape_difference(have, want)}")
      device = jax.local_devices()[0]
      sharding = jax.sharding.SingleDeviceSharding(device)
      target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), expected)
      variables = checkpointer.restore(variables_dir, target)
  except CheckpointError:
    raise
  except Exception as err:  # Orbax and tensorstore raise many types for unreadable files
    raise CheckpointError(f"{variables_dir}: cannot read the saved variables: {_first_line(err)}") from None
  if digest_tree(variables) != document["variables"].get("sha256"):
    raise CheckpointError(f"{variables_dir}: content differs from the digest in {MODEL_JSON} (damaged files)")
  state = TrainState(step=jnp.asarray(step, jnp.int32), params=variables["params"],
                     batch_stats=variables.get("batch_stats", {}), opt_state=(), rng=jnp.asarray(rng),
                     epoch=jnp.asarray(epoch, jnp.int32), epoch_step=jnp.zeros((), jnp.int32),
                     metric_sums=zero_metric_sums(), tx=optax.identity())
  try:
    return TrainedModel(module, state, preprocessing=preprocessing, config=config,
                        class_names=document["class_names"], input_shape=shape, input_dtype=raw_dtype.name)
  except ConfigError as err:  # the saved loss does not fit the module (e.g. one passed as model=)
    raise CheckpointError(f"{file}: {_first_line(err)}") from None


def _flat_metadata(tree) -> dict:
  out = {}

  def walk(node, prefix):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(v, f"{prefix}/{k}" if prefix else str(k))
    elif node is not None and hasattr(node, "shape"):
      out[prefix] = node
  walk(tree, "")
  return out


def _shape_difference(have: dict, want: dict, limit: int = 3) -> str:
  parts = []
  for key in sorted(set(have) | set(want)):
    if key not in want:
      parts.append(f"{key} {have[key]} is not in the architecture")
    elif key not in have:
      parts.append(f"{key} {want[key]} is missing")
    elif have[key] != want[key]:
      parts.append(f"{key} is {have[key]}, the architecture's is {want[key]}")
  more = f" (and {len(parts) - limit} more)" if len(parts) > limit else ""
  return "; ".join(parts[:limit]) + more
