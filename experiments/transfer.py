"""Transfer learning: the textbook's four cases (small/large target data x similar/different domain).

    python -m experiments.transfer [--workdir=DIR] [--config.data.fashion_data_dir=DIR]

A CNN (`mnist_convnet`: conv2d -> conv2d_1 -> dense head) is pretrained on the MNIST digits 0-4 (the
source task), then transferred, with a new randomly initialised head, to two targets:

  similar    MNIST digits 5-9 (labels 0-4): the same kind of images, new classes;
  different  Fashion-MNIST (10 classes of clothing): same size, a different domain.

each with a small training set (`small_examples`, default 1,000) and a large one (`large_examples`,
default 12,000). The textbook's rule for each case becomes a freezing configuration, realised by the
training engine's optimizer path mask (`freeze` regexes over parameter paths, `optax.set_to_zero`):

  small + similar     freeze everything but the new head (the network is a fixed feature extractor)
  large + similar     fine-tune everything (enough data not to overfit; start from the source weights)
  small + different   freeze the early layers (`early_layers`: conv2d, generic edges and strokes), train
                      the later, more task-specific ones and the head
  large + different   fine-tune everything

Every case is compared with the same network trained from scratch on the same target data
(`baselines`). Data: MNIST ships with the repo; Fashion-MNIST comes from `--config.data.fashion_data_dir=`,
else $JAXCNN_DATA_DIR, else /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist),
else a prepared or downloaded tfds copy; without it the "different" cases stop with exit code 2.

Transferred weights beat training from scratch in every case (benchmarks/README.md, "Experiments",
has the measured table), and frozen layers end bit-identical to the pretrained ones (summary.json:
frozen_max_change 0.0).

Outputs in the workdir: summary.json (per case: test accuracy, scratch accuracy, frozen parameters and
the proof that they did not move), pretrain/ and <case>/ run directories (history.json, checkpoints),
transfer.png (bar chart of the four cases vs scratch). Re-running with the same workdir resumes every
run from its checkpoints.
"""
from __future__ import annotations

import pathlib
import time

import ml_collections
import numpy as np

from experiments import _common, _runner
from jaxcnn.train import default_config

# (case name, target domain, data size, what is trained)
CASES = {
    "small_similar": ("similar", "small", "head"),
    "large_similar": ("similar", "large", "all"),
    "small_different": ("different", "small", "late"),
    "large_different": ("different", "large", "all"),
}
_TRAINED = {"head": "new head only (all pretrained layers frozen)",
            "late": "early layers frozen, later layers and the new head trained",
            "all": "everything fine-tuned from the pretrained weights"}
_SOURCE_CLASSES = (0, 1, 2, 3, 4)


def get_config() -> ml_collections.ConfigDict:
  """The defaults of the run; every key can be overridden with --config.<key>=<value>."""
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(
      mnist_data_dir="",        # raw MNIST IDX dir; "" = the files shipped in experiments/data
      fashion_data_dir="",      # raw Fashion-MNIST IDX dir; "" = $JAXCNN_DATA_DIR, system dirs, tfds
      download=True,            # allow a tfds catalog download of Fashion-MNIST when nothing is local
      pretrain_examples=0,      # source (MNIST 0-4) training images, 0 = all (~30,600)
      small_examples=1000,
      large_examples=12000,
      test_examples=0,          # first N source and target test images (0 = all)
  ))
  config.model = "mnist_convnet"
  config.cases = ",".join(CASES)    # comma-separated subset of the four cases
  config.head_layer = "dense"       # the layer replaced by a new, randomly initialised head
  config.early_layers = "conv2d"    # comma-separated layers frozen in the "late" (small + different) case
  config.pretrain_epochs = 2        # each run's config.train.epochs
  config.small_epochs = 10          # equal-ish step counts: the small set is seen more often
  config.large_epochs = 2
  config.baselines = True           # also train each case from scratch, for comparison
  # jaxcnn.train.fit's config of every run; the recipe sets each run's `epochs` (above) and each case's
  # `freeze` (its rule), so those two keys stay at their defaults here. x/255 for every domain: the
  # pretrained filters see target images on the scale they were trained on.
  config.train = default_config(batch_size=64, optimizer="adam", learning_rate=1e-3, normalize="scale",
                                log_every=100)
  return config


