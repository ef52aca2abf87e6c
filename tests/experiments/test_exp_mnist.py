"""experiments.mnist: tiny end-to-end runs (real digits, sliced), outputs, resume, CLI errors."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from _exp_tiny_idx import tiny_digits  # noqa: F401  (fixture)
from PIL import Image

from experiments import _runner, mnist
from jaxcnn.errors import ConfigError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SUMMARY_KEYS = {"dataset", "model", "epochs", "test_accuracy", "test_loss", "train_seconds", "compile_seconds",
                "images_per_second", "device_kind", "device_count", "val_accuracy", "train_examples",
                "test_examples", "wall_seconds", "figures", "config", "reevaluated"}
FIGURES = ("history.png", "confusion_matrix.png", "filters.png", "feature_maps.png")


def _config(tiny, **overrides):
  config = mnist.get_config()
  config.update({**tiny, **dict(epochs=1, batch_size=32, eval_batch_size=32, log_every=4, warmup_steps=2),
                 **overrides})
  return config


def _check_png(path: pathlib.Path, min_size=(300, 200)):
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == "PNG"
    assert image.size[0] >= min_size[0] and image.size[1] >= min_size[1], (path.name, image.size)
    # Not a blank canvas: a figure with axes, text and data has many distinct colours.
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20) or ()) > 20


def _cli(*args, cwd=REPO_ROOT, env=None):
  return subprocess.run([sys.executable, "-m", "experiments.mnist", *args], cwd=cwd, capture_output=True,
                        text=True, timeout=300, env={**os.environ, **(env or {})})


def test_default_config_is_valid_and_points_at_the_shipped_data():
  config = mnist.get_config()
  mnist.check_config(config)
  assert config.model == "mnist_fast_cnn"
  assert (pathlib.Path(config.data_dir) / "mnist" / "train-images-idx3-ubyte.gz").is_file()
  assert pathlib.Path(config.data_dir) == _runner.SHIPPED_DATA


def test_default_model_is_registered_with_its_documented_shape():
  import jax
  import jax.numpy as jnp

  from jaxcnn import models, summary

  assert "mnist_fast_cnn" in models.names()
  model = models.get("mnist_fast_cnn", num_classes=10)
  table = summary(model, (28, 28, 1), print_fn=None)
  assert table.trainable_params == 188_522 and table.output_shape == (None, 10)
  shapes = [row.output_shape for row in table.rows if row.type in ("Conv2D", "MaxPool2D")]
  assert shapes == [(None, 26, 26, 32), (None, 13, 13, 32), (None, 11, 11, 64), (None, 9, 9, 64),
                    (None, 4, 4, 64)]
  variables = model.init(jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
  assert model.apply(variables, jnp.zeros((2, 28, 28, 1))).shape == (2, 10)


def test_tiny_run_writes_summary_history_figures_then_reevaluates(tiny_digits, tmp_path):
  # mnist_convnet compiles in a fraction of the default model's time; the default runs in the slow test.
  workdir = tmp_path / "run"
  summary = mnist.main(_config(tiny_digits, model="mnist_convnet"), workdir)
  saved = json.loads((workdir / "summary.json").read_text())
  assert SUMMARY_KEYS <= set(saved)
  assert saved["test_accuracy"] == pytest.approx(summary["test_accuracy"])
  assert (saved["dataset"], saved["model"], saved["epochs"]) == ("tiny_digits", "mnist_convnet", 1)
  # 320 train examples, 5% held out for validation (the data layer's fixed slice); 96 test examples.
  assert (saved["train_examples"], saved["validation_examples"], saved["test_examples"]) == (304, 16, 96)
  assert 0.0 <= saved["test_accuracy"] <= 1.0 and np.isfinite(saved["test_loss"])
  assert saved["images_per_second"] > 0 and 0 < saved["compile_seconds"] < saved["train_seconds"]
  assert saved["device_count"] >= 1 and saved["device_kind"]
  assert saved["reevaluated"] is False and saved["trained_epochs_this_run"] == 1
  history = json.loads((workdir / "history.json").read_text())
  assert history["epoch"] == [1] and {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history)
  assert saved["val_accuracy"] == pytest.approx(history["val_accuracy"][-1])
  assert list((workdir / "tb").iterdir()), "no TensorBoard events"
  assert (workdir / "checkpoints").is_dir()
  for name in FIGURES:
    _check_png(workdir / name)
  assert saved["figures"] == list(FIGURES)

  # Same workdir: the finished run is restored and re-evaluated, not retrained; same test result.
  again = mnist.main(_config(tiny_digits, model="mnist_convnet"), workdir)
  assert again["reevaluated"] is True and again["trained_epochs_this_run"] == 0
  assert again["test_accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-9)
  assert again["test_loss"] == pytest.approx(summary["test_loss"], rel=1e-5)
  assert again["images_per_second"] == pytest.approx(summary["images_per_second"])
  assert json.loads((workdir / "history.json").read_text())["epoch"] == [1]


@pytest.mark.slow
def test_default_config_reaches_99_3_percent(tmp_path):
  """The README command, as shipped: the full MNIST run (minutes on a laptop CPU)."""
  summary = mnist.main(mnist.get_config(), tmp_path / "run")
  assert summary["test_examples"] == 10000
  assert summary["test_accuracy"] >= 0.993
  for name in FIGURES:
    _check_png(tmp_path / "run" / name)


def test_cli_mnist_convnet_one_epoch(tiny_digits, tmp_path):
  workdir = tmp_path / "convnet"
  result = _cli(f"--workdir={workdir}", "--config.model=mnist_convnet", "--config.epochs=1",
                f"--config.dataset={tiny_digits['dataset']}", f"--config.data_dir={tiny_digits['data_dir']}",
                f"--config.tfds_data_dir={tiny_digits['tfds_data_dir']}", "--config.batch_size=32",
                "--config.eval_batch_size=32", "--config.log_every=3")
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert (summary["model"], summary["epochs"], summary["parameters"]) == ("mnist_convnet", 1, 34826)
  # The one-screen report: model table, per-epoch line, test accuracy, where the files are.
  for text in ("Total params: 34,826", "epoch 1: loss", "test accuracy:", f"files in {workdir}"):
    assert text in result.stdout
  for name in FIGURES:
    assert (workdir / name).is_file()


def test_cli_missing_data_exits_2_with_one_line_and_writes_nothing(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  workdir = tmp_path / "run"
  tfds_dir = tmp_path / "tfds"
  result = _cli(f"--workdir={workdir}", f"--config.data_dir={empty}", f"--config.tfds_data_dir={tfds_dir}",
                "--config.download=False", env={"JAXCNN_DATA_DIR": ""})
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: mnist: dataset not found"), lines[-1]
  assert "Traceback" not in result.stderr
  assert str(empty) in lines[-1]
  assert not workdir.exists() and not tfds_dir.exists()


@pytest.mark.parametrize("args, expected", [
    (("--config.no_such_key=1",), "unknown config key 'no_such_key'"),
    (("--config.epochs=two",), "--config.epochs=two"),
    (("stray",), "unexpected arguments: stray"),
])
def test_cli_bad_flags_exit_2_with_one_line(tmp_path, args, expected):
  result = _cli(f"--workdir={tmp_path / 'run'}", *args)
  assert result.returncode == 2, result.stderr[-2000:]
  assert result.stderr.strip().splitlines() == [result.stderr.strip().splitlines()[-1]]
  assert result.stderr.startswith("error: ") and expected in result.stderr
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value, message", [
    ("model", "no_such_model", "model='no_such_model'"),
    ("validation_split", 1.5, "validation_split=1.5"),
    ("train_examples", -1, "train_examples=-1"),
    ("normalize", "zscore", "normalize='zscore'"),
    ("learning_rate", -0.1, "learning_rate=-0.1"),
    ("optimizer", "lbfgs", "optimizer='lbfgs'"),
])
def test_bad_config_values_raise_config_error_before_writing(tmp_path, key, value, message):
  config = mnist.get_config()
  config[key] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    mnist.main(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_feature_map_index_must_fall_in_the_first_test_batch(tiny_digits, tmp_path):
  with pytest.raises(ConfigError, match="feature_map_index=32 must index the first test batch"):
    mnist.main(_config(tiny_digits, feature_map_index=32), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_a_reconstruction_model_is_refused(tmp_path):
  config = mnist.get_config()
  config.model = "conv_autoencoder"
  with pytest.raises(ConfigError, match="reconstruction model"):
    mnist.main(config, tmp_path / "run")


def test_compile_timer_counts_overlapping_intervals_once():
  timer = mnist.CompileTimer()
  # A trace nested inside another (1-3 within 0-4), one touching interval, one disjoint.
  timer.intervals = [(0.0, 4.0), (1.0, 3.0), (4.0, 5.0), (10.0, 10.5)]
  assert timer.seconds == pytest.approx(5.5)
  assert mnist.CompileTimer().seconds == 0.0


def test_compile_timer_sees_a_jit_compile():
  import jax
  import jax.numpy as jnp

  with mnist.CompileTimer() as timer:
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 17.0)(jnp.arange(7.0)).block_until_ready()
  assert timer.seconds > 0


def test_first_conv_kernel_follows_layer_order_not_name_order():
  params = {"conv2d_10": {"kernel": np.zeros((3, 3, 8, 8))}, "conv2d_2": {"kernel": np.zeros((3, 3, 4, 8))},
            "conv2d": {"kernel": np.ones((5, 5, 1, 4))}, "dense": {"kernel": np.zeros((4, 2))}}
  assert mnist._first_conv_kernel(params).shape == (5, 5, 1, 4)
  assert sorted(["conv2d_10", "conv2d_2", "conv2d_1"], key=mnist._layer_order) == ["conv2d_1", "conv2d_2",
                                                                                   "conv2d_10"]
  assert mnist._first_conv_kernel({"dense": {"kernel": np.zeros((4, 2))}}) is None
