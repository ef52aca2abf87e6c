"""Pure step functions: `train_step(state, batch) -> (state, metrics)`, `eval_step(state, batch) -> metrics`.

Nothing here jits or touches devices; the loop compiles these once. Metrics are *sums* over the batch
weighted by its mask (loss_sum, correct_sum, count), so they add up across batches and devices exactly
and padded eval batches count only their real examples. Under jit with a sharded batch the sums are
global automatically; under pmap pass `axis_name` and they are psum-ed over devices.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxcnn.train.losses import count_correct, get_loss, resolve_from_logits
from jaxcnn.train.state import TrainState


def dropout_key(state: TrainState) -> jax.Array:
  """The dropout key of the state's step: fold_in(rng, step), so no caller plumbs keys."""
  return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)


def _global_sum(x: jax.Array, axis_name: str | None) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def _cast_floats(tree, dtype):
  """`tree` with its floating leaves cast to `dtype` (integer leaves untouched)."""
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_steps(model, *, loss: str = "softmax_cross_entropy", target: str = "label",
               axis_name: str | None = None, compute_dtype: str = "float32",
               from_logits: bool | None = None) -> tuple[Callable, Callable]:
  """The pure train and eval steps for `model`.

  Args:
    model: a flax.linen Module, `model.apply(variables, x, train=...)` -> outputs.
    loss: one of jaxcnn.train.LOSSES: "softmax_cross_entropy" (default) and
      "sigmoid_binary_cross_entropy" take logits; the Keras names "sparse_categorical_crossentropy",
      "categorical_crossentropy", "binary_crossentropy" take logits or probabilities (`from_logits`);
      "mse"/"mean_squared_error", "mae"/"mean_absolute_error".
    target: the batch key the loss compares outputs with (default "label"; "image" for autoencoders).
    axis_name: the pmap axis the batch is split over, or None (default) under jit/one device. Models
      whose BatchNorm must use the global batch under pmap need the same axis_name in their BatchNorm.
    compute_dtype: "float32" (default) or "bfloat16": mixed precision. Each step casts the parameters
      and the images to bfloat16 for the forward and backward passes (convolutions and BatchNorm
      statistics still accumulate in float32), while the parameters, their gradients, the optimizer
      state and the BatchNorm running statistics stay float32 and the loss is computed in float32.
    from_logits: whether the model's outputs are logits, for the cross-entropies: None (default, auto)
      reads the model's final activation (False when it ends in softmax/sigmoid); resolved and checked
      by `jaxcnn.train.losses.resolve_from_logits` (its table; custom modules: auto = logits, an
      explicit False is trusted).

  Returns:
    (train_step, eval_step):
      train_step(state, batch) -> (state, metrics): one optimizer step on batch {"image" (B,H,W,C),
        target, "mask" (B,)}; batch_stats updated; state.step advanced by one.
      eval_step(state, batch) -> metrics: train=False forward (running BatchNorm stats, no dropout).
    metrics = {"loss_sum", "correct_sum", "count"} float32 scalars summed over the global batch
    (correct_sum is 0 for losses without accuracy).

  Raises:
    ConfigError: a logits loss (or from_logits=True) for a model that ends in softmax/sigmoid, or
      from_logits=False for one without such an output (one line naming the loss and the activation).
  """
  from_logits = resolve_from_logits(model, loss, from_logits)
  loss_fn_per_example = get_loss(loss, from_logits=from_logits)
  dtype = jnp.dtype(compute_dtype)
  mixed = dtype != jnp.dtype(jnp.float32)

  def _apply(variables, image, **kwargs):
    """model.apply in the compute dtype; outputs come back float32 (batch_stats updates untouched)."""
    if not mixed:
      return model.apply(variables, image, **kwargs)
    variables = {**variables, "params": _cast_floats(variables["params"], dtype)}
    result = model.apply(variables, image.astype(dtype), **kwargs)
    if kwargs.get("mutable"):
      outputs, updates = result
      return outputs.astype(jnp.float32), updates
    return result.astype(jnp.float32)

  def _sums(outputs, batch, per_example):
    mask = batch["mask"].astype(jnp.float32)
    correct = count_correct(loss, outputs, batch[target], from_logits=bool(from_logits))
    correct_sum = jnp.sum(correct * mask) if correct is not None else jnp.zeros((), jnp.float32)
    return {"loss_sum": _global_sum(jnp.sum(per_example * mask), axis_name),
            "correct_sum": _global_sum(correct_sum, axis_name),
            "count": _global_sum(jnp.sum(mask), axis_name)}

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    mask = batch["mask"].astype(jnp.float32)
    # The global number of real examples: the loss is a mean over the global batch, so on each pmap
    # device the local sum is divided by the global count and the gradients are then summed.
    count = jnp.maximum(_global_sum(jnp.sum(mask), axis_name), 1.0)

    def objective(params):
      variables = {**state.variables(), "params": params}
      key = dropout_key(state)
      if axis_name is not None:
        # Each pmap device holds different examples, so each draws its own masks.
        key = jax.random.fold_in(key, jax.lax.axis_index(axis_name))
      outputs, updates = _apply(variables, batch["image"], train=True, rngs={"dropout": key},
                                     mutable=["batch_stats"])
      per_example = loss_fn_per_example(outputs, batch[target]).astype(jnp.float32)
      return jnp.sum(per_example * mask) / count, (outputs, updates, per_example)

    grads, (outputs, updates, per_example) = jax.grad(objective, has_aux=True)(state.params)
    if axis_name is not None:
      grads = jax.lax.psum(grads, axis_name)
    param_updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, param_updates),
                              batch_stats=updates.get("batch_stats", state.batch_stats), opt_state=opt_state)
    return new_state, _sums(outputs, batch, per_example)

  def eval_step(state: TrainState, batch: dict) -> dict:
    outputs = _apply(state.variables(), batch["image"], train=False)
    return _sums(outputs, batch, loss_fn_per_example(outputs, batch[target]).astype(jnp.float32))

  return train_step, eval_step


def summarize(sums: dict, prefix: str = "", with_accuracy: bool = True) -> dict[str, float]:
  """Host floats {prefix+'loss', prefix+'accuracy'} from metric sums (count 0 gives nan)."""
  count = float(sums["count"])
  out = {prefix + "loss": float(sums["loss_sum"]) / count if count else float("nan")}
  if with_accuracy:
    out[prefix + "accuracy"] = float(sums["correct_sum"]) / count if count else float("nan")
  return out
