"""jaxcnn.summary: Keras-style rows and totals, textbook counts, abstract evaluation, bad input."""
from __future__ import annotations

import flax.linen as nn
import jax
import pytest

import jaxcnn
from jaxcnn.inspect import ModelSummary
from jaxcnn.layers import BatchNorm, Conv2D, Dense, Dropout, Flatten, MaxPool2D, Sequential


def conv_params(filters, kernel, depth_in):
  """Textbook count of a conv layer: K * F * F * D_in weights + K biases."""
  return filters * kernel * kernel * depth_in + filters


def dense_params(n_in, n_out):
  return n_in * n_out + n_out


def _three_conv(kernel_size, pooling):
  layers = []
  for filters in (16, 32, 64):
    layers.append(Conv2D(filters, kernel_size, padding="same", activation="relu"))
    if pooling:
      layers.append(MaxPool2D(2))
  return Sequential([*layers, Flatten(), Dense(500, activation="relu"), Dense(10)])


def test_textbook_cifar_model_without_pooling_has_32_784_054_params():
  # The textbook's printed Keras table: 2x2 kernels (3x3 ones would give 32,797,094, checked below).
  result = jaxcnn.summary(_three_conv(2, pooling=False), (32, 32, 3), print_fn=None)
  expected_rows = [conv_params(16, 2, 3), conv_params(32, 2, 16), conv_params(64, 2, 32), 0,
                   dense_params(32 * 32 * 64, 500), dense_params(500, 10)]
  assert [row.params for row in result.rows] == expected_rows
  assert result.total_params == sum(expected_rows) == 32_784_054
  assert result.trainable_params == 32_784_054
  assert result.non_trainable_params == 0
  assert [row.output_shape for row in result.rows] == [
      (None, 32, 32, 16), (None, 32, 32, 32), (None, 32, 32, 64), (None, 65536), (None, 500), (None, 10)]


def test_three_by_three_kernels_give_the_formula_count():
  result = jaxcnn.summary(_three_conv(3, pooling=False), (32, 32, 3), print_fn=None)
  expected = (conv_params(16, 3, 3) + conv_params(32, 3, 16) + conv_params(64, 3, 32)
              + dense_params(65536, 500) + dense_params(500, 10))
  assert result.total_params == expected == 32_797_094


def test_textbook_cifar_model_with_pooling_shapes_and_count():
  result = jaxcnn.summary(_three_conv(2, pooling=True), (32, 32, 3), print_fn=None)
  shapes = [row.output_shape for row in result.rows]
  assert shapes[:6] == [(None, 32, 32, 16), (None, 16, 16, 16), (None, 16, 16, 32), (None, 8, 8, 32),
                        (None, 8, 8, 64), (None, 4, 4, 64)]
  assert shapes[6:] == [(None, 1024), (None, 500), (None, 10)]
  assert [row.type for row in result.rows] == ["Conv2D", "MaxPool2D"] * 3 + ["Flatten", "Dense", "Dense"]
  assert result.total_params == 208 + 2080 + 8256 + dense_params(1024, 500) + dense_params(500, 10) == 528_054


def test_batch_norm_counts_like_keras():
  channels = 8
  model = Sequential([Conv2D(channels, 3, use_bias=False), BatchNorm(), Flatten(), Dense(2)])
  result = jaxcnn.summary(model, (6, 6, 1), print_fn=None)
  bn_row = result.rows[1]
  assert (bn_row.type, bn_row.params, bn_row.trainable, bn_row.non_trainable) == (
      "BatchNorm", 4 * channels, 2 * channels, 2 * channels)
  assert result.non_trainable_params == 2 * channels
  assert result.trainable_params == 9 * channels + 2 * channels + dense_params(4 * 4 * channels, 2)
  assert result.total_params == result.trainable_params + result.non_trainable_params


