"""jaxcnn.ops.conv2d/conv1d: every lowering against the reference twin, hand-computed cases, bad input,
and the lowering selection."""
from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn import ops, reference
from jaxcnn.ops import _args

from helpers import REPO_ROOT, assert_close

LOWERINGS = ("xla", "im2col", "rows")
_CONVS = {"conv2d": (ops.conv2d, reference.conv2d), "conv1d": (ops.conv1d, reference.conv1d)}


def _pairwise(axes: dict) -> list[dict]:
  """A deterministic covering set: every pair of values of every two axes appears in some case.

  Greedy: repeatedly take the full combination that covers the most uncovered pairs. Far fewer cases
  than the full cross product, which keeps compile-bound CPU tests fast.
  """
  names = list(axes)
  uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
               for va in range(len(axes[a])) for vb in range(len(axes[b]))}
  cases = []
  while uncovered:
    best, best_gain = None, -1
    for combo in itertools.product(*(range(len(axes[n])) for n in names)):
      gain = sum((a, combo[i], b, combo[j]) in uncovered
                 for (i, a), (j, b) in itertools.combinations(enumerate(names), 2))
      if gain > best_gain:
        best, best_gain = combo, gain
    uncovered -= {(a, best[i], b, best[j]) for (i, a), (j, b) in itertools.combinations(enumerate(names), 2)}
    cases.append({n: axes[n][v] for n, v in zip(names, best)})
  return cases


def _case_id(case: dict) -> str:
  return "-".join(f"{k}={v}" for k, v in case.items()).replace(" ", "")


# Axes of the 2-D grid. "groups" is a role: 1, 2, or "depthwise" (groups == C); "size" picks odd or even
# spatial extents (and a non-square image).
_AXES_2D = {
    "strides": [1, 2, 3],
    "padding": ["valid", "same", 1, ((1, 2), (0, 1))],
    "dilation": [1, 2],
    "groups": [1, 2, "depthwise"],
    "size": ["odd", "even"],
    "batch": [1, 7],
    "dtype": ["float32", "bfloat16"],
}
_PAIRWISE_2D = _pairwise(_AXES_2D)
# A full cross of the two axes whose index arithmetic interacts most (padding x strides).
_CROSS_2D = [dict(strides=s, padding=p, dilation=1, groups=1, size="odd", batch=2, dtype="float32")
             for s, p in itertools.product([1, 2, 3], ["valid", "same", 1, ((1, 2), (0, 1))])]


_CASES_2D = _PAIRWISE_2D + [c for c in _CROSS_2D if c not in _PAIRWISE_2D]


