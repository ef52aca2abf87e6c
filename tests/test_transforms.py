"""The transform matrix: every public op x {jit, grad, vjp, jvp, jacfwd, hessian, vmap, shard_map,
checkpoint, export} x every conv lowering it applies to, against the op's reference twin.

Generated from one table, `jaxcnn._verify.OPS` (a row per op: a tiny example call, its lowerings, what is
special under shard_map); each cell is `jaxcnn.verify(op, *args, transforms=...)`'s comparison under one
transform, so the test suite checks exactly what users can check. All transforms of one (op, lowering)
are traced into one program (plus one for shard_map and the exported call), so a row costs a few
compilations; the other examples of each row (`OpSpec.variants`) run in the slow run, and the cells of
the "xla" and "auto" convolution lowerings in the extended tier (see `_EXTENDED_LOWERINGS`).

Also here: forward mode through registered models (jvp and linearize against the XLA convolution and
against reverse mode), and the XLA lowering's per-example gradient under a batch-sharded jit.
"""
from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn import models, ops, reference
from jaxcnn._verify import OPS, TRANSFORMS, op_spec

from helpers import assert_close

_CELLS = [(spec.name, lowering) for spec in OPS for lowering in spec.lowerings]
# The convolution lowerings whose cells are in the extended tier: "xla" is lax's own convolution under
# JAX's own transforms (the jaxcnn code around it, padding, dilation and groups, is checked forward and
# backward against the twin in tests/ops), and "auto" dispatches, per shape, to one of the explicit
# lowerings, whose cells the default run checks (`test_auto_cells_repeat_an_explicit_lowering`).
_EXTENDED_LOWERINGS = ("xla", "auto")


def _cell_id(name, lowering):
  return name if lowering is None else f"{name}-{lowering}"


def _cell_params():
  return [pytest.param(name, lowering, id=_cell_id(name, lowering),
                       marks=[pytest.mark.extended] if lowering in _EXTENDED_LOWERINGS else [])
          for name, lowering in _CELLS]


def _as_jax(value):
  return jnp.asarray(value) if isinstance(value, np.ndarray) else value


@functools.lru_cache(maxsize=None)
def _verified(name: str, lowering, variant: int):
  """verify's result for the row's example (variant 0) or one of its variants, under every transform."""
  spec = op_spec(name)
  build = spec.example if variant == 0 else spec.variants[variant - 1]
  args, kwargs = build()
  transforms = tuple(t for t in TRANSFORMS if t not in spec.not_applicable)
  return jaxcnn.verify(name, *map(_as_jax, args), lowering=lowering, transforms=transforms,
                       **{k: _as_jax(v) for k, v in kwargs.items()})


def _check(result, transform):
  stats = result.of(transform)
  assert stats, f"no comparison under {transform}"
  bad = [s for s in stats if not s.ok]
  assert not bad, f"{transform}: " + "; ".join(
      f"{s.name} max abs {s.max_abs:.3g} max rel {s.max_rel:.3g} {s.note}" for s in bad) + "\n" + str(result)


def test_every_public_op_has_a_row():
  # A new op joins the matrix by getting a row in jaxcnn._verify.OPS; this keeps the table complete.
  functions = {name for name, value in vars(ops).items()
               if not name.startswith("_") and inspect.isfunction(value)
               and value.__module__.startswith("jaxcnn.ops")}
  public = {name for name in functions if callable(getattr(reference, name, None))}
  # Everything else exported by jaxcnn.ops configures the convolution lowering; an op has a twin.
  assert functions - public == {"conv_lowering", "forward_only_lowering", "get_conv_lowering",
                                "set_conv_lowering", "resolve_conv_lowering"}
  assert {spec.name for spec in OPS} == public
  for spec in OPS:
    assert set(spec.not_applicable) <= set(TRANSFORMS), spec.name
    args, _ = spec.example()
    assert np.shape(args[0])[0] == 2, f"{spec.name}: the example's batch is 2"


def test_auto_cells_repeat_an_explicit_lowering():
  # Each convolution row's example traces under "auto" to exactly the program (jaxpr) of a lowering the
  # row checks explicitly in the default run, with and without reverse mode: the "auto" cell (extended
  # tier) repeats a default-run cell.
  for spec in OPS:
    if "auto" not in spec.lowerings:
      continue
    args, kwargs = spec.example()
    args = tuple(map(_as_jax, args))
    kwargs = {k: _as_jax(v) for k, v in kwargs.items()}
    op = getattr(ops, spec.name)

    def traced(lowering):
      with ops.conv_lowering(lowering):
        forward = jax.make_jaxpr(lambda *a: op(*a, **kwargs))(*args)
        backward = jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(op(*a, **kwargs) ** 2)))(*args)
      return str(forward), str(backward)

    auto = traced("auto")
    repeated = [low for low in spec.lowerings if low not in _EXTENDED_LOWERINGS and traced(low) == auto]
    assert repeated, f"{spec.name}: its example under 'auto' traces to no explicitly checked lowering's program"


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("name, lowering", _cell_params())
def test_op_under_transform_matches_reference(name, lowering, transform):
  spec = op_spec(name)
  if transform in spec.not_applicable:
    pytest.skip(f"{name} under {transform}: {spec.not_applicable[transform]}")
  result = _verified(name, lowering, 0)
  assert not result.forward or all(s.ok for s in result.forward + result.grads), str(result)
  _check(result, transform)


