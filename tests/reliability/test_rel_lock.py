"""One run per workdir: a second run (a command, a fit call, a job) on a busy workdir is refused at once
with one line naming the holder and changes nothing; a killed holder never blocks the resume; the
processes of one job share its lock and a second job is refused whichever of its processes starts first.
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import pathlib
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _rel_common import HERE, clean_env, mnist_cli, write_tiny_mnist  # noqa: E402
from _train_models import make_data, make_model  # noqa: E402

from jaxcnn import train  # noqa: E402
from jaxcnn.errors import WorkdirBusyError  # noqa: E402
from jaxcnn.storage import NO_LOCKING  # noqa: E402

HOLD = HERE / "_rel_hold_lock.py"
START_TIMEOUT_S = 240
HOLDER = r"pid (\d+) on host (\S+) since (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ)"
CONFIG = dict(log_every=2, learning_rate=0.01, seed=0, checkpoint_every_steps=2, progress="none")


def snapshot(root: pathlib.Path) -> dict:
  """{relative path: (size, mtime_ns, sha256)} of every file under root, directories as None."""
  found = {}
  for path in sorted(root.rglob("*")):
    rel = str(path.relative_to(root))
    if path.is_dir():
      found[rel] = None
    else:
      stat = path.stat()
      found[rel] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
  return found


class Holder:
  """A `_rel_hold_lock.py` process; `wait()` returns once it printed HELD (or ended)."""

  def __init__(self, workdir, *args, env=None):
    self.proc = subprocess.Popen([sys.executable, str(HOLD), str(workdir), *args], env=env or clean_env(),
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    self.lines: list[str] = []

  def wait(self, timeout: float = START_TIMEOUT_S) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      line = self.proc.stdout.readline()
      if not line:
        break
      self.lines.append(line.rstrip("\n"))
      if line.startswith(("HELD", "ERROR")):
        return line.strip()
    return "\n".join(self.lines)

  def finish(self, timeout: float = 120) -> tuple[int, str]:
    try:
      rest, _ = self.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      rest, _ = self.proc.communicate()
    return self.proc.returncode, "\n".join(self.lines) + (rest or "")

  def kill(self):
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


def test_fit_on_a_busy_workdir_is_refused_naming_the_holder_changes_nothing_and_a_killed_holder_never_blocks(
    tmp_path):
  workdir = tmp_path / "run"
  data = make_data()
  train.fit(make_model(), data[0], config={**CONFIG, "epochs": 1}, workdir=workdir)  # a run to continue
  assert (workdir / ".lock").read_text() == ""  # a clean release names no holder
  holder = Holder(workdir)
  try:
    assert holder.wait() == "HELD", holder.lines
    info = json.loads((workdir / ".lock").read_text())
    assert info["pid"] == holder.proc.pid and info["host"] == socket.gethostname()
    before = snapshot(workdir)
    with pytest.raises(WorkdirBusyError) as caught:
      train.fit(make_model(), data[0], config={**CONFIG, "epochs": 2}, workdir=workdir)
    message = str(caught.value)
    assert caught.value.exit_code == 2 and len(message.splitlines()) == 1, message
    match = re.search(f"workdir {re.escape(str(workdir))} is in use by another run: {HOLDER}", message)
    assert match and int(match.group(1)) == holder.proc.pid and match.group(2) == socket.gethostname(), message
    assert "_rel_hold_lock.py" in message  # the holder's command
    assert snapshot(workdir) == before  # nothing written, not even the lock file
  finally:
    holder.kill()  # SIGKILL: the kernel releases its flock
  assert holder.proc.returncode == -signal.SIGKILL
  resumed = train.fit(make_model(), data[0], config={**CONFIG, "epochs": 2}, workdir=workdir)
  assert resumed.history["epoch"] == [1, 2] and resumed.trained_steps == 4


def _lock_refusal(output: str, workdir: pathlib.Path) -> re.Match | None:
  return re.search(f"^error: workdir {re.escape(str(workdir))} is in use by another run: {HOLDER} "
                   r"\(python -m experiments\.mnist .*\); wait for it to end", output, re.M)


def test_second_command_on_a_busy_workdir_is_refused_started_together_or_during_training(tmp_path):
  """Two commands started together: one wins and finishes with its result, the other is refused (exit 2,
  one line naming the winner, no traceback). Then a third started while the winner is training (the
  winner is held stopped meanwhile, so anything that changes in the workdir was the third's doing)."""
  digits = write_tiny_mnist(tmp_path / "digits")
  workdir = tmp_path / "run"
  command = ("--config.train.epochs=2",)
  procs = [mnist_cli(workdir, digits, *command, popen=True) for _ in range(2)]
  try:
    outputs = {}
    # The loser stops right after the imports; the winner trains on.
    deadline = time.monotonic() + START_TIMEOUT_S
    while len(outputs) < 1 and time.monotonic() < deadline:
      for proc in procs:
        if proc.poll() is not None and proc not in outputs:
          outputs[proc] = proc.stdout.read()
      time.sleep(0.05)
    assert len(outputs) == 1, "neither command was refused"
    (loser, loser_output), = outputs.items()
    winner = procs[1 - procs.index(loser)]
    assert loser.returncode == 2, loser_output
    assert "Traceback" not in loser_output
    match = _lock_refusal(loser_output, workdir)
    assert match and int(match.group(1)) == winner.pid, loser_output

    # Third command while the winner is training.
    lines = []
    while True:
      line = winner.stdout.readline()
      assert line, "".join(lines)
      lines.append(line)
      if line.startswith("step 3/"):
        break
    winner.send_signal(signal.SIGSTOP)
    try:
      before = snapshot(workdir)
      started = time.monotonic()
      third = mnist_cli(workdir, digits, *command)
      refused_after = time.monotonic() - started
    finally:
      winner.send_signal(signal.SIGCONT)
    assert third.returncode == 2, third.stderr
    assert third.stderr.strip().count("\n") == 0 and "Traceback" not in third.stderr, third.stderr
    match = _lock_refusal(third.stderr, workdir)
    assert match and int(match.group(1)) == winner.pid, third.stderr
    assert "Total params" not in third.stdout  # refused before the data or the model were looked at
    assert snapshot(workdir) == before
    print(f"refused after {refused_after:.1f} s")

    rest, _ = winner.communicate(timeout=START_TIMEOUT_S * 2)
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
  output = "".join(lines) + rest
  assert winner.returncode == 0 and "Traceback" not in output, output[-3000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["run"]["epochs"] == 2 and summary["run"]["resumed_from_epoch"] == 0
  assert json.loads((workdir / "history.json").read_text())["epoch"] == [1, 2]
  assert (workdir / ".lock").read_text() == ""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _job(workdirs, order=(0, 1), delay: float = 0.0) -> list[Holder]:
  """A 2-process job of lock holders (process i on workdirs[i]), started in `order`, `delay` s apart."""
  port = _free_port()
  holders = {}
  for position, index in enumerate(order):
    if position:
      time.sleep(delay)
    env = clean_env(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index))
    holders[index] = Holder(workdirs[index], env=env)
  return [holders[0], holders[1]]


def test_multi_process_job_shares_the_lock_and_a_second_job_is_refused_whichever_process_starts_first(tmp_path):
  workdir = tmp_path / "run"
  first = _job([workdir, workdir])
  others = []
  try:
    assert [h.wait() for h in first] == ["HELD", "HELD"], [h.lines for h in first]
    job_lock = json.loads((workdir / ".lock").read_text())
    process_lock = json.loads((workdir / ".lock.process-1").read_text())
    assert job_lock["pid"] == first[0].proc.pid and process_lock["pid"] == first[1].proc.pid
    assert process_lock["job"] == job_lock["job"] and process_lock["process"] == 1
    before = snapshot(workdir)

    # A second job, its process 1 started first: refused whole, each process naming the first job's holder.
    second = _job([workdir, workdir], order=(1, 0), delay=2.0)
    others += second
    for holder in second:
      code, output = holder.finish()
      assert code == 2, output
      match = re.search(f"ERROR 2: workdir {re.escape(str(workdir))} is in use by another run: {HOLDER}", output)
      assert match and int(match.group(1)) == first[0].proc.pid, output
      assert "Traceback" not in output
    assert snapshot(workdir) == before

    # The first job killed, but a process of it living on (its heartbeat has not timed out yet).
    for holder in first:
      holder.kill()
    stray = Holder(workdir, "--file", ".lock.process-1")
    others.append(stray)
    assert stray.wait() == "HELD"
    third = _job([workdir, workdir])
    others += third
    for holder in third:
      code, output = holder.finish()
      assert code == 2, output
      match = re.search(rf"in use by another run: process 1 of a job: pid (\d+) .*lock file \S+\.lock\.process-1\)",
                        output)
      assert match and int(match.group(1)) == stray.proc.pid, output
    stray.kill()

    # Every holder killed: the next job takes the lock.
    fourth = _job([workdir, workdir])
    others += fourth
    assert [h.wait() for h in fourth] == ["HELD", "HELD"], [h.lines for h in fourth]
  finally:
    for holder in first + others:
      holder.kill()


@pytest.mark.slow
def test_processes_of_a_job_that_do_not_share_the_workdir_are_refused(tmp_path):
  job = _job([tmp_path / "host0" / "run", tmp_path / "host1" / "run"])
  try:
    results = [holder.finish(180) for holder in job]
  finally:
    for holder in job:
      holder.kill()
  for code, output in results:
    assert code == 2, output
    assert re.search(r"ERROR 2: multi-process: process 1 does not see the workdir lock "
                     r"\S+ that process 0 of its job took: the workdir must be one directory every process shares",
                     output), output


def _flock_failing_with(errno_value):
  """fcntl.flock as on a filesystem that answers every lock request with `errno_value`."""
  def flock(fd, operation):
    raise OSError(errno_value, os.strerror(errno_value))
  return flock


@pytest.mark.parametrize("errno_value", sorted(NO_LOCKING), ids=lambda e: errno.errorcode[e])
def test_a_filesystem_that_cannot_lock_warns_and_runs_unprotected(tmp_path, monkeypatch, caplog, errno_value):
  # NFS without a lock daemon, some FUSE mounts: the workdir lock and the dataset preparation lock each say
  # once that nothing protects against a second run, and the work goes on.
  from jaxcnn.data import builder as data_builder
  from jaxcnn.train import workdir as workdir_lib

  monkeypatch.setattr(workdir_lib.fcntl, "flock", _flock_failing_with(errno_value))
  monkeypatch.setattr(data_builder.fcntl, "flock", _flock_failing_with(errno_value))
  workdir = tmp_path / "run"
  with pytest.warns(UserWarning, match=r"this filesystem cannot lock files .*the workdir is not protected against "
                                       r"a second run using it at the same time"):
    with workdir_lib.workdir_lock(workdir):
      (workdir / "ran").write_text("yes")
  assert (workdir / "ran").read_text() == "yes"

  class Config:
    dataset = "tiny_digits"

  class Builder:
    data_dir = tmp_path / "tfds" / "jaxcnn_raw" / "tiny_digits_0123" / "1.1.0"
    builder_config = Config()

  ran = []
  with caplog.at_level(logging.WARNING, logger="jaxcnn.data"):
    with data_builder.preparing_lock(Builder()):
      ran.append(True)
  assert ran == [True]
  assert "this filesystem cannot lock files" in caplog.text
  assert "preparing without protection against another process preparing the same dataset" in caplog.text


def test_any_other_lock_error_is_raised_not_taken_for_a_filesystem_without_locks(tmp_path, monkeypatch):
  from jaxcnn.data import builder as data_builder
  from jaxcnn.train import workdir as workdir_lib

  monkeypatch.setattr(workdir_lib.fcntl, "flock", _flock_failing_with(errno.EBADF))
  monkeypatch.setattr(data_builder.fcntl, "flock", _flock_failing_with(errno.EBADF))
  with pytest.raises(OSError) as raised:
    with workdir_lib.workdir_lock(tmp_path / "run"):
      pytest.fail("the body ran without the lock")
  assert raised.value.errno == errno.EBADF
  assert not (tmp_path / "run").exists()  # a refused run leaves nothing it created

  class Builder:
    data_dir = tmp_path / "tfds" / "jaxcnn_raw" / "tiny_digits_0123" / "1.1.0"

  with pytest.raises(OSError) as raised:
    with data_builder.preparing_lock(Builder()):
      pytest.fail("the body ran without the lock")
  assert raised.value.errno == errno.EBADF
