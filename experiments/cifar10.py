"""The textbook CIFAR-10 CNN with the textbook augmentation.

    python -m experiments.cifar10 --config.data_dir=DIR [--workdir=DIR] [--config.epochs=50]

Model (`jaxcnn.models.cifar10_cnn`): Conv32-Conv32-MaxPool-Dropout(0.25), Conv64-Conv64-MaxPool-
Dropout(0.25), Flatten-Dense512-Dropout(0.5)-Dense10, 3x3 "same" ReLU convolutions. Augmentation as
Keras' ImageDataGenerator in the textbook: featurewise centring and std normalisation (statistics of the
training images), random shifts of up to 0.1 of the width and height, random horizontal flips; RMSprop
at 1e-4, batch 32, the test split as validation data.

Data (CIFAR-10 does not ship with the repo): `--config.data_dir=DIR` pointing at the binary version
(`cifar-10-batches-bin/` with data_batch_1.bin ... data_batch_5.bin and test_batch.bin, from
https://www.cs.toronto.edu/~kriz/cifar.html), or a tfds-prepared `cifar10` in `--config.tfds_data_dir`
(or $JAXCNN_TFDS_DIR), or a tfds download (needs internet; `--config.download=False` forbids it).
Without any of them the run stops with exit code 2 and says where it looked and what to put where.

Result: not measured in this repository (no CIFAR-10 copy is available offline here). The Keras
example this recipe comes from states 75% test accuracy after 25 epochs and 79% after 50. Cost: about
26.5M multiply-adds per image forward (~4e12 per training epoch with the backward pass), minutes per
epoch on a CPU: use an accelerator for the full recipe, or `--config.train_examples=` for a quick look.

Outputs in the workdir: summary.json (config, device, results), history.json, history.png (loss and
accuracy per epoch), confusion_matrix.png, filters.png, feature_maps.png, checkpoints/ (a re-run with
the same workdir resumes).
"""
from __future__ import annotations

import logging
import pathlib
import time

import ml_collections

from experiments import _runner


def get_config() -> ml_collections.ConfigDict:
  """The defaults of the run; every key can be overridden with --config.<key>=<value>."""
  config = ml_collections.ConfigDict()
  config.data_dir = ""            # raw CIFAR-10 binary dir (or its parent); "" = $JAXCNN_DATA_DIR / none
  config.tfds_data_dir = ""       # where tfds datasets are prepared; "" = $JAXCNN_TFDS_DIR or tfds' default
  config.download = True          # allow the tfds catalog download when nothing local is found
  config.train_examples = 0       # first N training images (0 = all 50,000)
  config.test_examples = 0        # first N test images (0 = all 10,000)
  config.epochs = 50
  config.batch_size = 32
  config.optimizer = "rmsprop"
  config.learning_rate = 1e-4
  config.shift_range = 0.1        # width and height shift, fraction of the image size
  config.horizontal_flip = True
  config.conv_dropout = 0.25
  config.dense_dropout = 0.5
  config.seed = 0
  config.log_every = 200          # steps between progress reports (and host syncs)
  config.eval_batch_size = 500
  config.feature_map_index = 0    # the test image whose feature maps are drawn
  return config


_DATA_HINT = ("for experiments.cifar10 pass --config.data_dir=DIR with the CIFAR-10 binary version "
              "(data_batch_1.bin ... data_batch_5.bin, test_batch.bin; cifar-10-binary.tar.gz from "
              "https://www.cs.toronto.edu/~kriz/cifar.html, extracted), or --config.tfds_data_dir=DIR holding a "
              "prepared tfds cifar10, or allow the tfds download (--config.download=True, needs internet)")


def load_split(resolved, split: str, count: int):
  """(images uint8 (N, 32, 32, 3), labels int32 (N,)) of a resolved dataset, the first `count` (0: all)."""
  from jaxcnn.errors import ConfigError
  images, labels = resolved.read(split)
  if count:
    if count > len(images):
      raise ConfigError(f"config: {split}_examples={count} exceeds the {len(images)} {split} images")
    images, labels = images[:count], labels[:count]
  return images, labels


def main(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """Trains the CIFAR-10 CNN, writes the summary and figures; returns the results."""
  from experiments import mnist
  from jaxcnn import data, models, train
  from jaxcnn.errors import DataError
  started = time.time()
  workdir = pathlib.Path(workdir)

  # input: resolve once (raw dir -> prepared tfds -> download), then device-resident pipelines
  try:
    resolved = data.resolve("cifar10", data_dir=config.data_dir or None,
                            tfds_data_dir=config.tfds_data_dir or None, download=config.download)
  except DataError as err:
    raise DataError(f"{err}. {_DATA_HINT}") from None
  workdir.mkdir(parents=True, exist_ok=True)
  train_images, train_labels = load_split(resolved, "train", config.train_examples)
  test_images, test_labels = load_split(resolved, "test", config.test_examples)
  augment = data.AugmentConfig(width_shift_range=config.shift_range, height_shift_range=config.shift_range,
                               horizontal_flip=config.horizontal_flip)
  # normalize="featurewise": centre and scale by the training images' per-channel mean and std, the
  # same statistics for the test images.
  train_data = data.from_arrays(train_images, train_labels, batch_size=config.batch_size, seed=config.seed,
                                augment=augment, normalize="featurewise", class_names=resolved.class_names)
  test_data = data.from_arrays(test_images, test_labels, batch_size=config.eval_batch_size, seed=config.seed,
                               shuffle=False, normalize="featurewise", stats=train_data.stats,
                               class_names=resolved.class_names)

  # model -> loss -> loop (resumes from workdir/checkpoints)
  model = models.get("cifar10_cnn", num_classes=train_data.num_classes, conv_dropout=config.conv_dropout,
                     dense_dropout=config.dense_dropout)
  fit_config = dict(epochs=config.epochs, batch_size=config.batch_size, optimizer=config.optimizer,
                    learning_rate=config.learning_rate, seed=config.seed, log_every=config.log_every)
  result = train.fit(model, train_data, config=fit_config, workdir=workdir, val_data=test_data)

  # report: test loss and accuracy, the figures experiments.mnist draws (curves, confusion matrix,
  # first-layer filters, feature maps)
  variables = result.state.variables()
  evaluation = mnist.predict(model, variables, test_data)
  results = {"test_accuracy": evaluation["accuracy"], "test_loss": evaluation["loss"],
             "train_examples": int(train_data.num_examples), "test_examples": evaluation["count"],
             "epochs_completed": len(result.history.get("epoch", [])), "data_source": resolved.source}
  logging.info("CIFAR-10 test accuracy %.4f (loss %.4f)", evaluation["accuracy"], evaluation["loss"])
  figures = mnist.save_figures(workdir, result.history, model, variables, evaluation, list(train_data.class_names),
                               config, title=f"CIFAR-10 CNN ({results['train_examples']} training images)")
  _runner.write_summary(workdir, "cifar10", config, results, started, figures)
  return results


if __name__ == "__main__":
  _runner.run(__name__, get_config, main)
