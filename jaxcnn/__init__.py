"""jaxcnn: convolutional neural networks in functional JAX/Flax.

`jaxcnn.ops` are the fast functional ops jit runs, `jaxcnn.reference` their slow, obviously correct
twins, `jaxcnn.layers` Flax linen modules over them, `jaxcnn.models` a registry of networks.
`jaxcnn.data`, `jaxcnn.train` and `jaxcnn.interop` load on first use, so `import jaxcnn` stays light
(it never imports TensorFlow).
"""
from __future__ import annotations

import importlib

from jaxcnn import errors

__version__ = "0.1.0"

_LAZY_SUBMODULES = ("ops", "reference", "layers", "models", "inspect", "data", "train", "interop")
_LAZY_ATTRS = {"summary": ("jaxcnn.inspect", "summary"), "verify": ("jaxcnn._verify", "verify")}


def __getattr__(name):
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"jaxcnn.{name}")
  if name in _LAZY_ATTRS:
    module, attr = _LAZY_ATTRS[name]
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f"module 'jaxcnn' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_LAZY_SUBMODULES) + list(_LAZY_ATTRS))


__all__ = ["errors", *_LAZY_SUBMODULES, *_LAZY_ATTRS]
