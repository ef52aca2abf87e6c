"""Cats vs dogs (or any class-per-folder image set) at 64x64, as in the textbook.

    python -m experiments.cats_vs_dogs --config.data.data_dir=DIR [--workdir=DIR] [--config.train.epochs=25]

The data is an image folder you provide (it does not ship with the repo):

    DIR/train/cats/*.jpg   DIR/train/dogs/*.jpg      training images, one subfolder per class
    DIR/test/cats/*.jpg    DIR/test/dogs/*.jpg       test images, the same class subfolders

(class names are the subfolder names, sorted; any image format PIL reads; files that do not decode are
skipped and reported). E.g. Kaggle's "Dogs vs. Cats" images sorted into these folders. Without
--config.data.data_dir, or with a folder in another layout, the run stops with exit code 2 and this layout.

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

import pathlib
import time

import ml_collections

from experiments import _common, _runner
from jaxcnn.train import default_config

LAYOUT = ("lay the images out as DIR/train/<class>/<images> and DIR/test/<class>/<images>, one subfolder per "
          "class (e.g. DIR/train/cats/1.jpg, DIR/train/dogs/2.jpg, DIR/test/cats/3.jpg, DIR/test/dogs/4.jpg), "
          "and pass --config.data.data_dir=DIR")


def get_config() -> ml_collections.ConfigDict:
  """The defaults of the run; every key can be overridden with --config.<key>=<value>."""
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(
      data_dir="",            # the image folder (required): DIR/train/<class>/..., DIR/test/<class>/...
      image_size=64,          # images are resized to image_size x image_size
  ))
  config.model_kwargs = ml_collections.ConfigDict(dict(filters=32, dense_units=128))  # see build_model
  # jaxcnn.train.fit's config, passed unchanged; the image-folder pipelines are built from its batch size,
  # seed, normalize and augmentation keys (x/255, zoom 0.2, horizontal flips)
  config.train = default_config(epochs=25, batch_size=32, optimizer="adam", learning_rate=1e-3, normalize="scale",
                                zoom_range=0.2, horizontal_flip=True, log_every=50)
  config.eval_batch_size = 100    # test images per batch
  config.feature_map_index = 0    # the test image whose feature maps are drawn
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
  """(train, test) pipelines over the image folder; DataError with the expected layout when it is wrong.

  Both are built from config.train's batch size, seed, normalize and augmentation keys (the test one
  without augmentation, with the training statistics), so fit finds them as its config describes. The
  test pipeline covers every test image in every process (for the predictions of any process).
  """
  from jaxcnn import data, train
  from jaxcnn.errors import DataError
  fit_config = train.validate_config(config.train)
  if not config.data.data_dir:
    raise DataError(f"cats_vs_dogs: no image folder given; {LAYOUT}")
  root = pathlib.Path(config.data.data_dir).expanduser()
  size = (config.data.image_size, config.data.image_size)
  try:
    if not (root / "train").is_dir() or not (root / "test").is_dir():
      raise DataError(f"{root}: expected 'train' and 'test' subfolders")
    train_data = data.make_pipeline(str(root), "train", batch_size=fit_config.batch_size, seed=fit_config.seed,
                                    augment=train.augment_config(fit_config), normalize=fit_config.normalize,
                                    image_size=size)
    test_data = data.make_pipeline(str(root), "test", batch_size=config.eval_batch_size, seed=fit_config.seed,
                                   normalize=fit_config.normalize, stats=train_data.stats, image_size=size,
                                   process_index=0, process_count=1)
  except DataError as err:
    raise DataError(f"{err}; {LAYOUT}") from None
  return train_data, test_data


def main(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """Trains the CNN on the image folder, evaluates it on the test folder, writes the summary and figures."""
  started = time.perf_counter()
  workdir = pathlib.Path(workdir)

  train_data, test_data = load_data(config)
  model = build_model(train_data.num_classes, **config.model_kwargs.to_dict())
  result, run, timing = _common.fit(model, train_data, config=config.train, workdir=workdir, val_data=test_data)

  variables = _common.host_variables(result.state)
  evaluation = _common.predict_pipeline(model, variables, test_data)
  class_names = list(train_data.class_names)
  print(f"test accuracy {evaluation['accuracy']:.4f} (loss {evaluation['loss']:.4f}) on {evaluation['count']} images")
  figures = []
  if _common.is_primary():
    size = config.data.image_size
    figures = _common.save_classifier_figures(workdir, result.history, model, variables, evaluation, class_names,
                                              title=f"{' vs '.join(class_names)} {size}x{size}",
                                              feature_map_index=config.feature_map_index)
  skipped = len(getattr(train_data, "skipped", []) or []) + len(getattr(test_data, "skipped", []) or [])
  return _common.write_summary(
      workdir, experiment="cats_vs_dogs", config=config,
      results={"test_accuracy": evaluation["accuracy"], "test_loss": evaluation["loss"],
               "class_names": class_names, "skipped_files": skipped},
      data={"source": f"image folder {config.data.data_dir}", "train_examples": result.data["train_examples"],
            "validation_examples": result.data["validation_examples"], "test_examples": evaluation["count"]},
      run=run, timing=timing, figures=figures, started=started)


if __name__ == "__main__":
  _runner.run(__name__, get_config, main)
