"""Losses, optimizers by name, schedules, freezing and config validation (no training loop)."""
from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _train_models import make_model  # noqa: E402
from helpers import assert_close  # noqa: E402

from jaxcnn import train  # noqa: E402
from jaxcnn.errors import ConfigError  # noqa: E402


def test_softmax_cross_entropy_by_hand():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
  labels = jnp.array([0, 2])
  expected = [-np.log(np.exp(2) / (np.exp(2) + 1 + np.exp(-1))), np.log(3.0)]
  assert_close(train.softmax_cross_entropy(logits, labels), expected)
  assert_close(train.softmax_cross_entropy(logits, jax.nn.one_hot(labels, 3)), expected)
  with pytest.raises(ValueError, match=r"softmax_cross_entropy: labels shape \(2, 4\)"):
    train.softmax_cross_entropy(logits, jnp.zeros((2, 4)))


def test_sigmoid_and_mse_by_hand():
  logits = jnp.array([[0.0], [3.0]])
  labels = jnp.array([1, 0])
  assert_close(train.sigmoid_binary_cross_entropy(logits, labels),
               [np.log(2.0), np.log1p(np.exp(3.0))])
  outputs = jnp.arange(8.0).reshape(2, 2, 2)
  assert_close(train.mse(outputs, jnp.zeros((2, 2, 2))), [(0 + 1 + 4 + 9) / 4, (16 + 25 + 36 + 49) / 4])
  with pytest.raises(ValueError, match=r"mse: targets shape \(2, 3\) does not match outputs shape \(2, 2, 2\)"):
    train.mse(outputs, jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match="unknown loss 'hinge'"):
    train.get_loss("hinge")


def test_mse_steps_report_no_accuracy():
  model = make_model(dropout=0.0)
  state = train.create_train_state(model, (8, 8, 1), dict(loss="mse"))
  train_step, _ = train.make_steps(model, loss="mse")
  batch = {"image": jnp.ones((4, 8, 8, 1)), "label": jnp.zeros((4, 3)), "mask": jnp.array([1.0, 1.0, 1.0, 0.0])}
  _, metrics = jax.jit(train_step)(state, batch)
  assert float(metrics["count"]) == 3.0 and float(metrics["correct_sum"]) == 0.0
  assert set(train.step.summarize(metrics, with_accuracy=False)) == {"loss"}


def _config(**kw):
  return train.validate_config(kw)


@pytest.mark.parametrize("name, kw, reference", [
    ("adam", {}, optax.adam(0.1)),
    ("sgd", dict(momentum=0.9, nesterov=True), optax.sgd(0.1, momentum=0.9, nesterov=True)),
    ("rmsprop", dict(momentum=0.5), optax.rmsprop(0.1, decay=0.9, momentum=0.5)),
    ("adadelta", {}, optax.adadelta(0.1, rho=0.9)),
])
def test_optimizers_by_name_match_optax(name, kw, reference):
  tx = train.make_optimizer(_config(optimizer=name, learning_rate=0.1, **kw))
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grad = {"w": jnp.array([0.5, 0.25, -1.0])}
  s, r = tx.init(params), reference.init(params)
  for _ in range(3):
    u, s = tx.update(grad, s, params)
    v, r = reference.update(grad, r, params)
    assert_close(u["w"], v["w"])


def test_weight_decay_and_clipping():
  params = {"w": jnp.array([1.0, 1.0])}
  zero = {"w": jnp.zeros(2)}
  tx = train.make_optimizer(_config(optimizer="sgd", learning_rate=0.1, weight_decay=0.5))
  u, _ = tx.update(zero, tx.init(params), params)
  assert_close(u["w"], [-0.05, -0.05])  # L2: the gradient gains 0.5 * w
  tx = train.make_optimizer(_config(optimizer="sgd", learning_rate=1.0, clip_norm=1.0))
  u, _ = tx.update({"w": jnp.array([3.0, 4.0])}, tx.init(params), params)
  assert_close(u["w"], [-0.6, -0.8])


