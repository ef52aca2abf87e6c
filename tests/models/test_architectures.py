"""The registered architectures layer by layer: textbook parameter formulas, shapes, names, bad input.

Everything here is abstract (jaxcnn.summary / jax.eval_shape): no model is run.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import pytest

import jaxcnn
from jaxcnn import models


def conv(filters, kernel, depth_in, bias=True):
  """Textbook conv count: K * F * F * D_in (+ K biases)."""
  return filters * kernel * kernel * depth_in + (filters if bias else 0)


def dense(n_in, n_out, bias=True):
  return n_in * n_out + (n_out if bias else 0)


def _summary(name, input_shape=None, **kwargs):
  input_shape = input_shape or models.spec(name).input_shape
  return jaxcnn.summary(models.get(name, **kwargs), input_shape, print_fn=None)


def test_mnist_convnet_matches_keras_example():
  result = _summary("mnist_convnet")
  assert [row.type for row in result.rows] == ["Conv2D", "MaxPool2D", "Conv2D", "MaxPool2D", "Flatten",
                                               "Dropout", "Dense"]
  assert [row.output_shape for row in result.rows] == [
      (None, 26, 26, 32), (None, 13, 13, 32), (None, 11, 11, 64), (None, 5, 5, 64), (None, 1600),
      (None, 1600), (None, 10)]
  # Keras' example prints "Total params: 34,826".
  assert result.total_params == conv(32, 3, 1) + conv(64, 3, 32) + dense(1600, 10) == 34_826


def test_lenet5_is_the_classic_network():
  result = _summary("lenet5")
  assert [row.output_shape for row in result.rows] == [
      (None, 28, 28, 6), (None, 14, 14, 6), (None, 10, 10, 16), (None, 5, 5, 16), (None, 400),
      (None, 120), (None, 84), (None, 10)]
  assert result.rows[1].type == "AvgPool2D"
  assert result.total_params == (conv(6, 5, 1) + conv(16, 5, 6) + dense(400, 120) + dense(120, 84)
                                 + dense(84, 10)) == 61_706
  # The 1998 input: a 32x32 frame and a valid first convolution give the same maps.
  original = _summary("lenet5", (32, 32, 1), first_padding="valid")
  assert original.rows[0].output_shape == (None, 28, 28, 6)
  assert original.total_params == result.total_params


def test_keras_mnist_cnn_layers():
  result = _summary("keras_mnist_cnn")
  assert [row.output_shape for row in result.rows] == [
      (None, 28, 28, 6), (None, 14, 14, 6), (None, 14, 14, 16), (None, 7, 7, 16), (None, 784),
      (None, 120), (None, 84), (None, 10)]
  assert result.total_params == (conv(6, 5, 1) + conv(16, 5, 6) + dense(784, 120) + dense(120, 84)
                                 + dense(84, 10)) == 107_786


def test_mnist_bn_cnn_is_compact_and_bias_free_before_batch_norm():
  result = _summary("mnist_bn_cnn")
  rows = result.rows
  for before, after in zip(rows, rows[1:]):
    if after.type == "BatchNorm":
      # Conv2D/Dense without bias: only the kernel's elements.
      assert before.type in ("Conv2D", "Dense")
      assert before.params in (conv(32, 3, 1, False), conv(32, 3, 32, False), conv(64, 3, 32, False),
                               conv(64, 3, 64, False), dense(1024, 128, False))
  assert result.trainable_params == (conv(32, 3, 1, False) + conv(32, 3, 32, False) + conv(64, 3, 32, False)
                                     + conv(64, 3, 64, False) + dense(1024, 128, False)
                                     + 2 * (32 + 32 + 64 + 64 + 128) + dense(128, 10))
  assert result.non_trainable_params == 2 * (32 + 32 + 64 + 64 + 128)
  assert any(row.type == "Dropout" for row in rows)
  assert result.output_shape == (None, 10)


def test_mnist_fast_cnn_pools_first_and_counts():
  result = _summary("mnist_fast_cnn")
  shapes = [row.output_shape for row in result.rows if row.type in ("Conv2D", "MaxPool2D")]
  assert shapes == [(None, 26, 26, 32), (None, 13, 13, 32), (None, 11, 11, 64), (None, 9, 9, 64),
                    (None, 4, 4, 64)]
  assert result.trainable_params == (conv(32, 3, 1, False) + conv(64, 3, 32, False) + conv(64, 3, 64, False)
                                     + dense(1024, 128, False) + 2 * (32 + 64 + 64 + 128)
                                     + dense(128, 10)) == 188_522
  assert result.non_trainable_params == 2 * (32 + 64 + 64 + 128)


def test_cifar10_cnn_is_the_keras_example_listing():
  """keras examples/cifar10_cnn.py: the second convolution of each block is "valid"."""
  result = _summary("cifar10_cnn")
  assert [row.type for row in result.rows] == [
      "Conv2D", "Conv2D", "MaxPool2D", "Dropout", "Conv2D", "Conv2D", "MaxPool2D", "Dropout", "Flatten",
      "Dense", "Dropout", "Dense"]
  assert [row.output_shape for row in result.rows if row.type in ("Conv2D", "MaxPool2D", "Flatten")] == [
      (None, 32, 32, 32), (None, 30, 30, 32), (None, 15, 15, 32), (None, 15, 15, 64), (None, 13, 13, 64),
      (None, 6, 6, 64), (None, 2304)]
  assert result.total_params == (conv(32, 3, 3) + conv(32, 3, 32) + conv(64, 3, 32) + conv(64, 3, 64)
                                 + dense(6 * 6 * 64, 512) + dense(512, 10)) == 1_250_858


def test_cifar10_cnn_same_pads_every_convolution():
  result = _summary("cifar10_cnn_same")
  assert [row.type for row in result.rows].count("Dropout") == 3
  assert [row.output_shape for row in result.rows if row.type == "Flatten"] == [(None, 8 * 8 * 64)]
  assert result.total_params == (conv(32, 3, 3) + conv(32, 3, 32) + conv(64, 3, 32) + conv(64, 3, 64)
                                 + dense(8 * 8 * 64, 512) + dense(512, 10)) == 2_168_362


@pytest.mark.parametrize("pooling, total", [(False, 32_784_054), (True, 528_054)])
def test_cifar_3conv_reproduces_the_textbook_tables(pooling, total):
  result = _summary("cifar_3conv", pooling=pooling)
  assert result.total_params == total
  if pooling:
    assert [row.output_shape for row in result.rows][:6] == [
        (None, 32, 32, 16), (None, 16, 16, 16), (None, 16, 16, 32), (None, 8, 8, 32), (None, 8, 8, 64),
        (None, 4, 4, 64)]


def test_vgg16_has_138_357_544_params_at_224_and_keras_names():
  model = models.get("vgg16", num_classes=1000, input_shape=(224, 224, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  params = variables["params"]
  assert sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)) == 138_357_544
  blocks = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
  expected = [f"block{b}_conv{i}" for b, (_, n) in enumerate(blocks, 1) for i in range(1, n + 1)]
  assert sorted(params) == sorted(expected + ["fc1", "fc2", "predictions"])
  assert params["block1_conv1"]["kernel"].shape == (3, 3, 3, 64)
  assert params["fc1"]["kernel"].shape == (7 * 7 * 512, 4096)
  assert params["predictions"]["kernel"].shape == (4096, 1000)


def test_vgg16_without_top_and_input_check():
  features = _summary("vgg16", (64, 64, 3), include_top=False)
  assert features.output_shape == (None, 2, 2, 512)
  assert features.total_params == 14_714_688  # Keras' VGG16(include_top=False) count
  pooled = _summary("vgg16", (64, 64, 3), include_top=False, pooling="avg")
  assert pooled.output_shape == (None, 512)
  model = models.get("vgg16", input_shape=(64, 64, 3))
  with pytest.raises(ValueError, match=r"VGG16 was built for input_shape \(64, 64, 3\)"):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  with pytest.raises(ValueError, match="VGG16: input_shape must be"):
    models.get("vgg16", input_shape=(16, 16, 3))
  with pytest.raises(ValueError, match="VGG16: pooling must be"):
    models.get("vgg16", include_top=False, pooling="sum")


def test_resnet18_matches_torchvision_count():
  result = _summary("resnet18", (224, 224, 3), num_classes=1000)
  # torchvision's resnet18 has 11,689,512 parameters (BatchNorm running stats are buffers).
  assert result.trainable_params == 11_689_512
  assert result.non_trainable_params == 2 * (64 + 4 * 64 + 5 * 128 + 5 * 256 + 5 * 512)
  names = [row.name for row in result.rows]
  assert names == ["conv1", "bn1", "maxpool", "layer1_0", "layer1_1", "layer2_0", "layer2_1", "layer3_0",
                   "layer3_1", "layer4_0", "layer4_1", "avgpool", "fc"]
  shapes = dict(zip(names, (row.output_shape for row in result.rows)))
  assert shapes["maxpool"] == (None, 56, 56, 64)
  assert shapes["layer4_1"] == (None, 7, 7, 512)


def test_resnet20_is_the_cifar_network():
  result = _summary("resnet20")
  # He et al. (2015), table 6: 0.27M parameters; option A shortcuts add none.
  convs = conv(16, 3, 3, False) + 6 * conv(16, 3, 16, False) + conv(32, 3, 16, False) + 5 * conv(32, 3, 32, False)
  convs += conv(64, 3, 32, False) + 5 * conv(64, 3, 64, False)
  bn = 2 * (16 + 6 * 16 + 6 * 32 + 6 * 64)
  assert result.trainable_params == convs + bn + dense(64, 10) == 269_722
  shapes = {row.name: row.output_shape for row in result.rows}
  assert shapes["layer1_2"] == (None, 32, 32, 16)
  assert shapes["layer2_0"] == (None, 16, 16, 32)
  assert shapes["layer3_2"] == (None, 8, 8, 64)


def test_conv_autoencoder_shapes():
  result = _summary("conv_autoencoder")
  shapes = [row.output_shape for row in result.rows]
  assert shapes[5] == (None, 4, 4, 8)  # the code after the third pool ("same" padding: 7 -> 4)
  assert shapes[7:] == [(None, 8, 8, 8), (None, 8, 8, 8), (None, 16, 16, 8), (None, 14, 14, 16),
                        (None, 28, 28, 16), (None, 28, 28, 1)]
  assert result.total_params == (conv(16, 3, 1) + conv(8, 3, 16) + 3 * conv(8, 3, 8) + conv(16, 3, 8)
                                 + conv(1, 3, 16)) == 4_385
  assert models.spec("conv_autoencoder").task == "reconstruction"
  with pytest.raises(ValueError, match="conv_autoencoder: num_classes must be None"):
    models.get("conv_autoencoder", num_classes=10)
  assert _summary("conv_autoencoder", (28, 28, 3), channels=3).output_shape == (None, 28, 28, 3)


def test_airbench_shapes_and_scale():
  result = _summary("airbench")
  shapes = {row.name: row.output_shape for row in result.rows}
  assert shapes["stem"] == (None, 31, 31, 24)
  assert shapes["block3_bn2"] == (None, 3, 3, 256)
  assert result.output_shape == (None, 10)
  model = models.get("airbench", widths=(8, 16, 16))
  assert _summary("airbench", widths=(8, 16, 16)).trainable_params == (
      conv(24, 2, 3) + conv(8, 3, 24, False) + conv(8, 3, 8, False) + conv(16, 3, 8, False)
      + conv(16, 3, 16, False) * 3 + 2 * 2 * (8 + 16 + 16) + dense(16, 10, False))
  assert model.logit_scale == pytest.approx(1 / 9)


def test_resnet_rejects_bad_configuration():
  with pytest.raises(ValueError, match="ResNet: shortcut must be one of projection, pad"):
    models.ResNet(stage_sizes=(1,), widths=(8,), num_classes=10, shortcut="conv")
  with pytest.raises(ValueError, match="ResNet: stage_sizes"):
    models.ResNet(stage_sizes=(1, 1), widths=(8,), num_classes=10)
  model = models.get("resnet20")
  with pytest.raises(ValueError, match="ResNet expects input of rank 4"):
    jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((32, 32, 3), jnp.float32))
