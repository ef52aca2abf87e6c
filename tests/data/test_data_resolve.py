"""Dataset resolution and preparation (jaxcnn.data.resolve / builder): order, reuse, atomicity, errors."""
from __future__ import annotations

import json
import logging
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest
from conftest import make_split, write_idx_dir

from jaxcnn.data import (ResidentPipeline, StreamingPipeline, builder, load_arrays, make_pipeline, resolve,
                         split_validation)
from jaxcnn.data import datasets as resolve_module
from jaxcnn.errors import DataError


def test_raw_dir_is_prepared_once_then_reused(tiny_idx, tmp_path, caplog):
  raw, splits = tiny_idx
  tfds_dir = tmp_path / "tfds"
  with caplog.at_level(logging.INFO, logger="jaxcnn.data"):
    first = resolve("tiny_digits", data_dir=raw, tfds_data_dir=tfds_dir)
  assert first.source == "raw" and first.path == raw and first.prepared_now
  assert f"tiny_digits: resolved from raw dir {raw} (prepared tfds at {first.builder.data_dir}" in caplog.text
  info = pathlib.Path(str(first.builder.data_dir)) / "dataset_info.json"
  stamp = info.stat().st_mtime_ns
  second = resolve("tiny_digits", data_dir=raw.parent, tfds_data_dir=tfds_dir)  # the parent holds tiny_digits/
  assert not second.prepared_now and str(second.builder.data_dir) == str(first.builder.data_dir)
  assert info.stat().st_mtime_ns == stamp
  assert not [p for p in tfds_dir.rglob("*") if "incomplete" in p.name]
  for split in ("train", "test"):
    images, labels = second.read(split)
    np.testing.assert_array_equal(images[..., 0], splits[split][0])
    np.testing.assert_array_equal(labels, splits[split][1])
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    # the direct record parser agrees with tfds' own decoding of the same records
    records = second.builder.as_data_source(split=split).__getitems__(list(range(len(labels))))
    np.testing.assert_array_equal(np.stack([r["image"] for r in records]), images)
    np.testing.assert_array_equal([r["label"] for r in records], labels)


def test_preparing_leaves_nothing_in_the_system_temp_dir(tiny_idx, tmp_path, monkeypatch):
  """tfds looks a new builder's dataset up in its GCS bucket through a fresh temp dir and, finding
  nothing, left that dir behind: one empty /tmp/tmp*tfds per preparation. Nothing is left now."""
  raw, _ = tiny_idx
  temp = tmp_path / "system-temp"
  temp.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(temp))
  result = resolve("tiny_digits", data_dir=raw, tfds_data_dir=tmp_path / "tfds")
  assert result.prepared_now
  assert result.read("test")[0].shape[0] == 20
  assert sorted(p.name for p in temp.iterdir()) == []


def test_env_data_dir_and_tfds_dir(tiny_idx, tmp_path, monkeypatch):
  raw, splits = tiny_idx
  monkeypatch.setenv("JAXCNN_DATA_DIR", str(raw.parent))
  monkeypatch.setenv("JAXCNN_TFDS_DIR", str(tmp_path / "env_tfds"))
  images, _ = load_arrays("tiny_digits", "test")
  np.testing.assert_array_equal(images[..., 0], splits["test"][0])
  assert (tmp_path / "env_tfds" / "jaxcnn_raw").is_dir()


def test_changed_raw_content_is_prepared_again(tiny_idx, tmp_path):
  raw, splits = tiny_idx
  tfds_dir = tmp_path / "tfds"
  resolve("tiny_digits", data_dir=raw, tfds_data_dir=tfds_dir)
  new_test = make_split(20, 99)
  write_idx_dir(raw, {"test": new_test})
  again = resolve("tiny_digits", data_dir=raw, tfds_data_dir=tfds_dir)
  assert again.prepared_now
  np.testing.assert_array_equal(again.read("test")[0][..., 0], new_test[0])
  description = json.loads((pathlib.Path(str(again.builder.data_dir)) / "dataset_info.json").read_text())
  assert "content sha256" in json.dumps(description)