@pytest.mark.parametrize("kw, points", [
    (dict(schedule="constant"), {0: 1.0, 50: 1.0}),
    (dict(schedule="cosine"), {0: 1.0, 50: 0.5, 100: 0.0}),
    (dict(schedule="warmup_cosine", warmup_steps=10), {0: 0.0, 5: 0.5, 10: 1.0, 100: 0.0}),
    (dict(schedule="exponential", decay_rate=0.1), {0: 1.0, 50: 0.1 ** 0.5, 100: 0.1}),
    (dict(schedule="piecewise", boundaries=(10, 20), scales=(0.5, 0.1)), {5: 1.0, 15: 0.5, 25: 0.05}),
])
def test_schedules(kw, points):
  schedule = train.make_schedule(_config(learning_rate=1.0, **kw), total_steps=100)
  for step, value in points.items():
    assert float(schedule(step)) == pytest.approx(value, abs=1e-6), step


def test_freeze_by_path_mask():
  model = make_model(dropout=0.0)
  config = dict(freeze=("conv2d/.*", "batch_norm/scale"), learning_rate=0.1)
  state = train.create_train_state(model, (8, 8, 1), config)
  train_step, _ = train.make_steps(model)
  batch = {"image": jnp.linspace(0, 1, 4 * 64).reshape(4, 8, 8, 1), "label": jnp.array([0, 1, 2, 0]),
           "mask": jnp.ones(4)}
  new, _ = jax.jit(train_step)(state, batch)
  changed = {p: not np.array_equal(a, b) for p, a, b in zip(
      train.param_paths(state.params), jax.tree.leaves(state.params), jax.tree.leaves(new.params))}
  assert changed == {"batch_norm/bias": True, "batch_norm/scale": False, "conv2d/kernel": False,
                     "dense/bias": True, "dense/kernel": True}
  with pytest.raises(ConfigError, match=r"freeze pattern is not a valid regex"):
    train.create_train_state(model, (8, 8, 1), dict(freeze=("conv2d/[",)))


def test_validate_config_lists_every_problem():
  with pytest.raises(ConfigError) as info:
    train.validate_config(dict(epochs=-1, momentum=1.5, nesterov="yes", boundaries=(5, 3), scales=(1.0,)))
  message = str(info.value)
  for part in ("epochs=-1", "momentum=1.5", "nesterov='yes'", "boundaries=(5, 3)", "scales=(1.0,)"):
    assert part in message
  assert train.validate_config(None).optimizer == "adam"
  with pytest.raises(ConfigError, match=r"learning_rate=nan"):
    train.validate_config(dict(learning_rate=float("nan")))
  with pytest.raises(ValueError, match=r"input_shape \(0, 8, 1\)"):
    train.create_train_state(make_model(), (0, 8, 1), {})


def test_maybe_initialize_distributed(monkeypatch):
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(key, raising=False)
  assert train.maybe_initialize_distributed() is False
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
  with pytest.raises(ConfigError, match="JAX_NUM_PROCESSES, JAX_PROCESS_ID missing"):
    train.maybe_initialize_distributed()
  monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("JAX_PROCESS_ID", "two")
  with pytest.raises(ConfigError, match="must be integers"):
    train.maybe_initialize_distributed()
  monkeypatch.setenv("JAX_PROCESS_ID", "2")
  with pytest.raises(ConfigError, match=r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)"):
    train.maybe_initialize_distributed()


def test_progress_logs_one_line_per_report_and_can_be_silenced(capsys):
  progress = train.Progress("log", total_steps=8)
  progress.report(4, 0, 2, {"loss": 0.5, "accuracy": 0.25})
  progress.close()
  quiet = train.Progress("none", total_steps=8)
  quiet.report(8, 1, 2, {"loss": 0.25})
  quiet.close()
  lines = capsys.readouterr().out.splitlines()
  assert lines == ["step 4/8 epoch 1/2 loss=0.5000 accuracy=0.2500"]
  # Non-interactive runs (pytest captures stderr) get log lines, not a bar.
  assert train.Progress("auto", total_steps=1).mode == "log"
