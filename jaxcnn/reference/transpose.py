"""Reference transposed convolutions: the scatter-add definition, written out.

Every input pixel (i, j) multiplies its channels into a kernel-sized window of products, which is added
into the "full" output at rows i * stride + di * dilation and columns j * stride + dj * dilation (one
scatter-add with computed indices: the exact dual of `jaxcnn.reference.conv2d`'s gather); the output is
then the window of the full result the padding selects. Nothing is shared with
`jaxcnn.ops.conv2d_transpose` (which is a convolution of the undilated input with phase kernels) beyond
the argument parsing. Low-precision inputs are computed in float32 and rounded once. Memory grows as
N*H*W*kh*kw*O*C: meant for small test shapes.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxcnn.ops._args import Padding, PairOrInt
from jaxcnn.ops.transpose import _parse_transpose_args

__all__ = ["conv1d_transpose", "conv2d_transpose"]


def _compute_dtype(dtype):
  return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def _scatter_transpose(x, w, b, strides, dilation, crops):
  dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
  compute = _compute_dtype(dtype)
  x, w = jnp.asarray(x, compute), jnp.asarray(w, compute)
  n, h, wd, _ = x.shape
  kh, kw, c_out, _ = w.shape
  (sh, sw), (dh, dw) = strides, dilation
  (top, out_h), (left, out_w) = crops
  # products[n, i, j, di, dj, o] = sum over c of x[n, i, j, c] * w[di, dj, o, c]
  products = jnp.sum(x[:, :, :, None, None, None, :] * w[None, None, None], axis=-1)
  # rows[i, di]: the full-output row that input row i reaches through kernel row di; likewise cols.
  rows = jnp.arange(h)[:, None] * sh + jnp.arange(kh)[None, :] * dh
  cols = jnp.arange(wd)[:, None] * sw + jnp.arange(kw)[None, :] * dw
  full_h = max((h - 1) * sh + (kh - 1) * dh + 1, top + out_h)
  full_w = max((wd - 1) * sw + (kw - 1) * dw + 1, left + out_w)
  full = jnp.zeros((n, full_h, full_w, c_out), compute)
  full = full.at[:, rows[:, None, :, None], cols[None, :, None, :], :].add(products)
  out = full[:, top:top + out_h, left:left + out_w, :]
  if b is not None:
    out = out + jnp.asarray(b, compute).reshape(1, 1, 1, c_out)
  return out.astype(dtype)


def conv2d_transpose(x, w, b=None, *, strides: PairOrInt = 1, padding: Padding = "valid",
                     output_padding: PairOrInt | None = None, dilation: PairOrInt = 1):
  """Reference 2-D transposed convolution; the same arguments, result and errors as
  `jaxcnn.ops.conv2d_transpose`.

  Args:
    x: input of shape (N, H, W, C), floating dtype.
    w: kernel of shape (kh, kw, O, C) (Keras' Conv2DTranspose layout).
    b: bias of shape (O,), or None (default).
    strides: int or (sh, sw); default 1.
    padding: "valid" (default) | "same" (Keras) | int | (ph, pw) | ((top, bottom), (left, right))
      (PyTorch).
    output_padding: None (default) or int / (oh, ow).
    dilation: int or (dh, dw); default 1.

  Returns:
    (N, H_out, W_out, O) in the promoted dtype of the inputs.
  """
  strides, dilation, crops = _parse_transpose_args(x, w, b, strides, padding, output_padding, dilation, 2,
                                                   "(N, H, W, C)", "(kh, kw, C_out, C_in)")
  return _scatter_transpose(x, w, b, strides, dilation, crops)


def conv1d_transpose(x, w, b=None, *, strides: PairOrInt = 1, padding: Padding = "valid",
                     output_padding: PairOrInt | None = None, dilation: PairOrInt = 1):
  """Reference 1-D transposed convolution; the same arguments, result and errors as
  `jaxcnn.ops.conv1d_transpose` (the 2-D scatter-add on a 1 x L image).

  Args:
    x: input of shape (N, L, C), floating dtype.
    w: kernel of shape (k, O, C).
    b: bias of shape (O,), or None (default).
    strides: int or (s,); default 1.
    padding: "valid" (default) | "same" (Keras) | int | ((left, right),) (PyTorch).
    output_padding: None (default) or int / (p,).
    dilation: int or (d,); default 1.

  Returns:
    (N, L_out, O) in the promoted dtype of the inputs.
  """
  (stride,), (dil,), (crop,) = _parse_transpose_args(x, w, b, strides, padding, output_padding, dilation, 1,
                                                     "(N, L, C)", "(k, C_out, C_in)")
  y = _scatter_transpose(jnp.asarray(x)[:, None], jnp.asarray(w)[None], b, (1, stride), (1, dil),
                         ((0, 1), crop))
  return y[:, 0]
