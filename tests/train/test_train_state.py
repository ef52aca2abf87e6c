"""create_train_state: one cheaply compiled program that gives the bits the model's own init gives."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import _compile, models, train
from jaxcnn.train.state import init_variables

from helpers import assert_close


def _assert_same_bits(actual, expected):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for path, a, e in zip(jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual),
                        jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    assert a.dtype == e.dtype and a.shape == e.shape and a.tobytes() == e.tobytes(), jax.tree_util.keystr(path[0])


def _check(name, seed=3):
  spec = models.spec(name)
  model = models.get(name)
  state = train.create_train_state(model, spec.input_shape, dict(seed=seed))
  # The oracle: the same initialisation compiled as jit compiles it by default.
  expected = jax.jit(lambda: init_variables(model, tuple(spec.input_shape), seed))()
  _assert_same_bits(state.params, expected["params"])
  _assert_same_bits(state.batch_stats, expected.get("batch_stats", {}))
  assert int(state.step) == 0 and int(state.epoch) == 0 and int(state.epoch_step) == 0


@pytest.mark.parametrize("name", ["mnist_fast_cnn", "mnist_convnet"])
def test_initial_state_has_the_bits_of_the_default_compiled_init(name):
  # glorot_uniform, he_normal (a truncated normal through erf_inv), zeros and ones, BatchNorm's statistics
  _check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in models.names() if n not in ("mnist_fast_cnn", "mnist_convnet")])
def test_every_registered_model_starts_from_the_bits_of_the_default_compiled_init(name):
  _check(name)


def test_run_once_compiles_cheaply_on_cpu_and_computes_what_jit_computes(monkeypatch):
  seen = []
  real = jax.stages.Lowered.compile

  def compile(self, compiler_options=None):
    seen.append(compiler_options)
    return real(self, compiler_options)

  monkeypatch.setattr(jax.stages.Lowered, "compile", compile)
  x = jnp.arange(6.0).reshape(2, 3)
  # float32 rounding apart (machine code optimised less may evaluate tanh's polynomial differently)
  assert_close(_compile.run_once(lambda x: jnp.tanh(x) @ x.T, x), jnp.tanh(x) @ x.T, jnp.float32)
  assert seen == [_compile.CHEAP_COMPILE if jax.default_backend() == "cpu" else None]
