"""Fast transposed convolutions: NHWC / NWC activations, kernels in Keras' `Conv2DTranspose` layout.

A transposed convolution is the gradient of a convolution w.r.t. its input: every input pixel adds
x[i] * w[t] (a kernel-sized window) into the output at i * stride + t * dilation, and the output is a
window of that "full" result. The kernel (kh, kw, O, C) is the HWIO kernel of the convolution being
transposed (it maps O channels to C), which is why Keras stores it with the output channels first.

Output geometry, per spatial dim (k_eff = (k - 1) * dilation + 1, full length (in - 1) * s + k_eff):
  "valid" (Keras): out = in * s + max(k_eff - s, 0), no leading crop; with output_padding p,
                   out = (in - 1) * s + k_eff + p.
  "same"  (Keras): out = in * s; with output_padding p, out = (in - 1) * s + k_eff - 2 * (k_eff // 2) + p.
                   The leading crop is TensorFlow's: total = max((in - 1) * s + k_eff - out, 0), the
                   first total // 2 positions of the full result are dropped.
  int p, (ph, pw) or ((top, bottom), (left, right)) (PyTorch `ConvTranspose2d`): `top` leading and
                   `bottom` trailing positions of the full result are dropped, output_padding (default
                   0) adds that many positions at the end: out = (in - 1) * s + k_eff - top - bottom + p.

Lowerings. With the convolution lowering "xla" (the default on GPU/TPU), one `lax.conv_general_dilated`
of the stride-dilated input (`lhs_dilation`) with the flipped kernel. On CPU (the matmul lowerings), the
sub-pixel form: output position q * s + r (phase r) only meets the kernel taps t with t * d = r + lo
(mod s), so the s_h * s_w phases are s_h * s_w small convolutions of the *undilated* input, stacked
along the output channels of one `jaxcnn.ops.conv2d` and interleaved afterwards (depth to space). It
multiplies no inserted zeros (the zero-insertion form multiplies s_h * s_w times as many), and conv2d
picks its own lowering for the stacked kernel. Dilation is kept as the conv's dilation where the stride
is 1, and folded into the phase kernels where both exceed 1. The phase kernels are the Keras kernel
multiplied by 0/1 selection matrices (exact in every dtype: each entry selects one tap or none).
"""
from __future__ import annotations

import numpy as np
import jax.numpy as jnp
from jax import lax

from jaxcnn.ops._args import (Padding, PairOrInt, check_floating, check_rank, normalize_tuple,
                              resolve_padding)
from jaxcnn.ops.conv import conv2d, resolve_conv_lowering

__all__ = ["conv1d_transpose", "conv2d_transpose"]


