"""Normalisation ops: batch_norm and local_response_norm, fast vs reference, formulas, pmap, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn import ops, reference
from helpers import assert_close


def _inputs(shape, seed=0, offset=1.5):
  """x of `shape` with a non-zero mean, and positive (C,) scale, bias, running mean, running var."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 5)
  channels = shape[-1]
  x = jax.random.normal(keys[0], shape) * 2.0 + offset
  scale, bias, mean, var = (jax.random.uniform(k, (channels,)) + 0.5 for k in keys[1:])
  return x, scale, bias, mean, var


@pytest.mark.parametrize("shape, train, unbiased", [
    ((7, 3), True, False),
    ((1, 3, 2, 4), True, True),
    ((7, 2, 3, 5), True, False),
    ((7, 2, 3, 5), False, False),
], ids=["rank2-train", "batch1-train-unbiased", "batch7-train", "batch7-eval"])
def test_batch_norm_matches_reference(shape, train, unbiased):
  x, scale, bias, mean, var = _inputs(shape)
  jaxcnn.verify("batch_norm", x, scale, bias, mean, var, train=train, momentum=0.9,
                unbiased_running_var=unbiased).raise_if_failed()


def test_batch_norm_without_scale_and_bias_matches_reference():
  x, _, _, mean, var = _inputs((7, 2, 2, 3))
  jaxcnn.verify("batch_norm", x, None, None, mean, var, train=True).raise_if_failed()


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_batch_norm_bfloat16_matches_reference(train):
  x, scale, bias, mean, var = (a.astype(jnp.bfloat16) for a in _inputs((7, 2, 3, 4)))
  result = jaxcnn.verify("batch_norm", x, scale, bias, mean, var, train=train)
  assert result.dtype == "bfloat16"
  result.raise_if_failed()


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_batch_norm_train_formula(module):
  x, scale, bias, mean, var = (np.asarray(a, np.float64) for a in _inputs((7, 2, 3, 4)))
  y, new_mean, new_var = module.batch_norm(*(jnp.asarray(a, jnp.float32) for a in (x, scale, bias, mean, var)),
                                           train=True, momentum=0.8, epsilon=1e-3)
  flat = x.reshape(-1, 4)
  batch_mean, batch_var = flat.mean(0), flat.var(0)  # biased variance (ddof=0), as Keras
  assert_close(y, (x - batch_mean) / np.sqrt(batch_var + 1e-3) * scale + bias)
  assert_close(new_mean, 0.8 * mean + 0.2 * batch_mean)
  assert_close(new_var, 0.8 * var + 0.2 * batch_var)
  # The normalised output has zero mean and unit variance per channel (up to epsilon).
  normalised = (np.asarray(y, np.float64) - bias) / scale
  assert_close(normalised.reshape(-1, 4).mean(0), np.zeros(4))
  assert_close(normalised.reshape(-1, 4).var(0), batch_var / (batch_var + 1e-3))


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_batch_norm_unbiased_running_var(module):
  x, scale, bias, mean, var = (np.asarray(a, np.float64) for a in _inputs((5, 3)))
  y, new_mean, new_var = module.batch_norm(*(jnp.asarray(a, jnp.float32) for a in (x, scale, bias, mean, var)),
                                           train=True, momentum=0.9, unbiased_running_var=True)
  assert_close(new_var, 0.9 * var + 0.1 * x.var(0, ddof=1))
  assert_close(new_mean, 0.9 * mean + 0.1 * x.mean(0))
  # Normalisation still uses the biased variance.
  assert_close(y, (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3) * scale + bias)


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_batch_norm_eval_uses_running_stats_and_returns_them_unchanged(module):
  x, scale, bias, mean, var = _inputs((3, 2, 2, 4))
  y, new_mean, new_var = module.batch_norm(x, scale, bias, mean, var, train=False, epsilon=1e-2)
  expected = ((np.asarray(x) - np.asarray(mean)) / np.sqrt(np.asarray(var) + 1e-2) * np.asarray(scale)
              + np.asarray(bias))
  assert_close(y, expected)
  np.testing.assert_array_equal(new_mean, mean)
  np.testing.assert_array_equal(new_var, var)


def test_batch_norm_statistics_in_float32_for_bfloat16_input():
  # A large common offset: bfloat16 sums of ~100 values near 64 would lose the spread; float32
  # statistics of the same (bfloat16-rounded) values match the float32 computation.
  x, scale, bias, mean, var = _inputs((6, 4, 4, 3), offset=64.0)
  x16 = x.astype(jnp.bfloat16)
  y16, mean16, var16 = ops.batch_norm(x16, scale, bias, mean, var, train=True)
  y32, mean32, var32 = ops.batch_norm(x16.astype(jnp.float32), scale, bias, mean, var, train=True)
  assert y16.dtype == jnp.bfloat16 and mean16.dtype == jnp.float32
  assert_close(mean16, mean32, dtype=jnp.float32)
  assert_close(var16, var32, dtype=jnp.float32)
  assert_close(y16, y32, dtype=jnp.bfloat16)


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("unbiased", [False, True], ids=["biased", "unbiased"])
def test_batch_norm_pmap_axis_name_equals_global_batch(module, unbiased):
  devices = jax.local_devices()[:4]
  assert len(devices) == 4, "conftest forces 4 host CPU devices"
  x, scale, bias, mean, var = _inputs((8, 3, 2, 3))
  kwargs = dict(train=True, momentum=0.9, unbiased_running_var=unbiased)
  y, new_mean, new_var = module.batch_norm(x, scale, bias, mean, var, **kwargs)
  sharded = jax.pmap(
      lambda xs: module.batch_norm(xs, scale, bias, mean, var, axis_name="batch", **kwargs),
      axis_name="batch", devices=devices)
  ys, means, variances = sharded(x.reshape(4, 2, 3, 2, 3))
  assert_close(ys.reshape(x.shape), y)
  for d in range(4):  # every device holds the same, global, running statistics
    assert_close(means[d], new_mean)
    assert_close(variances[d], new_var)


