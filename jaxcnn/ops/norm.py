"""Fast normalisation ops: batch normalisation and local response normalisation (channels last).

Shared argument checks live in the private `_check_*` helpers here, which `jaxcnn.reference.norm`
reuses so both twins reject the same bad input with the same message.
"""
from __future__ import annotations

import functools
import math
import numbers

import jax
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
  channels = x.shape[-1]
  gamma = jnp.ones((channels,), acc) if scale is None else jnp.asarray(scale).astype(acc)
  beta = jnp.zeros((channels,), acc) if bias is None else jnp.asarray(bias).astype(acc)
  if train:
    y, mu, sigma2 = _normalize_with_batch_statistics(xf, gamma, beta, float(epsilon), axis_name)
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
    return y.astype(x.dtype), new_mean, new_var
  # One multiply-add per element: fold the normalisation and the affine map into (C,) vectors first.
  inv = lax.rsqrt(var.astype(acc) + epsilon) * gamma
  shift = beta - mean.astype(acc) * inv
  y = xf * _per_channel(inv, x.ndim) + _per_channel(shift, x.ndim)
  return y.astype(x.dtype), mean, var


def _per_channel(v, ndim):
  """A (C,) vector shaped to broadcast against (N, ..., C)."""
  return v.reshape((1,) * (ndim - 1) + (-1,))


def _channel_mean(v, axis_name):
  """The mean of v over every axis but the last (and over the `axis_name` devices), shape (C,)."""
  m = jnp.mean(v, axis=tuple(range(v.ndim - 1)))
  return m if axis_name is None else lax.pmean(m, axis_name)


def _batch_statistics(x, epsilon, axis_name):
  """(mu, sigma2, inv): batch mean, biased batch variance and 1 / sqrt(sigma2 + epsilon), each (C,).

  Two passes (the mean, then the squared deviations from it) rather than E[x^2] - E[x]^2, which cancels
  catastrophically when |mean| >> std; each pass is one reduction of x with its elementwise work fused."""
  mu = _channel_mean(x, axis_name)
  sigma2 = _channel_mean(jnp.square(x - _per_channel(mu, x.ndim)), axis_name)
  return mu, sigma2, lax.rsqrt(sigma2 + epsilon)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _normalize_with_batch_statistics(x, gamma, beta, epsilon, axis_name):
  """Training-mode batch normalisation in the accumulator dtype: (y, mu, sigma2), where
  y = (x - mu) * gamma / sqrt(sigma2 + epsilon) + beta and (mu, sigma2) are the batch statistics.

  The derivative is written by hand (`_normalize_jvp`) so that the compiled backward pass is the
  minimal one: two per-channel reductions of the output gradient g (sum(g) and sum(g * x)) and one
  elementwise pass, each reading only g and x. Autodiff of the two-pass statistics also differentiates
  the mean inside the variance (a term that sums to zero but costs a full-size product and reduction)
  and shares x - mu between passes, which XLA then writes out as one more activation-sized array.
  """
  mu, sigma2, inv = _batch_statistics(x, epsilon, axis_name)
  return _affine(x, mu, inv * gamma, beta), mu, sigma2


def _affine(x, mu, a, beta):
  """x * a + (beta - mu * a): the normalisation folded into one multiply-add per element."""
  return x * _per_channel(a, x.ndim) + _per_channel(beta - mu * a, x.ndim)


@_normalize_with_batch_statistics.defjvp
def _normalize_jvp(epsilon, axis_name, primals, tangents):
  """Linear in the tangents (dx, dgamma, dbeta), so JAX's transpose of it is the backward pass:
    dmu = mean(dx), dsigma2 = 2 (mean(x dx) - mu dmu), da = dgamma inv - gamma inv^3 dsigma2 / 2,
    dy = dx a + x da + (dbeta - dmu a - mu da),  with a = gamma inv.
  Every full-size term is x or dx times a (C,) vector, so the transpose reduces g and g * x (one fused
  reduction each) and writes the input gradient in one elementwise pass over g and x."""
  (x, gamma, beta), (dx, dgamma, dbeta) = primals, tangents
  mu, sigma2, inv = _batch_statistics(x, epsilon, axis_name)
  a = inv * gamma
  dmu = _channel_mean(dx, axis_name)
  dsigma2 = 2.0 * (_channel_mean(x * dx, axis_name) - mu * dmu)
  da = dgamma * inv - 0.5 * gamma * inv ** 3 * dsigma2
  dy = dx * _per_channel(a, x.ndim) + x * _per_channel(da, x.ndim) + _per_channel(dbeta - dmu * a - mu * da, x.ndim)
  return (_affine(x, mu, a, beta), mu, sigma2), (dy, dmu, dsigma2)


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
