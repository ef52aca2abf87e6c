"""MobileNet-style depthwise-separable CNNs for CIFAR- and MNIST-sized images (Howard et al., 2017).

A depthwise-separable block replaces a 3x3 convolution (9 * C * O multiply-adds per pixel) by a 3x3
depthwise convolution (9 * C) and a 1x1 pointwise one (C * O): 8-9x less work and fewer parameters
for O >= 32. Parameter counts quoted below are for num_classes=10; the registry tests check them against
`jaxcnn.summary`.
"""
from __future__ import annotations

from typing import Optional

import jax

from jaxcnn.layers import (Activation, BatchNorm, Conv2D, Dense, DepthwiseConv2D, Dropout, GlobalAvgPool2D,
                           Sequential)
from jaxcnn.models.registry import check_num_classes, register

# (pointwise filters, depthwise stride) of each block, before the width multiplier.
_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1))


def _relu6():
  return Activation(jax.nn.relu6)


@register("mobilenet_cifar", input_shape=(32, 32, 3))
def mobilenet_cifar(num_classes: int = 10, alpha: float = 1.0, bn_momentum: float = 0.9,
                    axis_name: Optional[str] = None, dropout: float = 0.2) -> Sequential:
  """MobileNet v1 shrunk to 32x32 (CIFAR) and 28x28 (MNIST) inputs (139,722 parameters at 32x32x3 and
  alpha=1, 139,146 at 28x28x1; 2,944 of them BatchNorm running statistics; ~16.5M multiply-adds per
  32x32 image):

    Conv2D(32, 3, same, no bias) -> BatchNorm -> ReLU6                               32 (or 28)
    5 depthwise-separable blocks, each
      DepthwiseConv2D(3, stride, same, no bias) -> BatchNorm -> ReLU6 ->
      Conv2D(filters, 1, no bias) -> BatchNorm -> ReLU6
    with (filters, stride) = (64, 1), (128, 2), (128, 1), (256, 2), (256, 1)         -> 8x8 (7x7)
    GlobalAvgPool2D -> Dropout -> Dense(num_classes)

  The ImageNet network's first stride-2 convolution and its last stride-2 stages are left out, since
  these images are 7x smaller; the global pooling makes it size-agnostic.
  Convolutions feed a BatchNorm and so have no bias. Stride-2 "same" depthwise convolutions pad
  bottom/right only, as Keras' MobileNet does with its explicit ZeroPadding2D.

  Args:
    num_classes: number of logits; default 10.
    alpha: width multiplier (Keras' `alpha`): every layer has round(alpha * filters) channels, at least
      8; default 1.0.
    bn_momentum: BatchNorm momentum (Keras convention, weight of the old statistics); default 0.9.
    axis_name: pmap/shard_map axis for cross-device BatchNorm statistics; default None.
    dropout: rate of the dropout before the classifier; default 0.2.
  """
  check_num_classes(num_classes, "mobilenet_cifar")
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
    raise ValueError(f"mobilenet_cifar: alpha must be a number > 0, got {alpha!r}")
  width = lambda filters: max(8, int(round(alpha * filters)))  # noqa: E731
  bn = lambda: BatchNorm(momentum=bn_momentum, axis_name=axis_name)  # noqa: E731
  layers = [Conv2D(width(32), 3, padding="same", use_bias=False), bn(), _relu6()]
  for filters, stride in _BLOCKS:
    layers += [DepthwiseConv2D(3, strides=stride, padding="same", use_bias=False), bn(), _relu6(),
               Conv2D(width(filters), 1, use_bias=False), bn(), _relu6()]
  return Sequential([*layers, GlobalAvgPool2D(), Dropout(dropout), Dense(num_classes)])
