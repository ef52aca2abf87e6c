"""On-device augmentation and normalisation, after Keras' ImageDataGenerator.

Everything here is a pure function of (rng, batch) and jittable. A batch is float32 NHWC (B, H, W, C).
The order follows ImageDataGenerator: random geometric transforms first (rotation, shift, zoom, flips),
then standardisation (samplewise, then featurewise with statistics of the training split).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

# ImageDataGenerator divides by (std + 1e-6); keeping its epsilon keeps results comparable.
_EPSILON = 1e-6
_FILL_MODES = ("nearest", "constant")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Which augmentations to apply; the defaults disable all of them (identity).

  Attributes:
    featurewise_center: subtract the per-channel mean of the training split (needs `stats`). Default False.
    featurewise_std_normalization: divide by the per-channel std of the training split. Default False.
    samplewise_center: subtract each image's own mean (over H, W, C). Default False.
    samplewise_std_normalization: divide each image by its own std (over H, W, C). Default False.
    width_shift_range: horizontal shift, a fraction of the width; the shift is a whole number of pixels
      drawn uniformly from [-round(r*W), round(r*W)]. Default 0.0.
    height_shift_range: vertical shift, a fraction of the height, likewise. Default 0.0.
    horizontal_flip: flip left-right with probability 1/2. Default False.
    vertical_flip: flip up-down with probability 1/2. Default False.
    rotation_range: rotation in degrees drawn uniformly from [-r, r] (positive: counter-clockwise).
      Default 0.0.
    zoom_range: zoom factors for each axis drawn uniformly from [1-z, 1+z]; as in ImageDataGenerator a
      factor > 1 samples a wider area (content shrinks), < 1 magnifies; a pair (lo, hi) gives the range
      directly. Default 0.0.
    fill_mode: "nearest" (repeat the edge pixel) or "constant" (fill with `cval`). Default "nearest".
    cval: fill value for fill_mode="constant", in the units of the images passed in. Default 0.0.
  """

  featurewise_center: bool = False
  featurewise_std_normalization: bool = False
  samplewise_center: bool = False
  samplewise_std_normalization: bool = False
  width_shift_range: float = 0.0
  height_shift_range: float = 0.0
  horizontal_flip: bool = False
  vertical_flip: bool = False
  rotation_range: float = 0.0
  zoom_range: float | tuple[float, float] = 0.0
  fill_mode: str = "nearest"
  cval: float = 0.0

  def __post_init__(self):
    for name in ("width_shift_range", "height_shift_range", "rotation_range"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"AugmentConfig.{name}: expected a number >= 0, got {value!r}")
    for name in ("width_shift_range", "height_shift_range"):
      if getattr(self, name) >= 1:
        raise ValueError(f"AugmentConfig.{name}: expected a fraction of the image size in [0, 1), "
                         f"got {getattr(self, name)!r}")
    _zoom_bounds(self.zoom_range)
    if self.fill_mode not in _FILL_MODES:
      raise ValueError(f"AugmentConfig.fill_mode: expected one of {_FILL_MODES}, got {self.fill_mode!r}")

  @property
  def needs_stats(self) -> bool:
    """True when featurewise statistics of the training split are required."""
    return self.featurewise_center or self.featurewise_std_normalization

  @property
  def is_geometric(self) -> bool:
    """True when a resampling transform (rotation, shift or zoom) is enabled."""
    return bool(self.rotation_range or self.width_shift_range or self.height_shift_range
                or _zoom_bounds(self.zoom_range) != (1.0, 1.0))


