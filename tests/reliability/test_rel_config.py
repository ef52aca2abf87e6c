"""Bad config and bad inputs: one clear error listing what is wrong, before anything is written.

Through the experiment command (exit 2, one line on stderr, no workdir) and through the public functions
(ValueError naming the argument rather than an error from inside a JAX trace). The experiments' unknown
keys and unparsable values (tests/experiments), fit's config keys (tests/train) and Keras files of another
architecture (tests/interop) have their own tests; the cases here are the ones they leave out.
"""
from __future__ import annotations

import math
import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _rel_common import mnist_cli, write_tiny_mnist  # noqa: E402

from experiments import mnist  # noqa: E402
from jaxcnn import train  # noqa: E402
from jaxcnn.errors import ConfigError  # noqa: E402


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
  return write_tiny_mnist(tmp_path_factory.mktemp("digits"), train=96, test=32)


def _one_error_line(result) -> str:
  assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
  assert "Traceback" not in result.stderr + result.stdout
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
  return errors[0]


@pytest.mark.parametrize("overrides, expected", [
    # every bad value is listed at once, each with its key
    (("--config.train.batch_size=0", "--config.train.epochs=-1", "--config.train.log_every=0"),
     ("batch_size=0", "epochs=-1", "log_every=0")),
    # 30 examples a batch cannot be split over the 4 devices
    (("--config.train.batch_size=30",), ("batch_size=30 is not divisible by the 4 devices",)),
])
def test_experiment_command_bad_config_exits_2_listing_every_problem(digits, tmp_path, overrides, expected):
  workdir = tmp_path / "run"
  result = mnist_cli(workdir, digits, *overrides, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
  line = _one_error_line(result)
  for text in expected:
    assert text in line, line
  assert not workdir.exists()


def test_model_that_cannot_take_the_images_is_refused_before_writing(digits, tmp_path):
  config = mnist.get_config()
  config.data.update(dict(dataset="tiny_digits", data_dir=str(digits), tfds_data_dir=str(digits / "tfds"),
                          download=False))
  config.model = "vgg16"
  config.train.batch_size = 32
  # VGG16's five poolings do not fit 28x28 digits
  with pytest.raises(ConfigError, match=r"model='vgg16' cannot take \(28, 28, 1\) images: MaxPool2D") as info:
    mnist.main(config, tmp_path / "run")
  assert "\n" not in str(info.value)
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [
    ("eval_batch_size", 0), ("eval_batch_size", -8), ("train.batch_size", -32), ("train.keep_checkpoints", 0),
    ("train.warmup_steps", -1), ("data.test_examples", -5), ("train.seed", -1), ("train.learning_rate", math.nan),
    ("train.learning_rate", math.inf), ("train.rotation_range", 360.0), ("train.validation_batch_size", 0),
    ("feature_map_index", -1),
])
def test_experiment_zero_negative_or_wrongly_typed_values_raise_before_writing(tmp_path, key, value):
  config = mnist.get_config()
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  with node.unlocked():
    node[leaf] = value
  with pytest.raises(ConfigError, match=rf"{leaf}=") as info:
    mnist.main(config, tmp_path / "run")
  assert info.value.exit_code == 2 and "\n" not in str(info.value)
  assert not (tmp_path / "run").exists()


def test_wrong_types_are_refused_and_listed_together():
  # An experiment's ConfigDict refuses a value of another type on assignment (and its flags on parsing);
  # a plain dict given to fit is checked key by key, every problem listed in one line.
  config = mnist.get_config()
  with pytest.raises(TypeError, match="epochs"):
    config.train.epochs = 2.5
  with pytest.raises(ConfigError) as info:
    train.validate_config({"epochs": 2.5, "batch_size": "32", "shuffle": "yes", "seed": -1})
  for text in ("epochs=2.5", "batch_size='32'", "shuffle='yes'", "seed=-1"):
    assert text in str(info.value)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("call, message", [
    (lambda: train.softmax_cross_entropy(jnp.zeros((4, 3)), jnp.array([0.0, 1.7, 2.0, 0.2])),
     r"softmax_cross_entropy: labels.*integer"),
    (lambda: train.softmax_cross_entropy(jnp.zeros((4, 3)), jnp.zeros((5,), jnp.int32)),
     r"softmax_cross_entropy: labels shape \(5,\)"),
    (lambda: train.softmax_cross_entropy(jnp.zeros((4,)), jnp.zeros((4,), jnp.int32)),
     r"softmax_cross_entropy: logits"),
    (lambda: train.create_train_state(_tiny_model(), (8, 8), {}), r"Conv2D expects input of rank 4"),
    (lambda: train.create_train_state(_tiny_model(), (8, 0, 1), {}), r"input_shape"),
])
def test_public_functions_reject_wrong_ranks_and_dtypes_with_value_error(call, message):
  with pytest.raises(ValueError, match=message):
    call()


