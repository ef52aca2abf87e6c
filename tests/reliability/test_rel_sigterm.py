"""SIGTERM (preemption) and Ctrl-C (SIGINT) through the real command: `python -m experiments.mnist`
checkpoints, exits (0 for SIGTERM, 130 for Ctrl-C) within a bounded time, and the same command resumes
from that checkpoint; a second Ctrl-C stops at once, and the run still resumes bitwise."""
from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _rel_common import RUN_CONFIG, assert_bitwise, mnist_cli, saved_leaves, write_tiny_mnist  # noqa: E402
from _train_models import make_data, make_model  # noqa: E402

from jaxcnn import train  # noqa: E402
from jaxcnn.errors import Interrupted  # noqa: E402

EXIT_BOUND_S = 60  # SIGTERM -> exit: the rest of one 3-step chunk and one checkpoint, on a loaded machine


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return write_tiny_mnist(tmp_path_factory.mktemp("digits"))


def _signal_at(proc, prefix: str, signum) -> tuple[str, float]:
  """Reads the command's output until a line starting with `prefix`, sends `signum`, waits for the exit:
  (all output, seconds from the signal to the exit)."""
  lines = []
  try:
    deadline = time.monotonic() + 480
    while time.monotonic() < deadline:
      line = proc.stdout.readline()
      if not line:
        break
      lines.append(line)
      if line.startswith(prefix):
        break
    assert any(l.startswith(prefix) for l in lines), "".join(lines)
    proc.send_signal(signum)
    signalled = time.monotonic()
    rest, _ = proc.communicate(timeout=EXIT_BOUND_S * 4)
    elapsed = time.monotonic() - signalled
  finally:
    proc.kill()
  return "".join(lines) + rest, elapsed


def test_sigterm_checkpoints_exits_0_and_the_same_command_resumes(digits, tmp_path):
  workdir = tmp_path / "run"
  command = ("--config.train.epochs=3",)
  proc = mnist_cli(workdir, digits, *command, popen=True)
  output, elapsed = _signal_at(proc, "epoch 1/3 loss=", signal.SIGTERM)  # mid-run: epoch 2 of 3 is starting
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


# -- Ctrl-C (SIGINT) -----------------------------------------------------------------------------------

class _CtrlC(train.Callback):
  """Presses Ctrl-C `times` times (SIGINT to this process) at the end of the first epoch."""

  def __init__(self, times: int):
    self.times = times

  def on_epoch_end(self, epoch, logs, state):
    if epoch == 0:
      for _ in range(self.times):
        os.kill(os.getpid(), signal.SIGINT)


@pytest.fixture
def sigint_default():
  """Ctrl-C raising KeyboardInterrupt, as in a terminal (a background job inherits it ignored)."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  yield previous
  signal.signal(signal.SIGINT, previous)


def test_ctrl_c_checkpoints_and_a_second_stops_at_once_and_both_resume_bitwise(tmp_path, sigint_default):
  config = {**RUN_CONFIG, "progress": "none", "epochs": 2}
  data = make_data()[0]
  expected = train.fit(make_model(), data, config=config, workdir=tmp_path / "reference")

  once = tmp_path / "once"
  with pytest.raises(Interrupted) as caught:
    train.fit(make_model(), data, config=config, workdir=once, callbacks=[_CtrlC(1)])
  message = str(caught.value)
  assert caught.value.exit_code == 130 and "\n" not in message
  assert re.fullmatch(rf"SIGINT: checkpoint step 4 saved in {re.escape(str(once))}; re-run to resume", message)
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after fit
  checkpointer = train.Checkpointer(once)
  try:
    assert checkpointer.steps()[-1] == 4
  finally:
    checkpointer.close()

  twice = tmp_path / "twice"
  with pytest.raises(KeyboardInterrupt):  # at once: no checkpoint of the current step
    train.fit(make_model(), data, config=config, workdir=twice, callbacks=[_CtrlC(2)])
  assert not (twice / "summary.json").exists()
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

  for workdir in (once, twice):
    resumed = train.fit(make_model(), data, config=config, workdir=workdir)
    assert_bitwise(saved_leaves(resumed.state), saved_leaves(expected.state))
    assert resumed.history == expected.history


def test_ctrl_c_through_the_command_checkpoints_and_exits_130_with_a_resume_hint(digits, tmp_path):
  workdir = tmp_path / "run"
  # Ctrl-C as in a terminal (a command started from a background job inherits SIGINT ignored).
  proc = mnist_cli(workdir, digits, "--config.train.epochs=2", popen=True,
                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  output, elapsed = _signal_at(proc, "step 3/", signal.SIGINT)  # training, in epoch 1 of 2
  assert proc.returncode == 130, output[-3000:]
  assert elapsed < EXIT_BOUND_S, f"took {elapsed:.1f} s to stop"
  assert "Traceback" not in output and "error: SIGINT" not in output
  assert "Ctrl-C again stops at once" in output
  match = re.search(r"SIGINT: checkpoint step (\d+) saved in (\S+); re-run to resume", output)
  assert match and 3 <= int(match.group(1)) < 18, output[-3000:]
  assert (workdir / "checkpoints" / match.group(1)).is_dir()
  assert not (workdir / "summary.json").exists()
