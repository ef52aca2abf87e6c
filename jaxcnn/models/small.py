"""Small CNNs for MNIST-sized and CIFAR-sized images, built as `Sequential` stacks.

Parameter counts quoted below are for the registered input shape and num_classes=10; the registry tests
check them against `jaxcnn.summary`.
"""
from __future__ import annotations

from typing import Optional

from jaxcnn.layers import (AvgPool2D, BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, Activation,
                           Sequential, UpSampling2D)
from jaxcnn.models.registry import check_num_classes, register


@register("mnist_convnet", input_shape=(28, 28, 1))
def mnist_convnet(num_classes: int = 10, dropout: float = 0.5) -> Sequential:
  """Keras' "Simple MNIST convnet" example (34,826 parameters at 28x28x1):
  Conv2D(32, 3, relu) -> MaxPool2D(2) -> Conv2D(64, 3, relu) -> MaxPool2D(2) -> Flatten ->
  Dropout(0.5) -> Dense(num_classes); valid padding throughout, (N, 28, 28, 1) -> (N, num_classes).

  Args:
    num_classes: number of logits; default 10.
    dropout: rate of the dropout before the classifier; default 0.5.
  """
  check_num_classes(num_classes, "mnist_convnet")
  return Sequential([
      Conv2D(32, 3, activation="relu"), MaxPool2D(2),
      Conv2D(64, 3, activation="relu"), MaxPool2D(2),
      Flatten(), Dropout(dropout), Dense(num_classes),
  ])


@register("lenet5", input_shape=(28, 28, 1))
def lenet5(num_classes: int = 10, activation: str = "tanh", first_padding="same") -> Sequential:
  """Classic LeNet-5 (LeCun et al., 1998) with tanh and average pooling (61,706 parameters):
  Conv2D(6, 5) -> AvgPool2D(2) -> Conv2D(16, 5) -> AvgPool2D(2) -> Flatten (5x5x16 = 400) ->
  Dense(120) -> Dense(84) -> Dense(num_classes).

  The original network read 32x32 images (MNIST digits centred in a padded frame); here the first
  convolution pads "same" by default, so a 28x28 digit gives the same 28x28x6 maps as the original's
  valid convolution over the 32x32 frame. With first_padding="valid" it takes 32x32 inputs as in 1998.

  Args:
    num_classes: number of logits; default 10.
    activation: activation after each convolution and hidden dense layer; default "tanh".
    first_padding: padding of the first convolution; default "same" (for 28x28 inputs).
  """
  check_num_classes(num_classes, "lenet5")
  return Sequential([
      Conv2D(6, 5, padding=first_padding, activation=activation), AvgPool2D(2),
      Conv2D(16, 5, activation=activation), AvgPool2D(2),
      Flatten(), Dense(120, activation=activation), Dense(84, activation=activation), Dense(num_classes),
  ])


@register("keras_mnist_cnn", input_shape=(28, 28, 1))
def keras_mnist_cnn(num_classes: int = 10) -> Sequential:
  """A LeNet-shaped Keras MNIST CNN with ReLU, max pooling and "same" convolutions (107,786 parameters):
  Conv2D(6, 5, same, relu) -> MaxPool2D(2) -> Conv2D(16, 5, same, relu) -> MaxPool2D(2) ->
  Flatten (7x7x16 = 784) -> Dense(120, relu) -> Dense(84, relu) -> Dense(num_classes).

  Args:
    num_classes: number of logits; default 10.
  """
  check_num_classes(num_classes, "keras_mnist_cnn")
  return Sequential([
      Conv2D(6, 5, padding="same", activation="relu"), MaxPool2D(2),
      Conv2D(16, 5, padding="same", activation="relu"), MaxPool2D(2),
      Flatten(), Dense(120, activation="relu"), Dense(84, activation="relu"), Dense(num_classes),
  ])


@register("mnist_bn_cnn", input_shape=(28, 28, 1))
def mnist_bn_cnn(num_classes: int = 10, bn_momentum: float = 0.9, axis_name: Optional[str] = None,
                 dropout: float = 0.3) -> Sequential:
  """A compact MNIST CNN with BatchNorm, built to train fast on a CPU (about 9.8M multiply-adds per
  28x28 image; 197,802 trainable parameters):

    [Conv2D(32, 3) -> BatchNorm -> ReLU] x 2 -> MaxPool2D(2)      28 -> 26 -> 24 -> 12
    [Conv2D(64, 3) -> BatchNorm -> ReLU] x 2 -> MaxPool2D(2)      12 -> 10 -> 8 -> 4
    Flatten (4x4x64 = 1024) -> Dense(128) -> BatchNorm -> ReLU -> Dropout -> Dense(num_classes)

  The convolutions are "valid", which halves the work of "same" ones at this size. Layers directly
  before a BatchNorm have no bias: BatchNorm subtracts the batch mean, so such a bias gets a ~0
  gradient that Adam would turn into +-learning-rate noise.

  Args:
    num_classes: number of logits; default 10.
    bn_momentum: BatchNorm momentum (Keras convention, weight of the old statistics); default 0.9.
    axis_name: pmap/shard_map axis for cross-device BatchNorm statistics; default None.
    dropout: rate of the dropout before the classifier; default 0.3.
  """
  check_num_classes(num_classes, "mnist_bn_cnn")
  block = lambda filters: _conv_bn_relu(filters, bn_momentum, axis_name)  # noqa: E731
  return Sequential([
      *block(32), *block(32), MaxPool2D(2),
      *block(64), *block(64), MaxPool2D(2),
      *_bn_classifier(num_classes, bn_momentum, axis_name, dropout),
  ])


