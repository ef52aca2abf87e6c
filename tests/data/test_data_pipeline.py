"""Input pipelines (jaxcnn.data.pipeline): determinism, coverage, resume, sharding, streaming shards."""
from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn.data import ArraySource, AugmentConfig, StreamingPipeline, from_arrays
from jaxcnn.data.pipeline import _prefetch, shuffle_positions, shuffle_positions_host
from helpers import assert_close

N = 37


def _arrays(n=N, hw=(4, 3)):
  """uint8 images whose every pixel is the example's index (so a batch names its examples), labels i % 5."""
  images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None], (n, *hw, 1)).copy()
  return images, (np.arange(n) % 5).astype(np.int32)


def _ids(batch) -> np.ndarray:
  """Example indices of a batch made with normalize="none" from `_arrays`."""
  return np.asarray(batch["image"])[:, 0, 0, 0].round().astype(int)


def _collect(batches):
  return [jax.tree.map(np.asarray, b) for b in batches]


def test_same_seed_same_batches_different_seed_differs():
  images, labels = _arrays()
  config = AugmentConfig(horizontal_flip=True)
  a = _collect(from_arrays(images, labels, batch_size=8, seed=3, augment=config).batches(0))
  b = _collect(from_arrays(images, labels, batch_size=8, seed=3, augment=config).batches(0))
  c = _collect(from_arrays(images, labels, batch_size=8, seed=4, augment=config).batches(0))
  for x, y in zip(a, b):
    jax.tree.map(np.testing.assert_array_equal, x, y)
  assert any(not np.array_equal(x["label"], y["label"]) for x, y in zip(a, c))


_shuffle = jax.jit(shuffle_positions, static_argnums=2)


@pytest.mark.parametrize("n", [1, 2, 3, 37, 1000, 4097])
def test_shuffle_positions_is_a_permutation(n):
  order = np.asarray(_shuffle(jnp.arange(n), jax.random.key(n), n))
  np.testing.assert_array_equal(np.sort(order), np.arange(n))
  # the numpy twin that host readers use draws the same permutation
  np.testing.assert_array_equal(shuffle_positions_host(np.arange(n), jax.random.key(n), n), order)


def test_shuffle_positions_looks_random_and_depends_on_the_key():
  n = 1000
  a = np.asarray(_shuffle(jnp.arange(n), jax.random.key(0), n)).astype(np.int64)
  b = np.asarray(_shuffle(jnp.arange(n), jax.random.key(1), n)).astype(np.int64)
  assert np.mean(a == b) < 0.02 and np.sum(a == np.arange(n)) < 10
  rho = np.corrcoef(np.arange(n), a)[0, 1]
  lag = np.corrcoef(a[:-1], a[1:])[0, 1]
  assert abs(rho) < 0.1 and abs(lag) < 0.1
  np.testing.assert_array_equal(a[100:200], np.asarray(_shuffle(jnp.arange(100, 200), jax.random.key(0), n)))


def test_training_epoch_drops_remainder_and_reshuffles_per_epoch():
  images, labels = _arrays()
  pipe = from_arrays(images, labels, batch_size=8, seed=0, normalize="none")
  assert pipe.steps_per_epoch == N // 8 and pipe.num_examples == N
  epoch0 = np.concatenate([_ids(b) for b in pipe.batches(0)])
  epoch1 = np.concatenate([_ids(b) for b in pipe.batches(1)])
  assert len(set(epoch0)) == len(epoch0) == 32 and set(epoch0) <= set(range(N))
  assert not np.array_equal(epoch0, epoch1)
  batch = next(pipe.batches(0))
  np.testing.assert_array_equal(batch["label"], _ids(batch) % 5)  # labels travel with their images
  np.testing.assert_array_equal(batch["mask"], np.ones(8))
  assert batch["image"].dtype == jnp.float32 and batch["label"].dtype == jnp.int32