def test_a_half_prepared_dataset_is_not_taken_as_prepared(tiny_idx, tmp_path, monkeypatch):
  raw, splits = tiny_idx
  tfds_dir = tmp_path / "tfds"
  original = builder.JaxcnnRaw._generate_examples

  def failing(self, split):
    for i, example in enumerate(original(self, split)):
      if split == "test" and i == 5:
        raise RuntimeError("interrupted while writing")
      yield example

  monkeypatch.setattr(builder.JaxcnnRaw, "_generate_examples", failing)
  with pytest.raises(RuntimeError, match="interrupted while writing"):
    resolve("tiny_digits", data_dir=raw, tfds_data_dir=tfds_dir)
  monkeypatch.setattr(builder.JaxcnnRaw, "_generate_examples", original)
  assert not list(tfds_dir.rglob("dataset_info.json"))
  resolved = resolve("tiny_digits", data_dir=raw, tfds_data_dir=tfds_dir)
  assert resolved.prepared_now
  np.testing.assert_array_equal(resolved.read("test")[1], splits["test"][1])


def test_a_second_resolve_waits_for_one_preparing_the_same_dataset(tiny_idx, tmp_path, monkeypatch, caplog):
  # The first resolve is held inside its preparation (its lock taken, tfds writing); a second resolve of
  # the same content waits for it instead of preparing into the same directory, then reads what it wrote.
  raw, splits = tiny_idx
  tfds_dir = tmp_path / "tfds"
  original = builder.JaxcnnRaw._generate_examples
  release = threading.Event()

  def held(self, split):
    assert release.wait(120), "the test never released the first preparation"
    yield from original(self, split)

  monkeypatch.setattr(builder.JaxcnnRaw, "_generate_examples", held)
  results = {}

  def run(key):
    results[key] = resolve("tiny_digits", data_dir=raw, tfds_data_dir=tfds_dir, download=False)

  with caplog.at_level(logging.INFO, logger="jaxcnn.data"):
    first = threading.Thread(target=run, args=("first",))
    first.start()
    deadline = time.monotonic() + 120
    while ": preparing from" not in caplog.text and time.monotonic() < deadline:
      time.sleep(0.05)
    second = threading.Thread(target=run, args=("second",))
    second.start()
    while "another process is preparing this dataset; waiting" not in caplog.text and time.monotonic() < deadline:
      time.sleep(0.05)
    waited = "another process is preparing this dataset; waiting" in caplog.text
    release.set()
    first.join(120)
    second.join(120)
  assert waited, caplog.text
  assert results["first"].prepared_now and not results["second"].prepared_now
  assert str(results["second"].builder.data_dir) == str(results["first"].builder.data_dir)
  assert caplog.text.count(": preparing from") == 1
  for split in ("train", "test"):
    images, labels = results["second"].read(split)
    np.testing.assert_array_equal(images[..., 0], splits[split][0])
    np.testing.assert_array_equal(labels, splits[split][1])


def test_a_builder_made_just_before_another_process_finished_is_made_again(tiny_idx, tmp_path, monkeypatch):
  # The window two processes started together hit: this process makes its builder while the dataset is not
  # there yet, another process finishes preparing it, and only then does this one look at the files. The
  # builder it made describes an unprepared dataset (no splits); the one it returns must read the data.
  raw, splits = tiny_idx
  tfds_dir = tmp_path / "tfds"
  original = builder.make_builder
  made = []

  def made_then_prepared_elsewhere(config, data_dir):
    made.append(config.name)
    stale = original(config, data_dir)
    if len(made) == 1:
      assert not stale.is_prepared() and not stale.info.splits
      assert builder.prepare(original(config, data_dir))  # "the other process"
    return stale

  monkeypatch.setattr(builder, "make_builder", made_then_prepared_elsewhere)
  resolved = resolve("tiny_digits", data_dir=raw, tfds_data_dir=tfds_dir, download=False)
  for split in ("train", "test"):
    images, labels = resolved.read(split)
    np.testing.assert_array_equal(images[..., 0], splits[split][0])
    np.testing.assert_array_equal(labels, splits[split][1])
  assert not resolved.prepared_now and len(made) == 2


_PREPARE_ONCE = """
import sys
from jaxcnn.data import resolve
resolved = resolve(sys.argv[1], data_dir=sys.argv[2], tfds_data_dir=sys.argv[3], download=False)
print(resolved.prepared_now, len(resolved.read("train")[1]))
"""


