"""Performance guards: the properties the speed of training depends on, checked structurally (no timings).

- `fit` traces its training program once per run, whatever the number of epochs and chunk lengths.
- On CPU the convolution lowers to matmuls (im2col or "rows"), never to XLA's convolution (slow on CPU,
  many times slower again inside a loop), and its gradient does not transpose activation-sized arrays.
- The hand-written gradients are what runs: the dense convolution is the `jaxcnn_conv` primitive under
  every transformation (reverse and forward mode, vmap over the batch, per-example gradients), whose
  transposes are those gradients; vmap folds the mapped axis into the batch instead of looping.
- Non-overlapping max pooling differentiates without reduce_window/select_and_scatter, its derivative
  goes through the `jaxcnn_route_to_first_max` primitive, and sends the gradient of a tile with tied
  maxima to exactly one cell: the first in row-major order.
- On CPU the depthwise convolution's tap sums (forward, input and kernel gradients) run as loops over
  blocks of examples, so XLA does not fuse them into their consumers' reductions.
- Training-mode batch normalisation reduces each activation-sized array once: x twice in the forward
  pass (the mean, then the squared deviations), the output gradient g and g * x in the backward pass.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import layers, ops, train
from helpers import assert_close


def _primitives(jaxpr) -> list:
  """Every equation of a (closed) jaxpr, sub-jaxprs (pjit, custom_vjp, scan bodies) included."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  found = []
  for eqn in jaxpr.eqns:
    found.append(eqn)
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (jax.extend.core.ClosedJaxpr, jax.extend.core.Jaxpr)):
          found.extend(_primitives(sub))
  return found


def _names(jaxpr) -> set[str]:
  return {eqn.primitive.name for eqn in _primitives(jaxpr)}


def _tiny_model():
  return layers.Sequential([layers.Conv2D(4, 3, activation="relu"), layers.MaxPool2D(2), layers.Flatten(),
                            layers.Dense(3)])


def test_fit_traces_the_training_program_once():
  # 5 steps per epoch in chunks of 2 (2 + 2 + 1: a partial chunk every epoch), 3 epochs: still one
  # traced chunk program and one epoch-rollover program.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(40, 8, 8, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, size=(40,)).astype(np.int32)
  train.TRACE_COUNTS.clear()
  result = train.fit(_tiny_model(), (images, labels),
                     config=dict(epochs=3, batch_size=8, log_every=2, progress="none", parallel="none"))
  assert len(result.history["loss"]) == 3
  assert train.TRACE_COUNTS.get("train_chunk") == 1, train.TRACE_COUNTS
  assert train.TRACE_COUNTS.get("next_epoch") == 1, train.TRACE_COUNTS
  assert "train_step" not in train.TRACE_COUNTS  # the device-resident path never steps one batch at a time


def test_cpu_default_conv_lowering_is_a_matmul_lowering():
  x, w = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 5))
  assert jax.default_backend() == "cpu"
  assert ops.get_conv_lowering() == "auto"
  # A fresh function per trace: the lowering is read when tracing, and traces are cached per function.
  names = _names(jax.make_jaxpr(lambda x, w: ops.conv2d(x, w))(x, w))
  assert "conv_general_dilated" not in names and "jaxcnn_conv" in names  # "rows" or "im2col"
  with ops.conv_lowering("xla"):
    assert "conv_general_dilated" in _names(jax.make_jaxpr(lambda x, w: ops.conv2d(x, w))(x, w))


@pytest.mark.parametrize("lowering", ["im2col", "rows"])
@pytest.mark.parametrize("strides, padding", [(1, "valid"), (2, "same"), (1, ((2, 1), (0, 1)))])
def test_weight_gradient_reads_the_output_gradient_in_place(strides, padding, lowering):
  # Autodiff of patches @ kernel makes XLA copy the (rows, O) output gradient into an (O, rows)
  # transposed buffer before the weight-gradient matmul; the hand-written backward contracts over the
  # rows of both operands instead, so no array of that transposed shape may appear in the program.
  # For "rows" the matrix is dZ: (N * rows of the padded input read * Wo, kh * O).
  x, w, b = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 5)), jnp.ones((5,))

  def loss(x, w, b):
    return jnp.sum(ops.conv2d(x, w, b, strides=strides, padding=padding) ** 2)

  with ops.conv_lowering(lowering):
    y = jax.eval_shape(lambda x, w, b: ops.conv2d(x, w, b, strides=strides, padding=padding), x, w, b)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, w, b).compile().as_text()
  n, ho, wo, o = y.shape
  if lowering == "im2col":
    forbidden = f"f32[{o},{n * ho * wo}]"
  else:
    used = (ho - 1) * strides + w.shape[0]  # rows of the padded input that are read
    forbidden = f"f32[{w.shape[0] * o},{n * used * wo}]"
  assert forbidden not in hlo
  assert "convolution(" not in hlo


