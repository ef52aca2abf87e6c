"""Hand-made convolution filters on a photograph, fast op vs reference op: `python -m experiments.filters`.

  python -m experiments.filters [--workdir=runs/filters/NAME] [--config.image_size=128]

Prints, per filter, the largest |fast - reference| difference, which float32 rounding keeps below 1e-5
(benchmarks/README.md, "Experiments", has the measured value), in seconds.

The image is the Grace Hopper portrait that matplotlib ships (`matplotlib.cbook.get_sample_data`), so
the run needs no download. Each filter is applied with `jaxcnn.ops.conv2d` (the fast op) and with
`jaxcnn.reference.conv2d` (the explicit-window twin); the largest absolute difference between the two
is printed and saved in summary.json. The responses are drawn in one grid, filters.png.

Filters (3x3, HWIO kernels; "same" padding keeps the image size):
  horizontal edge   [[-1,-1,-1], [ 2, 2, 2], [-1,-1,-1]]   responds to horizontal lines
  vertical edge     [[-1, 2,-1], [-1, 2,-1], [-1, 2,-1]]   its transpose: vertical lines
  Prewitt           [[-1,-1,-1], [ 0, 0, 0], [ 1, 1, 1]]   vertical gradient (dark above, bright below)
  Prewitt transpose [[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]]   horizontal gradient (dark left, bright right)
  Prewitt row-swap  [[ 1, 1, 1], [ 0, 0, 0], [-1,-1,-1]]   rows swapped: the opposite sign of Prewitt
  brown (RGB)       3x3x3 -> 1: every tap of channel c weighs (BROWN[c] - mean(BROWN)) / 9 with
                    BROWN = (0.59, 0.39, 0.20), a mid brown in 0..1 RGB

The brown filter is a matched filter for the colour direction of brown: its channel weights are the
brown colour minus its own grey level, so a grey patch of any brightness (R = G = B) gives exactly 0,
warm patches where red exceeds green exceeds blue (brown, tan, skin, wood) respond positively, and
blue ones negatively; averaging over the 3x3 window smooths the response.

Grey filters run on the grey image (1 -> 1 channels) and, as a depthwise convolution (groups=3), on each
colour channel of the colour image (3 -> 3 channels).
"""
from __future__ import annotations

import pathlib
import time
from typing import Any

import ml_collections
import numpy as np

from experiments import _common, _runner
from jaxcnn.errors import ConfigError, DataError
from jaxcnn.train import default_config

# RGB of a mid brown in 0..1 (the colour the brown filter matches).
BROWN = (0.59, 0.39, 0.20)
# ITU-R BT.601 luma weights: the grey image is their weighted sum of R, G, B.
LUMA = (0.299, 0.587, 0.114)

GREY_FILTERS = {
    "horizontal edge": [[-1, -1, -1], [2, 2, 2], [-1, -1, -1]],
    "vertical edge": [[-1, 2, -1], [-1, 2, -1], [-1, 2, -1]],
    "Prewitt": [[-1, -1, -1], [0, 0, 0], [1, 1, 1]],
    "Prewitt transpose": [[-1, 0, 1], [-1, 0, 1], [-1, 0, 1]],
    "Prewitt row-swapped": [[1, 1, 1], [0, 0, 0], [-1, -1, -1]],
}


def get_config() -> ml_collections.ConfigDict:
  """The default filters run."""
  c = ml_collections.ConfigDict()
  c.image = "grace_hopper.jpg"    # a matplotlib sample-data name, or a path to an image file
  c.image_size = 0                # 0: the image's own size; n: resized so that its longer side is n
  c.padding = "same"              # "same" keeps the size; "valid" shrinks it by 2
  c.cols = 4                      # tiles per row of filters.png
  # Every command takes the same --config.train.* keys; this one trains nothing and reads only the
  # multi-process timeouts (the job is joined before anything runs).
  c.train = default_config()
  return c


def brown_filter() -> np.ndarray:
  """The 3x3x3 -> 1 brown filter, HWIO (3, 3, 3, 1) float32 (see the module docstring)."""
  weights = (np.asarray(BROWN, np.float64) - np.mean(BROWN)) / 9.0
  return np.broadcast_to(weights[None, None, :, None], (3, 3, 3, 1)).astype(np.float32)


def grey_kernel(taps) -> np.ndarray:
  """A 3x3 grey filter as an HWIO (3, 3, 1, 1) float32 kernel."""
  return np.asarray(taps, np.float32)[:, :, None, None]


