"""Convolutional autoencoders with a learned (Conv2DTranspose) decoder.

Reconstruction models: (N, H, W, channels) -> logits of the same shape; the loss applies the sigmoid
(sigmoid cross-entropy against the clean image), as for `conv_autoencoder`.
"""
from __future__ import annotations

from typing import Optional

from jaxcnn.layers import Conv2D, Conv2DTranspose, MaxPool2D, Sequential
from jaxcnn.models.registry import check_num_classes, register


@register("conv_transpose_autoencoder", input_shape=(28, 28, 1), task="reconstruction")
def conv_transpose_autoencoder(num_classes: Optional[int] = None, channels: int = 1) -> Sequential:
  """The keras.io convolutional denoising autoencoder ("Convolutional autoencoder for image denoising";
  28,353 parameters at 1 channel, as Keras prints):

    encoder  Conv2D(32, 3, same, relu) -> MaxPool2D(2, same) -> Conv2D(32, 3, same, relu) ->
             MaxPool2D(2, same)                                                  28 -> 14 -> 7x7x32
    decoder  Conv2DTranspose(32, 3, strides 2, same, relu) -> Conv2DTranspose(32, 3, strides 2, same,
             relu) -> Conv2D(channels, 3, same)                        7 -> 14 -> 28x28xchannels

  keras.io ends with a sigmoid; here the model returns its logits and the loss applies the sigmoid, so
  `jax.nn.sigmoid(model.apply(...))` is the Keras model's output. Any input whose sides are multiples
  of 4 comes back at its own size (e.g. 32x32x3 CIFAR images with channels=3).

  Args:
    num_classes: must be None (an autoencoder has no classes); present so that generic callers that
      pass it get a clear error.
    channels: image channels in and out; default 1.
  """
  if num_classes is not None:
    raise ValueError(f"conv_transpose_autoencoder: num_classes must be None (it reconstructs images), got "
                     f"{num_classes!r}")
  check_num_classes(channels, "conv_transpose_autoencoder (channels)")
  return Sequential([
      Conv2D(32, 3, padding="same", activation="relu"), MaxPool2D(2, padding="same"),
      Conv2D(32, 3, padding="same", activation="relu"), MaxPool2D(2, padding="same"),
      Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu"),
      Conv2DTranspose(32, 3, strides=2, padding="same", activation="relu"),
      Conv2D(channels, 3, padding="same"),
  ])