def _eqns(fn, *args) -> list:
  return _primitives(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("lowering", ["im2col", "rows"])
def test_conv_derivatives_run_the_primitive_and_its_hand_written_transposes(lowering):
  x, w = jnp.ones((2, 9, 9, 3)), jnp.ones((3, 3, 3, 5))

  def conv(x, w):
    return ops.conv2d(x, w, padding="same")

  def loss(x, w):
    return jnp.sum(jnp.tanh(conv(x, w)))

  # (program, arguments, primitives expected, matmuls outside the primitive): forward mode keeps every
  # matmul inside the primitive; reverse mode adds exactly the hand-written gradients' matmuls
  # (dX = dY @ W^T, dW = patches^T @ dY), never autodiff of the forward's slices and matmul.
  programs = {
      "grad": (jax.grad(loss, argnums=(0, 1)), (x, w), 1, 2),
      "jvp": (lambda x, w: jax.jvp(conv, (x, w), (x, w)), (x, w), 3, 0),
      "jacfwd": (jax.jacfwd(conv, argnums=1), (x[:1], w), 2, 0),
      "per-example grads": (jax.vmap(jax.grad(loss, argnums=1), in_axes=(0, None)), (x[:, None], w), 1, 1),
  }
  with ops.conv_lowering(lowering):
    for what, (fn, args, n_prim, n_dots) in programs.items():
      names = [e.primitive.name for e in _eqns(fn, *args)]
      assert names.count("jaxcnn_conv") == n_prim, (what, names)
      assert names.count("dot_general") == n_dots, (what, names)
      assert not {"while", "scan"} & set(names), (what, names)  # vmap folds into the batch, no loop
      assert "convolution(" not in jax.jit(fn).lower(*args).compile().as_text(), what


def test_depthwise_gradient_keeps_the_tap_sums_in_batch_blocks():
  # The forward, input-gradient and kernel-gradient tap sums each run as a loop over blocks of
  # examples. Traced as plain elementwise code instead, XLA CPU fuses the tap sum into its consumers:
  # the loss and per-tap reductions get activation-sized shifted copies of the input (8 for 3x3) and
  # the input gradient recomputes the forward inside each of its taps.
  x, w = jnp.ones((32, 32, 32, 32)), jnp.ones((3, 3, 32, 1))
  loss = lambda x, w: 0.5 * jnp.sum(ops.depthwise_conv2d(x, w, padding="same") ** 2)  # noqa: E731
  with ops.conv_lowering("auto"):
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).compile().as_text()
  assert hlo.count(" while(") >= 3
  full_size = re.findall(r"= f32\[32,32,32,32\]\{[0-9,]+\} fusion\(", hlo)
  assert len(full_size) <= 2, full_size


def test_max_pool_derivatives_run_the_routing_primitive():
  x = jnp.asarray(np.random.default_rng(4).permutation(2 * 8 * 8 * 3).reshape(2, 8, 8, 3), jnp.float32)
  pool = lambda x: ops.max_pool2d(x, 2)
  for what, fn in {"jvp": lambda x: jax.jvp(pool, (x,), (x,)),
                   "jacfwd": jax.jacfwd(pool)}.items():
    names = {e.primitive.name for e in _eqns(fn, x[:1])}
    assert "jaxcnn_route_to_first_max" in names, what
  # The gradient is the routing primitive's hand-written transpose: selects and a reshape, no scatter.
  names = {e.primitive.name for e in _eqns(jax.grad(lambda x: jnp.sum(pool(x) ** 2)), x)}
  assert not names & {"scatter", "scatter-add", "select_and_scatter_add", "reduce_window_max"}, names


def test_batch_norm_gradient_reduces_each_activation_sized_array_once():
  # Autodiff of the two-pass statistics would also differentiate the mean inside the variance: one more
  # activation-sized reduction (its sum is zero) in the backward pass.
  x = jnp.asarray(np.random.default_rng(5).standard_normal((4, 6, 6, 3)), jnp.float32)
  channel = jnp.ones((3,))

  def loss(x, scale, bias):
    y, _, _ = ops.batch_norm(x, scale, bias, channel * 0.0, channel, train=True)
    return jnp.sum(jnp.sin(y))

  eqns = _eqns(jax.grad(loss, argnums=(0, 1, 2)), x, channel, channel * 0.5)
  full = [e.primitive.name for e in eqns if e.primitive.name.startswith("reduce_")
          and e.invars[0].aval.shape == x.shape]
  # mean(x), mean((x - mu)^2); the loss's own sum; sum(g), sum(g * x).
  assert full == ["reduce_sum"] * 5, full


@pytest.mark.parametrize("shape, pool", [((2, 8, 8, 3), 2), ((1, 9, 7, 2), (3, 2)), ((2, 10, 4), 2)])
def test_max_pool_gradient_avoids_reduce_window(shape, pool):
  op = ops.max_pool2d if len(shape) == 4 else ops.max_pool1d
  x = jnp.asarray(np.random.default_rng(1).permutation(math.prod(shape)).reshape(shape), jnp.float32)
  names = _names(jax.make_jaxpr(jax.grad(lambda x: jnp.sum(op(x, pool) ** 2)))(x))
  assert not any("reduce_window" in n or "select_and_scatter" in n for n in names), names