@register("mnist_fast_cnn", input_shape=(28, 28, 1))
def mnist_fast_cnn(num_classes: int = 10, bn_momentum: float = 0.9, axis_name: Optional[str] = None,
                   dropout: float = 0.3) -> Sequential:
  """`mnist_bn_cnn` with its first pooling moved up: 5.54M multiply-adds per image (57% of
  mnist_bn_cnn's 9.8M), so three epochs fit a 2-core CPU budget (188,522 trainable parameters).
  The default model of `experiments.mnist`:

    Conv2D(32, 3) -> BatchNorm -> ReLU -> MaxPool2D(2)              28 -> 26 -> 13
    [Conv2D(64, 3) -> BatchNorm -> ReLU] x 2 -> MaxPool2D(2)        13 -> 11 -> 9 -> 4
    Flatten (4x4x64 = 1024) -> Dense(128) -> BatchNorm -> ReLU -> Dropout -> Dense(num_classes)

  mnist_bn_cnn spends over half its work in its second 32-channel convolution at 24x24; pooling first
  removes that layer. Convolutions and the hidden Dense feed a BatchNorm and so have no bias.

  Args:
    num_classes: number of logits; default 10.
    bn_momentum: BatchNorm momentum (Keras convention, weight of the old statistics); default 0.9.
    axis_name: pmap/shard_map axis for cross-device BatchNorm statistics; default None.
    dropout: rate of the dropout before the classifier; default 0.3.
  """
  check_num_classes(num_classes, "mnist_fast_cnn")
  block = lambda filters: _conv_bn_relu(filters, bn_momentum, axis_name)  # noqa: E731
  return Sequential([
      *block(32), MaxPool2D(2),
      *block(64), *block(64), MaxPool2D(2),
      *_bn_classifier(num_classes, bn_momentum, axis_name, dropout),
  ])


def _conv_bn_relu(filters, bn_momentum, axis_name):
  """3x3 valid Conv2D (no bias: the BatchNorm after it subtracts the mean) -> BatchNorm -> ReLU."""
  return [Conv2D(filters, 3, use_bias=False), BatchNorm(momentum=bn_momentum, axis_name=axis_name),
          Activation("relu")]


def _bn_classifier(num_classes, bn_momentum, axis_name, dropout):
  """Flatten -> Dense(128, no bias) -> BatchNorm -> ReLU -> Dropout -> Dense(num_classes)."""
  return [Flatten(), Dense(128, use_bias=False), BatchNorm(momentum=bn_momentum, axis_name=axis_name),
          Activation("relu"), Dropout(dropout), Dense(num_classes)]


@register("cifar10_cnn", input_shape=(32, 32, 3))
def cifar10_cnn(num_classes: int = 10, conv_dropout: float = 0.25, dense_dropout: float = 0.5) -> Sequential:
  """The classic Keras CIFAR-10 CNN (keras examples/cifar10_cnn.py, the course listing; 1,250,858
  parameters at 32x32x3). In each block the first 3x3 convolution is "same", the second "valid":

    Conv2D(32, same) -> Conv2D(32) -> MaxPool2D(2) -> Dropout(0.25)        32 -> 32 -> 30 -> 15
    Conv2D(64, same) -> Conv2D(64) -> MaxPool2D(2) -> Dropout(0.25)        15 -> 15 -> 13 -> 6
    Flatten (6x6x64 = 2304) -> Dense(512, relu) -> Dropout(0.5) -> Dense(num_classes)

  Every convolution has ReLU. The listing ends in a softmax; this model returns logits (train it with
  the default loss, or add `Activation("softmax")` and a Keras-named loss). `cifar10_cnn_same` is the
  variant with every convolution "same".

  Args:
    num_classes: number of logits; default 10.
    conv_dropout: dropout after each pooling; default 0.25.
    dense_dropout: dropout before the classifier; default 0.5.
  """
  check_num_classes(num_classes, "cifar10_cnn")
  return _cifar10_cnn(num_classes, conv_dropout, dense_dropout, second_padding="valid")


