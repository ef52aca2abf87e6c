"""What fit returns is a model you can use: predict and evaluate on raw inputs (one compiled program per
batch size, fit's evaluation path), save and load ("jaxcnn.model/1") with predictions bitwise equal, train
more from a loaded model; every unreadable or foreign saved model and every bad input is one line naming
the file or the argument."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxcnn import layers as L
from jaxcnn import models, storage, train
from jaxcnn.data import preprocess
from jaxcnn.errors import CheckpointError, ConfigError, StorageError

FAST = dict(batch_size=16, epochs=1, log_every=4, progress="none")


def _digits(n=96, seed=0, size=8):
  """uint8 images whose class is the brightest quadrant (learnable in one epoch), int labels."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 4, n).astype(np.int32)
  images = rng.integers(0, 60, (n, size, size, 1)).astype(np.uint8)
  half = size // 2
  for i, c in enumerate(labels):
    r, q = divmod(int(c), 2)
    images[i, r * half:(r + 1) * half, q * half:(q + 1) * half] += 150
  return images, labels


def _softmax_cnn():
  return L.Sequential([L.Conv2D(4, 3, activation="relu"), L.MaxPooling2D(2), L.Flatten(),
                       L.Dense(4, activation="softmax")])


@pytest.fixture(scope="module")
def softmax_run():
  """The course way: float x/255 inputs, one-hot labels, a softmax output, categorical_crossentropy."""
  images, labels = _digits()
  x, y = images.astype(np.float32) / 255.0, np.eye(4, dtype=np.float32)[labels]
  result = train.fit(_softmax_cnn(), (x, y), config=dict(FAST, loss="categorical_crossentropy",
                                                         validation_split=0.25, validation_batch_size=8))
  return result, x, y


@pytest.fixture(scope="module")
def registry_run():
  """A registry model (logits) on uint8 images, featurewise-standardised by the run."""
  images, labels = _digits(size=28)
  model = models.get("mnist_convnet", num_classes=4)
  return train.fit(model, (images, labels), config=FAST), images, labels


# -- predict and evaluate -----------------------------------------------------------------------------------

def test_fit_returns_a_trained_model(softmax_run):
  result, _, _ = softmax_run
  assert isinstance(result, train.TrainedModel) and isinstance(result, train.FitResult)
  assert result.loss == "categorical_crossentropy" and result.from_logits is False
  assert result.class_names == ["0", "1", "2", "3"] and result.input_shape == (8, 8, 1)
  assert result.input_dtype == "float32"


def test_predict_is_the_models_output_on_raw_inputs(registry_run, softmax_run):
  result, images, _ = registry_run
  raw = images[:37]
  expected = np.asarray(result.module.apply(result.variables, preprocess(result.preprocessing, raw)))
  got = result.predict(raw)
  assert got.shape == (37, 4) and got.dtype == np.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)   # logits: what the model returns
  assert not np.allclose(got.sum(axis=1), 1.0)
  # (N, H, W) pixels, as fit takes them
  np.testing.assert_array_equal(result.predict(raw[..., 0]), got)
  probabilities = softmax_run[0].predict(softmax_run[1][:5])
  np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)  # a softmax model: probabilities


def test_predict_and_evaluate_compile_once_per_batch_size_with_the_last_batch_padded(registry_run):
  result, images, labels = registry_run
  before = dict(train.TRACE_COUNTS)
  first = result.predict(images[:70], batch_size=32)       # batches 32, 32, 6 (+26 padding)
  second = result.predict(images[:40], batch_size=32)
  result.evaluate(images[:70], labels[:70], batch_size=32)
  result.evaluate(images[:33], labels[:33], batch_size=32)
  traced = {k: v - before.get(k, 0) for k, v in train.TRACE_COUNTS.items()}
  assert traced.get("predict_chunk") == 1 and traced.get("eval_chunk") == 1
  np.testing.assert_array_equal(first[:40], second)     # the padding changes nothing
  one = result.predict(images[5:6], batch_size=32)
  np.testing.assert_array_equal(one[0], first[5])


@contextlib.contextmanager
def _jax_work():
  """The traces and XLA compilations JAX performs inside the block (jax.monitoring's events)."""
  names = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/backend_compile_duration")
  events = []

  def listen(name, seconds, **kwargs):
    if name in names:
      events.append(name)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


