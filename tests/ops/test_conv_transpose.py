"""jaxcnn.ops.conv2d_transpose / conv1d_transpose: the reference twin over strides, paddings, output
paddings, dilations, channel counts, lowerings and dtypes (forward and gradients); output sizes; a case
by hand; the transpose identity with conv2d; transformations; bad input."""
from __future__ import annotations

import itertools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn import ops, reference

from helpers import assert_close


def example_conv2d_transpose(dtype=jnp.float32):
  """Small arguments exercising stride, explicit padding and output_padding: (args, kwargs)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 4, 3, 3)), dtype)
  w = jnp.asarray(rng.standard_normal((3, 2, 4, 3)), dtype)
  b = jnp.asarray(rng.standard_normal((4,)), dtype)
  return (x, w, b), dict(strides=2, padding=1, output_padding=1)


def example_conv1d_transpose(dtype=jnp.float32):
  """Small arguments for the 1-D op, Keras "same" with stride 2: (args, kwargs)."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 3)), dtype)
  w = jnp.asarray(rng.standard_normal((3, 4, 3)), dtype)
  b = jnp.asarray(rng.standard_normal((4,)), dtype)
  return (x, w, b), dict(strides=2, padding="same")


def _case_id(case: dict) -> str:
  return "-".join(f"{k}={v}" for k, v in case.items()).replace(" ", "")


# Hand-picked to cover each value of every axis with the others varied; output_padding needs a stride
# or dilation above it. "rows" is what "auto" takes for dense stride-1 kernels with enough channels.
_CASES_2D = [
    dict(strides=3, padding="same", output_padding=2, dilation=1, channels=(1, 3), dtype="float32",
         lowering="auto"),
    dict(strides=(2, 3), padding=1, output_padding=(1, 2), dilation=1, channels=(3, 4), dtype="float32",
         lowering="auto"),
    dict(strides=2, padding=((2, 0), (1, 3)), output_padding=None, dilation=2, channels=(3, 2),
         dtype="float32", lowering="auto"),
    dict(strides=2, padding="same", output_padding=None, dilation=1, channels=(3, 4), dtype="bfloat16",
         lowering="auto"),
    dict(strides=(1, 2), padding=((0, 1), (2, 2)), output_padding=(0, 1), dilation=2, channels=(2, 3),
         dtype="bfloat16", lowering="auto"),
    dict(strides=2, padding="same", output_padding=1, dilation=1, channels=(3, 4), dtype="float32",
         lowering="xla"),
    dict(strides=(2, 1), padding=1, output_padding=(1, 0), dilation=(1, 2), channels=(3, 4),
         dtype="bfloat16", lowering="xla"),
    dict(strides=1, padding=1, output_padding=None, dilation=1, channels=(8, 8), dtype="float32",
         lowering="rows"),
]


def _inputs(case, seed, spatial=(5, 4), kernel=(3, 2), batch=2):
  c_in, c_out = case["channels"]
  dtype = jnp.dtype(case["dtype"])
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((batch, *spatial, c_in)), dtype)
  w = jnp.asarray(rng.standard_normal((*kernel, c_out, c_in)), dtype)
  b = jnp.asarray(rng.standard_normal((c_out,)), dtype)
  return x, w, b


@pytest.mark.parametrize("case", _CASES_2D, ids=_case_id)
def test_conv2d_transpose_matches_reference(case):
  x, w, b = _inputs(case, _CASES_2D.index(case))
  result = jaxcnn.verify("conv2d_transpose", x, w, b, strides=case["strides"], padding=case["padding"],
                         output_padding=case["output_padding"], dilation=case["dilation"],
                         lowering=case["lowering"])
  result.raise_if_failed()
  assert [g.name for g in result.grads] == ["grad x", "grad w", "grad b"]


@pytest.mark.parametrize("case", [
    dict(strides=1, padding="valid", output_padding=None, dilation=1, dtype="float32"),
    dict(strides=2, padding=((0, 3),), output_padding=1, dilation=1, dtype="bfloat16"),
    dict(strides=3, padding=2, output_padding=1, dilation=2, dtype="float32"),
], ids=_case_id)
def test_conv1d_transpose_matches_reference(case):
  case = dict(case)
  dtype = case.pop("dtype")
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal((2, 6, 3)), dtype)
  w = jnp.asarray(rng.standard_normal((3, 4, 3)), dtype)
  jaxcnn.verify("conv1d_transpose", x, w, **case).raise_if_failed()


