"""Cats vs dogs (or any class-per-folder image set) at 64x64, as in the textbook.

    python -m experiments.cats_vs_dogs --config.data_dir=DIR [--workdir=DIR] [--config.epochs=25]

The data is an image folder you provide (it does not ship with the repo):

    DIR/train/cats/*.jpg   DIR/train/dogs/*.jpg      training images, one subfolder per class
    DIR/test/cats/*.jpg    DIR/test/dogs/*.jpg       test images, the same class subfolders

(class names are the subfolder names, sorted; any image format PIL reads; files that do not decode are
skipped and reported). E.g. Kaggle's "Dogs vs. Cats" images sorted into these folders. Without
--config.data_dir, or with a folder in another layout, the run stops with exit code 2 and this layout.

Recipe (the textbook's Keras CNN): images resized to 64x64 and rescaled to [0, 1]; Conv2D(32, 3, relu)
-> MaxPool2D(2) -> Conv2D(32, 3, relu) -> MaxPool2D(2) -> Flatten -> Dense(128, relu) -> Dense(classes);
augmentation: zoom 0.2 and horizontal flips (the textbook's shear 0.2 has no counterpart in
jaxcnn.data.AugmentConfig and is left out); Adam 1e-3, batch 32, 25 epochs, the test folder as
validation data.

Result: not measured in this repository (no cats-vs-dogs images are available offline here); the
tests run it end to end on a generated image folder.

Outputs in the workdir: summary.json (config, device, results), history.json, history.png,
confusion_matrix.png, filters.png, feature_maps.png, checkpoints/ (a re-run with the same workdir
resumes).
"""
from __future__ import annotations

import logging
import pathlib
import time

import ml_collections

from experiments import _runner

LAYOUT = ("lay the images out as DIR/train/<class>/<images> and DIR/test/<class>/<images>, one subfolder per "
          "class (e.g. DIR/train/cats/1.jpg, DIR/train/dogs/2.jpg, DIR/test/cats/3.jpg, DIR/test/dogs/4.jpg), "
          "and pass --config.data_dir=DIR")


def get_config() -> ml_collections.ConfigDict:
  """The defaults of the run; every key can be overridden with --config.<key>=<value>."""
  config = ml_collections.ConfigDict()
  config.data_dir = ""            # the image folder (required): DIR/train/<class>/..., DIR/test/<class>/...
  config.image_size = 64          # images are resized to image_size x image_size
  config.epochs = 25
  config.batch_size = 32
  config.eval_batch_size = 100
  config.optimizer = "adam"
  config.learning_rate = 1e-3
  config.zoom_range = 0.2
  config.horizontal_flip = True
  config.filters = 32             # filters of both convolutions
  config.dense_units = 128
  config.seed = 0
  config.log_every = 50           # steps between progress reports (and host syncs)
  config.feature_map_index = 0    # the test image whose feature maps are drawn (mnist.save_figures)
  return config


def build_model(num_classes: int, filters: int = 32, dense_units: int = 128):
  """The textbook cats-vs-dogs CNN: (N, H, W, 3) -> (N, num_classes) logits.

  Args:
    num_classes: number of logits (2 for cats vs dogs; softmax over two is the textbook's sigmoid unit).
    filters: filters of both 3x3 valid ReLU convolutions; default 32.
    dense_units: units of the hidden dense layer; default 128.
  """
  from jaxcnn.layers import Conv2D, Dense, Flatten, MaxPool2D, Sequential
  return Sequential([
      Conv2D(filters, 3, activation="relu"), MaxPool2D(2),
      Conv2D(filters, 3, activation="relu"), MaxPool2D(2),
      Flatten(), Dense(dense_units, activation="relu"), Dense(num_classes),
  ])


def load_data(config: ml_collections.ConfigDict):
  """(train, test) pipelines over the image folder; DataError with the expected layout when it is wrong."""
  from jaxcnn import data
  from jaxcnn.errors import DataError
  if not config.data_dir:
    raise DataError(f"cats_vs_dogs: no image folder given; {LAYOUT}")
  root = pathlib.Path(config.data_dir).expanduser()
  size = (config.image_size, config.image_size)
  augment = data.AugmentConfig(zoom_range=config.zoom_range, horizontal_flip=config.horizontal_flip)
  try:
    if not (root / "train").is_dir() or not (root / "test").is_dir():
      raise DataError(f"{root}: expected 'train' and 'test' subfolders")
    train_data = data.make_pipeline(str(root), "train", batch_size=config.batch_size, seed=config.seed,
                                    augment=augment, normalize="scale", image_size=size)
    test_data = data.make_pipeline(str(root), "test", batch_size=config.eval_batch_size, seed=config.seed,
                                   normalize="scale", image_size=size)
  except DataError as err:
    raise DataError(f"{err}; {LAYOUT}") from None
  return train_data, test_data


def main(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """Trains the CNN on the image folder, evaluates it on the test folder, writes the summary and figures."""
  from experiments import mnist
  from jaxcnn import train
  started = time.time()
  workdir = pathlib.Path(workdir)

  train_data, test_data = load_data(config)
  workdir.mkdir(parents=True, exist_ok=True)
  model = build_model(train_data.num_classes, config.filters, config.dense_units)
  fit_config = dict(epochs=config.epochs, batch_size=config.batch_size, optimizer=config.optimizer,
                    learning_rate=config.learning_rate, seed=config.seed, log_every=config.log_every)
  result = train.fit(model, train_data, config=fit_config, workdir=workdir, val_data=test_data)

  variables = result.state.variables()
  evaluation = mnist.predict(model, variables, test_data)
  class_names = list(train_data.class_names)
  figures = mnist.save_figures(workdir, result.history, model, variables, evaluation, class_names, config,
                               title=f"{' vs '.join(class_names)} {config.image_size}x{config.image_size}")
  results = {"test_accuracy": evaluation["accuracy"], "test_loss": evaluation["loss"],
             "test_examples": evaluation["count"], "train_examples": int(train_data.num_examples),
             "class_names": class_names, "epochs_completed": len(result.history.get("epoch", [])),
             "skipped_files": len(getattr(train_data, "skipped", []) or []) + len(
                 getattr(test_data, "skipped", []) or [])}
  logging.info("test accuracy %.4f (loss %.4f) on %d images", evaluation["accuracy"], evaluation["loss"],
               evaluation["count"])
  _runner.write_summary(workdir, "cats_vs_dogs", config, results, started, figures)
  return results


if __name__ == "__main__":
  _runner.run(__name__, get_config, main)
