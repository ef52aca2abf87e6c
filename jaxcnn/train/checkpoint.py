"""Orbax checkpoints of the train state, with a content digest that catches silent damage.

Layout in a run's workdir:
  checkpoints/<step>/          Orbax CheckpointManager (keep the latest N), the state incl. data position
  checkpoint_digests/<step>.json  SHA-256 over the saved arrays and their shapes, written (atomically)
                               before Orbax starts writing <step>, so every committed step has one
  checkpoints_quarantine/<step>[-n]/  damaged or unverifiable steps, moved aside with their digest record
  best/<step>/                 the best checkpoint by config.best_metric (Orbax best_fn, keep 1)

Restoring builds the target from this model's own state (abstract, with the current shardings), so a
checkpoint saved on 4 devices restores on 1 and optax NamedTuples come back as NamedTuples. A step whose
digest record is missing or differs from the restored arrays (Orbax restores flipped bytes without
complaint), or that cannot be read, is moved to checkpoints_quarantine/ with a warning naming the step
and the folder, and the previous good one is used: the damage is kept for inspection, and the run can
save that step again when it gets there. A checkpoint whose recorded shapes differ from the model's
belongs to another model or config and is refused (CheckpointError listing the shapes).

A write that fails (disk full, quota, read-only: Orbax reports it from a background thread at the next
save, `wait()` or `close()`) raises `StorageError` naming the step's directory and the OS error. Such a
step was never committed (Orbax renames a step's temporary directory into place only after every write
of it succeeded, and rotates old steps out only after that), so the latest committed checkpoint is
untouched; its temporary directory and digest record are removed to give the space back.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import pathlib
import shutil
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcnn.errors import CheckpointError, StorageError
from jaxcnn.train.optim import _key_name
from jaxcnn.train.parallel import fetch
from jaxcnn.storage import quiet_orbax_storage_noise, storage_errors, write_atomic

_LOG = logging.getLogger(__name__)

_DIGEST_FORMAT = "sha256-v1"

# Checkpointers left with a save in flight (a run stopped at once by a second Ctrl-C); a new Checkpointer
# of the same workdir in this process waits for them first, so two saves of one step never overlap.
_ABANDONED: list = []


def digest_tree(tree) -> str:
  """SHA-256 hex digest over `tree`'s leaves in flatten order: path, dtype, shape and bytes of each."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    arr = np.ascontiguousarray(fetch(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


def _quarantine_name(root: pathlib.Path, step: int) -> pathlib.Path:
  """root/<step>, or root/<step>-<n> for the first n >= 2 not taken (a step may be damaged twice)."""
  candidate, n = root / str(step), 1
  while candidate.exists():
    n += 1
    candidate = root / f"{step}-{n}"
  return candidate


