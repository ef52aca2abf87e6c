"""Pure steps and parallel layouts: learning, BatchNorm/Dropout train vs eval, jit = pmap, 1 = 4 devices."""
from __future__ import annotations

import pathlib
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _train_models import make_data, make_model  # noqa: E402
from helpers import assert_close  # noqa: E402

from jaxcnn import train  # noqa: E402


@pytest.fixture(scope="module")
def data():
  return make_data()


def _first_batch(pipeline):
  return next(iter(pipeline.batches(0)))


def test_loss_decreases_and_batch_stats_move(data):
  model = make_model()
  state = train.create_train_state(model, (8, 8, 1), dict(learning_rate=1e-2))
  train_step, eval_step = train.make_steps(model)
  step, eval_step = jax.jit(train_step), jax.jit(eval_step)
  batch = _first_batch(data[0])
  before = eval_step(state, batch)
  stats0 = jax.tree.map(np.asarray, state.batch_stats)
  for _ in range(15):
    state, metrics = step(state, batch)
  after = eval_step(state, batch)
  assert int(state.step) == 15
  assert float(metrics["count"]) == batch["label"].shape[0]
  assert float(after["loss_sum"]) < 0.7 * float(before["loss_sum"])
  # Training updated the running statistics (momentum 0.99: small but non-zero moves).
  moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), state.batch_stats, stats0)
  assert all(m > 1e-6 for m in jax.tree.leaves(moved))


def test_eval_uses_running_stats_and_is_batch_independent(data):
  model = make_model()
  state = train.create_train_state(model, (8, 8, 1), {})
  eval_step = jax.jit(train.make_steps(model)[1])
  batch = _first_batch(data[0])
  only_first = dict(batch, mask=jnp.zeros_like(batch["mask"]).at[0].set(1.0))
  # Other examples replaced: with running statistics, example 0's loss cannot change.
  shuffled = {k: (v if k == "mask" else jnp.concatenate([v[:1], v[1:][::-1] * (2 if k == "image" else 1)]))
              for k, v in only_first.items()}
  a, b = eval_step(state, only_first), eval_step(state, shuffled)
  assert float(a["count"]) == 1.0
  assert float(a["loss_sum"]) == float(b["loss_sum"])
  # ... and the running statistics are what it normalises with.
  shifted = state.replace(batch_stats=jax.tree.map(lambda x: x + 3.0, state.batch_stats))
  assert abs(float(eval_step(shifted, only_first)["loss_sum"]) - float(a["loss_sum"])) > 1e-4


def test_dropout_differs_between_steps_and_is_off_in_eval(data):
  batch = _first_batch(data[0])
  for rate, differs in ((0.5, True), (0.0, False)):
    model = make_model(dropout=rate)
    state = train.create_train_state(model, (8, 8, 1), {})
    train_step, eval_step = map(jax.jit, train.make_steps(model))
    # Same params, steps 0 and 1: only the dropout key (fold_in(rng, step)) differs.
    _, m0 = train_step(state, batch)
    _, m1 = train_step(state.replace(step=jnp.ones((), jnp.int32)), batch)
    _, m0_again = train_step(state, batch)
    assert float(m0["loss_sum"]) == float(m0_again["loss_sum"])
    assert (float(m0["loss_sum"]) != float(m1["loss_sum"])) == differs
    e0, e1 = eval_step(state, batch), eval_step(state.replace(step=jnp.ones((), jnp.int32)), batch)
    assert float(e0["loss_sum"]) == float(e1["loss_sum"])
  keys = [jax.random.key_data(train.dropout_key(state.replace(step=jnp.full((), s, jnp.int32)))) for s in (0, 1)]
  assert not np.array_equal(np.asarray(keys[0]), np.asarray(keys[1]))


def _fit(model, train_data, parallel, epochs=1):
  config = dict(epochs=epochs, log_every=2, learning_rate=1e-2, parallel=parallel, progress="none")
  return train.fit(model, train_data, config=config)


def _assert_states_close(a, b):
  for tree_a, tree_b in ((a.params, b.params), (a.batch_stats, b.batch_stats)):
    jax.tree.map(lambda x, y: assert_close(x, y, rtol=1e-5, atol=2e-6), tree_a, tree_b)


def test_one_device_equals_four_devices(data):
  assert jax.device_count() == 4
  one = _fit(make_model(), data[0], "none")
  four = _fit(make_model(), data[0], "jit")
  assert one.history["loss"][0] == pytest.approx(four.history["loss"][0], rel=1e-5)
  _assert_states_close(one.state, four.state)
  # Params really moved, so the agreement is not the agreement of two initial states.
  init = train.create_train_state(make_model(), (8, 8, 1), {})
  assert np.max(np.abs(np.asarray(four.state.params["dense"]["kernel"]) - init.params["dense"]["kernel"])) > 1e-3


