"""MNIST digits with a batch-norm CNN: `python -m experiments.mnist`.

  python -m experiments.mnist [--workdir=runs/mnist/NAME] [--config.model=mnist_convnet --config.train.epochs=1]

Reaches >= 99.3% test accuracy in about a minute on a 2-core CPU (benchmarks/README.md has the measured
runs and the command that times them): `mnist_fast_cnn` (jaxcnn.models), 3 epochs over 57,000 images
(the last 5% of the training file held out for validation, as Keras' validation_split does), batch 128,
Adam with a warmup-cosine schedule peaking at 3e-3, featurewise-standardised pixels.

Runs offline on a fresh machine: the MNIST IDX files ship in experiments/data/mnist/ and are resolved by
the data layer as a raw-files directory (`--config.data.data_dir=` empty uses $JAXCNN_DATA_DIR, the
system dataset folders, then the tfds catalog). The workdir receives checkpoints/, history.json,
metrics.csv, tb/ (TensorBoard events), summary.json and the figures history.png, confusion_matrix.png,
filters.png and feature_maps.png, and model/ (the trained model: `jaxcnn.train.load(workdir / "model")`
predicts on raw uint8 images; README.md shows it on a PNG). Re-running with the same workdir resumes from the latest checkpoint;
a finished run is restored and re-evaluated instead of retrained. Several processes running this
command form one job (README.md, "Multi-process").

The pieces, in the order data flows: `load_data` (resolve -> host arrays) -> `build_model` (registry)
-> `jaxcnn.train.fit(model, (images, labels), config=config.train)` (validation split, preprocessing,
chunked training, checkpoints) -> test predictions with the run's preprocessing -> figures ->
summary.json.
"""
from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any

import ml_collections

from experiments import _common, _runner
from jaxcnn.errors import ConfigError
from jaxcnn.train import default_config


def get_config() -> ml_collections.ConfigDict:
  """The default MNIST run (every hyperparameter, seed and size lives here)."""
  c = ml_collections.ConfigDict()
  c.data = ml_collections.ConfigDict(dict(
      dataset="mnist",
      data_dir=str(_runner.SHIPPED_DATA),  # raw IDX files; "" searches $JAXCNN_DATA_DIR, system dirs, tfds
      tfds_data_dir="",                    # where the data layer prepares its tfds copy; "" = tfds' default
      download=True,                       # allow a tfds catalog download when nothing local resolves
      train_examples=0,                    # 0: the whole training file; n: its first n (smoke runs)
      test_examples=0,                     # 0: every test example; n: the first n
  ))
  c.model = "mnist_fast_cnn"               # any registered model, e.g. mnist_bn_cnn or mnist_convnet
  # jaxcnn.train.fit's config, passed unchanged
  c.train = default_config(
      epochs=3, batch_size=128, validation_batch_size=1000,
      validation_split=0.05,               # the last 3,000 training images, for the validation curves
      normalize="featurewise",             # per-channel mean/std of the training portion
      optimizer="adam", learning_rate=3e-3, schedule="warmup_cosine",
      warmup_steps=130,                    # ~10% of the run's 3 x 445 steps
      log_every=100,                       # steps per compiled chunk (one lax.scan) and per progress line
      progress="log", keep_checkpoints=2)
  # evaluation and figures
  c.eval_batch_size = 1000                 # test images per predict call
  c.feature_map_index = 0                  # the test image whose feature maps are drawn
  return c


# -- config ------------------------------------------------------------------------------------------

