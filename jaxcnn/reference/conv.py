"""Reference convolutions: the textbook definition, written out with explicit windows and sums.

Every output position gathers its window from the zero-padded input by index arithmetic
(row = i * stride + di * dilation), multiplies it by the kernel and sums. No `lax.conv*`, no
`reduce_window`, no patch extraction primitive: nothing is shared with `jaxcnn.ops.conv`, which these
functions verify. Low-precision inputs are computed in float32 and rounded once at the end, so the
reference is at least as accurate as the fast path. Memory grows as N*H_out*W_out*kh*kw*C*O/groups:
meant for small test shapes.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxcnn.ops._args import Padding, PairOrInt, parse_conv_args

__all__ = ["conv1d", "conv2d"]


def _compute_dtype(dtype):
  return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def _conv2d_explicit(x, w, b, strides, pads, dilation, groups):
  """The convolution sum for validated arguments; pads = ((top, bottom), (left, right))."""
  dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
  compute = _compute_dtype(dtype)
  x, w = jnp.asarray(x, compute), jnp.asarray(w, compute)
  (sh, sw), (dh, dw) = strides, dilation
  n, _, _, c_in = x.shape
  kh, kw, c_per_group, c_out = w.shape
  per_group = c_out // groups

  xpad = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  h_out = (xpad.shape[1] - (kh - 1) * dh - 1) // sh + 1
  w_out = (xpad.shape[2] - (kw - 1) * dw - 1) // sw + 1
  # rows[i, di]: the padded-input row that output row i reads through kernel row di; likewise cols.
  rows = jnp.arange(h_out)[:, None] * sh + jnp.arange(kh)[None, :] * dh
  cols = jnp.arange(w_out)[:, None] * sw + jnp.arange(kw)[None, :] * dw
  # windows[n, i, j, di, dj, c] = xpad[n, rows[i, di], cols[j, dj], c]
  windows = xpad[:, rows[:, None, :, None], cols[None, :, None, :], :]

  # Output channel o = g * per_group + m belongs to group g and reads input channels g*Cg ... g*Cg+Cg-1.
  windows = windows.reshape(n, h_out, w_out, kh, kw, groups, c_per_group, 1)
  kernel = w.reshape(kh, kw, c_per_group, groups, per_group).transpose(0, 1, 3, 2, 4)
  kernel = kernel.reshape(1, 1, 1, kh, kw, groups, c_per_group, per_group)
  # out[n, i, j, g, m] = sum over (di, dj, c) of window * kernel
  out = jnp.sum(windows * kernel, axis=(3, 4, 6))
  out = out.reshape(n, h_out, w_out, c_out)
  if b is not None:
    out = out + jnp.asarray(b, compute).reshape(1, 1, 1, c_out)
  return out.astype(dtype)


def conv2d(x, w, b=None, *, strides: PairOrInt = 1, padding: Padding = "valid", dilation: PairOrInt = 1,
           groups: int = 1):
  """Reference 2-D convolution; the same arguments, result and errors as `jaxcnn.ops.conv2d`.

  Args:
    x: input of shape (N, H, W, C), floating dtype.
    w: kernel of shape (kh, kw, C / groups, O).
    b: bias of shape (O,), or None (default).
    strides: int or (sh, sw); default 1.
    padding: "valid" (default) | "same" (TensorFlow) | int | ((top, bottom), (left, right)) zeros.
    dilation: int or (dh, dw); default 1.
    groups: channel groups; default 1.

  Returns:
    (N, H_out, W_out, O) in the promoted dtype of the inputs.
  """
  strides, pads, dilation = parse_conv_args(x, w, b, strides, padding, dilation, groups, 2,
                                            "(N, H, W, C)", "(kh, kw, C_in/groups, C_out)")
  return _conv2d_explicit(x, w, b, strides, pads, dilation, groups)


def conv1d(x, w, b=None, *, strides: PairOrInt = 1, padding: Padding = "valid", dilation: PairOrInt = 1,
           groups: int = 1):
  """Reference 1-D convolution; the same arguments, result and errors as `jaxcnn.ops.conv1d`.

  A length-L signal is a 1 x L image, so this is the 2-D sum with a 1-row kernel.

  Args:
    x: input of shape (N, L, C), floating dtype.
    w: kernel of shape (k, C / groups, O).
    b: bias of shape (O,), or None (default).
    strides: int or (s,); default 1.
    padding: "valid" (default) | "same" (TensorFlow) | int | ((left, right),) zeros.
    dilation: int or (d,); default 1.
    groups: channel groups; default 1.

  Returns:
    (N, L_out, O) in the promoted dtype of the inputs.
  """
  (stride,), (pad,), (dil,) = parse_conv_args(x, w, b, strides, padding, dilation, groups, 1,
                                              "(N, L, C)", "(k, C_in/groups, C_out)")
  y = _conv2d_explicit(jnp.asarray(x)[:, None], jnp.asarray(w)[None], b, (1, stride), ((0, 0), pad),
                       (1, dil), groups)
  return y[:, 0]
