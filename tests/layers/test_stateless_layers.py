"""Stateless layers: each against the functional op it wraps, Keras defaults, parameters, bad input."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_close

from jaxcnn import ops
from jaxcnn.layers import (ACTIVATIONS, Activation, AvgPool1D, AvgPool2D, Conv1D, Conv2D, Dense, Flatten,
                           GlobalAvgPool1D, GlobalAvgPool2D, GlobalMaxPool1D, GlobalMaxPool2D,
                           LocalResponseNorm, MaxPool1D, MaxPool2D, UpSampling2D, ZeroPadding2D)

KEY = jax.random.key(0)
# Eager flax code compiles every primitive separately; one program per check at XLA's lowest
# optimisation level costs a fraction of that, and exactness is unaffected at these tolerances.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compute(fn, *args):
  """fn(*args) as one jitted program compiled cheaply (fn may return a pytree)."""
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


def _apply(layer, x, expected_fn=None):
  """A parameter-free layer's eval output on x and, in the same program, expected_fn(x) if given."""
  if expected_fn is None:
    return _compute(lambda v: layer.apply({}, v), x)
  return _compute(lambda v: (layer.apply({}, v), expected_fn(v)), x)


def _x(*shape, seed=1):
  # numpy, not jax.random: every new shape would cost a compile of the PRNG.
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _trace_init(layer, x):
  """Initialises abstractly: enough to reach every shape check, and nothing is compiled."""
  return jax.eval_shape(layer.init, KEY, x)


def _init_apply(layer, x, expected_fn=None):
  """(variables, eval output[, expected_fn(params, x)]) of `layer` on x, in one jitted program."""
  def program(x):
    variables = layer.init(KEY, x)
    y = layer.apply(variables, x)
    if expected_fn is None:
      return variables, y
    return variables, y, expected_fn(variables["params"], x)
  return _compute(program, x)


