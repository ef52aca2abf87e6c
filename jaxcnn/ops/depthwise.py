"""Fast depthwise convolution, NHWC input, Keras `DepthwiseConv2D` kernel (kh, kw, C, depth_multiplier).

Each input channel c is convolved with its own M = depth_multiplier filters; output channel c * M + m
(TensorFlow's `tf.nn.depthwise_conv2d` order) is channel c through filter m. That is `jaxcnn.ops.conv2d`
with groups = C and the kernel reshaped (free, row-major) to (kh, kw, 1, C * M), which is what runs on
GPU/TPU (XLA's convolution with `feature_group_count`, the "xla" lowering).

On CPU a matmul would contract one value per tap, so the op sums the kh * kw shifted (strided, dilated)
slices of the padded input times the per-channel weights directly, on (N, H', W', C * M) arrays: the
channel axis, the one XLA vectorises, stays the minor axis of every product (with M > 1 the input is
first repeated M times along the channels, so that channel c * M + m holds channel c). Autodiff turns
the slices into pads for the input gradient and into per-tap reductions for the kernel gradient.

The argument checks live in `_parse_depthwise_args` here, reused by `jaxcnn.reference.depthwise_conv2d`
so both twins reject the same input with the same message.
"""
from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from jaxcnn.ops._args import (Padding, PairOrInt, check_floating, check_rank, check_window_fits,
                              normalize_tuple, pad_spatial, resolve_padding)
from jaxcnn.ops.conv import conv2d, resolve_conv_lowering

__all__ = ["depthwise_conv2d"]


def _parse_depthwise_args(x, w, b, strides, padding, dilation):
  """Validates a depthwise convolution's arguments; returns (strides, pads, dilation) as static tuples.

  Raises:
    ValueError naming the argument: wrong rank, non-float dtype, channel or bias mismatch, negative or
    unknown padding, a kernel larger than the padded input.
  """
  check_rank(x, 4, "x", "(N, H, W, C)")
  check_rank(w, 4, "w", "(kh, kw, C, depth_multiplier)")
  check_floating(x, "x")
  check_floating(w, "w")
  x_shape, w_shape = tuple(jnp.shape(x)), tuple(jnp.shape(w))
  if w_shape[2] != x_shape[-1]:
    raise ValueError(f"channel mismatch: x has {x_shape[-1]} channels (shape {x_shape}) but w (shape "
                     f"{w_shape}) has {w_shape[2]} input channels (w.shape[2])")
  if b is not None:
    check_floating(b, "b")
    c_out = w_shape[2] * w_shape[3]
    if tuple(jnp.shape(b)) != (c_out,):
      raise ValueError(f"b must have shape ({c_out},) (channels * depth_multiplier), got {tuple(jnp.shape(b))}")
  strides = normalize_tuple(strides, 2, "strides")
  dilation = normalize_tuple(dilation, 2, "dilation")
  spatial, window = x_shape[1:3], w_shape[:2]
  pads = resolve_padding(padding, spatial, window, strides, dilation)
  check_window_fits(spatial, window, pads, dilation, "kernel of w")
  return strides, pads, dilation


def depthwise_conv2d(x, w, b=None, *, strides: PairOrInt = 1, padding: Padding = "valid",
                     dilation: PairOrInt = 1):
  """Depthwise 2-D convolution (each channel with its own filters), NHWC input, Keras kernel layout.

  out[n, i, j, c*M + m] = b[c*M + m] + sum_{di, dj} xpad[n, i*sh + di*dh, j*sw + dj*dw, c] * w[di, dj, c, m]

  Args:
    x: input of shape (N, H, W, C), floating dtype.
    w: kernel of shape (kh, kw, C, M), M = depth_multiplier (Keras' `depthwise_kernel`; TensorFlow's
      `tf.nn.depthwise_conv2d` filter; PyTorch's groups=C weight (C*M, 1, kh, kw) is
      w.reshape(kh, kw, C*M).transpose(2, 0, 1)[:, None]).
    b: bias of shape (C * M,), or None (default).
    strides: int or (sh, sw); default 1.
    padding: "valid" (default); "same" (TensorFlow semantics); int p, (ph, pw) or
      ((top, bottom), (left, right)) zero padding (PyTorch).
    dilation: int or (dh, dw); default 1.

  Returns:
    (N, H_out, W_out, C * M) in the promoted dtype of x, w (and b), with the output sizes of `conv2d`.

  Raises:
    ValueError naming the argument on wrong ranks, non-float dtypes, channel/bias mismatch, negative or
    unknown padding, or a kernel larger than the padded input.
  """
  strides, pads, dilation = _parse_depthwise_args(x, w, b, strides, padding, dilation)
  dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
  x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
  kh, kw, channels, multiplier = w.shape
  grouped = w.reshape(kh, kw, 1, channels * multiplier)
  if resolve_conv_lowering(x.shape, grouped.shape, strides=strides, groups=channels) == "xla":
    return conv2d(x, grouped, b, strides=strides, padding=pads, dilation=dilation, groups=channels)
  return _depthwise_taps(x, w.reshape(kh, kw, channels * multiplier), b, multiplier, strides, pads, dilation)


def _depthwise_taps(x, w, b, multiplier, strides, pads, dilation):
  """sum over taps of slice(xpad) * w[tap] on (N, H', W', C * M), accumulated in float32 for narrower
  dtypes and rounded once."""
  acc = jnp.float32 if jnp.finfo(x.dtype).bits < 32 else x.dtype
  kh, kw, c_out = w.shape
  (sh, sw), (dh, dw) = strides, dilation
  xp = pad_spatial(x, pads)
  if multiplier > 1:
    xp = jnp.repeat(xp, multiplier, axis=-1)  # channel c * M + m holds input channel c
  n, hp, wp, _ = xp.shape
  ho, wo = (hp - (kh - 1) * dh - 1) // sh + 1, (wp - (kw - 1) * dw - 1) // sw + 1
  y = None
  for i in range(kh):
    for j in range(kw):
      view = lax.slice(xp, (0, i * dh, j * dw, 0), (n, i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1,
                                                    c_out), (1, sh, sw, 1))
      term = view.astype(acc) * w[i, j].astype(acc).reshape(1, 1, 1, c_out)
      y = term if y is None else y + term
  if b is not None:
    y = y + jnp.asarray(b, acc).reshape(1, 1, 1, c_out)
  return y.astype(x.dtype)
