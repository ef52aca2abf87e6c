"""Augmentation and normalisation (jaxcnn.data.augment): identity, exact geometry, statistics, bad input."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.data import augment as aug
from jaxcnn.data import AugmentConfig, augment_batch, compute_stats, from_arrays


# Jitted once per config: eager dispatch of the resampling ops would dominate the test time.
_draw = jax.jit(aug.draw_params, static_argnums=(1, 2, 3, 4))
_apply = jax.jit(aug.apply_transforms, static_argnums=2)
_augment = jax.jit(augment_batch, static_argnums=2)
_resample = jax.jit(aug._resample, static_argnames=("order", "mode", "cval"))


def _batch(shape=(4, 9, 7, 3), seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(0, 255, shape).astype(np.float32))


def test_defaults_and_none_are_identity():
  x = _batch()
  np.testing.assert_array_equal(augment_batch(jax.random.key(0), x, AugmentConfig()), x)
  np.testing.assert_array_equal(augment_batch(jax.random.key(0), x, None), x)


@pytest.mark.parametrize("flags", [dict(horizontal_flip=True), dict(vertical_flip=True),
                                   dict(horizontal_flip=True, vertical_flip=True)])
def test_flip_applied_twice_is_identity(flags):
  config = AugmentConfig(**flags)
  x = _batch((16, 5, 6, 2))
  params = _draw(jax.random.key(3), 16, 5, 6, config)
  once = _apply(x, params, config)
  assert not np.array_equal(once, x)  # with 16 fair coins some images are flipped
  np.testing.assert_array_equal(_apply(once, params, config), x)


def test_horizontal_flip_mirrors_columns():
  config = AugmentConfig(horizontal_flip=True)
  x = _batch((8, 4, 5, 1))
  params = _draw(jax.random.key(1), 8, 4, 5, config)
  out = np.asarray(_apply(x, params, config))
  for i, flip in enumerate(np.asarray(params["flip_h"])):
    np.testing.assert_array_equal(out[i], np.asarray(x)[i, :, ::-1] if flip else np.asarray(x)[i])


@pytest.mark.parametrize("fill_mode", ["constant", "nearest"])
def test_shift_moves_content_by_the_drawn_offset(fill_mode):
  config = AugmentConfig(width_shift_range=0.3, height_shift_range=0.3, fill_mode=fill_mode, cval=-1.0)
  x = _batch((12, 9, 10, 2), seed=2)
  params = _draw(jax.random.key(7), 12, 9, 10, config)
  out = np.asarray(_augment(jax.random.key(7), x, config))
  shifts = np.asarray(params["shift"]).astype(int)
  assert np.abs(shifts[:, 0]).max() <= 3 and np.abs(shifts[:, 1]).max() <= 3
  assert len({tuple(s) for s in shifts}) > 1  # offsets really are drawn per image
  src = np.asarray(x)
  for i, (dy, dx) in enumerate(shifts):
    rows = np.arange(9) - dy
    cols = np.arange(10) - dx
    if fill_mode == "nearest":
      expected = src[i][np.clip(rows, 0, 8)][:, np.clip(cols, 0, 9)]
    else:
      expected = np.full_like(src[i], -1.0)
      ok_r, ok_c = (rows >= 0) & (rows < 9), (cols >= 0) & (cols < 10)
      expected[np.ix_(ok_r, ok_c)] = src[i][np.ix_(rows[ok_r], cols[ok_c])]
    np.testing.assert_array_equal(out[i], expected)


def test_rotation_by_quarter_turn_is_counter_clockwise_rot90():
  x = _batch((1, 7, 7, 2))[0]
  out = _resample(x, jnp.float32(np.pi / 2), jnp.zeros(2), jnp.ones(2), order=1, mode="constant", cval=0.0)
  np.testing.assert_allclose(out, np.rot90(np.asarray(x), k=1, axes=(0, 1)), atol=1e-3)


def test_zoom_samples_a_wider_area_about_the_centre():
  x = _batch((1, 9, 9, 1))[0]
  out = np.asarray(_resample(x, jnp.float32(0), jnp.zeros(2), jnp.array([2.0, 2.0]), order=1,
                                 mode="constant", cval=0.0))
  src = np.asarray(x)
  for r in range(9):
    for c in range(9):
      rr, cc = 4 + 2 * (r - 4), 4 + 2 * (c - 4)
      expected = src[rr, cc] if 0 <= rr < 9 and 0 <= cc < 9 else 0.0
      np.testing.assert_allclose(out[r, c], expected, rtol=1e-5, atol=1e-3)


def test_geometric_augmentation_is_jittable_and_deterministic():
  config = AugmentConfig(rotation_range=20, zoom_range=0.2, width_shift_range=0.1, horizontal_flip=True)
  x = _batch()
  jitted = _augment
  a = jitted(jax.random.key(5), x, config)
  np.testing.assert_array_equal(a, jitted(jax.random.key(5), x, config))
  assert not np.allclose(a, jitted(jax.random.key(6), x, config))
  assert a.shape == x.shape and a.dtype == jnp.float32 and np.all(np.isfinite(a))


def test_samplewise_standardisation():
  config = AugmentConfig(samplewise_center=True, samplewise_std_normalization=True)
  out = np.asarray(_augment(jax.random.key(0), _batch(), config), np.float64)
  np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), 0, atol=1e-5)
  np.testing.assert_allclose(out.std(axis=(1, 2, 3)), 1, atol=1e-4)


def test_featurewise_uses_given_stats_and_requires_them():
  config = AugmentConfig(featurewise_center=True, featurewise_std_normalization=True)
  x = _batch((2, 3, 3, 2))
  stats = {"mean": np.array([10.0, 20.0], np.float32), "std": np.array([2.0, 4.0], np.float32)}
  out = augment_batch(jax.random.key(0), x, config, stats)
  np.testing.assert_allclose(out, (np.asarray(x) - stats["mean"]) / (stats["std"] + 1e-6), rtol=1e-6)
  with pytest.raises(ValueError, match="stats"):
    augment_batch(jax.random.key(0), x, config, None)


def test_featurewise_normalised_training_data_has_zero_mean_unit_std_per_channel():
  rng = np.random.default_rng(0)
  images = np.stack([rng.integers(0, 60, (50, 6, 6)), rng.integers(100, 256, (50, 6, 6)),
                     rng.integers(0, 256, (50, 6, 6))], axis=-1).astype(np.uint8)
  pipe = from_arrays(images, np.zeros(50, int), batch_size=16, seed=0, shuffle=False, normalize="featurewise")
  batches = list(pipe.batches(0))
  image = np.concatenate([np.asarray(b["image"]) for b in batches])
  mask = np.concatenate([np.asarray(b["mask"]) for b in batches]).astype(bool)
  real = image[mask].astype(np.float64)
  assert real.shape[0] == 50
  np.testing.assert_allclose(real.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(real.std(axis=(0, 1, 2)), 1, atol=1e-4)


def test_compute_stats_matches_numpy():
  images = np.random.default_rng(1).integers(0, 256, (30, 4, 5, 3)).astype(np.uint8)
  stats = compute_stats(images, chunk=7)
  np.testing.assert_allclose(stats["mean"], images.mean(axis=(0, 1, 2)), rtol=1e-6)
  np.testing.assert_allclose(stats["std"], images.std(axis=(0, 1, 2)), rtol=1e-5)
  with pytest.raises(ValueError, match=r"compute_stats: images must be a non-empty \(N, H, W, C\)"):
    compute_stats(np.zeros((0, 2, 2, 1)))


@pytest.mark.parametrize("field,value,message", [
    ("width_shift_range", -0.1, "width_shift_range: expected a number >= 0"),
    ("height_shift_range", 1.5, "height_shift_range: expected a fraction"),
    ("rotation_range", "10", "rotation_range: expected a number"),
    ("zoom_range", 1.2, "zoom_range"),
    ("zoom_range", (1.2, 0.8), "zoom_range"),
    ("fill_mode", "reflect", "fill_mode: expected one of"),
])
def test_bad_config_is_rejected_naming_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    AugmentConfig(**{field: value})


def test_augment_batch_rejects_wrong_rank():
  with pytest.raises(ValueError, match=r"augment_batch: images must be \(B, H, W, C\)"):
    augment_batch(jax.random.key(0), jnp.zeros((3, 4, 4)), AugmentConfig())


def test_config_is_hashable_and_replaceable():
  config = AugmentConfig(horizontal_flip=True)
  assert hash(config) == hash(dataclasses.replace(config))
  assert config.is_geometric is False and AugmentConfig(zoom_range=0.1).is_geometric
