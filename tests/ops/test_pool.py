"""Pooling ops: fast vs reference (forward and input gradients), hand-computed cases, bad input.

Max-pool gradients at tied maxima may legitimately differ between implementations (one picks the first
maximum, another splits the gradient between the ties), so every max-pool input here is tie-free: a
random permutation of distinct values.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn import ops, reference
from helpers import assert_close


def _distinct(shape, dtype=jnp.float32, seed=0):
  """A tie-free input: a permutation of 0 .. size-1, scaled into [0, 1) (exact in bfloat16 for <= 256)."""
  size = int(np.prod(shape))
  values = np.random.default_rng(seed).permutation(size).reshape(shape) / size
  return jnp.asarray(values, dtype)


# (pool_size, strides, padding, input shape): odd and even sizes, batch 1 and 7, every lowering
# (reshape, reshape after cropping, separable slices, mixed per dim), every padding form.
CASES_2D = [
    (2, None, "valid", (1, 4, 6, 2)),                 # reshape, sizes divisible
    (2, None, "valid", (7, 5, 7, 3)),                 # reshape after cropping the odd remainder
    (3, None, "same", (1, 7, 8, 2)),                  # reshape of a "same"-padded input
    (3, 1, "same", (1, 5, 6, 2)),                     # overlapping windows, stride 1
    (3, 2, "same", (7, 7, 6, 3)),                     # overlapping, stride 2, odd/even
    (2, 3, "valid", (1, 7, 8, 2)),                    # gapped windows (stride > window)
    (3, 2, 1, (1, 6, 7, 2)),                          # PyTorch int padding
    (2, 1, ((0, 1), (1, 0)), (7, 5, 4, 3)),           # asymmetric pairs
    ((2, 3), (1, 2), ((1, 0), (0, 2)), (1, 6, 7, 2)),  # rectangular window, per-dim strides
    (2, (2, 1), "same", (1, 5, 5, 2)),                # one dim reshaped, the other sliced
]


def _case_id(case):
  pool, strides, padding, shape = case
  return f"k{pool}-s{strides}-p{padding}-{'x'.join(map(str, shape))}".replace(" ", "")


@pytest.mark.parametrize("case", CASES_2D, ids=_case_id)
@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_pool2d_matches_reference(op, case):
  pool, strides, padding, shape = case
  x = _distinct(shape)
  jaxcnn.verify(op, x, pool, strides=strides, padding=padding).raise_if_failed()


@pytest.mark.parametrize("case", [CASES_2D[i] for i in (3, 6, 7, 8)], ids=_case_id)
def test_avg_pool2d_count_include_pad_matches_reference(case):
  pool, strides, padding, shape = case
  x = _distinct(shape)
  jaxcnn.verify("avg_pool2d", x, pool, strides=strides, padding=padding,
                count_include_pad=True).raise_if_failed()


@pytest.mark.parametrize("case", [CASES_2D[1], CASES_2D[7]], ids=_case_id)
@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_pool2d_bfloat16_matches_reference(op, case):
  pool, strides, padding, shape = case
  x = _distinct((1, *shape[1:3], 2), jnp.bfloat16)  # <= 256 cells: distinct and exact in bfloat16
  result = jaxcnn.verify(op, x, pool, strides=strides, padding=padding)
  assert result.dtype == "bfloat16"
  result.raise_if_failed()


CASES_1D = [
    (2, None, "valid", (7, 9, 3)),
    (3, 1, "same", (1, 8, 2)),
    (2, 3, ((1, 0),), (7, 9, 2)),
]


@pytest.mark.parametrize("case", CASES_1D, ids=_case_id)
@pytest.mark.parametrize("op", ["max_pool1d", "avg_pool1d"])
def test_pool1d_matches_reference(op, case):
  pool, strides, padding, shape = case
  jaxcnn.verify(op, _distinct(shape), pool, strides=strides, padding=padding).raise_if_failed()


@pytest.mark.parametrize("op, shape", [("global_avg_pool2d", (7, 3, 5, 2)), ("global_max_pool2d", (1, 4, 3, 2)),
                                       ("global_avg_pool1d", (1, 6, 3)), ("global_max_pool1d", (7, 5, 2))])
def test_global_pools_match_reference(op, shape):
  jaxcnn.verify(op, _distinct(shape)).raise_if_failed()


# Hand-computed cases on x = arange(16) as a 4x4 image:
#    0  1  2  3
#    4  5  6  7
#    8  9 10 11
#   12 13 14 15
@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_pool2d_hand_computed(module):
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  expected = [
      [[5, 7], [13, 15]],
      [[2.5, 4.5], [10.5, 12.5]],
      # "same", 3x3 stride 2 on 4: out 2, total padding 1, all of it bottom/right.
      [[10, 11], [14, 15]],
      # Divided by the real cells: 45/9, (2+3+6+7+10+11)/6, (8+9+10+12+13+14)/6, (10+11+14+15)/4.
      [[5, 6.5], [11, 12.5]],
      [[5, 39 / 9], [66 / 9, 50 / 9]],
      # PyTorch padding 1, 2x2 windows, stride 2: corners see one real cell, edges two.
      [[0, 2, 3], [8, 10, 11], [12, 14, 15]],
      [[0, 3 / 4, 3 / 4], [12 / 4, 30 / 4, 18 / 4], [12 / 4, 27 / 4, 15 / 4]],
      [[0, 1.5, 3], [6, 7.5, 9], [12, 13.5, 15]],
      [7.5],
      [15],
  ]

  @jax.jit  # one compilation for all cases: eager reference gathers dispatch op by op
  def run(x):
    return [
        module.max_pool2d(x, 2),
        module.avg_pool2d(x, 2),
        module.max_pool2d(x, 3, strides=2, padding="same"),
        module.avg_pool2d(x, 3, strides=2, padding="same"),
        module.avg_pool2d(x, 3, strides=2, padding="same", count_include_pad=True),
        module.max_pool2d(x, 2, strides=2, padding=1),
        module.avg_pool2d(x, 2, strides=2, padding=1, count_include_pad=True),
        module.avg_pool2d(x, 2, strides=2, padding=1),
        module.global_avg_pool2d(x)[0],
        module.global_max_pool2d(x)[0],
    ]

  for got, want in zip(run(x), expected):
    got = got[0, :, :, 0] if got.ndim == 4 else got
    assert_close(got, np.asarray(want, np.float32))


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_pool1d_hand_computed(module):
  x = jnp.arange(5, dtype=jnp.float32).reshape(1, 5, 1)

  @jax.jit
  def run(x):
    return [
        module.max_pool1d(x, 2)[0, :, 0],
        module.avg_pool1d(x, 3, strides=1, padding=1)[0, :, 0],
        module.avg_pool1d(x, 3, strides=1, padding=1, count_include_pad=True)[0, :, 0],
        module.max_pool1d(x, 2, strides=1, padding="same")[0, :, 0],
        module.global_avg_pool1d(x)[0],
        module.global_max_pool1d(x)[0],
    ]

  expected = [[1, 3], [0.5, 1, 2, 3, 3.5], [1 / 3, 1, 2, 3, 7 / 3], [1, 2, 3, 4, 4], [2], [4]]
  for got, want in zip(run(x), expected):
    assert_close(got, np.asarray(want, np.float32))


def test_max_pool_gradient_goes_to_the_maximum():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 4, 4, 1)
  grad = jax.grad(lambda x: ops.max_pool2d(x, 3, strides=1).sum())(x)[0, :, :, 0]
  expected = np.zeros((4, 4), np.float32)
  expected[2:, 2:] = 1  # each 3x3 window's maximum is its bottom-right cell
  assert_close(grad, expected)


def test_pools_keep_dtype_and_run_under_jit():
  x = _distinct((1, 6, 6, 2), jnp.bfloat16)
  for op in (ops.max_pool2d, ops.avg_pool2d):
    y = jax.jit(lambda x: op(x, 3, strides=2, padding="same"))(x)
    assert y.dtype == jnp.bfloat16 and y.shape == (1, 3, 3, 2)


@pytest.mark.parametrize("pool, strides", [(2, None), (3, 2), (3, 1)])
def test_max_pool_avoids_reduce_window(pool, strides):
  # The lowering is the point of the fast op: reduce_window's backward (select_and_scatter) is slow on
  # XLA CPU. The jaxpr of the gradient must contain neither.
  x = _distinct((1, 8, 8, 2))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda x: ops.max_pool2d(x, pool, strides=strides).sum()))(x))
  assert "reduce_window" not in jaxpr and "select_and_scatter" not in jaxpr


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_pool2d_rejects_bad_input(module, op):
  fn = getattr(module, op)
  x = jnp.zeros((1, 4, 4, 2))
  with pytest.raises(ValueError, match=r"x must have rank 4"):
    fn(jnp.zeros((4, 4, 2)), 2)
  with pytest.raises(ValueError, match=r"x must be a floating-point"):
    fn(jnp.zeros((1, 4, 4, 2), jnp.int32), 2)
  with pytest.raises(ValueError, match=r"pool_size .* larger than the padded input"):
    fn(x, 5)
  with pytest.raises(ValueError, match=r"pool_size .* larger than the padded input"):
    fn(x, (2, 5), padding="valid")
  for bad in (0, -1, (2,), (2, 2, 2), "2", (2.5, 2), True):
    with pytest.raises(ValueError, match=r"pool_size"):
      fn(x, bad)
  for bad in (0, (1, 0), (1, 2, 3), "1"):
    with pytest.raises(ValueError, match=r"strides"):
      fn(x, 2, strides=bad)
  with pytest.raises(ValueError, match=r"padding must be 'valid', 'same'"):
    fn(x, 2, padding="full")
  with pytest.raises(ValueError, match=r"padding must be non-negative"):
    fn(x, 2, padding=-1)
  with pytest.raises(ValueError, match=r"padding must be non-negative"):
    fn(x, 3, padding=((0, -1), (1, 1)))
  with pytest.raises(ValueError, match=r"padding entries must be ints"):
    fn(x, 3, padding=((0, 0.5), (1, 1)))
  with pytest.raises(ValueError, match=r"padding .* must be smaller than pool_size"):
    fn(x, 2, padding=2)
  with pytest.raises(ValueError, match=r"padding .* must be smaller than pool_size"):
    fn(x, (3, 2), padding=((0, 0), (2, 0)))


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_pool1d_and_global_pools_reject_bad_input(module):
  with pytest.raises(ValueError, match=r"x must have rank 3 \(N, L, C\)"):
    module.max_pool1d(jnp.zeros((1, 4, 4, 2)), 2)
  with pytest.raises(ValueError, match=r"pool_size .* larger than the padded input"):
    module.avg_pool1d(jnp.zeros((1, 3, 2)), 4)
  with pytest.raises(ValueError, match=r"padding must give 1 spatial dims"):
    module.avg_pool1d(jnp.zeros((1, 6, 2)), 2, padding=((0, 1), (1, 0)))
  with pytest.raises(ValueError, match=r"x must have rank 4 \(N, H, W, C\)"):
    module.global_avg_pool2d(jnp.zeros((1, 4, 2)))
  with pytest.raises(ValueError, match=r"x must have rank 3 \(N, L, C\)"):
    module.global_max_pool1d(jnp.zeros((1, 4, 4, 2)))
  with pytest.raises(ValueError, match=r"x must be a floating-point"):
    module.global_max_pool2d(jnp.zeros((1, 4, 4, 2), jnp.int32))


@pytest.mark.parametrize("case", [CASES_2D[1], CASES_2D[4], CASES_2D[8]], ids=_case_id)
@pytest.mark.parametrize("op", ["max_pool2d", "avg_pool2d"])
def test_pool2d_forward_mode_and_hvp_match_reference(op, case):
  # jvp, linearize, jacfwd and a forward-over-reverse Hessian-vector product, tie-free input, against the
  # twin: the tiled max pool's derivative (a linear primitive routing the tangent to each tile's first
  # maximum) agrees with autodiff of the twin's max where the maximum is unique.
  pool, strides, padding, shape = case
  x = _distinct((min(shape[0], 2), *shape[1:]))
  t = jnp.asarray(np.random.default_rng(1).standard_normal(x.shape), jnp.float32)

  def transforms(fn):
    def f(x):
      return fn(x, pool, strides=strides, padding=padding)

    def program(x):
      loss = lambda x: jnp.sum(jnp.sin(f(x)) * f(x))
      return (jax.jvp(f, (x,), (t,)), jax.linearize(f, x)[1](t), jax.jacfwd(f)(x[:1]),
              jax.jvp(jax.grad(loss), (x,), (t,))[1])
    return program

  fast = _compiled(transforms(getattr(ops, op)), x)
  expected = _compiled(transforms(getattr(reference, op)), x)
  for a, e in zip(jax.tree.leaves(fast), jax.tree.leaves(expected)):
    assert_close(a, e, rtol=1e-4, atol=1e-4)


# Compiling is nearly all these checks' cost; how hard XLA optimises machine code does not change them.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)
