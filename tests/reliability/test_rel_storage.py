"""A full disk or an unwritable workdir: every write site fails as one line naming the path and the OS error
(exit code 5), keeps the last committed checkpoint and every finished file as they were, leaves nothing
half-written, and the same call resumes bitwise once the write can succeed. Injected per write site in
process (jaxcnn.storage.inject_faults), and for real through the command on a tiny tmpfs.
"""
from __future__ import annotations

import asyncio
import errno
import gc
import hashlib
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _rel_common import REPO, RUN_CONFIG, assert_bitwise, clean_env, saved_leaves, write_tiny_mnist  # noqa: E402
from _train_models import make_data, make_model  # noqa: E402

from jaxcnn import storage, train  # noqa: E402
from jaxcnn.errors import StorageError  # noqa: E402

CONFIG = {**RUN_CONFIG, "progress": "none"}  # 4 steps per epoch, a checkpoint every 2 steps and at epoch ends
ENOSPC = os.strerror(errno.ENOSPC)


def snapshot(root: pathlib.Path) -> dict:
  """{relative path: sha256} of every file under root."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def full_disk_at(match):
  """A fault hook: ENOSPC for every write whose path satisfies `match` (a counter of the hits is kept)."""
  hits = []

  def hook(path: pathlib.Path):
    if match(path):
      hits.append(path)
      raise OSError(errno.ENOSPC, ENOSPC, str(path))

  hook.hits = hits
  return hook


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted 2-epoch run: its saved state and history."""
  result = train.fit(make_model(), make_data()[0], config={**CONFIG, "epochs": 2},
                     workdir=tmp_path_factory.mktemp("reference") / "run")
  return saved_leaves(result.state), result.history


@pytest.fixture(scope="module")
def first_epoch(tmp_path_factory):
  """A workdir after the 2-epoch run's first epoch (step 4 committed); each write-site test continues a copy."""
  workdir = tmp_path_factory.mktemp("first_epoch") / "run"
  train.fit(make_model(), make_data()[0], config={**CONFIG, "epochs": 1}, workdir=workdir)
  return workdir


# Each write site of a run, failing during its second epoch (steps 5-8; step 4 was committed by the first).
SITES = {
    "checkpoint": lambda w: lambda p: p == w / "checkpoints" / "6",
    "digest record": lambda w: lambda p: p == w / "checkpoint_digests" / "6.json",
    "history": lambda w: lambda p: p == w / "history.json",
    "metrics": lambda w: lambda p: p == w / "metrics.csv",
    "tensorboard": lambda w: lambda p: p == w / "tb",
}


@pytest.mark.parametrize("site", sorted(SITES))
def test_full_disk_at_each_write_site_is_one_line_keeps_the_committed_checkpoint_and_resumes_bitwise(
    tmp_path, reference, first_epoch, site):
  workdir = tmp_path / "run"
  data = make_data()[0]
  shutil.copytree(first_epoch, workdir, symlinks=True)
  committed = {p: h for p, h in snapshot(workdir).items() if p.startswith(("checkpoints/4/", "checkpoint_digests/4"))}
  assert committed
  finished = {name: (workdir / name).read_bytes() for name in ("history.json", "metrics.csv")}

  hook = full_disk_at(SITES[site](workdir))
  with storage.inject_faults(hook), pytest.raises(StorageError) as caught:
    train.fit(make_model(), data, config={**CONFIG, "epochs": 2}, workdir=workdir)
  assert hook.hits, "the write site was never reached"
  message = str(caught.value)
  assert caught.value.exit_code == 5 and "\n" not in message, message
  assert message.startswith(f"{hook.hits[0]}: {ENOSPC}; the disk is full"), message
  assert "the last committed checkpoint, step " in message and "is intact" in message, message

  after = snapshot(workdir)
  assert {p: after.get(p) for p in committed} == committed  # the committed checkpoint is untouched
  assert not [p for p in after if p.endswith(".tmp") or "orbax-checkpoint-tmp" in p]  # nothing half-written
  checkpoint_steps = {int(p.split("/")[1]) for p in after if p.startswith("checkpoints/")}
  digest_steps = {int(p.split("/")[1][:-5]) for p in after if p.startswith("checkpoint_digests/")}
  assert digest_steps == checkpoint_steps  # no record of a step that was never committed, and vice versa
  # No log lists an epoch beyond the last committed checkpoint (4 steps per epoch): the failure stops the run
  # at its next write, and the epochs trained meanwhile are not what the workdir resumes from.
  committed_epochs = max(checkpoint_steps) // 4
  assert len(json.loads((workdir / "history.json").read_text())["epoch"]) == committed_epochs
  assert len((workdir / "metrics.csv").read_text().splitlines()) == 1 + committed_epochs
  if site == "history":
    assert (workdir / "history.json").read_bytes() == finished["history.json"]  # the old file, whole
  if site == "metrics":
    assert (workdir / "metrics.csv").read_bytes() == finished["metrics.csv"]

  resumed = train.fit(make_model(), data, config={**CONFIG, "epochs": 2}, workdir=workdir)
  assert_bitwise(saved_leaves(resumed.state), reference[0])
  assert resumed.history == reference[1]
  assert json.loads((workdir / "history.json").read_text()) == reference[1]


