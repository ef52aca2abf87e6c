"""Every registered model, automatically: init, forward, one SGD step, eval determinism, summary counts.

Inputs are each model's registered (smallest sensible) shape with batch 2; the variables of each model
are built once per module and shared by its tests.
"""
from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcnn
from jaxcnn import models
from jaxcnn.models import registry

BATCH = 2
NUM_CLASSES = 10
# Compiling is nearly all of these tests' cost on a CPU (ResNet-18's forward + backward: ~26 s of CPU at
# XLA's default optimisation, ~8 s at level 0); the checks here are structural and exact-equality
# comparisons within one compiled program, so the cheaper compile loses nothing.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


# Registered models whose checks here repeat another model's code path, in the extended tier:
# cifar10_cnn_same is cifar10_cnn's builder with its second convolution padded (that padding is checked by
# test_architectures), and vgg16's layers are the small models' (its forward equals Keras Applications'
# and its transfer head trains in the default run: test_keras_import, test_from_keras_doc).
_REPEATS = {"cifar10_cnn_same", "vgg16"}
_NAMES = [pytest.param(name, marks=[pytest.mark.extended] if name in _REPEATS else []) for name in models.names()]


def _count_shapes(tree) -> int:
  """Total elements of a pytree whose leaves are shape tuples."""
  shapes = jax.tree_util.tree_leaves(tree, is_leaf=lambda node: isinstance(node, tuple))
  return sum(math.prod(shape) for shape in shapes)


def _loss(logits, x, labels, task):
  if task == "classification":
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  # Reconstruction: the target is the input itself (values in [0, 1]); the model emits logits.
  return optax.sigmoid_binary_cross_entropy(logits, x).mean()


def _leaf_flags(tree) -> dict:
  """{path: bool} for a pytree of boolean scalars."""
  return {jax.tree_util.keystr(path): bool(flag) for path, flag in jax.tree_util.tree_leaves_with_path(tree)}


def _model(name):
  """The registered model with its default arguments (NUM_CLASSES outputs for a classifier)."""
  return models.get(name) if models.spec(name).task == "reconstruction" else models.get(name, num_classes=NUM_CLASSES)


@functools.lru_cache(maxsize=None)
def _run(name):
  """Initialises `name` and runs every check's computation in one compiled program, once per model.

  Returns a dict: the model and its spec, the variables' shapes, the eval outputs without and with a
  dropout rng, and from one SGD step (lr 0.1, real loss, train=True): the loss and per-leaf flags
  (gradient finite, parameter changed, batch statistic changed, new parameter finite).
  """
  model_spec = models.spec(name)
  model = _model(name)
  x = jax.random.uniform(jax.random.key(1), (BATCH, *model_spec.input_shape), jnp.float32)
  labels = jnp.arange(BATCH, dtype=jnp.int32) % NUM_CLASSES
  optimizer = optax.sgd(0.1)
  shapes = {}

  def program(x):
    variables = model.init({"params": jax.random.key(0)}, x)
    shapes.update(jax.tree.map(lambda a: a.shape, dict(variables)))
    eval_plain = model.apply(variables, x)
    eval_with_rng = model.apply(variables, x, rngs={"dropout": jax.random.key(3)})
    params = variables["params"]

    def loss_fn(p):
      logits, updates = model.apply({**variables, "params": p}, x, train=True,
                                    rngs={"dropout": jax.random.key(2)}, mutable=["batch_stats"])
      return _loss(logits, x, labels, model_spec.task), updates

    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    new_params = optax.apply_updates(params, optimizer.update(grads, optimizer.init(params), params)[0])
    old_stats = variables.get("batch_stats", {})
    return dict(
        eval_plain=eval_plain, eval_with_rng=eval_with_rng, loss=loss,
        grad_finite=jax.tree.map(lambda g: jnp.all(jnp.isfinite(g)), grads),
        param_changed=jax.tree.map(lambda a, b: jnp.any(a != b), params, new_params),
        param_finite=jax.tree.map(lambda a: jnp.all(jnp.isfinite(a)), new_params),
        stats_changed=jax.tree.map(lambda a, b: jnp.any(a != b), old_stats, updates.get("batch_stats", {})))

  compiled = jax.jit(program).lower(x).compile(_FAST_COMPILE)
  out = jax.device_get(compiled(x))
  return dict(model=model, spec=model_spec, x=x, shapes=shapes, **out)


@pytest.mark.parametrize("name", _NAMES)
def test_forward_shape_and_finite(name):
  result = _run(name)
  y = result["eval_plain"]
  expected = (BATCH, NUM_CLASSES) if result["spec"].task == "classification" else result["x"].shape
  assert y.shape == expected
  assert y.dtype == np.float32
  assert np.all(np.isfinite(y))
  # Logits, not probabilities: a softmax output would sum to one in every row.
  if result["spec"].task == "classification":
    assert not np.allclose(y.sum(axis=-1), 1.0, atol=1e-3)


