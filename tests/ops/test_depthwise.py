"""jaxcnn.ops.depthwise_conv2d: the reference twin over strides, paddings, dilations, depth multipliers,
lowerings and dtypes (forward and gradients); the channel order by hand; transformations; bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn import ops, reference

from helpers import assert_close


def example_depthwise_conv2d(dtype=jnp.float32):
  """Small arguments with stride, "same" padding and a depth multiplier of 2: (args, kwargs)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 6, 3)), dtype)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 2)), dtype)
  b = jnp.asarray(rng.standard_normal((6,)), dtype)
  return (x, w, b), dict(strides=2, padding="same")


def _case_id(case: dict) -> str:
  return "-".join(f"{k}={v}" for k, v in case.items()).replace(" ", "")


_CASES = [
    dict(strides=1, padding="valid", dilation=1, multiplier=1, dtype="float32", lowering="auto"),
    dict(strides=2, padding="same", dilation=1, multiplier=2, dtype="float32", lowering="auto"),
    dict(strides=1, padding="same", dilation=2, multiplier=1, dtype="float32", lowering="auto"),
    dict(strides=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2), multiplier=3, dtype="float32",
         lowering="auto"),
    dict(strides=3, padding=1, dilation=1, multiplier=1, dtype="bfloat16", lowering="auto"),
    dict(strides=2, padding="same", dilation=1, multiplier=2, dtype="bfloat16", lowering="xla"),
    dict(strides=1, padding=(2, 1), dilation=2, multiplier=2, dtype="float32", lowering="xla"),
]


@pytest.mark.parametrize("case", _CASES, ids=_case_id)
def test_depthwise_conv2d_matches_reference(case):
  rng = np.random.default_rng(_CASES.index(case))
  dtype = jnp.dtype(case["dtype"])
  m = case["multiplier"]
  x = jnp.asarray(rng.standard_normal((2, 7, 6, 4)), dtype)
  w = jnp.asarray(rng.standard_normal((3, 2, 4, m)), dtype)
  b = jnp.asarray(rng.standard_normal((4 * m,)), dtype)
  result = jaxcnn.verify("depthwise_conv2d", x, w, b, strides=case["strides"], padding=case["padding"],
                         dilation=case["dilation"], lowering=case["lowering"])
  result.raise_if_failed()
  assert result.forward[0].shape == jax.eval_shape(
      lambda x, w: ops.conv2d(x, w.reshape(3, 2, 1, 4 * m), strides=case["strides"], padding=case["padding"],
                              dilation=case["dilation"], groups=4), x, w).shape


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
def test_channel_order_by_hand(module):
  # 1x1 kernel, channels (a, b) = (5, 7), multiplier 2 with filters [[1, 2], [3, 4]]: output channel
  # c * 2 + m is channel c times filter m -> (5, 10, 21, 28), TensorFlow's order.
  x = jnp.array([5.0, 7.0], jnp.float32).reshape(1, 1, 1, 2)
  w = jnp.array([[1.0, 2.0], [3.0, 4.0]], jnp.float32).reshape(1, 1, 2, 2)
  np.testing.assert_array_equal(np.asarray(jax.jit(module.depthwise_conv2d)(x, w)).ravel(), [5, 10, 21, 28])
  # A 2x2 window of each channel alone: channel 0 sums x0's window, channel 1 sums x1's times 10.
  x = jnp.stack([jnp.arange(9.0).reshape(3, 3), jnp.ones((3, 3))], axis=-1)[None]
  w = jnp.stack([jnp.ones((2, 2)), 10.0 * jnp.ones((2, 2))], axis=-1)[..., None]
  out = jax.jit(module.depthwise_conv2d)(x, w)
  np.testing.assert_array_equal(np.asarray(out[0, :, :, 0]), [[8, 12], [20, 24]])
  np.testing.assert_array_equal(np.asarray(out[0, :, :, 1]), [[40, 40], [40, 40]])


def test_cpu_path_runs_the_tap_primitives_with_channels_minor():
  # On CPU: the tap-sum primitive forward and its hand-written transposes (the tap sum of the output
  # gradient and the per-tap kernel sums) backward; no dot, no conv, no autodiff of slices, and every
  # elementwise product 4-D with the C * M channels last (a trailing multiplier axis of size M would
  # leave XLA nothing to vectorise).
  (x, w, b), kwargs = example_depthwise_conv2d()
  with ops.conv_lowering("auto"):
    jaxpr = jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(ops.depthwise_conv2d(x, w, b, **kwargs) ** 2),
                                    argnums=(0, 1)))(x, w)
  names = [e.primitive.name for e in jaxpr.jaxpr.eqns]
  assert not set(names) & {"dot_general", "conv_general_dilated", "custom_vjp_call", "pad", "slice"}, names
  assert names.count("jaxcnn_depthwise") == 2 and names.count("jaxcnn_depthwise_tap_sums") == 1, names
  products = [e.outvars[0].aval.shape for e in jaxpr.jaxpr.eqns if e.primitive.name == "mul"]
  assert all(len(shape) == 4 for shape in products if len(shape) > 1)


_BLOCK_CASES = [
    dict(strides=1, padding="same", dilation=1, multiplier=1, dtype="float32"),
    dict(strides=2, padding=1, dilation=1, multiplier=2, dtype="float32"),
    dict(strides=(2, 1), padding=((1, 2), (0, 1)), dilation=(1, 2), multiplier=1, dtype="float32"),
    dict(strides=1, padding="valid", dilation=2, multiplier=1, dtype="bfloat16"),
]