def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming every bad value (the recipe's, then fit's own check of config.train)."""
  from jaxcnn import models
  from jaxcnn.train import validate_config

  problems = []

  def check(ok: bool, key: str, value, expected: str):
    if not ok:
      problems.append(f"{key}={value!r} ({expected})")

  def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)

  data = config.data
  check(isinstance(data.dataset, str) and bool(data.dataset.strip()), "data.dataset", data.dataset,
        "expected a dataset name")
  check(isinstance(data.data_dir, str), "data.data_dir", data.data_dir, "expected a directory path or ''")
  check(isinstance(data.tfds_data_dir, str), "data.tfds_data_dir", data.tfds_data_dir,
        "expected a directory path or ''")
  for key in ("train_examples", "test_examples"):
    check(is_int(data[key]) and data[key] >= 0, f"data.{key}", data[key], "expected an integer >= 0 (0: all)")
  check(config.model in models.names(), "model", config.model,
        f"expected a registered model: {', '.join(models.names())}")
  check(is_int(config.eval_batch_size) and config.eval_batch_size >= 1, "eval_batch_size", config.eval_batch_size,
        "expected an integer >= 1")
  check(is_int(config.feature_map_index) and config.feature_map_index >= 0, "feature_map_index",
        config.feature_map_index, "expected an integer >= 0")
  split = config.train.validation_split
  check(isinstance(split, float) and 0.0 < split < 1.0, "train.validation_split", split,
        "this experiment draws validation curves: expected a fraction in (0, 1)")
  if problems:
    raise ConfigError("config: bad values: " + "; ".join(problems))
  if models.spec(config.model).task != "classification":
    raise ConfigError(f"config: model={config.model!r} is a {models.spec(config.model).task} model; this "
                      "experiment trains classifiers")
  validate_config(config.train)


# -- data ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Data:
  """The run's arrays and where they came from.

  Attributes:
    train: (uint8 images (N, 28, 28, 1), int32 labels (N,)) of the training file (fit holds out its
      validation slice).
    test: the same for the test file.
    class_names: names of the classes.
    source: how the data layer resolved the dataset, e.g. "raw experiments/data/mnist".
  """

  train: tuple
  test: tuple
  class_names: list[str]
  source: str


def load_data(config: ml_collections.ConfigDict) -> Data:
  """Resolves the dataset once and reads both splits as host arrays (the first n when asked).

  Raises:
    DataError: the dataset cannot be found or is damaged (nothing is written then).
  """
  from jaxcnn.data import resolve

  data = config.data
  resolved = _common.primary_first(lambda: resolve(data.dataset, data_dir=data.data_dir or None,
                                                   tfds_data_dir=data.tfds_data_dir or None, download=data.download))
  images, labels = resolved.read("train")
  test_images, test_labels = resolved.read("test")
  if data.train_examples:
    images, labels = images[:data.train_examples], labels[:data.train_examples]
  if data.test_examples:
    test_images, test_labels = test_images[:data.test_examples], test_labels[:data.test_examples]
  return Data((images, labels), (test_images, test_labels), list(resolved.class_names),
              f"{resolved.source} {resolved.path}")


# -- model ---------------------------------------------------------------------------------------------

def build_model(config: ml_collections.ConfigDict, input_shape, num_classes: int):
  """The registry model `config.model` for these inputs, and its summary table.

  Raises:
    ConfigError: the model cannot take the dataset's images (e.g. a CIFAR model on 28x28 digits).
  """
  from jaxcnn import models
  from jaxcnn.inspect import summary

  model = models.get(config.model, num_classes=num_classes)
  try:
    table = summary(model, tuple(input_shape), print_fn=None)
  except (ValueError, TypeError) as err:
    raise ConfigError(f"config: model={config.model!r} cannot take {tuple(input_shape)} images: "
                      f"{str(err).splitlines()[0]}") from None
  return model, table


# -- the run -----------------------------------------------------------------------------------------

def run_classifier(config: ml_collections.ConfigDict, workdir, *, experiment: str = "mnist",
                   benchmark: dict | None = None) -> dict[str, Any]:
  """Trains (or resumes, or re-evaluates) `config.model` on `config.data.dataset`; returns the summary.

  Args:
    config: a ConfigDict like `get_config()`'s.
    workdir: the run directory (created by fit, once the config, data and model are known to be good).
    experiment: the name the summary records.
    benchmark: {"name": str, "accuracy_range": (low, high)}: a published result the test accuracy is
      compared with (printed and saved in the summary's results), or None. Default None.

  Raises:
    ConfigError, DataError: bad settings or missing/damaged data (before anything is written).
    NonFiniteError: the loss became NaN/Inf.
  """
  started = time.perf_counter()
  workdir = pathlib.Path(workdir)
  check_config(config)
  data = load_data(config)
  data_seconds = time.perf_counter() - started
  test_count = len(data.test[0])
  if config.feature_map_index >= min(test_count, config.eval_batch_size):
    raise ConfigError(f"config: feature_map_index={config.feature_map_index} must index the first test batch "
                      f"(< {min(test_count, config.eval_batch_size)})")
  images = data.train[0]
  model, table = build_model(config, images.shape[1:], len(data.class_names))
  title = f"{config.data.dataset} / {config.model}"
  train = config.train
  print(f"{title}: {train.epochs} epoch(s), batch {train.batch_size}, {train.optimizer} "
        f"lr {train.learning_rate:g} ({train.schedule}), seed {train.seed}")
  print(f"data: {data.source}; {len(images)} training images ({train.validation_split:g} held out for "
        f"validation), {test_count} test images, {images.shape[1:]} ({data_seconds:.1f} s)")
  print(table.table())

  result, run, timing = _common.fit(model, data.train, config=train, workdir=workdir)
  if run["reevaluated"]:
    print(f"{workdir}: the run was already complete ({run['epochs']} epochs); restored and re-evaluated")
  result.save(workdir / "model")  # jaxcnn.train.load(workdir / "model") gives it back
  variables = _common.host_variables(result.state)
  evaluation = _common.predict(result, *data.test, batch_size=config.eval_batch_size)
  figures = []
  if _common.is_primary():
    figures = _common.save_classifier_figures(workdir, result.history, model, variables, evaluation,
                                              data.class_names, title=title,
                                              feature_map_index=config.feature_map_index)
  results = {"test_accuracy": evaluation["accuracy"], "test_loss": evaluation["loss"],
             "val_accuracy": result.history["val_accuracy"][-1], "val_loss": result.history["val_loss"][-1],
             "model": config.model, "parameters": table.total_params,
             "trainable_parameters": table.trainable_params}
  if benchmark is not None:
    low, high = benchmark["accuracy_range"]
    results["benchmark"] = {"name": benchmark["name"], "accuracy_range": [low, high],
                            "difference_to_low": evaluation["accuracy"] - low,
                            "difference_to_high": evaluation["accuracy"] - high}
  summary = _common.write_summary(
      workdir, experiment=experiment, config=config, results=results,
      data={"source": data.source, "train_examples": result.data["train_examples"],
            "validation_examples": result.data["validation_examples"], "test_examples": evaluation["count"]},
      run=run, timing={"data_seconds": data_seconds, **timing}, figures=figures, started=started)
  _print_report(summary, workdir)
  return summary


def main(config: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
  """`run_classifier` on MNIST (see the module docstring); returns the summary dict."""
  return run_classifier(config, workdir)


def _print_report(summary: dict, workdir: pathlib.Path) -> None:
  results, timing, run = summary["results"], summary["timing"], summary["run"]
  print(f"test accuracy: {100 * results['test_accuracy']:.2f}% (loss {results['test_loss']:.4f}) on "
        f"{summary['data']['test_examples']} test images; validation {100 * results['val_accuracy']:.2f}%")
  if "benchmark" in results:
    bench = results["benchmark"]
    low, high = bench["accuracy_range"]
    print(f"benchmark: {bench['name']} reaches {100 * low:.1f}-{100 * high:.1f}%; this run "
          f"{100 * results['test_accuracy']:.2f}% ({100 * bench['difference_to_low']:+.2f} / "
          f"{100 * bench['difference_to_high']:+.2f} points)")
  device = summary["device"]
  where = f"{device['device_count']} {device['device_kind']} device(s) in {device['process_count']} process(es)"
  if run["reevaluated"]:
    print(f"time: {timing['wall_seconds']:.1f} s to restore and re-evaluate on {where}")
    if timing.get("images_per_second") is not None:
      print(f"the training run took: fit {timing['train_seconds']:.1f} s of which compile "
            f"{timing['compile_seconds']:.1f} s, {timing['images_per_second']:.0f} images/s after compilation")
  else:
    print(f"time: {timing['wall_seconds']:.1f} s in main (data {timing['data_seconds']:.1f} s, fit "
          f"{timing['train_seconds']:.1f} s of which compile {timing['compile_seconds']:.1f} s, "
          f"{timing['images_per_second']:.0f} images/s after compilation) on {where}")
  if workdir.is_dir():
    files = sorted(p.name + ("/" if p.is_dir() else "") for p in workdir.iterdir()
                   if not p.name.endswith(".tmp") and not p.name.startswith("."))
    print(f"files in {workdir}: {', '.join(files)}")


if __name__ == "__main__":
  _runner.run(__name__, get_config, main)