@pytest.mark.parametrize("name", _NAMES)
def test_eval_forward_ignores_dropout_rng(name):
  result = _run(name)
  np.testing.assert_array_equal(result["eval_plain"], result["eval_with_rng"])


@pytest.mark.parametrize("name", _NAMES)
def test_one_sgd_step_changes_params_and_batch_stats(name):
  result = _run(name)
  assert np.isfinite(result["loss"])
  bad = [path for path, ok in _leaf_flags(result["grad_finite"]).items() if not ok]
  assert not bad, f"non-finite gradients at {bad}"
  bad = [path for path, ok in _leaf_flags(result["param_finite"]).items() if not ok]
  assert not bad, f"non-finite parameters after the step at {bad}"
  # Every parameter takes part in the loss: a leaf the step leaves unchanged is an unused variable.
  unchanged = [path for path, changed in _leaf_flags(result["param_changed"]).items() if not changed]
  assert not unchanged, f"parameters not updated by the step: {unchanged}"
  stats = _leaf_flags(result["stats_changed"])
  assert bool(stats) == ("batch_stats" in result["shapes"])
  still = [path for path, changed in stats.items() if not changed]
  assert not still, f"batch statistics not updated in training: {still}"


@pytest.mark.parametrize("name", _NAMES)
def test_summary_total_matches_variables(name):
  result = _run(name)
  shapes = result["shapes"]
  summary = jaxcnn.summary(result["model"], result["spec"].input_shape, print_fn=None)
  assert summary.total_params == _count_shapes(shapes)
  assert summary.trainable_params == _count_shapes(shapes["params"])
  assert summary.non_trainable_params == _count_shapes(shapes.get("batch_stats", {}))
  assert sum(row.params for row in summary.rows) == summary.total_params


def test_models_with_batch_norm_take_bn_kwargs():
  # Abstract: this test is not in any model's xdist group, so `_run` here would compile every model again.
  for name in models.names():
    shapes = jax.eval_shape(_model(name).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((BATCH, *models.spec(name).input_shape), jnp.float32))
    if "batch_stats" not in shapes:
      continue
    model = models.get(name, num_classes=NUM_CLASSES, bn_momentum=0.5, axis_name="batch")
    momenta = set()
    axis_names = set()

    def record(next_fun, args, kwargs, context):
      if type(context.module).__name__ == "BatchNorm":
        momenta.add(context.module.momentum)
        axis_names.add(context.module.axis_name)
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      jax.eval_shape(model.init, jax.random.key(0),
                     jax.ShapeDtypeStruct((BATCH, *models.spec(name).input_shape), jnp.float32))
    assert momenta == {0.5}, name
    assert axis_names == {"batch"}, name


# -- registry behaviour --------------------------------------------------------------------------------

def test_names_lists_the_required_models():
  required = {"mnist_convnet", "lenet5", "keras_mnist_cnn", "mnist_bn_cnn", "mnist_fast_cnn", "cifar10_cnn",
              "cifar10_cnn_same", "cifar_3conv", "vgg16", "resnet18", "resnet20", "conv_autoencoder", "airbench"}
  assert required <= set(models.names())
  assert models.names() == sorted(models.names())


def test_unknown_name_lists_known_names():
  with pytest.raises(ValueError, match=r"unknown model 'resnet1000'.*known models: .*mnist_convnet"):
    models.get("resnet1000")


def test_unknown_kwarg_lists_accepted_ones():
  with pytest.raises(ValueError, match=r"model 'lenet5' got unknown argument\(s\) bn_momentum; it accepts: "
                                       r"num_classes"):
    models.get("lenet5", bn_momentum=0.9)


@pytest.mark.parametrize("num_classes", [0, -3, 2.5, True])
def test_bad_num_classes_is_rejected(num_classes):
  with pytest.raises(ValueError, match="num_classes must be an int >= 1"):
    models.get("mnist_convnet", num_classes=num_classes)


def test_register_rejects_duplicates_and_bad_metadata():
  with pytest.raises(ValueError, match="'lenet5' is already registered"):
    models.register("lenet5", input_shape=(28, 28, 1))
  with pytest.raises(ValueError, match=r"input_shape must be \(H, W, C\)"):
    models.register("new_model_bad_shape", input_shape=(28, 28))
  with pytest.raises(ValueError, match="task must be one of"):
    models.register("new_model_bad_task", input_shape=(28, 28, 1), task="detection")
  assert "new_model_bad_shape" not in models.names()


def test_register_and_get_roundtrip(monkeypatch):
  # A private copy of the registry, so the model registered here does not leak into other tests.
  monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
  name = "tiny_roundtrip"

  @models.register(name, input_shape=(8, 8, 1))
  def tiny(num_classes=10):
    return jaxcnn.layers.Sequential([jaxcnn.layers.Flatten(), jaxcnn.layers.Dense(num_classes)])

  assert name in models.names()
  assert models.spec(name).factory is tiny
  model = models.get(name, num_classes=3)
  variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
  assert model.apply(variables, jnp.ones((1, 8, 8, 1))).shape == (1, 3)
  assert models.spec(name).input_shape == (8, 8, 1)
