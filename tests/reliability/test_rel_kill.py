"""SIGKILL campaign: a run killed at random moments (checkpoint writes included) and resumed each time with
the same command ends bitwise equal to an uninterrupted run: params, batch_stats, optimizer state, rng,
data position, and the metrics (history.json, metrics.csv).

The default run kills a few times; the full campaign (20 kills) is marked slow (JAXCNN_SLOW_TESTS=1).
"""
from __future__ import annotations

import json
import pathlib
import random
import re
import signal
import sys
import time

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _rel_common import RUN_CONFIG, Worker, assert_bitwise, saved_leaves  # noqa: E402
from _train_models import make_data, make_model  # noqa: E402

from jaxcnn import train  # noqa: E402

START_TIMEOUT_S = 240   # a worker's start (imports, restore, compile) on a loaded 2-core machine
RUN_TIMEOUT_S = 300     # a whole worker run


def _reference(tmp_path_factory, epochs: int):
  """The uninterrupted run of the same config, in this process (the 4 devices of tests/conftest.py)."""
  workdir = tmp_path_factory.mktemp(f"uninterrupted{epochs}")
  data = make_data()
  result = train.fit(make_model(), data[0], config={**RUN_CONFIG, "epochs": epochs}, workdir=workdir,
                     val_data=data[1])
  return saved_leaves(result.state), result.history, (workdir / "metrics.csv").read_text()


def _step_of(line: str) -> int | None:
  match = re.match(r"step (\d+)/\d+ ", line)
  return int(match.group(1)) if match else None


def _temporaries(checkpoints: pathlib.Path) -> set[str]:
  """Orbax's uncommitted temporary step directories (one exists while a step is being written)."""
  try:
    return {p.name for p in checkpoints.iterdir() if "tmp" in p.name}
  except FileNotFoundError:
    return set()


def _kill_once(worker: Worker, workdir: pathlib.Path, mode: str, rng: random.Random, total: int) -> dict:
  """Kills `worker` at a moment chosen by `mode`; returns what happened. The process must not finish first.

  "write": when a new temporary directory of an Orbax checkpoint appears, 0-2 steps after the resumed
    step (the kill lands mid-write).
  "step": after the report of a step 1-6 steps ahead of the resumed one, plus 0-300 ms (mid-chunk,
    mid-save or mid-epoch-end, wherever that falls).
  "startup": 0-2 s after the process started (imports, restoring the checkpoint, compiling).
  """
  resumed = None  # unknown when the kill lands before the resume is reported
  checkpoints = workdir / "checkpoints"
  stale = _temporaries(checkpoints)  # left by earlier kills
  if mode == "startup":
    time.sleep(rng.uniform(0.0, 2.0))
  else:
    ready = worker.wait_for(lambda l: l == "READY", START_TIMEOUT_S)
    assert ready, f"worker did not start training:\n{worker.output}"
    match = re.search(r"resuming at step (\d+)", worker.output)
    resumed = int(match.group(1)) if match else 0
    if resumed >= total - 2:
      return {"mode": mode, "killed": False, "resumed": resumed}
    if mode == "write":
      target = resumed + rng.randint(0, 2)
      if target > resumed:
        worker.wait_for(lambda l: (_step_of(l) or 0) >= target, RUN_TIMEOUT_S)
      deadline = time.monotonic() + RUN_TIMEOUT_S
      while (not _temporaries(checkpoints) - stale and worker.proc.poll() is None
             and time.monotonic() < deadline):
        worker.new_lines()
        time.sleep(0.001)
    else:
      target = min(resumed + rng.randint(1, 6), total - 2)
      worker.wait_for(lambda l: (_step_of(l) or 0) >= target, RUN_TIMEOUT_S)
      time.sleep(rng.uniform(0.0, 0.3))
  mid_write = bool(_temporaries(checkpoints) - stale)
  alive = worker.proc.poll() is None
  worker.kill()
  rc = worker.finish(30)
  return {"mode": mode, "killed": alive and rc == -signal.SIGKILL, "resumed": resumed, "mid_write": mid_write,
          "rc": rc}


def _campaign(tmp_path: pathlib.Path, reference, *, epochs: int, kills: int, seed: int) -> list[dict]:
  """Kills the same command `kills` times, then lets it finish and compares it with `reference`."""
  rng = random.Random(seed)
  workdir, out = tmp_path / "run", tmp_path / "out"
  config = {**RUN_CONFIG, "epochs": epochs}
  total = epochs * 4
  # The first kill always lands mid-write; the others anywhere (weighted towards training).
  modes = ["write"] + rng.choices(["write", "step", "startup"], weights=[3, 5, 2], k=kills - 1)
  events = []
  for mode in modes:
    worker = Worker(out, workdir, config)
    try:
      event = _kill_once(worker, workdir, mode, rng, total)
    finally:
      worker.kill()
    assert event.get("rc", -signal.SIGKILL) == -signal.SIGKILL, f"{event}\n{worker.output}"
    assert "Traceback" not in worker.output, worker.output
    events.append(event)
  final = Worker(out, workdir, config)
  rc = final.finish(RUN_TIMEOUT_S)
  assert rc == 0 and "DONE" in final.output, final.output
  expected_state, expected_history, expected_csv = reference
  with np.load(out / "state.npz") as saved:
    assert_bitwise(dict(saved), expected_state)
  assert json.loads((out / "history.json").read_text()) == expected_history
  assert json.loads((workdir / "history.json").read_text()) == expected_history
  assert (workdir / "metrics.csv").read_text() == expected_csv
  # The workdir's newest checkpoint is the finished state: a re-run restores it and trains nothing.
  checkpointer = train.Checkpointer(workdir)
  try:
    restored = checkpointer.restore_latest(train.create_train_state(make_model(), (8, 8, 1), config))
  finally:
    checkpointer.close()
  assert_bitwise(saved_leaves(restored), expected_state)
  return events


@pytest.fixture(scope="module")
def reference3(tmp_path_factory):
  return _reference(tmp_path_factory, epochs=3)


def test_kill_campaign_few_kills_resumes_bitwise(tmp_path, reference3):
  events = _campaign(tmp_path, reference3, epochs=3, kills=3, seed=1)
  print("kill campaign:", json.dumps(events))
  killed = [e for e in events if e["killed"]]
  assert len(killed) >= 2, events
  assert any(e["mid_write"] for e in killed), f"no kill landed during a checkpoint write: {events}"


@pytest.mark.slow
def test_kill_campaign_twenty_kills_resumes_bitwise(tmp_path, tmp_path_factory):
  reference = _reference(tmp_path_factory, epochs=12)
  events = _campaign(tmp_path, reference, epochs=12, kills=20, seed=20)
  killed = [e for e in events if e["killed"]]
  print("kill campaign:", json.dumps(events))
  assert len(killed) >= 18, events
  assert sum(e["mid_write"] for e in killed) >= 3, events