def test_pmap_equals_jit_with_global_batch_norm(data):
  streaming = data[0]
  jitted = _fit(make_model(dropout=0.0), streaming, "jit")
  pmapped = _fit(make_model(dropout=0.0, axis_name=train.AXIS), streaming, "pmap")
  assert jitted.history["loss"][0] == pytest.approx(pmapped.history["loss"][0], rel=1e-5)
  assert jitted.history["accuracy"] == pmapped.history["accuracy"]
  _assert_states_close(jitted.state, pmapped.state)


def test_streaming_equals_scan(data):
  """A pipeline without batch_fn runs one jitted step per batch; the results equal the scanned chunks."""
  from _train_models import StreamingView
  scanned = _fit(make_model(), data[0], "none")
  streamed = _fit(make_model(), StreamingView(data[0]), "none")
  assert scanned.history["loss"] == pytest.approx(streamed.history["loss"], rel=1e-6)
  _assert_states_close(scanned.state, streamed.state)


# -- collectives and loops ------------------------------------------------------------------------------

_COLLECTIVES = re.compile(r"\b(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(-start)?\(")
_CALLED = re.compile(r"(?:condition|body|calls|to_apply|true_computation|false_computation)=%([\w.\-]+)"
                     r"|branch_computations=\{([^}]*)\}")


def _hlo_computations(text: str) -> tuple[dict[str, str], str]:
  """{computation name: its body text} of an HLO module's text, and the entry computation's name."""
  bodies, entry, name = {}, None, None
  for line in text.splitlines():
    head = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
    if head and line.rstrip().endswith("{"):
      name = head.group(2)
      entry = name if head.group(1) else entry
      bodies[name] = []
    elif name is not None:
      bodies[name].append(line)
  return {k: "\n".join(v) for k, v in bodies.items()}, entry


def _collectives_inside_nested_loops(text: str) -> list[str]:
  """The collectives reachable from the condition or body of any while loop that is not the entry's own
  (the chunk's scan over steps): "loop <- collective" per finding."""
  bodies, entry = _hlo_computations(text)

  def reachable(names):
    seen, todo = set(), list(names)
    while todo:
      n = todo.pop()
      if n in seen or n not in bodies:
        continue
      seen.add(n)
      for single, many in _CALLED.findall(bodies[n]):
        todo.extend([single] if single else [m.strip().lstrip("%") for m in many.split(",")])
    return seen

  found = []
  for name, body in bodies.items():
    if name == entry:
      continue
    for line in body.splitlines():
      if " while(" not in line:
        continue
      loop = re.search(r"%([\w.\-]+) = ", line).group(1)
      for comp in reachable(re.findall(r"(?:condition|body)=%([\w.\-]+)", line)):
        found += [f"{loop} <- {m.group(1)} in {comp}" for m in _COLLECTIVES.finditer(bodies[comp])]
  return found


def test_no_collective_runs_inside_a_loop_of_the_data_parallel_step(data, monkeypatch):
  """A collective inside a loop of a step (the shuffle's cycle walk, split over the devices, made its
  loop condition a cross-device reduction) can run out of order with the step's other collectives:
  XLA:CPU then parks every thread of its pool in a rendezvous and the run hangs (seen as a deadlock of
  4-device runs). The compiled 4-device training and evaluation programs of a shuffled, device-resident
  run keep every collective outside such loops; the checker itself finds one in a program built to have
  one."""
  from jaxcnn.train import parallel
  assert jax.device_count() == 4
  programs, original = {}, parallel.MeshStrategy.compile

  def compile(self, fn, **kwargs):
    jitted = original(self, fn, **kwargs)

    def call(*args):
      spec = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)  # noqa: E731
      programs.setdefault(fn.__name__, (jitted, jax.tree.map(spec, args)))
      return jitted(*args)
    return call

  monkeypatch.setattr(parallel.MeshStrategy, "compile", compile)
  train_data, val_data = data
  assert train_data.shuffle
  train.fit(make_model(), train_data, config=dict(log_every=2, parallel="jit", progress="none", feed="device"),
            val_data=val_data)
  assert {"train_chunk", "eval_chunk"} <= set(programs)
  for name in ("train_chunk", "eval_chunk"):
    jitted, args = programs[name]
    text = jitted.lower(*args).compile().as_text()
    assert _COLLECTIVES.search(text), name                          # it is data-parallel at all
    found = _collectives_inside_nested_loops(text)
    assert found == [], (name, found)

  # The checker on a program with a cross-device reduction in a loop's condition.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("d",))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))

  def walk(x, n):
    return jax.lax.fori_loop(0, n, lambda _, v: jax.lax.while_loop(lambda u: jnp.any(u > 3), lambda u: u - 1, v), x)

  bad = jax.jit(walk, in_shardings=(split, None), out_shardings=split).lower(jnp.arange(16), 2).compile().as_text()
  assert any("all-reduce" in f for f in _collectives_inside_nested_loops(bad)), bad
