"""Dropout, upsample2d and zero_pad2d: fast vs reference, statistics, hand-computed cases, bad input."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcnn
from jaxcnn import ops, reference
from helpers import assert_close, import_torch

MODULES = pytest.mark.parametrize("module", [ops, reference], ids=["ops", "reference"])


def _normal(shape, seed=0, dtype=jnp.float32):
  return jax.random.normal(jax.random.PRNGKey(seed), shape).astype(dtype)


# --- dropout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rate", [0.3, 0.9])
def test_dropout_matches_reference(rate):
  jaxcnn.verify("dropout", _normal((3, 4, 5, 2)), rate, rng=jax.random.PRNGKey(7)).raise_if_failed()


def test_dropout_bfloat16_matches_reference():
  result = jaxcnn.verify("dropout", _normal((2, 3, 4, 2), dtype=jnp.bfloat16), 0.5, rng=jax.random.PRNGKey(1))
  assert result.dtype == "bfloat16"
  result.raise_if_failed()


@MODULES
def test_dropout_identity_when_deterministic_or_rate_zero(module):
  x = _normal((2, 3, 3, 2))
  np.testing.assert_array_equal(module.dropout(x, 0.5, rng=jax.random.PRNGKey(0), deterministic=True), x)
  np.testing.assert_array_equal(module.dropout(x, 0.5, deterministic=True), x)  # no rng needed
  np.testing.assert_array_equal(module.dropout(x, 0.0), x)


@MODULES
@pytest.mark.parametrize("rate", [0.25, 0.6])
def test_dropout_mask_statistics(module, rate):
  n = 40_000
  y = np.asarray(module.dropout(jnp.ones((n,)), rate, rng=jax.random.PRNGKey(3)))
  kept = y != 0
  # Kept fraction ~ Binomial(n, 1 - rate) / n: standard deviation sqrt(rate (1 - rate) / n) < 2.5e-3,
  # so 0.015 is six standard deviations.
  assert abs(kept.mean() - (1 - rate)) < 0.015
  np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)  # inverted: kept values scaled up
  assert abs(y.mean() - 1.0) < 0.015 / (1 - rate)  # the expectation is preserved


@MODULES
def test_dropout_same_rng_same_mask(module):
  x = _normal((4, 5, 6, 3))
  a = module.dropout(x, 0.5, rng=jax.random.PRNGKey(11))
  b = module.dropout(x, 0.5, rng=jax.random.PRNGKey(11))
  c = module.dropout(x, 0.5, rng=jax.random.PRNGKey(12))
  np.testing.assert_array_equal(a, b)
  assert np.any((np.asarray(a) == 0) != (np.asarray(c) == 0))
  # The documented mask derivation.
  mask = jax.random.bernoulli(jax.random.PRNGKey(11), 0.5, x.shape)
  assert_close(a, np.where(mask, np.asarray(x) * 2.0, 0.0))


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.85])
def test_reference_dropout_derives_the_mask_itself(monkeypatch, rate):
  # The twin reads the key's random bits and builds the mask with its own arithmetic: with
  # jax.random.bernoulli (the fast op's mask) unavailable it still drops exactly the same cells.
  x = _normal((3, 7, 5, 4))
  key = jax.random.PRNGKey(21)
  fast = np.asarray(ops.dropout(x, rate, rng=key))

  def unavailable(*args, **kwargs):
    raise AssertionError("the reference must not call jax.random.bernoulli")

  monkeypatch.setattr(jax.random, "bernoulli", unavailable)
  ref = np.asarray(reference.dropout(x, rate, rng=key))
  np.testing.assert_array_equal(ref == 0, fast == 0)
  assert_close(ref, fast)


def test_reference_dropout_mask_matches_under_x64():
  # With jax_enable_x64 the probability 1 - rate is float64: 64-bit words, 52 mantissa bits.
  with jax.enable_x64(True):
    x = jnp.ones((2000,), jnp.float64)
    fast = np.asarray(ops.dropout(x, 0.3, rng=jax.random.PRNGKey(4)))
    ref = np.asarray(reference.dropout(x, 0.3, rng=jax.random.PRNGKey(4)))
  np.testing.assert_array_equal(ref == 0, fast == 0)


@MODULES
def test_dropout_accepts_typed_keys_and_runs_under_jit(module):
  x = _normal((3, 4))
  y = jax.jit(lambda x, key: module.dropout(x, 0.5, rng=key))(x, jax.random.key(2))
  assert y.shape == x.shape and y.dtype == x.dtype


@MODULES
def test_dropout_rejects_bad_input(module):
  x = _normal((2, 3))
  key = jax.random.PRNGKey(0)
  for rate in (1.0, -0.1, 1.5, "0.5", True, None):
    with pytest.raises(ValueError, match=r"rate must be a number in \[0, 1\)"):
      module.dropout(x, rate, rng=key)
  with pytest.raises(ValueError, match=r"rng is required"):
    module.dropout(x, 0.5)
  with pytest.raises(ValueError, match=r"x must be a floating-point"):
    module.dropout(jnp.ones((2, 3), jnp.int32), 0.5, rng=key)


# --- upsample2d ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 3, (2, 3)], ids=str)
@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_upsample2d_matches_reference(method, size):
  jaxcnn.verify("upsample2d", _normal((2, 3, 4, 2)), size, method=method).raise_if_failed()


@pytest.mark.parametrize("method", ["nearest", "bilinear"])
def test_upsample2d_bfloat16_matches_reference(method):
  jaxcnn.verify("upsample2d", _normal((1, 3, 2, 2), dtype=jnp.bfloat16), (3, 2), method=method).raise_if_failed()


@MODULES
def test_upsample2d_hand_computed(module):
  x = jnp.arange(4, dtype=jnp.float32).reshape(1, 2, 2, 1)
  nearest = module.upsample2d(x, 2)[0, :, :, 0]
  assert_close(nearest, [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
  # Half-pixel centres, scale 2: output o samples source (o + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25,
  # clamped to [0, 1]: weights of the second pixel 0, 0.25, 0.75, 1.
  row = jnp.asarray([0.0, 4.0]).reshape(1, 1, 2, 1)
  assert_close(module.upsample2d(row, (1, 2), method="bilinear")[0, 0, :, 0], [0, 1, 3, 4])
  # Scale 3: sources -1/3, 0, 1/3, 2/3, 1, 4/3.
  assert_close(module.upsample2d(row, (1, 3), method="bilinear")[0, 0, :, 0], [0, 0, 4 / 3, 8 / 3, 4, 4])
  bilinear = module.upsample2d(x, 2, method="bilinear")[0, :, :, 0]
  assert_close(bilinear, [[0, 0.25, 0.75, 1], [0.5, 0.75, 1.25, 1.5], [1.5, 1.75, 2.25, 2.5],
                          [2, 2.25, 2.75, 3]])


@MODULES
def test_upsample2d_rejects_bad_input(module):
  x = _normal((1, 2, 2, 1))
  with pytest.raises(ValueError, match=r"x must have rank 4"):
    module.upsample2d(jnp.ones((2, 2, 1)))
  with pytest.raises(ValueError, match=r"method must be one of"):
    module.upsample2d(x, 2, method="bicubic")
  for size in (0, (2, 0), (2,), 1.5, "2"):
    with pytest.raises(ValueError, match=r"size"):
      module.upsample2d(x, size)


def _torch_interpolate(torch, x, size, mode):
  """torch.nn.functional.interpolate on NHWC x (converted to NCHW and back)."""
  nchw = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2))  # np.array: a writable copy for torch
  scale = size if isinstance(size, int) else tuple(float(s) for s in size)
  kwargs = dict(align_corners=False) if mode == "bilinear" else {}
  return torch.nn.functional.interpolate(nchw, scale_factor=scale, mode=mode, **kwargs).numpy().transpose(0, 2, 3, 1)


@pytest.mark.oracle
@pytest.mark.parametrize("size", [2, 3, (2, 3)], ids=str)
def test_upsample2d_equals_torch_interpolate(size):
  torch = import_torch()
  x = _normal((2, 3, 5, 2))
  assert_close(ops.upsample2d(x, size, method="bilinear"), _torch_interpolate(torch, x, size, "bilinear"))
  assert_close(ops.upsample2d(x, size, method="nearest"), _torch_interpolate(torch, x, size, "nearest"))


# --- zero_pad2d ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", [(1, 2), ((0, 1), (2, 0))], ids=str)
def test_zero_pad2d_matches_reference(padding):
  jaxcnn.verify("zero_pad2d", _normal((2, 3, 2, 2)), padding).raise_if_failed()


@MODULES
def test_zero_pad2d_hand_computed(module):
  x = jnp.arange(1, 5, dtype=jnp.float32).reshape(1, 2, 2, 1)
  y = module.zero_pad2d(x, ((1, 0), (0, 2)))[0, :, :, 0]
  assert_close(y, [[0, 0, 0, 0], [1, 2, 0, 0], [3, 4, 0, 0]])
  assert module.zero_pad2d(x, 1).shape == (1, 4, 4, 1)
  assert module.zero_pad2d(x, (2, 1)).shape == (1, 6, 4, 1)
  assert module.zero_pad2d(jnp.ones((1, 2, 2, 1), jnp.int32), 1).dtype == jnp.int32


@MODULES
def test_zero_pad2d_rejects_bad_input(module):
  x = jnp.ones((1, 2, 2, 1))
  with pytest.raises(ValueError, match=r"x must have rank 4"):
    module.zero_pad2d(jnp.ones((2, 2, 1)), 1)
  with pytest.raises(ValueError, match=r"padding must be an int"):
    module.zero_pad2d(x, "same")
  for padding in (-1, (1, -1), ((0, 1), (-2, 0))):
    with pytest.raises(ValueError, match=r"padding must be non-negative"):
      module.zero_pad2d(x, padding)
  with pytest.raises(ValueError, match=r"padding must give 2 spatial dims"):
    module.zero_pad2d(x, (1, 1, 1))
  with pytest.raises(ValueError, match=r"padding entries must be ints"):
    module.zero_pad2d(x, ((0, 1.5), (0, 0)))
