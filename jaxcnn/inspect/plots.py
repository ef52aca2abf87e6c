"""Figures of a training run, written as PNG files: curves, confusion matrix, filters, feature maps.

Every function draws on its own `matplotlib.figure.Figure` (the Agg canvas, no pyplot state, no
display needed) and writes one PNG to `path`, creating its folder. Arrays may be numpy or jax arrays.

    plot_history(history, "history.png")                       # loss and accuracy, train vs validation
    plot_confusion_matrix(confusion_matrix(labels, predicted, 10), names, "confusion_matrix.png")
    plot_filters(params["conv2d"]["kernel"], "filters.png")     # HWIO kernel of the first layer
    plot_feature_maps(feature_maps(model, variables, x), "feature_maps.png", image=x[0])
"""
from __future__ import annotations

import math
import pathlib
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["confusion_matrix", "plot_confusion_matrix", "plot_feature_maps", "plot_filters", "plot_history",
           "plot_images", "save_figure"]

_DPI = 100


def save_figure(fig: Figure, path) -> pathlib.Path:
  """Writes a `matplotlib.figure.Figure` to `path` as PNG (parent folders created; no pyplot state) at
  the resolution of every figure here, and returns the path. The file is written atomically (whole or
  absent). Raises ValueError for a non-.png path, jaxcnn.errors.StorageError when it cannot be written."""
  from jaxcnn.storage import atomic_path
  path = pathlib.Path(path)
  if path.suffix.lower() != ".png":
    raise ValueError(f"path: expected a .png file name, got {str(path)!r}")
  FigureCanvasAgg(fig)
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=_DPI, format="png")
  return path


def _as_array(value, name: str, ndim) -> np.ndarray:
  try:
    array = np.asarray(value, dtype=np.float64)
  except (TypeError, ValueError) as err:
    raise ValueError(f"{name}: expected a numeric array, got {type(value).__name__}") from err
  allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
  if array.ndim not in allowed:
    raise ValueError(f"{name}: expected {' or '.join(f'{d}-D' for d in allowed)} array, got shape {array.shape}")
  if not np.all(np.isfinite(array)):
    raise ValueError(f"{name}: contains NaN or Inf")
  return array


def _scale01(image: np.ndarray) -> np.ndarray:
  """Min-max scaled to [0, 1] (a constant image becomes 0.5), for displaying signed weights/activations."""
  low, high = float(image.min()), float(image.max())
  if high - low < 1e-12:
    return np.full_like(image, 0.5)
  return (image - low) / (high - low)


def _scale_signed(image: np.ndarray, percentile: float = 99.5) -> np.ndarray:
  """0 -> 0.5 and +-L -> 1 / 0 (clipped), L the `percentile` of |image| (its max when that is 0)."""
  magnitude = np.abs(image)
  limit = float(np.percentile(magnitude, percentile)) or float(magnitude.max())
  if limit < 1e-12:
    return np.full_like(image, 0.5)
  return np.clip(0.5 + 0.5 * image / limit, 0.0, 1.0)


def _hide_axes(ax) -> None:
  ax.set_xticks([])
  ax.set_yticks([])


# -- curves ------------------------------------------------------------------------------------------

def _series(history: Mapping, key: str, epochs: int) -> np.ndarray | None:
  if key not in history:
    return None
  values = np.asarray(history[key], dtype=np.float64)
  if values.ndim != 1 or values.shape[0] != epochs:
    raise ValueError(f"history[{key!r}]: expected {epochs} values (one per epoch, like 'loss'), got shape "
                     f"{values.shape}")
  return values


