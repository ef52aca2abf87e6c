"""Residual networks (He et al., 2015): ImageNet ResNet-18 and CIFAR ResNet-20, from basic blocks.

Layer names follow torchvision where it has them (conv1, bn1, layer{s}_{b}/conv1, ..., fc). BatchNorm
defaults are PyTorch's (momentum 0.9 in the Keras convention used here, epsilon 1e-5), so trained torch
weights behave the same once copied.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxcnn.layers import BatchNorm, Conv2D, Dense, GlobalAvgPool2D, MaxPool2D
from jaxcnn.models.registry import check_num_classes, register

_SHORTCUTS = ("projection", "pad")
_STEMS = ("imagenet", "cifar")


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with BatchNorm and a residual connection: (N, H, W, C) -> (N, H/s, W/s, filters).

  y = relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); conv1 carries the stride. When the shape
  changes, the shortcut is either a 1x1 strided convolution + BatchNorm ("projection", ImageNet ResNets,
  option B of the paper) or x subsampled by the stride with zero channels appended ("pad", the CIFAR
  ResNets' parameter-free option A). Convolutions before BatchNorm have no bias.

  Attributes:
    filters: output channels.
    strides: stride of the first convolution and of the shortcut; default 1.
    shortcut: "projection" (default) or "pad".
    bn_momentum: BatchNorm momentum (Keras convention); default 0.9.
    bn_epsilon: BatchNorm epsilon; default 1e-5.
    axis_name: pmap/shard_map axis for cross-device BatchNorm statistics; default None.
  """

  filters: int
  strides: int = 1
  shortcut: str = "projection"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: Optional[str] = None

  def _bn(self, name):
    return BatchNorm(momentum=self.bn_momentum, epsilon=self.bn_epsilon, axis_name=self.axis_name, name=name)

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, ceil(H / strides), ceil(W / strides), filters)."""
    # Padding 1 (PyTorch semantics) rather than "same": for stride 2 TensorFlow's "same" pads only
    # bottom/right, which would shift every feature map relative to torchvision's ResNets.
    y = Conv2D(self.filters, 3, strides=self.strides, padding=1, use_bias=False, name="conv1")(x)
    y = nn.relu(self._bn("bn1")(y, train=train))
    y = Conv2D(self.filters, 3, padding=1, use_bias=False, name="conv2")(y)
    y = self._bn("bn2")(y, train=train)
    residual = x
    if self.strides != 1 or x.shape[-1] != self.filters:
      if self.shortcut == "projection":
        residual = Conv2D(self.filters, 1, strides=self.strides, use_bias=False, name="downsample_conv")(x)
        residual = self._bn("downsample_bn")(residual, train=train)
      elif self.shortcut == "pad":
        extra = self.filters - x.shape[-1]
        if extra < 0:
          raise ValueError(f"BasicBlock: the 'pad' shortcut cannot reduce channels ({x.shape[-1]} -> "
                           f"{self.filters})")
        residual = x[:, ::self.strides, ::self.strides, :]
        residual = jnp.pad(residual, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
      else:
        raise ValueError(f"BasicBlock: shortcut must be one of {', '.join(_SHORTCUTS)}, got {self.shortcut!r}")
    return nn.relu(y + residual)


class ResNet(nn.Module):
  """A ResNet of basic blocks: stem -> stages -> global average pool -> Dense(num_classes) logits.

  Stems: "imagenet" = Conv2D(widths[0], 7, stride 2, pad 3) -> BN -> ReLU -> MaxPool2D(3, stride 2,
  pad 1); "cifar" = Conv2D(widths[0], 3, pad 1) -> BN -> ReLU. Stage s has `stage_sizes[s]` blocks of
  `widths[s]` filters; every stage but the first starts with stride 2. (N, H, W, C) -> (N, num_classes).

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    widths: filters per stage, e.g. (64, 128, 256, 512).
    num_classes: number of logits.
    stem: "imagenet" or "cifar".
    shortcut: the blocks' shortcut, "projection" or "pad".
    bn_momentum: BatchNorm momentum (Keras convention); default 0.9 (PyTorch's 0.1).
    bn_epsilon: BatchNorm epsilon; default 1e-5 (PyTorch's).
    axis_name: pmap/shard_map axis for cross-device BatchNorm statistics; default None.
  """

  stage_sizes: Sequence[int]
  widths: Sequence[int]
  num_classes: int
  stem: str = "imagenet"
  shortcut: str = "projection"
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  axis_name: Optional[str] = None

  def __post_init__(self):
    check_num_classes(self.num_classes, "ResNet")
    if len(self.stage_sizes) != len(self.widths) or not self.stage_sizes:
      raise ValueError(f"ResNet: stage_sizes {tuple(self.stage_sizes)} and widths {tuple(self.widths)} "
                       "must be non-empty and of the same length")
    if self.stem not in _STEMS:
      raise ValueError(f"ResNet: stem must be one of {', '.join(_STEMS)}, got {self.stem!r}")
    if self.shortcut not in _SHORTCUTS:
      raise ValueError(f"ResNet: shortcut must be one of {', '.join(_SHORTCUTS)}, got {self.shortcut!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, num_classes) logits."""
    if x.ndim != 4:
      raise ValueError(f"ResNet expects input of rank 4 (N, H, W, C), got shape {x.shape}")
    bn = dict(momentum=self.bn_momentum, epsilon=self.bn_epsilon, axis_name=self.axis_name)
    if self.stem == "imagenet":
      x = Conv2D(self.widths[0], 7, strides=2, padding=3, use_bias=False, name="conv1")(x)
      x = nn.relu(BatchNorm(**bn, name="bn1")(x, train=train))
      x = MaxPool2D(3, strides=2, padding=1, name="maxpool")(x)
    else:
      x = Conv2D(self.widths[0], 3, padding=1, use_bias=False, name="conv1")(x)
      x = nn.relu(BatchNorm(**bn, name="bn1")(x, train=train))
    for stage, (blocks, filters) in enumerate(zip(self.stage_sizes, self.widths)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(filters, strides=strides, shortcut=self.shortcut, bn_momentum=self.bn_momentum,
                       bn_epsilon=self.bn_epsilon, axis_name=self.axis_name,
                       name=f"layer{stage + 1}_{block}")(x, train=train)
    x = GlobalAvgPool2D(name="avgpool")(x)
    return Dense(self.num_classes, name="fc")(x)


@register("resnet18", input_shape=(32, 32, 3))
def resnet18(num_classes: int = 10, bn_momentum: float = 0.9, axis_name: Optional[str] = None) -> ResNet:
  """ImageNet ResNet-18 (torchvision's layout): 11,689,512 trainable parameters with 1000 classes
  (plus 9,600 BatchNorm statistics). Built for 224x224 images; any input >= 32x32 works.

  Args:
    num_classes: number of logits; default 10 (1000 for ImageNet).
    bn_momentum: BatchNorm momentum (Keras convention); default 0.9.
    axis_name: pmap/shard_map axis for cross-device BatchNorm statistics; default None.
  """
  return ResNet(stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes=num_classes,
                stem="imagenet", shortcut="projection", bn_momentum=bn_momentum, axis_name=axis_name)


@register("resnet20", input_shape=(32, 32, 3))
def resnet20(num_classes: int = 10, bn_momentum: float = 0.9, axis_name: Optional[str] = None) -> ResNet:
  """CIFAR ResNet-20 (the paper's section 4.2, n = 3): a 3x3 stem of 16 filters, three stages of three
  blocks with 16/32/64 filters, parameter-free "pad" shortcuts; 269,722 trainable parameters at
  10 classes (the paper's "0.27M"). (N, 32, 32, 3) -> (N, num_classes).

  Args:
    num_classes: number of logits; default 10.
    bn_momentum: BatchNorm momentum (Keras convention); default 0.9.
    axis_name: pmap/shard_map axis for cross-device BatchNorm statistics; default None.
  """
  return ResNet(stage_sizes=(3, 3, 3), widths=(16, 32, 64), num_classes=num_classes, stem="cifar",
                shortcut="pad", bn_momentum=bn_momentum, axis_name=axis_name)
