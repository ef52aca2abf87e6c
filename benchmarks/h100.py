"""Accelerator-ready recipes (written for one H100; NOT measured here: no GPU was available).

    python -m benchmarks.h100 mnist    [--workdir DIR] [--set train.key=value ...]
    python -m benchmarks.h100 airbench --set data_dir='"DIR"' [--workdir DIR] [--set key=value ...]

Both train in bfloat16 with float32 parameters, optimizer state and BatchNorm statistics
(`compute_dtype="bfloat16"`), NHWC throughout, with the XLA convolution lowering that "auto" picks on
GPU/TPU, one device-resident lax.scan per epoch (log_every = steps per epoch) and large batches, so an
accelerator is busy with big kernels rather than waiting on the host.

  mnist     `experiments.mnist`'s default recipe with batch 512 (learning rate scaled by sqrt(4)) and
            bfloat16 compute; the run, outputs and summary are the experiment's own.
  airbench  the airbench-style CIFAR-10 network (`jaxcnn.models.airbench`: 2x2 stem, three conv-pool-BN-GELU
            blocks of widths 64/256/256, global max pool, scaled logits) with batch 1024, SGD with Nesterov
            momentum, warmup + cosine decay, flips and 2-pixel translations, 10 epochs. The anchor:
            Keller Jordan's airbench94 reaches 94% in 3.83 s on an A100 with extras this recipe leaves out
            (whitened frozen stem, lookahead, label smoothing, test-time flips, progressive freezing), so
            expect somewhat lower accuracy per epoch from this plain version.

On this repository's CPU machine the recipes run (slowly) and are smoke-tested with tiny overrides;
their accelerator timings and accuracies are not measured.
"""
from __future__ import annotations

import argparse
import math
import pathlib
import tempfile
import time

import ml_collections

from benchmarks.epoch import _parse_override

RECIPES = ("mnist", "airbench")


def mnist_config() -> ml_collections.ConfigDict:
  """experiments.mnist's default config, changed only where an accelerator wants it (its `train` keys)."""
  from experiments import mnist
  config = mnist.get_config()
  train = config.train
  scale = 512 / train.batch_size
  train.batch_size = 512
  train.learning_rate = train.learning_rate * math.sqrt(scale)
  train.warmup_steps = max(1, int(train.warmup_steps / scale))
  train.compute_dtype = "bfloat16"
  train.log_every = 105  # ~one chunk (one lax.scan) per epoch of 54,000 / 512 steps
  return config


def airbench_config() -> ml_collections.ConfigDict:
  """The airbench-style CIFAR-10 recipe; every hyperparameter lives here."""
  c = ml_collections.ConfigDict()
  c.data_dir = ""              # CIFAR-10 binary dir (see experiments.cifar10); "" = $JAXCNN_DATA_DIR
  c.tfds_data_dir = ""
  c.download = True
  c.train_examples = 0         # 0: all 50,000; n: the first n (smoke runs)
  c.test_examples = 0
  c.synthetic = False          # random images instead of CIFAR-10 (smoke tests of the recipe only)
  c.widths = (64, 256, 256)
  c.epochs = 10
  c.batch_size = 1024
  c.eval_batch_size = 2000
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.nesterov = True
  c.learning_rate = 0.4        # peak; ~0.1 per 256 images
  c.schedule = "warmup_cosine"
  c.warmup_epochs = 1
  c.weight_decay = 5e-4        # sgd: L2 added to the gradient
  c.shift_pixels = 2           # random translation of up to 2 pixels, as airbench
  c.horizontal_flip = True
  c.compute_dtype = "bfloat16"
  c.seed = 0
  return c


def _airbench_data(config):
  import numpy as np
  from jaxcnn.data import AugmentConfig, from_arrays
  if config.synthetic:
    rng = np.random.default_rng(config.seed)
    n_train, n_test = config.train_examples or 2048, config.test_examples or 512
    train = (rng.integers(0, 256, (n_train, 32, 32, 3), np.uint8), rng.integers(0, 10, n_train).astype(np.int32))
    test = (rng.integers(0, 256, (n_test, 32, 32, 3), np.uint8), rng.integers(0, 10, n_test).astype(np.int32))
  else:
    from jaxcnn.data import resolve
    resolved = resolve("cifar10", data_dir=config.data_dir or None, tfds_data_dir=config.tfds_data_dir or None,
                       download=config.download)
    train, test = resolved.read("train"), resolved.read("test")
    if config.train_examples:
      train = (train[0][:config.train_examples], train[1][:config.train_examples])
    if config.test_examples:
      test = (test[0][:config.test_examples], test[1][:config.test_examples])
  shift = config.shift_pixels / 32
  augment = AugmentConfig(width_shift_range=shift, height_shift_range=shift, horizontal_flip=config.horizontal_flip,
                          fill_mode="constant")
  train_data = from_arrays(*train, batch_size=config.batch_size, seed=config.seed, augment=augment,
                           num_classes=10)
  test_data = from_arrays(*test, batch_size=config.eval_batch_size, seed=config.seed, shuffle=False,
                          stats=train_data.stats, num_classes=10)
  return train_data, test_data


def run_airbench(config, workdir) -> dict:
  """Trains and evaluates the airbench recipe; returns {test_accuracy, train_seconds, ...}."""
  from jaxcnn import models
  from jaxcnn.train import evaluate, fit
  train_data, test_data = _airbench_data(config)
  steps = train_data.steps_per_epoch
  fit_config = dict(epochs=config.epochs, batch_size=config.batch_size, optimizer=config.optimizer,
                    momentum=config.momentum, nesterov=config.nesterov, learning_rate=config.learning_rate,
                    schedule=config.schedule, warmup_steps=int(config.warmup_epochs * steps),
                    weight_decay=config.weight_decay, compute_dtype=config.compute_dtype, seed=config.seed,
                    log_every=steps, progress="log")
  model = models.get("airbench", widths=tuple(config.widths))
  start = time.perf_counter()
  result = fit(model, train_data, config=fit_config, workdir=workdir)
  train_seconds = time.perf_counter() - start
  metrics = evaluate(result.state, model, test_data)
  summary = {"test_accuracy": metrics["accuracy"], "test_loss": metrics["loss"], "train_seconds": train_seconds,
             "epochs": config.epochs, "steps_per_epoch": steps}
  print(f"airbench: test accuracy {100 * metrics['accuracy']:.2f}% after {config.epochs} epochs, "
        f"{train_seconds:.1f} s training (compile included)")
  return summary


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.h100", description=__doc__.splitlines()[0])
  parser.add_argument("recipe", choices=RECIPES)
  parser.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                      help="override a config key (repeatable), e.g. --set epochs=1")
  parser.add_argument("--workdir", default=None, help="run directory (default: a fresh temporary one)")
  args = parser.parse_args(argv)
  config = mnist_config() if args.recipe == "mnist" else airbench_config()
  from benchmarks import _common
  for key, value in args.overrides:
    _common.set_config_path(config, key, value, parser)
  workdir = pathlib.Path(args.workdir) if args.workdir else pathlib.Path(tempfile.mkdtemp(prefix=f"h100_{args.recipe}_"))
  if args.recipe == "mnist":
    from experiments import mnist
    return mnist.main(config, workdir)
  return run_airbench(config, workdir)


if __name__ == "__main__":
  main()
