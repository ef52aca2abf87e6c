"""experiments.cifar10: end to end on tfds mock data; a clear exit 2 when no CIFAR-10 copy is found."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO_ROOT
from experiments import cifar10
from jaxcnn.errors import ConfigError, DataError


def _tiny_config(tmp_path, **overrides):
  config = cifar10.get_config()
  empty = tmp_path / "empty"
  empty.mkdir(exist_ok=True)
  config.data.update(dict(data_dir=str(empty), tfds_data_dir=str(tmp_path / "tfds"),
                          **{k: v for k, v in overrides.items() if k in config.data}))
  config.train.update(dict(epochs=1, batch_size=8, validation_batch_size=8, log_every=2))
  config.eval_batch_size = 8
  return config


@pytest.fixture
def mock_cifar10(monkeypatch):
  """tfds.testing.mock_data: random CIFAR-10-shaped examples, 24 per split, nothing read or downloaded."""
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.delenv("JAXCNN_DATA_DIR", raising=False)
  # Without metadata files the mock reports 0 examples per split, and as_dataset(batch_size=-1) then
  # asks TensorFlow for one batch of sys.maxsize examples (a C++ abort); give the mocked count instead.
  monkeypatch.setattr(tfds.core.SplitDict, "total_num_examples", property(lambda self: 24))
  with tfds.testing.mock_data(num_examples=24):
    yield


def test_runs_end_to_end_on_mock_data(tmp_path, mock_cifar10):
  workdir = tmp_path / "run"
  summary = cifar10.main(_tiny_config(tmp_path, test_examples=16), workdir)
  results, data = summary["results"], summary["data"]
  assert data["train_examples"] == 24 and data["test_examples"] == 16
  assert summary["run"]["epochs"] == 1
  assert data["source"] in ("download", "tfds")
  assert 0.0 <= results["test_accuracy"] <= 1.0 and np.isfinite(results["test_loss"])
  saved = json.loads((workdir / "summary.json").read_text())
  # JSON keeps every float exactly (shortest repr), so the written results equal the returned ones.
  assert saved["results"] == json.loads(json.dumps(results)) and saved["experiment"] == "cifar10"
  train = saved["config"]["train"]
  assert (train["width_shift_range"], train["height_shift_range"], train["horizontal_flip"]) == (0.1, 0.1, True)
  assert train["normalize"] == "featurewise" and train["optimizer"] == "rmsprop"
  history = json.loads((workdir / "history.json").read_text())
  assert history["epoch"] == [1] and len(history["val_accuracy"]) == 1
  assert {"history.png", "confusion_matrix.png", "filters.png"} <= set(saved["figures"])
  for figure in saved["figures"]:
    assert (workdir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  with pytest.raises(ConfigError, match=r"config: data.test_examples=25 exceeds the 24 test images"):
    cifar10.main(_tiny_config(tmp_path, test_examples=25), tmp_path / "too_many")


def test_missing_data_raises_a_data_error_with_what_to_do(tmp_path, monkeypatch):
  monkeypatch.delenv("JAXCNN_DATA_DIR", raising=False)
  with pytest.raises(DataError) as info:
    cifar10.main(_tiny_config(tmp_path, download=False), tmp_path / "run")
  message = str(info.value)
  assert "cifar10: dataset not found" in message and "download=False" in message
  assert "--config.data.data_dir=DIR" in message and "data_batch_1.bin" in message
  assert not (tmp_path / "run").exists()  # nothing written for a run that could not start


def test_command_line_exits_2_without_data(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  env = {k: v for k, v in os.environ.items() if k != "JAXCNN_DATA_DIR"}
  env.update(JAXCNN_TFDS_DIR=str(tmp_path / "tfds"), CUDA_VISIBLE_DEVICES="")
  done = subprocess.run(
      [sys.executable, "-m", "experiments.cifar10", f"--workdir={tmp_path / 'run'}",
       f"--config.data.data_dir={empty}", f"--config.data.tfds_data_dir={tmp_path / 'tfds'}",
       "--config.data.download=False"],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2, done.stderr[-2000:]
  last = done.stderr.strip().splitlines()[-1]
  assert last.startswith("error: cifar10: dataset not found") and "--config.data.data_dir=DIR" in last
  assert "Traceback" not in done.stderr
