"""What every experiment shares: config.train is fit's whole config, one summary schema, shared pieces
that take explicit arguments (no recipe imports another recipe's library code)."""
from __future__ import annotations

import ast
import importlib
import json
import pathlib

import numpy as np
import pytest

from experiments import _common
from jaxcnn.train import DEFAULTS, validate_config

EXPERIMENTS = ("mnist", "fashion_mnist", "cifar10", "cats_vs_dogs", "autoencoder", "transfer", "filters")
ROOT = pathlib.Path(__file__).resolve().parents[2] / "experiments"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_config_train_is_exactly_fits_keys_and_valid(name):
  config = importlib.import_module(f"experiments.{name}").get_config()
  assert set(config.train) == set(DEFAULTS)
  validate_config(config.train)
  config.train.weight_decay = 1e-4  # every command takes --config.train.<any fit key>
  config.train.batch_size = 64      # None defaults are typed placeholders


def test_recipes_import_no_other_recipe_except_the_declared_variant():
  for path in ROOT.glob("*.py"):
    tree = ast.parse(path.read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                and node.module == "experiments" for alias in node.names}
    recipes = imported - {"_common", "_runner"}
    # fashion_mnist is a config variant of mnist (its get_config imports the default and overrides)
    assert recipes <= ({"mnist"} if path.stem == "fashion_mnist" else set()), (path.name, recipes)


def test_predict_pads_the_last_batch_and_applies_the_preprocessing():
  from jaxcnn import layers as L
  from jaxcnn.data import from_arrays, preprocess
  from jaxcnn.train import TrainedModel, create_train_state
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (10, 4, 4, 1), dtype=np.uint8)
  labels = rng.integers(0, 3, 10).astype(np.int32)
  spec = from_arrays(images, labels, batch_size=5, seed=0).preprocessing
  model = L.Sequential([L.Flatten(), L.Dense(3)])
  trained = TrainedModel(model, create_train_state(model, (4, 4, 1)), preprocessing=spec)
  got = _common.predict(trained, images, labels, batch_size=4)
  logits = np.asarray(model.apply(trained.variables, preprocess(spec, images)))
  assert got["count"] == 10 and got["predictions"].tolist() == logits.argmax(-1).tolist()
  assert got["accuracy"] == pytest.approx(np.mean(logits.argmax(-1) == labels))
  assert got["loss"] == pytest.approx(trained.evaluate(images, labels, batch_size=4)["loss"], rel=1e-6)
  assert got["first_batch"].shape == (4, 4, 4, 1)


def test_one_summary_schema(tmp_path):
  import ml_collections
  summary = _common.write_summary(tmp_path, experiment="x", config=ml_collections.ConfigDict({"a": 1}),
                                  results={"r": 1.0}, data={"train_examples": 3}, figures=[tmp_path / "f.png"],
                                  started=0.0)
  saved = json.loads((tmp_path / "summary.json").read_text())
  assert saved == json.loads(json.dumps(summary))
  assert set(saved) == {"schema", "experiment", "results", "data", "run", "timing", "device", "figures", "config",
                        "finished_at"}
  assert saved["schema"] == "jaxcnn.experiment-summary/1" and saved["figures"] == ["f.png"]
  assert saved["data"] == {"source": None, "train_examples": 3, "validation_examples": None, "test_examples": None}
