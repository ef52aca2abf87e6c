"""Safety of loading: nothing read from a workdir or data dir is unpickled or evaluated, and a Keras .h5
is read as numeric arrays of that one file only.

Checkpoints go through Orbax's own restore (arrays + JSON/msgpack metadata, no pickle); history, digests
and summaries are JSON; raw data is parsed with numpy; Keras files with h5py.
"""
from __future__ import annotations

import ast
import builtins
import marshal
import pathlib
import pickle

import h5py
import numpy as np
import pytest

from jaxcnn.errors import DataError
from jaxcnn.interop import load_keras_weights, read_keras_weights

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "jaxcnn"

# Modules that turn bytes into code or objects.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve", "joblib", "yaml"}
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
# Attribute calls that unpickle: torch.load, pandas.read_pickle, np.load(allow_pickle=True).
UNSAFE_ATTRIBUTE_CALLS = {("torch", "load"), ("pd", "read_pickle"), ("pandas", "read_pickle")}


def _findings(path: pathlib.Path, root: pathlib.Path = PACKAGE.parent) -> list[str]:
  """Every unsafe import or call in the Python file `path`, as 'file:line: what'."""
  tree = ast.parse(path.read_text(), filename=str(path))
  found = []
  where = lambda node: f"{path.relative_to(root)}:{node.lineno}"  # noqa: E731
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [f"{where(node)}: import {a.name}" for a in node.names if a.name.split(".")[0] in UNSAFE_MODULES]
    elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
      found.append(f"{where(node)}: from {node.module} import ...")
    elif isinstance(node, ast.Call):
      func = node.func
      if isinstance(func, ast.Name) and func.id in UNSAFE_BUILTINS:
        found.append(f"{where(node)}: {func.id}(...)")
      if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        if (func.value.id, func.attr) in UNSAFE_ATTRIBUTE_CALLS:
          found.append(f"{where(node)}: {func.value.id}.{func.attr}(...)")
      if isinstance(func, ast.Attribute) and func.attr == "load":
        for keyword in node.keywords:
          if keyword.arg == "allow_pickle" and not (isinstance(keyword.value, ast.Constant)
                                                     and keyword.value.value is False):
            found.append(f"{where(node)}: load(allow_pickle=...)")
      if isinstance(func, ast.Attribute) and func.attr in ("loads", "load") and isinstance(func.value, ast.Name) \
          and func.value.id in UNSAFE_MODULES:
        found.append(f"{where(node)}: {func.value.id}.{func.attr}(...)")
  return found


def test_the_package_never_unpickles_or_evaluates():
  files = sorted(PACKAGE.rglob("*.py"))
  assert len(files) > 20, f"package not found at {PACKAGE}"
  findings = [f for path in files for f in _findings(path)]
  assert not findings, "unsafe loading in jaxcnn:\n" + "\n".join(findings)


def test_the_scan_catches_what_it_looks_for(tmp_path):
  """The scanner itself, on a file that does every forbidden thing."""
  source = ("import pickle\nfrom yaml import load\nimport numpy as np\nimport torch\n"
            "eval('1')\nexec('x = 1')\nnp.load('f.npy', allow_pickle=True)\ntorch.load('w.pt')\n"
            "pickle.loads(b'')\n")
  probe = tmp_path / "probe.py"
  probe.write_text(source)
  found = _findings(probe, tmp_path)
  assert len(found) == 7, found


def _keras2_file(path: pathlib.Path, *, lambda_config: bool = False) -> pathlib.Path:
  """A legacy whole-model Keras .h5: one Dense layer's weights plus a model_config attribute."""
  with h5py.File(path, "w") as f:
    config = '{"class_name": "Sequential", "config": {"layers": [{"class_name": "Dense"}]}}'
    if lambda_config:
      # A Lambda layer serialises its Python function as marshalled bytecode; loading the weights must not
      # touch it. This one would create a file if it ever ran.
      code = marshal.dumps(compile(f"open({str(path.parent / 'pwned')!r}, 'w').write('x')", "<lambda>", "exec"))
      config = ('{"class_name": "Sequential", "config": {"layers": [{"class_name": "Lambda", "config": '
                '{"function": ["' + code.hex() + '", null, null]}}, {"class_name": "Dense"}]}}')
    f.attrs["model_config"] = config
    weights = f.create_group("model_weights")
    weights.attrs["layer_names"] = [b"dense"]
    dense = weights.create_group("dense")
    dense.attrs["weight_names"] = [b"dense/kernel:0", b"dense/bias:0"]
    dense.create_dataset("dense/kernel:0", data=np.arange(6, dtype=np.float32).reshape(2, 3))
    dense.create_dataset("dense/bias:0", data=np.ones(3, np.float32))
  return path


def test_keras_import_reads_arrays_only_never_code(tmp_path, monkeypatch):
  path = _keras2_file(tmp_path / "model.h5", lambda_config=True)
  variables = {"params": {"dense": {"kernel": np.zeros((2, 3), np.float32), "bias": np.zeros(3, np.float32)}}}
  load_keras_weights(_keras2_file(tmp_path / "plain.h5"), variables)  # imports done before the traps are set
  calls = []

  def trap(name):
    def refuse(*args, **kwargs):
      calls.append(name)
      raise RuntimeError(f"{name} called while importing Keras weights")
    return refuse

  for module, name in ((builtins, "eval"), (builtins, "exec"), (pickle, "loads"), (pickle, "load"),
                       (marshal, "loads"), (marshal, "load")):
    monkeypatch.setattr(module, name, trap(f"{module.__name__}.{name}"))
  try:
    weights = read_keras_weights(path)
    loaded = load_keras_weights(path, variables)
  finally:
    monkeypatch.undo()
  assert not calls, calls
  np.testing.assert_array_equal(weights["dense"][0], np.arange(6).reshape(2, 3))
  np.testing.assert_array_equal(np.asarray(loaded["params"]["dense"]["kernel"]), np.arange(6).reshape(2, 3))
  assert not (tmp_path / "pwned").exists()


def test_keras_import_refuses_data_from_other_files(tmp_path):
  """HDF5 can point a weight at another file (an external link) or at raw bytes of any file (external
  storage); an imported weight must come from the named .h5 itself."""
  secret = tmp_path / "secret.bin"
  secret.write_bytes(np.arange(24, dtype=np.float32).tobytes())
  other = tmp_path / "other.h5"
  with h5py.File(other, "w") as f:
    f.create_dataset("kernel", data=np.full((2, 3), 7, np.float32))

  linked = _keras2_file(tmp_path / "linked.h5")
  with h5py.File(linked, "a") as f:
    dense = f["model_weights/dense"]
    del dense["dense/kernel:0"]
    dense["dense/kernel:0"] = h5py.ExternalLink(str(other), "kernel")
  with pytest.raises(DataError, match=r"linked.h5: .*kernel.* (another file|external)"):
    read_keras_weights(linked)

  stored = _keras2_file(tmp_path / "stored.h5")
  with h5py.File(stored, "a") as f:
    dense = f["model_weights/dense"]
    del dense["dense/kernel:0"]
    dense.create_dataset("dense/kernel:0", shape=(2, 3), dtype=np.float32, external=[(str(secret), 0, 24)])
  with pytest.raises(DataError, match=r"stored.h5: .*kernel.* (another file|external)"):
    read_keras_weights(stored)
