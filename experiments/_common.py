"""What several experiments share: timed training, predictions, classifier figures and the run summary.

Every function takes explicit arguments (arrays, a model, variables, a preprocessing spec), never another
recipe's config. Every experiment writes ONE summary.json schema (`write_summary`, documented in
README.md, "summary.json"):

  schema       "jaxcnn.experiment-summary/1"
  experiment   the command's name ("mnist", "cifar10", ...)
  results      what the run measured (test accuracy/loss, PSNR, per-case accuracies, filter errors, ...)
  data         where the data came from and how much: source, train/validation/test examples
  run          epochs in the history, epochs trained by this invocation, the epoch it resumed after,
               whether it only re-evaluated a finished run
  timing       wall seconds (since main and since process start) and, for training runs, fit's seconds,
               compile seconds, images per second after compilation and the seconds of each epoch;
               compilation_cache: this process' persistent compilation cache (enabled, dir, hits, misses)
  device       device kind, platform, device and process counts, host, jax version
  figures      the PNG files written to the workdir
  config       the whole config
  finished_at  UTC time
"""
from __future__ import annotations

import json
import pathlib
import time
from typing import Any

import numpy as np

from experiments import _runner

SUMMARY_SCHEMA = "jaxcnn.experiment-summary/1"


def is_primary() -> bool:
  """Whether this is process 0 of the job (the one that writes reports, figures and summary.json)."""
  import jax
  return jax.process_index() == 0


def primary_first(fn):
  """fn() in process 0 first, then in the other processes of a job: a dataset directory the processes
  share is prepared once (tfds preparation is not safe to run concurrently). An error of process 0 is
  raised after the others have been released (they will meet the same missing or damaged files)."""
  import jax
  if jax.process_count() == 1:
    return fn()
  from jax.experimental import multihost_utils

  from jaxcnn.errors import JaxcnnError
  result, error = None, None
  if is_primary():
    try:
      result = fn()
    except JaxcnnError as err:
      error = err
  multihost_utils.sync_global_devices("jaxcnn: the data is prepared")
  if error is not None:
    raise error
  return result if is_primary() else fn()


def host_variables(state) -> dict:
  """{"params", "batch_stats"?} of a train state as host arrays (one replica, usable in any process)."""
  import jax

  from jaxcnn.train.parallel import fetch
  return jax.tree.map(fetch, state.variables())


# -- timing --------------------------------------------------------------------------------------------

class CompileTimer:
  """Wall time JAX spends tracing, lowering and compiling while active (a union of the intervals).

  Nested events (a jit traced inside another's trace) overlap in time, so the union counts them once.
  """

  _EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
             "/jax/core/compile/backend_compile_duration")

  def __init__(self):
    self.intervals: list[tuple[float, float]] = []

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    if event in self._EVENTS:
      end = time.perf_counter()
      self.intervals.append((end - duration, end))

  def __enter__(self):
    import jax.monitoring
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self

  def __exit__(self, *exc):
    import jax.monitoring
    jax.monitoring.unregister_event_duration_listener(self._listen)

  @property
  def seconds(self) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(self.intervals):
      if end > reach:
        total += end - max(start, reach)
        reach = end
    return total


def _epoch_timer():
  """A fit callback recording each epoch's seconds (fit's progress prints the epoch's line)."""
  from jaxcnn.train import Callback

  class EpochTimer(Callback):
    def __init__(self):
      self.last = time.perf_counter()
      self.seconds: list[float] = []

    def on_epoch_end(self, epoch, logs, state):
      now = time.perf_counter()
      self.seconds.append(now - self.last)
      self.last = now

  return EpochTimer()


def _epochs_done(workdir: pathlib.Path) -> int:
  try:
    return len(json.loads((pathlib.Path(workdir) / "history.json").read_text()).get("epoch", []))
  except (OSError, ValueError):
    return 0


def previous_summary(workdir) -> dict:
  """The workdir's summary.json, or {} when there is none (or it is unreadable)."""
  try:
    return json.loads((pathlib.Path(workdir) / "summary.json").read_text())
  except (OSError, ValueError):
    return {}


