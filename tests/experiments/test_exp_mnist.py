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

from experiments import _common, _runner, mnist
from jaxcnn.errors import ConfigError

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SHIPPED_MNIST_DIR = REPO_ROOT / "experiments" / "data" / "mnist"
SECTIONS = {"schema", "experiment", "results", "data", "run", "timing", "device", "figures", "config", "finished_at"}
FIGURES = ("history.png", "confusion_matrix.png", "filters.png", "feature_maps.png")


def set_path(config, path: str, value) -> None:
  """config["a.b"] = value for a dotted path."""
  *parents, leaf = path.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked():
    node[leaf] = value


def _config(tiny, **overrides):
  config = mnist.get_config()
  config.data.update(tiny)
  config.train.update(dict(epochs=1, batch_size=32, validation_batch_size=32, log_every=4, warmup_steps=2))
  config.eval_batch_size = 32
  for path, value in overrides.items():
    set_path(config, path.replace("__", "."), value)
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
  from jaxcnn.train import DEFAULTS
  config = mnist.get_config()
  mnist.check_config(config)
  assert config.model == "mnist_fast_cnn"
  assert (pathlib.Path(config.data.data_dir) / "mnist" / "train-images-idx3-ubyte.gz").is_file()
  assert pathlib.Path(config.data.data_dir) == _runner.SHIPPED_DATA
  assert set(config.train) == set(DEFAULTS)  # fit's whole config, passed unchanged


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
  # Shapes only: traced, not compiled (run op by op, the init alone compiles dozens of programs).
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 28, 28, 1)))
  assert jax.eval_shape(model.apply, variables, jnp.zeros((2, 28, 28, 1))).shape == (2, 10)


def test_tiny_run_writes_summary_history_figures_then_reevaluates(tiny_digits, tmp_path):
  # mnist_convnet compiles in a fraction of the default model's time; the default runs in the slow test.
  workdir = tmp_path / "run"
  summary = mnist.main(_config(tiny_digits, model="mnist_convnet"), workdir)
  saved = json.loads((workdir / "summary.json").read_text())
  assert set(saved) == SECTIONS and saved["schema"] == _common.SUMMARY_SCHEMA
  assert saved["experiment"] == "mnist" and saved["config"]["model"] == "mnist_convnet"
  results, data, run, timing = saved["results"], saved["data"], saved["run"], saved["timing"]
  assert results["test_accuracy"] == pytest.approx(summary["results"]["test_accuracy"])
  assert run["epochs"] == 1 and run["reevaluated"] is False and run["trained_epochs_this_run"] == 1
  # 320 training images, the last 5% (16) held out for validation as Keras does; 96 test images.
  assert (data["train_examples"], data["validation_examples"], data["test_examples"]) == (304, 16, 96)
  assert 0.0 <= results["test_accuracy"] <= 1.0 and np.isfinite(results["test_loss"])
  assert timing["images_per_second"] > 0 and 0 < timing["compile_seconds"] < timing["train_seconds"]
  assert saved["device"]["device_count"] >= 1 and saved["device"]["device_kind"]
  history = json.loads((workdir / "history.json").read_text())
  assert history["epoch"] == [1] and {"loss", "accuracy", "val_loss", "val_accuracy"} <= set(history)
  assert results["val_accuracy"] == pytest.approx(history["val_accuracy"][-1])
  assert list((workdir / "tb").iterdir()), "no TensorBoard events"
  assert (workdir / "checkpoints").is_dir()
  for name in FIGURES:
    _check_png(workdir / name)
  assert saved["figures"] == list(FIGURES)
  _check_readme_snippet_loads_the_model_and_predicts_a_png(workdir, tmp_path)

  # Same workdir: the finished run is restored and re-evaluated, not retrained; same test result.
  again = mnist.main(_config(tiny_digits, model="mnist_convnet"), workdir)
  assert again["run"]["reevaluated"] is True and again["run"]["trained_epochs_this_run"] == 0
  assert again["results"]["test_accuracy"] == pytest.approx(results["test_accuracy"], abs=1e-9)
  assert again["results"]["test_loss"] == pytest.approx(results["test_loss"], rel=1e-5)
  assert again["timing"]["images_per_second"] == pytest.approx(timing["images_per_second"])
  assert json.loads((workdir / "history.json").read_text())["epoch"] == [1]


def _check_readme_snippet_loads_the_model_and_predicts_a_png(workdir, tmp_path):
  """README's snippet, run as written on a dark-on-white PNG of a test digit, with the run's model/."""
  import contextlib
  import io

  from _exp_tiny_idx import _read_idx

  from jaxcnn import train
  readme = (REPO_ROOT / "README.md").read_text()
  blocks = [b.split("```", 1)[0] for b in readme.split("```python\n")[1:]]
  (snippet,) = [b for b in blocks if 'train.load("runs/mnist/NAME/model")' in b]
  digit = _read_idx(SHIPPED_MNIST_DIR / "t10k-images-idx3-ubyte.gz", 3)[0]
  png = tmp_path / "digit.png"
  Image.fromarray(255 - digit).save(png)                  # as a user draws it: dark ink on white
  code = snippet.replace("runs/mnist/NAME/model", str(workdir / "model")).replace("digit.png", str(png))
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    exec(compile(code, "README.md", "exec"), {})
  expected = int(train.load(workdir / "model").predict(digit[None]).argmax())
  assert printed.getvalue() == f"digit: {expected}\n"


