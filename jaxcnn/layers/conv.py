"""Convolution layers: `Conv2D` on (N, H, W, C) and `Conv1D` on (N, L, C), over `jaxcnn.ops`.

Keras names and defaults: padding "valid" (as in Keras and PyTorch), `dilation_rate`, glorot-uniform
kernels, zero biases. Kernels are stored HWIO -- (kh, kw, C_in / groups, filters) -- under the parameter
name `kernel`, the bias (filters,) under `bias`, the layout Keras uses, so Keras weights copy over
unchanged. `dtype` / `param_dtype` follow flax.linen: parameters are stored in `param_dtype`; input,
kernel and bias are cast to `dtype` (default None: their promoted dtype) for the computation, which
accumulates low-precision products in float32 (see `jaxcnn.ops.conv2d`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from jaxcnn import ops
from jaxcnn.layers import _checks
from jaxcnn.layers.activations import ActivationLike, resolve_activation

Initializer = Callable[..., Any]
PairOrInt = Union[int, Sequence[int]]


def _convolve(layer, x, n: int, op, layout: str):
  """Shared body of Conv1D/Conv2D: declares `kernel`/`bias`, calls `op`, applies the activation."""
  _checks.check_input_rank(layer, x, n + 2, layout)
  kernel_size = _checks.check_tuple(layer, layer.kernel_size, n, "kernel_size")
  in_channels = x.shape[-1]
  if in_channels % layer.groups:
    raise ValueError(f"{type(layer).__name__}: input channels ({in_channels}) must be divisible by "
                     f"groups ({layer.groups})")
  kernel = layer.param("kernel", layer.kernel_init,
                       (*kernel_size, in_channels // layer.groups, layer.filters), layer.param_dtype)
  bias = layer.param("bias", layer.bias_init, (layer.filters,), layer.param_dtype) if layer.use_bias else None
  x, kernel, bias = _checks.promote(layer, x, kernel, bias)
  y = _checks.call_op(layer, op, x, kernel, bias, strides=layer.strides, padding=layer.padding,
                      dilation=layer.dilation_rate, groups=layer.groups)
  activation = resolve_activation(layer.activation, type(layer).__name__)
  return activation(y) if activation is not None else y


def _check_conv_fields(layer, n: int):
  _checks.check_positive_int(layer, layer.filters, "filters")
  _checks.check_tuple(layer, layer.kernel_size, n, "kernel_size")
  _checks.check_tuple(layer, layer.strides, n, "strides")
  _checks.check_tuple(layer, layer.dilation_rate, n, "dilation_rate")
  _checks.check_positive_int(layer, layer.groups, "groups")
  if layer.filters % layer.groups:
    raise ValueError(f"{type(layer).__name__}: filters ({layer.filters}) must be divisible by groups "
                     f"({layer.groups})")
  _checks.check_padding_mode(layer, layer.padding)
  resolve_activation(layer.activation, type(layer).__name__)


class Conv2D(nn.Module):
  """2-D convolution: (N, H, W, C) -> (N, H', W', filters), then the activation.

  Variables: params `kernel` (kh, kw, C / groups, filters) and, with use_bias, `bias` (filters,).

  Attributes:
    filters: number of output channels.
    kernel_size: int or (kh, kw).
    strides: int or (sh, sw); default 1.
    padding: "valid" (default, as in Keras and PyTorch), "same" (TensorFlow semantics: output
      ceil(H / stride)), an int p or ((top, bottom), (left, right)) (PyTorch semantics, zeros).
    dilation_rate: int or (dh, dw) kernel dilation (Keras' name; `jaxcnn.ops.conv2d`'s `dilation`);
      default 1.
    groups: channel groups; C and filters must both be divisible by it; default 1.
    use_bias: add a learned bias; default True.
    activation: a Keras activation name, a callable, or None (default: none).
    kernel_init: kernel initializer; default glorot uniform (Keras).
    bias_init: bias initializer; default zeros.
    dtype: the compute dtype (e.g. jnp.bfloat16); default None: the promoted dtype of the input and
      the parameters. The output has this dtype.
    param_dtype: dtype of the parameters; default float32.
  """

  filters: int
  kernel_size: PairOrInt
  strides: PairOrInt = 1
  padding: Any = "valid"
  dilation_rate: PairOrInt = 1
  groups: int = 1
  use_bias: bool = True
  activation: ActivationLike = None
  kernel_init: Initializer = nn.initializers.glorot_uniform()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _check_conv_fields(self, 2)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, H', W', filters). `train` is accepted and ignored."""
    del train
    return _convolve(self, x, 2, ops.conv2d, "(N, H, W, C)")


class Conv1D(nn.Module):
  """1-D convolution: (N, L, C) -> (N, L', filters), then the activation.

  Variables: params `kernel` (k, C / groups, filters) and, with use_bias, `bias` (filters,).

  Attributes:
    filters: number of output channels.
    kernel_size: int or (k,).
    strides: int or (s,); default 1.
    padding: "valid" (default), "same" (TensorFlow semantics), an int p or ((lo, hi),) (PyTorch
      semantics, zeros).
    dilation_rate: int or (d,) kernel dilation (Keras' name); default 1.
    groups: channel groups; C and filters must both be divisible by it; default 1.
    use_bias: add a learned bias; default True.
    activation: a Keras activation name, a callable, or None (default: none).
    kernel_init: kernel initializer; default glorot uniform (Keras).
    bias_init: bias initializer; default zeros.
    dtype: the compute dtype (e.g. jnp.bfloat16); default None: the promoted dtype of the input and
      the parameters. The output has this dtype.
    param_dtype: dtype of the parameters; default float32.
  """

  filters: int
  kernel_size: PairOrInt
  strides: PairOrInt = 1
  padding: Any = "valid"
  dilation_rate: PairOrInt = 1
  groups: int = 1
  use_bias: bool = True
  activation: ActivationLike = None
  kernel_init: Initializer = nn.initializers.glorot_uniform()
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    _check_conv_fields(self, 1)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, L, C) -> (N, L', filters). `train` is accepted and ignored."""
    del train
    return _convolve(self, x, 1, ops.conv1d, "(N, L, C)")