# -- Conv2D / Conv1D ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(strides=2, padding="same"),
    dict(padding=1, dilation_rate=2),
    dict(groups=2, padding=((0, 1), (2, 0))),
    dict(strides=(1, 2), use_bias=False),
])
def test_conv2d_matches_op(kwargs):
  x = _x(2, 7, 8, 4)
  layer = Conv2D(6, 3, **kwargs)
  op_kwargs = {("dilation" if k == "dilation_rate" else k): v for k, v in kwargs.items() if k != "use_bias"}
  variables, y, expected = _init_apply(
      layer, x, lambda p, v: ops.conv2d(v, p["kernel"], p.get("bias"), **op_kwargs))
  params = variables["params"]
  assert_close(y, expected)
  assert params["kernel"].shape == (3, 3, 4 // kwargs.get("groups", 1), 6)
  assert ("bias" in params) == kwargs.get("use_bias", True)


def test_conv2d_keras_defaults():
  layer = Conv2D(5, 3)
  assert (layer.strides, layer.padding, layer.dilation_rate, layer.groups, layer.use_bias,
          layer.activation) == (
      1, "valid", 1, 1, True, None)
  variables, y = _init_apply(layer, _x(1, 8, 8, 2))
  assert y.shape == (1, 6, 6, 5)  # "valid" by default, as Keras and PyTorch
  kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
  # Glorot uniform: U(-l, l), l = sqrt(6 / (fan_in + fan_out)), fan = receptive field * channels.
  limit = math.sqrt(6.0 / (3 * 3 * 2 + 3 * 3 * 5))
  assert float(jnp.max(jnp.abs(kernel))) <= limit
  assert float(jnp.std(kernel)) == pytest.approx(limit / math.sqrt(3), rel=0.25)
  np.testing.assert_array_equal(np.asarray(bias), np.zeros(5))


def test_conv2d_activation_is_applied():
  x = _x(1, 6, 6, 3)
  _, y, linear = _init_apply(Conv2D(4, 3, activation="relu"), x,
                             lambda p, v: ops.conv2d(v, p["kernel"], p["bias"]))
  assert_close(y, jax.nn.relu(linear))
  assert float(jnp.min(y)) == 0.0 and float(jnp.min(linear)) < 0.0


def test_conv1d_matches_op():
  x = _x(2, 9, 4)
  layer = Conv1D(3, 3, strides=2, padding="same", groups=1)
  variables, y, expected = _init_apply(
      layer, x, lambda p, v: ops.conv1d(v, p["kernel"], p["bias"], strides=2, padding="same"))
  assert variables["params"]["kernel"].shape == (3, 4, 3)
  assert_close(y, expected)
  assert Conv1D(3, 3).padding == "valid"


def test_conv_bad_input_names_the_layer():
  with pytest.raises(ValueError, match=r"Conv2D expects input of rank 4 \(N, H, W, C\), got shape \(8, 8, 3\)"):
    _trace_init(Conv2D(4, 3), jnp.ones((8, 8, 3)))
  with pytest.raises(ValueError, match=r"Conv1D expects input of rank 3 \(N, L, C\)"):
    _trace_init(Conv1D(4, 3), jnp.ones((1, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"Conv2D: input channels \(3\) must be divisible by groups \(2\)"):
    _trace_init(Conv2D(4, 3, groups=2), jnp.ones((1, 8, 8, 3)))
  with pytest.raises(ValueError, match=r"Conv2D: filters \(5\) must be divisible by groups \(2\)"):
    Conv2D(5, 3, groups=2)
  with pytest.raises(ValueError, match="Conv2D: filters must be an int >= 1"):
    Conv2D(0, 3)
  with pytest.raises(ValueError, match="Conv2D: kernel_size"):
    Conv2D(4, (3, 3, 3))
  with pytest.raises(ValueError, match="Conv2D: padding must be 'valid', 'same'"):
    Conv2D(4, 3, padding="full")
  with pytest.raises(ValueError, match="Conv2D: unknown activation 'rellu'; known names: elu, gelu"):
    Conv2D(4, 3, activation="rellu")
  # A padding the op rejects at call time still names the layer.
  with pytest.raises(ValueError, match="Conv2D: .*padding"):
    _trace_init(Conv2D(4, 3, padding=-1), jnp.ones((1, 8, 8, 3)))


# -- Dense / Flatten ---------------------------------------------------------------------------------

def test_dense_matches_matmul_and_applies_on_last_axis():
  x = _x(2, 5)
  variables, y = _init_apply(Dense(3, activation="tanh"), x)
  params = variables["params"]
  assert params["kernel"].shape == (5, 3)
  kernel, bias = np.asarray(params["kernel"], np.float64), np.asarray(params["bias"], np.float64)
  assert_close(y, np.tanh(x.astype(np.float64) @ kernel + bias[None, :]), jnp.float32)
  y3 = jax.eval_shape(lambda v: Dense(3).init_with_output(KEY, v)[0], jax.ShapeDtypeStruct((2, 4, 5), jnp.float32))
  assert y3.shape == (2, 4, 3)
  variables = jax.eval_shape(Dense(3, use_bias=False).init, KEY, x)
  assert set(variables["params"]) == {"kernel"}


def test_dense_and_flatten_bad_input():
  with pytest.raises(ValueError, match=r"Dense expects input of rank >= 2"):
    _trace_init(Dense(3), jnp.ones((5,)))
  with pytest.raises(ValueError, match="Dense: units must be an int >= 1"):
    Dense(0)
  with pytest.raises(ValueError, match=r"Flatten expects input of rank >= 2"):
    _trace_init(Flatten(), jnp.ones((5,)))


def test_flatten_is_row_major():
  x = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)
  y = _apply(Flatten(), x)
  np.testing.assert_array_equal(np.asarray(y), np.asarray(x).reshape(2, 60))


# -- pooling -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer, op, kwargs", [
    (MaxPool2D(), ops.max_pool2d, dict(pool_size=2)),
    (MaxPool2D(3, strides=2, padding=1), ops.max_pool2d, dict(pool_size=3, strides=2, padding=1)),
    (AvgPool2D(), ops.avg_pool2d, dict(pool_size=2)),
    (AvgPool2D(3, 2, padding="same"), ops.avg_pool2d, dict(pool_size=3, strides=2, padding="same")),
    (AvgPool2D(3, 1, padding=1, count_include_pad=True), ops.avg_pool2d,
     dict(pool_size=3, strides=1, padding=1, count_include_pad=True)),
])
def test_pool2d_matches_op(layer, op, kwargs):
  x = _x(2, 7, 6, 3)
  pool_size = kwargs.pop("pool_size")
  assert_close(*_apply(layer, x, lambda v: op(v, pool_size, **kwargs)))