def _make_inputs(case: dict, n_spatial: int, seed: int):
  channels = 4
  groups = channels if case["groups"] == "depthwise" else case["groups"]
  out_channels = 6 if groups != channels else 8  # depthwise with channel multiplier 2
  spatial = {"odd": (7, 9), "even": (8, 6)}[case["size"]][:n_spatial] if n_spatial == 2 else \
      {"odd": (11,), "even": (12,)}[case["size"]]
  kernel = (3, 2)[:n_spatial] if n_spatial == 2 else (3,)
  dtype = jnp.dtype(case["dtype"])
  # NumPy draws: jax.random would compile a sampler per shape, which dominates these small tests.
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((case["batch"], *spatial, channels)), dtype)
  w = jnp.asarray(rng.standard_normal((*kernel, channels // groups, out_channels)), dtype)
  b = jnp.asarray(rng.standard_normal((out_channels,)), dtype)
  return x, w, b, groups


def test_pairwise_grid_covers_every_pair():
  cases = _PAIRWISE_2D
  for a, b in itertools.combinations(_AXES_2D, 2):
    for va, vb in itertools.product(_AXES_2D[a], _AXES_2D[b]):
      assert any(c[a] == va and c[b] == vb for c in cases), (a, va, b, vb)
  assert len(cases) < 20  # the point of the covering set: far below the 576-case cross product


def _case_lowerings(cases, *, one_dimensional: bool):
  """(case, lowering) params. "rows" lowers grouped and 1-D convolutions through im2col (ops/conv.py
  `_conv_rows`; that dispatch is checked by test_lowerings_emit_the_intended_primitives), so those "rows"
  cases repeat their "im2col" case: they are in the extended tier."""
  params = []
  for case in cases:
    for lowering in LOWERINGS:
      repeat = lowering == "rows" and (one_dimensional or case["groups"] != 1)
      params.append(pytest.param(case, lowering, id=f"{_case_id(case)}-{lowering}",
                                 marks=[pytest.mark.extended] if repeat else []))
  return params


@pytest.mark.parametrize("case, lowering", _case_lowerings(_CASES_2D, one_dimensional=False))
def test_conv2d_matches_reference(case, lowering):
  x, w, b, groups = _make_inputs(case, 2, seed=_CASES_2D.index(case))
  result = jaxcnn.verify("conv2d", x, w, b, strides=case["strides"], padding=case["padding"],
                         dilation=case["dilation"], groups=groups, lowering=lowering)
  result.raise_if_failed()
  assert [g.name for g in result.grads] == ["grad x", "grad w", "grad b"]
  assert result.forward[0].shape[0] == case["batch"]


_PAIRWISE_1D = _pairwise({
    "strides": [1, 2, 3],
    "padding": ["valid", "same", 2, ((0, 1),)],
    "dilation": [1, 2],
    "groups": [1, 2, "depthwise"],
    "size": ["odd", "even"],
    "batch": [1, 7],
    "dtype": ["float32", "bfloat16"],
})


@pytest.mark.parametrize("case, lowering", _case_lowerings(_PAIRWISE_1D, one_dimensional=True))
def test_conv1d_matches_reference(case, lowering):
  x, w, b, groups = _make_inputs(case, 1, seed=_PAIRWISE_1D.index(case))
  jaxcnn.verify("conv1d", x, w, b, strides=case["strides"], padding=case["padding"],
                dilation=case["dilation"], groups=groups, lowering=lowering).raise_if_failed()


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_conv2d_without_bias_and_1x1_kernel(lowering):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 4, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((1, 1, 3, 5)), jnp.float32)
  result = jaxcnn.verify("conv2d", x, w, strides=(2, 1), lowering=lowering).raise_if_failed()
  assert [g.name for g in result.grads] == ["grad x", "grad w"]


def test_conv2d_numerical_gradient():
  # One numerical check of the CPU default lowering: the grid above already ties every lowering's
  # gradients to the reference's, this ties them to finite differences as well.
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((1, 5, 5, 2)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 1, 4)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((4,)), jnp.float32)
  result = jaxcnn.verify("conv2d", x, w, b, strides=2, padding="same", groups=2, lowering="im2col",
                         check_grads=True)
  result.raise_if_failed()
  assert result.numeric_grads == "ok"


# ---- hand-computed cases -------------------------------------------------------------------------------

# The fast op under each lowering, and the reference (which has none).
_IMPLS_2D = [(ops.conv2d, "xla"), (ops.conv2d, "im2col"), (ops.conv2d, "rows"), (reference.conv2d, "auto")]
_IMPL_IDS = ["ops-xla", "ops-im2col", "ops-rows", "reference"]


def _run(conv, lowering, *args, **kwargs):
  """conv(*args, **kwargs) traced under `lowering`, jitted: one compile instead of one per primitive."""
  with ops.conv_lowering(lowering):
    return jax.jit(lambda *a: conv(*a, **kwargs))(*args)


@pytest.mark.parametrize("conv, lowering", _IMPLS_2D, ids=_IMPL_IDS)
def test_vertical_edge_detector(conv, lowering):
  # The textbook 6x6 image: left half 10, right half 0. The 3x3 vertical edge filter [1, 0, -1] per row
  # sums 3 * (10 - 10) = 0 away from the edge and 3 * (10 - 0) = 30 on windows that straddle it.
  image = np.zeros((6, 6), np.float32)
  image[:, :3] = 10.0
  edge = np.array([[1.0, 0.0, -1.0]] * 3, np.float32)
  out = _run(conv, lowering, jnp.asarray(image)[None, :, :, None], jnp.asarray(edge)[:, :, None, None])
  assert out.shape == (1, 4, 4, 1)  # n - f + 1 = 6 - 3 + 1
  expected = np.array([[0.0, 30.0, 30.0, 0.0]] * 4, np.float32)
  np.testing.assert_array_equal(np.asarray(out[0, :, :, 0]), expected)


@pytest.mark.parametrize("conv, lowering", _IMPLS_2D, ids=_IMPL_IDS)
def test_arange_weights_by_hand(conv, lowering):
  # x[i, j] = 4i + j + 1 (a 4x4 arange), w = [[0, 1], [2, 3]]:
  # out[i, j] = 0*x[i, j] + 1*x[i, j+1] + 2*x[i+1, j] + 3*x[i+1, j+1]
  #           = (4i + j + 2) + 2(4i + j + 5) + 3(4i + j + 6) = 24i + 6j + 30.
  x = jnp.arange(1.0, 17.0, dtype=jnp.float32).reshape(1, 4, 4, 1)
  w = jnp.arange(4.0, dtype=jnp.float32).reshape(2, 2, 1, 1)
  out = _run(conv, lowering, x, w)
  strided = _run(conv, lowering, x, w, jnp.array([0.5], jnp.float32), strides=2)
  # padding 1 adds a zero ring: the top-left output sees only x[0, 0] through w[1, 1] = 3.
  padded = _run(conv, lowering, x, w, padding=1)
  np.testing.assert_array_equal(np.asarray(out[0, :, :, 0]), [[30, 36, 42], [54, 60, 66], [78, 84, 90]])
  np.testing.assert_array_equal(np.asarray(strided[0, :, :, 0]), [[30.5, 42.5], [78.5, 90.5]])
  assert padded.shape == (1, 5, 5, 1)
  assert float(padded[0, 0, 0, 0]) == 3.0 * 1.0
  # Bottom-right sees only x[3, 3] = 16 through w[0, 0] = 0.
  assert float(padded[0, 4, 4, 0]) == 0.0


@pytest.mark.parametrize("conv, lowering", _IMPLS_2D, ids=_IMPL_IDS)
def test_group_channel_order_by_hand(conv, lowering):
  # groups=2 over channels (a, b) with 2 outputs per group and 1x1 weights [1, 2 | 3, 4]: output channel
  # o = g * 2 + m reads group g only, so out = (1a, 2a, 3b, 4b) (the PyTorch / TensorFlow convention).
  x = jnp.array([5.0, 7.0], jnp.float32).reshape(1, 1, 1, 2)
  w = jnp.array([1.0, 2.0, 3.0, 4.0], jnp.float32).reshape(1, 1, 1, 4)
  depthwise_w = jnp.array([2.0, 3.0], jnp.float32).reshape(1, 1, 1, 2)
  np.testing.assert_array_equal(np.asarray(_run(conv, lowering, x, w, groups=2)).ravel(),
                                [5.0, 10.0, 21.0, 28.0])
  np.testing.assert_array_equal(np.asarray(_run(conv, lowering, x, depthwise_w, groups=2)).ravel(),
                                [10.0, 21.0])


@pytest.mark.parametrize("conv", [ops.conv1d, reference.conv1d], ids=["ops", "reference"])
def test_conv1d_by_hand(conv):
  # [1, 2, 3, 4, 5] with kernel [1, -1] (dilation 2): out[i] = x[i] - x[i + 2] = -2 everywhere.
  x = jnp.arange(1.0, 6.0, dtype=jnp.float32).reshape(1, 5, 1)
  w = jnp.array([1.0, -1.0], jnp.float32).reshape(2, 1, 1)
  np.testing.assert_array_equal(np.asarray(conv(x, w, dilation=2)).ravel(), [-2.0, -2.0, -2.0])


def test_quiz_network_shapes():
  # 130x130x3 -> Conv(3->10, 3x3) -> MaxPool(4) -> Conv(10->20, 5x5, pad 2) -> MaxPool(2) = 16x16x20:
  # 130 - 3 + 1 = 128; 128 / 4 = 32; 32 + 4 - 5 + 1 = 32; 32 / 2 = 16.
  def net(x, w1, w2):
    y = ops.max_pool2d(ops.conv2d(x, w1), 4)
    return ops.max_pool2d(ops.conv2d(y, w2, padding=2), 2)

  shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in [(1, 130, 130, 3), (3, 3, 3, 10), (5, 5, 10, 20)]]
  for lowering in LOWERINGS:
    with ops.conv_lowering(lowering):
      assert jax.eval_shape(net, *shapes).shape == (1, 16, 16, 20)
  # The same arithmetic from the shared output-size formula.
  size = _args.output_size(130, 3, 1, (0, 0))
  size = _args.output_size(size, 4, 4, (0, 0))
  size = _args.output_size(size, 5, 1, (2, 2))
  assert _args.output_size(size, 2, 2, (0, 0)) == 16


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_same_padding_output_sizes(lowering):
  # TensorFlow "same": out = ceil(in / stride) for any kernel, stride and dilation.
  for size, k, s, d in [(7, 3, 2, 1), (8, 4, 3, 1), (5, 2, 1, 2), (6, 5, 2, 2), (1, 3, 1, 1)]:
    x = jax.ShapeDtypeStruct((1, size, size + 1, 1), jnp.float32)
    w = jax.ShapeDtypeStruct((k, k, 1, 1), jnp.float32)
    with ops.conv_lowering(lowering):
      out = jax.eval_shape(lambda x, w: ops.conv2d(x, w, strides=s, padding="same", dilation=d), x, w)
    assert out.shape[1:3] == (-(-size // s), -(-(size + 1) // s))


# ---- dtypes and lowering internals ----------------------------------------------------------------------

def _primitives(fn, *args) -> set[str]:
  """The jaxpr primitives of fn(*args), sub-jaxprs included."""
  names = set()

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      names.add(eqn.primitive.name)
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return names


def _lowered(fn, *args) -> str:
  """The StableHLO text of jit(fn)(*args): what the primitives lower to, before XLA optimises it."""
  return jax.jit(fn).lower(*args).as_text()


def _stablehlo_ops(fn, *args) -> set[str]:
  return set(re.findall(r"stablehlo\.(\w+)", _lowered(fn, *args)))


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_lowerings_emit_the_intended_primitives(groups):
  x = jnp.ones((2, 6, 6, 4), jnp.float32)
  w = jnp.ones((3, 3, 4 // groups, 4), jnp.float32)

  def make_grad():
    # A fresh function per lowering: traces are cached per function, and the lowering is read at trace
    # time, so re-using one function object would re-use the first lowering's trace.
    def loss(x, w):
      return jnp.sum(ops.conv2d(x, w, strides=2, padding="same", groups=groups) ** 2)
    return jax.grad(loss, argnums=(0, 1))

  with ops.conv_lowering("xla"):
    assert "convolution" in _stablehlo_ops(make_grad(), x, w)
  for lowering in ("im2col", "rows"):
    with ops.conv_lowering(lowering):
      prims = _primitives(make_grad(), x, w)
      lowered = _stablehlo_ops(make_grad(), x, w)
    # Dense convolutions are one primitive whose transposes are the hand-written gradients; grouped ones
    # are plain lax code differentiated by autodiff.
    assert ("jaxcnn_conv" in prims) == (groups == 1)
    # Forward and backward are slices/pads/adds and matmuls: no convolution, and no gather or scatter
    # (which a naive patch extraction would differentiate into).
    assert "convolution" not in lowered
    assert not lowered & {"gather", "scatter"}
    assert ("dot_general" in lowered) == (groups != 4)  # depthwise sums elementwise products instead


@pytest.mark.parametrize("lowering", LOWERINGS)
def test_bfloat16_accumulates_in_float32(lowering):
  x = jnp.ones((1, 4, 4, 2), jnp.bfloat16)
  w = jnp.ones((3, 3, 2, 2), jnp.bfloat16)
  b = jnp.ones((2,), jnp.bfloat16)
  with ops.conv_lowering(lowering):
    out = ops.conv2d(x, w, b)
    lowered = _lowered(lambda x, w, b: ops.conv2d(x, w, b), x, w, b)
  assert out.dtype == jnp.bfloat16
  # The matmul (or XLA convolution) takes bfloat16 operands and produces float32 sums.
  products = [line for line in lowered.splitlines() if "dot_general" in line or "convolution" in line]
  assert products and all(re.search(r"\(tensor<[^>]*xbf16>, tensor<[^>]*xbf16>\) -> tensor<[^>]*xf32>", line)
                          for line in products), products
  np.testing.assert_array_equal(np.asarray(out, np.float32), np.full((1, 2, 2, 2), 19.0, np.float32))


def test_mixed_dtypes_promote():
  x = jnp.ones((1, 3, 3, 1), jnp.bfloat16)
  w = jnp.ones((2, 2, 1, 1), jnp.float32)
  assert ops.conv2d(x, w).dtype == jnp.float32
  assert reference.conv2d(x, w).dtype == jnp.float32


def test_works_under_jit_vmap_and_scan():
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((3, 2, 6, 6, 2)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 2, 3)), jnp.float32)
  with ops.conv_lowering("im2col"):
    batched = jax.jit(jax.vmap(lambda xi: ops.conv2d(xi, w, padding="same")))(x)
    scanned = jax.lax.scan(lambda c, xi: (c, ops.conv2d(xi, w, padding="same")), 0, x)[1]
  expected = jax.jit(jax.vmap(lambda xi: reference.conv2d(xi, w, padding="same")))(x)
  assert_close(batched, expected)
  assert_close(scanned, expected)


# ---- lowering selection -------------------------------------------------------------------------------

def test_lowering_selection_and_context_manager():
  before = ops.get_conv_lowering()
  try:
    ops.set_conv_lowering("XLA")
    assert ops.get_conv_lowering() == "xla"
    with ops.conv_lowering("im2col"):
      assert ops.get_conv_lowering() == "im2col"
      with pytest.raises(RuntimeError, match="boom"):
        with ops.conv_lowering("auto"):
          raise RuntimeError("boom")
      assert ops.get_conv_lowering() == "im2col"  # restored after an exception
    assert ops.get_conv_lowering() == "xla"
  finally:
    ops.set_conv_lowering(before)


@pytest.mark.parametrize("bad", ["fft", "", None, 3])
def test_unknown_lowering_raises(bad):
  before = ops.get_conv_lowering()
  with pytest.raises(ValueError, match="conv lowering must be one of"):
    ops.set_conv_lowering(bad)
  with pytest.raises(ValueError, match="conv lowering must be one of"):
    with ops.conv_lowering(bad):
      pass
  assert ops.get_conv_lowering() == before


def test_auto_lowering_is_a_matmul_lowering_on_cpu():
  # On CPU "auto" picks "rows" or "im2col" per shape, never XLA's convolution; elsewhere XLA's.
  x, w = jnp.ones((1, 4, 4, 1)), jnp.ones((2, 2, 1, 1))
  with ops.conv_lowering("auto"):
    prims = _primitives(lambda x, w: ops.conv2d(x, w), x, w)
  on_cpu = jax.default_backend() == "cpu"
  assert ("conv_general_dilated" in prims) == (not on_cpu)
  assert ("jaxcnn_conv" in prims) == on_cpu


@pytest.mark.parametrize("x_shape, w_shape, strides, groups, expected", [
    ((128, 32, 32, 32), (3, 3, 32, 32), 1, 1, "rows"),     # O = C: rows moves 3C + 3O < 9C values
    ((128, 13, 13, 32), (3, 3, 32, 64), 1, 1, "rows"),     # O = 2C: equal traffic, rows measured faster
    ((128, 16, 16, 32), (3, 3, 32, 128), 1, 1, "im2col"),  # O = 4C: im2col moves less
    ((128, 32, 32, 3), (3, 3, 3, 32), 1, 1, "im2col"),     # an RGB first layer
    ((128, 32, 32, 32), (3, 3, 32, 32), (2, 1), 1, "im2col"),  # row stride 2: rows would compute 2x
    ((128, 32, 32, 32), (3, 3, 32, 32), (1, 2), 1, "rows"),    # a column stride is free for rows
    ((128, 32, 32, 32), (3, 3, 16, 32), 1, 2, "im2col"),   # grouped
    ((128, 32, 32, 32), (1, 1, 32, 32), 1, 1, "im2col"),   # 1x1: nothing to save
    ((128, 32, 32), (3, 32, 32), 1, 1, "im2col"),          # conv1d
])
def test_auto_lowering_on_cpu_chooses_per_shape(x_shape, w_shape, strides, groups, expected):
  assert jax.default_backend() == "cpu"
  with ops.conv_lowering("auto"):
    assert ops.resolve_conv_lowering(x_shape, w_shape, strides=strides, groups=groups) == expected
  with ops.conv_lowering("xla"):  # an explicit setting is taken as it is
    assert ops.resolve_conv_lowering(x_shape, w_shape, strides=strides, groups=groups) == "xla"


def test_forward_only_lowering_takes_xlas_convolution_for_dense_convs_on_this_thread():
  import threading
  dense, conv1d, grouped = ((128, 13, 13, 32), (3, 3, 32, 64), 1), ((128, 32, 32), (3, 32, 32), 1), \
      ((128, 32, 32, 32), (3, 3, 1, 32), 32)
  with ops.conv_lowering("auto"):
    with ops.forward_only_lowering():
      assert [ops.resolve_conv_lowering(x, w, groups=g) for x, w, g in (dense, conv1d, grouped)] == \
          ["xla", "xla", "im2col"]                       # depthwise keeps auto's (matmul) choice
      other = []
      thread = threading.Thread(target=lambda: other.append(ops.resolve_conv_lowering(dense[0], dense[1])))
      thread.start()
      thread.join()
      assert other == ["rows"]                           # thread-local: other threads' traces unaffected
      with ops.conv_lowering("rows"):                    # an explicit setting is taken as it is
        assert ops.resolve_conv_lowering(dense[0], dense[1]) == "rows"
      x, w = jnp.ones((2, 9, 9, 4)), jnp.ones((3, 3, 4, 8))
      assert "conv_general_dilated" in _primitives(lambda x, w: ops.conv2d(x, w), x, w)
    assert ops.resolve_conv_lowering(dense[0], dense[1]) == "rows"   # restored on exit


def test_resolve_conv_lowering_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="do not describe a 1-D or 2-D convolution"):
    ops.resolve_conv_lowering((1, 8, 8, 3), (3, 3, 3))
  with pytest.raises(ValueError, match="do not describe"):
    ops.resolve_conv_lowering((1, 8, 8, 3), (3, 3, 3, 4), strides=(1, 1, 1))


def test_auto_takes_the_rows_path_and_matches_the_reference():
  # Channels large enough for "auto" to pick "rows" on CPU (the grid's small shapes all pick im2col):
  # the default path itself, forward and gradients, against the twin.
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.standard_normal((2, 9, 7, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 8, 8)) / np.sqrt(72), jnp.float32)
  b = jnp.asarray(rng.standard_normal((8,)), jnp.float32)
  assert ops.resolve_conv_lowering(x.shape, w.shape) == "rows"
  for padding, strides in [("same", 1), ("valid", (1, 2)), (((2, 0), (1, 3)), 1)]:
    jaxcnn.verify("conv2d", x, w, b, padding=padding, strides=strides, lowering="auto").raise_if_failed()


