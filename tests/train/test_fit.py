"""fit: history and files, callbacks, guards, and checkpoints that resume exactly (also after SIGKILL/SIGTERM)."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _train_models import make_arrays, make_data, make_model  # noqa: E402

from jaxcnn import train  # noqa: E402
from jaxcnn.errors import ConfigError, NonFiniteError  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "_fit_worker.py"
REPO = HERE.parents[1]
# Must equal _fit_worker.CONFIG (with its default arguments) for the bitwise comparisons.
CONFIG = dict(log_every=2, learning_rate=0.01, seed=0, async_checkpointing=True, progress="log",
              checkpoint_every_steps=2, epochs=3, heartbeat_timeout_s=5, distributed_init_timeout_s=30)


@pytest.fixture(scope="module")
def data():
  return make_data()


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
  """The reference: 3 epochs (12 steps) without interruption, with checkpoints."""
  workdir = tmp_path_factory.mktemp("straight")
  train.TRACE_COUNTS.clear()
  result = train.fit(make_model(), data[0], config=CONFIG, workdir=workdir, val_data=data[1])
  return result, workdir, dict(train.TRACE_COUNTS)


def _flat(state) -> dict:
  leaves = jax.tree_util.tree_flatten_with_path({"params": state.params, "batch_stats": state.batch_stats})[0]
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _assert_bitwise(flat_a: dict, flat_b: dict):
  assert flat_a.keys() == flat_b.keys()
  for key in flat_a:
    assert np.array_equal(flat_a[key], flat_b[key]), f"{key} differs"


def test_fit_learns_writes_files_and_compiles_once(straight):
  result, workdir, traces = straight
  history = result.history
  assert history["epoch"] == [1, 2, 3]
  assert set(history) == {"epoch", "loss", "accuracy", "lr", "val_loss", "val_accuracy"}
  assert history["loss"][-1] < history["loss"][0]
  assert all(0.0 <= a <= 1.0 for a in history["val_accuracy"])
  assert int(result.state.step) == 12 and int(result.state.epoch) == 3
  # One chunk program, one rollover and one eval program for the whole run: no per-epoch recompiles.
  assert traces == {"train_chunk": 1, "next_epoch": 1, "eval_chunk": 1}
  assert json.loads((workdir / "history.json").read_text()) == history
  rows = (workdir / "metrics.csv").read_text().strip().splitlines()
  assert rows[0].split(",") == list(history) and len(rows) == 4
  assert list((workdir / "tb").glob("events.out.tfevents.*"))
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps == [8, 10, 12]  # keep 3; every 2 steps and at epoch ends
  assert sorted(int(p.stem) for p in (workdir / "checkpoint_digests").glob("*.json")) == steps


# Extended tier: resuming at an epoch end is also checked bitwise in the default run (test_rel_sigterm's
# Ctrl-C stop at step 4, and every write site of test_rel_storage, resume there).
@pytest.mark.extended
def test_resume_at_epoch_boundary_is_bitwise(straight, data, tmp_path):
  workdir = tmp_path / "run"
  first = train.fit(make_model(), data[0], config={**CONFIG, "epochs": 1}, workdir=workdir, val_data=data[1])
  assert first.history["epoch"] == [1]
  resumed = train.fit(make_model(), data[0], config=CONFIG, workdir=workdir, val_data=data[1])
  _assert_bitwise(_flat(resumed.state), _flat(straight[0].state))
  assert resumed.history == straight[0].history


def test_run_on_four_devices_continues_on_one(straight, data, tmp_path):
  """A finished 4-device run's workdir resumes under parallel="none" for one more epoch."""
  import shutil
  workdir = tmp_path / "run"
  shutil.copytree(straight[1], workdir)
  more = train.fit(make_model(), data[0], config={**CONFIG, "epochs": 4, "parallel": "none"}, workdir=workdir,
                   val_data=data[1])
  assert more.history["epoch"] == [1, 2, 3, 4]
  assert more.history["loss"][:3] == straight[0].history["loss"]
  assert int(more.state.step) == 16
  assert more.state.params["dense"]["kernel"].sharding.device_set == {jax.devices()[0]}


