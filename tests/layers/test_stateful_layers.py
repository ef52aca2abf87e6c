"""BatchNorm and Dropout: train vs eval, Keras defaults, cross-device statistics, bad input."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

from jaxcnn import ops
from jaxcnn.layers import BatchNorm, Dropout

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compute(fn, *args):
  """fn(*args) as one jitted program compiled cheaply (fn may return a pytree)."""
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


def _x(*shape, seed=1, loc=0.0, scale=1.0):
  return (loc + scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


# -- BatchNorm -------------------------------------------------------------------------------------------

def test_batch_norm_keras_defaults_and_variables():
  layer = BatchNorm()
  assert (layer.momentum, layer.epsilon, layer.axis_name) == (0.99, 1e-3, None)
  variables = jax.eval_shape(layer.init, jax.random.key(0), jax.ShapeDtypeStruct((2, 3, 3, 5), jnp.float32))
  assert jax.tree.map(lambda a: a.shape, variables) == {
      "params": {"scale": (5,), "bias": (5,)}, "batch_stats": {"mean": (5,), "var": (5,)}}
  bare = jax.eval_shape(BatchNorm(use_scale=False, use_bias=False).init, jax.random.key(0),
                        jax.ShapeDtypeStruct((2, 5), jnp.float32))
  assert set(bare) == {"batch_stats"}


def test_batch_norm_train_vs_eval():
  x = _x(4, 3, 3, 2, loc=2.0, scale=3.0)
  layer = BatchNorm()

  def program(x):
    variables = layer.init(jax.random.key(0), x)
    eval_y, eval_updates = layer.apply(variables, x, mutable=["batch_stats"])
    train_y, train_updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    return variables, eval_y, eval_updates, train_y, train_updates

  variables, eval_y, eval_updates, train_y, train_updates = _compute(program, x)
  x64 = x.astype(np.float64)
  # init leaves the running statistics at their initial values.
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(2))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(2))
  # eval: running statistics (0, 1), nothing moves.
  assert_close(eval_y, x64 / np.sqrt(1.0 + 1e-3))
  np.testing.assert_array_equal(eval_updates["batch_stats"]["mean"], np.zeros(2))
  np.testing.assert_array_equal(eval_updates["batch_stats"]["var"], np.ones(2))
  # train: batch statistics, and running ones move by the Keras rule new = 0.99 old + 0.01 batch.
  mean, var = x64.mean(axis=(0, 1, 2)), x64.var(axis=(0, 1, 2))
  assert_close(train_y, (x64 - mean) / np.sqrt(var + 1e-3), atol=1e-4, rtol=1e-4)
  assert_close(train_updates["batch_stats"]["mean"], 0.01 * mean)
  assert_close(train_updates["batch_stats"]["var"], 0.99 + 0.01 * var)


def test_batch_norm_matches_op_with_trained_values():
  x = _x(6, 4, loc=-1.0)
  variables = {"params": {"scale": _x(4, seed=2), "bias": _x(4, seed=3)},
               "batch_stats": {"mean": _x(4, seed=4), "var": 1.0 + _x(4, seed=5) ** 2}}
  layer = BatchNorm(momentum=0.9, epsilon=1e-5)
  def program(v, x):
    state = (v["params"]["scale"], v["params"]["bias"], v["batch_stats"]["mean"], v["batch_stats"]["var"])
    return ((layer.apply(v, x), layer.apply(v, x, train=True, mutable=["batch_stats"])),
            (ops.batch_norm(x, *state, train=False, momentum=0.9, epsilon=1e-5),
             ops.batch_norm(x, *state, train=True, momentum=0.9, epsilon=1e-5)))

  (y_eval, (y_train, updates)), (op_eval, op_train) = _compute(program, variables, x)
  assert_close(y_eval, op_eval[0])
  assert_close(y_train, op_train[0])
  assert_close(updates["batch_stats"]["mean"], op_train[1])
  assert_close(updates["batch_stats"]["var"], op_train[2])


def test_batch_norm_axis_name_averages_statistics_across_devices():
  devices = jax.local_devices()[:4]
  if len(devices) < 4:
    pytest.skip("needs 4 devices (conftest forces 4 host CPU devices)")
  x = _x(4, 2, 3, loc=1.0, scale=2.0)  # 4 devices x 2 examples x 3 channels
  layer = BatchNorm(axis_name="batch")
  variables = {"params": {"scale": np.ones(3, np.float32), "bias": np.zeros(3, np.float32)},
               "batch_stats": {"mean": np.zeros(3, np.float32), "var": np.ones(3, np.float32)}}

  @functools.partial(jax.pmap, axis_name="batch", in_axes=(None, 0), devices=devices)
  def step(variables, x):
    return layer.apply(variables, x, train=True, mutable=["batch_stats"])

  y, updates = step(variables, x)
  flat = x.reshape(8, 3).astype(np.float64)
  mean, var = flat.mean(axis=0), flat.var(axis=0)
  assert_close(np.asarray(y).reshape(8, 3), (flat - mean) / np.sqrt(var + 1e-3), atol=1e-4, rtol=1e-4)
  for device in range(4):  # every replica holds the same, global, statistics
    assert_close(updates["batch_stats"]["mean"][device], 0.01 * mean)
    assert_close(updates["batch_stats"]["var"][device], 0.99 + 0.01 * var)


def test_batch_norm_training_without_mutable_batch_stats_raises():
  # As flax.linen.BatchNorm: a dropped update would leave the running statistics at 0 / 1.
  x = _x(4, 3, 3, 2)
  layer = BatchNorm()
  variables = layer.init(jax.random.key(0), x, train=True)  # init with train=True is fine
  for mutable in (False, ["intermediates"]):
    with pytest.raises(ValueError, match=r"BatchNorm: train=True updates the running statistics, but the "
                                         r"batch_stats collection is immutable; call apply\(\.\.\., "
                                         r"mutable=\['batch_stats'\]\)"):
      layer.apply(variables, x, train=True, mutable=mutable)
  # Inside a model the error names the layer class too, and eval needs nothing mutable.
  from jaxcnn import models
  model = models.get("mnist_bn_cnn")
  images = jnp.zeros((2, 28, 28, 1))
  model_vars = jax.eval_shape(model.init, jax.random.key(0), images)
  with pytest.raises(ValueError, match="BatchNorm: train=True"):
    jax.eval_shape(lambda v: model.apply(v, images, train=True, rngs={"dropout": jax.random.key(1)}),
                   model_vars)
  assert jax.eval_shape(lambda v: model.apply(v, images), model_vars).shape == (2, 10)


@pytest.mark.parametrize("dtype", [None, jnp.bfloat16])
def test_batch_norm_keeps_float32_statistics_under_bfloat16(dtype):
  x = _x(8, 3, 3, 4, loc=3.0, scale=2.0)
  layer = BatchNorm(momentum=0.9, dtype=dtype)
  x_in = jnp.asarray(x, jnp.bfloat16)
  variables = layer.init(jax.random.key(0), x_in)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  y, updates = layer.apply(variables, x_in, train=True, mutable=["batch_stats"])
  # dtype None: promoted from the bfloat16 input and float32 parameters (flax's rule); bfloat16 forced.
  assert y.dtype == (jnp.float32 if dtype is None else jnp.bfloat16)
  stats = updates["batch_stats"]
  assert stats["mean"].dtype == stats["var"].dtype == jnp.float32
  # The statistics are those of the bfloat16 input computed in float32, not rounded to bfloat16.
  xb = np.asarray(x_in, np.float64).reshape(-1, 4)
  np.testing.assert_allclose(stats["mean"], 0.1 * xb.mean(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(stats["var"], 0.9 + 0.1 * xb.var(0), rtol=1e-6, atol=1e-6)


def test_batch_norm_axis_name_under_shard_map_equals_one_device():
  # Batch sharded over 4 devices with shard_map (check_vma on): the statistics, the output and the
  # gradients equal the 1-device run on the whole batch.
  from jax.sharding import PartitionSpec as P
  if len(jax.devices()) < 4:
    pytest.skip("needs 4 devices (conftest forces 4 host CPU devices)")
  mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:4])
  x = _x(8, 3, 3, 2, loc=1.0, scale=2.0)
  weights = _x(8, 3, 3, 2, seed=4)
  layer, global_layer = BatchNorm(axis_name="data", momentum=0.9), BatchNorm(momentum=0.9)
  variables = {"params": {"scale": 1.0 + _x(2, seed=2), "bias": _x(2, seed=3)},
               "batch_stats": {"mean": np.zeros(2, np.float32), "var": np.ones(2, np.float32)}}

  def loss(layer, params, x, w):
    y, updates = layer.apply({**variables, "params": params}, x, train=True, mutable=["batch_stats"])
    return jnp.sum(y * w), (y, updates["batch_stats"])

  def sharded(params, x, w):
    (_, (y, stats)), grads = jax.value_and_grad(lambda p: loss(layer, p, x, w), has_aux=True)(params)
    return y, stats, grads

  y, stats, grads = jax.jit(jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                          out_specs=(P("data"), P(), P())))(variables["params"], x, weights)
  (_, (y1, stats1)), grads1 = jax.jit(jax.value_and_grad(
      lambda p, x, w: loss(global_layer, p, x, w), has_aux=True))(variables["params"], x, weights)
  assert_close(y, y1)
  for a, b in zip(jax.tree.leaves((stats, grads)), jax.tree.leaves((stats1, grads1))):
    assert_close(a, b)


def test_batch_norm_bad_input():
  with pytest.raises(ValueError, match=r"BatchNorm: momentum must be a number in \[0, 1\), got 1.0"):
    BatchNorm(momentum=1.0)
  with pytest.raises(ValueError, match="BatchNorm: epsilon must be a number > 0"):
    BatchNorm(epsilon=0.0)
  with pytest.raises(ValueError, match=r"BatchNorm expects input of rank >= 2"):
    jax.eval_shape(BatchNorm().init, jax.random.key(0), jax.ShapeDtypeStruct((5,), jnp.float32))


# -- Dropout ---------------------------------------------------------------------------------------------

def test_dropout_train_vs_eval():
  x = 1.0 + _x(4, 250, scale=0.0)  # all ones: kept values show the 1 / (1 - rate) scaling
  layer = Dropout(0.25)

  def program(x):
    key_a, key_b = jax.random.key(7), jax.random.key(8)
    return (layer.apply({}, x), layer.apply({}, x, train=True, rngs={"dropout": key_a}),
            layer.apply({}, x, train=True, rngs={"dropout": key_a}),
            layer.apply({}, x, train=True, rngs={"dropout": key_b}))

  eval_y, train_a, train_a_again, train_b = _compute(program, x)
  np.testing.assert_array_equal(eval_y, x)  # identity in evaluation, no rng needed
  kept = train_a != 0
  np.testing.assert_allclose(train_a[kept], 1.0 / 0.75, rtol=1e-6)
  assert 0.15 < 1.0 - kept.mean() < 0.35
  np.testing.assert_array_equal(train_a, train_a_again)  # same rng, same mask
  assert np.any(train_a != train_b)  # another rng, another mask


def test_dropout_rate_zero_and_bad_input():
  x = _x(2, 3)
  np.testing.assert_array_equal(Dropout(0.0).apply({}, x, train=True), x)
  with pytest.raises(ValueError, match=r"Dropout: rate must be a number in \[0, 1\), got 1.0"):
    Dropout(1.0)
  with pytest.raises(ValueError, match=r"Dropout: rate must be a number in \[0, 1\)"):
    Dropout(-0.1)
  # Training without a `dropout` rng is an error, never a silent identity.
  with pytest.raises(Exception, match="dropout"):
    Dropout(0.5).apply({}, x, train=True)
