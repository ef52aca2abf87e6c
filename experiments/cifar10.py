"""The textbook CIFAR-10 CNN with the textbook augmentation.

    python -m experiments.cifar10 --config.data.data_dir=DIR [--workdir=DIR] [--config.train.epochs=50]

Model (`jaxcnn.models.cifar10_cnn`): Conv32-Conv32-MaxPool-Dropout(0.25), Conv64-Conv64-MaxPool-
Dropout(0.25), Flatten-Dense512-Dropout(0.5)-Dense10, 3x3 "same" ReLU convolutions. Augmentation as
Keras' ImageDataGenerator in the textbook: featurewise centring and std normalisation (statistics of the
training images), random shifts of up to 0.1 of the width and height, random horizontal flips; RMSprop
at 1e-4, batch 32, the test split as validation data.

Data (CIFAR-10 does not ship with the repo): `--config.data.data_dir=DIR` pointing at the binary version
(`cifar-10-batches-bin/` with data_batch_1.bin ... data_batch_5.bin and test_batch.bin, from
https://www.cs.toronto.edu/~kriz/cifar.html), or a tfds-prepared `cifar10` in
`--config.data.tfds_data_dir` (or $JAXCNN_TFDS_DIR), or a tfds download (needs internet;
`--config.data.download=False` forbids it).
Without any of them the run stops with exit code 2 and says where it looked and what to put where.

Result: not measured in this repository (no CIFAR-10 copy is available offline here). The Keras
example this recipe comes from states 75% test accuracy after 25 epochs and 79% after 50. Cost: about
26.5M multiply-adds per image forward (~4e12 per training epoch with the backward pass), minutes per
epoch on a CPU: use an accelerator for the full recipe, or `--config.data.train_examples=` for a quick look.

Outputs in the workdir: summary.json (config, device, results), history.json, history.png (loss and
accuracy per epoch), confusion_matrix.png, filters.png, feature_maps.png, checkpoints/ (a re-run with
the same workdir resumes).
"""
from __future__ import annotations

import pathlib
import time

import ml_collections

from experiments import _common, _runner
from jaxcnn.train import default_config


def get_config() -> ml_collections.ConfigDict:
  """The defaults of the run; every key can be overridden with --config.<key>=<value>."""
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(
      data_dir="",            # raw CIFAR-10 binary dir (or its parent); "" = $JAXCNN_DATA_DIR / none
      tfds_data_dir="",       # where tfds datasets are prepared; "" = $JAXCNN_TFDS_DIR or tfds' default
      download=True,          # allow the tfds catalog download when nothing local is found
      train_examples=0,       # first N training images (0 = all 50,000)
      test_examples=0,        # first N test images (0 = all 10,000)
  ))
  config.model = "cifar10_cnn"
  config.model_kwargs = ml_collections.ConfigDict(dict(conv_dropout=0.25, dense_dropout=0.5))
  # jaxcnn.train.fit's config, passed unchanged: ImageDataGenerator's featurewise centre/std, 0.1 shifts,
  # horizontal flips; RMSprop 1e-4, batch 32; the test split as validation data (as the textbook does)
  config.train = default_config(
      epochs=50, batch_size=32, validation_batch_size=500, optimizer="rmsprop", learning_rate=1e-4,
      normalize="featurewise", width_shift_range=0.1, height_shift_range=0.1, horizontal_flip=True,
      log_every=200)
  config.eval_batch_size = 500    # test images per predict call
  config.feature_map_index = 0    # the test image whose feature maps are drawn
  return config


_DATA_HINT = ("for experiments.cifar10 pass --config.data.data_dir=DIR with the CIFAR-10 binary version "
              "(data_batch_1.bin ... data_batch_5.bin, test_batch.bin; cifar-10-binary.tar.gz from "
              "https://www.cs.toronto.edu/~kriz/cifar.html, extracted), or --config.data.tfds_data_dir=DIR "
              "holding a prepared tfds cifar10, or allow the tfds download (--config.data.download=True, needs "
              "internet)")


def check_config(config: ml_collections.ConfigDict) -> None:
  """Raises ConfigError naming every bad value (the recipe's, then fit's check of config.train)."""
  from jaxcnn.errors import ConfigError
  from jaxcnn.train import validate_config
  problems = []
  for key in ("train_examples", "test_examples"):
    value = config.data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      problems.append(f"data.{key}={value!r} (expected an integer >= 0, 0: all)")
  for key in ("eval_batch_size",):
    if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < 1:
      problems.append(f"{key}={config[key]!r} (expected an integer >= 1)")
  if problems:
    raise ConfigError("config: bad values: " + "; ".join(problems))
  validate_config(config.train)


def load_split(resolved, split: str, count: int):
  """(images uint8 (N, 32, 32, 3), labels int32 (N,)) of a resolved dataset, the first `count` (0: all)."""
  from jaxcnn.errors import ConfigError
  images, labels = resolved.read(split)
  if count:
    if count > len(images):
      raise ConfigError(f"config: data.{split}_examples={count} exceeds the {len(images)} {split} images")
    images, labels = images[:count], labels[:count]
  return images, labels


def main(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """Trains the CIFAR-10 CNN, writes the summary and figures; returns the summary."""
  from jaxcnn import data, models
  from jaxcnn.errors import DataError
  started = time.perf_counter()
  workdir = pathlib.Path(workdir)
  check_config(config)

  # input: resolve once (raw dir -> prepared tfds -> download), then host arrays
  try:
    resolved = _common.primary_first(lambda: data.resolve(
        "cifar10", data_dir=config.data.data_dir or None, tfds_data_dir=config.data.tfds_data_dir or None,
        download=config.data.download))
  except DataError as err:
    raise DataError(f"{err}. {_DATA_HINT}") from None
  train_images, train_labels = load_split(resolved, "train", config.data.train_examples)
  test_images, test_labels = load_split(resolved, "test", config.data.test_examples)
  class_names = list(resolved.class_names)

  # model -> fit (preprocessing and augmentation from config.train; resumes from workdir/checkpoints)
  model = models.get(config.model, num_classes=len(class_names), **config.model_kwargs.to_dict())
  result, run, timing = _common.fit(model, (train_images, train_labels), config=config.train, workdir=workdir,
                                    val_data=(test_images, test_labels))

  # report: test loss and accuracy, curves, confusion matrix, first-layer filters, feature maps
  variables = _common.host_variables(result.state)
  evaluation = _common.predict(result, test_images, test_labels, batch_size=config.eval_batch_size)
  print(f"CIFAR-10 test accuracy {evaluation['accuracy']:.4f} (loss {evaluation['loss']:.4f})")
  figures = []
  if _common.is_primary():
    figures = _common.save_classifier_figures(
        workdir, result.history, model, variables, evaluation, class_names,
        title=f"CIFAR-10 CNN ({result.data['train_examples']} training images)",
        feature_map_index=config.feature_map_index)
  return _common.write_summary(
      workdir, experiment="cifar10", config=config,
      results={"test_accuracy": evaluation["accuracy"], "test_loss": evaluation["loss"]},
      data={"source": resolved.source, "train_examples": result.data["train_examples"],
            "validation_examples": result.data["validation_examples"], "test_examples": evaluation["count"]},
      run=run, timing=timing, figures=figures, started=started)


if __name__ == "__main__":
  _runner.run(__name__, get_config, main)