def load_image(config: ml_collections.ConfigDict) -> np.ndarray:
  """The configured image as float32 RGB (H, W, 3) in [0, 1].

  Raises:
    DataError: the file is missing or not a readable image.
  """
  import matplotlib.cbook
  from PIL import Image, UnidentifiedImageError

  path = pathlib.Path(config.image)
  if not path.is_file():
    try:
      path = pathlib.Path(matplotlib.cbook.get_sample_data(config.image, asfileobj=False))
    except (OSError, ValueError):
      raise DataError(f"image: {config.image!r} is neither an image file nor a matplotlib sample-data "
                      "name (e.g. grace_hopper.jpg)") from None
  try:
    with Image.open(path) as opened:
      image = opened.convert("RGB")
  except (OSError, UnidentifiedImageError) as err:
    raise DataError(f"{path}: not a readable image ({err})") from None
  if config.image_size:
    scale = config.image_size / max(image.size)
    size = (max(3, round(image.size[0] * scale)), max(3, round(image.size[1] * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
  return np.asarray(image, np.float32) / 255.0


def _check_config(config) -> None:
  problems = []
  if not isinstance(config.image, str) or not config.image:
    problems.append(f"image={config.image!r} (expected a file path or a sample-data name)")
  if isinstance(config.image_size, bool) or not isinstance(config.image_size, int) or config.image_size < 0:
    problems.append(f"image_size={config.image_size!r} (expected an integer >= 0, 0: keep the size)")
  elif 0 < config.image_size < 3:
    problems.append(f"image_size={config.image_size!r} (a 3x3 filter needs at least 3 pixels)")
  if config.padding not in ("same", "valid"):
    problems.append(f"padding={config.padding!r} (expected 'same' or 'valid')")
  if isinstance(config.cols, bool) or not isinstance(config.cols, int) or config.cols < 1:
    problems.append(f"cols={config.cols!r} (expected an integer >= 1)")
  if problems:
    raise ConfigError("config: bad values: " + "; ".join(problems))


def convolve_both(image_nhwc: np.ndarray, kernel_hwio: np.ndarray, *, padding: str, groups: int = 1):
  """(fast output, reference output, max |fast - reference|) of one convolution, both jitted."""
  import jax

  from jaxcnn import ops, reference

  def fast(x, w):
    return ops.conv2d(x, w, padding=padding, groups=groups)

  def slow(x, w):
    return reference.conv2d(x, w, padding=padding, groups=groups)

  out_fast = np.asarray(jax.jit(fast)(image_nhwc, kernel_hwio))
  out_ref = np.asarray(jax.jit(slow)(image_nhwc, kernel_hwio))
  return out_fast, out_ref, float(np.max(np.abs(out_fast.astype(np.float64) - out_ref)))


def main(config: ml_collections.ConfigDict, workdir) -> dict[str, Any]:
  """Applies every filter with the fast and the reference op; writes filters.png and summary.json.

  Args:
    config: a ConfigDict like `get_config()`'s.
    workdir: the run directory.

  Returns:
    The summary written to workdir/summary.json.
  """
  started = time.perf_counter()
  from jaxcnn.inspect import plot_images

  _check_config(config)
  workdir = pathlib.Path(workdir)
  colour = load_image(config)
  grey = colour @ np.asarray(LUMA, np.float32)
  print(f"image {config.image}: {colour.shape[0]}x{colour.shape[1]} RGB, padding {config.padding!r}")

  images, titles, rows = [colour, grey], ["colour input", "grey input (BT.601 luma)"], []
  for name, taps in GREY_FILTERS.items():
    kernel = grey_kernel(taps)
    out, _, diff = convolve_both(grey[None, :, :, None], kernel, padding=config.padding)
    rows.append({"filter": name, "input": "grey", "kernel_shape": list(kernel.shape), "max_abs_difference": diff,
                 "response_range": [float(out.min()), float(out.max())]})
    images.append(out[0, :, :, 0])
    titles.append(f"{name} (grey)")
  for name, taps in GREY_FILTERS.items():
    # Depthwise: the same 3x3 taps on each of R, G, B separately (groups=3, HWIO (3, 3, 1, 3)).
    kernel = np.repeat(grey_kernel(taps), 3, axis=3)
    out, _, diff = convolve_both(colour[None], kernel, padding=config.padding, groups=3)
    rows.append({"filter": name, "input": "colour (depthwise)", "kernel_shape": list(kernel.shape),
                 "max_abs_difference": diff, "response_range": [float(out.min()), float(out.max())]})
    images.append(out[0])
    titles.append(f"{name} (colour, per channel)")
  kernel = brown_filter()
  out, _, diff = convolve_both(colour[None], kernel, padding=config.padding)
  rows.append({"filter": "brown", "input": "colour", "kernel_shape": list(kernel.shape), "max_abs_difference": diff,
               "response_range": [float(out.min()), float(out.max())]})
  images.append(out[0, :, :, 0])
  titles.append("brown filter (colour -> 1)")

  print(f"{'filter':<22}{'input':<20}{'kernel':<16}{'max |fast - reference|':>24}")
  for row in rows:
    print(f"{row['filter']:<22}{row['input']:<20}{str(tuple(row['kernel_shape'])):<16}"
          f"{row['max_abs_difference']:>24.3e}")
  subject = "Grace Hopper" if config.image == "grace_hopper.jpg" else pathlib.Path(config.image).name
  figures = []
  if _common.is_primary():
    figures.append(plot_images(images, titles, workdir / "filters.png", cols=config.cols,
                               title=f"{subject} through hand-made 3x3 filters (responses: 0 = grey, clipped at "
                               "the 99.5th percentile of |response|)"))
  results = {"image": config.image, "image_shape": list(colour.shape), "padding": config.padding, "filters": rows,
             "max_abs_difference": max(r["max_abs_difference"] for r in rows)}
  summary = _common.write_summary(workdir, experiment="filters", config=config, results=results,
                                  data={"source": str(config.image)}, figures=figures, started=started)
  print(f"largest fast-vs-reference difference: {results['max_abs_difference']:.3e}; "
        f"files in {workdir}: filters.png, summary.json")
  return summary


if __name__ == "__main__":
  _runner.run(__name__, get_config, main)
