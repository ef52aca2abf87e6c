"""VGG16 (Simonyan & Zisserman, 2014) with the layer names of Keras' `keras.applications.VGG16`."""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn

from jaxcnn.layers import Conv2D, Dense, Dropout, Flatten, GlobalAvgPool2D, GlobalMaxPool2D, MaxPool2D
from jaxcnn.models.registry import check_num_classes, register

# (filters, convolutions) per block: the paper's configuration D.
_VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
_POOLINGS = (None, "avg", "max")


class VGG16(nn.Module):
  """VGG16: five blocks of 3x3 "same" ReLU convolutions, each closed by a 2x2 max pool, then (with
  include_top) Flatten -> fc1 (4096, relu) -> fc2 (4096, relu) -> predictions (num_classes logits).

  Layer names follow Keras: block{b}_conv{i} (the paper's conv{b}_{i}), block{b}_pool, flatten, fc1, fc2,
  predictions -- so Keras' weights map one to one. 138,357,544 parameters at 224x224x3 with 1000
  classes. (N, H, W, 3) -> (N, num_classes) logits, or without the top the (N, H/32, W/32, 512) features
  (pooled to (N, 512) with pooling="avg"/"max").

  Attributes:
    num_classes: number of logits; default 1000.
    include_top: add the three dense layers; default True.
    input_shape: (H, W, C) the model checks its inputs against, or None to accept any size; with the
      top, the dense sizes depend on it (224x224 for ImageNet); default None.
    pooling: without the top: None (default; 4-D features), "avg" or "max" (global pooling).
    dropout: dropout after fc1 and fc2 (the paper uses 0.5; Keras' VGG16 has none); default 0.0.
  """

  num_classes: int = 1000
  include_top: bool = True
  input_shape: Optional[Sequence[int]] = None
  pooling: Optional[str] = None
  dropout: float = 0.0

  def __post_init__(self):
    check_num_classes(self.num_classes, "VGG16")
    if self.pooling not in _POOLINGS:
      raise ValueError(f"VGG16: pooling must be None, 'avg' or 'max', got {self.pooling!r}")
    if self.input_shape is not None:
      shape = tuple(self.input_shape)
      if len(shape) != 3 or any(not isinstance(d, int) or d < 32 for d in shape[:2]):
        raise ValueError(f"VGG16: input_shape must be (H, W, C) with H, W >= 32 (five 2x2 poolings), "
                         f"got {self.input_shape!r}")
    super().__post_init__()

  @nn.compact
  def __call__(self, x, train: bool = False):
    """x: (N, H, W, C) -> (N, num_classes) logits (see the class docstring for include_top=False)."""
    if x.ndim != 4:
      raise ValueError(f"VGG16 expects input of rank 4 (N, H, W, C), got shape {x.shape}")
    if self.input_shape is not None and tuple(x.shape[1:]) != tuple(self.input_shape):
      raise ValueError(f"VGG16 was built for input_shape {tuple(self.input_shape)}, got input of shape "
                       f"{x.shape}")
    for block, (filters, convs) in enumerate(_VGG16_BLOCKS, start=1):
      for index in range(1, convs + 1):
        x = Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv{index}")(x)
      x = MaxPool2D(2, name=f"block{block}_pool")(x)
    if self.include_top:
      x = Flatten(name="flatten")(x)
      x = Dense(4096, activation="relu", name="fc1")(x)
      if self.dropout:
        x = Dropout(self.dropout, name="drop1")(x, train=train)
      x = Dense(4096, activation="relu", name="fc2")(x)
      if self.dropout:
        x = Dropout(self.dropout, name="drop2")(x, train=train)
      return Dense(self.num_classes, name="predictions")(x)
    if self.pooling == "avg":
      return GlobalAvgPool2D(name="global_avg_pool")(x)
    if self.pooling == "max":
      return GlobalMaxPool2D(name="global_max_pool")(x)
    return x


@register("vgg16", input_shape=(32, 32, 3))
def vgg16(num_classes: int = 10, include_top: bool = True, input_shape: Optional[Sequence[int]] = None,
          pooling: Optional[str] = None, dropout: float = 0.0) -> VGG16:
  """VGG16 (see `VGG16`); registered with a 32x32x3 input, the smallest that survives its five poolings.

  Args:
    num_classes: number of logits; default 10 (1000 for ImageNet).
    include_top: add fc1, fc2 and predictions; default True.
    input_shape: (H, W, C) to check inputs against, e.g. (224, 224, 3); default None (any size >= 32).
    pooling: without the top: None, "avg" or "max"; default None.
    dropout: dropout after fc1 and fc2; default 0.0 (as Keras).
  """
  return VGG16(num_classes=num_classes, include_top=include_top,
               input_shape=None if input_shape is None else tuple(input_shape), pooling=pooling,
               dropout=dropout)
