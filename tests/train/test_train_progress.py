"""Progress output: a bar on a terminal, plain stdout lines elsewhere (pipes, Jupyter, pytest), and a
root logger that jaxcnn.train neither uses nor configures."""
from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import textwrap

import pytest

from jaxcnn import train
from jaxcnn.train import callbacks

EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) loss=\d+\.\d{4} accuracy=\d+\.\d{4} val_loss=\d+\.\d{4} "
                        r"val_accuracy=\d+\.\d{4} lr=0\.01 \(\d+\.\d s\)")


def test_log_mode_writes_report_and_epoch_lines_to_stdout(capsys):
  root_handlers = list(logging.getLogger().handlers)
  progress = train.Progress("log", total_steps=6)
  progress.report(3, 0, 2, {"loss": 1.25, "accuracy": 0.5})
  progress.end_epoch(0, 2, {"epoch": 1, "loss": 1.0, "accuracy": 0.5, "val_loss": 2.0, "val_accuracy": 0.25,
                            "lr": 0.01}, seconds=12.34)
  progress.end_epoch(1, 2, {"epoch": 2, "loss": 0.5})  # seconds measured: since the previous epoch end
  progress.close()
  captured = capsys.readouterr()
  lines = captured.out.splitlines()
  assert lines[:2] == ["step 3/6 epoch 1/2 loss=1.2500 accuracy=0.5000",
                       "epoch 1/2 loss=1.0000 accuracy=0.5000 val_loss=2.0000 val_accuracy=0.2500 lr=0.01 (12.3 s)"]
  assert re.fullmatch(r"epoch 2/2 loss=0\.5000 \(\d+\.\d s\)", lines[2]) and len(lines) == 3
  assert captured.err == "" and "\x1b[" not in captured.out
  # Its own handler: the root logger (pytest's capture handlers included) is neither used nor changed.
  assert logging.getLogger("jaxcnn.progress").propagate is False
  assert logging.getLogger().handlers == root_handlers


def test_other_modes_and_processes(capsys, monkeypatch):
  quiet = train.Progress("none", total_steps=4)
  quiet.report(2, 0, 1, {"loss": 1.0})
  quiet.end_epoch(0, 1, {"loss": 1.0})
  assert capsys.readouterr() == ("", "")
  # A terminal gets a tqdm bar (on stderr); the epoch line is written above it, to stdout.
  bar = train.Progress("bar", total_steps=4)
  bar.report(2, 0, 1, {"loss": 1.0})
  bar.end_epoch(0, 1, {"loss": 1.0}, seconds=1.0)
  bar.close()
  captured = capsys.readouterr()
  assert "epoch 1/1 loss=1.0000 (1.0 s)" in captured.out and "2/4" in captured.err

  class Terminal(io.StringIO):
    def isatty(self):
      return True

  monkeypatch.setattr(sys, "stderr", Terminal())
  assert train.Progress("auto", total_steps=1).mode == "bar"
  monkeypatch.setattr(callbacks.jax, "process_index", lambda: 1)
  assert train.Progress("auto", total_steps=1).mode == "none"  # process 0 only
  with pytest.raises(ValueError, match=r"Progress: mode='loud' must be"):
    train.Progress("loud", total_steps=1)


_PIPE_SCRIPT = textwrap.dedent("""
    import logging, sys, tempfile
    import numpy as np
    before = list(logging.getLogger().handlers)
    from jaxcnn import layers, train
    assert logging.getLogger().handlers == before == [], f"import: {logging.getLogger().handlers}"
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (48, 4, 4, 1), dtype=np.uint8), rng.integers(0, 3, 48)
    model = layers.Sequential([layers.Flatten(), layers.Dense(3)])
    with tempfile.TemporaryDirectory() as workdir:  # checkpoints: orbax logs through absl
      train.fit(model, (images, labels), workdir=workdir, config=dict(
          epochs=2, batch_size=8, log_every=2, validation_split=0.25, learning_rate=0.01))
    assert logging.getLogger().handlers == [], f"fit: {logging.getLogger().handlers}"
    logging.basicConfig(level=logging.INFO)  # still takes effect
    assert logging.getLogger().level == logging.INFO and len(logging.getLogger().handlers) == 1
    print("done", flush=True)
""")


def test_fit_through_a_pipe_prints_plain_lines_and_leaves_the_root_logger_alone(tmp_path):
  """Stdout is a pipe (as in Jupyter or `| tee`): the lines are there, without escape codes; importing
  jaxcnn.train and fitting with checkpoints add no root handler, so basicConfig still works."""
  env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)}
  result = subprocess.run([sys.executable, "-c", _PIPE_SCRIPT], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert lines[-1] == "done"
  # 36 training images / batch 8 = 4 steps per epoch, a report every 2 steps.
  steps = [line for line in lines if line.startswith("step ")]
  assert [line.split(" loss")[0] for line in steps] == [
      "step 2/8 epoch 1/2", "step 4/8 epoch 1/2", "step 6/8 epoch 2/2", "step 8/8 epoch 2/2"]
  epochs = [line for line in lines if line.startswith("epoch ")]
  assert [EPOCH_LINE.fullmatch(line).group(1, 2) for line in epochs] == [("1", "2"), ("2", "2")], epochs
  assert "\x1b[" not in result.stdout and "\x1b[" not in result.stderr and "\r" not in result.stdout