def test_pool_defaults_are_keras():
  for layer in (MaxPool2D(), AvgPool2D(), MaxPool1D(), AvgPool1D()):
    assert (layer.pool_size, layer.strides, layer.padding) == (2, None, "valid")
  assert _apply(MaxPool2D(), _x(1, 7, 7, 2)).shape == (1, 3, 3, 2)


def test_pool1d_and_global_pools_match_ops():
  x1 = _x(2, 9, 3)
  x2 = _x(2, 5, 4, 3)
  layers_1d = (MaxPool1D(3, 2), AvgPool1D(2, padding="same"), GlobalAvgPool1D(), GlobalMaxPool1D())
  layers_2d = (GlobalAvgPool2D(), GlobalMaxPool2D())
  outputs_1d, outputs_2d, expected_1d = _compute(
      lambda a, b: ([layer.apply({}, a) for layer in layers_1d], [layer.apply({}, b) for layer in layers_2d],
                    [ops.max_pool1d(a, 3, strides=2), ops.avg_pool1d(a, 2, padding="same")]), x1, x2)
  expected_1d += [x1.mean(axis=1), x1.max(axis=1)]
  for actual, expected in zip(outputs_1d, expected_1d):
    assert_close(actual, expected)
  assert_close(outputs_2d[0], x2.mean(axis=(1, 2)))
  assert_close(outputs_2d[1], x2.max(axis=(1, 2)))


def test_pool_bad_input_names_the_layer():
  with pytest.raises(ValueError, match=r"MaxPool2D expects input of rank 4"):
    MaxPool2D().apply({}, jnp.ones((4, 4, 1)))
  with pytest.raises(ValueError, match=r"AvgPool1D expects input of rank 3"):
    AvgPool1D().apply({}, jnp.ones((1, 4, 4, 1)))
  with pytest.raises(ValueError, match=r"GlobalAvgPool2D expects input of rank 4"):
    GlobalAvgPool2D().apply({}, jnp.ones((1, 4, 1)))
  with pytest.raises(ValueError, match="MaxPool2D: pool_size must be >= 1"):
    MaxPool2D(0)
  with pytest.raises(ValueError, match="AvgPool2D: padding must be"):
    AvgPool2D(padding="causal")
  # The op's own check (window larger than the input) arrives with the layer's name.
  with pytest.raises(ValueError, match="MaxPool2D: "):
    MaxPool2D(5).apply({}, jnp.ones((1, 3, 3, 1)))


# -- reshaping and normalisation ----------------------------------------------------------------------

@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
def test_upsampling_matches_op(interpolation):
  x = _x(1, 3, 4, 2)
  y, expected = _apply(UpSampling2D((2, 3), interpolation=interpolation), x,
                       lambda v: ops.upsample2d(v, (2, 3), method=interpolation))
  assert y.shape == (1, 6, 12, 2)
  assert_close(y, expected)


def test_zero_padding_matches_op():
  x = _x(1, 3, 4, 2)
  y, expected = _apply(ZeroPadding2D(), x, lambda v: ops.zero_pad2d(v, 1))
  assert y.shape == (1, 5, 6, 2)  # Keras' default padding of 1
  assert_close(y, expected)
  assert_close(*_apply(ZeroPadding2D(((1, 0), (0, 2))), x, lambda v: ops.zero_pad2d(v, ((1, 0), (0, 2)))))


