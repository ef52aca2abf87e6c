"""Fast convolutions, NHWC / NWC activations and HWIO / WIO kernels, with selectable lowerings.

Lowerings (chosen at trace time, see `set_conv_lowering`):
  "xla"     one `lax.conv_general_dilated` (grouped convs via `feature_group_count`). The best choice on
            GPU/TPU, whose convolution kernels are tuned.
  "im2col"  pad, take kh*kw shifted strided slices of the input, concatenate them along channels and
            multiply by the kernel reshaped to a (kh*kw*C, O) matrix with one `dot_general`. Grouped convs
            become one matmul batched over groups; depthwise convs (one input channel per group) skip the
            patch matrix and sum kh*kw elementwise products instead. For groups == 1 the gradients are
            written by hand: the weight gradient is patches^T @ dY contracted over the rows of both
            matrices in place (`_gram`), and the input gradient is dY @ kernel^T folded back onto the
            input (one pad per tap, summed: the adjoint of the slices). Autodiff of the forward computes
            the same but makes XLA copy dY into a transposed buffer first, which costs most where the
            output gradient is large and the kernel small (first layers).
  "rows"    im2col along the kernel's columns only: the kw column-shifted views of the padded input,
            side by side (N, rows, Wo, kw*C), times the kernel as a (kw*C, kh*O) matrix gives every
            padded row convolved with every kernel row at once; output row i then adds kernel row di's
            part of padded row i*sh + di*dh (kh slices, summed). Memory traffic per output pixel is
            kw*C + kh*O values instead of im2col's kh*kw*C: no more when kw*C + kh*O <= kh*kw*C (for
            3x3 kernels, O <= 2C). Dense 2-D convs only (grouped convs and conv1d take the im2col
            path); the gradients are written by hand, like im2col's: the weight gradient is
            row patches^T @ dZ, where dZ places dY's rows at each kernel row's offset, and the input
            gradient is dZ @ kernel^T folded back over the kw column taps.
  "auto"    on CPU, per convolution: "rows" for dense 2-D convs with unit row stride where it moves no
            more memory than im2col (kw*C + kh*O <= kh*kw*C), "im2col" otherwise; "xla" elsewhere.
            The default. Inside `forward_only_lowering` (programs without a backward pass: predict,
            evaluate), dense convolutions (groups == 1) resolve to "xla" on CPU too.

Why not XLA's convolution on CPU for training: it is slow for the small-channel convs of typical CNNs and
their gradients, and many times slower again inside `lax.scan`, where `jaxcnn.train.fit` runs its epochs.
A forward pass alone is another matter: XLA's CPU backend fuses a dense convolution with the
elementwise ops and pools after it (batch norm, ReLU, max pool) into one kernel, which beats the matmul
lowerings there (`forward_only_lowering`); its grouped and depthwise convolutions stay slow, so those keep
auto's choice. The matmuls im2col and "rows" reduce to are well optimised everywhere, and slices and
concatenations fuse. The measurements behind these choices are in benchmarks/README.md.

Transformations: a dense "im2col" or "rows" convolution is one JAX primitive, `jaxcnn_conv`
(`jaxcnn.ops._primitive.bilinear`), linear in the input and in the kernel. Its value lowers to the
slices and matmul above; its JVP is conv(dx, w) + conv(x, dw); its transposes are the hand-written
input and weight gradients, so reverse mode compiles to the same program as a hand-written backward pass,
and forward mode, higher derivatives, vmap (a mapped kernel, as for per-example kernels, becomes a
grouped convolution), shard_map, checkpointing, scan and export all compose. Everything else here is
plain lax code that JAX differentiates itself.

All lowerings keep the input dtype, accumulate low-precision (bfloat16/float16) inputs in float32
(`preferred_element_type`), add the bias in the accumulator dtype and cast back once. im2col's
hand-written input gradient also sums the kh*kw per-tap contributions in the accumulator dtype and rounds
once ("rows" likewise sums its kh row blocks and kw column taps in the accumulator dtype); grouped and
depthwise im2col convolutions are differentiated by autodiff, whose input gradient adds those
contributions in the input dtype (a few more bfloat16 roundings than the XLA lowering).
"""
from __future__ import annotations

import contextlib
import itertools
import os
import threading

