"""Architecture specs: every registered Sequential and a stack of every layer kind round-trip through JSON
to the same module (equal, and the same outputs bitwise); what cannot be written is refused by name."""
from __future__ import annotations

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import layers as L
from jaxcnn import models
from jaxcnn.layers import Sequential, architecture_spec, from_architecture_spec


def _round_trip(model):
  return from_architecture_spec(json.loads(json.dumps(architecture_spec(model))))


def _assert_same_outputs(a, b, x):
  # Compiled, not eager (eager compiles every operation of every layer once per call); one program per
  # module, each traced from its own module.
  variables = jax.jit(a.init)(jax.random.key(0), x)
  out_a = jax.jit(lambda v, x: a.apply(v, x))(variables, x)
  out_b = jax.jit(lambda v, x: b.apply(v, x))(variables, x)
  np.testing.assert_array_equal(np.asarray(out_a), np.asarray(out_b))


@pytest.mark.parametrize("name", [n for n in models.names() if isinstance(
    models.get(n, **({} if models.spec(n).task == "reconstruction" else {"num_classes": 10})), Sequential)])
def test_registered_sequentials_round_trip(name):
  kwargs = {} if models.spec(name).task == "reconstruction" else {"num_classes": 10}
  model = models.get(name, **kwargs)
  rebuilt = _round_trip(model)
  assert rebuilt == model
  jax.eval_shape(rebuilt.init, jax.random.key(0), jnp.zeros((1, *models.spec(name).input_shape)))


def test_every_layer_kind_nesting_sharing_dtypes_and_activations_round_trip():
  shared = L.Dense(16, activation=jax.nn.relu)
  model = Sequential([
      L.ZeroPadding2D(((1, 0), (0, 1))), L.Conv2D(4, (3, 3), padding="same", dilation_rate=1, activation="relu"),
      L.BatchNormalization(momentum=0.9), L.DepthwiseConv2D(3, padding="same", depth_multiplier=2),
      L.SeparableConv2D(4, 3, padding="same"), L.GroupNormalization(groups=2), L.LayerNormalization(),
      L.Conv2DTranspose(4, 3, strides=2, padding="same", output_padding=1), L.Cropping2D(((1, 1), (1, 1))),
      L.UpSampling2D(2, interpolation="bilinear"), L.AveragePooling2D(2), L.SpatialDropout2D(0.1),
      Sequential([L.MaxPooling2D(2, padding="same"), L.Activation(jnp.tanh)], name="block"),
      L.LocalResponseNorm(size=3), L.Flatten(), L.Dense(16), shared, shared, L.Dropout(0.2),
      L.Dense(3, activation="softmax", dtype=jnp.bfloat16)])
  rebuilt = _round_trip(model)
  assert rebuilt == model
  spec = architecture_spec(model)
  assert spec["layers"][17] == {"same_as": 16}
  assert spec["layers"][12]["name"] == "block" and spec["layers"][12]["class"] == "Sequential"
  assert spec["layers"][16]["config"]["activation"] == {"activation": "relu"}
  assert spec["layers"][-1]["config"]["dtype"] == {"dtype": "bfloat16"}
  _assert_same_outputs(model, rebuilt, jax.random.normal(jax.random.key(1), (2, 9, 9, 2)))


def test_conv1d_stack_round_trips():
  model = Sequential([L.Conv1D(4, 5, strides=2, activation="relu"), L.MaxPool1D(2), L.Conv1DTranspose(3, 3),
                      L.GlobalAveragePooling1D(), L.Dense(2)])
  rebuilt = _round_trip(model)
  assert rebuilt == model
  _assert_same_outputs(model, rebuilt, jax.random.normal(jax.random.key(1), (2, 40, 1)))


class _Custom(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    return x


@pytest.mark.parametrize("model, message", [
    (Sequential([L.Conv2D(2, 3), _Custom()]), r"architecture: layer 'Sequential/_custom' is a .*_Custom, not a "
                                              r"jaxcnn layer, so it cannot be written to a spec"),
    (Sequential([L.Dense(2, activation=lambda x: x)]), r"layer 'Sequential/dense' field 'activation': <function"),
    (Sequential([L.Dense(2, activation=functools.partial(jax.nn.leaky_relu, negative_slope=0.01))]),
     r"layer 'Sequential/dense' field 'activation': functools.partial"),
    (models.get("resnet20"), r"architecture: jaxcnn.models.resnet.ResNet is not a jaxcnn.layers.Sequential"),
])
def test_what_cannot_be_written_is_refused_naming_the_layer(model, message):
  with pytest.raises(ValueError, match=message):
    architecture_spec(model)


@pytest.mark.parametrize("spec, message", [
    ({"class": "Dense"}, r"architecture: expected \{'class': 'Sequential'"),
    ({"class": "Sequential", "layers": [{"class": "Nope", "name": "x", "config": {}}]},
     r"architecture.layers\[0\]: unknown layer class 'Nope'"),
    ({"class": "Sequential", "layers": [{"class": "Dense", "name": "d", "config": {"units": 2, "bogus": 1}}]},
     r"architecture.layers\[0\]: Dense has no field\(s\) bogus"),
    ({"class": "Sequential", "layers": [{"class": "Dense", "name": "d", "config": {"units": 2,
                                                                                    "activation": "nope"}}]},
     r"architecture.layers\[0\] \(Dense\): .*unknown activation 'nope'"),
    ({"class": "Sequential", "layers": [{"same_as": 0}]}, r"same_as=0 does not name an earlier layer"),
])
def test_bad_specs_are_one_line_value_errors(spec, message):
  with pytest.raises(ValueError, match=message) as info:
    from_architecture_spec(spec)
  assert "\n" not in str(info.value)


def test_registry_records_how_a_model_was_built():
  model = models.get("mnist_convnet", num_classes=5)
  assert models.registry_entry(model) == ("mnist_convnet", {"num_classes": 5})
  assert models.registry_entry(model.clone()) is None
  assert model == models.get("mnist_convnet", num_classes=5)  # equality ignores the record