def test_max_pool_tie_gradient_goes_to_the_first_maximum():
  # Tile (0, 0): all four equal; tile (0, 1): the maximum 5 twice, at (0, 3) and (1, 2);
  # tile (1, 0): one maximum; tile (1, 1): ties at the bottom row only.
  x = jnp.asarray([[1, 1, 0, 5],
                   [1, 1, 5, 2],
                   [0, 3, 4, 4],
                   [2, 1, 6, 6]], jnp.float32).reshape(1, 4, 4, 1)
  grad = jax.grad(lambda x: jnp.sum(ops.max_pool2d(x, 2) * jnp.asarray([[2.0, 3.0], [5.0, 7.0]]).reshape(
      1, 2, 2, 1)))(x)
  expected = np.zeros((4, 4), np.float32)
  expected[0, 0] = 2.0
  expected[0, 3] = 3.0
  expected[2, 1] = 5.0
  expected[3, 2] = 7.0
  assert_close(grad[0, :, :, 0], expected)
  # Without ties the gradient is the same under every rule: compare with the reference twin's.
  from jaxcnn import reference
  distinct = jnp.asarray(np.random.default_rng(2).permutation(50).reshape(1, 5, 5, 2), jnp.float32)
  assert_close(jax.grad(lambda x: jnp.sum(ops.max_pool2d(x, 2) ** 2))(distinct),
               jax.grad(lambda x: jnp.sum(reference.max_pool2d(x, 2) ** 2))(distinct))


# -- mixed precision (the accelerator switch), checked on CPU ---------------------------------------------

def _bn_model():
  return layers.Sequential([layers.Conv2D(4, 3, use_bias=False), layers.BatchNorm(momentum=0.9),
                            layers.Activation("relu"), layers.MaxPool2D(2), layers.Flatten(),
                            layers.Dropout(0.2), layers.Dense(3)])


def test_bfloat16_compute_keeps_float32_parameters_statistics_and_loss():
  model = _bn_model()
  rng = np.random.default_rng(3)
  batch = {"image": jnp.asarray(rng.standard_normal((8, 8, 8, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 3, 8), jnp.int32), "mask": jnp.ones((8,), jnp.float32)}
  results = {}
  for dtype in ("float32", "bfloat16"):
    state = train.create_train_state(model, (8, 8, 1), {"optimizer": "adam"})
    train_step, eval_step = train.make_steps(model, compute_dtype=dtype)
    jaxpr = jax.make_jaxpr(train_step)(state, batch)
    dot_inputs = {str(v.aval.dtype) for e in _primitives(jaxpr) if e.primitive.name == "dot_general"
                  for v in e.invars}
    assert ("bfloat16" in dot_inputs) == (dtype == "bfloat16"), dot_inputs
    new, metrics = jax.jit(train_step)(state, batch)
    for tree in (new.params, new.batch_stats, new.opt_state):
      floats = [x.dtype for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
      assert floats and all(d == jnp.float32 for d in floats), floats
    assert metrics["loss_sum"].dtype == jnp.float32
    assert eval_step(new, batch)["loss_sum"].dtype == jnp.float32
    results[dtype] = metrics, new
  (m32, s32), (m16, s16) = results["float32"], results["bfloat16"]
  assert np.isfinite(float(m16["loss_sum"]))
  assert_close(m16["loss_sum"], m32["loss_sum"], rtol=2e-2, atol=1e-2)
  # The running statistics are updated from bfloat16 activations but kept in float32.
  assert_close(s16.batch_stats["batch_norm"]["mean"], s32.batch_stats["batch_norm"]["mean"], rtol=5e-2,
               atol=2e-2)


def test_compute_dtype_is_validated():
  assert train.validate_config({"compute_dtype": "bfloat16"}).compute_dtype == "bfloat16"
  with pytest.raises(ValueError, match="compute_dtype='float16'"):
    train.validate_config({"compute_dtype": "float16"})


def test_accelerator_recipes_are_valid_fit_configs():
  from benchmarks import h100
  mnist = h100.mnist_config()
  assert mnist.train.compute_dtype == "bfloat16" and mnist.train.batch_size == 512
  airbench = h100.airbench_config()
  fit_keys = {k: airbench[k] for k in airbench if k in train.DEFAULTS}
  assert train.validate_config(fit_keys).compute_dtype == "bfloat16"


@pytest.mark.slow
def test_airbench_recipe_trains_on_synthetic_data(tmp_path):
  from benchmarks import h100
  config = h100.airbench_config()
  config.update(dict(synthetic=True, train_examples=64, test_examples=32, widths=(8, 16, 16), batch_size=32,
                     eval_batch_size=32, epochs=1))
  summary = h100.run_airbench(config, tmp_path)
  assert 0.0 <= summary["test_accuracy"] <= 1.0 and np.isfinite(summary["test_loss"])
