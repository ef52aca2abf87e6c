"""Fast convolutions, NHWC / NWC activations and HWIO / WIO kernels, with selectable lowerings.

Lowerings (chosen at trace time, see `set_conv_lowering`):
  "xla"     one `lax.conv_general_dilated` (grouped convs via `feature_group_count`). The best choice on
            GPU/TPU, whose convolution kernels are tuned.
  "im2col"  pad, take kh*kw shifted strided slices of the input, concatenate them along channels and
            multiply by the kernel reshaped to a (kh*kw*C, O) matrix with one `dot_general`. Grouped convs
            become one matmul batched over groups; depthwise convs (one input channel per group) skip the
            patch matrix and sum kh*kw elementwise products instead. For groups == 1 the backward pass
            is written by hand (`jax.custom_vjp`): the weight gradient is patches^T @ dY contracted
            over the rows of both matrices in place, and the input gradient is dY @ kernel^T folded
            back onto the input (one pad per tap, summed: the adjoint of the slices). Autodiff of the
            forward computes the same but makes XLA copy dY into a transposed buffer first; inside
            lax.scan on a loaded 2-core CPU the hand-written backward was 1.2-1.5x faster for
            128x13x13x32 -> 64 (forward + both gradients) and 3-5x for 128x28x28x1 -> 32 (weight
            gradient only, as for a first layer).
  "auto"    "im2col" on CPU, "xla" elsewhere (the default).

Why im2col on CPU: XLA's CPU convolution is slow for the small-channel convs of typical CNNs, and about
9x slower again inside `lax.scan` (measured on a 2-core CPU host: a 20-step scanned training loop of a
small CNN ran 2.2 steps/s with `conv_general_dilated` against 31-40 with im2col, on par with PyTorch's
35-38). The matmul it reduces to is well optimised everywhere, and slices and concatenations fuse.

Both lowerings keep the input dtype, accumulate low-precision (bfloat16/float16) inputs in float32
(`preferred_element_type`), add the bias in the accumulator dtype and cast back once. im2col's
hand-written backward also sums the kh*kw per-tap contributions to the input gradient in the
accumulator dtype and rounds once; grouped and depthwise im2col convolutions are differentiated by
autodiff, whose input gradient adds those contributions in the input dtype (a few more bfloat16
roundings than the XLA lowering).
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn.errors import ConfigError
from jaxcnn.ops._args import Padding, PairOrInt, parse_conv_args

__all__ = ["conv1d", "conv2d", "conv_lowering", "get_conv_lowering", "set_conv_lowering",
           "CONV_LOWERINGS"]

CONV_LOWERINGS = ("auto", "xla", "im2col")


def _check_lowering(name, source: str) -> str:
  if not isinstance(name, str) or name.lower() not in CONV_LOWERINGS:
    raise ConfigError(f"{source} must be one of {CONV_LOWERINGS}, got {name!r}")
  return name.lower()


# Read once, at import; `set_conv_lowering` overrides it afterwards.
_lowering = _check_lowering(os.environ.get("JAXCNN_CONV_LOWERING", "auto"), "JAXCNN_CONV_LOWERING")


def set_conv_lowering(name: str) -> None:
  """Selects the convolution lowering for every later trace: "auto" | "xla" | "im2col".

  The choice is read when a function is traced, so an already-jitted function keeps the lowering it was
  traced with: call `jax.clear_caches()` (or jit a fresh function) after changing it.

  Args:
    name: one of `CONV_LOWERINGS` (case-insensitive).

  Raises:
    ConfigError (a ValueError) for an unknown name.
  """
  global _lowering
  _lowering = _check_lowering(name, "conv lowering")


def get_conv_lowering() -> str:
  """The selected lowering name, "auto" | "xla" | "im2col" (initially $JAXCNN_CONV_LOWERING or "auto")."""
  return _lowering


@contextlib.contextmanager
def conv_lowering(name: str):
  """Context manager: traces inside the `with` block use lowering `name`; the old one is restored after.

  Process-global (not thread-local), and like `set_conv_lowering` it affects traces, not cached jits.

  Args:
    name: one of `CONV_LOWERINGS`.
  """
  previous = get_conv_lowering()
  set_conv_lowering(name)
  try:
    yield
  finally:
    set_conv_lowering(previous)


def _resolve_lowering() -> str:
  if _lowering != "auto":
    return _lowering
  return "im2col" if jax.default_backend() == "cpu" else "xla"


def _accumulator_dtype(dtype):
  """float32 for inputs narrower than float32 (bf16/f16 sums of many products lose too much)."""
  return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def _conv_xla(x, w, strides, pads, dilation, groups, acc_dtype):
  n = x.ndim - 2
  spatial = "HW" if n == 2 else "W"
  dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
  return lax.conv_general_dilated(
      x, w, window_strides=strides, padding=pads, rhs_dilation=dilation, dimension_numbers=dims,
      feature_group_count=groups, preferred_element_type=acc_dtype)


def _shifted_slices(x, window, strides, pads, dilation):
  """The kh*kw (or k) strided views of the padded input, one per kernel tap, each (N, *out, C)."""
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)))
  out = [(size - (k - 1) * d - 1) // s + 1
         for size, k, s, d in zip(xp.shape[1:-1], window, strides, dilation)]
  slices = []
  for tap in itertools.product(*(range(k) for k in window)):
    start = (0, *(t * d for t, d in zip(tap, dilation)), 0)
    limit = (xp.shape[0], *(st + (o - 1) * s + 1 for st, o, s in zip(start[1:-1], out, strides)),
             xp.shape[-1])
    slices.append(lax.slice(xp, start, limit, (1, *strides, 1)))
  return slices


def _patches(x, window, strides, pads, dilation):
  """(N, *out, taps * C): the shifted slices side by side. Tap-major, channel-minor columns match the
  row-major flattening of the HWIO kernel into a (taps * C, O) matrix."""
  slices = _shifted_slices(x, window, strides, pads, dilation)
  return slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=-1)


def _fold_patches(cols, x_shape, window, strides, pads, dilation):
  """The adjoint of `_patches`: adds each tap's (N, *out, C) block of `cols` back where it was read.

  Each block is placed by one `lax.pad` (edges put it at the tap's offset, interior padding undoes the
  stride), the placed blocks are summed (XLA fuses the pads and adds into one pass), and the padding
  `_patches` put around the input is cropped by a negative pad. Returns (N, *spatial, C) in cols' dtype.
  """
  channels = x_shape[-1]
  padded = [size + lo + hi for size, (lo, hi) in zip(x_shape[1:-1], pads)]
  out = cols.shape[1:-1]
  zero = jnp.zeros((), cols.dtype)
  total = None
  for t, tap in enumerate(itertools.product(*(range(k) for k in window))):
    block = lax.slice_in_dim(cols, t * channels, (t + 1) * channels, axis=cols.ndim - 1)
    config = [(0, 0, 0)]
    for offset, o, s, d, size in zip(tap, out, strides, dilation, padded):
      lo = offset * d
      config.append((lo, size - lo - (o - 1) * s - 1, s - 1))
    config.append((0, 0, 0))
    placed = lax.pad(block, zero, config)
    total = placed if total is None else total + placed
  return lax.pad(total, zero, ((0, 0, 0), *((-lo, -hi, 0) for lo, hi in pads), (0, 0, 0)))


def _contract_last(a, b, b_axis, acc_dtype):
  """a's last axis contracted with b's axis `b_axis`, accumulated in acc_dtype."""
  return lax.dot_general(a, b, (((a.ndim - 1,), (b_axis,)), ((), ())), preferred_element_type=acc_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _im2col_dense(x, w, strides, pads, dilation, acc_dtype):
  """groups == 1: patches @ kernel matrix, (N, *out, O) in acc_dtype; the backward is hand-written."""
  return _im2col_dense_forward(x, w, strides, pads, dilation, acc_dtype)[0]


def _im2col_dense_forward(x, w, strides, pads, dilation, acc_dtype):
  patches = _patches(x, w.shape[:-2], strides, pads, dilation)
  return _contract_last(patches, w.reshape(-1, w.shape[-1]), 0, acc_dtype), (x, w)


def _im2col_dense_backward(strides, pads, dilation, acc_dtype, residuals, dy):
  x, w = residuals
  window, c_out = w.shape[:-2], w.shape[-1]
  # The patches are rebuilt rather than saved: XLA shares them with the forward's when both are in one
  # program, and otherwise recomputing slices is cheaper than keeping taps * |x| alive.
  patches = _patches(x, window, strides, pads, dilation)
  dy = dy.astype(x.dtype)
  rows = tuple(range(dy.ndim - 1))
  # dW = patches^T @ dY, contracting the (N, *out) rows of both operands where they lie; autodiff
  # would have XLA transpose dY into an (O, rows) copy first.
  dw = lax.dot_general(patches, dy, ((rows, rows), ((), ())), preferred_element_type=acc_dtype)
  cols = _contract_last(dy, w.reshape(-1, c_out), 1, acc_dtype)
  dx = _fold_patches(cols, x.shape, window, strides, pads, dilation)
  return dx.astype(x.dtype), dw.reshape(w.shape).astype(w.dtype)


_im2col_dense.defvjp(_im2col_dense_forward, _im2col_dense_backward)


def _conv_im2col(x, w, strides, pads, dilation, groups, acc_dtype):
  if groups == 1:
    return _im2col_dense(x, w, tuple(strides), tuple(tuple(p) for p in pads), tuple(dilation),
                         jnp.dtype(acc_dtype))
  window = w.shape[:-2]
  c_per_group, c_out = w.shape[-2], w.shape[-1]
  taps = len(slices := _shifted_slices(x, window, strides, pads, dilation))
  lead = slices[0].shape[:-1]
  per_group = c_out // groups
  if c_per_group == 1:
    # Depthwise: a matmul with a contraction of length kh*kw per channel would be all overhead, so sum
    # the taps' elementwise products directly (output channel g*per_group + m reads input channel g).
    kernel = w.reshape(taps, *(1,) * len(lead), groups, per_group).astype(acc_dtype)
    acc = None
    for t, view in enumerate(slices):
      term = view.astype(acc_dtype)[..., None] * kernel[t]
      acc = term if acc is None else acc + term
    return acc.reshape(*lead, c_out)
  # Grouped: one matmul batched over groups, contracting (tap, channel-in-group).
  patches = jnp.stack(slices, axis=-2).reshape(*lead, taps, groups, c_per_group)
  kernel = w.reshape(taps, c_per_group, groups, per_group)
  nd = patches.ndim
  y = lax.dot_general(patches, kernel, (((nd - 3, nd - 1), (0, 1)), ((nd - 2,), (2,))),
                      preferred_element_type=acc_dtype)  # (groups, *lead, per_group)
  return jnp.moveaxis(y, 0, -2).reshape(*lead, c_out)


def _conv(x, w, b, strides, padding, dilation, groups, n, layout, kernel_layout):
  strides, pads, dilation = parse_conv_args(x, w, b, strides, padding, dilation, groups, n, layout,
                                            kernel_layout)
  dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
  x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
  acc_dtype = _accumulator_dtype(dtype)
  lower = _conv_xla if _resolve_lowering() == "xla" else _conv_im2col
  y = lower(x, w, strides, pads, dilation, groups, acc_dtype)
  if b is not None:
    y = y + jnp.asarray(b, acc_dtype).reshape((1,) * (y.ndim - 1) + (-1,))
  return y.astype(dtype)


def conv2d(x, w, b=None, *, strides: PairOrInt = 1, padding: Padding = "valid", dilation: PairOrInt = 1,
           groups: int = 1):
  """2-D convolution (cross-correlation, as in every deep-learning library), NHWC input, HWIO kernel.

  out[n, i, j, o] = b[o] + sum_{di, dj, c} xpad[n, i*sh + di*dh, j*sw + dj*dw, g*Cg + c] * w[di, dj, c, o]
  where g = o // (O / groups) and Cg = C / groups.

  Args:
    x: input of shape (N, H, W, C), floating dtype.
    w: kernel of shape (kh, kw, C / groups, O), floating dtype.
    b: bias of shape (O,), or None (default) for no bias.
    strides: int or (sh, sw); default 1.
    padding: "valid" (default, no padding); "same" (TensorFlow: out = ceil(in / stride), an odd total
      puts the extra row/column at the bottom/right); int p, (ph, pw) or ((top, bottom), (left, right))
      zero padding (PyTorch).
    dilation: int or (dh, dw) kernel dilation; default 1.
    groups: number of channel groups; default 1 (groups == C is a depthwise convolution).

  Returns:
    (N, H_out, W_out, O) in the promoted dtype of x, w (and b), with
    H_out = floor((H + top + bottom - (kh - 1) * dh - 1) / sh) + 1, likewise W_out.

  Raises:
    ValueError naming the argument on wrong ranks, non-float dtypes, channel/bias mismatch, groups not
    dividing the channels, negative padding, or a kernel larger than the padded input.
  """
  return _conv(x, w, b, strides, padding, dilation, groups, 2, "(N, H, W, C)",
               "(kh, kw, C_in/groups, C_out)")


def conv1d(x, w, b=None, *, strides: PairOrInt = 1, padding: Padding = "valid", dilation: PairOrInt = 1,
           groups: int = 1):
  """1-D convolution (cross-correlation), NWC input (N, L, C), WIO kernel (k, C / groups, O).

  Args:
    x: input of shape (N, L, C), floating dtype.
    w: kernel of shape (k, C / groups, O), floating dtype.
    b: bias of shape (O,), or None (default).
    strides: int or (s,); default 1.
    padding: "valid" (default); "same" (TensorFlow semantics); int p or ((left, right),) zero padding.
    dilation: int or (d,); default 1.
    groups: number of channel groups; default 1.

  Returns:
    (N, L_out, O), L_out = floor((L + left + right - (k - 1) * d - 1) / s) + 1.

  Raises:
    ValueError naming the argument, as `conv2d`.
  """
  return _conv(x, w, b, strides, padding, dilation, groups, 1, "(N, L, C)", "(k, C_in/groups, C_out)")
