"""experiments.autoencoder: tiny end-to-end runs of both decoders (shipped MNIST), their outputs and saved
model, the noisy pipeline, bad config."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from experiments import autoencoder
from jaxcnn.errors import ConfigError

from helpers import read_once


@pytest.fixture(autouse=True)
def _mnist_read_once(monkeypatch):
  """The in-process tests call the recipe's MNIST loader four times; each split is read once."""
  from jaxcnn import data
  monkeypatch.setattr(data, "load_arrays", read_once(data.load_arrays))


def _tiny_config(**data):
  config = autoencoder.get_config()
  config.data.update({**dict(train_examples=64, test_examples=16), **data})
  config.train.update(dict(epochs=1, batch_size=16, log_every=2))
  config.num_images = 4
  return config


REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
TINY_FLAGS = ("--config.data.train_examples=64", "--config.data.test_examples=16", "--config.train.epochs=1",
              "--config.train.batch_size=16", "--config.train.log_every=2", "--config.num_images=4")


def _check_saved_model(workdir, noisy_count=16):
  """workdir/model loads and reproduces the run's denoised images bitwise."""
  from jaxcnn import train
  loaded = train.load(workdir / "model")
  noisy = autoencoder.add_noise(autoencoder._load(autoencoder.get_config(), "test", noisy_count), 0.5, seed=1)
  denoised = autoencoder.denoise(loaded, noisy, batch_size=16)
  assert denoised.shape == noisy.shape and 0.0 <= denoised.min() and denoised.max() <= 1.0
  return loaded, denoised


def test_tiny_run_writes_results_and_figures(tmp_path):
  workdir = tmp_path / "run"
  summary = autoencoder.main(_tiny_config(), workdir)
  results = summary["results"]
  saved = json.loads((workdir / "summary.json").read_text())
  assert saved["results"] == pytest.approx(results) and saved["experiment"] == "autoencoder"
  assert saved["config"]["data"]["noise_factor"] == 0.5
  assert saved["data"]["train_examples"] == 64 and saved["data"]["test_examples"] == 16
  assert saved["run"]["epochs"] == 1
  assert np.isfinite(results["test_loss"]) and 0 < results["test_loss"] < 1  # BCE of [0, 1] targets
  # Noise factor 0.5 on MNIST costs about 10 dB; even an untrained model's output is a valid image.
  assert 7 < results["psnr_noisy_db"] < 13
  assert np.isfinite(results["psnr_denoised_db"])
  history = json.loads((workdir / "history.json").read_text())
  assert history["epoch"] == [1] and len(history["val_loss"]) == 1
  # (noisy, clean) float arrays: fit prepares them as they are
  assert saved["config"]["train"]["normalize"] == "auto"
  for figure in ("denoised.png", "loss.png"):
    assert (workdir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  loaded, denoised = _check_saved_model(workdir)
  assert json.loads((workdir / "model" / "model.json").read_text())["architecture"] == {
      "kind": "registry", "name": "conv_autoencoder", "kwargs": {"channels": 1}}
  # The PSNR of the summary is the saved model's: the same denoised images.
  clean = autoencoder._load(autoencoder.get_config(), "test", 16)
  assert float(np.mean(autoencoder.psnr(denoised, clean))) == pytest.approx(results["psnr_denoised_db"], abs=1e-9)


def test_command_trains_the_conv2d_transpose_decoder(tmp_path):
  workdir = tmp_path / "transpose"
  proc = subprocess.run([sys.executable, "-m", "experiments.autoencoder", f"--workdir={workdir}",
                         "--config.model=conv_transpose_autoencoder", *TINY_FLAGS], cwd=REPO_ROOT,
                        capture_output=True, text=True, timeout=600, env=dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["config"]["model"] == "conv_transpose_autoencoder"
  assert np.isfinite(summary["results"]["test_loss"]) and 0 < summary["results"]["test_loss"] < 1
  assert "PSNR noisy" in proc.stdout
  loaded, _ = _check_saved_model(workdir)
  assert type(loaded.module.layers[4]).__name__ == "Conv2DTranspose"  # keras.io's learned upsampling


def test_noise_is_clipped_deterministic_and_zero_noise_is_the_identity():
  clean = np.random.default_rng(0).uniform(size=(8, 6, 6, 1)).astype(np.float32)
  noisy = autoencoder.add_noise(clean, 0.5, seed=3)
  np.testing.assert_array_equal(noisy, autoencoder.add_noise(clean, 0.5, seed=3))
  assert not np.array_equal(noisy, autoencoder.add_noise(clean, 0.5, seed=4))
  assert noisy.dtype == np.float32 and noisy.min() >= 0.0 and noisy.max() <= 1.0
  # Before clipping the noise has std 0.5: most pixels move.
  assert np.mean(np.abs(noisy - clean) > 1e-3) > 0.5
  np.testing.assert_array_equal(autoencoder.add_noise(clean, 0.0, seed=3), clean)


def test_psnr_by_hand():
  reference = np.zeros((2, 2, 2, 1))
  images = reference.copy()
  images[0, 0, 0, 0] = 0.2          # mse 0.04 / 4 = 0.01 -> 20 dB
  images[1] = 0.1                   # mse 0.01 -> 20 dB as well
  np.testing.assert_allclose(autoencoder.psnr(images, reference), [20.0, 20.0])
  assert autoencoder.psnr(reference, reference)[0] == np.inf
  with pytest.raises(ValueError, match=r"psnr: images \(2, 2, 2, 1\) and reference \(2, 4\) differ"):
    autoencoder.psnr(images, np.zeros((2, 4)))


def test_bad_config(tmp_path):
  with pytest.raises(ConfigError, match=r"config: model='mnist_convnet' is not a registered reconstruction model; "
                                        r"expected one of conv_autoencoder, conv_transpose_autoencoder"):
    config = _tiny_config()
    config.model = "mnist_convnet"
    autoencoder.main(config, tmp_path / "classifier")
  assert not (tmp_path / "classifier").exists()
  with pytest.raises(ConfigError, match=r"config: data.train_examples=70000 exceeds the 60000 train images"):
    autoencoder.main(_tiny_config(train_examples=70000), tmp_path / "big")
  with pytest.raises(ValueError, match=r"noise_factor: expected a number >= 0, got -0.1"):
    autoencoder.main(_tiny_config(noise_factor=-0.1), tmp_path / "noise")
