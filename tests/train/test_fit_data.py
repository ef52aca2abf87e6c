"""fit on the data users have (any input rank, any target kind), its preprocessing spec, its feeds, and
continuing training honestly (never donated, the config's optimizer and freeze used, epochs counted)."""
from __future__ import annotations

import logging
import pathlib
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _train_models import StreamingView, make_arrays, make_data, make_model  # noqa: E402
from helpers import assert_close  # noqa: E402

from jaxcnn import data as data_lib  # noqa: E402
from jaxcnn import layers as L  # noqa: E402
from jaxcnn import train  # noqa: E402
from jaxcnn.errors import ConfigError  # noqa: E402

QUIET = dict(progress="none", log_every=2, learning_rate=0.01)


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _waves(n=48, seed=0):
  """(N, 16, 1) float waveforms: a sine whose frequency is the class (0, 1, 2), plus noise."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 3, n)
  t = np.linspace(0, 1, 16)
  waves = np.sin(2 * np.pi * (labels[:, None] + 1) * t) + 0.1 * rng.normal(size=(n, 16))
  return waves[..., None].astype(np.float64), labels


def test_conv1d_on_float_waveforms_with_one_hot_labels():
  waves, labels = _waves()
  model = L.Sequential([L.Conv1D(4, 3, activation="relu"), L.Flatten(), L.Dense(3)])
  one_hot = np.eye(3)[labels]
  result = train.fit(model, (waves, one_hot), config=dict(epochs=3, batch_size=8, validation_split=0.25, **QUIET))
  assert result.history["loss"][-1] < result.history["loss"][0]
  assert 0.0 <= result.history["val_accuracy"][-1] <= 1.0
  # floats: no scaling, no statistics, the shape untouched
  assert result.preprocessing["normalize"] == "none" and result.preprocessing["input_shape"] == [16, 1]
  np.testing.assert_array_equal(np.asarray(result.preprocess(waves[:2])), waves[:2].astype(np.float32))
  assert result.data == {"train_examples": 36, "validation_examples": 12, "batch_size": 8, "steps_per_epoch": 4}


def test_denoising_autoencoder_on_noisy_clean_float_arrays():
  rng = np.random.default_rng(0)
  clean = (make_arrays(32)[0] / 255.0).astype(np.float32)
  noisy = np.clip(clean + 0.3 * rng.normal(size=clean.shape), 0, 1)
  model = L.Sequential([L.Conv2D(4, 3, padding="same", activation="relu"), L.Conv2D(1, 3, padding="same")])
  config = dict(epochs=3, batch_size=8, loss="sigmoid_binary_cross_entropy", **QUIET)
  result = train.fit(model, (noisy, clean), config=config, val_data=(noisy[:8], clean[:8]))
  assert result.history["loss"][-1] < result.history["loss"][0]
  assert np.isfinite(result.history["val_loss"]).all()
  # and a regression onto the same float targets
  mse = train.fit(model, (noisy, clean), config={**config, "loss": "mse"})
  assert "accuracy" not in mse.history and mse.history["loss"][-1] < mse.history["loss"][0]


@pytest.mark.parametrize("targets, config, message", [
    (np.zeros((40, 5), np.float32), {}, r"train_data: targets \(5,\) float32 do not fit loss='softmax_cross_entropy' "
                                        r"for model outputs \(3,\)"),
    (np.full(40, 7), {}, r"class ids go up to 7 but the model has 3 outputs"),
    (np.zeros((40, 8, 8, 1), np.float32), dict(loss="mse"), r"targets \(8, 8, 1\) float32 do not fit loss='mse'"),
])
def test_targets_that_do_not_fit_the_loss_are_refused_before_compiling(targets, config, message):
  images, _ = make_arrays(40)
  train.TRACE_COUNTS.clear()
  with pytest.raises(ConfigError, match=message):
    train.fit(make_model(), (images, targets), config=dict(batch_size=8, **config, **QUIET))
  assert "train_chunk" not in train.TRACE_COUNTS


@pytest.mark.parametrize("head, loss, message", [
    # The course's two-class slip: Keras trains it and its accuracy stays at the majority class.
    (L.Dense(1, activation="softmax"), "binary_crossentropy", r"the model ends in a softmax over 1 output "
                                                              r"\(layer 'dense'\): the softmax of one value is always 1.0"),
    (L.Dense(1, activation="softmax"), "sparse_categorical_crossentropy", r"ends in a softmax over 1 output"),
    (L.Dense(1), "softmax_cross_entropy", r"loss='softmax_cross_entropy' takes a softmax over the model's outputs, "
                                          r"but the model has 1 output per example"),
    (L.Dense(1), "sparse_categorical_crossentropy", r"the model has 1 output per example"),
])
def test_a_softmax_over_one_output_is_refused_before_compiling(head, loss, message):
  images, labels = make_arrays(40)
  labels = (np.asarray(labels) % 2).astype(np.float32 if loss == "binary_crossentropy" else np.int32)
  if loss == "binary_crossentropy":
    labels = labels[:, None]
  train.TRACE_COUNTS.clear()
  model = L.Sequential([L.Flatten(), head])
  with pytest.raises(ConfigError, match=message) as caught:
    train.fit(model, (images, labels), config=dict(batch_size=8, loss=loss, **QUIET))
  assert "end in Dense(1, activation='sigmoid') with loss='binary_crossentropy'" in str(caught.value)  # the fix
  assert "train_chunk" not in train.TRACE_COUNTS


def test_one_sigmoid_output_and_two_softmax_outputs_train():
  # The two-class models the refusal above names train as usual.
  images, labels = make_arrays(40)
  labels = np.asarray(labels) % 2
  for head, loss, targets in ((L.Dense(1, activation="sigmoid"), "binary_crossentropy", labels[:, None].astype(np.float32)),
                              (L.Dense(2, activation="softmax"), "sparse_categorical_crossentropy", labels)):
    result = train.fit(L.Sequential([L.Flatten(), head]), (images, targets), config=dict(batch_size=8, loss=loss, **QUIET))
    assert np.isfinite(result.history["loss"]).all() and result.history["epoch"] == [1]


def test_inputs_the_model_cannot_take_and_augmentation_that_cannot_apply():
  waves, labels = _waves(16)
  with pytest.raises(ConfigError, match=r"model: cannot take train_data inputs \(16, 1\)"):
    train.fit(make_model(), (waves, labels), config=dict(batch_size=8, **QUIET))
  model = L.Sequential([L.Conv1D(2, 3), L.Flatten(), L.Dense(3)])
  with pytest.raises(ConfigError, match=r"train_data: augment: shifts, rotations, zooms and flips apply to image "
                                        r"inputs \(N, H, W, C\); these inputs are \(N, 16, 1\)"):
    train.fit(model, (waves, labels), config=dict(batch_size=8, horizontal_flip=True, **QUIET))
  with pytest.raises(ConfigError, match=r"train_data: images: .* non-finite"):
    train.fit(model, (np.full((16, 16, 1), np.nan), labels), config=dict(batch_size=8, **QUIET))


def test_preprocessing_is_computed_on_the_training_portion_and_returned():
  images, labels = make_arrays(80)
  result = train.fit(make_model(), (images, labels), config=dict(epochs=1, batch_size=16, validation_split=0.2,
                                                                 rotation_range=10.0, **QUIET))
  spec = result.preprocessing
  assert (spec["normalize"], spec["input_dtype"], spec["scale"]) == ("featurewise", "uint8", 1 / 255)
  np.testing.assert_allclose(spec["mean"], [images[:64].mean() / 255], rtol=1e-5)  # the last 16 are held out
  # The validation loss is the model on preprocess(spec, raw validation images): what predict will do.
  logits = make_model().apply(result.state.variables(), result.preprocess(images[64:]), train=False)
  expected = float(np.mean(train.softmax_cross_entropy(logits, labels[64:])))
  assert result.history["val_loss"][-1] == pytest.approx(expected, rel=1e-4)
  assert train.evaluate(result.state, make_model(), (images[64:], labels[64:]),
                        preprocessing=spec)["loss"] == pytest.approx(expected, rel=1e-4)


def test_a_pipeline_brings_its_own_preprocessing_and_config_keys_may_not_contradict_it():
  train_data, _ = make_data()  # normalize="scale"
  with pytest.raises(ConfigError, match=r"normalize='featurewise' but train_data was built with normalize='scale'"):
    train.fit(make_model(), train_data, config=dict(normalize="featurewise", **QUIET))
  with pytest.raises(ConfigError, match=r"augmentation keys are set but train_data was built with other"):
    train.fit(make_model(), train_data, config=dict(width_shift_range=0.1, **QUIET))
  result = train.fit(make_model(), train_data, config=dict(normalize="scale", **QUIET))
  assert result.preprocessing == train_data.preprocessing


# "none" is the "jit" strategy and feed on a one-device mesh: it is in the extended tier.
@pytest.mark.parametrize("parallel", [pytest.param("none", marks=pytest.mark.extended), "jit", "pmap"])
def test_host_fed_chunks_equal_device_resident_chunks(parallel):
  """The same chunk program fed from the host (prefetched chunks) or gathered on device: the same run."""
  train_data, val_data = make_data()
  model = make_model(dropout=0.0)
  config = dict(epochs=2, parallel=parallel, **QUIET)
  train.TRACE_COUNTS.clear()
  host = train.fit(make_model(dropout=0.0, axis_name=train.AXIS if parallel == "pmap" else None), train_data,
                   config={**config, "feed": "host"}, val_data=val_data)
  assert train.TRACE_COUNTS["train_chunk"] == 1 and "train_step" not in train.TRACE_COUNTS
  reference = train.fit(model, train_data, config={**config, "parallel": "none" if parallel == "none" else "jit"},
                        val_data=val_data)
  assert host.history["accuracy"] == reference.history["accuracy"]
  assert host.history["loss"] == pytest.approx(reference.history["loss"], rel=1e-5)
  jax.tree.map(lambda a, b: assert_close(a, b, rtol=1e-5, atol=2e-6), _flat(host.state.params),
               _flat(reference.state.params))
  if parallel == "jit":  # a pipeline offering only batches(): stacked into the same chunks
    streamed = train.fit(model, StreamingView(train_data), config=config, val_data=val_data)
    assert streamed.history["loss"] == pytest.approx(reference.history["loss"], rel=1e-5)


def test_feed_device_is_refused_where_it_cannot_be():
  train_data, _ = make_data()
  with pytest.raises(ConfigError, match=r"feed='device' is not possible here: the pipeline is not device-resident"):
    train.fit(make_model(), StreamingView(train_data), config=dict(feed="device", **QUIET))


def test_continuing_trains_more_epochs_never_donates_and_counts_them(tmp_path, caplog):
  train_data, val_data = make_data()
  first = train.fit(make_model(), train_data, config=dict(epochs=2, **QUIET), val_data=val_data)
  before = _flat(first.state.params)
  with caplog.at_level(logging.INFO, logger="jaxcnn.train.loop"):
    more = train.fit(make_model(), train_data, config=dict(epochs=2, **QUIET), val_data=val_data,
                     initial_state=first)
  assert "continuing from initial_state at step 8 (epoch 2): 2 more epochs" in caplog.text
  # the caller's state is intact (not donated) and unchanged
  assert all(np.array_equal(v, before[k]) for k, v in _flat(first.state.params).items())
  assert more.history["epoch"] == [3, 4] and more.trained_steps == 8
  assert int(more.state.epoch) == 4 and int(more.state.step) == 16
  assert more.preprocessing == first.preprocessing
  # twice more from the same state: the same result (nothing of the first continuation leaked back)
  again = train.fit(make_model(), train_data, config=dict(epochs=2, **QUIET), initial_state=first.state,
                    val_data=val_data)
  assert again.history == more.history


def test_continuing_uses_the_configs_optimizer_and_freeze_mask():
  train_data, _ = make_data()
  first = train.fit(make_model(), train_data, config=dict(epochs=1, **QUIET))
  # sgd at a learning rate of ~0 (the state's Adam would move the weights): nothing moves
  still = train.fit(make_model(), train_data, config=dict(epochs=1, optimizer="sgd", **{**QUIET, "learning_rate": 1e-30}),
                    initial_state=first.state)
  for key, value in _flat(still.state.params).items():
    assert_close(value, _flat(first.state.params)[key], rtol=0, atol=1e-20)
  assert still.history["lr"] == [pytest.approx(1e-30)]
  # a freeze mask the state was built without: the frozen layer ends bit-identical
  frozen = train.fit(make_model(), train_data, config=dict(epochs=1, freeze=("conv2d/.*",), **QUIET),
                     initial_state=first.state)
  np.testing.assert_array_equal(frozen.state.params["conv2d"]["kernel"], first.state.params["conv2d"]["kernel"])
  assert not np.array_equal(frozen.state.params["dense"]["kernel"], first.state.params["dense"]["kernel"])


def test_an_initial_state_of_another_model_or_mid_epoch_is_refused():
  train_data, _ = make_data()
  other = train.create_train_state(make_model(filters=6), (8, 8, 1), {})
  with pytest.raises(ConfigError, match="initial_state: its params do not fit the model"):
    train.fit(make_model(), train_data, config=QUIET, initial_state=other)
  mid = train.create_train_state(make_model(), (8, 8, 1), {})
  mid = mid.replace(epoch_step=mid.epoch_step + 2)
  with pytest.raises(ConfigError, match=r"initial_state: stopped in the middle of epoch 1 \(step 2\)"):
    train.fit(make_model(), train_data, config=QUIET, initial_state=mid)


def test_a_complete_run_trains_nothing_and_says_so(tmp_path, caplog):
  train_data, _ = make_data()
  config = dict(epochs=1, **QUIET)
  done = train.fit(make_model(), train_data, config=config, workdir=tmp_path)
  with caplog.at_level(logging.INFO, logger="jaxcnn.train.loop"):
    again = train.fit(make_model(), train_data, config=config, workdir=tmp_path)
  assert "is already complete (epoch 1 of 1): nothing to train" in caplog.text
  assert again.trained_steps == 0 and again.history == done.history
  assert all(np.array_equal(v, _flat(done.state.params)[k]) for k, v in _flat(again.state.params).items())


def test_config_train_of_default_config_parses_typed_placeholders():
  config = train.default_config(epochs=3, batch_size=None)
  assert set(config) == set(train.DEFAULTS) and config.epochs == 3
  config.batch_size = 64  # a typed placeholder: an int may be set later (e.g. by a flag)
  with pytest.raises(TypeError):
    config.batch_size = "64"
  assert train.validate_config(config).batch_size == 64
  with pytest.raises(ConfigError, match="unknown keys lr"):
    train.default_config(lr=0.1)
  assert data_lib.PREPROCESSING_FORMAT == "jaxcnn.preprocessing/1"