def test_processes_started_together_prepare_one_dataset_once(tiny_idx, tmp_path):
  # Two commands on a fresh machine (or two test workers) resolving the same files at the same moment.
  raw, _ = tiny_idx
  tfds_dir = tmp_path / "tfds"
  env = dict(os.environ, JAXCNN_DATA_DIR="", JAXCNN_TFDS_DIR="", JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", _PREPARE_ONCE, "tiny_digits", str(raw), str(tfds_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
  outputs = [proc.communicate(timeout=300) for proc in procs]
  assert [proc.returncode for proc in procs] == [0, 0, 0], "\n\n".join(  # each failed process: its stderr
      f"process {i} (exit {proc.returncode}):\n{err[-3000:]}" for i, (proc, (_, err)) in enumerate(zip(procs, outputs))
      if proc.returncode)
  assert sorted(out for out, _ in outputs) == ["False 60\n", "False 60\n", "True 60\n"], outputs
  assert len(list(tfds_dir.rglob("dataset_info.json"))) == 1
  assert not [p for p in tfds_dir.rglob("*") if "incomplete" in p.name]


def test_system_location_is_used_when_no_raw_dir_is_given(tmp_path, monkeypatch):
  system = tmp_path / "usr_share_datasets"
  splits = {"train": make_split(10, 3), "test": make_split(4, 4)}
  write_idx_dir(system / "tiny-digits", splits)
  monkeypatch.setattr(resolve_module, "SYSTEM_DIRS", (system,))
  monkeypatch.delenv("JAXCNN_DATA_DIR", raising=False)
  resolved = resolve("tiny_digits", tfds_data_dir=tmp_path / "tfds")
  assert resolved.source == "system" and resolved.path == system / "tiny-digits"


def test_nothing_resolves_one_message_nothing_written(tmp_path, monkeypatch):
  monkeypatch.setattr(resolve_module, "SYSTEM_DIRS", (tmp_path / "system",))
  empty = tmp_path / "empty"
  (empty / "mnist").mkdir(parents=True)
  (empty / "mnist" / "train-images-idx3-ubyte.gz").write_bytes(b"")
  tfds_dir = tmp_path / "tfds"
  with pytest.raises(DataError) as info:
    resolve("mnist", data_dir=empty, tfds_data_dir=tfds_dir, download=False)
  message = str(info.value)
  assert "\n" not in message and info.value.exit_code == 2
  assert message.startswith("mnist: dataset not found; looked in ")
  for part in (f"{empty}: no IDX files", f"{empty / 'mnist'}: missing train-labels-idx1-ubyte.gz, "
               "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz", f"{tmp_path / 'system' / 'mnist'}: absent",
               f"tfds data dir {tfds_dir}: not prepared", "tfds download: disabled",
               "Put train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
               f"t10k-labels-idx1-ubyte.gz in {empty / 'mnist'}/"):
    assert part in message
  assert not tfds_dir.exists()
  with pytest.raises(DataError, match=r"^tiny_digits: dataset not found; .*tfds catalog: not a catalog dataset"):
    resolve("tiny_digits", data_dir=empty, tfds_data_dir=tfds_dir, download=False)
  with pytest.raises(DataError, match=r"cifar10: dataset not found; .*Put data_batch_1.bin .* in "
                     r".*empty/cifar10/cifar-10-batches-bin/$"):
    resolve("cifar10", data_dir=empty, tfds_data_dir=tfds_dir, download=False)
  monkeypatch.delenv("JAXCNN_DATA_DIR", raising=False)
  with pytest.raises(DataError, match=r"raw dir: none given .* in <dir>/fashion_mnist/ and pass "
                     r"data_dir=<dir> \(or set JAXCNN_DATA_DIR=<dir>\)$"):
    resolve("fashion_mnist", tfds_data_dir=tfds_dir, download=False)
  assert not tfds_dir.exists()


def test_validation_split_is_a_fixed_disjoint_slice_of_train():
  train, held = split_validation(60, 0.1)
  assert len(held) == 6 and len(train) == 54
  assert not set(train) & set(held) and sorted(set(train) | set(held)) == list(range(60))
  np.testing.assert_array_equal(held, split_validation(60, 0.1)[1])
  with pytest.raises(ValueError, match=r"validation_split: expected a fraction in \[0, 1\)"):
    split_validation(60, 1.0)


def test_make_pipeline_splits_and_shared_training_stats(tiny_idx, tmp_path):
  raw, splits = tiny_idx
  kw = dict(data_dir=raw, tfds_data_dir=tmp_path / "tfds", validation_split=0.1, batch_size=4, seed=0)
  train = make_pipeline("tiny_digits", "train", **kw)
  valid = make_pipeline("tiny_digits", "validation", **kw)
  test = make_pipeline("tiny_digits", "test", stats=train.stats, **kw)
  assert isinstance(train, ResidentPipeline) and train.shuffle and not valid.shuffle
  assert (train.num_examples, valid.num_examples, test.num_examples) == (54, 6, 20)
  assert train.image_shape == (6, 5, 1) and train.num_classes == 10 and train.class_names[3] == "3"
  keep, _ = split_validation(60, 0.1)
  portion = splits["train"][0][keep].astype(np.float64) / 255
  np.testing.assert_allclose(train.stats["mean"], [portion.mean()], rtol=1e-5)
  np.testing.assert_allclose(train.stats["std"], [portion.std()], rtol=1e-5)
  np.testing.assert_array_equal(valid.stats["mean"], train.stats["mean"])  # computed from train, not itself
  streaming = make_pipeline("tiny_digits", "test", resident=False, stats=train.stats, **kw)
  assert isinstance(streaming, StreamingPipeline)
  for a, b in zip(test.batches(0), streaming.batches(0), strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  resized = load_arrays("tiny_digits", "test", data_dir=raw, tfds_data_dir=tmp_path / "tfds", image_size=(8, 10))
  assert resized[0].shape == (20, 8, 10, 1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(split="valid"), "split: expected one of"),
    (dict(split="validation"), "split: 'validation' needs validation_split > 0"),
    (dict(resident="yes"), "resident: expected True, False or 'auto'"),
])
def test_bad_make_pipeline_arguments(tiny_idx, tmp_path, kwargs, message):
  raw, _ = tiny_idx
  args = dict(split="train", batch_size=4, seed=0, data_dir=raw, tfds_data_dir=tmp_path / "tfds")
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    make_pipeline("tiny_digits", **args)


