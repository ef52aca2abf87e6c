"""jaxcnn.ops.group_norm / layer_norm: the reference twins (forward and gradients, float32 and bfloat16),
the formulas against NumPy, float32 statistics for bfloat16 input, transformations, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn import ops, reference

from helpers import assert_close


def _inputs(shape, seed=0, offset=1.5):
  """x of `shape` with a non-zero mean, and (C,) scale and bias away from 1 and 0."""
  rng = np.random.default_rng(seed)
  channels = shape[-1]
  x = jnp.asarray(rng.standard_normal(shape) * 2.0 + offset, jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(channels), jnp.float32)
  return x, scale, bias


def example_group_norm(dtype=jnp.float32):
  """Small NHWC arguments, 3 groups of 2 channels: (args, kwargs)."""
  x, scale, bias = _inputs((2, 3, 4, 6))
  return (x.astype(dtype), scale.astype(dtype), bias.astype(dtype)), dict(groups=3, epsilon=1e-3)


def example_layer_norm(dtype=jnp.float32):
  """Small (N, L, C) arguments: (args, kwargs)."""
  x, scale, bias = _inputs((2, 5, 8), seed=1)
  return (x.astype(dtype), scale.astype(dtype), bias.astype(dtype)), dict(epsilon=1e-3)


@pytest.mark.parametrize("shape, groups, affine, dtype", [
    ((2, 3, 4, 6), 6, False, "float32"),       # instance normalisation, no affine
    ((4, 6), 1, True, "float32"),              # (N, C), one group: normalise all of an example
    ((3, 5, 8), 4, True, "bfloat16"),          # (N, L, C)
])
def test_group_norm_matches_reference(shape, groups, affine, dtype):
  x, scale, bias = (a.astype(dtype) for a in _inputs(shape))
  if not affine:
    scale = bias = None
  result = jaxcnn.verify("group_norm", x, scale, bias, groups=groups, epsilon=1e-3)
  assert result.dtype == dtype
  result.raise_if_failed()


@pytest.mark.parametrize("shape, affine, dtype", [
    ((2, 3, 3, 4), False, "float32"), ((2, 5, 8), True, "bfloat16")])
def test_layer_norm_matches_reference(shape, affine, dtype):
  x, scale, bias = (a.astype(dtype) for a in _inputs(shape))
  if not affine:
    scale = bias = None
  jaxcnn.verify("layer_norm", x, scale, bias, epsilon=1e-2).raise_if_failed()


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_formulas_against_numpy(module):
  x, scale, bias = (np.asarray(a, np.float64) for a in _inputs((2, 3, 4, 6)))
  args = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
  y = jax.jit(lambda *a: module.group_norm(*a, groups=3, epsilon=1e-3))(*args)
  grouped = x.reshape(2, 12, 3, 2)
  mean = grouped.mean(axis=(1, 3), keepdims=True)
  var = grouped.var(axis=(1, 3), keepdims=True)  # biased, as Keras and PyTorch
  expected = ((grouped - mean) / np.sqrt(var + 1e-3)).reshape(x.shape) * scale + bias
  assert_close(y, expected)
  y = jax.jit(lambda *a: module.layer_norm(*a, epsilon=1e-3))(*args)
  expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-3) * scale + bias
  assert_close(y, expected)


def test_statistics_in_float32_for_bfloat16_input():
  # A large common offset: bfloat16 sums of the values near 64 would lose the spread; float32
  # statistics of the same (bfloat16-rounded) values match the float32 computation.
  x, scale, bias = _inputs((2, 4, 4, 8), offset=64.0)
  x16 = x.astype(jnp.bfloat16)
  for op, kwargs in ((ops.group_norm, dict(groups=2)), (ops.layer_norm, {})):
    y16 = jax.jit(lambda x: op(x, scale, bias, **kwargs))(x16)
    y32 = jax.jit(lambda x: op(x, scale, bias, **kwargs))(x16.astype(jnp.float32))
    assert y16.dtype == jnp.bfloat16
    assert_close(y16, y32, dtype=jnp.bfloat16)


@pytest.mark.parametrize("example", [example_group_norm, example_layer_norm], ids=["group_norm", "layer_norm"])
def test_transformations_match_reference(example):
  (x, scale, bias), kwargs = example()
  name = example.__name__.removeprefix("example_")

  def program(module, x, scale, bias):
    op = lambda x, s, b: getattr(module, name)(x, s, b, **kwargs)  # noqa: E731
    batched = jax.vmap(lambda xi: op(xi, scale, bias))(jnp.stack([x, 2.0 * x + 1.0]))
    y, vjp = jax.vjp(op, x, scale, bias)
    tx = jnp.broadcast_to(jnp.arange(x.shape[-1], dtype=x.dtype), x.shape)
    tangent = jax.jvp(op, (x, scale, bias), (tx, jnp.ones_like(scale), jnp.ones_like(bias)))[1]
    hessian_vector = jax.jvp(jax.grad(lambda x: jnp.sum(op(x, scale, bias) ** 3)), (x,), (jnp.ones_like(x),))[1]
    return batched, y, vjp(y), tangent, hessian_vector

  got = jax.jit(lambda *a: program(ops, *a))(x, scale, bias)
  want = jax.jit(lambda *a: program(reference, *a))(x, scale, bias)
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(a, e, rtol=1e-4, atol=1e-4)  # the Hessian-vector product: two more rounded passes


_X = jnp.ones((2, 4, 4, 6))


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("call, message", [
    (lambda m: m.group_norm(_X[0, 0, 0], None, None, groups=2), r"x must have rank >= 2 \(N, ..., C\)"),
    (lambda m: m.group_norm(_X.astype(jnp.int32), None, None, groups=2), "x must be a floating-point array"),
    (lambda m: m.group_norm(_X, None, None, groups=4), r"groups=4 must divide the channels of x"),
    (lambda m: m.group_norm(_X, None, None, groups=0), "groups must be a positive int, got 0"),
    (lambda m: m.group_norm(_X, None, None, groups=2.0), "groups must be a positive int, got 2.0"),
    (lambda m: m.group_norm(_X, jnp.ones(4), None, groups=2), r"scale must have shape \(6,\) to match the "
     r"channels"),
    (lambda m: m.group_norm(_X, None, jnp.ones(6, jnp.int32), groups=2), "bias must be a floating-point"),
    (lambda m: m.group_norm(_X, None, None, groups=2, epsilon=0.0), "epsilon must be a positive number"),
    (lambda m: m.layer_norm(jnp.ones(()), None, None), r"x must have rank >= 1"),
    (lambda m: m.layer_norm(_X.astype(bool), None, None), "x must be a floating-point array"),
    (lambda m: m.layer_norm(_X, None, jnp.ones(4)), r"bias must have shape \(6,\) to match the last axis"),
    (lambda m: m.layer_norm(_X, None, None, epsilon=-1), "epsilon must be a positive number"),
])
def test_bad_input_raises_value_error_naming_the_argument(module, call, message):
  with pytest.raises(ValueError, match=message):
    call(module)
