"""Conv2DTranspose, Conv1DTranspose, DepthwiseConv2D, SeparableConv2D, GroupNormalization,
LayerNormalization, Cropping2D, SpatialDropout2D: Keras defaults and variables, outputs against the ops,
dtype / param_dtype, summary counts against Keras, bad input."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn import layers as L
from jaxcnn import ops

from helpers import assert_close, import_tensorflow

_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compute(fn, *args):
  """fn(*args) as one jitted program compiled cheaply (fn may return a pytree)."""
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


def _x(*shape, seed=0, loc=0.0, scale=1.0):
  return (loc + scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _shapes(layer, shape):
  variables = jax.eval_shape(layer.init, jax.random.key(0), jax.ShapeDtypeStruct(shape, jnp.float32))
  return jax.tree.map(lambda a: a.shape, variables)


# ---- defaults and variables ----------------------------------------------------------------------------

def test_keras_defaults():
  t = L.Conv2DTranspose(8, 3)
  assert (t.strides, t.padding, t.output_padding, t.dilation_rate, t.use_bias, t.activation) == (
      1, "valid", None, 1, True, None)
  d = L.DepthwiseConv2D(3)
  assert (d.strides, d.padding, d.depth_multiplier, d.dilation_rate, d.use_bias) == (1, "valid", 1, 1, True)
  s = L.SeparableConv2D(8, 3)
  assert (s.depth_multiplier, s.padding, s.use_bias) == (1, "valid", True)
  g = L.GroupNormalization()
  assert (g.groups, g.epsilon, g.center, g.scale) == (32, 1e-3, True, True)
  n = L.LayerNormalization()
  assert (n.axis, n.epsilon, n.center, n.scale) == (-1, 1e-3, True, True)
  assert L.Cropping2D().cropping == ((0, 0), (0, 0))
  for layer in (t, d, s, g, n):
    assert layer.dtype is None and layer.param_dtype == jnp.float32


@pytest.mark.parametrize("layer, shape, expected", [
    (L.Conv2DTranspose(8, (3, 2)), (1, 5, 5, 3), {"kernel": (3, 2, 8, 3), "bias": (8,)}),
    (L.Conv1DTranspose(8, 4, use_bias=False), (1, 5, 3), {"kernel": (4, 8, 3)}),
    (L.DepthwiseConv2D(3, depth_multiplier=2), (1, 5, 5, 3), {"depthwise_kernel": (3, 3, 3, 2), "bias": (6,)}),
    (L.SeparableConv2D(8, 3, depth_multiplier=2), (1, 5, 5, 3),
     {"depthwise_kernel": (3, 3, 3, 2), "pointwise_kernel": (1, 1, 6, 8), "bias": (8,)}),
    (L.GroupNormalization(groups=2), (1, 5, 5, 4), {"scale": (4,), "bias": (4,)}),
    (L.GroupNormalization(groups=4, center=False), (1, 5, 4), {"scale": (4,)}),
    (L.LayerNormalization(), (1, 5, 6), {"scale": (6,), "bias": (6,)}),
    (L.LayerNormalization(axis=(1, 2), scale=False), (1, 5, 6, 2), {"bias": (5, 6)}),
])
def test_variables_use_keras_names_and_layouts(layer, shape, expected):
  assert _shapes(layer, shape) == {"params": expected}


def test_stateless_layers_have_no_variables():
  assert _shapes(L.Cropping2D(1), (1, 5, 5, 3)) == {}
  assert _shapes(L.SpatialDropout2D(0.5), (1, 5, 5, 3)) == {}


# ---- outputs against the ops ---------------------------------------------------------------------------

def test_conv_layers_compute_their_ops():
  x = jnp.asarray(_x(2, 6, 5, 4))
  cases = [
      (L.Conv2DTranspose(3, 3, strides=2, padding="same", activation="relu"),
       lambda p, x: jax.nn.relu(ops.conv2d_transpose(x, p["kernel"], p["bias"], strides=2, padding="same"))),
      (L.Conv2DTranspose(3, 2, strides=2, padding=1, output_padding=1, dilation_rate=2),
       lambda p, x: ops.conv2d_transpose(x, p["kernel"], p["bias"], strides=2, padding=1, output_padding=1,
                                         dilation=2)),
      (L.DepthwiseConv2D(3, strides=2, padding="same", depth_multiplier=2, dilation_rate=1, activation="tanh"),
       lambda p, x: jnp.tanh(ops.depthwise_conv2d(x, p["depthwise_kernel"], p["bias"], strides=2,
                                                  padding="same"))),
      (L.SeparableConv2D(5, 3, padding="same", depth_multiplier=2, dilation_rate=2),
       lambda p, x: ops.conv2d(ops.depthwise_conv2d(x, p["depthwise_kernel"], padding="same", dilation=2),
                               p["pointwise_kernel"], p["bias"])),
  ]

  def program(x):
    out = []
    for i, (layer, expected) in enumerate(cases):
      variables = layer.init(jax.random.key(i), x)
      params = jax.tree.map(lambda a: a + 0.1, variables["params"])  # non-zero biases
      out.append((layer.apply({"params": params}, x), expected(params, x)))
    return out

  for got, want in _compute(program, x):
    assert_close(got, want)


def test_conv1d_transpose_layer():
  x = jnp.asarray(_x(2, 6, 3))
  layer = L.Conv1DTranspose(4, 3, strides=2, padding="same")

  def program(x):
    y, variables = layer.init_with_output(jax.random.key(0), x)
    p = variables["params"]
    return y, ops.conv1d_transpose(x, p["kernel"], p["bias"], strides=2, padding="same")

  y, expected = _compute(program, x)
  assert y.shape == (2, 12, 4)
  assert_close(y, expected)


def test_norm_layers_compute_their_ops_in_train_and_eval_alike():
  x = jnp.asarray(_x(2, 4, 3, 6, loc=2.0, scale=3.0))

  def program(x):
    group = L.GroupNormalization(groups=3)
    layer = L.LayerNormalization()
    across = L.LayerNormalization(axis=(1, 2))
    out = []
    for module in (group, layer, across):
      variables = module.init(jax.random.key(0), x)
      params = jax.tree.map(lambda a: a * 1.5 + 0.25, variables["params"])
      out.append((module.apply({"params": params}, x), module.apply({"params": params}, x, train=True), params))
    expected = (ops.group_norm(x, out[0][2]["scale"], out[0][2]["bias"], groups=3),
                ops.layer_norm(x, out[1][2]["scale"], out[1][2]["bias"]))
    return out, expected

  ((g, g_train, _), (n, n_train, _), (a, a_train, ap)), (g_expected, n_expected) = _compute(program, x)
  assert_close(g, g_expected)
  assert_close(n, n_expected)
  # axis=(1, 2): statistics over H and W of each (example, channel), scale/bias of shape (H, W).
  x64 = np.asarray(x, np.float64)
  mean, var = x64.mean(axis=(1, 2), keepdims=True), x64.var(axis=(1, 2), keepdims=True)
  expected = (x64 - mean) / np.sqrt(var + 1e-3) * np.asarray(ap["scale"])[None, :, :, None] \
      + np.asarray(ap["bias"])[None, :, :, None]
  assert_close(a, expected)
  for eval_y, train_y in ((g, g_train), (n, n_train), (a, a_train)):
    np.testing.assert_array_equal(eval_y, train_y)  # no running statistics: train = eval


def test_cropping2d():
  x = jnp.arange(2 * 5 * 6 * 1, dtype=jnp.float32).reshape(2, 5, 6, 1)
  for cropping, window in [(1, (slice(1, 4), slice(1, 5))), ((2, 1), (slice(2, 3), slice(1, 5))),
                           (((0, 2), (3, 1)), (slice(0, 3), slice(3, 5)))]:
    y = L.Cropping2D(cropping).apply({}, x)
    np.testing.assert_array_equal(y, x[:, window[0], window[1], :])


def test_spatial_dropout_drops_whole_channels():
  x = jnp.ones((4, 5, 5, 16), jnp.float32)
  layer = L.SpatialDropout2D(0.5)
  np.testing.assert_array_equal(layer.apply({}, x), x)  # eval: the identity, no rng needed
  y = np.asarray(jax.jit(lambda x: layer.apply({}, x, train=True, rngs={"dropout": jax.random.key(3)}))(x))
  # Every (example, channel) map is all zeros or all 1 / (1 - rate) = 2.
  per_map = y.reshape(4, 25, 16)
  assert np.all(per_map.min(axis=1) == per_map.max(axis=1))
  assert set(np.unique(per_map)) == {0.0, 2.0}
  assert 0 < np.mean(per_map[:, 0] == 0.0) < 1
  with pytest.raises(Exception, match="dropout"):
    layer.apply({}, x, train=True)  # no dropout rng in training


# ---- dtype and param_dtype ------------------------------------------------------------------------------

@pytest.mark.parametrize("layer, shape", [
    (L.Conv2DTranspose(4, 3, strides=2), (1, 5, 5, 3)), (L.Conv1DTranspose(4, 3), (1, 5, 3)),
    (L.DepthwiseConv2D(3), (1, 5, 5, 3)), (L.SeparableConv2D(4, 3), (1, 5, 5, 3)),
    (L.GroupNormalization(groups=3), (1, 5, 5, 3)), (L.LayerNormalization(), (1, 5, 3)),
])
def test_dtype_and_param_dtype(layer, shape):
  x32 = jax.ShapeDtypeStruct(shape, jnp.float32)
  x16 = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  variables = jax.eval_shape(layer.init, jax.random.key(0), x32)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  # None: the promoted dtype of input and parameters, as flax.linen.
  assert jax.eval_shape(layer.apply, variables, x32).dtype == jnp.float32
  assert jax.eval_shape(layer.apply, variables, x16).dtype == jnp.float32
  low = layer.clone(dtype=jnp.bfloat16)
  assert jax.eval_shape(low.apply, variables, x32).dtype == jnp.bfloat16
  half = layer.clone(param_dtype=jnp.bfloat16)
  half_vars = jax.eval_shape(half.init, jax.random.key(0), x16)
  assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(half_vars))
  assert jax.eval_shape(half.apply, half_vars, x16).dtype == jnp.bfloat16


def test_norm_layers_keep_float32_statistics_under_bfloat16_compute():
  x = jnp.asarray(_x(2, 4, 4, 8, loc=64.0, scale=2.0))
  low = (L.GroupNormalization(groups=2, dtype=jnp.bfloat16), L.LayerNormalization(dtype=jnp.bfloat16))

  def program(x):
    out = []
    for layer in low:
      variables = layer.init(jax.random.key(0), x)
      out.append((layer.apply(variables, x), layer.clone(dtype=jnp.float32).apply(variables, x)))
    return out

  for y, reference in _compute(program, x):
    assert y.dtype == jnp.bfloat16
    assert_close(y, reference, dtype=jnp.bfloat16)


# ---- summary counts against Keras ----------------------------------------------------------------------

@pytest.mark.oracle
def test_summary_counts_parameters_as_keras():
  import_tensorflow()
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  keras = pytest.importorskip("keras")
  kl = keras.layers
  ours = L.Sequential([
      L.Conv2DTranspose(8, 3, strides=2, padding="same"), L.DepthwiseConv2D(3, depth_multiplier=2),
      L.GroupNormalization(groups=4), L.SeparableConv2D(6, 3, depth_multiplier=3, use_bias=False),
      L.LayerNormalization(), L.Cropping2D(((1, 0), (0, 1))), L.SpatialDropout2D(0.3),
      L.DepthwiseConv2D(2, use_bias=False), L.LayerNormalization(axis=(1, 2), center=False)])
  theirs = keras.Sequential([
      keras.Input((7, 7, 3)),
      kl.Conv2DTranspose(8, 3, strides=2, padding="same"), kl.DepthwiseConv2D(3, depth_multiplier=2),
      kl.GroupNormalization(groups=4), kl.SeparableConv2D(6, 3, depth_multiplier=3, use_bias=False),
      kl.LayerNormalization(), kl.Cropping2D(((1, 0), (0, 1))), kl.SpatialDropout2D(0.3),
      kl.DepthwiseConv2D(2, use_bias=False), kl.LayerNormalization(axis=(1, 2), center=False)])
  result = jaxcnn.summary(ours, (7, 7, 3), print_fn=None)
  assert [row.params for row in result.rows] == [layer.count_params() for layer in theirs.layers]
  assert [row.output_shape for row in result.rows] == [tuple(layer.output.shape) for layer in theirs.layers]
  assert result.total_params == theirs.count_params()
  assert [row.name for row in result.rows] == [
      "conv2d_transpose", "depthwise_conv2d", "group_normalization", "separable_conv2d", "layer_normalization",
      "cropping2d", "spatial_dropout2d", "depthwise_conv2d_1", "layer_normalization_1"]


# ---- bad input -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make, message", [
    (lambda: L.Conv2DTranspose(0, 3), "Conv2DTranspose: filters must be an int >= 1"),
    (lambda: L.Conv2DTranspose(4, (3, 3, 3)), "Conv2DTranspose: kernel_size must be an int or a sequence of 2"),
    (lambda: L.Conv2DTranspose(4, 3, strides=2, output_padding=2), "Conv2DTranspose: output_padding 2 must be "
     "smaller than strides 2 or dilation_rate 1"),
    (lambda: L.Conv2DTranspose(4, 3, output_padding=-1), "Conv2DTranspose: output_padding must be >= 0"),
    (lambda: L.Conv1DTranspose(4, 3, padding="causal"), "Conv1DTranspose: padding must be 'valid', 'same'"),
    (lambda: L.DepthwiseConv2D(3, depth_multiplier=0), "DepthwiseConv2D: depth_multiplier must be an int >= 1"),
    (lambda: L.DepthwiseConv2D(3, dilation_rate=0), "DepthwiseConv2D: dilation_rate must be >= 1"),
    (lambda: L.SeparableConv2D(4, 3, activation="swoosh"), "SeparableConv2D: unknown activation 'swoosh'"),
    (lambda: L.GroupNormalization(groups=0), "GroupNormalization: groups must be an int >= 1"),
    (lambda: L.GroupNormalization(epsilon=0), "GroupNormalization: epsilon must be a number > 0"),
    (lambda: L.LayerNormalization(axis="last"), "LayerNormalization: axis must be an int or a non-empty"),
    (lambda: L.LayerNormalization(axis=()), "LayerNormalization: axis must be an int or a non-empty"),
    (lambda: L.Cropping2D(-1), "Cropping2D: cropping must be non-negative"),
    (lambda: L.Cropping2D("same"), "Cropping2D: cropping must be an int"),
    (lambda: L.SpatialDropout2D(1.0), r"SpatialDropout2D: rate must be a number in \[0, 1\)"),
])
def test_bad_construction_raises_naming_layer_and_argument(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def _init(layer, shape, dtype=jnp.float32):
  return jax.eval_shape(layer.init, {"params": jax.random.key(0), "dropout": jax.random.key(1)},
                        jax.ShapeDtypeStruct(shape, dtype))


@pytest.mark.parametrize("layer, shape, dtype, message", [
    (L.Conv2DTranspose(4, 3), (5, 5, 3), jnp.float32, r"Conv2DTranspose expects input of rank 4"),
    (L.Conv2DTranspose(4, 3), (1, 5, 5, 3), jnp.int32, "Conv2DTranspose: x must be a floating-point array"),
    (L.Conv2DTranspose(4, 3, padding=3), (1, 2, 2, 3), jnp.float32,
     "Conv2DTranspose: padding 3 leaves no output"),
    (L.Conv1DTranspose(4, 3), (1, 5, 5, 3), jnp.float32, r"Conv1DTranspose expects input of rank 3"),
    (L.DepthwiseConv2D(5), (1, 3, 3, 2), jnp.float32, r"DepthwiseConv2D: kernel of w \(5, 5\)"),
    (L.SeparableConv2D(4, 3), (1, 5, 5, 3), jnp.uint8, "SeparableConv2D: x must be a floating-point array"),
    (L.GroupNormalization(), (1, 5, 5, 16), jnp.float32, r"GroupNormalization: groups \(32\) must divide the "
     r"number of channels \(16\)"),
    (L.GroupNormalization(groups=3), (1, 5, 5, 4), jnp.float32, r"groups \(3\) must divide"),
    (L.GroupNormalization(groups=2), (4,), jnp.float32, "GroupNormalization expects input of rank >= 2"),
    (L.LayerNormalization(axis=3), (1, 5, 3), jnp.float32, "LayerNormalization: axis 3 is out of range"),
    (L.LayerNormalization(axis=(1, -2)), (1, 5, 3), jnp.float32,
     "LayerNormalization: axis .* names an axis twice"),
    (L.LayerNormalization(), (1, 5, 3), jnp.int32, "LayerNormalization: x must be a floating-point array"),
    (L.Cropping2D(3), (1, 6, 8, 1), jnp.float32, r"Cropping2D: cropping 3 leaves nothing of an input of shape "
     r"\(1, 6, 8, 1\)"),
    (L.SpatialDropout2D(0.5), (1, 6, 3), jnp.float32, "SpatialDropout2D expects input of rank 4"),
])
def test_bad_input_raises_naming_the_layer(layer, shape, dtype, message):
  with pytest.raises(ValueError, match=message):
    _init(layer, shape, dtype)