_FULL_LOAD = """
import sys
from jaxcnn.data import load_arrays
name = sys.argv[2]
for split, count in (("train", 60000), ("test", 10000)):
  images, labels = load_arrays(name, split, tfds_data_dir=sys.argv[1], download=False)
  assert images.shape == (count, 28, 28, 1) and images.dtype.name == "uint8", images.shape
  assert labels.shape == (count,) and sorted(set(labels.tolist())) == list(range(10))
  print("count", split, images.shape[0])
print("tensorflow imported:", "tensorflow" in sys.modules)
"""


# Fashion-MNIST goes through the same IDX loader and builder as MNIST (its files are read in full by
# test_exp_transfer's different-domain case in the default run): a repetition, in the extended tier.
@pytest.mark.parametrize("name", ["mnist", pytest.param("fashion_mnist", marks=pytest.mark.extended)])
def test_real_dataset_loads_fully_without_tensorflow(shared_datasets, tmp_path, name):
  env = dict(os.environ, JAXCNN_DATA_DIR=str(shared_datasets), JAXCNN_TFDS_DIR="", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _FULL_LOAD, str(tmp_path / "tfds"), name], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = result.stdout.strip().splitlines()
  assert lines[-1] == "tensorflow imported: False"
  counts = {line.split()[1]: int(line.split()[2]) for line in lines if line.startswith("count ")}
  assert counts == {"train": 60000, "test": 10000}
  assert len(list((tmp_path / "tfds").rglob("dataset_info.json"))) == 1  # prepared once, then reused


class _OfflineCatalogBuilder:
  """Stands in for a tfds catalog builder on a machine without network: download fails, writing a dir first."""

  name = "mnist"

  def __init__(self, root: pathlib.Path):
    self.data_dir_root = root
    self.data_dir = self.data_path = root / "mnist" / "3.0.1"

  def is_prepared(self):
    return False

  def download_and_prepare(self, **kwargs):
    (self.data_dir_root / "downloads").mkdir(parents=True)  # a partial download, as tfds leaves it
    raise ConnectionError("Failed to establish a new connection: [Errno 101] Network is unreachable")