def test_unwritable_workdir_is_refused_before_training(tmp_path):
  workdir = tmp_path / "run"
  trained = []

  class Spy(train.Callback):
    def on_train_begin(self, history):
      trained.append(True)

  hook = full_disk_at(lambda p: p == workdir)  # the workdir's creation and its writability probe
  with storage.inject_faults(hook), pytest.raises(StorageError) as caught:
    train.fit(make_model(), make_data()[0], config={**CONFIG, "epochs": 1}, workdir=workdir, callbacks=[Spy()])
  assert str(caught.value).startswith(f"{workdir}: {ENOSPC}") and caught.value.exit_code == 5
  assert not trained and not workdir.exists()

  # A file where the workdir should be: refused, and left as it was.
  blocked = tmp_path / "blocked"
  blocked.write_text("x")
  with pytest.raises(StorageError, match="not a directory") as caught:
    train.fit(make_model(), make_data()[0], config={**CONFIG, "epochs": 1}, workdir=blocked, callbacks=[Spy()])
  assert caught.value.exit_code == 5 and not trained and blocked.read_text() == "x"


def test_atomic_files_figures_and_summary_on_a_full_disk_keep_the_old_file_whole(tmp_path, monkeypatch):
  """write_atomic (digest records, history), save_figure (figures) and the command's write_json (summary):
  the disk filling up while the new content is flushed leaves the old file, no temporary, and one line."""
  import matplotlib.figure

  from experiments import _runner
  from jaxcnn.inspect.plots import save_figure

  paths = {"text": tmp_path / "history.json", "figure": tmp_path / "figs" / "history.png",
           "summary": tmp_path / "summary.json"}
  for path in paths.values():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"the finished file")

  def no_space(fd):
    raise OSError(errno.ENOSPC, ENOSPC)

  monkeypatch.setattr(os, "fsync", no_space)
  writes = {"text": lambda p: storage.write_atomic(p, "new"),
            "figure": lambda p: save_figure(matplotlib.figure.Figure(figsize=(1, 1)), p),
            "summary": lambda p: _runner.write_json(p, {"new": 1})}
  for kind, path in paths.items():
    with pytest.raises(StorageError) as caught:
      writes[kind](path)
    assert str(caught.value).startswith(f"{path}: {ENOSPC}; the disk is full"), (kind, str(caught.value))
    assert "\n" not in str(caught.value) and caught.value.exit_code == 5
    assert path.read_bytes() == b"the finished file", kind
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")], kind


def _abandoned_failed_task(filename: str, message: str) -> None:
  """Runs a task of a coroutine defined in `filename` that raises ValueError(message), never retrieves its
  exception, and collects it: asyncio then reports "Task exception was never retrieved"."""
  namespace = {"message": message}
  exec(compile("async def write_fragment():\n  raise ValueError(message)\n", filename, "exec"), namespace)
  loop = asyncio.new_event_loop()
  try:
    task = loop.create_task(namespace["write_fragment"]())
    loop.run_until_complete(asyncio.wait([task]))
    del task
    gc.collect()
  finally:
    loop.close()


def test_abandoned_orbax_tasks_of_a_failed_write_are_not_reported_but_other_task_errors_are(caplog):
  """A full disk during an async save leaves Orbax's failed tasks unawaited; asyncio reporting them when they
  are collected (at any time, exit included) put tracebacks around the one-line error. Only Orbax's tasks
  failing for storage are dropped: another module's task, or an Orbax task failing otherwise, is reported."""
  storage.quiet_orbax_storage_noise()
  orbax_file = "/site-packages/orbax/checkpoint/_src/serialization/serialization.py"
  full = ("RESOURCE_EXHAUSTED: Error writing \"x/0.0\" in OCDBT database at local file \"/w/9/\": "
          f"Failed to write 217175 bytes to file 6: {ENOSPC} [os_error_code='28']")
  cases = {"orbax, disk full": (orbax_file, full, False),
           "other module, disk full": ("/site-packages/somelib/io.py", full, True),
           "orbax, another error": (orbax_file, "INVALID_ARGUMENT: shape mismatch", True)}
  for case, (filename, message, reported) in cases.items():
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
      _abandoned_failed_task(filename, message)
    records = [r for r in caplog.records if r.name == "asyncio"]
    assert len(records) == int(reported), (case, [r.getMessage() for r in records])
    if reported:
      assert records[0].getMessage().startswith("Task exception was never retrieved"), case


