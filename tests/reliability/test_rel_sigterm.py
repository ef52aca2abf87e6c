"""SIGTERM (preemption) through the real command: `python -m experiments.mnist` checkpoints, exits 0 within a
bounded time, and the same command resumes from that checkpoint."""
from __future__ import annotations

import json
import pathlib
import re
import signal
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _rel_common import mnist_cli, write_tiny_mnist  # noqa: E402

from jaxcnn import train  # noqa: E402

EXIT_BOUND_S = 60  # SIGTERM -> exit: the rest of one 3-step chunk and one checkpoint, on a loaded machine


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return write_tiny_mnist(tmp_path_factory.mktemp("digits"))


def test_sigterm_checkpoints_exits_0_and_the_same_command_resumes(digits, tmp_path):
  workdir = tmp_path / "run"
  command = ("--config.train.epochs=3",)
  proc = mnist_cli(workdir, digits, *command, popen=True)
  lines = []
  try:
    deadline = time.monotonic() + 480
    while time.monotonic() < deadline:
      line = proc.stdout.readline()
      if not line:
        break
      lines.append(line)
      if line.startswith("epoch 1/3 loss="):  # mid-run: epoch 2 of 3 is starting
        break
    assert any(l.startswith("epoch 1/3 loss=") for l in lines), "".join(lines)
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    rest, _ = proc.communicate(timeout=EXIT_BOUND_S * 4)
    elapsed = time.monotonic() - signalled
  finally:
    proc.kill()
  output = "".join(lines) + rest
  assert proc.returncode == 0, output[-3000:]
  assert elapsed < EXIT_BOUND_S, f"took {elapsed:.1f} s to stop"
  assert "Traceback" not in output
  match = re.search(r"SIGTERM: checkpoint step (\d+) saved in (\S+); re-run to resume", output)
  assert match, output[-3000:]
  assert not re.search(r"error: SIGTERM", output), "a clean preemption is not reported as an error"
  step = int(match.group(1))
  assert 9 <= step < 27  # where it stopped (9 steps per epoch): after epoch 1, before the end of the run
  assert (workdir / "checkpoints" / str(step)).is_dir()
  assert (workdir / "checkpoint_digests" / f"{step}.json").is_file()
  assert not (workdir / "summary.json").exists()  # a stopped run claims no result
  history_before = json.loads((workdir / "history.json").read_text())
  assert history_before["epoch"] == [1]

  again = mnist_cli(workdir, digits, *command)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resuming at step {step}" in again.stdout
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["run"]["epochs"] == 3 and summary["run"]["resumed_from_epoch"] == 1
  history = json.loads((workdir / "history.json").read_text())
  assert history["epoch"] == [1, 2, 3]
  assert {k: v[:1] for k, v in history.items()} == history_before
  checkpointer = train.Checkpointer(workdir)
  try:
    assert checkpointer.steps()[-1] == 27
  finally:
    checkpointer.close()
