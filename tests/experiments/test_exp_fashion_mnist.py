"""experiments.fashion_mnist: a tiny run on real Fashion-MNIST images (sliced), benchmark comparison."""
from __future__ import annotations

import json

import pytest
from _exp_tiny_idx import write_tiny_idx

from experiments import fashion_mnist, mnist


def test_config_differs_from_mnist_only_in_data_and_schedule():
  base, config = mnist.get_config().to_dict(), fashion_mnist.get_config().to_dict()
  changed = {k for k in base if base[k] != config[k]}
  assert changed == {"dataset", "data_dir", "epochs", "warmup_steps"}
  assert config["dataset"] == "fashion_mnist" and config["data_dir"] == ""
  mnist.check_config(fashion_mnist.get_config())


def test_tiny_run_compares_with_the_benchmark(shared_datasets, tmp_path):
  raw = write_tiny_idx(shared_datasets / "fashion-mnist", tmp_path / "data" / "tiny_fashion",
                       {"train": 320, "test": 96})
  config = fashion_mnist.get_config()
  config.update(dict(dataset="tiny_fashion", data_dir=str(raw.parent), tfds_data_dir=str(tmp_path / "tfds"),
                     model="mnist_convnet", epochs=1, batch_size=32, eval_batch_size=32, log_every=5,
                     warmup_steps=2))
  workdir = tmp_path / "run"
  summary = fashion_mnist.main(config, workdir)
  saved = json.loads((workdir / "summary.json").read_text())
  low, high = fashion_mnist.BENCHMARK["accuracy_range"]
  assert saved["benchmark"]["accuracy_range"] == [low, high]
  assert saved["benchmark"]["difference_to_low"] == pytest.approx(summary["test_accuracy"] - low)
  assert saved["test_examples"] == 96 and saved["dataset"] == "tiny_fashion"
  for name in ("history.png", "confusion_matrix.png", "filters.png", "feature_maps.png"):
    assert (workdir / name).stat().st_size > 10_000