def _start_worker(out, workdir, *extra):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  return subprocess.Popen([sys.executable, str(WORKER), str(out), "--workdir", str(workdir), *extra],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_digest(workdir: pathlib.Path, proc, min_step: int, timeout: float = 120.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    digests = workdir / "checkpoint_digests"
    if digests.is_dir() and any(int(p.stem) >= min_step for p in digests.glob("*.json") if p.stem.isdigit()):
      return
    if proc.poll() is not None:
      pytest.fail(f"worker ended early (rc {proc.returncode}): {proc.stdout.read()}")
    time.sleep(0.05)
  proc.kill()
  pytest.fail("worker wrote no checkpoint in time")


# Extended tier: the default run kills and resumes bitwise in test_rel_kill (also mid checkpoint write),
# and stops on a signal and resumes bitwise in test_rel_sigterm (SIGINT in fit, SIGTERM through the
# command; both are Preempted, through the same stop path).
@pytest.mark.extended
@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_resume_after_kill_or_preemption_is_bitwise(straight, data, tmp_path, how):
  workdir = tmp_path / "run"
  # The worker pauses 2 s after each epoch, so the signal lands in the middle of the run.
  proc = _start_worker(tmp_path / "out", workdir, "--sleep", "2")
  try:
    _wait_for_digest(workdir, proc, min_step=2)
    proc.send_signal(signal.SIGKILL if how == "sigkill" else signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
  finally:
    proc.kill()
  if how == "sigterm":
    assert proc.returncode == 0, output
    assert "ERROR 0: SIGTERM: checkpoint step" in output
  else:
    assert proc.returncode == -signal.SIGKILL
  assert "DONE" not in output
  resumed = train.fit(make_model(), data[0], config=CONFIG, workdir=workdir, val_data=data[1])
  _assert_bitwise(_flat(resumed.state), _flat(straight[0].state))
  assert resumed.history == straight[0].history


def test_nonfinite_loss_names_step_and_keeps_last_good_checkpoint(data, tmp_path):
  workdir = tmp_path / "run"
  config = {**CONFIG, "optimizer": "sgd", "learning_rate": 1e30, "log_every": 1, "checkpoint_every_steps": 1}
  with pytest.raises(NonFiniteError, match=r"loss became (nan|inf) at step (\d+) \(epoch 1\); "
                                           r"last good checkpoint: (step \d+|none)") as info:
    train.fit(make_model(), data[0], config=config, workdir=workdir)
  assert info.value.exit_code == 3
  import re
  bad = int(re.search(r"at step (\d+)", str(info.value)).group(1))
  checkpointer = train.Checkpointer(workdir)
  try:
    steps = checkpointer.steps()
    assert all(s < bad for s in steps)
    last = re.search(r"last good checkpoint: step (\d+)", str(info.value))
    assert (int(last.group(1)) if last else None) == (steps[-1] if steps else None)
    if steps:
      state = checkpointer.restore_latest(train.create_train_state(make_model(), (8, 8, 1), config))
      assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  finally:
    checkpointer.close()


def test_early_stopping_and_restore_best(data):
  logs = [{"val_loss": v} for v in (1.0, 0.8, 0.9, 0.85, 0.7)]
  stopper = train.EarlyStopping(monitor="val_loss", patience=1)
  stopped_after = None
  for epoch, log in enumerate(logs):
    stopper.on_epoch_end(epoch, log, None)
    if stopper.stop_training:
      stopped_after = epoch
      break
  assert stopped_after == 3 and stopper.best == 0.8 and stopper.best_epoch == 1
  # In fit: accuracy "max" mode, patience 0, with best weights restored.
  stopper = train.EarlyStopping(monitor="loss", mode="max", patience=0, restore_best=True)
  result = train.fit(make_model(), data[0], config=dict(epochs=4, log_every=2, learning_rate=0.01,
                                                        progress="none"), callbacks=[stopper])
  assert len(result.history["loss"]) == 2  # the loss fell in epoch 2: no "improvement" in max mode
  # Restored weights are those after epoch 1, not the final ones.
  one = train.fit(make_model(), data[0], config=dict(epochs=1, log_every=2, learning_rate=0.01, progress="none"))
  _assert_bitwise(_flat(result.state), _flat(one.state))
  with pytest.raises(ValueError, match="patience"):
    train.EarlyStopping(patience=-1)
  with pytest.raises(ValueError, match="monitor='val_auc' is not among"):
    train.EarlyStopping(monitor="val_auc").on_epoch_end(0, {"val_loss": 1.0}, None)


def test_tuple_data_with_validation_split():
  images, labels = make_arrays(80)
  result = train.fit(make_model(), (images, labels), config=dict(
      epochs=1, batch_size=16, validation_split=0.2, log_every=4, progress="none"))
  assert set(result.history) >= {"val_loss", "val_accuracy"}
  with pytest.raises(ConfigError, match="batch_size is required"):
    train.fit(make_model(), (images, labels), config=dict(epochs=1))


def test_tuple_validation_is_normalised_with_training_statistics():
  # The held-out slice must be standardised with the training split's mean/std, never its own: a
  # validation set shifted by +60 grey levels keeps that shift after normalisation.
  from jaxcnn.train import loop
  images, labels = make_arrays(80)
  images[-16:] = np.clip(images[-16:].astype(np.int32) + 60, 0, 255).astype(np.uint8)
  config = train.validate_config(dict(epochs=1, batch_size=16, validation_split=0.2))
  prepared = loop._prepare_data((images, labels), None, config)
  train_data, val_data = prepared.train, prepared.val
  for key in ("mean", "std"):
    np.testing.assert_array_equal(np.asarray(val_data.stats[key]), np.asarray(train_data.stats[key]))
  val_mean = float(np.mean(np.asarray(next(iter(val_data.batches(0)))["image"])))
  assert val_mean > 0.3, val_mean


def test_evaluate_counts_padded_batches_exactly(data):
  model = make_model()
  state = train.create_train_state(model, (8, 8, 1), {})
  val = data[1]
  assert val.num_examples % val.batch_size  # the last batch is padded
  got = train.evaluate(state, model, val)
  images = np.concatenate([np.asarray(b["image"])[np.asarray(b["mask"]) > 0] for b in val.batches(0)])
  labels = np.concatenate([np.asarray(b["label"])[np.asarray(b["mask"]) > 0] for b in val.batches(0)])
  logits = model.apply(state.variables(), images, train=False)
  expected = train.softmax_cross_entropy(logits, labels)
  assert got["loss"] == pytest.approx(float(np.mean(expected)), rel=1e-5)
  assert got["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == labels)))
  assert train.evaluate(state.variables(), model, val, parallel="none") == pytest.approx(got, rel=1e-5)


@pytest.mark.parametrize("config, message", [
    (dict(epochs=0), r"epochs=0 \(expected an integer >= 1\)"),
    (dict(optimizer="adamax"), r"optimizer='adamax' \(expected one of adam, sgd, rmsprop, adadelta\)"),
    (dict(learning_rate=-1.0), r"learning_rate=-1.0"),
    (dict(loss="hinge"), r"loss='hinge'"),
    (dict(parallel="tpu"), r"parallel='tpu'"),
    (dict(epochs=2, lr=0.1, batchsize=3), r"unknown keys batchsize, lr"),
    (dict(batch_size=32), r"batch_size=32 differs from train_data.batch_size=16"),
    (dict(freeze=("nope/.*",)), r"freeze pattern 'nope/\.\*' matches no parameter"),
    (dict(best_metric="val_accuracy"), r"best_metric='val_accuracy' needs val_data"),
])
def test_bad_config_raises_config_error(data, config, message):
  with pytest.raises(ConfigError, match=message) as info:
    train.fit(make_model(), data[0], config=config)
  assert info.value.exit_code == 2


def test_batch_size_must_divide_device_count():
  images, labels = make_arrays(40)
  with pytest.raises(ConfigError, match=r"batch_size=6 is not divisible by the 4 devices"):
    train.fit(make_model(), (images, labels), config=dict(batch_size=6))


def test_not_a_pipeline_is_rejected():
  with pytest.raises(ConfigError, match="train_data is not an InputPipeline"):
    train.fit(make_model(), [1, 2, 3], config={})


def _read_idx(path: pathlib.Path, count: int) -> np.ndarray:
  import gzip
  with gzip.open(path, "rb") as f:
    raw = f.read()
  ndim = raw[3]
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
  return data[:count]


@pytest.mark.slow  # ~30 s of CPU compiling a full-size model; the tiny models cover the engine by default
def test_registry_model_on_real_mnist(shared_datasets, tmp_path):
  """A registered BatchNorm + Dropout model trains on real MNIST digits through jaxcnn.data.from_arrays."""
  from jaxcnn import data as data_lib
  from jaxcnn import models
  images = _read_idx(shared_datasets / "mnist" / "t10k-images-idx3-ubyte.gz", 96)[..., None]
  labels = _read_idx(shared_datasets / "mnist" / "t10k-labels-idx1-ubyte.gz", 96).astype(np.int32)
  train_data = data_lib.from_arrays(images[:64], labels[:64], batch_size=32, seed=0, normalize="scale")
  val_data = data_lib.from_arrays(images[64:], labels[64:], batch_size=32, seed=0, shuffle=False,
                                  normalize="scale")
  model = models.get("mnist_bn_cnn")
  config = dict(epochs=2, log_every=2, learning_rate=1e-3, progress="none", best_metric="val_accuracy")
  result = train.fit(model, train_data, config=config, val_data=val_data, workdir=tmp_path)
  assert result.history["epoch"] == [1, 2]
  assert all(np.isfinite(result.history["loss"])) and all(np.isfinite(result.history["val_loss"]))
  assert result.history["loss"][1] < result.history["loss"][0]
  assert set(jax.tree.leaves(jax.tree.map(lambda x: x.shape[0] > 0, result.state.batch_stats))) == {True}
  assert train.evaluate(result.state, model, val_data)["loss"] == pytest.approx(result.history["val_loss"][-1],
                                                                              rel=1e-5)
  assert [p.name for p in (tmp_path / "best").iterdir() if p.name.isdigit()]  # best-by-metric kept
