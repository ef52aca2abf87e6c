"""Fast normalisation ops: batch normalisation and local response normalisation (channels last).

Shared argument checks live in the private `_check_*` helpers here, which `jaxcnn.reference.norm`
reuses so both twins reject the same bad input with the same message.
"""
from __future__ import annotations

import math
import numbers

import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxcnn.ops._args import check_floating, compute_dtype

__all__ = ["batch_norm", "local_response_norm"]


def _check_batch_norm_args(x, scale, bias, mean, var, train, momentum, epsilon):
  """Validates `batch_norm`'s arguments; returns the channel count C = x.shape[-1]."""
  if jnp.ndim(x) < 2:
    raise ValueError(f"x must have rank >= 2 (N, ..., C), got shape {tuple(jnp.shape(x))}")
  check_floating(x, "x")
  channels = jnp.shape(x)[-1]
  for name, value, optional in (("scale", scale, True), ("bias", bias, True), ("mean", mean, False),
                                ("var", var, False)):
    if value is None:
      if optional:
        continue
      raise ValueError(f"{name} is required: pass the running {name} of shape ({channels},)")
    if tuple(jnp.shape(value)) != (channels,):
      raise ValueError(f"{name} must have shape ({channels},) to match the channels of x "
                       f"{tuple(jnp.shape(x))}, got shape {tuple(jnp.shape(value))}")
    check_floating(value, name)
  if not isinstance(train, (bool, np.bool_)):
    raise ValueError(f"train must be a Python bool (it selects the computation statically), got {train!r}")
  if not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
    raise ValueError(f"momentum must be a number in [0, 1], got {momentum!r}")
  if not isinstance(epsilon, numbers.Real) or not epsilon > 0.0:
    raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")
  return channels


def _check_unbiased_count(x, train, axis_name, unbiased_running_var):
  """The unbiased variance needs at least two values per channel (PyTorch refuses one, too)."""
  per_channel = jnp.shape(x)[:-1]
  if not all(isinstance(d, int) for d in per_channel):
    return  # symbolic (exported) shapes: the count is known only when the program runs
  if train and unbiased_running_var and axis_name is None and np.prod(per_channel) < 2:
    raise ValueError(f"unbiased_running_var=True needs more than one value per channel, x has shape "
                     f"{tuple(jnp.shape(x))}")


def _check_lrn_args(x, size, alpha, beta, k):
  if jnp.ndim(x) < 2:
    raise ValueError(f"x must have rank >= 2 (N, ..., C), got shape {tuple(jnp.shape(x))}")
  check_floating(x, "x")
  if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
    raise ValueError(f"size must be a positive int, got {size!r}")
  for name, value in (("alpha", alpha), ("beta", beta), ("k", k)):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
      raise ValueError(f"{name} must be a real number, got {value!r}")