def plot_history(history: Mapping[str, Sequence[float]], path, *, title: str = "Training history") -> pathlib.Path:
  """Loss and accuracy per epoch, training vs validation, as two panels side by side.

  Args:
    history: {metric: per-epoch values} as `jaxcnn.train.fit` returns it: "loss" (required),
      optionally "accuracy", "val_loss", "val_accuracy" and "epoch" (1-based epoch numbers; default
      1..len(loss)). Every series must have one value per epoch.
    path: the .png file to write.
    title: the figure title. Default "Training history".

  Returns:
    The written path.

  Raises:
    ValueError: no or empty "loss", series of different lengths, a path that is not .png.
  """
  if not isinstance(history, Mapping) or "loss" not in history:
    raise ValueError(f"history: expected a mapping with a 'loss' series, got keys "
                     f"{sorted(history) if isinstance(history, Mapping) else type(history).__name__}")
  loss = np.asarray(history["loss"], dtype=np.float64)
  if loss.ndim != 1 or loss.size == 0:
    raise ValueError(f"history['loss']: expected a non-empty list of per-epoch values, got shape {loss.shape}")
  epochs = loss.shape[0]
  x = _series(history, "epoch", epochs)
  x = np.arange(1, epochs + 1) if x is None else x
  panels = [("loss", "Loss", "loss (cross-entropy)")]
  if "accuracy" in history or "val_accuracy" in history:
    panels.append(("accuracy", "Accuracy", "accuracy"))
  fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
  for i, (key, name, ylabel) in enumerate(panels):
    ax = fig.add_subplot(1, len(panels), i + 1)
    curves = [(label, style, _series(history, prefix + key, epochs))
              for prefix, label, style in (("", "training", "o-"), ("val_", "validation", "s--"))]
    curves = [c for c in curves if c[2] is not None]
    top = max(values[-1] for _, _, values in curves)
    for label, style, values in curves:
      ax.plot(x, values, style, label=label)
      # The last value beside its marker, the higher curve's label above it and the lower one's below,
      # so close end points stay readable: curves of a few epochs are read for their end point.
      above = values[-1] == top
      ax.annotate(f"{label} {values[-1]:.4f}", (x[-1], values[-1]), textcoords="offset points",
                  xytext=(-4 if epochs > 1 else 4, 6 if above else -12), fontsize=8,
                  ha="right" if epochs > 1 else "left")
    ax.margins(x=0.05, y=0.12)  # room for the end-point labels inside the axes
    ax.set_title(f"{name} per epoch")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.set_xticks(x if epochs <= 20 else np.linspace(x[0], x[-1], 11).round())
    ax.grid(True, alpha=0.3)
    ax.legend()
  fig.suptitle(title)
  return save_figure(fig, path)


# -- confusion matrix --------------------------------------------------------------------------------

def confusion_matrix(labels, predictions, num_classes: int) -> np.ndarray:
  """Counts of (true label, predicted label) pairs.

  Args:
    labels: integer true classes, shape (N,).
    predictions: integer predicted classes, shape (N,).
    num_classes: K; every value must lie in [0, K).

  Returns:
    int64 (K, K): row = true class, column = predicted class; the trace counts the correct predictions.
  """
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  for name, values in (("labels", labels), ("predictions", predictions)):
    if values.ndim != 1 or not np.issubdtype(values.dtype, np.integer):
      raise ValueError(f"{name}: expected a 1-D integer array, got shape {values.shape} dtype {values.dtype}")
    if values.size and (values.min() < 0 or values.max() >= num_classes):
      raise ValueError(f"{name}: values must lie in [0, {num_classes}), got range "
                       f"[{values.min()}, {values.max()}]")
  if labels.shape != predictions.shape:
    raise ValueError(f"labels/predictions: shapes differ, {labels.shape} vs {predictions.shape}")
  counts = np.bincount(labels.astype(np.int64) * num_classes + predictions, minlength=num_classes ** 2)
  return counts.reshape(num_classes, num_classes)


