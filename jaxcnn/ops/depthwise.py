"""Fast depthwise convolution, NHWC input, Keras `DepthwiseConv2D` kernel (kh, kw, C, depth_multiplier).

Each input channel c is convolved with its own M = depth_multiplier filters; output channel c * M + m
(TensorFlow's `tf.nn.depthwise_conv2d` order) is channel c through filter m. That is `jaxcnn.ops.conv2d`
with groups = C and the kernel reshaped (free, row-major) to (kh, kw, 1, C * M), which is what runs on
GPU/TPU (XLA's convolution with `feature_group_count`, the "xla" lowering).

On CPU a matmul would contract one value per tap, so the op sums the kh * kw shifted (strided, dilated)
slices of the padded input times the per-channel weights directly, on (N, H', W', C * M) arrays: the
channel axis, the one XLA vectorises, stays the minor axis of every product (with M > 1 the input is
first repeated M times along the channels, so that channel c * M + m holds channel c). That tap sum is
a JAX primitive (`jaxcnn.ops._primitive.bilinear`) with hand-written transposes: the input gradient is
the tap sum of the output gradient with the flipped kernel, the kernel gradient a second primitive
(each tap's input slice times the output gradient, summed over the batch and positions), so every
transformation composes and every derivative runs one of the two. Both are evaluated in a `lax.scan`
over blocks of examples, a fusion boundary that keeps XLA CPU from fusing the tap sum into consumer
reductions (see the comment above `_BLOCK_BYTES`).

The argument checks live in `_parse_depthwise_args` here, reused by `jaxcnn.reference.depthwise_conv2d`
so both twins reject the same input with the same message.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn.ops import _primitive
from jaxcnn.ops._args import (Padding, PairOrInt, check_floating, check_rank, check_window_fits,
                              normalize_tuple, resolve_padding)
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


# CPU path: one primitive per direction, each evaluated over blocks of the batch.
#
# `_taps(x, w)` is out[n, i, j, c] = sum_{di, dj} pad3(x)[n, i*sh + di*dh, j*sw + dj*dw, c] * w[di, dj, c],
# pad3 being lax.pad with (lo, hi, interior) per spatial axis (lo, hi may be negative). It is linear in
# x and in w; its transposes are again such sums: the input gradient is `_taps` of the output gradient
# (interior padding undoes the stride) with the flipped kernel, and the kernel gradient is `_tap_sums`,
# sum over (n, i, j) of each tap's input slice times the output gradient, itself linear in both
# operands with `_taps` and the input gradient as its transposes. So every derivative of every order
# runs one of these two computations.
#
# Both are evaluated in a `lax.scan` over blocks of whole examples (`_batch_blocks`). The loop keeps each
# block's kh * kw reads in cache, and it is a fusion boundary: XLA CPU otherwise fuses the elementwise
# tap sum into every consumer (a loss or statistics reduction, the input gradient's taps), materialising
# shifted copies of the input or recomputing the sum once per consumer tap.

_BLOCK_BYTES = 1 << 19  # input bytes per scan step: a few blocks fit in a core's L2 cache


def _batch_blocks(n, example_bytes):
  """Examples per scan step: the largest divisor of n within _BLOCK_BYTES (n itself, i.e. no loop, for
  a symbolic batch or one that fits)."""
  if not isinstance(n, int):
    return n
  fit = max(1, _BLOCK_BYTES // max(1, example_bytes))
  return max(d for d in range(1, min(n, fit) + 1) if n % d == 0)


def _over_blocks(fn, *arrays):
  """fn(*blocks) for blocks of the leading (batch) axis, stacked back along it: one scan step per block
  (the arrays' batch sizes are equal)."""
  n = arrays[0].shape[0]
  block = _batch_blocks(n, max(a[0].size * a.dtype.itemsize for a in arrays))
  if block == n:
    return fn(*arrays)
  blocks = [a.reshape(n // block, block, *a.shape[1:]) for a in arrays]
  out = lax.scan(lambda carry, b: (carry, fn(*b)), (), blocks)[1]
  return jax.tree.map(lambda o: o.reshape(n // block * o.shape[1], *o.shape[2:]), out)


def _padded_geometry(x_shape, w_shape, strides, pads, dilation):
  """(padded spatial sizes, output spatial sizes) of `_taps`."""
  padded = tuple((size - 1) * (interior + 1) + 1 + lo + hi if size else lo + hi
                 for size, (lo, hi, interior) in zip(x_shape[1:3], pads))
  out = tuple((p - (k - 1) * d - 1) // s + 1 for p, k, d, s in zip(padded, w_shape[:2], dilation, strides))
  return padded, out


def _pad3(x, pads):
  if not any(any(p) for p in pads):
    return x
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *pads, (0, 0, 0)))


def _taps_forward(x, w, *, strides, pads, dilation, acc_dtype):
  """(N, Ho, Wo, C) in acc_dtype: the tap sum, accumulated in acc_dtype."""
  _, (ho, wo) = _padded_geometry(x.shape, w.shape, strides, pads, dilation)
  kh, kw, c = w.shape
  (sh, sw), (dh, dw) = strides, dilation
  taps = w.astype(acc_dtype).reshape(kh, kw, 1, 1, 1, c)

  def block(xb):
    xp = _pad3(xb, pads)
    y = None
    for i in range(kh):
      for j in range(kw):
        view = lax.slice(xp, (0, i * dh, j * dw, 0),
                         (xp.shape[0], i * dh + (ho - 1) * sh + 1, j * dw + (wo - 1) * sw + 1, c), (1, sh, sw, 1))
        term = view.astype(acc_dtype) * taps[i, j]
        y = term if y is None else y + term
    return y
  return _over_blocks(block, x)


def _taps_input_grad(ct, w, x_aval, *, strides, pads, dilation, acc_dtype):
  """The transpose of `_taps_forward` in x: `_taps` of ct (its stride turned into interior padding)
  with the flipped kernel, then pad3's transpose."""
  kh, kw, _ = w.shape
  padded, out = _padded_geometry(x_aval.shape, w.shape, strides, pads, dilation)
  # Position p of the padded input receives ct[i] * w[t] where p = i * s + t * d: a stride-1 correlation
  # of ct (interior padding s - 1, padded by (k - 1) * d below) with the flipped kernel.
  full = tuple(((k - 1) * d, p - (o - 1) * s - 1, s - 1)
               for k, d, p, o, s in zip((kh, kw), dilation, padded, out, strides))
  flipped = w[::-1, ::-1]
  if not any(interior for _, _, interior in pads):
    # pad3 of x was an edge pad: crop it in the same pass (negative padding).
    inner = tuple((lo_full - lo, hi_full - hi, i_full) for (lo_full, hi_full, i_full), (lo, hi, _)
                  in zip(full, pads))
    dx = _taps_primitive(ct, flipped, strides=(1, 1), pads=inner, dilation=dilation, acc_dtype=acc_dtype)
    return dx.astype(x_aval.dtype)
  dxp = _taps_primitive(ct, flipped, strides=(1, 1), pads=full, dilation=dilation, acc_dtype=acc_dtype)
  zeros = jnp.zeros(x_aval.shape, dxp.dtype)
  dx = jax.linear_transpose(lambda t: _pad3(t, pads), zeros)(dxp)[0]
  return dx.astype(x_aval.dtype)


def _taps_kernel_grad(ct, x, w_aval, *, strides, pads, dilation, acc_dtype):
  """The transpose of `_taps_forward` in w: `_tap_sums`."""
  return _tap_sums_primitive(x, ct, strides=strides, pads=pads, dilation=dilation, acc_dtype=acc_dtype,
                             kernel=tuple(w_aval.shape), kernel_dtype=jnp.dtype(w_aval.dtype))


def _tap_sums(x, ct, *, strides, pads, dilation, acc_dtype, kernel, kernel_dtype):
  """(kh, kw, C) in kernel_dtype: per tap, sum over (n, i, j) of its input slice times ct.

  One variadic reduction per batch block computes all kh * kw sums in one pass over the block (separate
  sums would read it kh * kw times); the blocks' partial sums are added at the end."""
  kh, kw, c = kernel
  _, (ho, wo) = _padded_geometry(x.shape, kernel, strides, pads, dilation)
  (sh, sw), (dh, dw) = strides, dilation

  def block(xb, cb):
    # Channels first, so that each tap's sum runs along the minor axes (XLA CPU reduces those faster
    # than the major axes of NHWC).
    xt = jnp.transpose(_pad3(xb, pads), (3, 0, 1, 2)).astype(acc_dtype)
    ct_t = jnp.transpose(cb, (3, 0, 1, 2)).astype(acc_dtype)
    products = tuple(lax.slice(xt, (0, 0, i * dh, j * dw), (c, xt.shape[1], i * dh + (ho - 1) * sh + 1,
                                                            j * dw + (wo - 1) * sw + 1), (1, 1, sh, sw)) * ct_t
                     for i in range(kh) for j in range(kw))
    zero = jnp.zeros((), acc_dtype)
    sums = lax.reduce(products, (zero,) * len(products), lambda a, b: tuple(u + v for u, v in zip(a, b)),
                      (1, 2, 3))
    return jnp.stack(sums)[None]  # (1, kh * kw, C): one row per block
  partial = _over_blocks(block, x, ct)
  return jnp.sum(partial, axis=0).reshape(kernel).astype(kernel_dtype)


def _tap_sums_input_grad(ct_w, ct, x_aval, *, kernel, kernel_dtype, **geometry):
  """The transpose of `_tap_sums` in x: the input gradient of `_taps` with kernel ct_w."""
  del kernel, kernel_dtype
  return _taps_input_grad(ct, ct_w, x_aval, **geometry)


def _tap_sums_ct_grad(ct_w, x, ct_aval, *, kernel, kernel_dtype, **geometry):
  """The transpose of `_tap_sums` in ct: `_taps` of x with kernel ct_w."""
  del kernel, kernel_dtype
  return _taps_primitive(x, ct_w, **geometry).astype(ct_aval.dtype)


def _channels_batched(x, bx, size):
  """x with its mapped axis `bx` (None: not mapped, so tiled) folded into the channels, b * C + c."""
  if bx is None:
    return jnp.tile(x, (1,) * (x.ndim - 1) + (size,))
  x = jnp.moveaxis(x, bx, -2)
  return x.reshape(*x.shape[:-2], size * x.shape[-1])


def _taps_batch(bind, args, dims, **params):
  """vmap of `_taps`: a mapped input alone joins the batch axis; a mapped kernel maps the channels
  (the input tiled, or its mapped axis folded into the channels too)."""
  (x, w), (bx, bw) = args, dims
  if bw is None:
    x = jnp.moveaxis(x, bx, 0)
    size, n = x.shape[:2]
    y = bind(x.reshape(size * n, *x.shape[2:]), w, **params)
    return y.reshape(size, n, *y.shape[1:]), 0
  size = w.shape[bw]
  y = bind(_channels_batched(x, bx, size), _channels_batched(w, bw, size), **params)
  return y.reshape(*y.shape[:-1], size, -1), y.ndim - 1


def _tap_sums_batch(bind, args, dims, *, kernel, **params):
  """vmap of `_tap_sums`: the mapped axis folded into the channels of both operands."""
  (x, ct), (bx, bc) = args, dims
  size = x.shape[bx] if bx is not None else ct.shape[bc]
  kh, kw, c = kernel
  dw = bind(_channels_batched(x, bx, size), _channels_batched(ct, bc, size), kernel=(kh, kw, size * c),
            **params)
  return dw.reshape(kh, kw, size, c), 2


_taps_bind = _primitive.bilinear("jaxcnn_depthwise", _taps_forward, _taps_input_grad, _taps_kernel_grad,
                                 _taps_batch)
_tap_sums_bind = _primitive.bilinear("jaxcnn_depthwise_tap_sums", _tap_sums, _tap_sums_input_grad,
                                     _tap_sums_ct_grad, _tap_sums_batch)


def _taps_primitive(x, w, *, strides, pads, dilation, acc_dtype):
  return _taps_bind(x, w, strides=tuple(strides), pads=tuple(tuple(p) for p in pads),
                    dilation=tuple(dilation), acc_dtype=jnp.dtype(acc_dtype))


def _tap_sums_primitive(x, ct, **params):
  return _tap_sums_bind(x, ct, **params)


def _depthwise_taps(x, w, b, multiplier, strides, pads, dilation):
  """The CPU path: `_taps` on (N, H', W', C * M), accumulated in float32 for narrower dtypes and
  rounded once."""
  acc = jnp.float32 if jnp.finfo(x.dtype).bits < 32 else x.dtype
  if multiplier > 1:
    x = jnp.repeat(x, multiplier, axis=-1)  # channel c * M + m holds input channel c
  y = _taps_primitive(x, w, strides=strides, pads=tuple((lo, hi, 0) for lo, hi in pads), dilation=dilation,
                      acc_dtype=acc)
  if b is not None:
    y = y + jnp.asarray(b, acc).reshape(1, 1, 1, -1)
  return y.astype(x.dtype)