def test_eval_covers_every_example_once_with_padding_masked():
  images, labels = _arrays()
  pipe = from_arrays(images, labels, batch_size=8, seed=0, shuffle=False, normalize="none")
  assert pipe.steps_per_epoch == 5
  batches = _collect(pipe.batches(0))
  ids = np.concatenate([_ids(b) for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  np.testing.assert_array_equal(ids[mask == 1], np.arange(N))
  np.testing.assert_array_equal(mask, (np.arange(40) < N).astype(np.float32))


def test_batches_equal_jitted_batch_fn_and_resume_mid_epoch():
  images, labels = _arrays()
  pipe = from_arrays(images, labels, batch_size=8, seed=1, augment=AugmentConfig(width_shift_range=0.3))
  full = _collect(pipe.batches(2))
  batch_fn = jax.jit(pipe.batch_fn)
  for step, batch in enumerate(full):
    jax.tree.map(np.testing.assert_array_equal, batch,
                 jax.tree.map(np.asarray, batch_fn(pipe.device_arrays(), np.int32(2), np.int32(step))))
  resumed = _collect(pipe.batches(2, start_step=2))
  assert pipe.position == (2, pipe.steps_per_epoch)
  for x, y in zip(full[2:], resumed, strict=True):
    jax.tree.map(np.testing.assert_array_equal, x, y)


def test_an_epoch_as_one_lax_scan():
  images, labels = _arrays()
  pipe = from_arrays(images, labels, batch_size=8, seed=2, normalize="none")

  @jax.jit
  def epoch_sum(arrays):
    def body(total, step):
      batch = pipe.batch_fn(arrays, jnp.int32(0), step)
      return total + jnp.sum(batch["label"]), None
    return jax.lax.scan(body, jnp.int32(0), jnp.arange(pipe.steps_per_epoch, dtype=jnp.int32))[0]

  expected = sum(int(np.sum(b["label"])) for b in pipe.batches(0))
  assert int(epoch_sum(pipe.device_arrays())) == expected


def test_batches_are_laid_out_with_the_given_sharding():
  mesh = jax.make_mesh((4,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  images, labels = _arrays()
  batch = next(from_arrays(images, labels, batch_size=8, seed=0, sharding=sharding).batches(0))
  for leaf in jax.tree.leaves(batch):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)
  stream = StreamingPipeline(ArraySource(images, labels), image_shape=(4, 3, 1), batch_size=8, seed=0,
                             sharding=sharding)
  for leaf in jax.tree.leaves(next(stream.batches(0))):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)


def test_eval_pipeline_shares_the_training_stats():
  images, labels = _arrays()
  train = from_arrays(images, labels, batch_size=8, seed=0)
  np.testing.assert_allclose(train.stats["mean"], [images.mean() / 255], rtol=1e-6)
  evaluation = from_arrays(images[:10], labels[:10], batch_size=4, seed=0, shuffle=False, stats=train.stats)
  np.testing.assert_array_equal(evaluation.stats["mean"], train.stats["mean"])
  assert from_arrays(images, labels, batch_size=8, seed=0, normalize="scale").stats is None


def test_streaming_matches_resident_for_the_same_examples():
  images, labels = _arrays()
  kw = dict(batch_size=8, seed=0, shuffle=False, normalize="scale")
  resident = _collect(from_arrays(images, labels, **kw).batches(0))
  streaming = _collect(StreamingPipeline(ArraySource(images, labels), image_shape=(4, 3, 1), **kw).batches(0))
  for x, y in zip(resident, streaming, strict=True):
    jax.tree.map(np.testing.assert_array_equal, x, y)


def test_streaming_is_deterministic_and_resumes_exactly():
  images, labels = _arrays()

  def make(seed):
    return StreamingPipeline(ArraySource(images, labels), image_shape=(4, 3, 1), batch_size=8, seed=seed,
                             normalize="none")

  a, b, c = (_collect(make(s).batches(1)) for s in (5, 5, 6))
  for x, y in zip(a, b):
    jax.tree.map(np.testing.assert_array_equal, x, y)
  assert any(not np.array_equal(_ids(x), _ids(y)) for x, y in zip(a, c))
  pipe = make(5)
  resumed = _collect(pipe.batches(1, start_step=3))
  assert pipe.position == (1, 4)
  for x, y in zip(a[3:], resumed, strict=True):
    jax.tree.map(np.testing.assert_array_equal, x, y)


@pytest.mark.parametrize("shuffle", [True, False])
def test_two_processes_read_disjoint_shards_that_together_are_complete(shuffle):
  images, labels = _arrays()
  pipes = [StreamingPipeline(ArraySource(images, labels), image_shape=(4, 3, 1), batch_size=8, seed=9,
                             shuffle=shuffle, normalize="none", process_index=p, process_count=2)
           for p in (0, 1)]
  assert pipes[0].local_batch_size == 4
  global_order = pipes[0].order(0)
  for step in range(pipes[0].steps_per_epoch):
    shards = [p.local_indices(0, step) for p in pipes]
    real = [idx[mask == 1] for idx, mask in shards]
    assert not set(real[0]) & set(real[1])
    expected = global_order[step * 8:(step + 1) * 8]
    assert sorted(np.concatenate(real)) == sorted(expected)
  read = [np.concatenate([_ids(b)[np.asarray(b["mask"]) == 1] for b in p.batches(0)]) for p in pipes]
  assert not set(read[0]) & set(read[1])
  covered = np.sort(np.concatenate(read))
  if shuffle:
    assert len(covered) == 32 and len(set(covered)) == 32
  else:
    np.testing.assert_array_equal(covered, np.arange(N))


class _FailingSource(ArraySource):
  def read(self, indices):
    if self.calls == 2:
      raise OSError("disk went away")
    self.calls += 1
    return super().read(indices)


def test_streaming_worker_errors_surface_in_the_consumer():
  images, labels = _arrays()
  source = _FailingSource(images, labels)
  source.calls = 0
  pipe = StreamingPipeline(source, image_shape=(4, 3, 1), batch_size=8, seed=0, normalize="none")
  got = []
  with pytest.raises(OSError, match="disk went away"):
    for batch in pipe.batches(0):
      got.append(batch)
  assert len(got) == 2


def test_prefetch_stops_its_thread_when_the_consumer_stops_early():
  before = threading.active_count()
  reads = []
  gen = _prefetch(lambda s: reads.append(s) or s, range(1000))
  assert next(gen) == (0, 0)
  gen.close()
  assert threading.active_count() == before
  assert len(reads) <= 4  # read ahead by at most the queue size (+1 in flight)


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch_size=0), "batch_size: expected a positive int"),
    (dict(batch_size=40), "batch_size: 40 exceeds the 37 examples"),
    (dict(seed=1.5), "seed: expected an int"),
    (dict(normalize="minmax"), "normalize: expected one of"),
    (dict(augment={"horizontal_flip": True}), "augment: expected an AugmentConfig"),
    (dict(stats={"mean": [0.0, 1.0], "std": [1.0, 1.0]}), r"stats: expected 'mean' and 'std' of shape \(1,\)"),
    (dict(class_names=["a", "b"]), "labels: class id 4 out of range for 2 classes"),
])
def test_bad_pipeline_arguments_are_rejected(kwargs, message):
  images, labels = _arrays()
  args = dict(batch_size=8, seed=0)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    from_arrays(images, labels, **args)


