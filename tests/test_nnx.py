"""Flax NNX: registered models through `flax.nnx.bridge.ToNNX` train with `nnx.Optimizer`, update their
BatchNorm statistics, and give the linen run's numbers; the README recipe runs as written."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcnn import layers as L
from jaxcnn import models

from helpers import REPO_ROOT, assert_close

STEPS = 2
# Compiling is nearly all the cost; the comparisons do not depend on how hard XLA optimises.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
# Small and cheap to compile: max pooling with dropout, and BatchNorm (whose statistics must move); the
# slow run takes every other registered model (VGG-16 and ResNet-18 at their registered 32x32 inputs).
DEFAULT_MODELS = ("mnist_convnet", "mnist_fast_cnn")


def _loss(spec, outputs, images, labels):
  if spec.task == "reconstruction":
    return optax.sigmoid_binary_cross_entropy(outputs, images).mean()
  return optax.softmax_cross_entropy_with_integer_labels(outputs, labels).mean()


def _data(spec, batch=4):
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(size=(batch, *spec.input_shape)), jnp.float32)
  return images, jnp.arange(batch, dtype=jnp.int32) % 10


def _linen_variables(model):
  """The NNX model's state as linen variables ({"params": ..., "batch_stats": ...})."""
  variables = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}
  stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  if stats:
    variables["batch_stats"] = stats
  return variables


def _train_both(name):
  """STEPS Adam steps of `name` through the NNX bridge and the same steps in linen from the same start
  (the same dropout keys): (nnx losses, linen losses, nnx variables, linen variables, initial ones)."""
  spec = models.spec(name)
  module = models.get(name) if spec.task == "reconstruction" else models.get(name, num_classes=10)
  images, labels = _data(spec)
  keys = [jax.random.key(10 + step) for step in range(STEPS)]

  model = nnx.bridge.ToNNX(module, rngs=nnx.Rngs(params=0, dropout=1))
  nnx.bridge.lazy_init(model, images)
  start = jax.tree.map(np.asarray, _linen_variables(model))
  optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
  # NNX's functional form (split / merge) of an nnx.jit step, so that it compiles like the linen one.
  graphdef, state = nnx.split((model, optimizer))

  def nnx_step(state, key):
    model, optimizer = nnx.merge(graphdef, state)

    def loss_fn(model):
      out = model(images, train=True, mutable=["batch_stats"], rngs=nnx.Rngs(dropout=key))
      return _loss(spec, out, images, labels)
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  compiled = jax.jit(nnx_step).lower(state, keys[0]).compile(_FAST_COMPILE)
  nnx_losses = []
  for key in keys:
    state, loss = compiled(state, key)
    nnx_losses.append(float(loss))
  nnx.update((model, optimizer), state)

  tx = optax.adam(1e-2)

  def linen_step(variables, opt_state, key):
    dropout_key = nnx.Rngs(dropout=key).dropout()  # the key the bridge hands the module for `key`
    def loss_fn(params):
      out, updates = module.apply({**variables, "params": params}, images, train=True,
                                  rngs={"dropout": dropout_key}, mutable=["batch_stats"])
      return _loss(spec, out, images, labels), updates
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
    changes, opt_state = tx.update(grads, opt_state, variables["params"])
    new_params = optax.apply_updates(variables["params"], changes)
    return {**variables, **updates, "params": new_params}, opt_state, loss

  variables = jax.tree.map(jnp.asarray, start)
  opt_state = tx.init(variables["params"])
  linen_compiled = jax.jit(linen_step).lower(variables, opt_state, keys[0]).compile(_FAST_COMPILE)
  linen_losses = []
  for key in keys:
    variables, opt_state, loss = linen_compiled(variables, opt_state, key)
    linen_losses.append(float(loss))
  return nnx_losses, linen_losses, _linen_variables(model), variables, start


def _check(name):
  nnx_losses, linen_losses, nnx_vars, linen_vars, start = _train_both(name)
  assert all(np.isfinite(nnx_losses)), nnx_losses
  assert nnx_losses[-1] != nnx_losses[0]  # it trains
  assert_close(np.asarray(nnx_losses), np.asarray(linen_losses), rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(nnx_vars) == jax.tree.structure(linen_vars)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(nnx_vars), jax.tree.leaves(nnx_vars),
                        jax.tree.leaves(linen_vars)):
    assert_close(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.max(np.abs(b))))), path
  if "batch_stats" in start:  # the running statistics moved, in both
    for before, after in zip(jax.tree.leaves(start["batch_stats"]), jax.tree.leaves(nnx_vars["batch_stats"])):
      assert np.any(np.asarray(after) != before)


# mnist_fast_cnn has everything mnist_convnet has (convolutions, max pooling, dropout) and BatchNorm: the
# mnist_convnet case is in the extended tier.
@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.extended] if n == "mnist_convnet" else [])
                                  for n in DEFAULT_MODELS])
def test_model_trains_through_the_nnx_bridge_as_in_linen(name):
  _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in models.names() if n not in DEFAULT_MODELS])
def test_every_registered_model_trains_through_the_nnx_bridge_as_in_linen(name):
  _check(name)


def test_nnx_bridge_without_mutable_batch_stats_raises():
  # ToNNX calls linen with nothing mutable unless told: a silent no-op update would train a model that
  # evaluates with mean 0, variance 1. The refusal is BatchNorm's own, so a small model shows it (a
  # registered model's layers are initialised op by op here, which costs seconds of compiling).
  model = nnx.bridge.ToNNX(L.Sequential([L.Conv2D(2, 3, use_bias=False), L.BatchNorm(), L.Activation("relu")]),
                           rngs=nnx.Rngs(params=0, dropout=1))
  images = jnp.zeros((2, 8, 8, 1))
  nnx.bridge.lazy_init(model, images)
  with pytest.raises(ValueError, match=r"BatchNorm: train=True updates the running statistics.*"
                                       r"model\(x, train=True, mutable=\['batch_stats'\]\)"):
    model(images, train=True)


def test_readme_nnx_recipe_runs():
  readme = (REPO_ROOT / "README.md").read_text()
  section = readme[readme.index("## Flax NNX"):]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  namespace: dict = {}
  exec(compile(code, "README.md (Flax NNX)", "exec"), namespace)  # noqa: S102 -- the repo's own README
  assert np.isfinite(float(namespace["loss"]))
  variables = namespace["variables"]
  template = jax.eval_shape(models.get("mnist_fast_cnn").init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  assert jax.tree.structure(variables) == jax.tree.structure(dict(template))
  stats = jax.tree.leaves(variables["batch_stats"])
  assert any(np.any(np.asarray(s) != 0.0) and np.any(np.asarray(s) != 1.0) for s in stats)
  assert namespace["logits"].shape == (8, 10)