def check_config(config) -> None:
  """ConfigError for the keys the recipe sets itself, given anyway (they would be silently replaced)."""
  from jaxcnn.errors import ConfigError
  from jaxcnn.train import DEFAULTS, validate_config
  fit_config = validate_config(config.train)
  for key, instead in (("epochs", "pretrain_epochs, small_epochs, large_epochs"), ("freeze", "cases")):
    if fit_config[key] != DEFAULTS[key]:
      raise ConfigError(f"config: train.{key}={fit_config[key]!r}: this experiment sets each run's {key} "
                        f"(use {instead})")


# -- data ---------------------------------------------------------------------------------------------

def _read(name: str, data_dir, download: bool, hint: str):
  from jaxcnn import data
  from jaxcnn.errors import DataError
  try:
    resolved = _common.primary_first(lambda: data.resolve(name, data_dir=data_dir, download=download))
    return resolved.read("train"), resolved.read("test"), list(resolved.class_names)
  except DataError as err:
    raise DataError(f"{err}; {hint}") from None


def _take(images, labels, count: int, what: str):
  from jaxcnn.errors import ConfigError
  if count:
    if count > len(images):
      raise ConfigError(f"config: {what}={count} exceeds the {len(images)} images available")
    images, labels = images[:count], labels[:count]
  return images, labels


def load_tasks(config: ml_collections.ConfigDict, domains) -> dict:
  """{"source": ..., "similar": ..., "different": ...} (only the domains asked for besides the source):
  each {"train": (images, labels), "test": (images, labels), "class_names": [...]} as uint8 / int32 arrays.

  Source = MNIST train/test digits 0-4; similar = MNIST digits 5-9 relabelled 0-4; different =
  Fashion-MNIST. Raises DataError (with where to put the files) when a dataset is missing.
  """
  (train_x, train_y), (test_x, test_y), names = _read(
      "mnist", config.data.mnist_data_dir or _runner.SHIPPED_DATA, False,
      "for experiments.transfer pass --config.data.mnist_data_dir=DIR with the four MNIST IDX files")
  source_train = np.isin(train_y, _SOURCE_CLASSES)
  source_test = np.isin(test_y, _SOURCE_CLASSES)
  tasks = {"source": {"train": (train_x[source_train], train_y[source_train]),
                      "test": (test_x[source_test], test_y[source_test]),
                      "class_names": [names[c] for c in _SOURCE_CLASSES]}}
  if "similar" in domains:
    shift = len(_SOURCE_CLASSES)
    tasks["similar"] = {"train": (train_x[~source_train], train_y[~source_train] - shift),
                        "test": (test_x[~source_test], test_y[~source_test] - shift),
                        "class_names": [n for i, n in enumerate(names) if i not in _SOURCE_CLASSES]}
  if "different" in domains:
    train, test, fashion_names = _read(
        "fashion_mnist", config.data.fashion_data_dir or None, config.data.download,
        "for experiments.transfer pass --config.data.fashion_data_dir=DIR holding train-images-idx3-ubyte.gz, "
        "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz of Fashion-MNIST "
        "(or install Debian's dataset-fashion-mnist), or run only the similar cases with "
        "--config.cases=small_similar,large_similar")
    tasks["different"] = {"train": train, "test": test, "class_names": fashion_names}
  return tasks


# -- model and freezing -------------------------------------------------------------------------------

def freeze_patterns(params, trained: str, head_layer: str, early_layers) -> tuple[str, ...]:
  """The engine's `freeze` regexes (over '/'-joined parameter paths) for a case.

  Args:
    params: the target model's params (top-level keys are the layer names).
    trained: "head" (freeze every layer but `head_layer`), "late" (freeze `early_layers`) or "all" (none).
    head_layer: the new head's layer name.
    early_layers: the layer names frozen in the "late" case.
  """
  from jaxcnn.errors import ConfigError
  layers = list(params)
  unknown = [layer for layer in (head_layer, *early_layers) if layer not in layers]
  if unknown:
    raise ConfigError(f"config: layers {unknown} are not layers of the model (its layers: {', '.join(layers)})")
  if head_layer in early_layers:
    raise ConfigError(f"config: early_layers must not include the head layer {head_layer!r}")
  if trained == "head":
    frozen = [layer for layer in layers if layer != head_layer]
  elif trained == "late":
    frozen = list(early_layers)
  elif trained == "all":
    frozen = []
  else:
    raise ValueError(f"trained: expected 'head', 'late' or 'all', got {trained!r}")
  return tuple(f"{layer}/.*" for layer in frozen)


