"""Fast depthwise convolution, NHWC input, Keras `DepthwiseConv2D` kernel (kh, kw, C, depth_multiplier).

Each input channel c is convolved with its own M = depth_multiplier filters; output channel c * M + m
(TensorFlow's `tf.nn.depthwise_conv2d` order) is channel c through filter m. That is exactly
`jaxcnn.ops.conv2d` with groups = C and the kernel reshaped (free, row-major) to (kh, kw, 1, C * M), so
this op is that call: on CPU conv2d sums the kh * kw shifted slices times per-channel weights directly
(no patch matrix: a contraction of length one per tap would be all overhead), on GPU/TPU it is XLA's
convolution with `feature_group_count`.

The argument checks live in `_parse_depthwise_args` here, reused by `jaxcnn.reference.depthwise_conv2d`
so both twins reject the same input with the same message.
"""
from __future__ import annotations

import jax.numpy as jnp

from jaxcnn.ops._args import (Padding, PairOrInt, check_floating, check_rank, check_window_fits,
                              normalize_tuple, resolve_padding)
from jaxcnn.ops.conv import conv2d

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
  w = jnp.asarray(w)
  kh, kw, channels, multiplier = w.shape
  return conv2d(x, w.reshape(kh, kw, 1, channels * multiplier), b, strides=strides, padding=pads,
                dilation=dilation, groups=channels)