def plot_confusion_matrix(cm, class_names: Sequence[str], path, *, title: str = "Confusion matrix") -> pathlib.Path:
  """A K x K heat map of counts with every cell annotated; rows true class, columns predicted class.

  Args:
    cm: (K, K) non-negative counts (e.g. from `confusion_matrix`).
    class_names: K names for the axes' tick labels.
    path: the .png file to write.
    title: the figure title; the accuracy (trace / total) is appended. Default "Confusion matrix".

  Returns:
    The written path.
  """
  counts = _as_array(cm, "cm", 2)
  k = counts.shape[0]
  if counts.shape != (k, k) or k == 0:
    raise ValueError(f"cm: expected a square (K, K) matrix, got shape {counts.shape}")
  if np.any(counts < 0) or np.any(counts != np.round(counts)):
    raise ValueError("cm: expected non-negative integer counts")
  names = [str(c) for c in class_names]
  if len(names) != k:
    raise ValueError(f"class_names: expected {k} names (one per row of cm), got {len(names)}")
  total = counts.sum()
  accuracy = np.trace(counts) / total if total else float("nan")
  size = max(5.0, 0.55 * k + 2.5)
  fig = Figure(figsize=(size + 1.0, size), layout="constrained")
  ax = fig.add_subplot()
  # Colour by the row share so that classes of different sizes read alike; the text gives the counts.
  rows = counts.sum(axis=1, keepdims=True)
  shares = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
  image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
  fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
  fontsize = 9 if k <= 10 else 7
  for i in range(k):
    for j in range(k):
      ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=fontsize,
              color="white" if shares[i, j] > 0.5 else "black")
  ax.set_xticks(range(k), names, rotation=45 if max(map(len, names)) > 2 else 0, ha="right" if
                max(map(len, names)) > 2 else "center")
  ax.set_yticks(range(k), names)
  ax.set_xlabel("predicted label")
  ax.set_ylabel("true label")
  ax.set_title(f"{title} (accuracy {accuracy:.4f}, {int(total)} examples)")
  return save_figure(fig, path)


# -- filters and feature maps ---------------------------------------------------------------------------

def _grid(count: int, max_cols: int) -> tuple[int, int]:
  cols = min(count, max_cols)
  return math.ceil(count / cols), cols


def _montage(tiles: Sequence[np.ndarray], cols: int, band: int, gap: int) -> tuple[np.ndarray, list]:
  """Equal-shape RGB tiles (h, w, 3) in [0, 1] laid out `cols` to a row on a white canvas `cols` tiles
  wide (a short last row is left white): a label band of `band` pixels above each tile and `gap` pixels
  between columns. Returns the canvas and each tile's (top row, left column) on it."""
  h, w = tiles[0].shape[:2]
  rows = math.ceil(len(tiles) / cols)
  canvas = np.ones((rows * (band + h), cols * w + (cols - 1) * gap, 3))
  origins = []
  for index, tile in enumerate(tiles):
    row, col = divmod(index, cols)
    top, left = row * (band + h) + band, col * (w + gap)
    canvas[top:top + h, left:left + w] = tile
    origins.append((top, left))
  return canvas, origins


def _draw_montage(fig: Figure, rect, canvas: np.ndarray, origins, tile_shape, band: int, labels, fontsize: float):
  """The canvas on an axes at `rect` (figure fractions), without ticks: each tile framed by a thin line
  (so that its white pixels do not merge with the background), its label centred in the band above."""
  from matplotlib.collections import PatchCollection
  from matplotlib.patches import Rectangle
  h, w = tile_shape
  ax = fig.add_axes(rect)
  ax.imshow(canvas, interpolation="nearest", vmin=0.0, vmax=1.0)
  ax.set_axis_off()
  # Pixel (r, c) of the image covers [c - 0.5, c + 0.5] x [r - 0.5, r + 0.5] in data coordinates.
  ax.add_collection(PatchCollection([Rectangle((left - 0.5, top - 0.5), w, h) for top, left in origins],
                                    facecolor="none", edgecolor="0.3", linewidth=0.6))
  for (top, left), label in zip(origins, labels):
    ax.text(left + (w - 1) / 2, top - 0.5 - band / 2, label, ha="center", va="center", fontsize=fontsize)
  return ax


def _grey(tile: np.ndarray) -> np.ndarray:
  return np.repeat(tile[..., None], 3, axis=-1)


