"""Optimizers and learning-rate schedules by name, through optax, with parameter freezing.

`make_optimizer(config, params, total_steps)` = [clip] -> [L2 / decoupled weight decay] -> optimizer
with a schedule; parameters whose '/'-joined path matches a `config.freeze` regex get zero updates
(optax.multi_transform with optax.set_to_zero), so transfer learning is one config line.
"""
from __future__ import annotations

import re
from typing import Callable

import jax
import numpy as np
import optax

from jaxcnn.errors import ConfigError


def make_schedule(config, total_steps: int) -> optax.Schedule:
  """The learning-rate schedule `config.schedule` peaking at `config.learning_rate`.

  Args:
    config: a validated config (see validate_config): schedule, learning_rate, warmup_steps,
      decay_steps, decay_rate, boundaries, scales.
    total_steps: training steps of the whole run; the default decay length.

  Returns:
    step -> learning rate.
  """
  lr = float(config.learning_rate)
  decay_steps = int(config.decay_steps or max(total_steps, 1))
  name = config.schedule
  if name == "constant":
    return optax.constant_schedule(lr)
  if name == "cosine":
    return optax.cosine_decay_schedule(lr, decay_steps)
  if name == "warmup_cosine":
    warmup = int(config.warmup_steps)
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(decay_steps, warmup + 1))
  if name == "exponential":
    return optax.exponential_decay(lr, decay_steps, float(config.decay_rate))
  if name == "piecewise":
    return optax.piecewise_constant_schedule(
        lr, {int(b): float(s) for b, s in zip(config.boundaries, config.scales)})
  raise ConfigError(f"config: schedule={name!r} is not a known schedule")


def logged_learning_rate(config, schedule: optax.Schedule) -> Callable[[int], float]:
  """step -> the learning rate `schedule` (from make_schedule(config, ...)) gives, as a Python float for
  logs and history. A constant schedule's rate is the configured number itself (not its float32
  rounding); any other schedule runs as one jitted program (run op by op, it would compile one program
  per operation).
  """
  if config.schedule == "constant":
    rate = float(config.learning_rate)
    return lambda step: rate
  compiled = jax.jit(schedule)
  return lambda step: float(compiled(np.int32(step)))


def param_paths(params) -> list[str]:
  """'/'-joined paths of every leaf of `params`, e.g. 'conv1/kernel', in flatten order."""
  return ["/".join(_key_name(k) for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def freeze_labels(params, patterns) -> object:
  """A pytree like `params` of 'frozen' (path matches a pattern fully) or 'trainable'.

  Raises:
    ConfigError: a pattern is not a valid regex, or matches no parameter (a typo would otherwise train
      everything silently).
  """
  try:
    regexes = [re.compile(p) for p in patterns]
  except re.error as err:
    raise ConfigError(f"config: freeze pattern is not a valid regex: {err}") from None
  paths = param_paths(params)
  for pattern, regex in zip(patterns, regexes):
    if not any(regex.fullmatch(p) for p in paths):
      raise ConfigError(f"config: freeze pattern {pattern!r} matches no parameter; parameters are: "
                        f"{', '.join(paths)}")
  labels = ["frozen" if any(r.fullmatch(p) for r in regexes) else "trainable" for p in paths]
  return jax.tree.unflatten(jax.tree.structure(params), labels)


def make_optimizer(config, params=None, total_steps: int = 1) -> optax.GradientTransformation:
  """The optax transformation for `config`.

  Args:
    config: a validated config: optimizer ("adam" | "sgd" | "rmsprop" | "adadelta"), learning_rate and
      schedule keys, momentum, nesterov, rho, weight_decay (adam: decoupled AdamW; others: L2 added to the
      gradient), clip_norm (0 disables), freeze (regexes over '/'-joined parameter paths).
    params: the parameter pytree; required when config.freeze is non-empty.
    total_steps: training steps of the whole run (default decay length of the schedules).

  Returns:
    An optax.GradientTransformation.
  """
  lr = make_schedule(config, total_steps)
  name, wd = config.optimizer, float(config.weight_decay)
  if name == "adam":
    opt = optax.adamw(lr, weight_decay=wd) if wd > 0 else optax.adam(lr)
  elif name == "sgd":
    opt = optax.sgd(lr, momentum=float(config.momentum) or None, nesterov=bool(config.nesterov))
  elif name == "rmsprop":
    opt = optax.rmsprop(lr, decay=float(config.rho), momentum=float(config.momentum) or None)
  elif name == "adadelta":
    opt = optax.adadelta(lr, rho=float(config.rho))
  else:
    raise ConfigError(f"config: optimizer={name!r} is not a known optimizer")
  parts = []
  if float(config.clip_norm) > 0:
    parts.append(optax.clip_by_global_norm(float(config.clip_norm)))
  if wd > 0 and name != "adam":
    parts.append(optax.add_decayed_weights(wd))
  tx = optax.chain(*parts, opt) if parts else opt
  if config.freeze:
    if params is None:
      raise ValueError("make_optimizer: params are required when config.freeze is set")
    tx = optax.multi_transform({"trainable": tx, "frozen": optax.set_to_zero()},
                               freeze_labels(params, config.freeze))
  return tx
