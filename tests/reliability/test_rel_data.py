"""Bad data: every defect stops the run before training with one line naming the file (exit 2) and writes
nothing; image folders skip bad files and report each by name.

Two defects go through the real command (each run costs a process start); the rest, and those covered
file by file in tests/data (corrupt gzip, truncated content, swapped files, altered SHA-256), through
jaxcnn.data.
"""
from __future__ import annotations

import gzip
import logging
import pathlib
import shutil
import sys

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _rel_common import idx_content, mnist_cli, read_idx, write_tiny_mnist  # noqa: E402

from jaxcnn.data import image_folder, make_pipeline, resolve  # noqa: E402
from jaxcnn.errors import DataError  # noqa: E402


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  return write_tiny_mnist(tmp_path_factory.mktemp("pristine"), train=64, test=32)


def _damaged_copy(pristine: pathlib.Path, target: pathlib.Path, damage) -> pathlib.Path:
  shutil.copytree(pristine / "tiny_digits", target / "tiny_digits")
  return damage(target / "tiny_digits")


def _rewrite(path: pathlib.Path, array: np.ndarray, magic: int | None = None) -> pathlib.Path:
  path.write_bytes(gzip.compress(idx_content(array, magic), mtime=0))
  return path


def _truncate(d):
  path = d / "train-images-idx3-ubyte.gz"
  path.write_bytes(path.read_bytes()[:-40])
  return path


def _wrong_magic(d):
  path = d / "t10k-labels-idx1-ubyte.gz"
  return _rewrite(path, read_idx(path), magic=2051)


def _label_out_of_range(d):
  path = d / "train-labels-idx1-ubyte.gz"
  labels = read_idx(path).copy()
  labels[5] = 11
  return _rewrite(path, labels)


def _count_mismatch(d):
  path = d / "t10k-labels-idx1-ubyte.gz"
  return _rewrite(path, read_idx(path)[:-1])


def _missing(d):
  path = d / "t10k-images-idx3-ubyte.gz"
  path.unlink()
  return path


def _empty(d):
  path = d / "train-labels-idx1-ubyte.gz"
  path.write_bytes(b"")
  return path


def _not_gzip(d):
  path = d / "t10k-images-idx3-ubyte.gz"
  path.write_bytes(b"<html>404 not found</html>")
  return path


def _zero_count(d):
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
    _rewrite(d / name, read_idx(d / name)[:0])
  return d / "train-images-idx3-ubyte.gz"


def _zero_size_images(d):
  path = d / "train-images-idx3-ubyte.gz"
  return _rewrite(path, np.zeros((64, 0, 28), np.uint8))


def _test_of_another_size(d):
  path = d / "t10k-images-idx3-ubyte.gz"
  return _rewrite(path, read_idx(path)[:, :20, :20])


def _directory_in_place_of_a_file(d):
  path = d / "train-labels-idx1-ubyte.gz"
  path.unlink()
  path.mkdir()
  return path


# (damage, what the one-line message must say after the file's path)
CLI_FAULTS = {
    "truncated gzip": (_truncate, "truncated"),
    "missing file": (_missing, "missing t10k-images-idx3-ubyte.gz"),
}
LIBRARY_FAULTS = {
    "labels out of range": (_label_out_of_range, "label 11 at index 5 is outside 0..9"),
    "wrong magic": (_wrong_magic, "wrong magic number 2051"),
    "count mismatch": (_count_mismatch, "holds 31 labels but t10k-images-idx3-ubyte.gz holds 32 images"),
    "empty file": (_empty, "truncated"),
    "not gzip": (_not_gzip, "corrupt"),
    "zero examples": (_zero_count, "holds no examples"),
    "zero-size images": (_zero_size_images, "a zero dimension"),
    "test images of another size": (_test_of_another_size, "images are 20x20 but train-images-idx3-ubyte.gz"),
    "directory in place of a file": (_directory_in_place_of_a_file, "missing train-labels-idx1-ubyte.gz"),
}


@pytest.mark.parametrize("fault", list(CLI_FAULTS))
def test_experiment_command_on_bad_data_exits_2_with_one_line_and_writes_nothing(pristine, tmp_path, fault):
  damage, expected = CLI_FAULTS[fault]
  data_root = tmp_path / "data"
  bad = _damaged_copy(pristine, data_root, damage)
  workdir = tmp_path / "run"
  result = mnist_cli(workdir, data_root, env={"JAXCNN_DATA_DIR": ""})
  assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
  assert "Traceback" not in result.stderr + result.stdout
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.stderr
  line = errors[0]
  assert expected in line, line
  assert str(bad) in line or str(bad.parent) in line, line  # names the file (or, when missing, where)
  assert not workdir.exists()  # no checkpoints, history or summary of a run that never trained
  assert not (data_root / "tfds").exists()  # no half-prepared dataset


