"""Fashion-MNIST with the MNIST recipe: `python -m experiments.fashion_mnist`.

  python -m experiments.fashion_mnist [--workdir=runs/fashion_mnist/NAME] [--config.data.data_dir=DIR]

Reaches about 92% test accuracy with the default config (`mnist_fast_cnn`, 6 epochs), against 91.6-92.5%
for the Fashion-MNIST benchmark's two-convolution CNNs (the table in zalandoresearch/fashion-mnist's
README); benchmarks/README.md has the measured run.

A variant of `experiments.mnist`: its config with the data and the training length overridden, run by
the same pipeline (data -> registry model -> fit -> test predictions -> figures -> summary.json).
Fashion-MNIST does not ship with the repo: the data layer resolves it from `--config.data.data_dir` (a
folder holding the four IDX .gz files, or its parent), else $JAXCNN_DATA_DIR, else the Debian location
/usr/share/datasets/fashion-mnist (package `dataset-fashion-mnist`), else the tfds catalog (online).
"""
from __future__ import annotations

from typing import Any

import ml_collections

from experiments import _runner
from experiments import mnist

BENCHMARK = {"name": "Fashion-MNIST benchmark 2-conv CNNs", "accuracy_range": (0.916, 0.925)}


def get_config() -> ml_collections.ConfigDict:
  """The MNIST config with Fashion-MNIST data and a longer schedule (clothes are harder than digits)."""
  c = mnist.get_config()
  c.data.dataset = "fashion_mnist"
  c.data.data_dir = ""           # $JAXCNN_DATA_DIR, /usr/share/datasets/fashion-mnist, then tfds
  c.train.epochs = 6
  c.train.warmup_steps = 250     # ~10% of the run's 6 x 445 steps
  return c


def main(config: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
  """The MNIST recipe on Fashion-MNIST, compared with the benchmark; returns the summary dict."""
  return mnist.run_classifier(config, workdir, experiment="fashion_mnist", benchmark=BENCHMARK)


if __name__ == "__main__":
  _runner.run(__name__, get_config, main)