def _lowering_in_subprocess(value: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAXCNN_CONV_LOWERING=value, JAX_PLATFORMS="cpu")
  code = "import jaxcnn.ops as o; print(o.get_conv_lowering())"
  return subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=120)


def test_environment_variable_selects_lowering():
  done = _lowering_in_subprocess("xla")
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "xla"
  bad = _lowering_in_subprocess("winograd")
  assert bad.returncode != 0
  assert "JAXCNN_CONV_LOWERING must be one of" in bad.stderr


# ---- bad input ----------------------------------------------------------------------------------------

def _x(shape=(1, 5, 5, 4), dtype=jnp.float32):
  return jnp.ones(shape, dtype)


_BAD_2D = [
    # (x, w, b, kwargs, message regex)
    (_x((5, 5, 4)), _x((3, 3, 4, 2)), None, {}, r"x must have rank 4 \(N, H, W, C\)"),
    (_x(), _x((3, 4, 2)), None, {}, r"w must have rank 4 \(kh, kw, C_in/groups, C_out\)"),
    (_x(), _x((3, 3, 3, 2)), None, {}, r"channel mismatch: x has 4 channels"),
    (_x(), _x((3, 3, 4, 2)), None, dict(groups=2), r"channel mismatch"),
    (_x((1, 5, 5, 3)), _x((3, 3, 1, 3)), None, dict(groups=2), r"groups=2 must divide the input channels of x"),
    (_x(), _x((3, 3, 2, 3)), None, dict(groups=2), r"groups=2 must divide the output channels of w"),
    (_x(), _x((3, 3, 4, 2)), None, dict(groups=0), r"groups must be a positive int"),
    (_x(), _x((3, 3, 4, 2)), None, dict(groups=True), r"groups must be a positive int"),
    (_x(), _x((6, 3, 4, 2)), None, {}, r"kernel of w \(6, 3\).*larger than the padded input \(5 \+ 0 \+ 0"),
    (_x(), _x((3, 3, 4, 2)), None, dict(dilation=3), r"kernel of w \(3, 3\) \(effective 7"),
    (_x(), _x((3, 3, 4, 2)), None, dict(padding=-1), r"padding must be non-negative"),
    (_x(), _x((3, 3, 4, 2)), None, dict(padding=((1, -1), (0, 0))), r"padding must be non-negative"),
    (_x(), _x((3, 3, 4, 2)), None, dict(padding="full"), r"padding must be 'valid', 'same'"),
    (_x(), _x((3, 3, 4, 2)), None, dict(padding=(1, 2, 3)), r"padding must give 2 spatial dims"),
    (_x(), _x((3, 3, 4, 2)), _x((3,)), {}, r"b must have shape \(2,\)"),
    (_x(), _x((3, 3, 4, 2)), _x((1, 2)), {}, r"b must have shape \(2,\)"),
    (_x(dtype=jnp.int32), _x((3, 3, 4, 2)), None, {}, r"x must be a floating-point array, got dtype int32"),
    (_x(), _x((3, 3, 4, 2), jnp.int32), None, {}, r"w must be a floating-point array"),
    (_x(), _x((3, 3, 4, 2)), _x((2,), jnp.int32), {}, r"b must be a floating-point array"),
    (_x(), _x((3, 3, 4, 2)), None, dict(strides=0), r"strides must be >= 1"),
    (_x(), _x((3, 3, 4, 2)), None, dict(strides=(1, 2, 3)), r"strides must be an int or a sequence of 2"),
    (_x(), _x((3, 3, 4, 2)), None, dict(dilation=(1, 0)), r"dilation must be >= 1"),
]