@pytest.mark.slow
def test_default_config_reaches_99_3_percent(tmp_path):
  """The README command, as shipped: the full MNIST run (minutes on a laptop CPU)."""
  summary = mnist.main(mnist.get_config(), tmp_path / "run")
  assert summary["data"]["test_examples"] == 10000
  assert summary["results"]["test_accuracy"] >= 0.993
  for name in FIGURES:
    _check_png(tmp_path / "run" / name)


def test_cli_mnist_convnet_one_epoch(tiny_digits, tmp_path):
  workdir = tmp_path / "convnet"
  result = _cli(f"--workdir={workdir}", "--config.model=mnist_convnet", "--config.train.epochs=1",
                f"--config.data.dataset={tiny_digits['dataset']}", f"--config.data.data_dir={tiny_digits['data_dir']}",
                f"--config.data.tfds_data_dir={tiny_digits['tfds_data_dir']}", "--config.train.batch_size=32",
                "--config.train.validation_batch_size=32", "--config.eval_batch_size=32",
                "--config.train.log_every=4", "--config.train.weight_decay=1e-4")
  assert result.returncode == 0, result.stderr[-2000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert (summary["results"]["model"], summary["run"]["epochs"], summary["results"]["parameters"]) == (
      "mnist_convnet", 1, 34826)
  assert summary["config"]["train"]["weight_decay"] == 1e-4
  # The one-screen report: model table, per-epoch line, test accuracy, where the files are.
  for text in ("Total params: 34,826", "epoch 1/1 loss=", "test accuracy:", f"files in {workdir}"):
    assert text in result.stdout
  for name in FIGURES:
    assert (workdir / name).is_file()


# Extended tier: the command's exit 2 with one line and nothing written on bad or missing data files is
# checked in the default run by test_rel_data (every fault, the missing file included), the message by
# test_data_resolve.
@pytest.mark.extended
def test_cli_missing_data_exits_2_with_one_line_and_writes_nothing(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  workdir = tmp_path / "run"
  tfds_dir = tmp_path / "tfds"
  result = _cli(f"--workdir={workdir}", f"--config.data.data_dir={empty}",
                f"--config.data.tfds_data_dir={tfds_dir}", "--config.data.download=False",
                env={"JAXCNN_DATA_DIR": ""})
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: mnist: dataset not found"), lines[-1]
  assert "Traceback" not in result.stderr
  assert str(empty) in lines[-1]
  assert not workdir.exists() and not tfds_dir.exists()


@pytest.mark.parametrize("args, expected", [
    (("--config.no_such_key=1",), "unknown config key 'no_such_key'"),
    (("--config.train.epochs=two",), "--config.train.epochs=two"),
    (("--config.train.no_such_key=1",), "unknown config key 'no_such_key' in train"),
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
    ("train.validation_split", 1.5, "validation_split=1.5"),
    ("train.validation_split", 0.0, "train.validation_split=0.0"),
    ("data.train_examples", -1, "data.train_examples=-1"),
    ("train.normalize", "zscore", "normalize='zscore'"),
    ("train.learning_rate", -0.1, "learning_rate=-0.1"),
    ("train.optimizer", "lbfgs", "optimizer='lbfgs'"),
])
def test_bad_config_values_raise_config_error_before_writing(tmp_path, key, value, message):
  config = mnist.get_config()
  set_path(config, key, value)
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
  timer = _common.CompileTimer()
  # A trace nested inside another (1-3 within 0-4), one touching interval, one disjoint.
  timer.intervals = [(0.0, 4.0), (1.0, 3.0), (4.0, 5.0), (10.0, 10.5)]
  assert timer.seconds == pytest.approx(5.5)
  assert _common.CompileTimer().seconds == 0.0


def test_compile_timer_sees_a_jit_compile():
  import jax
  import jax.numpy as jnp

  with _common.CompileTimer() as timer:
    jax.jit(lambda x: jnp.sin(x) * 3.0 + 17.0)(jnp.arange(7.0)).block_until_ready()
  assert timer.seconds > 0


def test_first_conv_kernel_follows_layer_order_not_name_order():
  params = {"conv2d_10": {"kernel": np.zeros((3, 3, 8, 8))}, "conv2d_2": {"kernel": np.zeros((3, 3, 4, 8))},
            "conv2d": {"kernel": np.ones((5, 5, 1, 4))}, "dense": {"kernel": np.zeros((4, 2))}}
  assert _common.first_conv_kernel(params).shape == (5, 5, 1, 4)
  assert sorted(["conv2d_10", "conv2d_2", "conv2d_1"], key=_common.layer_order) == ["conv2d_1", "conv2d_2",
                                                                                   "conv2d_10"]
  assert _common.first_conv_kernel({"dense": {"kernel": np.zeros((4, 2))}}) is None
