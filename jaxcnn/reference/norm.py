"""Reference normalisation: the textbook batch-norm formula and LRN with an explicit channel loop.

Argument checks are shared with `jaxcnn.ops.norm` (same errors); the arithmetic is written here
independently, in float32 (float64 for float64 x).
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxcnn.ops._args import compute_dtype
from jaxcnn.ops.norm import _check_batch_norm_args, _check_lrn_args, _check_unbiased_count

__all__ = ["batch_norm", "local_response_norm"]


def batch_norm(x, scale, bias, mean, var, *, train: bool, momentum: float = 0.99, epsilon: float = 1e-3,
               axis_name=None, unbiased_running_var: bool = False):
  """Reference batch normalisation; same arguments and results as `jaxcnn.ops.batch_norm`.

  n = number of values per channel (times the `axis_name` axis size under pmap),
  mu = sum(x) / n, sigma2 = sum((x - mu)^2) / n over all axes but the last (train=True), or the running
  (mean, var) (train=False); y = (x - mu) / sqrt(sigma2 + epsilon) * scale + bias.
  Running statistics: new = momentum * old + (1 - momentum) * batch, the variance term times
  n / (n - 1) when `unbiased_running_var`.

  Args:
    x: (N, ..., C) floating array.
    scale: (C,) multiplier, or None for 1.
    bias: (C,) offset, or None for 0.
    mean: (C,) running mean.
    var: (C,) running variance.
    train: Python bool, keyword only.
    momentum: default 0.99.
    epsilon: default 1e-3.
    axis_name: a `pmap` axis name whose devices' sums are added (`lax.psum`); default None.
    unbiased_running_var: default False.

  Returns:
    (y, new_mean, new_var) with x's, mean's and var's dtypes.
  """
  channels = _check_batch_norm_args(x, scale, bias, mean, var, train, momentum, epsilon)
  _check_unbiased_count(x, train, axis_name, unbiased_running_var)
  x = jnp.asarray(x)
  mean, var = jnp.asarray(mean), jnp.asarray(var)
  acc = compute_dtype(x.dtype)
  rows = x.astype(acc).reshape(-1, channels)  # (n, C): one row per value of each channel
  if train:
    total = jnp.sum(rows, axis=0)
    count = jnp.asarray(rows.shape[0], acc)
    if axis_name is not None:
      total = lax.psum(total, axis_name)
      count = lax.psum(count, axis_name)
    mu = total / count
    squared = jnp.sum((rows - mu[None, :]) ** 2, axis=0)
    if axis_name is not None:
      squared = lax.psum(squared, axis_name)
    sigma2 = squared / count
    batch_var = sigma2 * count / (count - 1.0) if unbiased_running_var else sigma2
    new_mean = (momentum * mean.astype(acc) + (1.0 - momentum) * mu).astype(mean.dtype)
    new_var = (momentum * var.astype(acc) + (1.0 - momentum) * batch_var).astype(var.dtype)
  else:
    mu, sigma2 = mean.astype(acc), var.astype(acc)
    new_mean, new_var = mean, var
  y = (rows - mu[None, :]) / jnp.sqrt(sigma2[None, :] + epsilon)
  if scale is not None:
    y = y * jnp.asarray(scale).astype(acc)[None, :]
  if bias is not None:
    y = y + jnp.asarray(bias).astype(acc)[None, :]
  return y.reshape(x.shape).astype(x.dtype), new_mean, new_var


def local_response_norm(x, size: int = 5, *, alpha: float = 1e-4, beta: float = 0.75, k: float = 1.0):
  """Reference LRN (torch.nn.LocalResponseNorm semantics) as a loop over the channel window.

  Squares are zero-padded with size // 2 channels before and (size - 1) // 2 after; output channel c
  sums padded channels c ... c + size - 1, i.e. input channels c - size // 2 ... c + (size - 1) // 2.

  Args:
    x: (N, ..., C) floating array, channels last.
    size: channels in the window; default 5.
    alpha: default 1e-4 (divided by size).
    beta: default 0.75.
    k: default 1.0.

  Returns:
    Array of x's shape and dtype.
  """
  _check_lrn_args(x, size, alpha, beta, k)
  x = jnp.asarray(x)
  channels = x.shape[-1]
  xf = x.astype(compute_dtype(x.dtype))
  before, after = size // 2, (size - 1) // 2
  squares = jnp.zeros((*x.shape[:-1], channels + before + after), xf.dtype)
  squares = squares.at[..., before:before + channels].set(xf * xf)
  window_sum = jnp.zeros(xf.shape, xf.dtype)
  for tap in range(size):
    window_sum = window_sum + squares[..., tap:tap + channels]
  return (xf / (k + alpha * window_sum / size) ** beta).astype(x.dtype)
