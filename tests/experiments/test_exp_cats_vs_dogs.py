"""experiments.cats_vs_dogs: end to end on a generated image folder; the layout explained without one."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from experiments import cats_vs_dogs
from jaxcnn.errors import DataError


def _make_folder(root, per_class=(8, 4)):
  """root/{train,test}/{cats,dogs}: 'cats' bright discs, 'dogs' dark squares, on noise; varied sizes/formats."""
  rng = np.random.default_rng(0)
  for split, count in zip(("train", "test"), per_class):
    for label in ("cats", "dogs"):
      folder = root / split / label
      folder.mkdir(parents=True)
      for i in range(count):
        height, width = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        image = rng.integers(0, 60, size=(height, width, 3)).astype(np.uint8)
        yy, xx = np.mgrid[:height, :width]
        if label == "cats":
          image[(yy - height / 2) ** 2 + (xx - width / 2) ** 2 < (min(height, width) / 3) ** 2] = 230
        else:
          image[height // 4:3 * height // 4, width // 4:3 * width // 4] = 110
        Image.fromarray(image).save(folder / f"{i}.{'jpg' if i % 2 else 'png'}")
  (root / "train" / "dogs" / "broken.jpg").write_bytes(b"not an image")  # skipped and reported


def _tiny_config(data_dir, **overrides):
  config = cats_vs_dogs.get_config()
  config.data.update(dict(data_dir=str(data_dir), image_size=32))
  config.train.update(dict(epochs=1, batch_size=8, log_every=2, **overrides))
  config.model_kwargs.update(dict(filters=4, dense_units=8))
  config.eval_batch_size = 8
  return config


def test_runs_end_to_end_on_an_image_folder(tmp_path):
  _make_folder(tmp_path / "images")
  workdir = tmp_path / "run"
  summary = cats_vs_dogs.main(_tiny_config(tmp_path / "images"), workdir)
  results = summary["results"]
  assert results["class_names"] == ["cats", "dogs"]
  assert summary["data"]["train_examples"] == 16 and summary["data"]["test_examples"] == 8
  assert results["skipped_files"] == 1
  assert 0.0 <= results["test_accuracy"] <= 1.0 and np.isfinite(results["test_loss"])
  saved = json.loads((workdir / "summary.json").read_text())
  # JSON keeps every float exactly (shortest repr), so the written results equal the returned ones.
  assert saved["results"] == json.loads(json.dumps(results)) and saved["experiment"] == "cats_vs_dogs"
  assert json.loads((workdir / "history.json").read_text())["epoch"] == [1]
  for figure in saved["figures"]:
    assert (workdir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert {"history.png", "confusion_matrix.png"} <= set(saved["figures"])


def test_config_keys_that_the_folder_pipeline_takes_are_used_not_contradicted(tmp_path):
  """The pipelines are built from config.train, so fit finds them as the config says (x/255, flips)."""
  _make_folder(tmp_path / "images")
  config = _tiny_config(tmp_path / "images", zoom_range=0.0, horizontal_flip=False, normalize="featurewise")
  train_data, test_data = cats_vs_dogs.load_data(config)
  assert train_data.normalize == "featurewise" and not train_data.augment.horizontal_flip
  assert test_data.stats["mean"].tolist() == train_data.stats["mean"].tolist()


def test_model_shapes():
  import jax
  import jax.numpy as jnp
  model = cats_vs_dogs.build_model(2)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  # 64 -> conv 62 -> pool 31 -> conv 29 -> pool 14: Flatten 14 * 14 * 32 = 6272 features.
  assert variables["params"]["dense"]["kernel"].shape == (6272, 128)
  assert jax.eval_shape(model.apply, variables, jnp.zeros((5, 64, 64, 3))).shape == (5, 2)


def test_missing_or_misshapen_folder_explains_the_layout(tmp_path):
  layout = r"DIR/train/<class>/<images> and DIR/test/<class>/<images>.*--config.data.data_dir=DIR"
  with pytest.raises(DataError, match=r"cats_vs_dogs: no image folder given; lay the images out as " + layout) as info:
    cats_vs_dogs.main(_tiny_config(""), tmp_path / "run")
  assert info.value.exit_code == 2
  with pytest.raises(DataError, match=r"absent: expected 'train' and 'test' subfolders; .*" + layout):
    cats_vs_dogs.main(_tiny_config(tmp_path / "absent"), tmp_path / "run")
  flat = tmp_path / "flat"
  (flat / "train").mkdir(parents=True)
  (flat / "test").mkdir()
  with pytest.raises(DataError, match=r"no class subfolders.*" + layout):
    cats_vs_dogs.main(_tiny_config(flat), tmp_path / "run")
  assert not (tmp_path / "run").exists()