@pytest.mark.slow
def test_conv2d_transpose_without_bias_numerical_gradient():
  (x, w, _), kwargs = example_conv2d_transpose()
  result = jaxcnn.verify("conv2d_transpose", x, w, check_grads=True, **kwargs).raise_if_failed()
  assert result.numeric_grads == "ok"
  assert [g.name for g in result.grads] == ["grad x", "grad w"]


@pytest.mark.slow
@pytest.mark.parametrize("lowering", ["auto", "xla"])
def test_conv2d_transpose_exhaustive_grid(lowering):
  # Every stride, padding form, output padding and dilation combination on one odd-sized input.
  paddings = ["valid", "same", 0, 2, ((1, 0), (0, 2))]
  for s, p, op, d, k in itertools.product([1, 2, 3], paddings, [None, 1, 2], [1, 2], [1, 3]):
    if op is not None and op >= max(s, d):
      continue
    case = dict(channels=(2, 3), dtype="float32")
    x, w, b = _inputs(case, 0, kernel=(k, k))
    try:
      result = jaxcnn.verify("conv2d_transpose", x, w, b, strides=s, padding=p, output_padding=op,
                             dilation=d, lowering=lowering)
    except ValueError as err:  # large paddings can leave no output: both twins must say so
      assert "leaves no output" in str(err)
      continue
    result.raise_if_failed()


# ---- output sizes and hand-computed values -------------------------------------------------------------

@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("size, k, s, d, padding, output_padding, expected", [
    (7, 3, 2, 1, "same", None, 14),            # Keras "same": in * stride
    (7, 3, 2, 1, "valid", None, 15),           # Keras "valid": in * s + max(k - s, 0)
    (7, 1, 3, 1, "valid", None, 21),           # k < s: the gaps are zeros, still in * s
    (7, 3, 2, 2, "valid", None, 17),           # k_eff = 5
    (7, 3, 2, 1, "same", 0, 13),               # (in - 1) * s + k - 2 * (k // 2) + p
    (7, 4, 2, 1, "same", 1, 13),
    (7, 3, 2, 1, "valid", 1, 16),              # (in - 1) * s + k + p
    (7, 3, 2, 1, 1, 1, 14),                    # PyTorch: (in - 1) * s - 2p + k + output_padding
    (7, 5, 3, 1, 2, 2, 21),
    (7, 3, 1, 2, ((3, 1),), None, 7),          # asymmetric explicit padding, k_eff = 5
])
def test_output_sizes(module, size, k, s, d, padding, output_padding, expected):
  x = jax.ShapeDtypeStruct((1, size, 2), jnp.float32)
  w = jax.ShapeDtypeStruct((k, 3, 2), jnp.float32)
  out = jax.eval_shape(lambda x, w: module.conv1d_transpose(x, w, strides=s, padding=padding,
                                                            output_padding=output_padding, dilation=d), x, w)
  assert out.shape == (1, expected, 3)


@pytest.mark.parametrize("conv", [ops.conv2d_transpose, reference.conv2d_transpose], ids=["ops", "reference"])
def test_scatter_by_hand(conv):
  # A 2x2 input of ones and twos, a 2x2 kernel [[1, 2], [3, 4]], stride 2: the windows do not overlap,
  # so the output tiles the kernel scaled by each input pixel; stride 1 overlaps and adds them.
  x = jnp.array([[1.0, 2.0], [3.0, 4.0]], jnp.float32).reshape(1, 2, 2, 1)
  w = jnp.array([[1.0, 2.0], [3.0, 4.0]], jnp.float32).reshape(2, 2, 1, 1)
  tiled = jax.jit(lambda x, w: conv(x, w, strides=2))(x, w)[0, :, :, 0]
  np.testing.assert_array_equal(np.asarray(tiled), [[1, 2, 2, 4], [3, 4, 6, 8], [3, 6, 4, 8], [9, 12, 12, 16]])
  overlapped = jax.jit(lambda x, w: conv(x, w))(x, w)[0, :, :, 0]
  # full[p, q] = sum over input (i, j) and tap (p - i, q - j) of x[i, j] * w[p - i, q - j]
  np.testing.assert_array_equal(np.asarray(overlapped), [[1, 4, 4], [6, 20, 16], [9, 24, 16]])
  # PyTorch padding 1 drops the ring of the full result; Keras "same" keeps the top-left in * s block.
  np.testing.assert_array_equal(np.asarray(jax.jit(lambda x, w: conv(x, w, padding=1))(x, w)).ravel(), [20])
  same = jax.jit(lambda x, w: conv(x, w, padding="same"))(x, w)[0, :, :, 0]
  np.testing.assert_array_equal(np.asarray(same), [[1, 4], [6, 20]])


