"""Image folders (one subfolder per class, e.g. `dataset/train/Cat/*.jpg`), decoded with PIL.

Class names are the sorted subfolder names; images are converted to RGB and resized to `image_size`.
Files PIL cannot decode (corrupt, truncated, empty, not images) are skipped and reported once, by
count and first paths, and listed in `skipped`; the remaining files keep the label of their folder.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image

from jaxcnn.errors import DataError

logger = logging.getLogger("jaxcnn.data")

_LAYOUT = ("expected one subfolder per class holding its images, e.g. <folder>/Cat/1.jpg and "
           "<folder>/Dog/2.png")
_REPORTED = 5
# A split whose decoded images fit in this many bytes is kept in memory (and on device) by default.
RESIDENT_BYTES = 1 << 30


def _check_size(image_size) -> tuple[int, int]:
  if isinstance(image_size, int) and not isinstance(image_size, bool):
    image_size = (image_size, image_size)
  if (not isinstance(image_size, (tuple, list)) or len(image_size) != 2
      or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in image_size)):
    raise ValueError(f"image_size: expected a positive int or a pair (height, width), got {image_size!r}")
  return int(image_size[0]), int(image_size[1])


def decode_image(path, image_size: tuple[int, int]) -> np.ndarray:
  """One image file as uint8 (H, W, 3) RGB resized to image_size (height, width); raises on bad files."""
  height, width = image_size
  with Image.open(path) as image:
    # draft() lets JPEG decode at a reduced scale close to the target: much faster for large photos.
    image.draft("RGB", (width, height))
    image = image.convert("RGB")
    if image.size != (width, height):
      image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(image, np.uint8)


def _try_decode(path, image_size):
  try:
    return decode_image(path, image_size), None
  except Exception as err:  # PIL raises many types for bad files; each is reported, none is fatal
    return None, f"{type(err).__name__}: {err}"


class ImageFolder:
  """The decodable images of a class-per-subfolder directory.

  Attributes:
    root: the folder.
    image_size: (height, width) the images are resized to.
    class_names: sorted subfolder names; label i is class_names[i].
    files: the usable image paths, in (class, file name) order.
    labels: int32 (N,) label of each usable file.
    skipped: [(path, reason)] of the files that could not be decoded.
    images: uint8 (N, H, W, 3) when decoded in memory (keep_decoded=True), else None.
  """

  def __init__(self, root, *, image_size=(64, 64), class_names: Sequence[str] | None = None,
               keep_decoded: bool | str = "auto", workers: int | None = None):
    self.root = pathlib.Path(root)
    self.image_size = _check_size(image_size)
    if not self.root.is_dir():
      raise DataError(f"{self.root}: image folder not found ({_LAYOUT})")
    found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not found:
      raise DataError(f"{self.root}: no class subfolders ({_LAYOUT})")
    if class_names is not None and sorted(class_names) != found:
      raise DataError(f"{self.root}: class subfolders {found} differ from the training split's "
                      f"{sorted(class_names)}")
    self.class_names = list(class_names) if class_names is not None else found
    candidates, candidate_labels = [], []
    for label, name in enumerate(self.class_names):
      files = sorted(p for p in (self.root / name).iterdir() if p.is_file() and not p.name.startswith("."))
      if not files:
        raise DataError(f"{self.root / name}: class folder holds no files ({_LAYOUT})")
      candidates += files
      candidate_labels += [label] * len(files)
    if keep_decoded == "auto":
      keep_decoded = len(candidates) * self.image_size[0] * self.image_size[1] * 3 <= RESIDENT_BYTES
    workers = workers or min(8, os.cpu_count() or 1)
    with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
      decoded = list(pool.map(lambda p: _try_decode(p, self.image_size), candidates))
    self.files, labels, images, self.skipped = [], [], [], []
    for path, label, (image, problem) in zip(candidates, candidate_labels, decoded):
      if image is None:
        self.skipped.append((str(path), problem))
        continue
      self.files.append(path)
      labels.append(label)
      if keep_decoded:
        images.append(image)
    self.labels = np.asarray(labels, np.int32)
    if self.skipped:
      shown = ", ".join(p for p, _ in self.skipped[:_REPORTED])
      more = f" (and {len(self.skipped) - _REPORTED} more)" if len(self.skipped) > _REPORTED else ""
      logger.warning("%s: skipped %d unreadable or non-image files: %s%s", self.root, len(self.skipped),
                     shown, more)
    empty = [n for i, n in enumerate(self.class_names) if not np.any(self.labels == i)]
    if empty:
      raise DataError(f"{self.root}: class folder(s) {empty} hold no readable images ({_LAYOUT})")
    height, width = self.image_size
    self.images = (np.stack(images) if images else np.empty((0, height, width, 3), np.uint8)) \
        if keep_decoded else None

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (*self.image_size, 3)

  def __len__(self) -> int:
    return len(self.files)

  def read(self, indices) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (n, H, W, 3), int32 (n,)) of the given example indices (decoded now unless kept)."""
    indices = np.asarray(indices)
    if self.images is not None:
      return self.images[indices], self.labels[indices]
    images = np.empty((len(indices), *self.image_shape), np.uint8)
    for out, i in enumerate(indices):
      try:
        images[out] = decode_image(self.files[i], self.image_size)
      except Exception as err:  # decodable when scanned: the file changed under the run
        raise DataError(f"{self.files[i]}: could no longer be decoded ({type(err).__name__}: {err}); "
                        "it changed after the folder was scanned") from None
    return images, self.labels[indices]


def image_folder(path, *, image_size=(64, 64), class_names: Sequence[str] | None = None,
                 keep_decoded: bool | str = "auto") -> ImageFolder:
  """Scans (and decodes) an image folder with one subfolder per class.

  Args:
    path: the folder, e.g. `dataset/train` holding `Cat/` and `Dog/`.
    image_size: (height, width) or an int for square images. Default (64, 64).
    class_names: the class names to expect (e.g. the training split's), in label order; default the
      sorted subfolder names.
    keep_decoded: keep every decoded image in memory (for device-resident pipelines); False decodes
      again on each read (streaming); "auto" keeps them when they fit in RESIDENT_BYTES (1 GiB).
      Default "auto".

  Returns:
    An ImageFolder (a HostSource: len() and read(indices)); bad files are in `.skipped`.
  """
  return ImageFolder(path, image_size=image_size, class_names=class_names, keep_decoded=keep_decoded)
