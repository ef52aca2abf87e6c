"""Non-finite values: NaN/Inf in the inputs or a diverging loss stop the run at the step it happens, keep
the last good checkpoint as the newest, and exit 3 (one line) through the experiment command."""
from __future__ import annotations

import json
import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _rel_common import RUN_CONFIG, mnist_cli, write_tiny_mnist  # noqa: E402
from _train_models import StreamingView, make_data, make_model  # noqa: E402

from jaxcnn import train  # noqa: E402
from jaxcnn.errors import NonFiniteError  # noqa: E402


class _Poisoned(StreamingView):
  """The pipeline's batches, with one image of global step `bad_step` (1-based) set to `value`."""

  def __init__(self, pipeline, bad_step: int, value: float):
    super().__init__(pipeline)
    self.bad_step, self.value = bad_step, value

  def batches(self, epoch: int, start_step: int = 0):
    for i, batch in enumerate(super().batches(epoch, start_step)):
      step = epoch * self.steps_per_epoch + start_step + i + 1
      if step == self.bad_step:
        image = np.array(batch["image"])
        image[3, 2, 5, 0] = self.value
        batch = {**batch, "image": jnp.asarray(image)}
      yield batch


# A NaN found mid-chunk (4 steps per host sync) and an Inf found at a sync after every step.
@pytest.mark.parametrize("value, kind, log_every", [(np.nan, "nan", 4), (np.inf, "nan|inf", 1)])
def test_nonfinite_input_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, value, kind, log_every):
  train_data, _ = make_data()
  bad_step = 7  # in epoch 2 (4 steps per epoch), after the checkpoints of steps 2, 4 and 6
  workdir = tmp_path / "run"
  config = {**RUN_CONFIG, "epochs": 3, "log_every": log_every, "progress": "none"}
  with pytest.raises(NonFiniteError, match=rf"loss became ({kind}) at step {bad_step} \(epoch 2\); "
                                           r"last good checkpoint: step 6") as info:
    train.fit(make_model(), _Poisoned(train_data, bad_step, value), config=config, workdir=workdir)
  assert info.value.exit_code == 3 and "\n" not in str(info.value)
  checkpointer = train.Checkpointer(workdir)
  try:
    assert checkpointer.steps()[-1] == 6
    state = checkpointer.restore_latest(train.create_train_state(make_model(), (8, 8, 1), config))
  finally:
    checkpointer.close()
  assert int(state.step) == 6
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.to_checkpoint()))
  history = json.loads((workdir / "history.json").read_text())
  assert history["epoch"] == [1] and all(np.isfinite(history["loss"]))  # no epoch with a NaN in it


def test_diverging_experiment_exits_3_with_one_line_and_claims_no_result(tmp_path_factory, tmp_path):
  digits = write_tiny_mnist(tmp_path_factory.mktemp("digits"), train=96, test=32)
  workdir = tmp_path / "run"
  result = mnist_cli(workdir, digits, "--config.train.optimizer=sgd", "--config.train.learning_rate=1e30",
                     "--config.train.schedule=constant", "--config.train.log_every=1")
  assert result.returncode == 3, (result.stdout[-2000:], result.stderr[-2000:])
  assert "Traceback" not in result.stderr + result.stdout
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
  match = re.fullmatch(r"error: loss became (nan|inf) at step (\d+) \(epoch 1\); last good checkpoint: none",
                       errors[0])
  assert match, errors[0]
  assert not (workdir / "summary.json").exists() and not (workdir / "history.png").exists()
  assert not [p for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()]
