"""mobilenet_cifar and conv_transpose_autoencoder layer by layer: parameter formulas, shapes at MNIST and
CIFAR sizes, task metadata, bad arguments. Abstract (jaxcnn.summary / jax.eval_shape): nothing is run;
the registry tests (test_registry.py) train one step of every registered model."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jaxcnn
from jaxcnn import models


def _summary(name, input_shape, **kwargs):
  return jaxcnn.summary(models.get(name, **kwargs), input_shape, print_fn=None)


def test_mobilenet_cifar_blocks_and_parameter_count():
  result = _summary("mobilenet_cifar", (32, 32, 3))
  types = [row.type for row in result.rows]
  assert types[:3] == ["Conv2D", "BatchNorm", "Activation"]
  assert types[3:9] == ["DepthwiseConv2D", "BatchNorm", "Activation", "Conv2D", "BatchNorm", "Activation"]
  assert types[-3:] == ["GlobalAvgPool2D", "Dropout", "Dense"]
  assert types.count("DepthwiseConv2D") == 5
  spatial = [row.output_shape[1] for row in result.rows if row.type == "DepthwiseConv2D"]
  assert spatial == [32, 16, 16, 8, 8]
  # 3x3x3x32 stem; per block 3x3xC depthwise + CxF pointwise (no biases); 4 BatchNorm values per channel.
  channels = [32, 64, 128, 128, 256, 256]
  convs = 27 * 32 + sum(9 * c + c * f for c, f in zip(channels, channels[1:]))
  bn = 4 * (32 + sum(c + f for c, f in zip(channels, channels[1:])))
  assert result.total_params == convs + bn + 256 * 10 + 10 == 139_722
  assert result.non_trainable_params == bn // 2 == 2_944


def test_mobilenet_cifar_on_mnist_and_width_multiplier():
  mnist = _summary("mobilenet_cifar", (28, 28, 1))
  assert mnist.output_shape == (None, 10)
  assert mnist.total_params == 139_722 - 2 * 9 * 32 == 139_146  # the stem sees 1 channel instead of 3
  assert [row.output_shape[1] for row in mnist.rows if row.type == "DepthwiseConv2D"] == [28, 14, 14, 7, 7]
  half = _summary("mobilenet_cifar", (32, 32, 3), alpha=0.5, num_classes=100)
  widths = [row.output_shape[-1] for row in half.rows if row.type == "Conv2D"]
  assert widths == [16, 32, 64, 64, 128, 128]
  assert half.output_shape == (None, 100)


def test_conv_transpose_autoencoder_is_the_keras_io_recipe():
  result = _summary("conv_transpose_autoencoder", (28, 28, 1))
  assert [(row.type, row.output_shape) for row in result.rows] == [
      ("Conv2D", (None, 28, 28, 32)), ("MaxPool2D", (None, 14, 14, 32)), ("Conv2D", (None, 14, 14, 32)),
      ("MaxPool2D", (None, 7, 7, 32)), ("Conv2DTranspose", (None, 14, 14, 32)),
      ("Conv2DTranspose", (None, 28, 28, 32)), ("Conv2D", (None, 28, 28, 1))]
  # keras.io prints "Total params: 28,353": 320 + 9,248 + 9,248 + 9,248 + 289.
  assert result.total_params == 28_353
  spec = models.spec("conv_transpose_autoencoder")
  assert spec.task == models.spec("conv_autoencoder").task == "reconstruction"
  assert spec.input_shape == models.spec("conv_autoencoder").input_shape == (28, 28, 1)
  # Outputs are logits (the loss applies the sigmoid), so the last layer has no activation.
  assert models.get("conv_transpose_autoencoder").layers[-1].activation is None


def test_conv_transpose_autoencoder_on_cifar_sized_images():
  model = models.get("conv_transpose_autoencoder", channels=3)
  out = jax.eval_shape(model.init_with_output, jax.random.key(0), jax.ShapeDtypeStruct((2, 32, 32, 3),
                                                                                      jnp.float32))[0]
  assert out.shape == (2, 32, 32, 3)


@pytest.mark.parametrize("name, kwargs, message", [
    ("conv_transpose_autoencoder", dict(num_classes=10), "num_classes must be None"),
    ("conv_transpose_autoencoder", dict(channels=0), r"conv_transpose_autoencoder \(channels\): .* >= 1"),
    ("mobilenet_cifar", dict(num_classes=0), "mobilenet_cifar: num_classes must be an int >= 1"),
    ("mobilenet_cifar", dict(alpha=0.0), "mobilenet_cifar: alpha must be a number > 0"),
])
def test_bad_arguments(name, kwargs, message):
  with pytest.raises(ValueError, match=message):
    models.get(name, **kwargs)
