"""A fast CIFAR-10 network in the style of Keller Jordan's airbench: few layers, wide channels late,
BatchNorm + GELU, pooling inside each block, for short runs on accelerators."""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxcnn.layers import BatchNorm, Conv2D, Dense, GlobalMaxPool2D, MaxPool2D, resolve_activation
from jaxcnn.models.registry import check_num_classes, register


class AirbenchNet(nn.Module):
  """stem Conv2D(stem_width, 2, valid, bias) -> GELU, then per width w:
  Conv2D(w, 3, same) -> MaxPool2D(2) -> BN -> GELU -> Conv2D(w, 3, same) -> BN -> GELU,
  then global max pool -> Dense(num_classes, no bias) -> * logit_scale.

  32x32 input: 31 -> 15 -> 7 -> 3 spatially. Convolutions before BatchNorm have no bias. The small
  logit_scale (1/9 in airbench) keeps the initial logits near zero, which lets a high learning rate
  start without diverging.

  Attributes:
    num_classes: number of logits.
    stem_width: filters of the 2x2 stem convolution; default 24.
    widths: filters of the blocks; default (64, 256, 256).
    logit_scale: multiplies the logits; default 1/9.
    bn_momentum: BatchNorm momentum (Keras convention); default 0.6 (short runs want fast statistics).
    bn_epsilon: BatchNorm epsilon; default 1e-5.
    axis_name: pmap/shard_map axis for cross-device BatchNorm statistics; default None.
  """

  num_classes: int
  stem_width: int = 24
  widths: Sequence[int] = (64, 256, 256)
  logit_scale: float = 1.0 / 9.0
  bn_momentum: float = 0.6
  bn_epsilon: float = 1e-5
  axis_name: Optional[str] = None

  def __post_init__(self):
    check_num_classes(self.num_classes, "AirbenchNet")
    if not self.widths:
      raise ValueError("AirbenchNet: widths must name at least one block")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, num_classes) logits."""
    if x.ndim != 4:
      raise ValueError(f"AirbenchNet expects input of rank 4 (N, H, W, C), got shape {x.shape}")
    bn = dict(momentum=self.bn_momentum, epsilon=self.bn_epsilon, axis_name=self.axis_name)
    gelu = resolve_activation("gelu")  # exact erf GELU, as torch.nn.GELU in airbench
    x = gelu(Conv2D(self.stem_width, 2, name="stem")(x))
    for index, width in enumerate(self.widths, start=1):
      x = Conv2D(width, 3, padding="same", use_bias=False, name=f"block{index}_conv1")(x)
      x = MaxPool2D(2, name=f"block{index}_pool")(x)
      x = gelu(BatchNorm(**bn, name=f"block{index}_bn1")(x, train=train))
      x = Conv2D(width, 3, padding="same", use_bias=False, name=f"block{index}_conv2")(x)
      x = gelu(BatchNorm(**bn, name=f"block{index}_bn2")(x, train=train))
    x = GlobalMaxPool2D(name="pool")(x)
    x = Dense(self.num_classes, use_bias=False, name="head")(x)
    return x * jnp.asarray(self.logit_scale, x.dtype)


@register("airbench", input_shape=(32, 32, 3))
def airbench(num_classes: int = 10, widths: Sequence[int] = (64, 256, 256), bn_momentum: float = 0.6,
             axis_name: Optional[str] = None) -> AirbenchNet:
  """The airbench-style CIFAR network (see `AirbenchNet`); 1,972,792 parameters at the default widths.

  Args:
    num_classes: number of logits; default 10.
    widths: filters of the three blocks; default (64, 256, 256).
    bn_momentum: BatchNorm momentum (Keras convention); default 0.6.
    axis_name: pmap/shard_map axis for cross-device BatchNorm statistics; default None.
  """
  return AirbenchNet(num_classes=num_classes, widths=tuple(widths), bn_momentum=bn_momentum,
                     axis_name=axis_name)