import jax
import jax.numpy as jnp
from jax import lax

from jaxcnn.errors import ConfigError
from jaxcnn.ops import _primitive
from jaxcnn.ops._args import Padding, PairOrInt, pad_spatial, parse_conv_args

__all__ = ["conv1d", "conv2d", "conv_lowering", "forward_only_lowering", "get_conv_lowering",
           "set_conv_lowering", "resolve_conv_lowering", "CONV_LOWERINGS"]

CONV_LOWERINGS = ("auto", "xla", "im2col", "rows")


def _check_lowering(name, source: str) -> str:
  if not isinstance(name, str) or name.lower() not in CONV_LOWERINGS:
    raise ConfigError(f"{source} must be one of {CONV_LOWERINGS}, got {name!r}")
  return name.lower()


# Read once, at import; `set_conv_lowering` overrides it afterwards.
_lowering = _check_lowering(os.environ.get("JAXCNN_CONV_LOWERING", "auto"), "JAXCNN_CONV_LOWERING")


def set_conv_lowering(name: str) -> None:
  """Selects the convolution lowering for every later trace: "auto" | "xla" | "im2col" | "rows".

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
  """The selected lowering name, "auto" | "xla" | "im2col" | "rows" (initially $JAXCNN_CONV_LOWERING or
  "auto"; "auto" is resolved per convolution by `resolve_conv_lowering`)."""
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


_forward_only = threading.local()


@contextlib.contextmanager
def forward_only_lowering():
  """Context manager for tracing programs that are never differentiated (inference): inside it, "auto"
  resolves dense convolutions (groups == 1) to "xla" on CPU as well, where XLA fuses them with the
  elementwise ops and pools around them; grouped and depthwise convolutions keep auto's choice, and an
  explicitly selected lowering (`set_conv_lowering`) is used as it is.

  Thread-local (it affects only traces on the thread that entered it) and, like `conv_lowering`, it
  affects traces, not cached jits. Gradients of such a trace are correct, only not fast.
  """
  previous = getattr(_forward_only, "active", False)
  _forward_only.active = True
  try:
    yield
  finally:
    _forward_only.active = previous


def resolve_conv_lowering(x_shape, w_shape, *, strides: PairOrInt = 1, groups: int = 1) -> str:
  """The lowering a convolution of these shapes is traced with now: "xla" | "im2col" | "rows".

  Resolves "auto" (per backend and, on CPU, per shape, and inside `forward_only_lowering`); an explicit
  setting is returned as it is.

  Args:
    x_shape: input shape, (N, H, W, C) or (N, L, C).
    w_shape: kernel shape, (kh, kw, C / groups, O) or (k, C / groups, O).
    strides: int or per-spatial-axis tuple, as for `conv2d`; default 1.
    groups: channel groups; default 1.
  """
  n = len(x_shape) - 2
  strides = (strides,) * n if isinstance(strides, int) else tuple(strides)
  if n not in (1, 2) or len(w_shape) != n + 2 or len(strides) != n:
    raise ValueError(f"x_shape {tuple(x_shape)}, w_shape {tuple(w_shape)} and strides {strides} do not "
                     "describe a 1-D or 2-D convolution")
  return _resolve_lowering(tuple(x_shape), tuple(w_shape), strides, groups)


def _resolve_lowering(x_shape, w_shape, strides, groups) -> str:
  if _lowering != "auto":
    return _lowering
  if jax.default_backend() != "cpu":
    return "xla"
  if groups == 1 and getattr(_forward_only, "active", False):
    return "xla"
  return "rows" if _rows_pays(x_shape, w_shape, strides, groups) else "im2col"


def _rows_pays(x_shape, w_shape, strides, groups) -> bool:
  """Whether "rows" beats "im2col" on CPU for this convolution: dense, 2-D, unit row stride, and no more
  memory traffic. Beyond their matmuls both are memory-bound; per output pixel, im2col writes and reads
  kh*kw*C patch values (and as many input-gradient columns), "rows" kw*C + kh*O (row patches and
  partial outputs, and their gradients). Equal traffic (O = 2C for 3x3) goes to "rows", which measured
  faster there; a few-channel first layer goes to im2col (kw*C is then a poor matmul depth). The layer
  and training-step measurements are in benchmarks/README.md."""
  if groups != 1 or len(x_shape) != 4 or strides[0] != 1:
    return False
  kh, kw, c, o = w_shape
  return kh > 1 and kw * c + kh * o <= kh * kw * c


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
  xp = pad_spatial(x, pads)
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


def _gram(a, b, acc_dtype):
  """a^T @ b over every leading axis, (a.shape[-1], b.shape[-1]) in acc_dtype: the weight gradient
  patches^T @ dY.

  Both operands are flattened to (rows, K) / (rows, O) matrices (free reshapes) and contracted over their
  rows where they lie, dY on the left; the small (O, K) result is transposed. Autodiff of the forward
  matmul would have XLA copy dY into an (O, rows) transposed buffer first. Of the equivalent forms
  (patches on the left, the (N, H, W) axes contracted unflattened, row chunks summed) this one trained
  fastest (benchmarks/README.md).
  """
  a = a.reshape(-1, a.shape[-1])
  b = b.reshape(-1, b.shape[-1])
  return lax.dot_general(b, a, (((0,), (0,)), ((), ())), preferred_element_type=acc_dtype).T


def _im2col_forward(x, w, *, strides, pads, dilation, acc_dtype):
  """groups == 1: patches @ kernel matrix, (N, *out, O) in acc_dtype."""
  patches = _patches(x, w.shape[:-2], strides, pads, dilation)
  return _contract_last(patches, w.reshape(-1, w.shape[-1]), 0, acc_dtype)


def _im2col_input_grad(dy, w, x_aval, *, strides, pads, dilation, acc_dtype):
  """The transpose of `_im2col_forward` in x: dY @ kernel^T folded back onto the input."""
  dy = dy.astype(x_aval.dtype)
  cols = _contract_last(dy, w.reshape(-1, w.shape[-1]), 1, acc_dtype)
  dx = _fold_patches(cols, x_aval.shape, w.shape[:-2], strides, pads, dilation)
  return dx.astype(x_aval.dtype)


def _im2col_weight_grad(dy, x, w_aval, *, strides, pads, dilation, acc_dtype):
  """The transpose of `_im2col_forward` in w: patches^T @ dY, contracted in place (`_gram`)."""
  # The patches are rebuilt rather than saved: XLA shares them with the forward's when both are in one
  # program, and otherwise recomputing slices is cheaper than keeping taps * |x| alive.
  patches = _patches(x, w_aval.shape[:-2], strides, pads, dilation)
  dw = _gram(patches, dy.astype(x.dtype), acc_dtype)
  return dw.reshape(w_aval.shape).astype(w_aval.dtype)


def _conv_im2col(x, w, strides, pads, dilation, groups, acc_dtype):
  if groups == 1:
    return _dense_conv(x, w, "im2col", strides, pads, dilation, acc_dtype)
  return _conv_im2col_grouped(x, w, strides, pads, dilation, groups, acc_dtype)


def _conv_im2col_grouped(x, w, strides, pads, dilation, groups, acc_dtype):
  """groups > 1, differentiated by autodiff: depthwise as summed elementwise products, otherwise one
  matmul batched over groups."""
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


def _rows_geometry(x_shape, w_shape, strides, pads, dilation):
  """Sizes of the "rows" lowering: padded height and width, rows of the padded input that are read,
  output size."""
  (kh, kw), (sh, sw), (dh, dw) = w_shape[:2], strides, dilation
  hp, wp = (size + lo + hi for size, (lo, hi) in zip(x_shape[1:3], pads))
  ho, wo = (hp - (kh - 1) * dh - 1) // sh + 1, (wp - (kw - 1) * dw - 1) // sw + 1
  used = (ho - 1) * sh + (kh - 1) * dh + 1  # rows below this are never read (valid convs with stride)
  return hp, wp, used, ho, wo


def _row_patches(x, w_shape, strides, pads, dilation):
  """(N, rows used, Wo, kw * C): the kw column-shifted (and column-strided) views of the padded input,
  side by side; column-major over taps like the kernel matrix of `_rows_kernel`."""
  kw, sw, dw = w_shape[1], strides[1], dilation[1]
  _, _, used, _, wo = _rows_geometry(x.shape, w_shape, strides, pads, dilation)
  xp = pad_spatial(x, pads)
  views = [lax.slice(xp, (0, 0, j * dw, 0), (xp.shape[0], used, j * dw + (wo - 1) * sw + 1, xp.shape[3]),
                     (1, 1, sw, 1)) for j in range(kw)]
  return views[0] if kw == 1 else jnp.concatenate(views, axis=-1)


def _rows_kernel(w):
  """(kw * C, kh * O): column tap and input channel down, row tap and output channel across."""
  kh, kw, c, o = w.shape
  return jnp.transpose(w, (1, 2, 0, 3)).reshape(kw * c, kh * o)


def _rows_forward(x, w, *, strides, pads, dilation, acc_dtype):
  """2-D, groups == 1: the "rows" lowering, (N, Ho, Wo, O) in acc_dtype."""
  kh, o = w.shape[0], w.shape[-1]
  sh, dh = strides[0], dilation[0]
  _, _, _, ho, wo = _rows_geometry(x.shape, w.shape, strides, pads, dilation)
  # z[n, r, j, di * O + o] = sum over (dj, c) of xpad[n, r, j * sw + dj * dw, c] * w[di, dj, c, o]: each
  # padded row convolved with every kernel row at once; output row i adds kernel row di's part of
  # padded row i * sh + di * dh.
  z = _contract_last(_row_patches(x, w.shape, strides, pads, dilation), _rows_kernel(w), 0, acc_dtype)
  y = None
  for di in range(kh):
    start = (0, di * dh, 0, di * o)
    limit = (z.shape[0], di * dh + (ho - 1) * sh + 1, wo, (di + 1) * o)
    part = lax.slice(z, start, limit, (1, sh, 1, 1))
    y = part if y is None else y + part
  return y


def _rows_output_grad_blocks(dy, x_shape, w_shape, strides, pads, dilation):
  """dZ, the gradient of the "rows" product z: output row i's gradient lands on padded row
  i * sh + di * dh of block di (one pad per kernel row; interior padding undoes the stride)."""
  kh = w_shape[0]
  sh, dh = strides[0], dilation[0]
  _, _, used, ho, _ = _rows_geometry(x_shape, w_shape, strides, pads, dilation)
  zero = jnp.zeros((), dy.dtype)
  blocks = [lax.pad(dy, zero, ((0, 0, 0), (di * dh, used - di * dh - (ho - 1) * sh - 1, sh - 1), (0, 0, 0),
                               (0, 0, 0))) for di in range(kh)]
  # Stacked on a new axis and merged, not concatenated: the same array, but XLA fuses it better here.
  return jnp.stack(blocks, axis=-2).reshape(*blocks[0].shape[:-1], -1)


def _rows_input_grad(dy, w, x_aval, *, strides, pads, dilation, acc_dtype):
  """The transpose of `_rows_forward` in x: dZ @ kernel^T, folded back over the kw column taps."""
  kh, kw, c, _ = w.shape
  sw, dw = strides[1], dilation[1]
  hp, wp, used, _, wo = _rows_geometry(x_aval.shape, w.shape, strides, pads, dilation)
  dz = _rows_output_grad_blocks(dy.astype(x_aval.dtype), x_aval.shape, w.shape, strides, pads, dilation)
  dpatches = _contract_last(dz, _rows_kernel(w), 1, acc_dtype)  # (N, used, Wo, kw * C)
  # The adjoint of `_row_patches`: each column tap's block padded back to where it was read, summed.
  acc_zero = jnp.zeros((), dpatches.dtype)
  total = None
  for j in range(kw):
    block = lax.slice_in_dim(dpatches, j * c, (j + 1) * c, axis=3)
    columns = (j * dw, wp - j * dw - (wo - 1) * sw - 1, sw - 1)
    placed = lax.pad(block, acc_zero, ((0, 0, 0), (0, 0, 0), columns, (0, 0, 0)))
    total = placed if total is None else total + placed
  dx = lax.pad(total, acc_zero, ((0, 0, 0), (-pads[0][0], hp - used - pads[0][1], 0),
                                 (-pads[1][0], -pads[1][1], 0), (0, 0, 0)))
  return dx.astype(x_aval.dtype)


def _rows_weight_grad(dy, x, w_aval, *, strides, pads, dilation, acc_dtype):
  """The transpose of `_rows_forward` in w: row patches^T @ dZ, contracted in place (`_gram`)."""
  kh, kw, c, _ = w_aval.shape
  dz = _rows_output_grad_blocks(dy.astype(x.dtype), x.shape, w_aval.shape, strides, pads, dilation)
  # The row patches are rebuilt rather than saved, as in `_im2col_weight_grad`.
  dw_matrix = _gram(_row_patches(x, w_aval.shape, strides, pads, dilation), dz, acc_dtype)
  dw_kernel = jnp.transpose(dw_matrix.reshape(kw, c, kh, -1), (2, 0, 1, 3))
  return dw_kernel.astype(w_aval.dtype)


_DENSE = {"im2col": (_im2col_forward, _im2col_input_grad, _im2col_weight_grad),
          "rows": (_rows_forward, _rows_input_grad, _rows_weight_grad)}


def _dense_forward(x, w, *, lowering, **geometry):
  return _DENSE[lowering][0](x, w, **geometry)


def _dense_input_grad(dy, w, x_aval, *, lowering, **geometry):
  return _DENSE[lowering][1](dy, w, x_aval, **geometry)


def _dense_weight_grad(dy, x, w_aval, *, lowering, **geometry):
  return _DENSE[lowering][2](dy, x, w_aval, **geometry)


def _dense_batch(bind, args, dims, *, lowering, strides, pads, dilation, acc_dtype):
  """vmap of the dense primitive: a mapped input joins the batch axis, a mapped kernel the output
  channels (both still one primitive), and a mapped input with a mapped kernel (per-example kernels) is
  a grouped convolution with one group per example, differentiated by autodiff."""
  (x, w), (bx, bw) = args, dims
  params = dict(lowering=lowering, strides=strides, pads=pads, dilation=dilation, acc_dtype=acc_dtype)
  if bw is None:
    x = jnp.moveaxis(x, bx, 0)
    size, n = x.shape[:2]
    y = bind(x.reshape(size * n, *x.shape[2:]), w, **params)
    return y.reshape(size, n, *y.shape[1:]), 0
  w = jnp.moveaxis(w, bw, -2)  # (*window, C, B, O)
  size, c_out = w.shape[-2:]
  w = w.reshape(*w.shape[:-2], size * c_out)
  if bx is None:
    y = bind(x, w, **params)
  else:
    x = jnp.moveaxis(x, bx, -2)  # (N, *spatial, B, C)
    x = x.reshape(*x.shape[:-2], size * x.shape[-1])
    y = _conv_im2col_grouped(x, w, strides, pads, dilation, size, acc_dtype)
  return y.reshape(*y.shape[:-1], size, c_out), y.ndim - 1


_dense_primitive = _primitive.bilinear("jaxcnn_conv", _dense_forward, _dense_input_grad,
                                       _dense_weight_grad, _dense_batch)


def _dense_conv(x, w, lowering, strides, pads, dilation, acc_dtype):
  """A dense (groups == 1) convolution as one primitive whose transposes are the hand-written input and
  weight gradients of `lowering` ("im2col" or "rows"); (N, *out, O) in acc_dtype."""
  return _dense_primitive(x, w, lowering=lowering, strides=tuple(strides),
                          pads=tuple(tuple(p) for p in pads), dilation=tuple(dilation),
                          acc_dtype=jnp.dtype(acc_dtype))


def _conv_rows(x, w, strides, pads, dilation, groups, acc_dtype):
  if groups != 1 or x.ndim != 4:
    return _conv_im2col(x, w, strides, pads, dilation, groups, acc_dtype)
  return _dense_conv(x, w, "rows", strides, pads, dilation, acc_dtype)


def _conv(x, w, b, strides, padding, dilation, groups, n, layout, kernel_layout):
  strides, pads, dilation = parse_conv_args(x, w, b, strides, padding, dilation, groups, n, layout,
                                            kernel_layout)
  dtype = jnp.result_type(x, w) if b is None else jnp.result_type(x, w, b)
  x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
  acc_dtype = _accumulator_dtype(dtype)
  lower = {"xla": _conv_xla, "im2col": _conv_im2col, "rows": _conv_rows}[
      _resolve_lowering(x.shape, w.shape, strides, groups)]
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
