"""The rest of Keras' convolution family: `Conv2DTranspose`, `Conv1DTranspose`, `DepthwiseConv2D`,
`SeparableConv2D`, over `jaxcnn.ops`.

Keras names, defaults and variable layouts, so Keras weights copy over unchanged:
  Conv2DTranspose   `kernel` (kh, kw, filters, C), `bias` (filters,)
  Conv1DTranspose   `kernel` (k, filters, C), `bias` (filters,)
  DepthwiseConv2D   `depthwise_kernel` (kh, kw, C, depth_multiplier), `bias` (C * depth_multiplier,)
  SeparableConv2D   `depthwise_kernel` (kh, kw, C, depth_multiplier),
                    `pointwise_kernel` (1, 1, C * depth_multiplier, filters), `bias` (filters,)
Initializers are Keras' (glorot uniform kernels, zero biases). `dtype` is the compute dtype (None: the
promoted dtype of the input and the parameters, as flax.linen), `param_dtype` the parameters' dtype.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from jaxcnn import ops
from jaxcnn.layers import _checks
from jaxcnn.layers.activations import ActivationLike, resolve_activation
from jaxcnn.ops._args import check_floating

Initializer = Callable[..., Any]
PairOrInt = Union[int, Sequence[int]]


def _promote(layer, x, *params):
  """x and the parameters cast to the layer's compute dtype; non-float x is refused first."""
  _checks.call_op(layer, check_floating, x, "x")
  return nn.dtypes.promote_dtype(x, *params, dtype=layer.dtype)


def _activate(layer, y):
  activation = resolve_activation(layer.activation, type(layer).__name__)
  return activation(y) if activation is not None else y


def _check_transpose_fields(layer, n: int):
  _checks.check_positive_int(layer, layer.filters, "filters")
  _checks.check_tuple(layer, layer.kernel_size, n, "kernel_size")
  strides = _checks.check_tuple(layer, layer.strides, n, "strides")
  dilation = _checks.check_tuple(layer, layer.dilation_rate, n, "dilation_rate")
  if layer.output_padding is not None:
    extra = _checks.check_tuple(layer, layer.output_padding, n, "output_padding", minimum=0)
    if any(p >= max(s, d) for p, s, d in zip(extra, strides, dilation)):
      raise ValueError(f"{type(layer).__name__}: output_padding {layer.output_padding!r} must be smaller "
                       f"than strides {layer.strides!r} or dilation_rate {layer.dilation_rate!r} along "
                       "every dim")
  _checks.check_padding_mode(layer, layer.padding)
  resolve_activation(layer.activation, type(layer).__name__)


def _transpose(layer, x, n: int, op, layout: str):
  _checks.check_input_rank(layer, x, n + 2, layout)
  kernel_size = _checks.check_tuple(layer, layer.kernel_size, n, "kernel_size")
  kernel = layer.param("kernel", layer.kernel_init, (*kernel_size, layer.filters, x.shape[-1]),
                       layer.param_dtype)
  bias = layer.param("bias", layer.bias_init, (layer.filters,), layer.param_dtype) if layer.use_bias else None
  x, kernel, bias = _promote(layer, x, kernel, bias)
  y = _checks.call_op(layer, op, x, kernel, bias, strides=layer.strides, padding=layer.padding,
                      output_padding=layer.output_padding, dilation=layer.dilation_rate)
  return _activate(layer, y)


