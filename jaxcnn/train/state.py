"""The train state: one pytree holding everything a checkpoint must restore to continue exactly.

step, params, batch_stats, optimizer state, the rng key data (uint32, so Orbax stores it as a plain
array), the data pipeline's position (epoch, step within the epoch) and the running sums of the current
epoch's training metrics (so a run resumed mid-epoch reports the same epoch metrics).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxcnn._compile import run_once
from jaxcnn.train.config import validate_config
from jaxcnn.train.optim import make_optimizer

# Metric sums carried through an epoch: loss*mask, correct*mask, mask.
METRIC_SUMS = ("loss_sum", "correct_sum", "count")


def zero_metric_sums() -> dict[str, jax.Array]:
  """{'loss_sum', 'correct_sum', 'count'} float32 zeros."""
  return {k: jnp.zeros((), jnp.float32) for k in METRIC_SUMS}


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree), plus the static optimizer.

  Attributes:
    step: int32 scalar, optimizer steps taken.
    params: the model's `params` collection.
    batch_stats: the model's `batch_stats` collection ({} for models without BatchNorm).
    opt_state: optax state of `tx`.
    rng: uint32 key data (jax.random.key_data); dropout key of a step = fold_in(rng, step).
    epoch: int32 scalar, the epoch the next batch comes from.
    epoch_step: int32 scalar, the index of the next batch within that epoch.
    metric_sums: float32 scalars loss_sum, correct_sum, count of the current epoch so far.
    tx: the optax transformation (static, not saved).
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  epoch: jax.Array
  epoch_step: jax.Array
  metric_sums: dict
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

  def variables(self) -> dict:
    """{'params': ..., 'batch_stats': ...} for model.apply (batch_stats only when present)."""
    return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}

  def to_checkpoint(self) -> dict:
    """The saved part: every array field as a plain dict (no static optimizer)."""
    return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
            "opt_state": self.opt_state, "rng": self.rng, "epoch": self.epoch,
            "epoch_step": self.epoch_step, "metric_sums": self.metric_sums}

  def from_checkpoint(self, saved: dict) -> "TrainState":
    """This state with every saved field replaced by `saved`'s (the optimizer stays)."""
    opt_state = jax.tree.unflatten(jax.tree.structure(self.opt_state), jax.tree.leaves(saved["opt_state"]))
    return self.replace(step=saved["step"], params=saved["params"], batch_stats=saved["batch_stats"],
                        opt_state=opt_state, rng=saved["rng"], epoch=saved["epoch"],
                        epoch_step=saved["epoch_step"], metric_sums=saved["metric_sums"])


def init_variables(model, input_shape, seed: int, input_dtype=jnp.float32) -> dict:
  """model.init on one zero example of `input_shape` (e.g. (H, W, C)), in train=False mode."""
  key = jax.random.key(seed)
  params_key, dropout_key = jax.random.split(key)
  x = jnp.zeros((1, *input_shape), input_dtype)
  return model.init({"params": params_key, "dropout": dropout_key}, x, train=False)


def create_train_state(model, input_shape, config=None, *, total_steps: int = 1,
                       tx: optax.GradientTransformation | None = None, input_dtype=jnp.float32) -> TrainState:
  """A fresh TrainState for `model`, initialised from config.seed.

  Args:
    model: a flax.linen Module with `__call__(x, train=False)`.
    input_shape: one example's shape, e.g. (H, W, C) or (L, C) (no batch axis).
    config: a dict/ConfigDict of training settings (see validate_config); None: defaults.
    total_steps: steps of the whole run, the default decay length of learning-rate schedules.
    tx: an optax transformation to use instead of make_optimizer(config, ...).
    input_dtype: the dtype of the model's inputs (default float32; e.g. int32 token ids).

  Returns:
    TrainState at step 0, epoch 0.
  """
  config = validate_config(config)
  input_shape = tuple(int(d) for d in input_shape)
  if not input_shape or any(d < 1 for d in input_shape):
    raise ValueError(f"create_train_state: input_shape {input_shape} must be one example's positive shape")
  seed = int(config.seed)

  def build() -> TrainState:
    variables = init_variables(model, input_shape, seed, input_dtype)
    params = variables["params"]
    # make_optimizer reads only the tree's paths (freeze masks), so it is built here, from the traced
    # parameters, and the model's init is traced once.
    opt = tx if tx is not None else make_optimizer(config, params, total_steps)
    # A different stream from the one init used, so dropout masks are independent of the init draws.
    rng = jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1))
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    return TrainState(step=zero(), params=params, batch_stats=variables.get("batch_stats", {}),
                      opt_state=opt.init(params), rng=rng, epoch=zero(), epoch_step=zero(),
                      metric_sums=zero_metric_sums(), tx=opt)

  # One compiled program: run op by op, the initialisers, the forward pass init traces and the optimizer's
  # zeros would each compile a program of their own (about a hundred for a small CNN). It runs once, so it
  # is compiled cheaply (jaxcnn._compile: the same bits, a fifth of the compile time on CPU). The outputs
  # are separate buffers (a jit never aliases its outputs), so every leaf can be donated to the train step.
  return run_once(build)


def abstract_train_state(make: Callable[[], TrainState]) -> TrainState:
  """The shapes/dtypes of make()'s state without computing it (jax.eval_shape)."""
  return jax.eval_shape(make)