def test_batch_norm_under_jit_with_sharded_batch_uses_global_statistics():
  # No axis_name under jit: the batch axis is split over 4 devices, yet the means are global.
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:4]), ("batch",))
  x, scale, bias, mean, var = _inputs((8, 3, 2, 3))
  xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch")))
  y, new_mean, new_var = jax.jit(lambda x: ops.batch_norm(x, scale, bias, mean, var, train=True))(xs)
  assert len(xs.sharding.device_set) == 4
  expected = reference.batch_norm(x, scale, bias, mean, var, train=True)
  for got, want in zip((y, new_mean, new_var), expected):
    assert_close(got, want)


def test_batch_norm_gradients_flow_through_batch_statistics():
  # In training the batch mean depends on x, so a constant shift of x changes nothing: the gradient of
  # any loss w.r.t. x sums to zero per channel.
  x, scale, bias, mean, var = _inputs((4, 3, 3, 2))
  weights = jax.random.normal(jax.random.PRNGKey(9), x.shape)
  grad = jax.grad(lambda x: jnp.sum(ops.batch_norm(x, scale, bias, mean, var, train=True)[0] * weights))(x)
  assert_close(jnp.sum(grad, axis=(0, 1, 2)), np.zeros(2), atol=1e-4)


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_batch_norm_rejects_bad_input(module):
  x, scale, bias, mean, var = _inputs((2, 3, 3, 4))
  bn = module.batch_norm
  with pytest.raises(ValueError, match=r"x must have rank >= 2"):
    bn(jnp.zeros((4,)), scale, bias, mean, var, train=True)
  with pytest.raises(ValueError, match=r"x must be a floating-point"):
    bn(jnp.zeros((2, 4), jnp.int32), scale, bias, mean, var, train=True)
  for name in ("scale", "bias", "mean", "var"):
    args = dict(scale=scale, bias=bias, mean=mean, var=var)
    args[name] = jnp.ones((3,))
    with pytest.raises(ValueError, match=rf"{name} must have shape \(4,\) to match the channels of x"):
      bn(x, args["scale"], args["bias"], args["mean"], args["var"], train=True)
  with pytest.raises(ValueError, match=r"mean is required"):
    bn(x, scale, bias, None, var, train=False)
  with pytest.raises(ValueError, match=r"var is required"):
    bn(x, scale, bias, mean, None, train=True)
  with pytest.raises(ValueError, match=r"train must be a Python bool"):
    bn(x, scale, bias, mean, var, train="yes")
  for momentum in (-0.1, 1.5):
    with pytest.raises(ValueError, match=r"momentum must be a number in \[0, 1\]"):
      bn(x, scale, bias, mean, var, train=True, momentum=momentum)
  for epsilon in (0.0, -1e-3):
    with pytest.raises(ValueError, match=r"epsilon must be a positive number"):
      bn(x, scale, bias, mean, var, train=True, epsilon=epsilon)
  with pytest.raises(ValueError, match=r"unbiased_running_var=True needs more than one value"):
    bn(jnp.ones((1, 4)), scale, bias, mean, var, train=True, unbiased_running_var=True)


@pytest.mark.parametrize("size", [1, 2, 5, 8])
def test_local_response_norm_matches_reference(size):
  x = jax.random.normal(jax.random.PRNGKey(size), (2, 3, 2, 7)) * 3.0
  jaxcnn.verify("local_response_norm", x, size, alpha=0.5, beta=0.75, k=2.0).raise_if_failed()


def test_local_response_norm_bfloat16_and_rank3_match_reference():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 2, 6)).astype(jnp.bfloat16)
  jaxcnn.verify("local_response_norm", x, 5, alpha=1.0).raise_if_failed()
  jaxcnn.verify("local_response_norm", jax.random.normal(jax.random.PRNGKey(1), (3, 4, 5)), 3,
                alpha=0.3, beta=0.5).raise_if_failed()


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_local_response_norm_hand_computed(module):
  # size 2: window(c) = channels c - 1 and c; alpha / size = 1, beta = 1, k = 1:
  #   y = [1 / (1 + 1), 2 / (1 + 1 + 4), 3 / (1 + 4 + 9)].
  x = jnp.asarray([[1.0, 2.0, 3.0]])
  y = module.local_response_norm(x, 2, alpha=2.0, beta=1.0, k=1.0)
  assert_close(y, [[1 / 2, 2 / 6, 3 / 14]])


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_local_response_norm_rejects_bad_input(module):
  x = jnp.ones((1, 2, 2, 3))
  with pytest.raises(ValueError, match=r"x must have rank >= 2"):
    module.local_response_norm(jnp.ones((3,)))
  with pytest.raises(ValueError, match=r"x must be a floating-point"):
    module.local_response_norm(jnp.ones((1, 3), jnp.int32))
  for size in (0, -2, 2.5, True):
    with pytest.raises(ValueError, match=r"size must be a positive int"):
      module.local_response_norm(x, size)
  for name in ("alpha", "beta", "k"):
    with pytest.raises(ValueError, match=rf"{name} must be a real number"):
      module.local_response_norm(x, 3, **{name: "1"})