def test_reshaping_and_lrn_bad_input():
  with pytest.raises(ValueError, match="UpSampling2D: interpolation must be one of nearest, bilinear"):
    UpSampling2D(interpolation="bicubic")
  with pytest.raises(ValueError, match="UpSampling2D: size must be >= 1"):
    UpSampling2D(0)
  with pytest.raises(ValueError, match=r"ZeroPadding2D expects input of rank 4"):
    ZeroPadding2D().apply({}, jnp.ones((3, 3, 1)))
  with pytest.raises(ValueError, match="ZeroPadding2D: "):
    ZeroPadding2D(-1).apply({}, jnp.ones((1, 3, 3, 1)))
  with pytest.raises(ValueError, match="LocalResponseNorm: size must be an int >= 1"):
    LocalResponseNorm(size=0)


def test_local_response_norm_matches_op():
  x = _x(2, 3, 3, 7)
  layer = LocalResponseNorm(size=3, alpha=1e-2, beta=0.5, k=2.0)
  assert_close(*_apply(layer, x, lambda v: ops.local_response_norm(v, 3, alpha=1e-2, beta=0.5, k=2.0)))
  defaults = LocalResponseNorm()
  assert (defaults.size, defaults.alpha, defaults.beta, defaults.k) == (5, 1e-4, 0.75, 1.0)


# -- activations ----------------------------------------------------------------------------------------

_erf = np.vectorize(math.erf)

# numpy formulas, independent of the jax functions the layer uses.
_EXPECTED_ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x)),
    "tanh": np.tanh,
    "softmax": lambda x: np.exp(x) / np.sum(np.exp(x), axis=-1, keepdims=True),
    "elu": lambda x: np.where(x > 0, x, np.expm1(x)),
    "selu": lambda x: 1.0507009873554805 * np.where(x > 0, x, 1.6732632423543772 * np.expm1(x)),
    # Exact erf GELU, as Keras and PyTorch.
    "gelu": lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0))),
    # Keras' default negative slope.
    "leaky_relu": lambda x: np.where(x >= 0, x, 0.2 * x),
    "swish": lambda x: x / (1.0 + np.exp(-x)),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "linear": lambda x: x,
}


def test_activation_names():
  x = _x(3, 5).astype(np.float64) * 2.0
  names = sorted(_EXPECTED_ACTIVATIONS)
  outputs = _compute(lambda v: {name: (Activation(name).apply({}, v), Activation(name.upper()).apply({}, v))
                                for name in names}, x.astype(np.float32))
  for name in names:
    expected = _EXPECTED_ACTIVATIONS[name](x)
    assert_close(outputs[name][0], expected, jnp.float32, err_msg=name)
    assert_close(outputs[name][1], expected, jnp.float32, err_msg=name)


def test_activation_table_is_complete_and_callables_pass_through():
  assert set(ACTIVATIONS) == set(_EXPECTED_ACTIVATIONS)
  x = _x(2, 3)
  assert_close(_apply(Activation(lambda v: 3.0 * v), x), 3.0 * x)
  assert Activation("relu").apply({}, x, train=True).shape == (2, 3)


def test_activation_bad_names():
  with pytest.raises(ValueError, match=r"Activation: unknown activation 'softplus'; known names: elu, gelu, "
                                       r"leaky_relu, linear, relu, selu, sigmoid, silu, softmax, swish, tanh"):
    Activation("softplus")
  with pytest.raises(ValueError, match="Activation: activation must be a name or a callable, got None"):
    Activation(None)
  with pytest.raises(ValueError, match="Dense: activation must be a name, a callable or None, got 3"):
    Dense(2, activation=3)


# -- dtype / param_dtype (flax.linen's convention) --------------------------------------------------------

