"""Pooling against external oracles: TensorFlow for "same" padding, PyTorch for explicit padding.

Inputs are tie-free (a permutation of distinct values): max-pool gradients at tied maxima may
legitimately differ between implementations (first maximum vs split between ties).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import ops
from helpers import assert_close, import_tensorflow, import_torch

pytestmark = pytest.mark.oracle


def _distinct(shape, seed=0):
  size = int(np.prod(shape))
  return (np.random.default_rng(seed).permutation(size).reshape(shape) / size).astype(np.float32)


def _weights(shape, seed=1):
  """A fixed random cotangent, so gradients are compared for a non-uniform loss."""
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _jax_value_and_grad(fn, x):
  """(fn(x), cotangent w, gradient of sum(fn(x) * w) w.r.t. x), in one jit compilation."""
  w = _weights(jax.eval_shape(fn, jnp.asarray(x)).shape)

  def loss(x):
    y = fn(x)
    return jnp.sum(y * w), y

  (_, y), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(jnp.asarray(x))
  return y, w, grad


SAME_CASES = [  # (pool, strides, input shape): odd and even sizes, strides 1 and 2
    (2, 1, (1, 5, 6, 2)),
    (3, 1, (1, 5, 5, 2)),
    (2, 2, (1, 5, 6, 2)),
    (3, 2, (7, 6, 7, 3)),
    (3, 2, (1, 4, 4, 1)),
    ((2, 3), (2, 1), (1, 7, 6, 2)),
]


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_same_pools_equal_tensorflow(kind):
  tf = import_tensorflow()
  for pool, strides, shape in SAME_CASES:
    x = _distinct(shape)
    if kind == "max":
      fast = lambda x: ops.max_pool2d(x, pool, strides=strides, padding="same")  # noqa: E731
      oracle = lambda x: tf.nn.max_pool2d(x, pool, strides, "SAME")  # noqa: E731
    else:
      fast = lambda x: ops.avg_pool2d(x, pool, strides=strides, padding="same")  # noqa: E731
      oracle = lambda x: tf.nn.avg_pool2d(x, pool, strides, "SAME")  # noqa: E731
    y, w, grad = _jax_value_and_grad(fast, x)
    tx = tf.constant(x)
    with tf.GradientTape() as tape:
      tape.watch(tx)
      expected = oracle(tx)
      loss = tf.reduce_sum(expected * w)
    assert_close(y, expected.numpy(), err_msg=f"{kind} pool {pool} strides {strides} on {shape}")
    assert_close(grad, tape.gradient(loss, tx).numpy(), err_msg=f"gradient of {kind} pool {pool}/{strides}")


def test_same_pools_1d_equal_tensorflow():
  tf = import_tensorflow()
  for pool, strides, length in [(2, 1, 6), (3, 2, 7), (3, 2, 8)]:
    x = _distinct((2, length, 3))
    assert_close(ops.max_pool1d(x, pool, strides=strides, padding="same"),
                 tf.nn.max_pool1d(x, pool, strides, "SAME").numpy())
    assert_close(ops.avg_pool1d(x, pool, strides=strides, padding="same"),
                 tf.nn.avg_pool1d(x, pool, strides, "SAME").numpy())


TORCH_CASES = [  # (pool, strides, padding, input shape); PyTorch allows padding <= pool // 2
    (2, 2, 1, (1, 5, 6, 2)),
    (3, 1, 1, (1, 5, 5, 2)),
    (3, 2, 1, (7, 6, 7, 3)),
    (3, 2, (1, 0), (1, 7, 6, 2)),
    ((3, 2), (1, 2), (1, 1), (1, 5, 6, 2)),
    (2, 1, 0, (1, 4, 5, 2)),
]


def _nchw(torch, x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2))).requires_grad_(True)


@pytest.mark.parametrize("kind", ["max", "avg-include-pad", "avg-exclude-pad"])
def test_explicit_padding_pools_equal_torch(kind):
  torch = import_torch()
  functional = torch.nn.functional
  for pool, strides, padding, shape in TORCH_CASES:
    x = _distinct(shape)
    if kind == "max":
      fast = lambda x: ops.max_pool2d(x, pool, strides=strides, padding=padding)  # noqa: E731
      oracle = lambda t: functional.max_pool2d(t, pool, strides, padding)  # noqa: E731
    else:
      include = kind == "avg-include-pad"
      fast = lambda x: ops.avg_pool2d(x, pool, strides=strides, padding=padding,  # noqa: E731
                                      count_include_pad=include)
      oracle = lambda t: functional.avg_pool2d(t, pool, strides, padding,  # noqa: E731
                                               count_include_pad=include)
    y, w, grad = _jax_value_and_grad(fast, x)
    t = _nchw(torch, x)
    expected = oracle(t)
    (expected * torch.from_numpy(np.ascontiguousarray(w.transpose(0, 3, 1, 2)))).sum().backward()
    what = f"{kind} pool {pool} strides {strides} padding {padding} on {shape}"
    assert_close(y, expected.detach().numpy().transpose(0, 2, 3, 1), err_msg=what)
    assert_close(grad, t.grad.numpy().transpose(0, 2, 3, 1), err_msg="gradient of " + what)


def test_explicit_padding_pools_1d_equal_torch():
  torch = import_torch()
  functional = torch.nn.functional
  for pool, strides, padding, length in [(2, 2, 1, 7), (3, 1, 1, 6), (3, 2, 1, 8)]:
    x = _distinct((2, length, 3))
    t = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 2, 1)))
    assert_close(ops.max_pool1d(x, pool, strides=strides, padding=padding),
                 functional.max_pool1d(t, pool, strides, padding).numpy().transpose(0, 2, 1))
    for include in (True, False):
      assert_close(ops.avg_pool1d(x, pool, strides=strides, padding=padding, count_include_pad=include),
                   functional.avg_pool1d(t, pool, strides, padding, count_include_pad=include)
                   .numpy().transpose(0, 2, 1))