@pytest.mark.parametrize("fault", list(LIBRARY_FAULTS))
def test_resolve_on_bad_data_raises_one_line_naming_the_file(pristine, tmp_path, fault):
  damage, expected = LIBRARY_FAULTS[fault]
  data_root = tmp_path / "data"
  bad = _damaged_copy(pristine, data_root, damage)
  with pytest.raises(DataError) as info:
    resolved = resolve("tiny_digits", data_dir=data_root, tfds_data_dir=tmp_path / "tfds", download=False)
    resolved.read("train"), resolved.read("test")
  message = str(info.value)
  assert "\n" not in message and info.value.exit_code == 2
  assert expected in message, message
  assert message.startswith(f"{bad}: ") or str(bad.parent) in message, message
  assert not (tmp_path / "tfds").exists()


def _write_image(path: pathlib.Path, color, mode="RGB", size=(12, 10), fmt=None):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, color).save(path, format=fmt)


def test_image_folder_skips_and_names_every_bad_file(tmp_path, caplog):
  root = tmp_path / "train"
  _write_image(root / "Cat" / "good1.png", (250, 0, 0))
  _write_image(root / "Cat" / "grey.png", 90, mode="L")           # grayscale where RGB is expected
  _write_image(root / "Cat" / "palette.gif", 3, mode="P", fmt="GIF")
  _write_image(root / "Dog" / "good2.jpg", (0, 0, 250))
  _write_image(root / "Dog" / "cmyk.jpg", (0, 0, 0, 0), mode="CMYK")
  bad = {
      root / "Cat" / "empty.jpg": b"",
      root / "Cat" / "text.png": b"this is not a picture",
      root / "Dog" / "truncated.png": None,
      root / "Dog" / "truncated.jpg": None,
  }
  for path, content in bad.items():
    if content is None:  # a real image cut in half: a valid header, a missing body
      _write_image(path, (10, 200, 10), size=(64, 64))
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
      path.write_bytes(content)
  (root / "Dog" / "nested").mkdir()
  _write_image(root / "Dog" / "nested" / "deeper.png", (1, 2, 3))
  with caplog.at_level(logging.WARNING, logger="jaxcnn.data"):
    folder = image_folder(root, image_size=(8, 8))
  skipped = {pathlib.Path(p) for p, _ in folder.skipped}
  assert set(bad) <= skipped, skipped
  assert sorted(p.name for p in folder.files) == ["cmyk.jpg", "good1.png", "good2.jpg", "grey.png", "palette.gif"]
  assert folder.images.shape == (5, 8, 8, 3) and folder.images.dtype == np.uint8
  for path in bad:
    assert str(path) in caplog.text, f"{path} not reported"
  grey = folder.images[[p.name for p in folder.files].index("grey.png")]
  assert np.all(grey == grey[..., :1])  # converted to three equal channels, not dropped or misread


def test_image_folder_pipeline_reports_skipped_files_and_an_all_bad_class_stops(tmp_path):
  root = tmp_path / "dataset" / "train"
  _write_image(root / "Cat" / "ok.png", (250, 0, 0))
  _write_image(root / "Cat" / "ok2.png", (240, 0, 0))
  (root / "Cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
  _write_image(root / "Dog" / "ok.png", (0, 0, 250))
  _write_image(root / "Dog" / "ok2.png", (0, 0, 240))
  pipeline = make_pipeline(str(tmp_path / "dataset"), "train", batch_size=2, seed=0, image_size=(8, 8))
  assert pipeline.num_examples == 4
  assert [pathlib.Path(p).name for p, _ in pipeline.skipped] == ["broken.jpg"]
  for name in ("ok.png", "ok2.png"):
    (root / "Dog" / name).write_bytes(b"")
  with pytest.raises(DataError, match=r"\['Dog'\] hold no readable images") as info:
    make_pipeline(str(tmp_path / "dataset"), "train", batch_size=2, seed=0, image_size=(8, 8))
  assert "\n" not in str(info.value)