def test_later_calls_trace_and_compile_nothing_and_a_loaded_copy_shares_the_programs(registry_run, tmp_path):
  result, images, labels = registry_run
  first = result.predict(images[:50], batch_size=16)
  metrics = result.evaluate(images[:50], labels[:50], batch_size=16)
  loaded = train.load(result.save(tmp_path / "m"))
  with _jax_work() as work:
    again = result.predict(images[:50], batch_size=16)
    fewer = result.predict(images[:9], batch_size=16)
    assert result.evaluate(images[:50], labels[:50], batch_size=16) == metrics
    result.evaluate(images[:20], labels[:20], batch_size=16)
    copy = loaded.predict(images[:50], batch_size=16)           # same module and preprocessing: same programs
  assert work == []
  np.testing.assert_array_equal(again, first)
  np.testing.assert_array_equal(fewer, first[:9])
  np.testing.assert_array_equal(copy, first)
  before = dict(train.TRACE_COUNTS)
  with _jax_work() as work:   # the copy checks its targets' shapes (abstractly) once, and compiles nothing
    assert loaded.evaluate(images[:50], labels[:50], batch_size=16) == metrics
  assert "/jax/core/compile/backend_compile_duration" not in work and train.TRACE_COUNTS == before


def test_calls_spanning_several_chunks_equal_one_chunk(registry_run):
  from jaxcnn.train import model as model_lib
  result, images, labels = registry_run
  count = model_lib.MAX_CHUNK_BATCHES * 4 + 10                  # batch 4: 17 batches, two chunks
  many = result.predict(images[:count], batch_size=4)
  one = result.predict(images[:count], batch_size=128)
  np.testing.assert_allclose(many, one, rtol=1e-5, atol=1e-5)
  split = result.evaluate(images[:count], labels[:count], batch_size=4)
  whole = result.evaluate(images[:count], labels[:count], batch_size=128)
  assert split["loss"] == pytest.approx(whole["loss"], rel=1e-5) and split["accuracy"] == whole["accuracy"]


def test_functional_evaluate_compiles_once_per_batch_shape(registry_run):
  result, images, labels = registry_run
  model, spec = result.module, result.preprocessing
  first = train.evaluate(result.variables, model, (images[:70], labels[:70]), preprocessing=spec, batch_size=32)
  assert first == pytest.approx(result.evaluate(images[:70], labels[:70], batch_size=32), rel=1e-6)
  other = jax.tree.map(lambda a: a * 0.5, result.variables)  # other weights, same shapes
  before = dict(train.TRACE_COUNTS)
  with _jax_work() as work:
    again = train.evaluate(result.variables, model, (images[:70], labels[:70]), preprocessing=spec, batch_size=32)
    train.evaluate(result.state, model, (images[:33], labels[:33]), preprocessing=spec, batch_size=32)
    halved = train.evaluate(other, model, (images[:70], labels[:70]), preprocessing=spec, batch_size=32)
  assert work == [] and train.TRACE_COUNTS == before
  assert again == first and halved != first


def test_evaluate_is_fits_validation(softmax_run):
  result, x, y = softmax_run
  val = slice(len(x) - int(len(x) * 0.25), None)          # Keras' validation_split: the last quarter
  metrics = result.evaluate(x[val], y[val])
  assert set(metrics) == {"loss", "accuracy"}
  assert metrics["loss"] == pytest.approx(result.history["val_loss"][-1], rel=1e-6)
  assert metrics["accuracy"] == pytest.approx(result.history["val_accuracy"][-1], abs=1e-9)
  predicted = result.predict(x[val]).argmax(axis=1)
  assert metrics["accuracy"] == pytest.approx(np.mean(predicted == y[val].argmax(axis=1)))


def test_evaluate_of_a_regression_loss_has_no_accuracy():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(32, 6, 1)).astype(np.float32)
  y = x.sum(axis=(1, 2))[:, None]
  model = L.Sequential([L.Conv1D(2, 3), L.Flatten(), L.Dense(1)])
  result = train.fit(model, (x, y), config=dict(FAST, loss="mse"))
  metrics = result.evaluate(x, y)
  assert set(metrics) == {"loss"}
  assert metrics["loss"] == pytest.approx(float(np.mean((result.predict(x) - y) ** 2)), rel=1e-5)


