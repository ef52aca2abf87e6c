"""The training configuration: every key `fit` reads, its default, and up-front validation.

`DEFAULTS` is fit's whole config: every key, its default, in the order data flows. `validate_config`
fills defaults and checks every value before anything is compiled, so a typo or a bad value fails in a
second with a ConfigError naming the key, not an hour into training. `default_config(**overrides)` is
the same as a ConfigDict, what every experiment's `config.train` is built from.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import ml_collections

from jaxcnn.errors import ConfigError
from jaxcnn.train.losses import LOSSES

OPTIMIZERS = ("adam", "sgd", "rmsprop", "adadelta")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "exponential", "piecewise")
PARALLEL = ("auto", "jit", "pmap", "none")
COMPUTE_DTYPES = ("float32", "bfloat16")

# Every key fit understands, with its default, in the order data flows. None means "not set" where the key
# says so. docs/DESIGN.md ("Training config") explains the groups.
DEFAULTS: dict[str, Any] = dict(
    # data: how (inputs, targets) arrays become batches (a pipeline given to fit brings its own)
    epochs=1,                       # epochs to train: from scratch, or more on top of initial_state's
    batch_size=None,                # global batch; None: the pipeline's (must agree when both are set)
    validation_batch_size=None,     # batch of validation data given as arrays; None: batch_size
    validation_split=0.0,           # Keras: the last fraction of (inputs, targets) arrays, before shuffling
    shuffle=True,                   # shuffle the training arrays each epoch
    normalize="auto",               # "auto" | "featurewise" | "scale" | "none" (docs/DESIGN.md, Preprocessing)
    width_shift_range=0.0,          # on-device augmentation of (N, H, W, C) images, as ImageDataGenerator:
    height_shift_range=0.0,         #   shifts as fractions of the width/height,
    rotation_range=0.0,             #   rotation in degrees [0, 180],
    zoom_range=0.0,                 #   zoom factors in [1 - z, 1 + z] (or a pair (lo, hi)),
    horizontal_flip=False,          #   random left-right flips,
    vertical_flip=False,            #   random up-down flips,
    fill_mode="nearest",            #   "nearest" | "constant": what fills pixels moved in from outside,
    cval=0.0,                       #   the fill value for "constant", in the units after scaling
    feed="auto",                    # "auto" | "device" (batches gathered on device) | "host" (host-fed chunks)
    # loss
    loss="softmax_cross_entropy",   # one of LOSSES
    from_logits=None,               # cross-entropies: outputs are logits? None: auto (the model's last activation)
    target="label",                 # batch key the loss compares outputs with ("image": autoencoders)
    # optimizer and schedule
    optimizer="adam",               # one of OPTIMIZERS
    learning_rate=1e-3,             # peak learning rate of the schedule
    schedule="constant",            # one of SCHEDULES
    warmup_steps=0,                 # warmup_cosine: linear warmup length in steps
    decay_steps=None,               # cosine/exponential: steps to decay over; None: the whole run
    decay_rate=0.1,                 # exponential: factor applied over decay_steps
    boundaries=(),                  # piecewise: steps where the rate is multiplied by `scales`
    scales=(),                      # piecewise: one factor per boundary
    momentum=0.0,                   # sgd and rmsprop momentum
    nesterov=False,                 # sgd: Nesterov momentum
    rho=0.9,                        # rmsprop decay / adadelta rho
    weight_decay=0.0,               # adam: decoupled (AdamW); others: L2 added to the gradient
    clip_norm=0.0,                  # global-norm gradient clipping; 0 disables
    freeze=(),                      # regexes over '/'-joined parameter paths that are not trained
    seed=0,                         # parameter init, data order, augmentation and dropout keys
    # loop, devices and checkpoints
    log_every=50,                   # steps per compiled chunk (one lax.scan) and between host syncs
    checkpoint_every_steps=0,       # 0: checkpoint at epoch ends only (and at the end)
    keep_checkpoints=3,             # latest checkpoints kept
    best_metric=None,               # e.g. "val_accuracy": also keep the best checkpoint by it
    best_mode="auto",               # "max" | "min" | "auto" (max for accuracy, min otherwise)
    parallel="auto",                # one of PARALLEL; auto = jit over every device
    compute_dtype="float32",        # "bfloat16": bf16 forward/backward, float32 params, BN stats, loss
    async_checkpointing=True,       # write checkpoints in the background between saves
    progress="auto",                # "auto" (bar on a TTY, log lines otherwise) | "bar" | "log" | "none"
    distributed_init_timeout_s=60,  # multi-process: how long to wait for the peers to connect
    heartbeat_timeout_s=10,         # multi-process: how soon a dead peer is noticed
)

# The type of each key whose default is None (for a ConfigDict that command-line flags can set).
_NONE_TYPES = {"batch_size": int, "validation_batch_size": int, "decay_steps": int, "best_metric": str,
               "from_logits": bool}
NORMALIZE = ("auto", "featurewise", "scale", "none")
FEEDS = ("auto", "device", "host")
FILL_MODES = ("nearest", "constant")
# The keys that describe augmentation (all at their defaults: none).
AUGMENT_KEYS = ("width_shift_range", "height_shift_range", "rotation_range", "zoom_range", "horizontal_flip",
                "vertical_flip", "fill_mode", "cval")


def default_config(**overrides) -> ml_collections.ConfigDict:
  """A ConfigDict of every DEFAULTS key, with `overrides` (a recipe's `config.train`).

  Keys whose default is None are typed placeholders, so `--config.train.batch_size=64` parses.

  Raises:
    ConfigError: an override names an unknown key.
  """
  unknown = sorted(set(overrides) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"config: unknown keys {', '.join(unknown)}; known keys: {', '.join(sorted(DEFAULTS))}")
  values = {}
  for key, default in DEFAULTS.items():
    value = overrides.get(key, default)
    if value is None and key in _NONE_TYPES:
      value = ml_collections.config_dict.placeholder(_NONE_TYPES[key])
    values[key] = value
  return ml_collections.ConfigDict(values)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(float(value)))


def validate_config(config: Mapping[str, Any] | ml_collections.ConfigDict | None) -> ml_collections.ConfigDict:
  """Defaults filled in and every value checked.

  Args:
    config: a dict or ConfigDict with any subset of DEFAULTS' keys; None: all defaults.

  Returns:
    A new ConfigDict with every key of DEFAULTS.

  Raises:
    ConfigError: unknown keys (all listed) or bad values (all listed, each naming the key).
  """
  given = dict(config.to_dict() if isinstance(config, ml_collections.ConfigDict) else (config or {}))
  unknown = sorted(set(given) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"config: unknown keys {', '.join(unknown)}; known keys: {', '.join(sorted(DEFAULTS))}")
  c = {**DEFAULTS, **given}
  problems = []

  def check(ok: bool, key: str, expected: str):
    if not ok:
      problems.append(f"{key}={c[key]!r} ({expected})")

  check(_is_int(c["epochs"]) and c["epochs"] >= 1, "epochs", "expected an integer >= 1")
  check(c["batch_size"] is None or (_is_int(c["batch_size"]) and c["batch_size"] >= 1), "batch_size",
        "expected a positive integer or None")
  check(c["validation_batch_size"] is None or (_is_int(c["validation_batch_size"]) and c["validation_batch_size"] >= 1),
        "validation_batch_size", "expected a positive integer or None")
  check(_is_number(c["validation_split"]) and 0.0 <= c["validation_split"] < 1.0, "validation_split",
        "expected a fraction in [0, 1)")
  check(isinstance(c["shuffle"], bool), "shuffle", "expected True or False")
  check(c["normalize"] in NORMALIZE, "normalize", f"expected one of {', '.join(NORMALIZE)}")
  for key in ("width_shift_range", "height_shift_range"):
    check(_is_number(c[key]) and 0.0 <= c[key] < 1.0, key, "expected a fraction in [0, 1)")
  check(_is_number(c["rotation_range"]) and 0.0 <= c["rotation_range"] <= 180.0, "rotation_range",
        "expected degrees in [0, 180]")
  zoom = c["zoom_range"]
  check((_is_number(zoom) and 0.0 <= zoom < 1.0) or (isinstance(zoom, (tuple, list)) and len(zoom) == 2 and all(
      _is_number(z) for z in zoom) and 0 < zoom[0] <= zoom[1]), "zoom_range",
        "expected a fraction in [0, 1) or a pair 0 < lo <= hi")
  for key in ("horizontal_flip", "vertical_flip"):
    check(isinstance(c[key], bool), key, "expected True or False")
  check(c["fill_mode"] in FILL_MODES, "fill_mode", f"expected one of {', '.join(FILL_MODES)}")
  check(_is_number(c["cval"]), "cval", "expected a number")
  check(c["feed"] in FEEDS, "feed", f"expected one of {', '.join(FEEDS)}")
  check(c["loss"] in LOSSES, "loss", f"expected one of {', '.join(LOSSES)}")
  check(c["from_logits"] is None or isinstance(c["from_logits"], bool), "from_logits",
        "expected True, False or None (auto)")
  check(isinstance(c["target"], str) and bool(c["target"]), "target", "expected a batch key such as 'label'")
  check(c["optimizer"] in OPTIMIZERS, "optimizer", f"expected one of {', '.join(OPTIMIZERS)}")
  check(_is_number(c["learning_rate"]) and c["learning_rate"] > 0, "learning_rate", "expected a positive number")
  check(c["schedule"] in SCHEDULES, "schedule", f"expected one of {', '.join(SCHEDULES)}")
  check(_is_int(c["warmup_steps"]) and c["warmup_steps"] >= 0, "warmup_steps", "expected an integer >= 0")
  check(c["decay_steps"] is None or (_is_int(c["decay_steps"]) and c["decay_steps"] >= 1), "decay_steps",
        "expected a positive integer or None")
  check(_is_number(c["decay_rate"]) and c["decay_rate"] > 0, "decay_rate", "expected a positive number")
  bounds, scales = tuple(c["boundaries"] or ()), tuple(c["scales"] or ())
  check(all(_is_int(b) and b > 0 for b in bounds) and list(bounds) == sorted(set(bounds)), "boundaries",
        "expected increasing positive integers")
  check(len(scales) == len(bounds) and all(_is_number(s) and s > 0 for s in scales), "scales",
        "expected one positive number per boundary")
  check(_is_number(c["momentum"]) and 0.0 <= c["momentum"] < 1.0, "momentum", "expected a number in [0, 1)")
  check(isinstance(c["nesterov"], bool), "nesterov", "expected True or False")
  check(_is_number(c["rho"]) and 0.0 < c["rho"] < 1.0, "rho", "expected a number in (0, 1)")
  check(_is_number(c["weight_decay"]) and c["weight_decay"] >= 0, "weight_decay", "expected a number >= 0")
  check(_is_number(c["clip_norm"]) and c["clip_norm"] >= 0, "clip_norm", "expected a number >= 0 (0 disables)")
  freeze = c["freeze"]
  freeze = (freeze,) if isinstance(freeze, str) else tuple(freeze or ())
  check(all(isinstance(p, str) and p for p in freeze), "freeze", "expected regex strings")
  check(_is_int(c["seed"]) and c["seed"] >= 0, "seed", "expected an integer >= 0")
  check(_is_int(c["log_every"]) and c["log_every"] >= 1, "log_every", "expected an integer >= 1")
  check(_is_int(c["checkpoint_every_steps"]) and c["checkpoint_every_steps"] >= 0, "checkpoint_every_steps",
        "expected an integer >= 0 (0: epoch ends only)")
  check(_is_int(c["keep_checkpoints"]) and c["keep_checkpoints"] >= 1, "keep_checkpoints",
        "expected an integer >= 1")
  check(c["best_metric"] is None or (isinstance(c["best_metric"], str) and bool(c["best_metric"])),
        "best_metric", "expected a metric name such as 'val_accuracy' or None")
  check(c["best_mode"] in ("auto", "max", "min"), "best_mode", "expected 'auto', 'max' or 'min'")
  check(c["parallel"] in PARALLEL, "parallel", f"expected one of {', '.join(PARALLEL)}")
  check(c["compute_dtype"] in COMPUTE_DTYPES, "compute_dtype", f"expected one of {', '.join(COMPUTE_DTYPES)}")
  check(isinstance(c["async_checkpointing"], bool), "async_checkpointing", "expected True or False")
  check(c["progress"] in ("auto", "bar", "log", "none"), "progress", "expected 'auto', 'bar', 'log' or 'none'")
  check(_is_int(c["distributed_init_timeout_s"]) and c["distributed_init_timeout_s"] >= 1,
        "distributed_init_timeout_s", "expected an integer >= 1")
  check(_is_int(c["heartbeat_timeout_s"]) and c["heartbeat_timeout_s"] >= 1, "heartbeat_timeout_s",
        "expected an integer >= 1")
  if problems:
    raise ConfigError("config: bad values: " + "; ".join(problems))
  c["boundaries"], c["scales"], c["freeze"] = bounds, scales, freeze
  if isinstance(zoom, list):
    c["zoom_range"] = tuple(zoom)
  return ml_collections.ConfigDict(c)


def augment_config(config):
  """The jaxcnn.data.AugmentConfig that a validated config's augmentation keys describe."""
  from jaxcnn.data import AugmentConfig
  return AugmentConfig(**{key: config[key] for key in AUGMENT_KEYS})


def augments(config) -> bool:
  """Whether any augmentation key differs from its default (no augmentation)."""
  return any(config[key] != DEFAULTS[key] for key in AUGMENT_KEYS)


def best_mode(config: ml_collections.ConfigDict) -> str:
  """'max' or 'min' for config.best_metric ('auto': max for accuracies, min for losses)."""
  if config.best_mode != "auto":
    return config.best_mode
  return "max" if "acc" in (config.best_metric or "") else "min"
