"""experiments.fashion_mnist: a tiny run on real Fashion-MNIST images (sliced), benchmark comparison."""
from __future__ import annotations

import json

import pytest
from _exp_tiny_idx import write_tiny_idx

from experiments import fashion_mnist, mnist


def _flat(config) -> dict:
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
    else:
      out[key] = value
  return out


def test_config_differs_from_mnist_only_in_data_and_schedule():
  base, config = _flat(mnist.get_config()), _flat(fashion_mnist.get_config())
  changed = {k for k in base if base[k] != config[k]}
  assert changed == {"data.dataset", "data.data_dir", "train.epochs", "train.warmup_steps"}
  assert config["data.dataset"] == "fashion_mnist" and config["data.data_dir"] == ""
  mnist.check_config(fashion_mnist.get_config())


def test_tiny_run_compares_with_the_benchmark(shared_datasets, tmp_path):
  raw = write_tiny_idx(shared_datasets / "fashion-mnist", tmp_path / "data" / "tiny_fashion",
                       {"train": 320, "test": 96})
  config = fashion_mnist.get_config()
  config.data.update(dict(dataset="tiny_fashion", data_dir=str(raw.parent), tfds_data_dir=str(tmp_path / "tfds")))
  config.train.update(dict(epochs=1, batch_size=32, validation_batch_size=32, log_every=4, warmup_steps=2))
  config.update(dict(model="mnist_convnet", eval_batch_size=32))
  workdir = tmp_path / "run"
  summary = fashion_mnist.main(config, workdir)
  saved = json.loads((workdir / "summary.json").read_text())
  low, high = fashion_mnist.BENCHMARK["accuracy_range"]
  assert saved["experiment"] == "fashion_mnist"
  assert saved["results"]["benchmark"]["accuracy_range"] == [low, high]
  assert saved["results"]["benchmark"]["difference_to_low"] == pytest.approx(summary["results"]["test_accuracy"] - low)
  assert saved["data"]["test_examples"] == 96 and saved["config"]["data"]["dataset"] == "tiny_fashion"
  for name in ("history.png", "confusion_matrix.png", "filters.png", "feature_maps.png"):
    assert (workdir / name).stat().st_size > 10_000