def _tiny_model():
  from jaxcnn import layers as L
  return L.Sequential([L.Conv2D(2, 3), L.Flatten(), L.Dense(3)])


def test_public_api_sweep_raises_value_error_naming_the_argument():
  """A sweep over the public entry points with a wrong rank or dtype each: ValueError, never a trace."""
  import jax
  from jaxcnn import data, layers as L, models, ops, reference

  x = jnp.ones((2, 8, 8, 3))
  w = jnp.ones((3, 3, 3, 4))
  key = jax.random.key(0)

  def init(module, inputs):
    # The checks run while the module traces; eval_shape traces it without compiling its initialisers.
    return jax.eval_shape(lambda: module.init({"params": key, "dropout": key}, inputs))

  cases = []
  for lib in (ops, reference):
    cases += [
        (lambda lib=lib: lib.conv2d(x[0], w), "x must have rank 4"),
        (lambda lib=lib: lib.conv2d(x.astype(jnp.int32), w), "x must be a floating-point array"),
        (lambda lib=lib: lib.conv2d(x, w[0]), "w must have rank 4"),
        (lambda lib=lib: lib.conv1d(x, w), "x must have rank 3"),
        (lambda lib=lib: lib.max_pool2d(x[0], 2), "x must have rank 4"),
        (lambda lib=lib: lib.avg_pool2d(x.astype(bool), 2), "x must be a floating-point array"),
        (lambda lib=lib: lib.global_avg_pool2d(x[0]), "x must have rank 4"),
        (lambda lib=lib: lib.batch_norm(x.astype(jnp.int32), *[jnp.ones(3)] * 4, train=True),
         "x must be a floating-point array"),
        (lambda lib=lib: lib.dropout(x.astype(jnp.int32), 0.5, rng=key), "x must be a floating-point array"),
        (lambda lib=lib: lib.upsample2d(x[0]), "x must have rank 4"),
        (lambda lib=lib: lib.zero_pad2d(x[0], 1), "x must have rank 4"),
    ]
  cases += [
      (lambda: init(L.Conv2D(4, 3), x[0]), "Conv2D expects input of rank 4"),
      (lambda: init(L.Conv2D(4, 3), x.astype(jnp.int32)), "Conv2D: x must be a floating-point array"),
      (lambda: init(L.Dense(3), jnp.ones(5)), "Dense expects input of rank >= 2"),
      (lambda: init(L.BatchNorm(), x.astype(jnp.int32)), "BatchNorm: x must be a floating-point array"),
      (lambda: init(models.get("mnist_convnet"), jnp.ones((1, 28, 28, 1), jnp.uint8)),
       "x must be a floating-point array"),
      (lambda: init(models.get("vgg16"), jnp.ones((1, 8, 8, 3))), "larger than the padded input"),
      (lambda: data.from_arrays(np.full((4, 8, 8, 1), np.nan), np.zeros(4, np.int32), batch_size=2, seed=0),
       "images: 256 non-finite values"),
      (lambda: data.from_arrays(np.ones(4, np.uint8), np.zeros(4, np.int32), batch_size=2, seed=0),
       "images: expected one example per row"),
      (lambda: data.from_arrays(np.ones((4, 8, 8, 1), np.uint8), np.array(["a"] * 4), batch_size=2, seed=0),
       "labels: expected integer class ids or float targets"),
      (lambda: data.preprocess(data.from_arrays(np.ones((4, 8, 8, 1), np.uint8), np.zeros(4, int), batch_size=2,
                                                seed=0).preprocessing, np.ones((4, 8, 8, 1), np.float32)),
       "inputs: dtype float32, but the run was trained on uint8 inputs"),
  ]
  for call, message in cases:
    with pytest.raises(ValueError, match=message):
      call()