def batch_norm(x, scale, bias, mean, var, *, train: bool, momentum: float = 0.99, epsilon: float = 1e-3,
               axis_name=None, unbiased_running_var: bool = False):
  """Batch normalisation over the last (channel) axis, with running statistics.

  y = (x - mu) / sqrt(sigma2 + epsilon) * scale + bias, where (mu, sigma2) are
    train=True:  the batch mean and biased batch variance over all axes but the last;
    train=False: the running (mean, var) passed in.
  Statistics and normalisation are computed in float32 (also for bfloat16 x; float64 for float64 x);
  y has x's dtype.

  Running statistics (train=True) follow Keras: new = momentum * old + (1 - momentum) * batch, with the
  biased batch variance. PyTorch writes momentum the other way round (torch_momentum = 1 - momentum) and
  updates the running variance with the unbiased estimate (n / (n - 1) times the biased one); pass
  `unbiased_running_var=True` to match it. Normalisation always uses the biased variance (both do).

  Under `jax.jit` with a batch sharded over devices the statistics are already global. Under `jax.pmap`
  pass the mapped axis as `axis_name`: the batch mean and then the mean squared deviation from it are
  averaged with `lax.pmean` (equal per-device batches), giving the global-batch statistics.

  Args:
    x: (N, ..., C) floating array (e.g. NHWC).
    scale: (C,) multiplier (gamma), or None for 1.
    bias: (C,) offset (beta), or None for 0.
    mean: (C,) running mean.
    var: (C,) running variance.
    train: Python bool, keyword only: batch statistics (True) or running ones (False).
    momentum: running-statistics decay in [0, 1]; default 0.99 (Keras).
    epsilon: added to the variance; default 1e-3 (Keras).
    axis_name: a `pmap` axis name to average the batch statistics over; default None.
    unbiased_running_var: update the running variance with the unbiased batch variance (PyTorch);
      default False (Keras).

  Returns:
    (y, new_mean, new_var): y of x's shape and dtype; new_mean / new_var of mean's / var's dtype,
    unchanged when train=False.
  """
  _check_batch_norm_args(x, scale, bias, mean, var, train, momentum, epsilon)
  _check_unbiased_count(x, train, axis_name, unbiased_running_var)
  x = jnp.asarray(x)
  mean, var = jnp.asarray(mean), jnp.asarray(var)
  acc = compute_dtype(x.dtype)
  xf = x.astype(acc)
  if train:
    axes = tuple(range(x.ndim - 1))
    batch_mean = jnp.mean(xf, axis=axes, keepdims=True)
    if axis_name is not None:
      batch_mean = lax.pmean(batch_mean, axis_name)
    # Two passes (mean, then squared deviations from it) rather than E[x^2] - E[x]^2, which cancels
    # catastrophically when |mean| >> std.
    batch_var = jnp.mean(jnp.square(xf - batch_mean), axis=axes, keepdims=True)
    if axis_name is not None:
      batch_var = lax.pmean(batch_var, axis_name)
    mu, sigma2 = batch_mean.reshape(-1), batch_var.reshape(-1)
    running_var_batch = sigma2
    if unbiased_running_var:
      # jnp.asarray: the batch may be a symbolic dimension (jax.export).
      count = jnp.asarray(math.prod(x.shape[:-1]), acc)
      if axis_name is not None:
        count = count * lax.axis_size(axis_name)
      running_var_batch = sigma2 * (count / jnp.maximum(count - 1.0, 1.0))
    new_mean = (momentum * mean.astype(acc) + (1.0 - momentum) * mu).astype(mean.dtype)
    new_var = (momentum * var.astype(acc)
               + (1.0 - momentum) * running_var_batch).astype(var.dtype)
  else:
    mu, sigma2 = mean.astype(acc), var.astype(acc)
    new_mean, new_var = mean, var
  # One multiply-add per element: fold the normalisation and the affine map into (C,) vectors first.
  inv = lax.rsqrt(sigma2 + epsilon)
  if scale is not None:
    inv = inv * jnp.asarray(scale).astype(acc)
  shift = -mu * inv
  if bias is not None:
    shift = shift + jnp.asarray(bias).astype(acc)
  shape = (1,) * (x.ndim - 1) + (-1,)
  y = xf * inv.reshape(shape) + shift.reshape(shape)
  return y.astype(x.dtype), new_mean, new_var


def local_response_norm(x, size: int = 5, *, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
  """Local response normalisation across channels, with `torch.nn.LocalResponseNorm` semantics.

  y[..., c] = x[..., c] / (k + alpha / size * sum_{j in window(c)} x[..., j]^2) ** beta, where window(c)
  = c - size // 2 ... c + (size - 1) // 2, and channels outside [0, C) count as zeros (so the divisor
  is always `size`, as in PyTorch). Computed in float32 (float64 for float64 x); y has x's dtype.

  The window sum is a (C, C) banded matrix product, which XLA runs as one dot.

  Args:
    x: (N, ..., C) floating array, channels last (e.g. NHWC).
    size: number of channels in the window; default 5.
    alpha: scale of the window sum (divided by size); default 1e-4.
    beta: exponent; default 0.75.
    k: additive constant; default 1.0.

  Returns:
    Array of x's shape and dtype.
  """
  _check_lrn_args(x, size, alpha, beta, k)
  x = jnp.asarray(x)
  channels = x.shape[-1]
  c = np.arange(channels)
  # band[j, i] = 1 when input channel j lies in output channel i's window.
  offset = c[:, None] - c[None, :]
  band = ((offset >= -(size // 2)) & (offset <= (size - 1) // 2)).astype(np.float32)
  xf = x.astype(compute_dtype(x.dtype))
  window_sum = jnp.matmul(jnp.square(xf), jnp.asarray(band, xf.dtype), precision=lax.Precision.HIGHEST)
  denom = jnp.power(k + (alpha / size) * window_sum, beta)
  return (xf / denom).astype(x.dtype)