@register("cifar10_cnn_same", input_shape=(32, 32, 3))
def cifar10_cnn_same(num_classes: int = 10, conv_dropout: float = 0.25, dense_dropout: float = 0.5) -> Sequential:
  """`cifar10_cnn` with every 3x3 convolution "same" (2,168,362 parameters at 32x32x3):
  Conv2D(32) -> Conv2D(32) -> MaxPool2D(2) -> Dropout(0.25) -> Conv2D(64) -> Conv2D(64) ->
  MaxPool2D(2) -> Dropout(0.25) -> Flatten (8x8x64) -> Dense(512, relu) -> Dropout(0.5) ->
  Dense(num_classes); every convolution has ReLU.

  Args:
    num_classes: number of logits; default 10.
    conv_dropout: dropout after each pooling; default 0.25.
    dense_dropout: dropout before the classifier; default 0.5.
  """
  check_num_classes(num_classes, "cifar10_cnn_same")
  return _cifar10_cnn(num_classes, conv_dropout, dense_dropout, second_padding="same")


def _cifar10_cnn(num_classes, conv_dropout, dense_dropout, second_padding):
  """Two [Conv2D(same) -> Conv2D(second_padding) -> MaxPool2D(2) -> Dropout] blocks, then the dense head."""
  block = lambda filters: [  # noqa: E731
      Conv2D(filters, 3, padding="same", activation="relu"),
      Conv2D(filters, 3, padding=second_padding, activation="relu"), MaxPool2D(2), Dropout(conv_dropout)]
  return Sequential([
      *block(32), *block(64),
      Flatten(), Dense(512, activation="relu"), Dropout(dense_dropout), Dense(num_classes),
  ])


@register("cifar_3conv", input_shape=(32, 32, 3))
def cifar_3conv(num_classes: int = 10, pooling: bool = False, kernel_size: int = 2) -> Sequential:
  """The textbook three-convolution CIFAR-10 network, with or without pooling:
  Conv2D(16, same, relu) [-> MaxPool2D(2)] -> Conv2D(32, same, relu) [-> MaxPool2D(2)] ->
  Conv2D(64, same, relu) [-> MaxPool2D(2)] -> Flatten -> Dense(500, relu) -> Dense(num_classes).

  The textbook's printed Keras tables use kernel_size=2: 32,784,054 parameters without pooling
  (conv 208 + 2,080 + 8,256; Flatten 32x32x64 = 65,536; Dense 32,768,500 + 5,010) and 528,054 with it
  (shapes 32x32x16 -> 16x16x16 -> 16x16x32 -> 8x8x32 -> 8x8x64 -> 4x4x64; Dense 512,500). With 3x3
  kernels the no-pooling total is 32,797,094.

  Args:
    num_classes: number of logits; default 10.
    pooling: add MaxPool2D(2) after each convolution; default False.
    kernel_size: size of the square convolution kernels; default 2 (the textbook's).
  """
  check_num_classes(num_classes, "cifar_3conv")
  layers = []
  for filters in (16, 32, 64):
    layers.append(Conv2D(filters, kernel_size, padding="same", activation="relu"))
    if pooling:
      layers.append(MaxPool2D(2))
  return Sequential([*layers, Flatten(), Dense(500, activation="relu"), Dense(num_classes)])


@register("conv_autoencoder", input_shape=(28, 28, 1), task="reconstruction")
def conv_autoencoder(num_classes: Optional[int] = None, channels: int = 1) -> Sequential:
  """The textbook convolutional (denoising) autoencoder for 28x28 images (4,385 parameters at 1 channel):

    encoder  Conv2D(16, 3, same, relu) -> MaxPool2D(2) -> Conv2D(8, 3, same, relu) -> MaxPool2D(2) ->
             Conv2D(8, 3, same, relu) -> MaxPool2D(2, same)                  28 -> 14 -> 7 -> 4x4x8
    decoder  Conv2D(8, 3, same, relu) -> UpSampling2D(2) -> Conv2D(8, 3, same, relu) -> UpSampling2D(2)
             -> Conv2D(16, 3, valid, relu) -> UpSampling2D(2) -> Conv2D(channels, 3, same)
                                                                  4 -> 8 -> 16 -> 14 -> 28x28xchannels

  (N, 28, 28, channels) -> (N, 28, 28, channels) logits: the model has no sigmoid; the loss applies it
  (sigmoid cross-entropy against the clean image).

  Args:
    num_classes: must be None (an autoencoder has no classes); present so that generic callers that
      pass it get a clear error.
    channels: image channels in and out; default 1.
  """
  if num_classes is not None:
    raise ValueError(f"conv_autoencoder: num_classes must be None (it reconstructs images), got {num_classes!r}")
  check_num_classes(channels, "conv_autoencoder (channels)")
  return Sequential([
      Conv2D(16, 3, padding="same", activation="relu"), MaxPool2D(2),
      Conv2D(8, 3, padding="same", activation="relu"), MaxPool2D(2),
      Conv2D(8, 3, padding="same", activation="relu"), MaxPool2D(2, padding="same"),
      Conv2D(8, 3, padding="same", activation="relu"), UpSampling2D(2),
      Conv2D(8, 3, padding="same", activation="relu"), UpSampling2D(2),
      Conv2D(16, 3, activation="relu"), UpSampling2D(2),
      Conv2D(channels, 3, padding="same"),
  ])