def plot_filters(kernel_hwio, path, *, title: str = "First-layer filters", max_filters: int = 64) -> pathlib.Path:
  """A grid of convolution filters, one tile per output channel, labelled with its channel number.

  Single-channel kernels are drawn in grey (each tile min-max scaled on its own, so a tile's contrast
  shows the filter's pattern, not its norm); three-channel kernels as RGB images; other channel counts
  as the mean over input channels.

  Args:
    kernel_hwio: (kh, kw, C_in, C_out) kernel, e.g. `params["conv2d"]["kernel"]`.
    path: the .png file to write.
    title: the figure title. Default "First-layer filters".
    max_filters: draw at most this many output channels (the first ones). Default 64.

  Returns:
    The written path.
  """
  kernel = _as_array(kernel_hwio, "kernel_hwio", 4)
  if isinstance(max_filters, bool) or not isinstance(max_filters, int) or max_filters < 1:
    raise ValueError(f"max_filters: expected an int >= 1, got {max_filters!r}")
  kh, kw, cin, cout = kernel.shape
  if min(kernel.shape) == 0:
    raise ValueError(f"kernel_hwio: expected non-empty dimensions, got shape {kernel.shape}")
  shown = min(cout, max_filters)
  _, cols = _grid(shown, 8)
  tiles = [_scale01(kernel[..., i]) if cin == 3 else _grey(_scale01(kernel[..., i].mean(axis=-1)))
           for i in range(shown)]
  # One image of all tiles on one axes (not an axes per tile): drawn in a fraction of the time.
  band = max(1, round(0.3 * kh))
  canvas, origins = _montage(tiles, cols, band=band, gap=max(1, round(0.15 * kw)))
  width = 1.2 * cols  # inches of the montage; its height follows the canvas' aspect
  height = width * canvas.shape[0] / canvas.shape[1]
  fig = Figure(figsize=(width + 0.4, height + 0.7))
  _draw_montage(fig, (0.2 / (width + 0.4), 0.1 / (height + 0.7), width / (width + 0.4), height / (height + 0.7)),
                canvas, origins, (kh, kw), band, [f"#{i}" for i in range(shown)], fontsize=8)
  channels = "RGB" if cin == 3 else ("grey" if cin == 1 else f"mean of {cin} input channels")
  more = f", first {shown} of {cout}" if shown < cout else ""
  fig.suptitle(f"{title} ({kh}x{kw}, {channels}{more})", y=1 - 0.15 / (height + 0.7), va="top")
  return save_figure(fig, path)


def _one_example(array: np.ndarray, name: str) -> np.ndarray:
  """(H, W, C) from (H, W, C) or (1, H, W, C)."""
  if array.ndim == 4:
    if array.shape[0] != 1:
      raise ValueError(f"{name}: expected one example (batch of 1), got shape {array.shape}")
    array = array[0]
  return array


def plot_feature_maps(maps: Mapping[str, object], path, image=None, *, max_channels: int = 16,
                      title: str = "Feature maps") -> pathlib.Path:
  """Feature maps of one input: one row per layer, one tile per channel (the first `max_channels`).

  Args:
    maps: {layer name: activations (H, W, C) or (1, H, W, C)} in the order to draw, e.g. from
      `jaxcnn.inspect.feature_maps` on a batch of one.
    path: the .png file to write.
    image: the input, (H, W), (H, W, C) or (1, H, W, C), drawn in the first column; None draws no input.
    max_channels: tiles per row. Default 16.
    title: the figure title. Default "Feature maps".

  Returns:
    The written path.
  """
  if not isinstance(maps, Mapping) or not maps:
    raise ValueError("maps: expected a non-empty mapping {layer name: (H, W, C) activations}")
  if isinstance(max_channels, bool) or not isinstance(max_channels, int) or max_channels < 1:
    raise ValueError(f"max_channels: expected an int >= 1, got {max_channels!r}")
  layers = {str(k): _one_example(_as_array(v, f"maps[{k!r}]", (3, 4)), f"maps[{k!r}]") for k, v in maps.items()}
  if image is not None:
    image = _as_array(image, "image", (2, 3, 4))
    image = _one_example(image, "image") if image.ndim == 4 else image
    image = image[..., None] if image.ndim == 2 else image
    if image.shape[-1] not in (1, 3):
      raise ValueError(f"image: expected 1 or 3 channels, got shape {image.shape}")
  import matplotlib
  viridis = matplotlib.colormaps["viridis"]
  cols = min(max_channels, max(a.shape[-1] for a in layers.values()))
  tile_in, label_in, title_in, image_in = 1.15, 1.1, 0.6, (1.25 if image is not None else 0.1)
  # Columns: the input (drawn once, at the top), the layer names, one montage per layer (one axes per
  # row, not per tile). Each row's height follows its maps' aspect, so every tile is tile_in wide.
  rows = []
  for name, activations in layers.items():
    height, width, channels = activations.shape
    tiles = [viridis(_scale01(activations[..., c]))[..., :3] for c in range(min(channels, max_channels))]
    band = max(1, round(0.25 * height))
    canvas, origins = _montage(tiles, cols, band=band, gap=max(1, round(0.08 * width)))
    rows.append((name, (height, width, channels), band, canvas, origins))
  montage_in = tile_in * cols
  row_in = [montage_in * canvas.shape[0] / canvas.shape[1] + 0.1 for *_, canvas, _ in rows]
  fig_w, fig_h = image_in + label_in + montage_in + 0.2, title_in + sum(row_in) + 0.1
  fig = Figure(figsize=(fig_w, fig_h))
  top = fig_h - title_in
  for (name, (height, width, channels), band, canvas, origins), row_h in zip(rows, row_in):
    top -= row_h
    _draw_montage(fig, ((image_in + label_in) / fig_w, top / fig_h, montage_in / fig_w, (row_h - 0.1) / fig_h),
                  canvas, origins, (height, width), band, [f"ch {c}" for c in range(len(origins))], fontsize=7)
    fig.text((image_in + label_in - 0.1) / fig_w, (top + (row_h - 0.1) / 2) / fig_h,
             f"{name}\n{height}x{width}x{channels}", ha="right", va="center", fontsize=8)
  if image is not None:
    shown = _scale01(image)
    side = image_in - 0.25
    ax = fig.add_axes((0.15 / fig_w, (fig_h - title_in - side - 0.2) / fig_h, side / fig_w, side / fig_h))
    ax.imshow(shown[..., 0] if shown.shape[-1] == 1 else shown, cmap="gray", interpolation="nearest")
    _hide_axes(ax)
    ax.set_title("input", fontsize=8)
  fig.suptitle(f"{title} (first {max_channels} channels per layer, each tile scaled to its own range)"
               if any(a.shape[-1] > max_channels for a in layers.values()) else title,
               y=1 - 0.15 / fig_h, va="top")
  return save_figure(fig, path)