def transplant(pretrained: dict, fresh: dict, head_layer: str) -> dict:
  """`fresh` params with every layer but `head_layer` replaced by the pretrained one (shapes must agree)."""
  from jaxcnn.errors import ConfigError
  import jax
  merged = dict(fresh)
  for layer, value in pretrained.items():
    if layer == head_layer:
      continue
    if layer not in fresh:
      raise ConfigError(f"transplant: pretrained layer {layer!r} is not in the target model")
    shapes = jax.tree.map(np.shape, value), jax.tree.map(np.shape, fresh[layer])
    if shapes[0] != shapes[1]:
      raise ConfigError(f"transplant: layer {layer!r} has shapes {shapes[0]} pretrained vs {shapes[1]} in "
                        "the target model")
    merged[layer] = value
  return merged


def _max_change(before: dict, after: dict, layers) -> float:
  import jax
  changes = [float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
             for layer in layers
             for a, b in zip(jax.tree.leaves(after[layer]), jax.tree.leaves(before[layer]))]
  return max(changes) if changes else 0.0


# -- runs ---------------------------------------------------------------------------------------------

def _arrays(task: dict, count: int, test_count: int, what: str):
  """((train images, labels), (test images, labels)) of a task, the first `count` / `test_count` (0: all)."""
  return _take(*task["train"], count, what), _take(*task["test"], test_count, "data.test_examples")


def _fit(model, train, test, config, epochs: int, workdir, freeze=(), initial_params=None):
  """fit with config.train, this run's epochs and freeze; `initial_params` (pretrained) replace the fresh
  ones (fit keeps them and starts the config's optimizer). Returns (result, test accuracy)."""
  from jaxcnn import train as train_lib
  fit_config = {**config.train.to_dict(), "epochs": epochs, "freeze": tuple(freeze)}
  initial_state = None
  if initial_params is not None:
    state = train_lib.create_train_state(model, train[0].shape[1:], fit_config)
    initial_state = state.replace(params=initial_params)
  result = train_lib.fit(model, train, config=fit_config, workdir=workdir, val_data=test,
                         initial_state=initial_state)
  accuracy = train_lib.evaluate(_common.host_variables(result.state), model, test,
                                preprocessing=result.preprocessing)["accuracy"]
  return result, accuracy


def plot_cases(path, cases: dict, *, title: str) -> None:
  """Grouped bars: test accuracy of each case, transferred vs trained from scratch."""
  from matplotlib.figure import Figure

  from jaxcnn.inspect import save_figure
  names = list(cases)
  x = np.arange(len(names))
  fig = Figure(figsize=(9, 4.8), layout="tight")
  ax = fig.subplots()
  width = 0.38
  transfer = [cases[n]["test_accuracy"] for n in names]
  bars = ax.bar(x - width / 2, transfer, width, label="transferred from MNIST 0-4")
  ax.bar_label(bars, fmt="%.3f", fontsize=9)
  if all(cases[n].get("scratch_accuracy") is not None for n in names):
    bars = ax.bar(x + width / 2, [cases[n]["scratch_accuracy"] for n in names], width, label="from scratch")
    ax.bar_label(bars, fmt="%.3f", fontsize=9)
  short = {"head": "head only", "late": "early frozen", "all": "fine-tune all"}
  labels = [f"{n.replace('_', ' + ')}\n{cases[n]['train_examples']} images, {short[cases[n]['trained']]}"
            for n in names]
  ax.set_xticks(x, labels, fontsize=9)
  ax.set_xlabel("case (target data size + similarity to the source; what is trained)")
  ax.set_ylabel("target test accuracy")
  ax.set_ylim(0, 1.2)
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  ax.legend(loc="upper center", ncols=2)
  save_figure(fig, path)