# -- save and load --------------------------------------------------------------------------------------------

def _assert_same_model(original, loaded, x, y):
  np.testing.assert_array_equal(loaded.predict(x), original.predict(x))          # bitwise
  assert loaded.evaluate(x, y) == original.evaluate(x, y)
  assert loaded.preprocessing == original.preprocessing and loaded.class_names == original.class_names
  assert loaded.config.to_dict() == original.config.to_dict()
  for a, b in zip(jax.tree.leaves(original.variables), jax.tree.leaves(loaded.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(loaded.state.step) == int(original.state.step) and int(loaded.state.epoch) == int(original.state.epoch)


def test_registry_model_round_trip(registry_run, tmp_path):
  result, images, labels = registry_run
  path = result.save(tmp_path / "model")
  document = json.loads((path / "model.json").read_text())
  assert document["format"] == train.MODEL_FORMAT == "jaxcnn.model/1"
  assert document["architecture"] == {"kind": "registry", "name": "mnist_convnet", "kwargs": {"num_classes": 4}}
  assert document["input"] == {"shape": [28, 28, 1], "dtype": "uint8"}
  assert document["output"] == {"shape": [4], "activation": None}
  assert document["loss"] == {"name": "softmax_cross_entropy", "from_logits": True}
  assert set(document["versions"]) == {"jaxcnn", "jax", "flax", "orbax"}
  loaded = train.load(path)
  assert type(loaded) is train.TrainedModel and loaded.module == result.module
  _assert_same_model(result, loaded, images[:50], labels[:50])


def test_sequential_spec_round_trip_and_overwrite(softmax_run, tmp_path):
  result, x, y = softmax_run
  path = tmp_path / "course"
  result.save(path)
  assert json.loads((path / "model.json").read_text())["architecture"]["kind"] == "sequential"
  result.save(path)                                   # a saved model is replaced, as Keras' save does
  with pytest.raises(CheckpointError, match=r"course: a saved model is there already \(overwrite=False\)"):
    result.save(path, overwrite=False)
  loaded = train.load(path)
  assert loaded.loss == "categorical_crossentropy" and loaded.from_logits is False
  _assert_same_model(result, loaded, x[:20], y[:20])


class _Custom(nn.Module):
  """A model of the user's own: its architecture cannot be written, its weights can."""

  @nn.compact
  def __call__(self, x, train: bool = False):
    return nn.Dense(4)(x.reshape(x.shape[0], -1))


def test_custom_module_saves_weights_only_and_loads_with_the_module(tmp_path):
  images, labels = _digits(n=32)
  result = train.fit(_Custom(), (images, labels), config=FAST)
  with pytest.raises(ValueError, match=r"save: architecture: .*_Custom is not a jaxcnn.layers.Sequential.*; "
                                       r"save\(path, architecture=False\) writes the weights alone, and "
                                       r"jaxcnn.train.load\(path, model=_Custom\(...\)\) reads them"):
    result.save(tmp_path / "custom")
  assert not (tmp_path / "custom").exists()
  result.save(tmp_path / "custom", architecture=False)
  with pytest.raises(CheckpointError, match=r"model.json: the architecture was not saved \(a .*_Custom\); pass "
                                            r"the module: jaxcnn.train.load\(path, model=...\)"):
    train.load(tmp_path / "custom")
  _assert_same_model(result, train.load(tmp_path / "custom", model=_Custom()), images, labels)
  with pytest.raises(CheckpointError, match=r"custom/variables: the saved variables do not fit the architecture: "
                                            r"params/Dense_0/bias \(4,\) is not in the architecture; .*params/conv2d/bias \(4,\) "
                                            r"is missing"):
    train.load(tmp_path / "custom", model=_softmax_cnn())


def test_training_continues_from_a_loaded_model(registry_run, tmp_path):
  result, images, labels = registry_run
  loaded = train.load(result.save(tmp_path / "m"))
  more = train.fit(loaded.module, (images, labels), config=FAST, initial_state=loaded)
  same = train.fit(result.module, (images, labels), config=FAST, initial_state=result)
  assert more.history["epoch"] == [2] and int(more.state.step) == 2 * int(result.state.step)
  # The same weights, step, rng and preprocessing: the same continued run as from the FitResult.
  for a, b in zip(jax.tree.leaves(more.variables), jax.tree.leaves(same.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# -- what cannot be read: one line naming the file ---------------------------------------------------------

@pytest.fixture(scope="module")
def saved(registry_run, tmp_path_factory):
  return registry_run[0].save(tmp_path_factory.mktemp("saved") / "model")


def _edit(field, value=None, drop=False):
  def mutate(path):
    document = json.loads((path / "model.json").read_text())
    node, *keys = field.split(".")
    target = document
    for key in [node, *keys][:-1]:
      target = target[key]
    if drop:
      del target[[node, *keys][-1]]
    else:
      target[[node, *keys][-1]] = value
    (path / "model.json").write_text(json.dumps(document))
  return mutate


def _truncate_data(path):
  for file in (path / "variables").rglob("*"):
    if file.is_file() and file.parent.name == "d":
      file.write_bytes(file.read_bytes()[:8])


CASES = {
    "nothing there": (lambda p: None, "missing", r"missing: no such saved model"),
    "a file": (lambda p: None, "model/model.json", r"model.json: not a saved jaxcnn model \(a saved model is a "
                                                   r"directory holding model.json and variables/\)"),
    "a foreign folder": (lambda p: None, "model/variables", r"variables: no model.json: not a saved jaxcnn model"),
    "garbled json": (lambda p: (p / "model.json").write_text('{"format": "jaxcnn.mo'), "model",
                     r"model.json: not valid JSON \(Unterminated string"),
    "binary json": (lambda p: (p / "model.json").write_bytes(b"\x89PNG\xff\xfe\x00"), "model",
                    r"model.json: not a text JSON file"),
    "no format": (lambda p: (p / "model.json").write_text("[1, 2]"), "model",
                  r"model.json: not a jaxcnn model file \(no 'format' field\)"),
    "another version": (_edit("format", "jaxcnn.model/2"), "model",
                        r"model.json: format 'jaxcnn.model/2' \(written by jaxcnn .*\) is not readable here; "
                        r"this jaxcnn reads 'jaxcnn.model/1'"),
    "another format": (_edit("format", "keras.saving/3"), "model",
                       r"model.json: format 'keras.saving/3' is not a jaxcnn model"),
    "a field missing": (_edit("loss", drop=True), "model", r"model.json: field 'loss' is missing"),
    "an unknown model": (_edit("architecture.name", "nope"), "model",
                         r"model.json: architecture: unknown model 'nope'"),
    "shapes of another architecture": (_edit("architecture.kwargs", {"num_classes": 7}), "model",
                                       r"variables: the saved variables do not fit the architecture: "
                                       r"params/dense/bias is \(4,\), the architecture's is \(7,\)"),
    "a bad preprocessing spec": (_edit("preprocessing.format", "x"), "model",
                                 r"model.json: preprocessing: format 'x' is not 'jaxcnn.preprocessing/1'"),
    "variables missing": (lambda p: shutil.rmtree(p / "variables"), "model",
                          r"variables: missing \(the saved model's weights\)"),
    "variables damaged": (_truncate_data, "model", r"variables: (cannot read|content differs)"),
    "digest differs": (_edit("variables.sha256", "0" * 64), "model",
                       r"variables: content differs from the digest in model.json \(damaged files\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_refuses_what_it_cannot_read_with_one_line_naming_the_file(saved, tmp_path, case):
  mutate, target, message = CASES[case]
  copy = tmp_path / "model"
  shutil.copytree(saved, copy)
  mutate(copy)
  with pytest.raises(CheckpointError, match=message) as info:
    train.load(tmp_path / target)
  assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)


def test_load_of_a_training_workdir_says_where_the_model_is(tmp_path):
  (tmp_path / "run" / "checkpoints").mkdir(parents=True)
  with pytest.raises(CheckpointError, match=r"run: no model.json: not a saved jaxcnn model; it looks like a "
                                            r"training workdir \(its trained model, when saved, is in its model/"):
    train.load(tmp_path / "run")


def test_save_never_overwrites_what_is_not_a_saved_model(registry_run, tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(CheckpointError, match=r"mine: exists and is not a saved jaxcnn model; not overwritten"):
    registry_run[0].save(tmp_path / "mine")
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_save_into_an_unwritable_place_is_one_line(registry_run, tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(StorageError, match=r"file/model: Not a directory") as info:
    registry_run[0].save(tmp_path / "file" / "model")
  assert "\n" not in str(info.value) and info.value.exit_code == 5


def test_save_on_a_full_disk_is_one_line_and_keeps_the_model_saved_before(registry_run, tmp_path):
  result, images, _ = registry_run
  result.save(tmp_path / "m")
  before = result.predict(images[:4])

  def full(path):
    if "variables" in str(path):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

  with storage.inject_faults(full), pytest.raises(StorageError, match=r"No space left on device; the disk is full") as info:
    result.save(tmp_path / "m")
  assert "\n" not in str(info.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no half-written copy beside it
  np.testing.assert_array_equal(train.load(tmp_path / "m").predict(images[:4]), before)


# -- bad input: one line naming the argument --------------------------------------------------------------------

def test_bad_inputs_and_targets_name_the_argument(registry_run, softmax_run):
  result, images, labels = registry_run
  with pytest.raises(ValueError, match=r"x: dtype float32, but the model was trained on uint8 inputs; pass uint8 "
                                       r"inputs as given to fit \(the run's preprocessing scales them by 0.00392157"):
    result.predict(images.astype(np.float32) / 255)
  with pytest.raises(ValueError, match=r"x: expected shape \(N, 28, 28, 1\) with N >= 1, got \(4, 32, 32, 1\)"):
    result.predict(np.zeros((4, 32, 32, 1), np.uint8))
  with pytest.raises(ValueError, match=r"x: shape \(28, 28, 1\) is one example; pass a batch \(N, 28, 28, 1\), "
                                       r"e.g. x\[None\]"):
    result.predict(images[0])
  with pytest.raises(ValueError, match=r"batch_size: expected a positive integer or None, got 0"):
    result.predict(images, batch_size=0)
  with pytest.raises(ValueError, match=r"y: expected 10 targets \(one per example of x\), got shape \(9,\)"):
    result.evaluate(images[:10], labels[:9])
  with pytest.raises(ValueError, match=r"y: targets \(3,\) float32 do not fit loss='softmax_cross_entropy' for "
                                       r"model outputs \(4,\)"):
    result.evaluate(images[:10], np.ones((10, 3), np.float32))
  with pytest.raises(ValueError, match=r"y: class ids must be in \[0, 4\) for the model's 4 outputs, got 0..9"):
    result.evaluate(images[:10], np.arange(10))
  softmax, x, y = softmax_run
  with pytest.raises(ValueError, match=r"y: targets \(\) int32 do not fit loss='categorical_crossentropy' for "
                                       r"model outputs \(4,\): categorical_crossentropy: labels of shape \(1,\) "
                                       r"are class ids"):
    softmax.evaluate(x[:4], y[:4].argmax(axis=1))


def test_a_softmax_model_with_a_logits_loss_is_refused_by_fit_the_trained_model_and_load(softmax_run, tmp_path):
  result, x, y = softmax_run
  double = r"loss='softmax_cross_entropy' takes logits, but the model ends in softmax \(layer 'dense'\): the " \
           r"softmax would be applied twice"
  with pytest.raises(ConfigError, match="^" + double):    # the loss's fault, not the targets'
    train.fit(_softmax_cnn(), (x, y), config=dict(FAST, loss="softmax_cross_entropy"))
  # predict and evaluate cannot be reached with it: the trained model itself refuses the combination
  with pytest.raises(ConfigError, match=double):
    train.TrainedModel(result.module, result.state, preprocessing=result.preprocessing,
                       config=dict(result.config.to_dict(), loss="softmax_cross_entropy"))
  path = result.save(tmp_path / "m")
  _edit("config.loss", "softmax_cross_entropy")(path)
  with pytest.raises(CheckpointError, match=r"m/model.json: " + double):
    train.load(path)
