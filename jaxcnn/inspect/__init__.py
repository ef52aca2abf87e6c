"""Looking inside models: `summary` (a Keras-style table of layers, output shapes and parameters),
`feature_maps` (intermediate activations), and the PNG figures of a run (`plot_*`, `confusion_matrix`).

The figure functions load matplotlib on first use, so `import jaxcnn.inspect` stays light.
"""
import importlib

from jaxcnn.inspect.features import feature_maps
from jaxcnn.inspect.summary import ModelSummary, SummaryRow, summary

_PLOTS = ("confusion_matrix", "plot_confusion_matrix", "plot_feature_maps", "plot_filters", "plot_history",
          "plot_images", "save_figure")


def __getattr__(name):
  if name in _PLOTS:
    return getattr(importlib.import_module("jaxcnn.inspect.plots"), name)
  raise AttributeError(f"module 'jaxcnn.inspect' has no attribute {name!r}")


__all__ = ["ModelSummary", "SummaryRow", "feature_maps", "summary", *_PLOTS]
