"""Checkpoint damage: every way the newest checkpoint can be broken is detected, named, and survived.

Each fault is applied to the newest of two checkpoints. Restoring must warn with the damaged step's
number, fall back to the previous checkpoint with its exact values, and keep the damaged files (in place,
or moved to a clearly named quarantine folder that the warning names). Orbax alone does not: it lists the
damaged step as the latest, a deleted metadata file gives a pytree error, and a flipped byte in a
compressed data chunk restores silently with wrong values. A run resumed over such a workdir ends bitwise
equal to an uninterrupted one, and its newest checkpoint is then good. A workdir of another model or
config is refused with the shapes listed, also through the experiment command (exit 2).
"""
from __future__ import annotations

import functools
import json
import pathlib
import shutil
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _rel_common import RUN_CONFIG, assert_bitwise, mnist_cli, saved_leaves, write_tiny_mnist  # noqa: E402
from _train_models import make_data, make_model  # noqa: E402

from jaxcnn import train  # noqa: E402
from jaxcnn.errors import CheckpointError  # noqa: E402


@functools.lru_cache(maxsize=None)
def _state(step: int, filters: int = 4, optimizer: str = "adam"):
  """A train state whose every value depends on `step` (params drawn from seed=step). Cached: each is
  built once per process (its arrays are immutable, and saving or restoring into it changes nothing)."""
  state = train.create_train_state(make_model(filters=filters), (8, 8, 1), dict(seed=step, optimizer=optimizer))
  return state.replace(step=jnp.full((), step, jnp.int32), epoch=jnp.full((), step // 4, jnp.int32))


def _save(workdir, steps):
  checkpointer = train.Checkpointer(workdir, keep=5, async_save=False)
  try:
    for step in steps:
      checkpointer.save(_state(step))
  finally:
    checkpointer.close()


def _restore(workdir, template=None):
  """(restored state or None, warning messages)."""
  checkpointer = train.Checkpointer(workdir, keep=5)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      restored = checkpointer.restore_latest(template if template is not None else _state(0))
  finally:
    checkpointer.close()
  return restored, [str(w.message) for w in caught]


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The array data chunks of a step (files in the `d/` folders), largest first."""
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, f"no data files under {step_dir}"
  return sorted(files, key=lambda p: (-p.stat().st_size, str(p)))


def _truncate(victim: pathlib.Path):
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])


def _empty(victim: pathlib.Path):
  victim.write_bytes(b"")


def _delete(victim: pathlib.Path):
  victim.unlink()


def _flip(victim: pathlib.Path):
  raw = bytearray(victim.read_bytes())
  raw[len(raw) // 2] ^= 0x10
  victim.write_bytes(bytes(raw))


def _truncate_all(step_dir):
  for victim in _data_files(step_dir):
    _truncate(victim)


def _deleter(name):
  def delete(step_dir):
    victims = list(step_dir.rglob(name))
    assert victims, f"{name} not found under {step_dir}"
    for victim in victims:
      victim.unlink()
  delete.__name__ = f"_delete_{name}"
  return delete


def _empty_dir(step_dir):
  for child in step_dir.iterdir():
    shutil.rmtree(child) if child.is_dir() else child.unlink()


def _garbage_digest(step_dir):
  (step_dir.parents[1] / "checkpoint_digests" / f"{step_dir.name}.json").write_text("{not json")


# Faults of one data file, tried on each file of the step in turn (Orbax keeps more chunk files than a
# restore reads, so damage to one of them may be harmless: then the values must be exactly the saved ones).
FILE_FAULTS = {"truncated": _truncate, "emptied": _empty, "deleted": _delete, "one byte flipped": _flip}
# Faults that leave the whole step unreadable or unverifiable: the restore must fall back.
STEP_FAULTS = {
    "every data file truncated": _truncate_all,
    "emptied step directory": _empty_dir,
    "unreadable digest record": _garbage_digest,
}
# Faults in Orbax's bookkeeping files: falling back is right, and so is restoring the step when its arrays
# still verify against the digest (then the values are exactly the saved ones); a wrong value, a crash,
# or calling it "another model" is not.
METADATA_FAULTS = {name: _deleter(name) for name in ("_METADATA", "_CHECKPOINT_METADATA", "manifest.ocdbt",
                                                      "_sharding", "commit_success.txt")}


def _snapshot(root: pathlib.Path) -> dict[bytes, str]:
  """{file content: relative path} of every file under root (to find moved files again)."""
  return {p.read_bytes(): str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _assert_fell_back_and_kept(workdir: pathlib.Path, damaged_step: int, good_step: int, before: dict,
                               restored, messages):
  assert restored is not None and int(restored.step) == good_step
  assert_bitwise(saved_leaves(restored), saved_leaves(_state(good_step)))
  named = [m for m in messages if f"checkpoint step {damaged_step}" in m]
  assert named, f"no warning names step {damaged_step}: {messages}"
  assert any(f"step {good_step}" in m or "previous" in m for m in named), named
  # Nothing of the damaged checkpoint is deleted: every file that was there is still under the workdir
  # (in place or in a quarantine folder, which the warning then names).
  after = _snapshot(workdir)
  lost = [path for content, path in before.items() if content not in after]
  assert not lost, f"damaged checkpoint files were deleted: {lost}"
  moved = {before[c]: after[c] for c in before if after[c] != before[c]}
  if moved:
    folder = pathlib.Path(next(iter(moved.values()))).parts[0]
    assert "quarantine" in folder or "damaged" in folder, moved
    assert any(folder in m for m in named), (folder, named)


def _assert_exact_or_fell_back(workdir, before, restored, messages):
  """Restored step 2 with exactly its saved values, or fell back to step 1 as _assert_fell_back_and_kept."""
  if restored is not None and int(restored.step) == 2:
    assert_bitwise(saved_leaves(restored), saved_leaves(_state(2)))
  else:
    _assert_fell_back_and_kept(workdir, 2, 1, before, restored, messages)


@pytest.mark.parametrize("fault", list(STEP_FAULTS))
def test_damaged_newest_checkpoint_warns_falls_back_and_keeps_the_damage(tmp_path, fault):
  _save(tmp_path, [1, 2])
  STEP_FAULTS[fault](tmp_path / "checkpoints" / "2")
  before = _snapshot(tmp_path)
  restored, messages = _restore(tmp_path)
  _assert_fell_back_and_kept(tmp_path, 2, 1, before, restored, messages)


@pytest.mark.parametrize("fault", list(METADATA_FAULTS))
def test_deleted_metadata_file_never_gives_a_wrong_state_or_a_false_refusal(tmp_path, fault):
  _save(tmp_path, [1, 2])
  METADATA_FAULTS[fault](tmp_path / "checkpoints" / "2")
  before = _snapshot(tmp_path)
  restored, messages = _restore(tmp_path)  # a CheckpointError ("another model") fails the test
  _assert_exact_or_fell_back(tmp_path, before, restored, messages)


@pytest.mark.parametrize("fault", list(FILE_FAULTS))
def test_one_damaged_data_file_is_caught_whichever_it_is(tmp_path, fault):
  """One file of the newest step truncated, emptied, deleted or with one bit flipped, for each data file in
  turn. A flipped bit in a compressed chunk restores without complaint from Orbax; the digest must catch
  it. A chunk file the restore does not read leaves the values exact, which is no wrong result; the
  chunks it reads must make it fall back."""
  _save(tmp_path / "pristine", [1, 2])
  pristine_files = _data_files(tmp_path / "pristine" / "checkpoints" / "2")
  fell_back = 0
  for i in range(len(pristine_files)):
    workdir = tmp_path / f"damaged{i}"
    shutil.copytree(tmp_path / "pristine", workdir)
    FILE_FAULTS[fault](_data_files(workdir / "checkpoints" / "2")[i])
    before = _snapshot(workdir)
    restored, messages = _restore(workdir)
    _assert_exact_or_fell_back(workdir, before, restored, messages)
    fell_back += int(restored.step) == 1
  assert fell_back >= 1, f"no {fault} data file was detected"


def test_every_checkpoint_damaged_starts_fresh_with_warnings(tmp_path):
  _save(tmp_path, [1, 2])
  for step in (1, 2):
    _truncate_all(tmp_path / "checkpoints" / str(step))
  restored, messages = _restore(tmp_path)
  assert restored is None
  assert any("checkpoint step 2" in m for m in messages) and any("checkpoint step 1" in m for m in messages)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  data = make_data()
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = train.fit(make_model(), data[0], config={**RUN_CONFIG, "epochs": 2}, workdir=workdir, val_data=data[1])
  return saved_leaves(result.state), result.history


@pytest.mark.parametrize("fault", ["flipped byte", "no digest record"])
def test_resumed_over_damage_ends_bitwise_and_leaves_a_good_newest_checkpoint(tmp_path, uninterrupted, fault):
  """Damage of the newest checkpoint (or a kill between Orbax's commit and the digest record) costs the
  steps since the previous checkpoint, nothing else: the run resumes there, re-saves the damaged step,
  and its newest checkpoint afterwards restores without a warning."""
  data = make_data()
  workdir = tmp_path / "run"
  train.fit(make_model(), data[0], config={**RUN_CONFIG, "epochs": 1}, workdir=workdir, val_data=data[1])
  newest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert newest == 4
  if fault == "flipped byte":  # in every data file: which of them a restore reads varies
    for victim in _data_files(workdir / "checkpoints" / "4"):
      _flip(victim)
  else:
    (workdir / "checkpoint_digests" / "4.json").unlink()
  before = _snapshot(workdir / "checkpoints" / "4")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = train.fit(make_model(), data[0], config={**RUN_CONFIG, "epochs": 2}, workdir=workdir,
                       val_data=data[1])
  messages = [str(w.message) for w in caught]
  assert any("checkpoint step 4" in m for m in messages), messages
  expected_state, expected_history = uninterrupted
  assert_bitwise(saved_leaves(result.state), expected_state)
  assert result.history == expected_history
  if fault == "flipped byte":  # the damaged step's files are still somewhere under the workdir
    after = {p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert all(content in after for content in before), "damaged checkpoint files were deleted"
  restored, messages = _restore(workdir, train.create_train_state(make_model(), (8, 8, 1), RUN_CONFIG))
  assert not [m for m in messages if "checkpoint step" in m], messages
  assert_bitwise(saved_leaves(restored), expected_state)
  checkpointer = train.Checkpointer(workdir)
  try:
    steps = checkpointer.steps()
  finally:
    checkpointer.close()
  assert steps[-1] == 8
  assert all((workdir / "checkpoint_digests" / f"{s}.json").is_file() for s in steps)


@pytest.mark.parametrize("change, message", [
    (dict(filters=6), r"conv2d.*kernel.*\(3, 3, 1, 4\).*\(3, 3, 1, 6\)"),
    (dict(optimizer="sgd"), r"opt_state"),
])
def test_other_model_or_optimizer_is_refused_by_fit_with_shapes_listed(tmp_path, change, message):
  data = make_data()
  workdir = tmp_path / "run"
  train.fit(make_model(), data[0], config={**RUN_CONFIG, "epochs": 1}, workdir=workdir)
  before = _snapshot(workdir / "checkpoints")
  config = {**RUN_CONFIG, "epochs": 2, "optimizer": change.get("optimizer", "adam")}
  with pytest.raises(CheckpointError, match=r"belongs to another model/config.*" + message) as info:
    train.fit(make_model(filters=change.get("filters", 4)), data[0], config=config, workdir=workdir)
  assert info.value.exit_code == 2 and "\n" not in str(info.value)
  assert _snapshot(workdir / "checkpoints") == before  # refused, not half-restored or overwritten


def test_other_model_workdir_is_refused_by_the_experiment_command(tmp_path_factory, tmp_path):
  from experiments import mnist
  from jaxcnn import models
  digits = write_tiny_mnist(tmp_path_factory.mktemp("digits"), train=96, test=32)
  workdir = tmp_path / "run"
  # A workdir holding a checkpoint of the experiment's own config with another model (mnist_convnet).
  config = mnist.get_config().train
  checkpointer = train.Checkpointer(workdir, async_save=False)
  try:
    checkpointer.save(train.create_train_state(models.get("mnist_convnet"), (28, 28, 1), config))
  finally:
    checkpointer.close()
  before = _snapshot(workdir)
  other = mnist_cli(workdir, digits, "--config.model=mnist_bn_cnn")
  assert other.returncode == 2, other.stderr[-3000:]
  lines = other.stderr.strip().splitlines()
  assert "Traceback" not in other.stderr
  assert lines[-1].startswith("error: checkpoint ") and "belongs to another model/config" in lines[-1], lines[-1]
  assert "checkpoint (" in lines[-1] and "vs model (" in lines[-1] or "missing in checkpoint" in lines[-1]
  # Nothing restored into, overwritten or added, but the workdir's lock (jaxcnn.train.workdir), which the
  # command took before reading the checkpoint and released naming no holder.
  assert (workdir / ".lock").read_text() == ""
  (workdir / ".lock").unlink()
  assert _snapshot(workdir) == before