def fit(model, train_data, *, config, workdir, val_data=None, initial_state=None):
  """`jaxcnn.train.fit`, timed; returns (result, run, timing) for the summary.

  run: {"epochs", "trained_epochs_this_run", "resumed_from_epoch", "reevaluated"}. timing:
  {"train_seconds", "compile_seconds", "images_per_second", "epoch_seconds"}; images per second count
  the training images over fit's wall time minus JAX's tracing and compilation (validation passes and
  checkpoint writes stay in: what a user waits for, per image). A run that trained nothing now (a
  finished workdir, re-evaluated) keeps the timing measured when it did train.
  """
  from jaxcnn import train

  done_before = _epochs_done(workdir)
  reporter = _epoch_timer()
  started = time.perf_counter()
  with CompileTimer() as compile_timer:
    result = train.fit(model, train_data, config=config, workdir=workdir, val_data=val_data,
                       callbacks=[reporter], initial_state=initial_state)
  seconds = time.perf_counter() - started
  run = {"epochs": len(result.history.get("epoch", [])), "trained_epochs_this_run": len(reporter.seconds),
         "resumed_from_epoch": done_before, "reevaluated": result.trained_steps == 0}
  if result.trained_steps:
    images = result.trained_steps * result.data["batch_size"]
    timing = {"train_seconds": seconds, "compile_seconds": compile_timer.seconds,
              "images_per_second": images / max(seconds - compile_timer.seconds, 1e-9),
              "epoch_seconds": reporter.seconds}
  else:
    before = previous_summary(workdir).get("timing", {})
    timing = {k: before.get(k) for k in ("train_seconds", "compile_seconds", "images_per_second", "epoch_seconds")}
  return result, run, timing


# -- predictions ---------------------------------------------------------------------------------------

def predict(trained, inputs, targets, *, batch_size: int) -> dict[str, Any]:
  """A classifier's test predictions and metrics: one pass of `trained.predict` (the run's
  preprocessing applied, the last batch padded, one compiled program), scored by the run's loss.

  Args:
    trained: a jaxcnn.train.TrainedModel (what fit returns).
    inputs: raw inputs as given to fit (e.g. uint8 images (N, H, W, C)).
    targets: int class ids (N,).
    batch_size: examples per compiled call.

  Returns:
    {"loss": mean of the run's loss, "accuracy", "labels" int (N,), "predictions" int (N,),
     "first_batch": the first batch's prepared inputs, "count": N}.
  """
  import jax

  from jaxcnn.train import get_loss

  inputs, targets = np.asarray(inputs), np.asarray(targets, np.int32)
  outputs = trained.predict(inputs, batch_size=batch_size)
  # jitted: one program, where the loss run op by op would compile one per operation
  losses = np.asarray(jax.jit(get_loss(trained.loss, from_logits=trained.from_logits))(outputs, targets),
                      np.float64)
  predictions = outputs.argmax(axis=-1)
  first = inputs[:batch_size]
  if trained.preprocessing is not None:
    first = np.asarray(trained.preprocess(first))
  return {"loss": float(losses.mean()), "accuracy": float(np.mean(predictions == targets)), "labels": targets,
          "predictions": predictions.astype(np.int64), "first_batch": first, "count": int(len(inputs))}