@pytest.mark.parametrize("name", ["ops", "reference"])
@pytest.mark.parametrize("x, w, b, kwargs, message", _BAD_2D, ids=[m for *_, m in _BAD_2D])
def test_conv2d_bad_input(name, x, w, b, kwargs, message):
  conv = ops.conv2d if name == "ops" else reference.conv2d
  with pytest.raises(ValueError, match=message):
    conv(x, w, b, **kwargs)


def test_conv2d_bad_input_raises_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="channel mismatch"):
    jax.jit(ops.conv2d)(_x(), _x((3, 3, 3, 2)))


_BAD_1D = [
    (_x((1, 5, 5, 4)), _x((3, 4, 2)), {}, r"x must have rank 3 \(N, L, C\)"),
    (_x((1, 5, 4)), _x((3, 3, 4, 2)), {}, r"w must have rank 3 \(k, C_in/groups, C_out\)"),
    (_x((1, 5, 4)), _x((3, 2, 2)), {}, r"channel mismatch"),
    (_x((1, 5, 4)), _x((7, 4, 2)), {}, r"kernel of w \(7,\)"),
    (_x((1, 5, 4)), _x((3, 4, 2)), dict(padding=((1, 1), (1, 1))), r"padding must give 1 spatial dims"),
]


@pytest.mark.parametrize("name", ["ops", "reference"])
@pytest.mark.parametrize("x, w, kwargs, message", _BAD_1D, ids=[m for *_, m in _BAD_1D])
def test_conv1d_bad_input(name, x, w, kwargs, message):
  conv = _CONVS["conv1d"][0 if name == "ops" else 1]
  with pytest.raises(ValueError, match=message):
    conv(x, w, **kwargs)