@pytest.mark.parametrize("lowering, strides, padding, dilation, size", [
    ("auto", 3, ((2, 0), (0, 1)), 1, 9), ("xla", 2, "same", 2, 7)])
def test_is_the_input_gradient_of_conv2d(lowering, strides, padding, dilation, size):
  # For a conv2d from (size x size+1) to (H', W'), the vjp w.r.t. its input is conv2d_transpose of the
  # cotangent with the same kernel, when padding/output_padding give back the input size.
  rng = np.random.default_rng(5)
  z = jnp.asarray(rng.standard_normal((2, size, size + 1, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 2, 3, 4)), jnp.float32)  # HWIO of conv2d: 3 -> 4 channels
  conv = lambda z: ops.conv2d(z, w, strides=strides, padding=padding, dilation=dilation)  # noqa: E731
  y = jax.eval_shape(conv, z)
  ct = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  expected = jax.jit(lambda z, ct: jax.vjp(conv, z)[1](ct)[0])(z, ct)
  pads = jaxcnn.ops._args.resolve_padding(padding, z.shape[1:3], (3, 2), (strides,) * 2, (dilation,) * 2)
  # output_padding recovers the rows/columns the strided conv never read.
  extra = tuple(z.shape[1 + a] - ((y.shape[1 + a] - 1) * strides + (k - 1) * dilation + 1 - sum(pads[a]))
                for a, k in enumerate((3, 2)))
  with ops.conv_lowering(lowering):
    got = jax.jit(lambda ct: ops.conv2d_transpose(ct, w, strides=strides, padding=pads, output_padding=extra,
                                                  dilation=dilation))(ct)
  assert got.shape == z.shape
  assert_close(got, expected)


def test_dtypes_and_promotion():
  (x, w, b), kwargs = example_conv2d_transpose(jnp.bfloat16)
  dtype_of = lambda f, *a: jax.eval_shape(lambda *a: f(*a, **kwargs), *a).dtype  # noqa: E731
  assert dtype_of(ops.conv2d_transpose, x, w, b) == jnp.bfloat16
  assert dtype_of(ops.conv2d_transpose, x, w.astype(jnp.float32)) == jnp.float32
  assert dtype_of(reference.conv2d_transpose, x, w.astype(jnp.float32)) == jnp.float32
  with ops.conv_lowering("xla"):
    jaxpr = str(jax.make_jaxpr(lambda x, w: ops.conv2d_transpose(x, w, **kwargs))(x, w))
  assert "lhs_dilation=(2, 2)" in jaxpr and "preferred_element_type=float32" in jaxpr


def test_cpu_lowering_multiplies_no_inserted_zeros():
  # The sub-pixel form convolves the undilated input: the matmul's rows are the input's positions,
  # not the (stride^2 times larger) output's.
  x = jnp.ones((2, 7, 7, 8), jnp.float32)
  w = jnp.ones((3, 3, 16, 8), jnp.float32)
  with ops.conv_lowering("im2col"):
    jaxpr = jax.make_jaxpr(lambda x, w: ops.conv2d_transpose(x, w, strides=2, padding="same"))(x, w)
  eqns = list(_equations(jaxpr.jaxpr))
  dots = [e for e in eqns if e.primitive.name == "dot_general" and e.outvars[0].aval.ndim == 4]
  assert dots and all(e.outvars[0].aval.shape[:3] == (2, 7, 7) for e in dots)
  assert not any(e.primitive.name == "conv_general_dilated" for e in eqns)


def _equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _equations(sub)


# ---- transformations -----------------------------------------------------------------------------------