def plot_images(images: Sequence, titles: Sequence[str], path, *, cols: int = 4,
                title: str | None = None) -> pathlib.Path:
  """A grid of images with a title each: grey (H, W) / (H, W, 1) in grey, (H, W, 3) in colour.

  Images in [0, 1] or uint8 0..255 are drawn as they are. Others (e.g. signed filter responses) are
  drawn with 0 as mid grey and +-L as white/black, L the 99.5th percentile of |value| in the tile (so a
  few extreme pixels do not wash out the rest; larger values are clipped).

  Args:
    images: a sequence of (H, W), (H, W, 1) or (H, W, 3) arrays.
    titles: one title per image.
    path: the .png file to write.
    cols: tiles per row. Default 4.
    title: the figure title, or None. Default None.

  Returns:
    The written path.
  """
  if not isinstance(images, Sequence) or not images:
    raise ValueError("images: expected a non-empty sequence of (H, W[, C]) arrays")
  if len(titles) != len(images):
    raise ValueError(f"titles: expected {len(images)} titles (one per image), got {len(titles)}")
  if isinstance(cols, bool) or not isinstance(cols, int) or cols < 1:
    raise ValueError(f"cols: expected an int >= 1, got {cols!r}")
  rows, cols = _grid(len(images), cols)
  fig = Figure(figsize=(3.2 * cols, 3.0 * rows + (0.4 if title else 0.0)), layout="constrained")
  axes = fig.subplots(rows, cols, squeeze=False)
  for index, ax in enumerate(axes.flat):
    _hide_axes(ax)
    if index >= len(images):
      ax.set_axis_off()
      continue
    raw = np.asarray(images[index])
    tile = _as_array(raw, f"images[{index}]", (2, 3))
    if tile.ndim == 3 and tile.shape[-1] == 1:
      tile = tile[..., 0]
    if tile.ndim == 3 and tile.shape[-1] != 3:
      raise ValueError(f"images[{index}]: expected 1 or 3 channels, got shape {tile.shape}")
    if raw.dtype == np.uint8:
      tile = tile / 255.0
    elif tile.min() < 0.0 or tile.max() > 1.0:
      tile = _scale_signed(tile)
    ax.imshow(tile, cmap="gray" if tile.ndim == 2 else None, vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_title(str(titles[index]), fontsize=9)
  if title:
    fig.suptitle(title)
  return save_figure(fig, path)