def test_printed_table_is_keras_style_and_returned_result_matches():
  printed = []
  result = jaxcnn.summary(_three_conv(2, pooling=True), (32, 32, 3), print_fn=printed.append)
  assert isinstance(result, ModelSummary)
  assert len(printed) == 1 and printed[0] == str(result)
  text = printed[0]
  lines = text.splitlines()
  assert lines[0] == 'Model: "Sequential"'
  assert "Layer (type)" in lines[2] and "Output Shape" in lines[2] and "Param #" in lines[2]
  row = next(line for line in lines if line.startswith("conv2d_1 (Conv2D)"))
  assert row.split()[-1] == "2,080" and "(None, 16, 16, 32)" in row
  assert "Total params: 528,054" in lines
  assert "Trainable params: 528,054" in lines
  assert "Non-trainable params: 0" in lines


def test_print_fn_none_prints_nothing(capsys):
  jaxcnn.summary(_three_conv(2, pooling=True), (32, 32, 3), print_fn=None)
  assert capsys.readouterr().out == ""
  jaxcnn.summary(_three_conv(2, pooling=True), (32, 32, 3))
  assert "Total params: 528,054" in capsys.readouterr().out


_PROBE_SAW_TRACER: list[bool] = []


class _Probe(nn.Module):
  """Records whether it saw abstract values: summary must only ever trace."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    _PROBE_SAW_TRACER.append(isinstance(x, jax.core.Tracer))
    return Dense(3)(x)


def test_summary_is_abstract_and_vgg16_is_instant():
  _PROBE_SAW_TRACER.clear()
  jaxcnn.summary(Sequential([Flatten(), _Probe()]), (4, 4, 1), print_fn=None)
  assert _PROBE_SAW_TRACER and all(_PROBE_SAW_TRACER)
  # 15.5 GFLOPs per image if it ran; abstract evaluation makes it a trace.
  result = jaxcnn.summary(jaxcnn.models.get("vgg16", num_classes=1000), (224, 224, 3), print_fn=None)
  assert result.total_params == 138_357_544
  assert result.output_shape == (None, 1000)
  names = [row.name for row in result.rows]
  assert names[:3] == ["block1_conv1", "block1_conv2", "block1_pool"]
  assert names[-3:] == ["fc1", "fc2", "predictions"]


def test_depth_shows_nested_layers_and_train_traces_dropout():
  inner = Sequential([Conv2D(4, 3), Dropout(0.5)], name="features")
  model = Sequential([inner, Flatten(), Dense(2)])
  shallow = jaxcnn.summary(model, (5, 5, 1), print_fn=None)
  assert [row.name for row in shallow.rows] == ["features", "flatten", "dense"]
  deep = jaxcnn.summary(model, (5, 5, 1), print_fn=None, depth=2, train=True)
  assert [row.name for row in deep.rows] == ["features", "features/conv2d", "features/dropout", "flatten",
                                             "dense"]
  assert deep.rows[0].params == deep.rows[1].params == conv_params(4, 3, 1)
  assert deep.total_params == shallow.total_params


@pytest.mark.parametrize("input_shape, message", [
    ((0, 28, 1), "positive ints"),
    (28, "sequence of ints"),
    ((), "non-empty"),
    ((28.0, 28, 1), "positive ints"),
])
def test_bad_input_shape_is_rejected(input_shape, message):
  with pytest.raises(ValueError, match=f"summary: input_shape .*{message}"):
    jaxcnn.summary(_three_conv(2, pooling=False), input_shape, print_fn=None)


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="summary: model must be a flax.linen Module"):
    jaxcnn.summary(lambda x: x, (2, 2, 1), print_fn=None)
  with pytest.raises(ValueError, match="summary: depth must be an int >= 1"):
    jaxcnn.summary(_three_conv(2, pooling=False), (32, 32, 3), print_fn=None, depth=0)
  with pytest.raises(ValueError, match="summary: batch_size must be an int >= 1"):
    jaxcnn.summary(_three_conv(2, pooling=False), (32, 32, 3), print_fn=None, batch_size=0)


def test_model_errors_for_the_shape_propagate():
  # A 4x4 input cannot take three valid 3x3 convolutions; the layer's message reaches the caller.
  model = Sequential([Conv2D(2, 3), Conv2D(2, 3), Conv2D(2, 3)])
  with pytest.raises(ValueError, match="Conv2D"):
    jaxcnn.summary(model, (4, 4, 1), print_fn=None)
