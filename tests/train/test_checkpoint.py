"""Checkpointer: digests catch damage, other models are refused, device counts may change."""
from __future__ import annotations

import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _train_models import make_model  # noqa: E402

from jaxcnn import train  # noqa: E402
from jaxcnn.errors import CheckpointError  # noqa: E402


def _state(filters: int = 4, step: int = 0, strategy=None):
  state = train.create_train_state(make_model(filters=filters), (8, 8, 1), dict(seed=step))
  state = state.replace(step=jnp.full((), step, jnp.int32))
  return strategy.place_state(state) if strategy is not None else state


def _save_steps(workdir, steps, strategy=None):
  checkpointer = train.Checkpointer(workdir, keep=5, async_save=False)
  try:
    for step in steps:
      checkpointer.save(_state(step=step, strategy=strategy))
  finally:
    checkpointer.close()


def _restore(workdir, strategy=None):
  checkpointer = train.Checkpointer(workdir, keep=5)
  try:
    return checkpointer.restore_latest(_state(strategy=strategy))
  finally:
    checkpointer.close()


def _same_values(a, b) -> bool:
  return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
             zip(jax.tree.leaves(a.to_checkpoint()), jax.tree.leaves(b.to_checkpoint())))


def test_roundtrip_keeps_optimizer_structure(tmp_path):
  _save_steps(tmp_path, [3])
  restored = _restore(tmp_path)
  assert int(restored.step) == 3
  assert _same_values(restored, _state(step=3))
  # The optax state keeps its NamedTuple types (the target is built from this model's own state).
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(_state().opt_state)


def test_saved_on_four_devices_restores_on_one(tmp_path):
  four = train.make_strategy("jit", 16)
  one = train.make_strategy("none", 16)
  assert four.num_devices == 4 and one.num_devices == 1
  _save_steps(tmp_path, [5], strategy=four)
  restored = _restore(tmp_path, strategy=one)
  assert int(restored.step) == 5
  assert _same_values(restored, _state(step=5))
  assert restored.params["dense"]["kernel"].sharding.device_set == {jax.devices()[0]}


def test_flipped_byte_falls_back_to_previous_checkpoint(tmp_path):
  _save_steps(tmp_path, [1, 2])
  step_dir = tmp_path / "checkpoints" / "2"
  files = [p for p in step_dir.rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files, f"no data files under {step_dir}"
  for victim in files:  # one bit in the middle of every array data file
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
  with pytest.warns(UserWarning, match=r"checkpoint step 2 .* (damaged|could not be read)"):
    restored = _restore(tmp_path)
  assert int(restored.step) == 1 and _same_values(restored, _state(step=1))
  # The damaged checkpoint is kept for inspection, moved aside so that the step can be saved again.
  assert not step_dir.exists() and (tmp_path / "checkpoints_quarantine" / "2" / "checkpoint").is_dir()


def test_missing_digest_is_not_trusted(tmp_path):
  _save_steps(tmp_path, [1, 2])
  (tmp_path / "checkpoint_digests" / "2.json").unlink()
  with pytest.warns(UserWarning, match="checkpoint step 2 .* no digest record"):
    restored = _restore(tmp_path)
  assert int(restored.step) == 1


def test_uncommitted_tmp_directory_is_ignored(tmp_path):
  _save_steps(tmp_path, [1])
  (tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp").mkdir()
  assert int(_restore(tmp_path).step) == 1


def test_other_model_raises_checkpoint_error_with_shapes(tmp_path):
  _save_steps(tmp_path, [1])
  checkpointer = train.Checkpointer(tmp_path)
  try:
    with pytest.raises(CheckpointError, match=r"another model.*conv2d.*kernel.*\(3, 3, 1, 4\).*\(3, 3, 1, 6\)"):
      checkpointer.restore_latest(_state(filters=6))
  finally:
    checkpointer.close()


def test_empty_workdir_restores_nothing(tmp_path):
  assert _restore(tmp_path) is None
