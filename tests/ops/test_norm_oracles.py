"""Normalisation against external oracles: PyTorch batch_norm and LocalResponseNorm, Keras BatchNormalization.

Conventions bridged here: PyTorch's momentum is 1 - ours, and PyTorch updates the running variance with
the unbiased batch variance (our `unbiased_running_var=True`); Keras uses the biased one (our default).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import ops
from helpers import assert_close, import_tensorflow, import_torch

pytestmark = pytest.mark.oracle


def _inputs(shape, seed=0):
  rng = np.random.default_rng(seed)
  channels = shape[-1]
  x = (rng.normal(size=shape) * 2.0 + 1.5).astype(np.float32)
  scale, bias, mean, var = (rng.uniform(0.5, 1.5, size=(channels,)).astype(np.float32) for _ in range(4))
  return x, scale, bias, mean, var


def _to_torch_layout(x):
  """NHWC / NC numpy -> channels-second contiguous numpy (torch's layout)."""
  return np.ascontiguousarray(np.moveaxis(x, -1, 1))


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5, 2)], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_norm_equals_torch(shape, train):
  torch = import_torch()
  x, scale, bias, mean, var = _inputs(shape)
  momentum, epsilon = 0.9, 1e-3
  running_mean, running_var = torch.from_numpy(mean.copy()), torch.from_numpy(var.copy())
  t = torch.from_numpy(_to_torch_layout(x)).requires_grad_(True)
  weight = torch.from_numpy(scale.copy()).requires_grad_(True)
  offset = torch.from_numpy(bias.copy()).requires_grad_(True)
  expected = torch.nn.functional.batch_norm(t, running_mean, running_var, weight, offset, training=train,
                                            momentum=1 - momentum, eps=epsilon)
  cotangent = np.random.default_rng(5).normal(size=x.shape).astype(np.float32)
  (expected * torch.from_numpy(_to_torch_layout(cotangent))).sum().backward()

  def loss(x, scale, bias):
    y, new_mean, new_var = ops.batch_norm(x, scale, bias, mean, var, train=train, momentum=momentum,
                                          epsilon=epsilon, unbiased_running_var=True)
    return jnp.sum(y * cotangent), (y, new_mean, new_var)

  grads, (y, new_mean, new_var) = jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
  assert_close(y, np.moveaxis(expected.detach().numpy(), 1, -1))
  assert_close(new_mean, running_mean.numpy())  # torch updated its running stats in place
  assert_close(new_var, running_var.numpy())
  assert_close(grads[0], np.moveaxis(t.grad.numpy(), 1, -1), atol=1e-4)  # sums of ~100 terms
  assert_close(grads[1], weight.grad.numpy(), atol=1e-4)
  assert_close(grads[2], offset.grad.numpy(), atol=1e-4)


def test_batch_norm_equals_keras():
  tf = import_tensorflow()
  keras = tf.keras
  x, scale, bias, mean, var = _inputs((4, 3, 3, 2))
  layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3)
  layer.build(x.shape)
  layer.set_weights([scale, bias, mean, var])
  expected_train = layer(x, training=True).numpy()
  keras_mean, keras_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
  expected_eval = layer(x, training=False).numpy()  # uses the just-updated moving statistics

  y, new_mean, new_var = ops.batch_norm(x, scale, bias, mean, var, train=True, momentum=0.9, epsilon=1e-3)
  assert_close(y, expected_train)
  assert_close(new_mean, keras_mean)
  assert_close(new_var, keras_var)  # the biased batch variance, Keras's convention
  y_eval, _, _ = ops.batch_norm(x, scale, bias, new_mean, new_var, train=False, epsilon=1e-3)
  assert_close(y_eval, expected_eval)


@pytest.mark.parametrize("size, alpha, beta, k", [(2, 1e-4, 0.75, 1.0), (3, 0.5, 0.75, 2.0),
                                                  (5, 1.0, 0.5, 1.0), (4, 2.0, 1.0, 0.5)])
def test_local_response_norm_equals_torch(size, alpha, beta, k):
  torch = import_torch()
  x = _inputs((2, 3, 4, 7), seed=size)[0]
  t = torch.from_numpy(_to_torch_layout(x)).requires_grad_(True)
  expected = torch.nn.LocalResponseNorm(size, alpha=alpha, beta=beta, k=k)(t)
  cotangent = np.random.default_rng(3).normal(size=x.shape).astype(np.float32)
  (expected * torch.from_numpy(_to_torch_layout(cotangent))).sum().backward()

  def loss(x):
    y = ops.local_response_norm(x, size, alpha=alpha, beta=beta, k=k)
    return jnp.sum(y * cotangent), y

  grad, y = jax.jit(jax.grad(loss, has_aux=True))(x)
  assert_close(y, np.moveaxis(expected.detach().numpy(), 1, -1))
  assert_close(grad, np.moveaxis(t.grad.numpy(), 1, -1))
