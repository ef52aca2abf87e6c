"""experiments.filters: the textbook filters, fast vs reference conv2d, on a downsized portrait."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from experiments import filters
from jaxcnn.errors import ConfigError, DataError


def test_small_run_matches_the_reference_and_writes_the_grid(tmp_path):
  config = filters.get_config()
  config.image_size = 40
  summary = filters.main(config, tmp_path)
  saved = json.loads((tmp_path / "summary.json").read_text())["results"]
  assert saved["image_shape"] == [40, 34, 3]  # 600x512 portrait, longer side 40
  names = [(row["filter"], row["input"]) for row in saved["filters"]]
  assert len(names) == 2 * len(filters.GREY_FILTERS) + 1 and ("brown", "colour") in names
  # Float32 sums of 9 or 27 products of values <= 2 in magnitude: rounding stays far below 1e-5.
  assert summary["results"]["max_abs_difference"] < 1e-5 and summary["experiment"] == "filters"
  assert all(row["response_range"][1] > row["response_range"][0] for row in saved["filters"])
  with Image.open(tmp_path / "filters.png") as image:
    assert image.format == "PNG" and image.size[0] > 600 and image.size[1] > 600


def test_filters_are_the_textbook_ones():
  prewitt = np.asarray(filters.GREY_FILTERS["Prewitt"])
  np.testing.assert_array_equal(filters.GREY_FILTERS["Prewitt transpose"], prewitt.T)
  np.testing.assert_array_equal(filters.GREY_FILTERS["Prewitt row-swapped"], prewitt[::-1])
  np.testing.assert_array_equal(filters.GREY_FILTERS["vertical edge"],
                                np.asarray(filters.GREY_FILTERS["horizontal edge"]).T)
  for taps in filters.GREY_FILTERS.values():
    assert np.sum(taps) == 0  # edge detectors: a flat patch gives 0


def test_brown_filter_ignores_grey_and_prefers_brown_to_blue():
  kernel = filters.brown_filter()
  assert kernel.shape == (3, 3, 3, 1)
  patch = lambda rgb: np.broadcast_to(np.asarray(rgb, np.float32), (3, 3, 3))  # noqa: E731
  response = lambda rgb: float(np.sum(patch(rgb) * kernel[..., 0]))  # noqa: E731
  for level in (0.0, 0.3, 1.0):
    assert response((level, level, level)) == pytest.approx(0.0, abs=1e-7)
  assert response(filters.BROWN) > 0.05
  assert response((0.2, 0.3, 0.8)) < 0 < response((0.8, 0.5, 0.3))


def test_missing_image_is_a_data_error(tmp_path):
  config = filters.get_config()
  config.image = str(tmp_path / "nope.jpg")
  with pytest.raises(DataError, match="nope.jpg"):
    filters.main(config, tmp_path / "run")
  (tmp_path / "broken.png").write_bytes(b"not an image")
  config.image = str(tmp_path / "broken.png")
  with pytest.raises(DataError, match="not a readable image"):
    filters.main(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value", [("image_size", 2), ("image_size", -1), ("padding", "full"), ("cols", 0)])
def test_bad_config_values(tmp_path, key, value):
  config = filters.get_config()
  config[key] = value
  with pytest.raises(ConfigError, match=key):
    filters.main(config, tmp_path)