def _every_layer():
  """(layer, input shape) for every layer of jaxcnn.layers (Sequential is a container, not a layer)."""
  from jaxcnn import layers
  from jaxcnn.layers import (BatchNorm, Conv1DTranspose, Conv2DTranspose, Cropping2D, DepthwiseConv2D,
                             Dropout, GroupNormalization, LayerNormalization, SeparableConv2D,
                             SpatialDropout2D)
  cases = [(Conv2D(4, 3), (2, 6, 6, 3)), (Conv1D(4, 3), (2, 6, 3)), (Dense(4), (2, 5)),
           (BatchNorm(), (2, 4, 4, 3)), (LocalResponseNorm(3), (2, 4, 4, 5)), (Dropout(0.5), (2, 6)),
           (MaxPool2D(), (2, 4, 4, 3)), (AvgPool2D(), (2, 4, 4, 3)), (MaxPool1D(), (2, 4, 3)),
           (AvgPool1D(), (2, 4, 3)), (GlobalAvgPool2D(), (2, 4, 4, 3)), (GlobalMaxPool2D(), (2, 4, 4, 3)),
           (GlobalAvgPool1D(), (2, 4, 3)), (GlobalMaxPool1D(), (2, 4, 3)), (UpSampling2D(), (2, 3, 3, 2)),
           (ZeroPadding2D(), (2, 3, 3, 2)), (Flatten(), (2, 3, 3)), (Activation("relu"), (2, 3)),
           (Conv2DTranspose(4, 3, strides=2), (2, 4, 4, 3)), (Conv1DTranspose(4, 3), (2, 5, 3)),
           (DepthwiseConv2D(3), (2, 5, 5, 3)), (SeparableConv2D(4, 3), (2, 5, 5, 3)),
           (GroupNormalization(groups=2), (2, 4, 4, 4)), (LayerNormalization(), (2, 4, 4, 3)),
           (Cropping2D(1), (2, 5, 5, 2)), (SpatialDropout2D(0.5), (2, 4, 4, 3))]
  # Classes, not names: the Keras aliases (BatchNormalization, MaxPooling2D, ...) are the same classes.
  classes = {getattr(layers, name).__name__ for name in layers.__all__
             if isinstance(getattr(layers, name), type)} - {"Sequential"}
  assert {type(layer).__name__ for layer, _ in cases} == classes  # a new layer must be listed here
  return cases


_LAYERS = _every_layer()


@pytest.mark.parametrize("layer, shape", _LAYERS, ids=[type(layer).__name__ for layer, _ in _LAYERS])
def test_every_layer_takes_dtype_and_param_dtype(layer, shape):
  assert (layer.dtype, layer.param_dtype) == (None, jnp.float32)
  x = jnp.asarray(_x(*shape))
  # Parameters in param_dtype, the computation (and the output) in dtype.
  low = layer.clone(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
  variables = jax.eval_shape(low.init, KEY, x)
  for path, leaf in jax.tree_util.tree_leaves_with_path(variables.get("params", {})):
    assert leaf.dtype == jnp.bfloat16, path
  out = jax.eval_shape(lambda v: low.apply(v, x), variables)
  assert out.dtype == jnp.bfloat16
  # dtype=None: the promoted dtype of input and parameters (a bfloat16 input with float32 parameters
  # computes in float32; without parameters the input's dtype is kept).
  x16 = x.astype(jnp.bfloat16)
  variables = jax.eval_shape(layer.init, KEY, x16)
  has_params = bool(variables.get("params"))
  assert jax.eval_shape(lambda v: layer.apply(v, x16), variables).dtype == (
      jnp.float32 if has_params else jnp.bfloat16)


def test_bfloat16_compute_dtype_matches_float32_within_bfloat16_precision():
  x = jnp.asarray(_x(2, 6, 6, 3))
  layer = Conv2D(4, 3, padding="same", activation="relu")
  variables = layer.init(KEY, x)
  y32 = layer.apply(variables, x)
  y16 = layer.clone(dtype=jnp.bfloat16).apply(variables, x)
  assert y16.dtype == jnp.bfloat16
  assert_close(y16, y32, dtype=jnp.bfloat16)


def test_conv_dilation_rate_is_the_keras_name():
  x = jnp.asarray(_x(1, 9, 9, 2))
  layer = Conv2D(3, 3, dilation_rate=2)
  variables, y = _init_apply(layer, x)
  assert y.shape == (1, 5, 5, 3)  # 9 - (3 - 1) * 2
  assert_close(y, ops.conv2d(x, variables["params"]["kernel"], variables["params"]["bias"], dilation=2))
  with pytest.raises(ValueError, match=r"Conv1D: dilation_rate must be >= 1"):
    Conv1D(3, 3, dilation_rate=0)
  with pytest.raises(TypeError, match="dilation"):  # the op's name is not a layer argument
    Conv2D(3, 3, dilation=2)