def _shapes(tree) -> dict[str, tuple]:
  """{'params/conv2d/kernel': shape}: '/'-joined plain key names, so NamedTuple fields (target) and the
  dict keys Orbax's metadata reports for them compare equal."""
  return {"/".join(_key_name(k) for k in p): tuple(getattr(x, "shape", ())) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


class Checkpointer:
  """Saves and restores TrainStates under `workdir`.

  Args:
    workdir: the run's directory (created if missing).
    keep: latest checkpoints kept (default 3).
    async_save: write in the background; the next save, `wait()` and `close()` wait for it (default True).
    best_metric: a metric name to also keep the best checkpoint by, or None (default).
    best_mode: "max" or "min" for best_metric.
  """

  def __init__(self, workdir, *, keep: int = 3, async_save: bool = True, best_metric: str | None = None,
               best_mode: str = "max"):
    self.workdir = pathlib.Path(workdir).absolute()
    self.digest_dir = self.workdir / "checkpoint_digests"
    self.quarantine_dir = self.workdir / "checkpoints_quarantine"
    self._primary = jax.process_index() == 0
    quiet_orbax_storage_noise()
    for other in [c for c in _ABANDONED if c.workdir == self.workdir]:
      _ABANDONED.remove(other)
      with contextlib.suppress(Exception):
        other.close()
    with storage_errors(self.workdir / "checkpoints"):
      if self._primary:
        self.digest_dir.mkdir(parents=True, exist_ok=True)
      self.manager = ocp.CheckpointManager(
          self.workdir / "checkpoints", item_handlers=ocp.StandardCheckpointHandler(),
          options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                               create=True))
    self.best_metric = best_metric
    self.best_manager = None
    if best_metric:
      with storage_errors(self.workdir / "best"):
        self.best_manager = ocp.CheckpointManager(
            self.workdir / "best", item_handlers=ocp.StandardCheckpointHandler(),
            options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: float(m[best_metric]),
                                                 best_mode=best_mode, create=True,
                                                 enable_async_checkpointing=async_save))
    self._pending: set[int] = set()
    self._pending_best: set[int] = set()
    self.last_good_step: int | None = None

  def _committed_steps(self) -> list[int]:
    self.manager.reload()  # sees steps committed by other processes / earlier runs
    return list(self.manager.all_steps())

  # -- saving ---------------------------------------------------------------------------------------

  def save(self, state) -> int:
    """Starts saving `state` (a TrainState) at its step; returns the step. Waits for the previous save."""
    step = int(fetch(state.step))
    self.wait()
    if step in self.manager.all_steps():
      return step
    tree = state.to_checkpoint()
    if self._primary:
      # The record first: a step Orbax commits always has one (a kill right after the commit must not
      # leave the newest checkpoint unverifiable); a record without a committed step is ignored.
      record = {"step": step, "format": _DIGEST_FORMAT, "sha256": digest_tree(tree),
                "shapes": {k: list(v) for k, v in _shapes(tree).items()}}
      # whole or absent; the folder is (re)created inside, so a failure to create it is a StorageError too
      write_atomic(self.digest_dir / f"{step}.json", json.dumps(record))
    self._pending.add(step)
    try:
      with storage_errors(self.workdir / "checkpoints" / str(step)):
        self.manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    except BaseException:
      self._discard_failed(self.manager, self._pending)
      raise
    return step

  def save_best(self, state, metrics: dict) -> None:
    """Offers `state` to the best-by-metric manager (kept only if metrics[best_metric] is the best)."""
    if self.best_manager is None or self.best_metric not in metrics:
      return
    step = int(fetch(state.step))
    if step in self.best_manager.all_steps():
      return
    self._pending_best.add(step)
    try:
      with storage_errors(self.workdir / "best" / str(step)):
        self.best_manager.save(step, args=ocp.args.StandardSave(state.to_checkpoint()),
                               metrics={k: float(v) for k, v in metrics.items()}, force=True)
    except BaseException:
      self._discard_failed(self.best_manager, self._pending_best)
      raise

  def _discard_failed(self, manager, pending: set[int]) -> None:
    """After a failed save: the uncommitted steps' temporary directories and digest records removed."""
    try:
      manager.reload()
      committed = set(manager.all_steps())
    except Exception:  # noqa: BLE001  (an unreadable directory: keep everything)
      pending.clear()
      return
    for step in sorted(pending - committed):
      if self._primary:
        for tmp in pathlib.Path(manager.directory).glob(f"{step}.orbax-checkpoint-tmp*"):
          shutil.rmtree(tmp, ignore_errors=True)
        if manager is self.manager:
          (self.digest_dir / f"{step}.json").unlink(missing_ok=True)
    pending.clear()

  def _wait_for(self, manager, pending: set[int], folder: str) -> None:
    where = self.workdir / folder
    try:
      with storage_errors(where / str(max(pending)) if pending else where):
        manager.wait_until_finished()
    except BaseException:
      self._discard_failed(manager, pending)
      raise

  def wait(self) -> None:
    """Waits until every started save is committed.

    Raises:
      StorageError: a save failed for lack of space or permission (the step was not committed).
    """
    self._wait_for(self.manager, self._pending, "checkpoints")
    if self.best_manager is not None:
      self._wait_for(self.best_manager, self._pending_best, "best")
      self._pending_best.clear()
    committed = set(self._committed_steps())
    for step in sorted(self._pending):
      if step in committed:
        self.last_good_step = step
    self._pending.clear()
    # Digests of checkpoints Orbax has rotated out are no longer needed.
    if self._primary:
      for f in self.digest_dir.glob("*.json"):
        if f.stem.isdigit() and int(f.stem) not in committed:
          f.unlink(missing_ok=True)

  def close(self) -> None:
    """Waits for pending saves and releases the managers (a failed save raises its StorageError once)."""
    try:
      self.wait()
    finally:
      for manager in (self.manager, self.best_manager):
        if manager is not None:
          with contextlib.suppress(StorageError), storage_errors(manager.directory):
            manager.close()  # a failed save was already reported by wait()

  def abandon(self) -> None:
    """Leaves saves in flight to finish in the background (no waiting); the next Checkpointer of this
    workdir in this process waits for them before it starts."""
    _ABANDONED.append(self)

  # -- restoring ------------------------------------------------------------------------------------

  def steps(self) -> list[int]:
    """Committed checkpoint steps, oldest first."""
    return sorted(self._committed_steps())

  def _record(self, step: int) -> dict | None:
    """The step's digest record ({"sha256", "shapes"?}), or None when it is missing or unreadable."""
    path = self.digest_dir / f"{step}.json"
    try:
      record = json.loads(path.read_text())
      if record.get("format") != _DIGEST_FORMAT or not isinstance(record.get("sha256"), str):
        return None
      return record
    except (OSError, ValueError, AttributeError):
      return None

  def _check_shapes(self, step: int, target_tree, record: dict) -> None:
    if isinstance(record.get("shapes"), dict):
      # Written by this class with the checkpoint: damage to Orbax's own metadata cannot pass for a
      # different model.
      saved = {k: tuple(v) for k, v in record["shapes"].items()}
    else:
      try:
        meta = self.manager.item_metadata(step)
        saved = _shapes(getattr(meta, "tree", meta))
      except Exception:  # unreadable metadata is damage: left to the restore and digest checks
        return
    wanted = _shapes(target_tree)
    mismatched = [f"{k}: checkpoint {saved[k]} vs model {wanted[k]}" for k in wanted
                  if k in saved and saved[k] != wanted[k]]
    missing = sorted(set(wanted) - set(saved))
    extra = sorted(set(saved) - set(wanted))
    if mismatched or missing or extra:
      parts = mismatched[:20]
      if missing:
        parts.append("missing in checkpoint: " + ", ".join(missing[:10]))
      if extra:
        parts.append("not in model: " + ", ".join(extra[:10]))
      raise CheckpointError(f"checkpoint {self.workdir / 'checkpoints' / str(step)} belongs to another "
                            f"model/config: " + "; ".join(parts))

  def _quarantine(self, step: int, problem: str) -> None:
    """Moves a bad step (and its digest record) to checkpoints_quarantine/ and warns, naming both."""
    source = self.workdir / "checkpoints" / str(step)
    target = _quarantine_name(self.quarantine_dir, step)
    if self._primary:
      with storage_errors(target):
        target.mkdir(parents=True)
        if source.exists():
          shutil.move(str(source), str(target / "checkpoint"))
        record = self.digest_dir / f"{step}.json"
        if record.exists():
          shutil.move(str(record), str(target / "digest.json"))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"jaxcnn_quarantine_{step}")
    self.manager.reload()
    warnings.warn(f"checkpoint step {step} in {self.workdir / 'checkpoints'} {problem}; moved it to {target} "
                  "and falling back to the previous checkpoint", stacklevel=3)

  def restore_latest(self, state):
    """`state` (a placed TrainState) with the latest good checkpoint's values, or None when there is none.

    Steps that are damaged or unverifiable are moved to checkpoints_quarantine/ (with a warning naming
    the step and the folder) on the way to the newest good one.

    Raises:
      CheckpointError: the checkpoint's shapes/structure differ from this model's (another model).
    """
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state.to_checkpoint())
    for step in reversed(self.steps()):
      record = self._record(step)
      if record is None:
        self._quarantine(step, "has no digest record (missing or unreadable: interrupted before it was verified)")
        continue
      self._check_shapes(step, target, record)
      try:
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as err:  # damaged files surface as many error types
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        self._quarantine(step, f"could not be read ({reason})")
        continue
      if digest_tree(restored) != record["sha256"]:
        self._quarantine(step, "is damaged (content digest mismatch)")
        continue
      self.last_good_step = step
      _LOG.info("restored checkpoint step %d from %s", step, self.workdir / "checkpoints")
      return state.from_checkpoint(restored)
    return None
