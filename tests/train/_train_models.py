"""Tiny models and data shared by the training tests and their subprocess workers (not collected).

Inputs are 8x8x1 images of 3 classes whose label is visible in the pixels (the brightest quadrant),
so a few steps of training measurably lower the loss.
"""
from __future__ import annotations

import numpy as np

from jaxcnn import data as data_lib
from jaxcnn import layers as L

NUM_CLASSES = 3


def make_model(*, dropout: float = 0.25, axis_name: str | None = None, filters: int = 4):
  """Conv (no bias: BatchNorm follows) -> BatchNorm -> relu -> pool -> Dropout -> Dense(3) logits."""
  return L.Sequential([
      L.Conv2D(filters, 3, padding="same", use_bias=False), L.BatchNorm(axis_name=axis_name),
      L.Activation("relu"), L.MaxPool2D(2), L.Flatten(), L.Dropout(dropout), L.Dense(NUM_CLASSES)])


def make_arrays(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 (n, 8, 8, 1) images, int labels (n,)): noise plus a bright quadrant chosen by the label."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, NUM_CLASSES, n)
  images = rng.integers(0, 100, (n, 8, 8, 1))
  for i, label in enumerate(labels):
    r, c = divmod(int(label), 2)
    images[i, 4 * r:4 * r + 4, 4 * c:4 * c + 4] += 150
  return images.astype(np.uint8), labels.astype(np.int32)


def make_data(n_train: int = 64, n_val: int = 24, batch_size: int = 16, seed: int = 0):
  """(train pipeline (shuffled), val pipeline (unshuffled, padded last batch)) via jaxcnn.data.from_arrays."""
  images, labels = make_arrays(n_train + n_val, seed)
  train = data_lib.from_arrays(images[:n_train], labels[:n_train], batch_size=batch_size, seed=seed, normalize="scale")
  val = data_lib.from_arrays(images[n_train:], labels[n_train:], batch_size=batch_size, seed=seed,
                             shuffle=False, normalize="scale")
  return train, val


class StreamingView:
  """The same batches as `pipeline`, but offering only the streaming interface (no batch_fn)."""

  def __init__(self, pipeline):
    self._p = pipeline
    for name in ("batch_size", "steps_per_epoch", "num_examples", "image_shape", "num_classes"):
      setattr(self, name, getattr(pipeline, name))

  def batches(self, epoch: int, start_step: int = 0):
    return self._p.batches(epoch, start_step)
