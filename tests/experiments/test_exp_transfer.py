"""experiments.transfer: tiny runs of the cases, freezing proven by unchanged weights, bad config/data."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import transfer
from jaxcnn import models
from jaxcnn.errors import ConfigError, DataError

from helpers import read_once


@pytest.fixture(autouse=True)
def _datasets_read_once(monkeypatch):
  monkeypatch.setattr(transfer, "_read", read_once(transfer._read))


def _tiny_config(**overrides):
  config = transfer.get_config()
  config.data.update(dict(pretrain_examples=64, small_examples=32, large_examples=48, test_examples=32))
  config.train.update(dict(batch_size=16, log_every=2))
  config.update(dict(pretrain_epochs=1, small_epochs=1, large_epochs=1, baselines=False))
  for key, value in overrides.items():
    (config.data if key in config.data else config)[key] = value
  return config


def test_similar_cases_freeze_what_the_case_says_and_resume(tmp_path):
  workdir = tmp_path / "run"
  summary = transfer.main(_tiny_config(cases="small_similar,large_similar"), workdir)
  results = summary["results"]
  assert 0.0 <= results["source_test_accuracy"] <= 1.0
  assert summary["data"]["train_examples"] == 64
  small, large = results["cases"]["small_similar"], results["cases"]["large_similar"]
  assert (small["train_examples"], large["train_examples"]) == (32, 48)
  assert small["test_examples"] == 32 and small["domain"] == "similar"
  # Head only: both convolutions frozen and bit-identical to the pretrained ones; the head moved.
  assert small["frozen_layers"] == ["conv2d", "conv2d_1"]
  assert small["frozen_max_change"] == 0.0 and small["trained_max_change"] > 0.0
  assert large["frozen_layers"] == [] and large["trained_max_change"] > 0.0
  assert small["scratch_accuracy"] is None
  saved = json.loads((workdir / "summary.json").read_text())
  assert saved["experiment"] == "transfer"
  assert saved["results"]["cases"]["small_similar"]["test_accuracy"] == pytest.approx(small["test_accuracy"])
  for run in ("pretrain", "small_similar", "large_similar"):
    assert json.loads((workdir / run / "history.json").read_text())["epoch"] == [1]
  assert (workdir / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # A re-run resumes every run at its end: nothing is retrained and the numbers are the same.
  again = transfer.main(_tiny_config(cases="small_similar,large_similar"), workdir)["results"]
  assert again["cases"]["small_similar"]["test_accuracy"] == pytest.approx(small["test_accuracy"])
  assert again["source_test_accuracy"] == pytest.approx(results["source_test_accuracy"])


def test_different_case_on_fashion_mnist_with_scratch_baseline(tmp_path, shared_datasets):
  config = _tiny_config(cases="small_different", baselines=True,
                        fashion_data_dir=str(shared_datasets / "fashion-mnist"))
  case = transfer.main(config, tmp_path / "run")["results"]["cases"]["small_different"]
  assert case["domain"] == "different" and case["frozen_layers"] == ["conv2d"]
  assert case["frozen_max_change"] == 0.0 and case["trained_max_change"] > 0.0
  assert 0.0 <= case["scratch_accuracy"] <= 1.0
  assert (tmp_path / "run" / "small_different_scratch" / "history.json").is_file()


def test_missing_fashion_mnist_says_where_to_put_it(tmp_path, monkeypatch):
  monkeypatch.delenv("JAXCNN_DATA_DIR", raising=False)
  monkeypatch.setenv("JAXCNN_TFDS_DIR", str(tmp_path / "tfds"))
  empty = tmp_path / "empty"
  empty.mkdir()
  config = _tiny_config(cases="small_different", fashion_data_dir=str(empty), download=False)
  with pytest.raises(DataError, match=r"fashion_mnist: dataset not found.*--config.data.fashion_data_dir=DIR "
                                      r"holding train-images-idx3-ubyte.gz") as info:
    transfer.main(config, tmp_path / "run")
  assert info.value.exit_code == 2
  assert not (tmp_path / "run").exists()


def test_freeze_patterns_and_transplant():
  model = models.get("mnist_convnet", num_classes=5)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
  assert transfer.freeze_patterns(params, "head", "dense", ("conv2d",)) == ("conv2d/.*", "conv2d_1/.*")
  assert transfer.freeze_patterns(params, "late", "dense", ("conv2d",)) == ("conv2d/.*",)
  assert transfer.freeze_patterns(params, "all", "dense", ("conv2d",)) == ()
  with pytest.raises(ConfigError, match=r"layers \['fc'\] are not layers of the model \(its layers: "
                                        r"conv2d, conv2d_1, dense\)"):
    transfer.freeze_patterns(params, "head", "fc", ())
  with pytest.raises(ConfigError, match=r"early_layers must not include the head layer 'dense'"):
    transfer.freeze_patterns(params, "late", "dense", ("conv2d", "dense"))
  with pytest.raises(ValueError, match=r"trained: expected 'head', 'late' or 'all', got 'some'"):
    transfer.freeze_patterns(params, "some", "dense", ())

  def init(classes, seed):  # the model's parameter shapes, filled with random numbers (nothing compiled)
    model = models.get("mnist_convnet", num_classes=classes)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), shapes)

  source, target = init(5, 1), init(10, 2)
  merged = transfer.transplant(source, target, "dense")
  np.testing.assert_array_equal(merged["conv2d_1"]["kernel"], source["conv2d_1"]["kernel"])
  np.testing.assert_array_equal(merged["dense"]["kernel"], target["dense"]["kernel"])  # the new head
  assert merged["dense"]["kernel"].shape == (1600, 10)
  with pytest.raises(ConfigError, match=r"transplant: layer 'dense' has shapes"):
    transfer.transplant(source, target, "conv2d")


def test_bad_config(tmp_path):
  with pytest.raises(ConfigError, match=r"cases='small,large': expected a comma-separated subset of "
                                        r"small_similar, large_similar, small_different, large_different"):
    transfer.main(_tiny_config(cases="small,large"), tmp_path / "run")
  with pytest.raises(ConfigError, match=r"config: data.small_examples=40000 exceeds the \d+ images available"):
    transfer.main(_tiny_config(cases="small_similar", small_examples=40000), tmp_path / "run")
  config = _tiny_config(cases="small_similar")
  config.train.epochs = 3
  with pytest.raises(ConfigError, match=r"config: train.epochs=3: this experiment sets each run's epochs"):
    transfer.main(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()  # refused before pretraining