@pytest.mark.parametrize("images,labels,message", [
    (np.array([[0.0, np.nan], [1.0, 2.0], [np.inf, 0.0], [3.0, 3.0]]), np.zeros(4, int),
     r"images: 2 non-finite values \(NaN/Inf\), in 2 examples starting with example 0"),
    (np.zeros(4, np.float32), np.zeros(4, int), r"images: expected one example per row, shape \(N, \.\.\.\)"),
    (np.zeros((4, 2), np.str_), np.zeros(4, int), "images: expected numeric inputs"),
    (np.zeros((0, 2, 2, 1), np.uint8), np.zeros(0, int), r"images: the dataset is empty"),
    (np.zeros((4, 2, 2, 1), np.uint8), np.zeros(3, int), r"labels: expected shape \(4,\)"),
    (np.zeros((4, 2, 2, 1), np.uint8), np.array(["a"] * 4), "labels: expected integer class ids or float targets"),
    (np.zeros((4, 2, 2, 1), np.uint8), np.full((4, 3), np.nan), "labels: 12 non-finite values"),
    (np.zeros((4, 2, 2, 1), np.uint8), -np.ones(4, int), "labels: class ids must be >= 0"),
])
def test_bad_arrays_are_rejected(images, labels, message):
  with pytest.raises(ValueError, match=message):
    from_arrays(images, labels, batch_size=2, seed=0)


def test_any_input_rank_and_target_kind_passes_unreshaped():
  rng = np.random.default_rng(0)
  waves = rng.normal(size=(12, 9, 2))                       # (N, L, C) float64 waveforms
  for targets, classes in ((rng.integers(0, 3, 12), 3), (np.eye(4)[rng.integers(0, 4, 12)], 4),
                           (rng.normal(size=(12, 9, 2)), None)):
    pipe = from_arrays(waves, targets, batch_size=4, seed=0, shuffle=False)
    assert pipe.image_shape == (9, 2) and pipe.preprocessing["normalize"] == "none"
    batch = next(pipe.batches(0))
    assert batch["image"].dtype == jnp.float32 and batch["image"].shape == (4, 9, 2)
    np.testing.assert_allclose(batch["image"], waves[:4].astype(np.float32))
    np.testing.assert_allclose(batch["label"], np.asarray(targets[:4], batch["label"].dtype))
    assert pipe.num_classes == (classes if classes else None)
  # featurewise statistics of float inputs: per channel (last axis), no 1/255
  pipe = from_arrays(waves, np.zeros(12, int), batch_size=4, seed=0, normalize="featurewise")
  np.testing.assert_allclose(pipe.stats["mean"], waves.reshape(-1, 2).mean(0), rtol=1e-5)
  assert pipe.preprocessing["scale"] == 1.0
  with pytest.raises(ValueError, match=r"augment: shifts, rotations, zooms and flips apply to image inputs "
                                       r"\(N, H, W, C\); these inputs are \(N, 9, 2\)"):
    from_arrays(waves, np.zeros(12, int), batch_size=4, seed=0, augment=AugmentConfig(horizontal_flip=True))