def main(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """Pretrains on the source, runs each requested case (and its scratch baseline); returns the summary."""
  import jax
  import jax.numpy as jnp

  from jaxcnn import models
  from jaxcnn.errors import ConfigError
  started = time.perf_counter()
  workdir = pathlib.Path(workdir)
  cases = [c.strip() for c in str(config.cases).split(",") if c.strip()]
  unknown = [c for c in cases if c not in CASES]
  if unknown or not cases:
    raise ConfigError(f"config: cases={config.cases!r}: expected a comma-separated subset of {', '.join(CASES)}")
  check_config(config)
  early_layers = tuple(layer.strip() for layer in str(config.early_layers).split(",") if layer.strip())
  tasks = load_tasks(config, {CASES[c][0] for c in cases})
  for name in cases:  # sizes are checked before anything is trained
    domain, size, _ = CASES[name]
    _take(*tasks[domain]["train"], config.data[f"{size}_examples"], f"data.{size}_examples")

  # source: pretrain on MNIST digits 0-4
  source_train, source_test = _arrays(tasks["source"], config.data.pretrain_examples, config.data.test_examples,
                                      "data.pretrain_examples")
  source_model = models.get(config.model, num_classes=len(tasks["source"]["class_names"]))
  print(f"pretraining {config.model} on MNIST digits 0-4 ({len(source_train[0])} images)")
  pretrained, source_accuracy = _fit(source_model, source_train, source_test, config, config.pretrain_epochs,
                                     workdir / "pretrain")
  pretrained_params = _common.host_variables(pretrained.state)["params"]
  if config.head_layer not in pretrained_params:
    raise ConfigError(f"config: head_layer={config.head_layer!r} is not a layer of {config.model} (its layers: "
                      f"{', '.join(pretrained_params)})")

  # targets: one run per case, plus its scratch baseline
  results = {}
  for name in cases:
    domain, size, trained = CASES[name]
    count = config.data.small_examples if size == "small" else config.data.large_examples
    epochs = config.small_epochs if size == "small" else config.large_epochs
    train_arrays, test_arrays = _arrays(tasks[domain], count, config.data.test_examples, f"data.{size}_examples")
    model = models.get(config.model, num_classes=len(tasks[domain]["class_names"]))
    fresh = model.init(jax.random.key(config.train.seed), jnp.zeros((1, *train_arrays[0].shape[1:])))["params"]
    source_like = jax.device_get(transplant(pretrained_params, fresh, config.head_layer))
    freeze = freeze_patterns(source_like, trained, config.head_layer, early_layers)
    print(f"{name}: {len(train_arrays[0])} {domain} images, {epochs} epochs, frozen: {', '.join(freeze) or 'nothing'}")
    result, accuracy = _fit(model, train_arrays, test_arrays, config, epochs, workdir / name, freeze=freeze,
                            initial_params=source_like)
    final_params = _common.host_variables(result.state)["params"]
    frozen_layers = [p.split("/")[0] for p in freeze]
    trained_layers = [layer for layer in source_like if layer not in frozen_layers]
    entry = {"domain": domain, "size": size, "trained": trained, "what": _TRAINED[trained],
             "frozen_layers": frozen_layers, "train_examples": int(len(train_arrays[0])),
             "test_examples": int(len(test_arrays[0])), "epochs": epochs, "test_accuracy": accuracy,
             # the proof that freezing held: frozen layers end exactly where the pretrained ones were
             "frozen_max_change": _max_change(source_like, final_params, frozen_layers),
             "trained_max_change": _max_change(source_like, final_params, trained_layers),
             "scratch_accuracy": None}
    if config.baselines:
      _, entry["scratch_accuracy"] = _fit(model, train_arrays, test_arrays, config, epochs,
                                          workdir / f"{name}_scratch")
    print(f"{name}: test accuracy {accuracy:.4f} (scratch "
          f"{'-' if entry['scratch_accuracy'] is None else format(entry['scratch_accuracy'], '.4f')})")
    results[name] = entry

  figures = []
  if _common.is_primary():
    plot_cases(workdir / "transfer.png", results,
               title=f"Transfer from MNIST 0-4 ({config.model}, source test accuracy {source_accuracy:.3f})")
    figures.append(workdir / "transfer.png")
  return _common.write_summary(
      workdir, experiment="transfer", config=config,
      results={"source_test_accuracy": source_accuracy, "cases": results},
      data={"source": "mnist (digits 0-4 -> 5-9), fashion_mnist", "train_examples": int(len(source_train[0])),
            "test_examples": int(len(source_test[0]))},
      figures=figures, started=started)


if __name__ == "__main__":
  _runner.run(__name__, get_config, main)