def _output_geometry(size, k, s, d, padding, pad, output_padding) -> tuple[int, int]:
  """(lo, out): the full result's leading positions dropped and the output length, for one dim."""
  k_eff = (k - 1) * d + 1
  if padding == "valid":
    out = size * s + max(k_eff - s, 0) if output_padding is None else (size - 1) * s + k_eff + output_padding
    return 0, out
  if padding == "same":
    out = size * s if output_padding is None else (size - 1) * s + k_eff - 2 * (k_eff // 2) + output_padding
    return max((size - 1) * s + k_eff - out, 0) // 2, out
  lo, hi = pad
  return lo, (size - 1) * s + k_eff - lo - hi + (output_padding or 0)


def _parse_transpose_args(x, w, b, strides, padding, output_padding, dilation, n: int, layout: str,
                          kernel_layout: str):
  """Validates a transposed convolution's arguments.

  Returns:
    (strides, dilation, crops): static tuples; crops[axis] = (lo, out), the leading positions of the
    full result that are dropped and the output length along that spatial dim.

  Raises:
    ValueError naming the argument: wrong rank, non-float dtype, empty spatial dims, channel or bias
    mismatch, bad strides/dilation/padding/output_padding, or padding that leaves no output.
  """
  check_rank(x, n + 2, "x", layout)
  check_rank(w, n + 2, "w", kernel_layout)
  check_floating(x, "x")
  check_floating(w, "w")
  x_shape, w_shape = tuple(jnp.shape(x)), tuple(jnp.shape(w))
  if any(d < 1 for d in x_shape[1:-1]):
    raise ValueError(f"x must have non-empty spatial dims, got shape {x_shape}")
  c_out, c_in = w_shape[-2], w_shape[-1]
  if x_shape[-1] != c_in:
    raise ValueError(f"channel mismatch: x has {x_shape[-1]} channels (shape {x_shape}) but w (shape "
                     f"{w_shape}) expects in_channels = w.shape[-1] = {c_in}")
  if b is not None:
    check_floating(b, "b")
    if tuple(jnp.shape(b)) != (c_out,):
      raise ValueError(f"b must have shape ({c_out},) to match w's output channels (w.shape[-2]), got "
                       f"{tuple(jnp.shape(b))}")
  strides = normalize_tuple(strides, n, "strides")
  dilation = normalize_tuple(dilation, n, "dilation")
  window = w_shape[:-2]
  mode = padding.lower() if isinstance(padding, str) and padding.lower() in ("valid", "same") else None
  pads = (None,) * n if mode else resolve_padding(padding, x_shape[1:-1], window, strides, dilation)
  if output_padding is None:
    extra = (None,) * n
  else:
    extra = normalize_tuple(output_padding, n, "output_padding", minimum=0)
    for axis, (p, s, d) in enumerate(zip(extra, strides, dilation)):
      if p >= max(s, d):
        raise ValueError(f"output_padding {output_padding!r} must be smaller than the stride or the "
                         f"dilation along every spatial dim (dim {axis}: {p} >= max({s}, {d}))")
  crops = []
  for axis, (size, k, s, d, pad, p) in enumerate(zip(x_shape[1:-1], window, strides, dilation, pads, extra)):
    lo, out = _output_geometry(size, k, s, d, mode, pad, p)
    if out < 1:
      raise ValueError(f"padding {padding!r} leaves no output along spatial dim {axis} (output size {out} "
                       f"from input size {size}, kernel {k}, stride {s}, dilation {d})")
    crops.append((lo, out))
  return strides, dilation, tuple(crops)


def _phase_plan(size, k, s, d, lo, out):
  """How one spatial dim of the transposed convolution becomes a convolution of the undilated input.

  Output position p = q * P + r (P phases, q < Q) reads the input padded by (pad_lo, pad_hi) (negative:
  cropped) at q + u * dil through phase kernel tap u, where select[u, r, t] = 1 names the Keras tap t.

  Returns:
    (select (K, P, k) float32 0/1, dil, pad_lo, pad_hi, P, Q).
  """
  if s == 1:
    # y[p] = sum_t x[p + lo - t * d] w[t]: a convolution with the flipped kernel, dilation d.
    first = lo - (k - 1) * d  # the input index tap u = 0 reads for output 0
    select = np.zeros((k, 1, k), np.float32)
    select[np.arange(k), 0, k - 1 - np.arange(k)] = 1.0
    taps, dil, phases, per_phase = k, d, 1, out
  else:
    # y[q * s + r] = sum_u x[q + first + u] w[t] with t * d = r + lo - (first + u) * s.
    k_eff = (k - 1) * d + 1
    first = -((k_eff - 1 - lo) // s)
    taps = (s - 1 + lo) // s - first + 1
    select = np.zeros((taps, s, k), np.float32)
    for u in range(taps):
      for r in range(s):
        offset = r + lo - (first + u) * s
        if offset % d == 0 and 0 <= offset // d < k:
          select[u, r, offset // d] = 1.0
    dil, phases, per_phase = 1, s, -(-out // s)
  pad_lo = -first
  pad_hi = per_phase + (taps - 1) * dil - size + first
  return select, dil, pad_lo, pad_hi, phases, per_phase


def _accumulator_dtype(dtype):
  return jnp.float32 if jnp.finfo(dtype).bits < 32 else dtype


def _transpose_xla(x, w, b, strides, dilation, crops, dtype):
  """One lax.conv_general_dilated of the stride-dilated input with the flipped, transposed kernel."""
  kh, kw = w.shape[:2]
  pads = []
  for size, k, s, d, (lo, out) in zip(x.shape[1:3], (kh, kw), strides, dilation, crops):
    before = (k - 1) * d - lo
    pads.append((before, out - 1 - (size - 1) * s + lo))
  kernel = jnp.transpose(w[::-1, ::-1], (0, 1, 3, 2))
  acc = _accumulator_dtype(dtype)
  y = lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=pads, lhs_dilation=strides,
                               rhs_dilation=dilation, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                               preferred_element_type=acc)
  if b is not None:
    y = y + jnp.asarray(b, acc).reshape(1, 1, 1, -1)
  return y.astype(dtype)


def _transpose_phases(x, w, b, strides, dilation, crops):
  """The sub-pixel form: one jaxcnn.ops.conv2d over the phase-stacked kernel, then depth to space."""
  kh, kw, c_out, _ = w.shape
  (sel_h, dil_h, lo_h, hi_h, ph, qh), (sel_w, dil_w, lo_w, hi_w, pw, qw) = (
      _phase_plan(size, k, s, d, lo, out)
      for size, k, s, d, (lo, out) in zip(x.shape[1:3], (kh, kw), strides, dilation, crops))
  # kernel[u, v, c, r, q, o] = w[t, z, o, c] where sel_h[u, r, t] = sel_w[v, q, z] = 1.
  kernel = jnp.einsum("urt,vqz,tzoc->uvcrqo", jnp.asarray(sel_h, w.dtype), jnp.asarray(sel_w, w.dtype), w,
                      precision=lax.Precision.HIGHEST)
  kernel = kernel.reshape(sel_h.shape[0], sel_w.shape[0], w.shape[-1], ph * pw * c_out)
  # Negative padding crops the input (a large PyTorch padding); the rest is the conv's zero padding.
  x = lax.slice(x, (0, max(-lo_h, 0), max(-lo_w, 0), 0),
                (x.shape[0], x.shape[1] - max(-hi_h, 0), x.shape[2] - max(-hi_w, 0), x.shape[3]))
  bias = None if b is None else jnp.tile(b, ph * pw)
  y = conv2d(x, kernel, bias, padding=((max(lo_h, 0), max(hi_h, 0)), (max(lo_w, 0), max(hi_w, 0))),
             dilation=(dil_h, dil_w))
  if ph * pw > 1:
    n = y.shape[0]
    y = y.reshape(n, qh, qw, ph, pw, c_out).transpose(0, 1, 3, 2, 4, 5).reshape(n, qh * ph, qw * pw, c_out)
  (_, out_h), (_, out_w) = crops
  if y.shape[1:3] != (out_h, out_w):
    y = y[:, :out_h, :out_w]
  return y


def _conv2d_transpose(x, w, b, strides, dilation, crops):
  dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
  x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
  b = None if b is None else jnp.asarray(b, dtype)
  kh, kw, c_out, c_in = w.shape
  if resolve_conv_lowering(x.shape, (kh, kw, c_in, c_out)) == "xla":
    return _transpose_xla(x, w, b, strides, dilation, crops, dtype)
  return _transpose_phases(x, w, b, strides, dilation, crops)


def conv2d_transpose(x, w, b=None, *, strides: PairOrInt = 1, padding: Padding = "valid",
                     output_padding: PairOrInt | None = None, dilation: PairOrInt = 1):
  """2-D transposed convolution (the gradient of `conv2d` w.r.t. its input), NHWC input, Keras kernel.

  full[n, i*sh + di*dh, j*sw + dj*dw, o] += x[n, i, j, c] * w[di, dj, o, c]  (summed over every input
  pixel, tap and input channel), out[n, p, q, o] = b[o] + full[n, p + top, q + left, o] (zero beyond the
  full result); see the module docstring for the output sizes and crops of each padding.

  Args:
    x: input of shape (N, H, W, C), floating dtype.
    w: kernel of shape (kh, kw, O, C): Keras' `Conv2DTranspose` layout (output channels, then input
      channels; PyTorch's ConvTranspose2d weight (C, O, kh, kw) is w.transpose(3, 2, 0, 1)).
    b: bias of shape (O,), or None (default).
    strides: int or (sh, sw); default 1.
    padding: "valid" (default) or "same" as Keras (out = H * sh for "same"); an int p, (ph, pw) or
      ((top, bottom), (left, right)) as PyTorch (positions dropped from the full result).
    output_padding: None (default) or int / (oh, ow) >= 0, each smaller than the stride or the
      dilation along its dim: positions added at the bottom/right (PyTorch), or Keras' output_padding
      with "valid"/"same".
    dilation: int or (dh, dw) kernel dilation; default 1.

  Returns:
    (N, H_out, W_out, O) in the promoted dtype of x, w (and b).

  Raises:
    ValueError naming the argument on wrong ranks, non-float dtypes, empty spatial dims, channel or bias
    mismatch, bad strides/dilation/output_padding, negative padding, or padding that leaves no output.
  """
  strides, dilation, crops = _parse_transpose_args(x, w, b, strides, padding, output_padding, dilation, 2,
                                                   "(N, H, W, C)", "(kh, kw, C_out, C_in)")
  return _conv2d_transpose(x, w, b, strides, dilation, crops)


def conv1d_transpose(x, w, b=None, *, strides: PairOrInt = 1, padding: Padding = "valid",
                     output_padding: PairOrInt | None = None, dilation: PairOrInt = 1):
  """1-D transposed convolution, NWC input (N, L, C), Keras `Conv1DTranspose` kernel (k, O, C).

  The 2-D op on a 1 x L image (see `conv2d_transpose`; the same padding and output_padding rules).

  Args:
    x: input of shape (N, L, C), floating dtype.
    w: kernel of shape (k, O, C) (PyTorch's ConvTranspose1d weight (C, O, k) is w.transpose(2, 1, 0)).
    b: bias of shape (O,), or None (default).
    strides: int or (s,); default 1.
    padding: "valid" (default) | "same" (Keras) | int p or ((left, right),) (PyTorch).
    output_padding: None (default) or int / (p,), smaller than the stride or the dilation.
    dilation: int or (d,); default 1.

  Returns:
    (N, L_out, O), L_out = (L - 1) * s + (k - 1) * d + 1 - left - right + output_padding for explicit
    padding, L * s for "same", L * s + max((k - 1) * d + 1 - s, 0) for "valid".

  Raises:
    ValueError naming the argument, as `conv2d_transpose`.
  """
  (stride,), (dil,), (crop,) = _parse_transpose_args(x, w, b, strides, padding, output_padding, dilation, 1,
                                                     "(N, L, C)", "(k, C_out, C_in)")
  y = _conv2d_transpose(jnp.asarray(x)[:, None], jnp.asarray(w)[None], b, (1, stride), (1, dil),
                        ((0, 1), crop))
  return y[:, 0]