def test_resident_and_streaming_draw_the_same_shuffled_batches():
  """One permutation of (seed, epoch): computed on device by batch_fn, in numpy by read()."""
  images, labels = _arrays()
  config = AugmentConfig(width_shift_range=0.3, horizontal_flip=True)
  resident = from_arrays(images, labels, batch_size=8, seed=4, augment=config)
  streaming = StreamingPipeline(ArraySource(images, labels), image_shape=(4, 3, 1), batch_size=8, seed=4,
                                augment=config, process_index=0, process_count=1)
  transform = jax.jit(resident.transform)
  for epoch in (0, 3):
    np.testing.assert_array_equal(resident.order(epoch), streaming.order(epoch))
    for step, (a, b) in enumerate(zip(_collect(resident.batches(epoch)), _collect(streaming.batches(epoch)),
                                      strict=True)):
      np.testing.assert_array_equal(a["label"], b["label"])
      assert_close(a["image"], b["image"])
      # the host-read rows, finished on device, are the device-gathered batch (up to fusion rounding)
      host = transform(resident.read(epoch, step), np.int32(epoch), np.int32(step))
      np.testing.assert_array_equal(np.asarray(host["label"]), a["label"])
      assert_close(np.asarray(host["image"]), a["image"])


def test_preprocessing_spec_round_trips_through_json_and_matches_the_batches():
  import json
  from jaxcnn.data import check_preprocessing, preprocess
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (20, 5, 4, 3), dtype=np.uint8)
  pipe = from_arrays(images, np.zeros(20, int), batch_size=5, seed=0, shuffle=False)
  spec = json.loads(json.dumps(pipe.preprocessing))
  assert spec == check_preprocessing(pipe.preprocessing)
  assert (spec["normalize"], spec["input_dtype"], spec["input_shape"]) == ("featurewise", "uint8", [5, 4, 3])
  np.testing.assert_allclose(spec["mean"], (images / 255.0).reshape(-1, 3).mean(0), rtol=1e-5)
  expected = (images.astype(np.float32) / 255 - np.float32(spec["mean"])) / (np.float32(spec["std"]) + 1e-6)
  batches = np.concatenate([np.asarray(b["image"]) for b in pipe.batches(0)])
  assert_close(batches, expected)
  assert_close(np.asarray(jax.jit(lambda x: preprocess(spec, x))(images)), batches)
  # validation data given the spec is prepared with it, not with statistics of its own
  other = from_arrays(images[:5] // 2, np.zeros(5, int), batch_size=5, seed=0, shuffle=False, preprocessing=spec)
  assert other.preprocessing == spec
  with pytest.raises(ValueError, match=r"inputs: dtype float32, but the run was trained on uint8 inputs"):
    preprocess(spec, images.astype(np.float32) / 255)
  with pytest.raises(ValueError, match=r"inputs: expected shape \(N, 5, 4, 3\), got \(2, 4, 4, 3\)"):
    preprocess(spec, images[:2, :4])
  with pytest.raises(ValueError, match="preprocessing: format"):
    preprocess({**spec, "format": "other/9"}, images)


def test_bad_positions_and_process_layout_are_rejected():
  images, labels = _arrays()
  pipe = from_arrays(images, labels, batch_size=8, seed=0)
  with pytest.raises(ValueError, match=r"start_step: expected an int in \[0, 4\]"):
    next(pipe.batches(0, start_step=5))
  with pytest.raises(ValueError, match="epoch: expected an int >= 0"):
    next(pipe.batches(-1))
  with pytest.raises(ValueError, match="batch_size: 9 is not divisible by the process count 2"):
    StreamingPipeline(ArraySource(images, labels), image_shape=(4, 3, 1), batch_size=9, seed=0,
                      process_index=0, process_count=2)
  with pytest.raises(ValueError, match="process_index: expected 0 <= index < process_count"):
    StreamingPipeline(ArraySource(images, labels), image_shape=(4, 3, 1), batch_size=8, seed=0,
                      process_index=2, process_count=2)
