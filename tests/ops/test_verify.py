"""jaxcnn.verify: finds real discrepancies (forward, gradient, numerical gradient), handles tuple outputs,
rng keywords, integer leaves and non-array arguments, and rejects bad requests."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn import ops, reference
from jaxcnn._verify import ErrorStat, VerifyResult, default_tolerance


def _normal(seed: int, shape, dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


@pytest.fixture
def conv_args():
  return _normal(0, (2, 5, 5, 2)), _normal(1, (3, 3, 2, 3)), _normal(2, (3,))


def _install(monkeypatch, name, fast, ref):
  """Registers a toy op pair under `name` in both namespaces for the duration of a test."""
  monkeypatch.setattr(ops, name, fast, raising=False)
  monkeypatch.setattr(reference, name, ref, raising=False)


def test_verify_conv2d_passes_with_table(conv_args):
  result = jaxcnn.verify("conv2d", *conv_args, padding="same", lowering="im2col")
  assert isinstance(result, VerifyResult)
  assert result.ok and result.op == "conv2d" and result.dtype == "float32"
  assert (result.rtol, result.atol) == default_tolerance(jnp.float32)
  assert [s.name for s in result.forward] == ["out"]
  assert [s.name for s in result.grads] == ["grad x", "grad w", "grad b"]
  assert result.forward[0].shape == (2, 5, 5, 3)
  table = str(result)
  assert table.splitlines()[0].startswith("verify conv2d [float32, lowering=im2col")
  assert "OK" in table.splitlines()[0]
  for label in ("max abs err", "max rel err", "grad x", "grad w", "grad b"):
    assert label in table
  assert result.raise_if_failed() is result


def test_verify_accepts_the_fast_function(conv_args):
  result = jaxcnn.verify(ops.conv2d, *conv_args, strides=2)
  assert result.ok and result.op == "conv2d"
  assert result.forward[0].shape == (2, 2, 2, 3)


def test_verify_detects_a_wrong_forward(monkeypatch, conv_args):
  # A kernel flipped spatially: a true convolution instead of cross-correlation.
  def flipped(x, w, b=None, **kwargs):
    return reference.conv2d(x, w[::-1, ::-1], b, **kwargs)

  monkeypatch.setattr(ops, "conv2d", flipped)
  result = jaxcnn.verify("conv2d", *conv_args)
  assert not result.ok
  assert not result.forward[0].ok and result.forward[0].max_abs > 0.1
  with pytest.raises(AssertionError, match=r"verify conv2d .*FAILED(.|\n)*out .* NO"):
    result.raise_if_failed()


def test_verify_detects_a_wrong_gradient_only(monkeypatch, conv_args):
  # Correct forward, gradient w.r.t. w scaled by 2: only "grad w" may fail.
  @jax.custom_vjp
  def bad(x, w, b):
    return reference.conv2d(x, w, b)

  def bad_fwd(x, w, b):
    out, vjp = jax.vjp(reference.conv2d, x, w, b)
    return out, vjp

  def bad_bwd(vjp, ct):
    dx, dw, db = vjp(ct)
    return dx, 2 * dw, db

  bad.defvjp(bad_fwd, bad_bwd)
  monkeypatch.setattr(ops, "conv2d", lambda x, w, b=None: bad(x, w, b))
  result = jaxcnn.verify("conv2d", *conv_args)
  assert [s.ok for s in result.forward] == [True]
  assert {s.name: s.ok for s in result.grads} == {"grad x": True, "grad w": False, "grad b": True}
  assert not result.ok
  # The numerical check catches the same bug without the reference.
  numeric = jaxcnn.verify("conv2d", *conv_args, check_grads=True)
  assert numeric.numeric_grads.startswith("FAILED")


def test_verify_numerical_check_passes_for_a_correct_op(conv_args):
  result = jaxcnn.verify("conv2d", *conv_args, strides=2, lowering="xla", check_grads=True)
  assert result.numeric_grads == "ok" and result.ok
  assert "numerical gradient check: ok" in str(result)


def test_verify_tuple_outputs_rng_and_integer_leaves(monkeypatch):
  # A toy op shaped like batch_norm (tuple output) and dropout (rng keyword), with an integer leaf.
  def fast(x, scale, *, rng, rate):
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    y = jnp.where(keep, x / (1.0 - rate), 0.0) * scale
    return y, jnp.mean(y, axis=0), jnp.argmax(y, axis=-1)

  def ref(x, scale, *, rng, rate):
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    y = x * keep.astype(x.dtype) * (1.0 / (1.0 - rate)) * scale
    return y, jnp.sum(y, axis=0) / x.shape[0], jnp.argmax(y, axis=-1)

  _install(monkeypatch, "toy_dropout", fast, ref)
  x, scale = _normal(3, (4, 5)), _normal(4, (1, 5))
  result = jaxcnn.verify("toy_dropout", x, scale, rng=jax.random.PRNGKey(7), rate=0.5)
  assert result.ok, str(result)
  assert [s.name for s in result.forward] == ["out[0]", "out[1]", "out[2]"]
  assert [s.name for s in result.grads] == ["grad x", "grad scale"]

  # Different keys on the two sides would not agree: the same key must reach both.
  def other_key(x, scale, *, rng, rate):
    return fast(x, scale, rng=jax.random.fold_in(rng, 1), rate=rate)

  _install(monkeypatch, "toy_dropout", other_key, ref)
  broken = jaxcnn.verify("toy_dropout", x, scale, rng=jax.random.PRNGKey(7), rate=0.5)
  assert not broken.forward[0].ok
  assert not broken.forward[2].ok and "entries differ" in broken.forward[2].note


def test_verify_passes_non_array_positionals_through(monkeypatch):
  # Like max_pool2d(x, pool_size): the int stays a Python int on both sides (it sets a shape).
  def fast(x, size):
    return x[:, :size] * 2.0

  def ref(x, size):
    return x[:, :size] + x[:, :size]

  _install(monkeypatch, "toy_take", fast, ref)
  result = jaxcnn.verify("toy_take", _normal(5, (3, 6)), 4)
  assert result.ok and result.forward[0].shape == (3, 4)
  assert [s.name for s in result.grads] == ["grad x"]


def test_verify_structure_shape_and_nan_mismatches(monkeypatch):
  x = _normal(6, (2, 3))
  _install(monkeypatch, "toy_pair", lambda x: (x, x), lambda x: (x, x, x))
  assert "structure" in jaxcnn.verify("toy_pair", x, argnums=()).forward[0].note

  _install(monkeypatch, "toy_shape", lambda x: x[:1], lambda x: x)
  stat = jaxcnn.verify("toy_shape", x, argnums=()).forward[0]
  assert not stat.ok and "shape" in stat.note

  _install(monkeypatch, "toy_nan", lambda x: x.at[0, 0].set(jnp.nan), lambda x: x)
  stat = jaxcnn.verify("toy_nan", x, argnums=()).forward[0]
  assert not stat.ok and stat.max_abs == float("inf")

  # NaN on both sides at the same place is agreement.
  _install(monkeypatch, "toy_nan", lambda x: jnp.log(x), lambda x: jnp.log(x))
  assert jaxcnn.verify("toy_nan", x, argnums=()).ok


def test_verify_tolerances_bfloat16_and_overrides(conv_args):
  x, w, b = (a.astype(jnp.bfloat16) for a in conv_args)
  result = jaxcnn.verify("conv2d", x, w, b, padding=1)
  assert result.dtype == "bfloat16"
  assert (result.rtol, result.atol) == default_tolerance(jnp.bfloat16)
  assert result.ok, str(result)
  strict = jaxcnn.verify("conv2d", *conv_args, rtol=0.0, atol=1e-30, argnums=())
  assert (strict.rtol, strict.atol) == (0.0, 1e-30)


def test_error_stat_tolerance_rule():
  # |a - e| <= atol * max(1, max|e|) + rtol * |e|: the atol part scales with the array's magnitude.
  from jaxcnn._verify import _compare
  expected = np.array([1000.0, 0.0], np.float32)
  near = _compare("v", np.array([1000.01, 0.01], np.float32), expected, rtol=0.0, atol=2e-5)
  assert near.ok  # 0.01 <= 2e-5 * 1000
  far = _compare("v", np.array([1000.0, 0.03], np.float32), expected, rtol=0.0, atol=2e-5)
  assert not far.ok and far.max_abs == pytest.approx(0.03)
  assert isinstance(far, ErrorStat)


def test_default_tolerance_table():
  assert default_tolerance(jnp.float32) < default_tolerance(jnp.float16) < default_tolerance(jnp.bfloat16)
  with pytest.raises(ValueError, match="no default tolerance for dtype int32"):
    default_tolerance(jnp.int32)


def test_verify_bad_requests(conv_args):
  x, w, b = conv_args
  with pytest.raises(ValueError, match="op 'conv3d' is not a function in jaxcnn.ops and jaxcnn.reference"):
    jaxcnn.verify("conv3d", x, w)
  with pytest.raises(ValueError, match="is not a jaxcnn.ops function"):
    jaxcnn.verify(lambda x: x, x)
  with pytest.raises(ValueError, match="op must be an op name"):
    jaxcnn.verify(3, x)
  with pytest.raises(ValueError, match="argnums entry 5 is not a positional index below 3"):
    jaxcnn.verify("conv2d", x, w, b, argnums=5)
  with pytest.raises(ValueError, match="argnums entry 1 names a non-floating-array argument"):
    jaxcnn.verify("conv2d", x, 3, argnums=(1,))
  with pytest.raises(ValueError, match="check_grads needs float32 or float64 inputs; x is bfloat16"):
    jaxcnn.verify("conv2d", x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), check_grads=True)
  with pytest.raises(ValueError, match="check_grads needs at least one floating array"):
    jaxcnn.verify("conv2d", x, w, argnums=(), check_grads=True)
  with pytest.raises(ValueError, match="conv lowering must be one of"):
    jaxcnn.verify("conv2d", x, w, lowering="fft")
  # Errors of the op itself propagate unchanged.
  with pytest.raises(ValueError, match="channel mismatch"):
    jaxcnn.verify("conv2d", x, w[:, :, :1])


# -- transforms ------------------------------------------------------------------------------------------

def _wrong_tangent_square():
  """x ** 2 whose forward-mode rule is off by a factor (reverse mode of it stays right only where the
  transpose of the JVP is used, so every derivative through it is wrong: grad, jvp, jacfwd...)."""
  @jax.custom_jvp
  def square(x):
    return x * x

  @square.defjvp
  def _(primals, tangents):
    (x,), (t,) = primals, tangents
    return x * x, 3.0 * x * t

  return square


def test_verify_transforms_report_each_transform(monkeypatch):
  _install(monkeypatch, "toy_square", lambda x: x * x, lambda x: x ** 2)
  x = _normal(5, (2, 3))
  result = jaxcnn.verify("toy_square", x, transforms=("jvp", "vmap", "export"))
  assert result.ok, str(result)
  assert [s.name for s in result.of("jvp")] == ["jvp: out", "jvp: tangent out"]
  assert {s.name.split(":")[0] for s in result.transformed} == {"jvp", "vmap", "export"}
  assert "jvp: tangent out" in str(result)


def test_verify_transforms_detect_a_wrong_derivative(monkeypatch):
  _install(monkeypatch, "toy_square", _wrong_tangent_square(), lambda x: x ** 2)
  x = _normal(6, (2, 3))
  result = jaxcnn.verify("toy_square", x, transforms=("jit", "jvp", "jacfwd", "hessian"))
  assert not result.ok
  assert all(s.ok for s in result.of("jit"))
  for transform in ("jvp", "jacfwd", "hessian"):
    assert not all(s.ok for s in result.of(transform)), transform
  assert not result.grads[0].ok  # the plain gradient too (reverse mode transposes the JVP)


def test_verify_transforms_report_an_op_that_cannot_be_transformed(monkeypatch):
  # A custom_vjp op cannot be differentiated in forward mode: jvp fails with the error as its note,
  # the other transforms are still compared.
  @jax.custom_vjp
  def square(x):
    return x * x

  square.defvjp(lambda x: (x * x, x), lambda x, g: (2.0 * x * g,))
  _install(monkeypatch, "toy_square", square, lambda x: x ** 2)
  result = jaxcnn.verify("toy_square", _normal(7, (2, 3)), transforms=("jvp", "vjp"))
  (jvp,) = result.of("jvp")
  assert not jvp.ok and "raised TypeError" in jvp.note and "custom_vjp" in jvp.note
  assert result.of("vjp") and all(s.ok for s in result.of("vjp"))


def test_verify_transforms_bad_requests(conv_args):
  x, w, b = conv_args
  with pytest.raises(ValueError, match=r"unknown transforms \['fwd'\]; known: jit, grad"):
    jaxcnn.verify("conv2d", x, w, transforms=("jvp", "fwd"))
  with pytest.raises(ValueError, match="transform 'shard_map' does not apply to dropout: every shard"):
    jaxcnn.verify("dropout", x, 0.5, rng=jax.random.PRNGKey(0), transforms=("shard_map",))
  with pytest.raises(ValueError, match="transforms need at least one floating array argument"):
    jaxcnn.verify("conv2d", x, w, argnums=(), transforms=("jvp",))