_VARIANT_CELLS = [(spec.name, lowering, v) for spec in OPS for lowering in spec.lowerings
                  for v in range(1, len(spec.variants) + 1)]


@pytest.mark.slow
@pytest.mark.parametrize("name, lowering, variant", _VARIANT_CELLS,
                         ids=[f"{_cell_id(n, low)}-v{v}" for n, low, v in _VARIANT_CELLS])
def test_op_variants_under_every_transform_match_reference(name, lowering, variant):
  result = _verified(name, lowering, variant)
  for transform in TRANSFORMS:
    if transform not in op_spec(name).not_applicable:
      _check(result, transform)


def _per_example_under_batch_sharding(lowering):
  """Per-example weight gradients of a conv with the batch sharded over 2 devices, and the same on 1."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  if len(jax.devices()) < 2:
    pytest.skip("needs 2 devices")
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 5, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 2)), jnp.float32)
  mesh = jax.make_mesh((2,), ("b",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])

  def grads(x, w):
    with ops.conv_lowering(lowering):
      def example(xi):
        return jax.grad(lambda w: jnp.sum(ops.conv2d(xi[None], w, padding="same") ** 2))(w)
      return jax.vmap(example)(x)

  expected = jax.vmap(lambda xi: jax.grad(
      lambda w: jnp.sum(reference.conv2d(xi[None], w, padding="same") ** 2))(w))(x)
  return jax.jit(grads)(jax.device_put(x, NamedSharding(mesh, P("b"))), w), expected


@pytest.mark.parametrize("lowering", ["im2col", "rows"])
def test_per_example_gradients_under_batch_sharding(lowering):
  actual, expected = _per_example_under_batch_sharding(lowering)
  assert_close(actual, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.xfail(strict=True, reason="XLA's SPMD partitioning of a vmapped lax convolution's weight "
                                       "gradient is wrong with the batch sharded (jax 0.10.2)")
def test_per_example_gradients_under_batch_sharding_xla_lowering():
  # Found by the transform matrix: no jaxcnn code is involved in the "xla" lowering's gradient
  # (lax.conv_general_dilated and jax's own batching and transpose rules). Strict, so that the day
  # jax/XLA fixes it this test fails and the marker is removed.
  actual, expected = _per_example_under_batch_sharding("xla")
  assert_close(actual, expected, rtol=1e-4, atol=1e-4)


# -- models: forward mode ----------------------------------------------------------------------------------

# Max pooling with dropout, average pooling, batch normalisation.
_FORWARD_MODELS = ("mnist_convnet", "lenet5", "mnist_fast_cnn")
# Compiling is nearly all the cost; the comparisons do not depend on how hard XLA optimises.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _check_model_forward_mode(name):
  """jvp and linearize of a registered model in training mode (batch statistics, dropout with a fixed
  key) w.r.t. its parameters and input: equal to the jvp with the XLA convolution (lax), and adjoint to
  reverse mode (<ct, J t> == <J^T ct, t>)."""
  spec = models.spec(name)
  model = models.get(name) if spec.task == "reconstruction" else models.get(name, num_classes=10)
  rng = np.random.default_rng(0)
  # Batch 4: in training mode the deepest BatchNorms of a ResNet see 1x1 maps, and the statistics of a
  # batch of 2 would amplify the rounding differences between convolution algorithms past 1e-4.
  x = jnp.asarray(rng.uniform(size=(4, *spec.input_shape)), jnp.float32)
  variables = jax.eval_shape(model.init, {"params": jax.random.key(0)}, x)
  variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.1, a.dtype), variables)
  if "batch_stats" in variables:
    variables["batch_stats"] = jax.tree.map(lambda a: jnp.abs(a) + 1.0, variables["batch_stats"])
  tangent = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype),
                         (variables["params"], x))

  def f(params, x):
    out, _ = model.apply({**variables, "params": params}, x, train=True, rngs={"dropout": jax.random.key(1)},
                         mutable=["batch_stats"])
    return out

  def run(program, lowering):
    with ops.conv_lowering(lowering):
      return jax.jit(program).lower(variables["params"], x).compile(_FAST_COMPILE)(variables["params"], x)

  def forward_and_reverse(params, x):
    out, jvp_out = jax.jvp(f, (params, x), tangent)
    lin_out = jax.linearize(f, params, x)[1](*tangent)
    cotangent = jnp.cos(jnp.arange(out.size, dtype=jnp.float32)).reshape(out.shape)
    pulled = jax.vjp(f, params, x)[1](cotangent)
    adjoint = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(pulled), jax.tree.leaves(tangent)))
    return out, jvp_out, lin_out, jnp.vdot(cotangent, jvp_out), adjoint

  out, jvp_out, lin_out, ct_jvp, vjp_t = run(forward_and_reverse, "auto")
  out_xla, jvp_xla = run(lambda params, x: jax.jvp(f, (params, x), tangent), "xla")
  scale = max(1.0, float(np.max(np.abs(jvp_xla))))
  assert np.all(np.isfinite(jvp_out)) and float(np.max(np.abs(jvp_xla))) > 0
  assert_close(out, out_xla, rtol=1e-4, atol=1e-4 * max(1.0, float(np.max(np.abs(out_xla)))))
  assert_close(jvp_out, jvp_xla, rtol=1e-4, atol=1e-4 * scale)
  assert_close(lin_out, jvp_out, rtol=1e-5, atol=1e-5 * scale)
  assert_close(ct_jvp, vjp_t, rtol=1e-4, atol=1e-4 * max(1.0, abs(float(vjp_t))))


@pytest.mark.parametrize("name", _FORWARD_MODELS)
def test_forward_mode_through_models_matches_xla_and_reverse_mode(name):
  _check_model_forward_mode(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in models.names() if n not in _FORWARD_MODELS])
def test_forward_mode_through_every_registered_model(name):
  _check_model_forward_mode(name)


# -- layers and ops inside scans, remat, pmap, donation ----------------------------------------------------

def test_layers_under_nn_scan_and_remat_match_the_xla_convolution():
  import flax.linen as nn
  from jaxcnn import layers

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _):
      x = layers.Conv2D(4, 3, padding="same", use_bias=False)(x)
      x = layers.BatchNorm(momentum=0.9)(x, train=True)
      return layers.MaxPool2D(3, strides=1, padding="same")(jax.nn.relu(x)), None

  stack = nn.scan(nn.remat(Block), variable_axes={"params": 0, "batch_stats": 0},
                  split_rngs={"params": True}, length=3)()
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 6, 6, 4)), jnp.float32)
  variables = jax.jit(lambda x: stack.init(jax.random.key(0), x, None))(x)

  def step(variables, x):
    def loss(params):
      (y, _), updates = stack.apply({**variables, "params": params}, x, None, mutable=["batch_stats"])
      return jnp.sum(y ** 2), updates
    return jax.grad(loss, has_aux=True)(variables["params"])

  results = {}
  for lowering in ("auto", "xla"):
    with ops.conv_lowering(lowering):
      results[lowering] = jax.jit(step)(variables, x)
  for a, e in zip(jax.tree.leaves(results["auto"]), jax.tree.leaves(results["xla"])):
    assert_close(a, e, rtol=1e-4, atol=1e-4 * max(1.0, float(np.max(np.abs(e)))))


def test_ops_under_lax_scan_pmap_and_donation_match_the_reference():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((4, 6, 6, 3)), jnp.float32)
  kernels = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 3)) * 0.3, jnp.float32)  # 3 layers

  def net(conv, pool):
    def loss(kernels, x):
      def layer(h, w):
        return pool(jnp.tanh(conv(h, w, padding="same")), 2, strides=1, padding="same"), None
      return jnp.sum(jax.lax.scan(layer, x, kernels)[0] ** 2)
    return loss

  expected = jax.jit(jax.grad(net(reference.conv2d, reference.max_pool2d), argnums=(0, 1)))(kernels, x)
  assert ops.resolve_conv_lowering(x.shape, kernels.shape[1:]) == "rows"  # "auto" here is "rows"
  for lowering in ("auto", "im2col"):
    with ops.conv_lowering(lowering):
      loss = net(ops.conv2d, ops.max_pool2d)
      donated = jax.jit(jax.grad(loss, argnums=(0, 1)), donate_argnums=(0, 1))(kernels + 0.0, x + 0.0)
      devices = jax.local_devices()[:2]
      per_device = jax.pmap(jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0), devices=devices)(
          kernels, x.reshape(len(devices), -1, *x.shape[1:]))
    for a, e in zip(donated, expected):
      assert_close(a, e, rtol=1e-4, atol=1e-4 * max(1.0, float(np.max(np.abs(e)))))
    assert_close(per_device[0].sum(0), expected[0], rtol=1e-4, atol=1e-4 * float(np.max(np.abs(expected[0]))))
    assert_close(per_device[1].reshape(x.shape), expected[1], rtol=1e-4, atol=1e-4)