def predict_pipeline(model, variables, pipeline) -> dict[str, Any]:
  """`predict`'s result over every example of an unshuffled pipeline (its own preprocessing applied)."""
  import jax
  import jax.numpy as jnp

  from jaxcnn.train import get_loss

  loss_fn = get_loss("softmax_cross_entropy")

  @jax.jit
  def run(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    return jnp.argmax(logits, axis=-1), loss_fn(logits, batch["label"])

  labels, predictions, losses, first = [], [], [], None
  for batch in pipeline.batches(0):
    predicted, loss = run(variables, batch)
    keep = np.asarray(batch["mask"]) > 0
    labels.append(np.asarray(batch["label"])[keep])
    predictions.append(np.asarray(predicted)[keep])
    losses.append(np.asarray(loss, np.float64)[keep])
    if first is None:
      first = np.asarray(batch["image"])
  labels, predictions, losses = map(np.concatenate, (labels, predictions, losses))
  return {"loss": float(losses.mean()), "accuracy": float(np.mean(labels == predictions)), "labels": labels,
          "predictions": predictions.astype(np.int64), "first_batch": first, "count": int(labels.size)}


# -- figures -------------------------------------------------------------------------------------------

def first_conv_kernel(params) -> np.ndarray | None:
  """The HWIO kernel of the first 2-D convolution in parameter order (Keras names sort by position)."""
  for name in sorted(params, key=layer_order):
    leaf = params[name]
    if isinstance(leaf, dict) and "kernel" in leaf and np.ndim(leaf["kernel"]) == 4:
      return np.asarray(leaf["kernel"])
  return None


def layer_order(name: str):
  """Keras-style names in creation order: conv2d < conv2d_1 < conv2d_2 < ... < conv2d_10."""
  base, _, index = name.rpartition("_")
  return (base, int(index)) if index.isdigit() and base else (name, -1)


def save_classifier_figures(workdir: pathlib.Path, history: dict, model, variables, evaluation: dict,
                            class_names, *, title: str, feature_map_index: int = 0) -> list[pathlib.Path]:
  """history.png, confusion_matrix.png and, for models with a 2-D convolution, filters.png and
  feature_maps.png (each convolution's output for test input `feature_map_index`) in `workdir`."""
  from jaxcnn.inspect import (confusion_matrix, feature_maps, plot_confusion_matrix, plot_feature_maps,
                              plot_filters, plot_history)

  workdir = pathlib.Path(workdir)
  paths = [plot_history(history, workdir / "history.png", title=f"{title}: training history")]
  cm = confusion_matrix(evaluation["labels"], evaluation["predictions"], len(class_names))
  paths.append(plot_confusion_matrix(cm, class_names, workdir / "confusion_matrix.png",
                                     title=f"{title}: test confusion matrix"))
  kernel = first_conv_kernel(variables["params"])
  if kernel is None:
    print(f"{title}: the model has no 2-D convolution: filters.png and feature_maps.png are not drawn")
    return paths
  paths.append(plot_filters(kernel, workdir / "filters.png", title=f"{title}: first-layer filters"))
  index = feature_map_index
  image = evaluation["first_batch"][index:index + 1]
  maps = feature_maps(model, variables, image)
  label = class_names[int(evaluation["labels"][index])]
  predicted = class_names[int(evaluation["predictions"][index])]
  paths.append(plot_feature_maps({k: np.asarray(v) for k, v in maps.items()}, workdir / "feature_maps.png",
                                 image=image, title=f"{title}: convolution outputs for test image {index} "
                                 f"(label {label}, predicted {predicted})"))
  return paths


# -- the summary ---------------------------------------------------------------------------------------

def write_summary(workdir, *, experiment: str, config, results: dict, data: dict | None = None,
                  run: dict | None = None, timing: dict | None = None, figures=(),
                  started: float | None = None) -> dict:
  """The run's summary (the schema in this module's docstring), written to workdir/summary.json by
  process 0 only; returns it.

  Args:
    workdir: the run directory.
    experiment: the command's name.
    config: its ConfigDict.
    results: what the run measured.
    data: {"source", "train_examples", "validation_examples", "test_examples"} (missing ones are None).
    run: see `fit` (None for commands that train nothing).
    timing: see `fit`; wall times are added here.
    figures: the figures written (paths or names).
    started: `time.perf_counter()` at the start of main, for timing.wall_seconds.
  """
  data = {k: (data or {}).get(k) for k in ("source", "train_examples", "validation_examples", "test_examples")}
  timing = dict(timing or {})
  if started is not None:
    timing["wall_seconds"] = time.perf_counter() - started
  timing["wall_seconds_since_process_start"] = time.time() - _runner.PROCESS_START
  timing["compilation_cache"] = _runner.compilation_cache_info()
  summary = {"schema": SUMMARY_SCHEMA, "experiment": experiment, "results": results, "data": data,
             "run": dict(run or {}), "timing": timing, "device": _runner.device_info(),
             "figures": [pathlib.Path(f).name for f in figures], "config": config.to_dict(),
             "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
  if is_primary():
    _runner.write_json(pathlib.Path(workdir) / "summary.json", summary)
  return summary