def test_catalog_steps_come_after_raw_dirs_prepared_then_download(tiny_idx, tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  monkeypatch.setattr(resolve_module, "SYSTEM_DIRS", ())
  monkeypatch.delenv("JAXCNN_DATA_DIR", raising=False)
  raw, splits = tiny_idx
  # (c): a dataset already prepared in the tfds data dir is used (here one prepared from the tiny files).
  prepared = resolve("tiny_digits", data_dir=raw, tfds_data_dir=tmp_path / "tfds").builder
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: prepared)
  found = resolve("mnist", tfds_data_dir=tmp_path / "tfds")
  assert found.source == "tfds" and str(found.path) == str(prepared.data_dir)
  np.testing.assert_array_equal(found.read("test")[1], splits["test"][1])
  # (d): not prepared and the download fails offline: reported, and what it wrote is removed.
  offline_root = tmp_path / "offline_tfds"
  offline_root.mkdir()
  monkeypatch.setattr(tfds, "builder", lambda name, data_dir=None: _OfflineCatalogBuilder(offline_root))
  hidden = []  # TensorFlow is kept off accelerators before a catalog download (not imported here: slow)
  monkeypatch.setattr(resolve_module, "_hide_accelerators_from_tf", lambda: hidden.append(True))
  with pytest.raises(DataError, match=r"tfds download: failed \(ConnectionError: Failed to establish"):
    resolve("mnist", tfds_data_dir=offline_root)
  assert list(offline_root.iterdir()) == [] and hidden == [True]


_PREPARE_TWICE = """
import logging, sys
logging.basicConfig(level=logging.INFO)  # everything, tfds' and absl's INFO lines included
from jaxcnn.data import resolve
for _ in range(2):
  resolve(sys.argv[1], data_dir=sys.argv[2], tfds_data_dir=sys.argv[3], download=False).read("train")
print("tensorflow imported:", "tensorflow" in sys.modules)
"""


def test_preparing_local_files_says_so_in_one_line_without_download_claims_or_progress_bars(tiny_idx, tmp_path):
  raw, _ = tiny_idx
  tfds_dir = tmp_path / "tfds"
  env = dict(os.environ, JAXCNN_DATA_DIR="", JAXCNN_TFDS_DIR="", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", _PREPARE_TWICE, "tiny_digits", str(raw), str(tfds_dir)], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)  # not a TTY
  assert result.returncode == 0, result.stderr[-3000:]
  output = result.stdout + result.stderr
  assert "Download" not in output and "download" not in output, output
  assert "\x1b[" not in output and "\r" not in output, output  # no tqdm redraws or escape codes
  assert "dataset_info.json" not in output, output
  lines = output.strip().splitlines()
  assert len(lines) == len(set(lines)), output
  (prepared_dir,) = [p.parent for p in tfds_dir.rglob("dataset_info.json")]
  preparing = [line for line in lines if ": preparing " in line]
  assert preparing == [
      f"INFO:jaxcnn.data:tiny_digits: preparing from {raw} (raw IDX files) into {prepared_dir}"], output
  logged = result.stderr.strip().splitlines()  # the log lines, in order: all that was printed there
  assert len(logged) == 3 and logged[0] == preparing[0], output
  assert logged[1].endswith(", prepared now)") and logged[2].endswith(f"{prepared_dir})")  # then reused
  assert result.stdout == "tensorflow imported: False\n"


def test_progress_bar_setting_is_restored_after_preparing(tiny_idx, tmp_path):
  from tensorflow_datasets.core.utils import tqdm_utils

  raw, _ = tiny_idx
  before = tqdm_utils._active
  try:
    for setting in (True, False):
      tqdm_utils._active = setting
      resolve("tiny_digits", data_dir=raw, tfds_data_dir=tmp_path / f"tfds_{setting}")
      assert tqdm_utils._active is setting  # off while preparing (stderr is captured), then as it was
  finally:
    tqdm_utils._active = before
