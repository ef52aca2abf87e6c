"""Reference depthwise convolution: explicit per-channel windows, multiplied and summed.

Every output position gathers its (kh, kw) window of every channel from the zero-padded input by index
arithmetic (row = i * stride + di * dilation), multiplies channel c's window by its M filters and sums
over the window. Nothing is shared with `jaxcnn.ops.depthwise_conv2d` (a grouped `conv2d`) beyond the
argument checks. Low-precision inputs are computed in float32 and rounded once.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxcnn.ops._args import Padding, PairOrInt
from jaxcnn.ops.depthwise import _parse_depthwise_args

__all__ = ["depthwise_conv2d"]


def depthwise_conv2d(x, w, b=None, *, strides: PairOrInt = 1, padding: Padding = "valid",
                     dilation: PairOrInt = 1):
  """Reference depthwise convolution; the same arguments, result and errors as
  `jaxcnn.ops.depthwise_conv2d`.

  Args:
    x: input of shape (N, H, W, C), floating dtype.
    w: kernel of shape (kh, kw, C, M).
    b: bias of shape (C * M,), or None (default).
    strides: int or (sh, sw); default 1.
    padding: "valid" (default) | "same" (TensorFlow) | int | ((top, bottom), (left, right)) zeros.
    dilation: int or (dh, dw); default 1.

  Returns:
    (N, H_out, W_out, C * M) in the promoted dtype of the inputs; channel c * M + m is channel c
    through filter m.
  """
  (sh, sw), pads, (dh, dw) = _parse_depthwise_args(x, w, b, strides, padding, dilation)
  dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
  compute = jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype
  x, w = jnp.asarray(x, compute), jnp.asarray(w, compute)
  n, _, _, channels = x.shape
  kh, kw, _, multiplier = w.shape
  xpad = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  h_out = (xpad.shape[1] - (kh - 1) * dh - 1) // sh + 1
  w_out = (xpad.shape[2] - (kw - 1) * dw - 1) // sw + 1
  rows = jnp.arange(h_out)[:, None] * sh + jnp.arange(kh)[None, :] * dh
  cols = jnp.arange(w_out)[:, None] * sw + jnp.arange(kw)[None, :] * dw
  # windows[n, i, j, di, dj, c] = xpad[n, rows[i, di], cols[j, dj], c]
  windows = xpad[:, rows[:, None, :, None], cols[None, :, None, :], :]
  # out[n, i, j, c, m] = sum over (di, dj) of windows[n, i, j, di, dj, c] * w[di, dj, c, m]
  out = jnp.sum(windows[..., None] * w[None, None, None], axis=(3, 4))
  out = out.reshape(n, h_out, w_out, channels * multiplier)
  if b is not None:
    out = out + jnp.asarray(b, compute).reshape(1, 1, 1, -1)
  return out.astype(dtype)
