"""Normalisation layers: `BatchNorm` (channels-last) and `LocalResponseNorm`."""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp

from jaxcnn import ops
from jaxcnn.layers import _checks

Initializer = Callable[..., Any]


class BatchNorm(nn.Module):
  """Batch normalisation over the last (channel) axis, Keras defaults: (N, ..., C) -> same shape.

  Variables: params `scale` (C,) (ones; with use_scale) and `bias` (C,) (zeros; with use_bias);
  batch_stats `mean` (C,) (zeros) and `var` (C,) (ones).

  Train vs eval:
    train=False: normalises with the running `mean`/`var`; nothing changes.
    train=True: normalises with the statistics of the batch (every axis but the last) and stores
      new = momentum * old + (1 - momentum) * batch  (Keras convention, see `jaxcnn.ops.batch_norm`) in
      the `batch_stats` collection, which must be mutable: `apply(..., mutable=["batch_stats"])`
      (through `flax.nnx.bridge.ToNNX`: `model(x, train=True, mutable=["batch_stats"])`). An immutable
      `batch_stats` raises a ValueError, as flax.linen.BatchNorm does, rather than dropping the update;
      `init` never moves the statistics.

  Precision: the statistics are computed, and stored, in float32 (float64 with a float64 param_dtype)
  whatever the compute dtype, so bfloat16 training keeps full-precision running statistics; the
  normalised output has the compute dtype.

  Cross-device statistics: under `jax.jit` with the batch sharded over devices, the batch mean is
  already global and nothing is needed. Under `jax.pmap`/`jax.shard_map`, set `axis_name` to the
  mapped (mesh) axis so the statistics are averaged across devices: the global-batch statistics.

  PyTorch's defaults (torch.nn.BatchNorm2d(momentum=0.1, eps=1e-5)) are `BatchNorm(momentum=0.9,
  epsilon=1e-5, unbiased_running_var=True)`: PyTorch's momentum weighs the new batch, Keras' weighs the
  old running value, and PyTorch stores the unbiased batch variance in its running variance.

  Attributes:
    momentum: weight of the old running statistics; default 0.99 (Keras).
    epsilon: added to the variance; default 1e-3 (Keras).
    axis_name: the pmap/shard_map axis to average batch statistics over; default None.
    use_scale: learn a per-channel scale (gamma); default True.
    use_bias: learn a per-channel offset (beta); default True.
    unbiased_running_var: update the running variance with the unbiased batch variance (PyTorch)
      instead of the biased one (Keras); normalisation uses the biased one either way; default False.
    scale_init: initializer of `scale`; default ones.
    bias_init: initializer of `bias`; default zeros.
    dtype: the compute dtype of the normalisation; default None: the promoted dtype of the input and
      the parameters (as flax.linen.BatchNorm). The output has this dtype.
    param_dtype: dtype of `scale` and `bias`; default float32. The statistics are stored in float32, or
      float64 when param_dtype is float64.
  """

  momentum: float = 0.99
  epsilon: float = 1e-3
  axis_name: Optional[str] = None
  use_scale: bool = True
  use_bias: bool = True
  unbiased_running_var: bool = False
  scale_init: Initializer = nn.initializers.ones_init()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _checks.check_rate(self, self.momentum, "momentum")
    _checks.check_positive_float(self, self.epsilon, "epsilon")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, ..., C) with rank >= 2 -> same shape. See the class docstring for train vs eval."""
    _checks.check_min_rank(self, x, 2, "(N, ..., C)")
    channels = (x.shape[-1],)
    scale = self.param("scale", self.scale_init, channels, self.param_dtype) if self.use_scale else None
    bias = self.param("bias", self.bias_init, channels, self.param_dtype) if self.use_bias else None
    stats_dtype = jnp.promote_types(self.param_dtype, jnp.float32)
    mean = self.variable("batch_stats", "mean", nn.initializers.zeros_init(), None, channels, stats_dtype)
    var = self.variable("batch_stats", "var", nn.initializers.ones_init(), None, channels, stats_dtype)
    update = train and not self.is_initializing()
    if update and not self.is_mutable_collection("batch_stats"):
      raise ValueError(f"{type(self).__name__}: train=True updates the running statistics, but the "
                       "batch_stats collection is immutable; call apply(..., mutable=['batch_stats']) "
                       "(ToNNX: model(x, train=True, mutable=['batch_stats'])), or pass train=False")
    x, scale, bias = _checks.promote(self, x, scale, bias)
    y, new_mean, new_var = _checks.call_op(
        self, ops.batch_norm, x, scale, bias, mean.value, var.value, train=train,
        momentum=self.momentum, epsilon=self.epsilon, axis_name=self.axis_name,
        unbiased_running_var=self.unbiased_running_var)
    if update:
      mean.value = new_mean
      var.value = new_var
    return y


class LocalResponseNorm(nn.Module):
  """Local response normalisation across channels (torch.nn.LocalResponseNorm semantics):
  y = x / (k + alpha / size * sum_{window of `size` channels} x^2) ** beta; (N, ..., C) -> same shape.

  Attributes:
    size: number of neighbouring channels in the window; default 5.
    alpha: scale of the squared sum; default 1e-4.
    beta: exponent; default 0.75.
    k: additive constant; default 1.0.
    dtype: the compute dtype: the input is cast to it first; default None keeps the input's dtype.
    param_dtype: accepted for the flax.linen layer signature; this layer has no parameters.
  """

  size: int = 5
  alpha: float = 1e-4
  beta: float = 0.75
  k: float = 1.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _checks.check_positive_int(self, self.size, "size")
    super().__post_init__()

  def __call__(self, x, train: bool = False):
    """x: (N, ..., C) with rank >= 2, channels last -> same shape. `train` is accepted and ignored."""
    del train
    _checks.check_min_rank(self, x, 2, "(N, ..., C)")
    x = _checks.cast_input(self, x)
    return _checks.call_op(self, ops.local_response_norm, x, self.size, alpha=self.alpha,
                           beta=self.beta, k=self.k)
