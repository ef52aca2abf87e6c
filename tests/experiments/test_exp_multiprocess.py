"""`python -m experiments.mnist` as a 2-process job equals the same command in 1 process on 2 devices.

Both use the host-fed chunk program (a multi-process job reads every batch's rows on the hosts, each
process its own; `--config.train.feed=host` gives the single process the same feed), so the two runs
compute the same programs on the same batches: the final checkpoints are bitwise equal (their content
digests agree) and so are the test accuracies.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from _exp_tiny_idx import REPO_ROOT, tiny_digits  # noqa: F401  (fixture)

TIMEOUT_S = 600
COLLECTIVE_FLAGS = "--xla_cpu_collective_call_terminate_timeout_seconds=300 --xla_cpu_collective_timeout_seconds=300"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(workdir, tiny, tfds_dir) -> list[str]:
  # Each run prepares the raw files in its own tfds dir (the two processes of a job share theirs).
  return [sys.executable, "-m", "experiments.mnist", f"--workdir={workdir}", "--config.model=mnist_convnet",
          f"--config.data.dataset={tiny['dataset']}", f"--config.data.data_dir={tiny['data_dir']}",
          f"--config.data.tfds_data_dir={tfds_dir}", "--config.data.download=False",
          "--config.train.epochs=1", "--config.train.batch_size=32", "--config.train.validation_batch_size=32",
          "--config.eval_batch_size=32", "--config.train.log_every=3", "--config.train.warmup_steps=2",
          "--config.train.feed=host", "--config.train.heartbeat_timeout_s=30",
          "--config.train.distributed_init_timeout_s=300"]


def _env(devices: int, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {COLLECTIVE_FLAGS}", **extra)
  return env


def _final_digest(workdir) -> dict:
  digests = sorted((workdir / "checkpoint_digests").glob("*.json"), key=lambda p: int(p.stem))
  return json.loads(digests[-1].read_text())


def test_two_process_command_equals_one_process_on_two_devices(tiny_digits, tmp_path):  # noqa: F811
  port = _free_port()
  two, one = tmp_path / "two", tmp_path / "one"
  procs = [subprocess.Popen(_command(two, tiny_digits, tmp_path / "tfds_two"), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            env=_env(1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                     JAX_PROCESS_ID=str(pid)))
           for pid in range(2)]
  procs.append(subprocess.Popen(_command(one, tiny_digits, tmp_path / "tfds_one"), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=_env(2)))
  deadline = time.monotonic() + TIMEOUT_S
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=max(deadline - time.monotonic(), 1))[0])
  except subprocess.TimeoutExpired:
    pytest.fail(f"the runs exceeded {TIMEOUT_S} s")
  finally:
    for proc in procs:
      proc.kill()
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
  multi, single = (json.loads((w / "summary.json").read_text()) for w in (two, one))
  assert (multi["device"]["process_count"], multi["device"]["device_count"]) == (2, 2)
  assert (single["device"]["process_count"], single["device"]["device_count"]) == (1, 2)
  assert multi["data"] == single["data"] and multi["data"]["train_examples"] == 304
  assert multi["results"]["test_accuracy"] == single["results"]["test_accuracy"]
  assert multi["results"]["test_loss"] == single["results"]["test_loss"]
  # bitwise: params, batch_stats, optimizer state, rng and data position of the final checkpoint
  assert _final_digest(two) == _final_digest(one)
  assert json.loads((two / "history.json").read_text()) == json.loads((one / "history.json").read_text())
  # process 0 alone reports and writes figures and the summary; process 1 prints nothing
  assert "test accuracy:" in outputs[0] and "test accuracy:" not in outputs[1]
  assert (two / "feature_maps.png").is_file()
