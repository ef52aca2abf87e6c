"""Orbax checkpoints of the train state, with a content digest that catches silent damage.

Layout in a run's workdir:
  checkpoints/<step>/          Orbax CheckpointManager (keep the latest N), the state incl. data position
  checkpoint_digests/<step>.json  SHA-256 over the saved arrays, written only after Orbax committed <step>
  best/<step>/                 the best checkpoint by config.best_metric (Orbax best_fn, keep 1)

Restoring builds the target from this model's own state (abstract, with the current shardings), so a
checkpoint saved on 4 devices restores on 1 and optax NamedTuples come back as NamedTuples. A step whose
digest is missing or differs (Orbax restores flipped bytes without complaint) is skipped with a warning
naming it, and the previous good one is used; nothing is deleted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcnn.errors import CheckpointError
from jaxcnn.train.optim import _key_name
from jaxcnn.train.parallel import fetch

_LOG = logging.getLogger(__name__)

_DIGEST_FORMAT = "sha256-v1"


def digest_tree(tree) -> str:
  """SHA-256 hex digest over `tree`'s leaves in flatten order: path, dtype, shape and bytes of each."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    arr = np.ascontiguousarray(fetch(leaf))
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
  return h.hexdigest()


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
    self._primary = jax.process_index() == 0
    if self._primary:
      self.digest_dir.mkdir(parents=True, exist_ok=True)
    self.manager = ocp.CheckpointManager(
        self.workdir / "checkpoints", item_handlers=ocp.StandardCheckpointHandler(),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                             create=True))
    self.best_metric = best_metric
    self.best_manager = None
    if best_metric:
      self.best_manager = ocp.CheckpointManager(
          self.workdir / "best", item_handlers=ocp.StandardCheckpointHandler(),
          options=ocp.CheckpointManagerOptions(max_to_keep=1, best_fn=lambda m: float(m[best_metric]),
                                               best_mode=best_mode, create=True,
                                               enable_async_checkpointing=async_save))
    self._pending: dict[int, str] = {}
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
    self._pending[step] = digest_tree(tree)
    self.manager.save(step, args=ocp.args.StandardSave(tree), force=True)
    return step

  def save_best(self, state, metrics: dict) -> None:
    """Offers `state` to the best-by-metric manager (kept only if metrics[best_metric] is the best)."""
    if self.best_manager is None or self.best_metric not in metrics:
      return
    step = int(fetch(state.step))
    if step in self.best_manager.all_steps():
      return
    self.best_manager.save(step, args=ocp.args.StandardSave(state.to_checkpoint()),
                           metrics={k: float(v) for k, v in metrics.items()}, force=True)

  def wait(self) -> None:
    """Waits until every started save is committed, then records their digests."""
    self.manager.wait_until_finished()
    if self.best_manager is not None:
      self.best_manager.wait_until_finished()
    committed = set(self._committed_steps())
    for step, digest in sorted(self._pending.items()):
      if step in committed and self._primary:
        tmp = self.digest_dir / f"{step}.json.tmp"
        tmp.write_text(json.dumps({"step": step, "format": _DIGEST_FORMAT, "sha256": digest}))
        tmp.replace(self.digest_dir / f"{step}.json")  # atomic: a digest file is whole or absent
      if step in committed:
        self.last_good_step = step
    self._pending.clear()
    # Digests of checkpoints Orbax has rotated out are no longer needed.
    if self._primary:
      for f in self.digest_dir.glob("*.json"):
        if f.stem.isdigit() and int(f.stem) not in committed:
          f.unlink(missing_ok=True)

  def close(self) -> None:
    """Waits for pending saves and releases the managers."""
    try:
      self.wait()
    finally:
      self.manager.close()
      if self.best_manager is not None:
        self.best_manager.close()

  # -- restoring ------------------------------------------------------------------------------------

  def steps(self) -> list[int]:
    """Committed checkpoint steps, oldest first."""
    return sorted(self._committed_steps())

  def _recorded_digest(self, step: int) -> str | None:
    path = self.digest_dir / f"{step}.json"
    try:
      record = json.loads(path.read_text())
      return record["sha256"] if record.get("format") == _DIGEST_FORMAT else None
    except (OSError, ValueError, KeyError):
      return None

  def _check_shapes(self, step: int, target_tree) -> None:
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

  def restore_latest(self, state):
    """`state` (a placed TrainState) with the latest good checkpoint's values, or None when there is none.

    Raises:
      CheckpointError: the checkpoint's shapes/structure differ from this model's (another model).
    """
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state.to_checkpoint())
    for step in reversed(self.steps()):
      self._check_shapes(step, target)
      recorded = self._recorded_digest(step)
      if recorded is None:
        warnings.warn(f"checkpoint step {step} in {self.workdir / 'checkpoints'} has no digest record "
                      "(interrupted before it was verified); falling back to the previous checkpoint",
                      stacklevel=2)
        continue
      try:
        restored = self.manager.restore(step, args=ocp.args.StandardRestore(target))
      except Exception as err:  # damaged files surface as many error types
        warnings.warn(f"checkpoint step {step} in {self.workdir / 'checkpoints'} could not be read ({err}); "
                      "falling back to the previous checkpoint", stacklevel=2)
        continue
      if digest_tree(restored) != recorded:
        warnings.warn(f"checkpoint step {step} in {self.workdir / 'checkpoints'} is damaged (content digest "
                      "mismatch); falling back to the previous checkpoint", stacklevel=2)
        continue
      self.last_good_step = step
      _LOG.info("restored checkpoint step %d from %s", step, self.workdir / "checkpoints")
      return state.from_checkpoint(restored)
    return None