# The block loop is the same for every geometry; the default run takes it through the first case (every
# transform) and the bfloat16 one, the other two in the extended tier (similar geometries are checked
# without blocks above).
@pytest.mark.parametrize("case", [pytest.param(c, id=_case_id(c), marks=[pytest.mark.extended] if i in (1, 2) else [])
                                  for i, c in enumerate(_BLOCK_CASES)])
def test_batch_blocks_match_reference_under_transformations(case, monkeypatch):
  # Batches larger than one block run each primitive as a loop over blocks of examples; with one
  # example per block every example is its own loop step, in every derivative (and, under shard_map,
  # on every shard of this batch of 8; export traces a symbolic batch, which is one block).
  from jaxcnn.ops import depthwise
  monkeypatch.setattr(depthwise, "_BLOCK_BYTES", 1)
  assert depthwise._batch_blocks(8, 4 * 7 * 6 * 4) == 1
  index = _BLOCK_CASES.index(case)
  rng = np.random.default_rng(index)
  dtype, m = jnp.dtype(case["dtype"]), case["multiplier"]
  x = jnp.asarray(rng.standard_normal((8, 7, 6, 4)), dtype)
  w = jnp.asarray(0.5 * rng.standard_normal((3, 3, 4, m)), dtype)
  b = jnp.asarray(rng.standard_normal((4 * m,)), dtype)
  transforms = ("jvp", "vmap", "hessian") if dtype == jnp.float32 else ()
  if index == 0:
    transforms += ("shard_map", "checkpoint", "export")
  result = jaxcnn.verify("depthwise_conv2d", x, w, b, strides=case["strides"], padding=case["padding"],
                         dilation=case["dilation"], lowering="auto", transforms=transforms)
  result.raise_if_failed()


def test_batch_blocks_follow_the_block_size():
  from jaxcnn.ops import depthwise
  example = 32 * 32 * 32 * 4  # one 32x32x32 float32 example: 128 KiB
  assert depthwise._batch_blocks(32, example) == depthwise._BLOCK_BYTES // example
  assert depthwise._batch_blocks(6, example) in (1, 2, 3)  # a divisor of the batch
  assert depthwise._batch_blocks(7, 10 * depthwise._BLOCK_BYTES) == 1
  assert depthwise._batch_blocks(2, 1) == 2  # small batches: no loop


def test_transformations_match_reference():
  (x, w, b), kwargs = example_depthwise_conv2d()

  def program(module, x, w):
    op = lambda x, w: module.depthwise_conv2d(x, w, b, **kwargs)  # noqa: E731
    batched = jax.vmap(lambda xi: op(xi, w))(jnp.stack([x, -x]))
    over_w = jax.vmap(lambda wi: op(x, wi))(jnp.stack([w, 2.0 * w]))
    y, vjp = jax.vjp(op, x, w)
    tangent = jax.jvp(op, (x, w), (jnp.ones_like(x), jnp.ones_like(w)))[1]
    jac = jax.jacfwd(lambda x: op(x, w))(x[:1])
    return batched, over_w, y, vjp(jnp.ones_like(y)), tangent, jac

  got = jax.jit(lambda x, w: program(ops, x, w))(x, w)
  want = jax.jit(lambda x, w: program(reference, x, w))(x, w)
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(a, e)


def test_dtypes():
  (x, w, b), kwargs = example_depthwise_conv2d(jnp.bfloat16)
  for module in (ops, reference):
    assert jax.eval_shape(lambda x, w: module.depthwise_conv2d(x, w, **kwargs), x, w).dtype == jnp.bfloat16
    assert jax.eval_shape(lambda x, w: module.depthwise_conv2d(x, w, **kwargs), x,
                          w.astype(jnp.float32)).dtype == jnp.float32


_X, _W = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 2))


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("call, message", [
    (lambda m: m.depthwise_conv2d(_X[0], _W), r"x must have rank 4 \(N, H, W, C\)"),
    (lambda m: m.depthwise_conv2d(_X, _W[0]), r"w must have rank 4 \(kh, kw, C, depth_multiplier\)"),
    (lambda m: m.depthwise_conv2d(_X.astype(jnp.int8), _W), "x must be a floating-point array"),
    (lambda m: m.depthwise_conv2d(_X, jnp.ones((3, 3, 2, 2))), r"channel mismatch: x has 3 channels .* "
     r"has 2 input channels"),
    (lambda m: m.depthwise_conv2d(_X, _W, jnp.ones(3)), r"b must have shape \(6,\)"),
    (lambda m: m.depthwise_conv2d(_X, _W, padding="circular"), "padding must be 'valid', 'same'"),
    (lambda m: m.depthwise_conv2d(_X, _W, padding=(1, -1)), "padding must be non-negative"),
    (lambda m: m.depthwise_conv2d(_X, _W, strides=(1, 0)), "strides must be >= 1"),
    (lambda m: m.depthwise_conv2d(_X, _W, dilation=3), r"kernel of w \(3, 3\) \(effective 7"),
])
def test_bad_input_raises_value_error_naming_the_argument(module, call, message):
  with pytest.raises(ValueError, match=message):
    call(module)