def test_jit_vmap_and_vjp_match_reference():
  (x, w, b), kwargs = example_conv2d_transpose()

  def program(module, x, w):
    op = lambda x, w: module.conv2d_transpose(x, w, b, **kwargs)  # noqa: E731
    batched = jax.vmap(lambda xi: op(xi, w))(jnp.stack([x, 2.0 * x, -x]))
    over_w = jax.vmap(lambda wi: op(x, wi))(jnp.stack([w, 0.5 * w]))  # per-example kernels
    y, vjp = jax.vjp(op, x, w)
    return batched, over_w, y, vjp(jnp.ones_like(y))

  got = jax.jit(lambda x, w: program(ops, x, w))(x, w)
  want = jax.jit(lambda x, w: program(reference, x, w))(x, w)
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert_close(a, e)
  over_w = got[1]
  assert_close(over_w[1], 0.5 * (over_w[0] - b.reshape(1, 1, 1, -1)) + b.reshape(1, 1, 1, -1))


_JVP_XFAIL = pytest.mark.xfail(
    strict=False, reason="ops.conv2d's matmul lowerings use jax.custom_vjp, which forward mode cannot pass")


@pytest.mark.parametrize("lowering", [pytest.param("auto", marks=_JVP_XFAIL), "xla"])
@pytest.mark.parametrize("example", [example_conv2d_transpose, example_conv1d_transpose],
                         ids=["conv2d_transpose", "conv1d_transpose"])
def test_jvp_and_jacfwd_match_reference(lowering, example):
  (x, w, b), kwargs = example()
  name = example.__name__.removeprefix("example_")
  fast, ref = getattr(ops, name), getattr(reference, name)
  tangents = (jnp.ones_like(x), 0.5 * jnp.ones_like(w))

  def program(op, x, w, tx, tw):
    tangent_out = jax.jvp(lambda x, w: op(x, w, b, **kwargs), (x, w), (tx, tw))[1]
    return tangent_out, jax.jacfwd(lambda x: op(x, w, b, **kwargs))(x)

  with ops.conv_lowering(lowering):
    got = jax.jit(lambda *a: program(fast, *a))(x, w, *tangents)
  want = jax.jit(lambda *a: program(ref, *a))(x, w, *tangents)
  for a, e in zip(got, want):
    assert_close(a, e)


# ---- bad input -----------------------------------------------------------------------------------------

_X, _W = jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 3))


@pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])
@pytest.mark.parametrize("call, message", [
    (lambda m: m.conv2d_transpose(_X[0], _W), r"x must have rank 4 \(N, H, W, C\)"),
    (lambda m: m.conv2d_transpose(_X, _W[0]), r"w must have rank 4 \(kh, kw, C_out, C_in\)"),
    (lambda m: m.conv2d_transpose(_X.astype(jnp.int32), _W), "x must be a floating-point array"),
    (lambda m: m.conv2d_transpose(_X, _W.astype(bool)), "w must be a floating-point array"),
    (lambda m: m.conv2d_transpose(_X, jnp.ones((3, 3, 3, 2))), r"channel mismatch: x has 3 channels .* "
     r"in_channels = w.shape\[-1\] = 2"),
    (lambda m: m.conv2d_transpose(_X, _W, jnp.ones(3)), r"b must have shape \(2,\)"),
    (lambda m: m.conv2d_transpose(jnp.ones((1, 0, 4, 3)), _W), "x must have non-empty spatial dims"),
    (lambda m: m.conv2d_transpose(_X, _W, strides=0), "strides must be >= 1"),
    (lambda m: m.conv2d_transpose(_X, _W, dilation=(1, 2, 3)), "dilation must be an int or a sequence of 2"),
    (lambda m: m.conv2d_transpose(_X, _W, padding="full"), "padding must be 'valid', 'same'"),
    (lambda m: m.conv2d_transpose(_X, _W, padding=-1), "padding must be non-negative"),
    (lambda m: m.conv2d_transpose(_X, _W, strides=2, output_padding=2), r"output_padding 2 must be smaller "
     r"than the stride or the dilation .*dim 0: 2 >= max\(2, 1\)"),
    (lambda m: m.conv2d_transpose(_X, _W, output_padding=-1), "output_padding must be >= 0"),
    (lambda m: m.conv2d_transpose(_X, _W, padding=4), r"padding 4 leaves no output along spatial dim 0 "
     r"\(output size -2"),
    (lambda m: m.conv1d_transpose(_X, _W), r"x must have rank 3 \(N, L, C\)"),
    (lambda m: m.conv1d_transpose(_X[0], _W[0, 0][None], padding=((0, 1), (0, 1))),
     "padding must give 1 spatial dims"),
])
def test_bad_input_raises_value_error_naming_the_argument(module, call, message):
  with pytest.raises(ValueError, match=message):
    call(module)
