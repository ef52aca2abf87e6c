"""Image folders (jaxcnn.data.folder): labels from subfolders, RGB + resize, bad files skipped and reported."""
from __future__ import annotations

import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from jaxcnn.data import ResidentPipeline, StreamingPipeline, image_folder, make_pipeline
from jaxcnn.errors import DataError


def _write(path: pathlib.Path, color, mode="RGB", size=(20, 16)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new(mode, size, color).save(path)


@pytest.fixture
def cats_and_dogs(tmp_path) -> pathlib.Path:
  """dataset/{train,test}/{Cat,Dog}: JPEGs, PNGs (RGB, grey, RGBA), one corrupt .jpg and one .txt."""
  root = tmp_path / "dataset"
  train = root / "train"
  _write(train / "Cat" / "c1.jpg", (250, 10, 10))
  _write(train / "Cat" / "c2.png", (240, 20, 20))
  _write(train / "Cat" / "c3.png", 200, mode="L")
  _write(train / "Cat" / "c4.jpg", (230, 0, 0), size=(40, 30))
  _write(train / "Dog" / "d1.jpg", (10, 10, 250))
  _write(train / "Dog" / "d2.png", (0, 0, 255, 128), mode="RGBA")
  _write(train / "Dog" / "d3.png", (20, 20, 240))
  (train / "Dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (train / "Cat" / "notes.txt").write_text("not an image")
  _write(root / "test" / "Cat" / "t1.png", (255, 0, 0))
  _write(root / "test" / "Dog" / "t2.jpg", (0, 0, 255))
  return root


def test_folder_loads_with_right_labels_and_reports_the_bad_files(cats_and_dogs, caplog):
  with caplog.at_level(logging.WARNING, logger="jaxcnn.data"):
    folder = image_folder(cats_and_dogs / "train", image_size=(8, 12))
  assert folder.class_names == ["Cat", "Dog"]
  assert [p.name for p in folder.files] == ["c1.jpg", "c2.png", "c3.png", "c4.jpg", "d1.jpg", "d2.png", "d3.png"]
  np.testing.assert_array_equal(folder.labels, [0, 0, 0, 0, 1, 1, 1])
  assert folder.images.shape == (7, 8, 12, 3) and folder.images.dtype == np.uint8
  bad = sorted(pathlib.Path(p).name for p, _ in folder.skipped)
  assert bad == ["broken.jpg", "notes.txt"]
  assert "skipped 2 unreadable or non-image files" in caplog.text
  assert all(p in caplog.text for p, _ in folder.skipped)
  mean = folder.images.reshape(7, -1, 3).mean(axis=1)
  assert np.all(mean[[0, 1, 3], 0] > 200) and np.all(mean[[4, 6], 2] > 200)  # red cats, blue dogs
  np.testing.assert_allclose(mean[2], [200, 200, 200], atol=1)  # grey converted to RGB


def test_make_pipeline_on_an_image_folder(cats_and_dogs):
  kw = dict(batch_size=2, seed=0, image_size=(8, 8))
  train = make_pipeline(str(cats_and_dogs), "train", **kw)
  assert isinstance(train, ResidentPipeline) and train.num_examples == 7 and train.image_shape == (8, 8, 3)
  assert train.class_names == ["Cat", "Dog"] and len(train.skipped) == 2
  test = make_pipeline(str(cats_and_dogs), "test", stats=train.stats, **kw)
  batches = list(test.batches(0))
  np.testing.assert_array_equal(batches[0]["label"], [0, 1])
  streaming = make_pipeline(str(cats_and_dogs), "test", stats=train.stats, resident=False, **kw)
  assert isinstance(streaming, StreamingPipeline)
  for a, b in zip(batches, streaming.batches(0), strict=True):
    np.testing.assert_array_equal(a["image"], b["image"])
  valid = make_pipeline(str(cats_and_dogs), "validation", validation_split=0.3, **kw)
  assert valid.num_examples == 3 and not valid.shuffle
  np.testing.assert_allclose(valid.stats["mean"], make_pipeline(str(cats_and_dogs), "train",
                                                                  validation_split=0.3, **kw).stats["mean"])


def test_default_image_size_is_64(cats_and_dogs):
  assert image_folder(cats_and_dogs / "test").images.shape == (2, 64, 64, 3)


def test_layout_errors_spell_out_the_expected_layout(tmp_path):
  (tmp_path / "flat").mkdir()
  _write(tmp_path / "flat" / "a.png", (1, 2, 3))
  with pytest.raises(DataError, match=r"flat: no class subfolders \(expected one subfolder per class"):
    image_folder(tmp_path / "flat")
  (tmp_path / "empty_class" / "Cat").mkdir(parents=True)
  _write(tmp_path / "empty_class" / "Dog" / "d.png", (1, 2, 3))
  with pytest.raises(DataError, match=r"Cat: class folder holds no files"):
    image_folder(tmp_path / "empty_class")
  (tmp_path / "all_bad" / "Cat").mkdir(parents=True)
  (tmp_path / "all_bad" / "Cat" / "x.jpg").write_bytes(b"")
  _write(tmp_path / "all_bad" / "Dog" / "d.png", (1, 2, 3))
  with pytest.raises(DataError, match=r"class folder\(s\) \['Cat'\] hold no readable images"):
    image_folder(tmp_path / "all_bad")
  with pytest.raises(DataError, match="image folder not found"):
    image_folder(tmp_path / "missing")
  with pytest.raises(ValueError, match="image_size: expected a positive int or a pair"):
    image_folder(tmp_path / "all_bad", image_size=(0, 4))


def test_test_split_must_have_the_training_classes(cats_and_dogs):
  _write(cats_and_dogs / "test" / "Bird" / "b.png", (0, 255, 0))
  with pytest.raises(DataError, match=r"class subfolders \['Bird', 'Cat', 'Dog'\] differ from the training"):
    make_pipeline(str(cats_and_dogs), "test", batch_size=2, seed=0, normalize="scale")