# ---- forward mode and higher derivatives, every lowering ------------------------------------------------

_FORWARD_CASES = [dict(padding="same"), dict(padding="valid"), dict(strides=2, padding="same"),
                  dict(padding=((2, 1), (0, 1)), strides=(1, 2))]


@pytest.mark.parametrize("lowering", LOWERINGS)
@pytest.mark.parametrize("kwargs", _FORWARD_CASES, ids=_case_id)
def test_forward_mode_and_hvp_match_reference(kwargs, lowering):
  # jvp, linearize, jacfwd and a forward-over-reverse Hessian-vector product through the convolution,
  # against the same transforms of the reference twin, in one program per side.
  rng = np.random.default_rng(13)
  x = jnp.asarray(rng.standard_normal((2, 6, 5, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 3, 4)) * 0.3, jnp.float32)
  tx, tw = (jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in (x, w))

  def transforms(conv):
    def f(x, w):
      return conv(x, w, **kwargs)

    def loss(x, w):
      return jnp.sum(jnp.tanh(f(x, w)))

    def program(x, w):
      jvp = jax.jvp(f, (x, w), (tx, tw))
      lin = jax.linearize(f, x, w)[1](tx, tw)
      jac = jax.jacfwd(f, argnums=(0, 1))(x[:1], w)
      hvp = jax.jvp(jax.grad(loss, argnums=(0, 1)), (x, w), (tx, tw))[1]
      return jvp, lin, jac, hvp
    return program

  with ops.conv_lowering(lowering):
    fast = _compiled(transforms(ops.conv2d), x, w)
  expected = _compiled(transforms(reference.conv2d), x, w)
  for a, e in zip(jax.tree.leaves(fast), jax.tree.leaves(expected)):
    assert_close(a, e, rtol=1e-4, atol=1e-4 * max(1.0, float(np.max(np.abs(e)))))


# Compiling is nearly all these checks' cost; how hard XLA optimises machine code does not change them.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compiled(fn, *args):
  return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)