# -- for real: the command on a tiny tmpfs ---------------------------------------------------------------

def _mount_namespace() -> list[str] | None:
  """The unshare prefix that gives a process its own mount namespace (root, or an unprivileged user
  namespace), or None where neither is allowed."""
  if shutil.which("unshare") is None:
    return None
  for prefix in (["unshare", "-m"], ["unshare", "-rm"]):
    try:
      probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt && umount /mnt"],
                             capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
      continue
    if probe.returncode == 0:
      return prefix
  return None


def test_command_on_a_tiny_tmpfs_says_the_disk_is_full_in_one_line_and_resumes_once_it_grows(tmp_path):
  """The workdir on a 600 KiB tmpfs (smaller than one checkpoint): exit 5, one line naming the path and the
  full disk; the tmpfs remounted read-only: refused before the data is loaded; grown: the same command
  resumes and exits 0 with its result."""
  prefix = _mount_namespace()
  if prefix is None:
    pytest.skip("no mount namespace (unshare -m / -rm) for a private tmpfs")
  digits = write_tiny_mnist(tmp_path / "digits")
  mnt = tmp_path / "mnt"
  mnt.mkdir()
  out = tmp_path / "out"
  out.mkdir()
  args = [sys.executable, "-m", "experiments.mnist", f"--workdir={mnt / 'run'}", "--config.data.dataset=tiny_digits",
          f"--config.data.data_dir={digits}", f"--config.data.tfds_data_dir={digits / 'tfds'}",
          "--config.data.download=False", "--config.train.epochs=1", "--config.train.batch_size=32",
          "--config.train.validation_batch_size=32", "--config.eval_batch_size=32", "--config.train.log_every=3",
          "--config.train.warmup_steps=2"]
  run = " ".join(f"'{a}'" for a in args)
  script = textwrap.dedent(f"""\
      set -u
      mount -t tmpfs -o size=600k tmpfs '{mnt}'
      {run} > '{out}/1.out' 2> '{out}/1.err'; echo $? > '{out}/1.rc'
      ls -A '{mnt}/run' > '{out}/1.ls'; find '{mnt}/run' -name '*.tmp' -o -name '*orbax-checkpoint-tmp*' > '{out}/1.tmp'
      mount -o remount,ro '{mnt}'
      {run} > '{out}/2.out' 2> '{out}/2.err'; echo $? > '{out}/2.rc'
      mount -o remount,rw,size=64m '{mnt}'
      {run} > '{out}/3.out' 2> '{out}/3.err'; echo $? > '{out}/3.rc'
      ls -A '{mnt}/run' > '{out}/3.ls'; cp '{mnt}/run/summary.json' '{out}/summary.json'
      """)
  done = subprocess.run([*prefix, "sh", "-c", script], cwd=REPO, env=clean_env(), capture_output=True, text=True,
                        timeout=900)
  assert done.returncode == 0, done.stderr
  read = lambda name: (out / name).read_text()  # noqa: E731

  # Full: one line, the path and the disk named, no traceback, no result claimed.
  assert read("1.rc").strip() == "5", read("1.err")[-3000:]
  err = read("1.err").strip()
  assert err.count("\n") == 0 and "Traceback" not in read("1.out") + err, err
  assert err.startswith(f"error: {mnt / 'run'}") and f": {ENOSPC}; the disk is full" in err, err
  assert "summary.json" not in read("1.ls") and not read("1.tmp").strip(), (read("1.ls"), read("1.tmp"))
  # Smaller than one checkpoint: nothing was committed, so no log lists an epoch the run cannot resume from.
  assert "no checkpoint was committed" in err, err
  assert not {"history.json", "metrics.csv"} & set(read("1.ls").split()), read("1.ls")

  # Read-only: refused before the data or the model are looked at.
  assert read("2.rc").strip() == "5", read("2.err")[-3000:]
  err = read("2.err").strip()
  assert err.count("\n") == 0 and os.strerror(errno.EROFS) in err and str(mnt / "run") in err, err
  assert "Total params" not in read("2.out")

  # Grown: the same command completes.
  assert read("3.rc").strip() == "0", read("3.err")[-3000:]
  assert "Traceback" not in read("3.err") and "test accuracy" in read("3.out")
  summary = json.loads(read("summary.json"))
  assert summary["run"]["epochs"] == 1
