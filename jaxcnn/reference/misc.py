"""Reference dropout, upsampling and zero padding, written from explicit masks, indices and weights.

Argument checks are shared with `jaxcnn.ops.misc` (same errors); the arithmetic is independent.

Dropout is random, so "the same result" needs a definition: the fast op's contract is that its mask is
`jax.random.bernoulli(rng, 1 - rate, x.shape)`, i.e. a function of the key's random bits. The twin
takes those bits (`jax.random.bits`, the key's stream itself) and turns them into the mask with its own
naive arithmetic, written from the definition of a uniform draw: the top `nmant` bits of each word,
scaled by 2^-nmant, are a uniform sample on [0, 1), and a cell is kept when its sample is below
1 - rate. So the two agree cell for cell (a wrong mask derivation, scale or rate shows as an exact
mismatch), while the mask statistics (kept fraction, preserved mean) are tested for both separately.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn.ops._args import compute_dtype
from jaxcnn.ops.misc import _check_dropout_args, _parse_upsample_args, _parse_zero_pad_args

__all__ = ["dropout", "upsample2d", "zero_pad2d"]


def _kept(rng, rate, shape):
  """True where a cell is kept: the uniform sample read from the key's random bits is below 1 - rate.

  A Python float `1 - rate` is a float32 probability (float64 with jax_enable_x64), whose mantissa has
  nmant = 23 (52) bits; each cell's sample is its random word's top nmant bits times 2^-nmant, exactly
  representable, so the comparison has no rounding.
  """
  dtype = jnp.dtype(jnp.result_type(float))
  nbits, nmant = dtype.itemsize * 8, jnp.finfo(dtype).nmant
  words = jax.random.bits(rng, shape, jnp.dtype(f"uint{nbits}"))
  sample = (words >> (nbits - nmant)).astype(dtype) * dtype.type(2.0 ** -nmant)
  return sample < dtype.type(1.0 - rate)


def dropout(x, rate: float, *, rng=None, deterministic: bool = False):
  """Reference inverted dropout: x * mask / (1 - rate), mask[i] = (uniform sample i of rng) < 1 - rate.

  The mask is derived from the key's random bits by this module's own arithmetic (see the module
  docstring), and equals the fast op's cell for cell; the outputs agree up to rounding of the scale.

  Args:
    x: floating array of any shape.
    rate: drop probability in [0, 1).
    rng: a `jax.random` key; required unless rate == 0 or deterministic. Default None.
    deterministic: identity when True; default False.

  Returns:
    Array of x's shape and dtype.
  """
  if _check_dropout_args(x, rate, rng, deterministic):
    return jnp.asarray(x)
  x = jnp.asarray(x)
  acc = compute_dtype(x.dtype)
  mask = _kept(rng, rate, x.shape).astype(acc)
  return (x.astype(acc) * mask / (1.0 - rate)).astype(x.dtype)


def _nearest_indices(out: int, scale: int):
  return np.arange(out) // scale


def _bilinear_taps(size: int, scale: int):
  """For each output index: (lower source index, upper source index, weight of the upper one).

  Source coordinate (o + 0.5) / scale - 0.5, clamped to [0, size - 1] (half-pixel centres, edges held).
  """
  coord = np.clip((np.arange(size * scale) + 0.5) / scale - 0.5, 0.0, size - 1.0)
  lower = np.floor(coord).astype(np.int32)
  upper = np.minimum(lower + 1, size - 1)
  return lower, upper, coord - lower


def upsample2d(x, size=2, *, method: str = "nearest"):
  """Reference upsampling; same arguments and result as `jaxcnn.ops.upsample2d`.

  "nearest": output (i, j) reads x[i // size_h, j // size_w]. "bilinear": each output pixel reads its
  four source neighbours at the clamped half-pixel coordinates and weights them (1 - a)(1 - b),
  (1 - a) b, a (1 - b), a b.

  Args:
    x: (N, H, W, C) floating array.
    size: an int or (size_h, size_w); default 2.
    method: "nearest" (default) or "bilinear".

  Returns:
    (N, H * size_h, W * size_w, C) array of x's dtype.
  """
  sh, sw = _parse_upsample_args(x, size, method)
  x = jnp.asarray(x)
  _, h, w, _ = x.shape
  if method == "nearest":
    rows, cols = _nearest_indices(h * sh, sh), _nearest_indices(w * sw, sw)
    return x[:, rows[:, None], cols[None, :], :]
  r0, r1, a = _bilinear_taps(h, sh)
  c0, c1, b = _bilinear_taps(w, sw)
  xf = x.astype(compute_dtype(x.dtype))
  a = jnp.asarray(a[None, :, None, None], xf.dtype)  # (1, Ho, 1, 1): over batch, columns, channels
  b = jnp.asarray(b[None, None, :, None], xf.dtype)  # (1, 1, Wo, 1)
  top = (1 - b) * xf[:, r0[:, None], c0[None, :], :] + b * xf[:, r0[:, None], c1[None, :], :]
  bottom = (1 - b) * xf[:, r1[:, None], c0[None, :], :] + b * xf[:, r1[:, None], c1[None, :], :]
  return ((1 - a) * top + a * bottom).astype(x.dtype)


def zero_pad2d(x, padding):
  """Reference zero padding: x written into a zeros array at offset (top, left).

  Args:
    x: (N, H, W, C) array.
    padding: an int, (ph, pw) or ((top, bottom), (left, right)); non-negative.

  Returns:
    (N, H + top + bottom, W + left + right, C) array of x's dtype.
  """
  (top, bottom), (left, right) = _parse_zero_pad_args(x, padding)
  x = jnp.asarray(x)
  n, h, w, c = x.shape
  out = jnp.zeros((n, h + top + bottom, w + left + right, c), x.dtype)
  return out.at[:, top:top + h, left:left + w, :].set(x)
