"""Two processes on this machine (CPU collectives, localhost coordinator) train as one job."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _train_models import make_data, make_model  # noqa: E402

from jaxcnn import train  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
WORKER = HERE / "_fit_worker.py"
REPO = HERE.parents[1]
TIMEOUT_S = 240


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_pair(tmp_path, *extra):
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(
        [sys.executable, str(WORKER), str(tmp_path / f"out{pid}"), "--devices", "2", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  return procs


def _finish(procs, timeout):
  """(returncode, output) of each process; both are killed if either outlives the timeout."""
  deadline = time.monotonic() + timeout
  results = []
  try:
    for proc in procs:
      out, _ = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
      results.append((proc.returncode, out))
  except subprocess.TimeoutExpired:
    for proc in procs:
      proc.kill()
    pytest.fail(f"multi-process run exceeded {timeout} s")
  return results


# Extended tier: test_exp_multiprocess runs the same through the experiment command (two processes equal
# one process on as many devices, bitwise; process 0 alone reports and writes the run's files).
@pytest.mark.extended
def test_two_processes_equal_one_process(tmp_path):
  train_data, val_data = make_data()
  procs = _start_pair(tmp_path, "--workdir", str(tmp_path / "run"), "--epochs", "2")
  # The same training in this process: one process, 4 devices, the same global batches.
  config = dict(log_every=2, learning_rate=0.01, seed=0, checkpoint_every_steps=2, epochs=2, progress="none")
  single = train.fit(make_model(), train_data, config=config, val_data=val_data)
  results = _finish(procs, TIMEOUT_S)
  for rc, out in results:
    assert rc == 0 and "DONE" in out, out
  saved = np.load(tmp_path / "out0" / "params.npz")
  leaves = jax.tree_util.tree_flatten_with_path({"params": single.state.params,
                                                 "batch_stats": single.state.batch_stats})[0]
  assert sorted(saved.files) == sorted(jax.tree_util.keystr(p) for p, _ in leaves)
  for path, leaf in leaves:
    np.testing.assert_allclose(saved[jax.tree_util.keystr(path)], np.asarray(leaf), rtol=1e-5, atol=2e-6)
  history = json.loads((tmp_path / "out0" / "history.json").read_text())
  for key in ("loss", "val_loss"):
    np.testing.assert_allclose(history[key], single.history[key], rtol=1e-5)
  assert history["accuracy"] == single.history["accuracy"]
  # Only process 0 reports and writes the run's files; the checkpoint was written by both together.
  assert not (tmp_path / "out1" / "params.npz").exists()
  assert "step 8/8" in results[0][1] and "step 8/8" not in results[1][1]
  assert (tmp_path / "run" / "checkpoints" / "8").is_dir()
  assert (tmp_path / "run" / "checkpoint_digests" / "8.json").is_file()


def test_dead_peer_gives_clear_error_in_bounded_time(tmp_path):
  procs = _start_pair(tmp_path, "--epochs", "50", "--sleep", "0.5", "--heartbeat", "3")
  try:
    # Wait until both are training (process 1 finished an epoch), then kill process 1.
    deadline = time.monotonic() + TIMEOUT_S
    line = ""
    while "epoch 1 done" not in line:
      line = procs[1].stdout.readline()
      if not line and procs[1].poll() is not None or time.monotonic() > deadline:
        pytest.fail("process 1 did not start training")
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    out, _ = procs[0].communicate(timeout=90)
    elapsed = time.monotonic() - killed_at
  finally:
    for proc in procs:
      proc.kill()
  assert procs[0].returncode == 4, out
  assert "ERROR 4: multi-process:" in out
  assert elapsed < 60