class Conv2DTranspose(nn.Module):
  """2-D transposed convolution ("deconvolution"): (N, H, W, C) -> (N, H', W', filters), then the
  activation. The gradient of a convolution w.r.t. its input; see `jaxcnn.ops.conv2d_transpose`.

  Output size per spatial dim (k_eff = (k - 1) * dilation_rate + 1): "valid" H * s + max(k_eff - s, 0);
  "same" H * s; with output_padding p, (H - 1) * s + k_eff + p ("valid") or
  (H - 1) * s + k_eff - 2 * (k_eff // 2) + p ("same"), as Keras; an int or pairs pad as PyTorch's
  ConvTranspose2d: (H - 1) * s + k_eff - top - bottom + p.

  Variables: params `kernel` (kh, kw, filters, C) (Keras' layout) and, with use_bias, `bias` (filters,).

  Attributes:
    filters: number of output channels.
    kernel_size: int or (kh, kw).
    strides: int or (sh, sw); default 1.
    padding: "valid" (default) or "same" (Keras), or an int p, (ph, pw) or ((top, bottom), (left, right))
      (PyTorch).
    output_padding: None (default) or int / (oh, ow), each smaller than the stride or the dilation.
    dilation_rate: int or (dh, dw); default 1.
    activation: a Keras activation name, a callable, or None (default: none).
    use_bias: add a learned bias; default True.
    kernel_init: kernel initializer; default glorot uniform (Keras).
    bias_init: bias initializer; default zeros.
    dtype: compute dtype; default None (the promoted dtype of the input and the parameters).
    param_dtype: dtype of the parameters; default float32.
  """

  filters: int
  kernel_size: PairOrInt
  strides: PairOrInt = 1
  padding: Any = "valid"
  output_padding: Optional[PairOrInt] = None
  dilation_rate: PairOrInt = 1
  activation: ActivationLike = None
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.glorot_uniform()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _check_transpose_fields(self, 2)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, H', W', filters). `train` is accepted and ignored."""
    del train
    return _transpose(self, x, 2, ops.conv2d_transpose, "(N, H, W, C)")


class Conv1DTranspose(nn.Module):
  """1-D transposed convolution: (N, L, C) -> (N, L', filters), then the activation; the output sizes
  of `Conv2DTranspose` along one dim.

  Variables: params `kernel` (k, filters, C) (Keras' layout) and, with use_bias, `bias` (filters,).

  Attributes:
    filters: number of output channels.
    kernel_size: int or (k,).
    strides: int or (s,); default 1.
    padding: "valid" (default) or "same" (Keras), or an int p or ((left, right),) (PyTorch).
    output_padding: None (default) or int / (p,), smaller than the stride or the dilation.
    dilation_rate: int or (d,); default 1.
    activation: a Keras activation name, a callable, or None (default: none).
    use_bias: add a learned bias; default True.
    kernel_init: kernel initializer; default glorot uniform (Keras).
    bias_init: bias initializer; default zeros.
    dtype: compute dtype; default None (the promoted dtype of the input and the parameters).
    param_dtype: dtype of the parameters; default float32.
  """

  filters: int
  kernel_size: PairOrInt
  strides: PairOrInt = 1
  padding: Any = "valid"
  output_padding: Optional[PairOrInt] = None
  dilation_rate: PairOrInt = 1
  activation: ActivationLike = None
  use_bias: bool = True
  kernel_init: Initializer = nn.initializers.glorot_uniform()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _check_transpose_fields(self, 1)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, L, C) -> (N, L', filters). `train` is accepted and ignored."""
    del train
    return _transpose(self, x, 1, ops.conv1d_transpose, "(N, L, C)")


def _check_depthwise_fields(layer):
  _checks.check_tuple(layer, layer.kernel_size, 2, "kernel_size")
  _checks.check_tuple(layer, layer.strides, 2, "strides")
  _checks.check_tuple(layer, layer.dilation_rate, 2, "dilation_rate")
  _checks.check_positive_int(layer, layer.depth_multiplier, "depth_multiplier")
  _checks.check_padding_mode(layer, layer.padding)
  resolve_activation(layer.activation, type(layer).__name__)


def _depthwise_kernel(layer, x):
  _checks.check_input_rank(layer, x, 4, "(N, H, W, C)")
  kernel_size = _checks.check_tuple(layer, layer.kernel_size, 2, "kernel_size")
  return layer.param("depthwise_kernel", layer.depthwise_init,
                     (*kernel_size, x.shape[-1], layer.depth_multiplier), layer.param_dtype)


class DepthwiseConv2D(nn.Module):
  """Depthwise 2-D convolution: each of the C input channels convolved with its own depth_multiplier
  filters, (N, H, W, C) -> (N, H', W', C * depth_multiplier), then the activation. Output channel
  c * depth_multiplier + m is channel c through filter m (Keras / TensorFlow order).

  Variables: params `depthwise_kernel` (kh, kw, C, depth_multiplier) and, with use_bias, `bias`
  (C * depth_multiplier,).

  Attributes:
    kernel_size: int or (kh, kw).
    strides: int or (sh, sw); default 1.
    padding: "valid" (default), "same" (TensorFlow semantics), an int p or ((top, bottom),
      (left, right)) (PyTorch semantics, zeros).
    depth_multiplier: filters per input channel; default 1.
    dilation_rate: int or (dh, dw); default 1.
    activation: a Keras activation name, a callable, or None (default: none).
    use_bias: add a learned bias; default True.
    depthwise_init: kernel initializer; default glorot uniform (Keras).
    bias_init: bias initializer; default zeros.
    dtype: compute dtype; default None (the promoted dtype of the input and the parameters).
    param_dtype: dtype of the parameters; default float32.
  """

  kernel_size: PairOrInt
  strides: PairOrInt = 1
  padding: Any = "valid"
  depth_multiplier: int = 1
  dilation_rate: PairOrInt = 1
  activation: ActivationLike = None
  use_bias: bool = True
  depthwise_init: Initializer = nn.initializers.glorot_uniform()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _check_depthwise_fields(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, H', W', C * depth_multiplier). `train` is accepted and ignored."""
    del train
    kernel = _depthwise_kernel(self, x)
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (x.shape[-1] * self.depth_multiplier,), self.param_dtype)
    x, kernel, bias = _promote(self, x, kernel, bias)
    y = _checks.call_op(self, ops.depthwise_conv2d, x, kernel, bias, strides=self.strides,
                        padding=self.padding, dilation=self.dilation_rate)
    return _activate(self, y)


class SeparableConv2D(nn.Module):
  """Depthwise-separable 2-D convolution, as Keras: a depthwise convolution (depth_multiplier filters per
  channel, no bias) followed by a 1x1 pointwise convolution to `filters` channels, plus the bias, then
  the activation: (N, H, W, C) -> (N, H', W', filters). Strides, padding and dilation apply to the
  depthwise step.

  Variables: params `depthwise_kernel` (kh, kw, C, depth_multiplier), `pointwise_kernel`
  (1, 1, C * depth_multiplier, filters) and, with use_bias, `bias` (filters,).

  Attributes:
    filters: number of output channels.
    kernel_size: int or (kh, kw) of the depthwise step.
    strides: int or (sh, sw); default 1.
    padding: "valid" (default), "same" (TensorFlow semantics), an int p or ((top, bottom),
      (left, right)) (PyTorch semantics, zeros).
    depth_multiplier: depthwise filters per input channel; default 1.
    dilation_rate: int or (dh, dw); default 1.
    activation: a Keras activation name, a callable, or None (default: none).
    use_bias: add a learned bias after the pointwise step; default True.
    depthwise_init: depthwise kernel initializer; default glorot uniform (Keras).
    pointwise_init: pointwise kernel initializer; default glorot uniform (Keras).
    bias_init: bias initializer; default zeros.
    dtype: compute dtype; default None (the promoted dtype of the input and the parameters).
    param_dtype: dtype of the parameters; default float32.
  """

  filters: int
  kernel_size: PairOrInt
  strides: PairOrInt = 1
  padding: Any = "valid"
  depth_multiplier: int = 1
  dilation_rate: PairOrInt = 1
  activation: ActivationLike = None
  use_bias: bool = True
  depthwise_init: Initializer = nn.initializers.glorot_uniform()
  pointwise_init: Initializer = nn.initializers.glorot_uniform()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _checks.check_positive_int(self, self.filters, "filters")
    _check_depthwise_fields(self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, H', W', filters). `train` is accepted and ignored."""
    del train
    depthwise = _depthwise_kernel(self, x)
    pointwise = self.param("pointwise_kernel", self.pointwise_init,
                           (1, 1, x.shape[-1] * self.depth_multiplier, self.filters), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.filters,), self.param_dtype) if self.use_bias else None
    x, depthwise, pointwise, bias = _promote(self, x, depthwise, pointwise, bias)
    y = _checks.call_op(self, ops.depthwise_conv2d, x, depthwise, strides=self.strides, padding=self.padding,
                        dilation=self.dilation_rate)
    y = _checks.call_op(self, ops.conv2d, y, pointwise, bias)
    return _activate(self, y)