def _zoom_bounds(zoom_range) -> tuple[float, float]:
  """(lo, hi) zoom factors from a float z (-> (1-z, 1+z)) or a pair; ValueError when invalid."""
  if isinstance(zoom_range, (int, float)) and not isinstance(zoom_range, bool):
    if not 0 <= zoom_range < 1:
      raise ValueError(f"AugmentConfig.zoom_range: expected a float in [0, 1) or a pair (lo, hi), "
                       f"got {zoom_range!r}")
    return (1.0 - float(zoom_range), 1.0 + float(zoom_range))
  if (isinstance(zoom_range, (tuple, list)) and len(zoom_range) == 2
      and all(isinstance(z, (int, float)) and not isinstance(z, bool) for z in zoom_range)
      and 0 < zoom_range[0] <= zoom_range[1]):
    return (float(zoom_range[0]), float(zoom_range[1]))
  raise ValueError(f"AugmentConfig.zoom_range: expected a float in [0, 1) or a pair 0 < lo <= hi, "
                   f"got {zoom_range!r}")


def compute_stats(images, *, chunk: int = 4096) -> dict[str, np.ndarray]:
  """Per-channel mean and std of `images` (N, H, W, C), computed on the host in float64.

  Args:
    images: uint8 or float array (N, H, W, C), already in the units the statistics are applied to.
    chunk: images per partial sum (bounds the float64 temporary). Default 4096.

  Returns:
    {"mean": float32 (C,), "std": float32 (C,)}.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[0] == 0:
    raise ValueError(f"compute_stats: images must be a non-empty (N, H, W, C) array, got shape {images.shape}")
  total = np.zeros(images.shape[-1], np.float64)
  total_sq = np.zeros(images.shape[-1], np.float64)
  for start in range(0, images.shape[0], chunk):
    part = images[start:start + chunk].astype(np.float64)
    total += part.sum(axis=(0, 1, 2))
    total_sq += np.square(part).sum(axis=(0, 1, 2))
  count = images.shape[0] * images.shape[1] * images.shape[2]
  mean = total / count
  var = np.maximum(total_sq / count - np.square(mean), 0.0)
  return {"mean": mean.astype(np.float32), "std": np.sqrt(var).astype(np.float32)}


def draw_params(rng, batch_size: int, height: int, width: int, config: AugmentConfig) -> dict:
  """Draws the random transform parameters for a batch (what `augment_batch` applies).

  Args:
    rng: a jax PRNG key.
    batch_size, height, width: batch and image size (static ints).
    config: the AugmentConfig.

  Returns:
    {"flip_h": bool (B,), "flip_v": bool (B,), "angle": float32 (B,) radians, "shift": float32 (B, 2)
     whole-pixel (dy, dx) content offsets, "zoom": float32 (B, 2) (zy, zx) factors}.
  """
  k_h, k_v, k_angle, k_dy, k_dx, k_zoom = jax.random.split(rng, 6)
  max_dy = round(config.height_shift_range * height)
  max_dx = round(config.width_shift_range * width)
  lo, hi = _zoom_bounds(config.zoom_range)
  radians = math.radians(config.rotation_range)
  return {
      "flip_h": jax.random.bernoulli(k_h, 0.5, (batch_size,)) & config.horizontal_flip,
      "flip_v": jax.random.bernoulli(k_v, 0.5, (batch_size,)) & config.vertical_flip,
      "angle": jax.random.uniform(k_angle, (batch_size,), jnp.float32, -radians, radians),
      "shift": jnp.stack([jax.random.randint(k_dy, (batch_size,), -max_dy, max_dy + 1),
                          jax.random.randint(k_dx, (batch_size,), -max_dx, max_dx + 1)],
                         axis=-1).astype(jnp.float32),
      "zoom": jax.random.uniform(k_zoom, (batch_size, 2), jnp.float32, lo, hi),
  }


def _resample(image, angle, shift, zoom, *, order: int, mode: str, cval: float):
  """One image (H, W, C) under rotation/zoom about the centre, then a shift of the content."""
  height, width = image.shape[0], image.shape[1]
  centre = jnp.array([(height - 1) / 2.0, (width - 1) / 2.0], jnp.float32)
  rows, cols = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32), jnp.arange(width, dtype=jnp.float32),
                            indexing="ij")
  # Output pixel q samples input p = c + Z R (q - c - t), as ImageDataGenerator's affine map does: a
  # positive angle turns the content counter-clockwise, a zoom factor > 1 samples a wider area (the
  # content shrinks), and the shift t moves the content by +t pixels.
  q = jnp.stack([rows, cols]) - (centre + shift)[:, None, None]
  cos, sin = jnp.cos(angle), jnp.sin(angle)
  p_rows = cos * q[0] + sin * q[1]
  p_cols = -sin * q[0] + cos * q[1]
  coords = [p_rows * zoom[0] + centre[0], p_cols * zoom[1] + centre[1]]

  def channel(plane):
    return jax.scipy.ndimage.map_coordinates(plane, coords, order=order, mode=mode, cval=cval)

  return jax.vmap(channel, in_axes=-1, out_axes=-1)(image)


def apply_transforms(images, params: dict, config: AugmentConfig):
  """Applies drawn geometric transforms and flips (see `draw_params`) to a float batch (B, H, W, C)."""
  if config.is_geometric:
    # Whole-pixel shifts alone need no interpolation; order 0 keeps them exact.
    order = 1 if (config.rotation_range or _zoom_bounds(config.zoom_range) != (1.0, 1.0)) else 0
    resample = jax.vmap(lambda im, a, s, z: _resample(im, a, s, z, order=order, mode=config.fill_mode,
                                                      cval=config.cval))
    images = resample(images, params["angle"], params["shift"], params["zoom"])
  if config.horizontal_flip:
    images = jnp.where(params["flip_h"][:, None, None, None], images[:, :, ::-1, :], images)
  if config.vertical_flip:
    images = jnp.where(params["flip_v"][:, None, None, None], images[:, ::-1, :, :], images)
  return images


def standardize(images, config: AugmentConfig, stats: Mapping | None = None):
  """Samplewise then featurewise standardisation of a float batch (B, H, W, C), as configured.

  Args:
    images: float32 (B, H, W, C).
    config: the AugmentConfig (its four *_center / *_normalization flags).
    stats: {"mean": (C,), "std": (C,)} of the training split; required for the featurewise flags.
  """
  if config.samplewise_center:
    images = images - jnp.mean(images, axis=(1, 2, 3), keepdims=True)
  if config.samplewise_std_normalization:
    images = images / (jnp.std(images, axis=(1, 2, 3), keepdims=True) + _EPSILON)
  if config.needs_stats and stats is None:
    raise ValueError("standardize: stats (per-channel mean/std of the training split) are required for "
                     "featurewise_center / featurewise_std_normalization")
  if config.featurewise_center:
    images = images - jnp.asarray(stats["mean"], jnp.float32).reshape(1, 1, 1, -1)
  if config.featurewise_std_normalization:
    images = images / (jnp.asarray(stats["std"], jnp.float32).reshape(1, 1, 1, -1) + _EPSILON)
  return images


def augment_batch(rng, images, config: AugmentConfig | None, stats: Mapping | None = None):
  """Random transforms then standardisation of a batch; pure and jittable.

  Args:
    rng: a jax PRNG key (the batch's augmentation key).
    images: float32 (B, H, W, C).
    config: the AugmentConfig; None or all-defaults is the identity.
    stats: {"mean": (C,), "std": (C,)} of the training split, for the featurewise flags. Default None.

  Returns:
    float32 (B, H, W, C).
  """
  if images.ndim != 4:
    raise ValueError(f"augment_batch: images must be (B, H, W, C), got shape {images.shape}")
  if config is None:
    return images
  images = jnp.asarray(images, jnp.float32)
  if config.is_geometric or config.horizontal_flip or config.vertical_flip:
    params = draw_params(rng, images.shape[0], images.shape[1], images.shape[2], config)
    images = apply_transforms(images, params, config)
  return standardize(images, config, stats)
