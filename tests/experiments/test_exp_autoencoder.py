"""experiments.autoencoder: a tiny end-to-end run (shipped MNIST), its outputs, the noisy pipeline, bad config."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import autoencoder
from jaxcnn import data
from jaxcnn.errors import ConfigError


def _tiny_config(**overrides):
  config = autoencoder.get_config()
  config.update({**dict(train_examples=64, test_examples=16, epochs=1, batch_size=16, log_every=2,
                        num_images=4), **overrides})
  return config


def test_tiny_run_writes_results_and_figures(tmp_path):
  workdir = tmp_path / "run"
  results = autoencoder.main(_tiny_config(), workdir)
  summary = json.loads((workdir / "summary.json").read_text())
  assert summary["results"] == pytest.approx(results)
  assert summary["config"]["noise_factor"] == 0.5
  assert results["train_examples"] == 64 and results["test_examples"] == 16
  assert results["epochs_completed"] == 1
  assert np.isfinite(results["test_loss"]) and 0 < results["test_loss"] < 1  # BCE of [0, 1] targets
  # Noise factor 0.5 on MNIST costs about 10 dB; even an untrained model's output is a valid image.
  assert 7 < results["psnr_noisy_db"] < 13
  assert np.isfinite(results["psnr_denoised_db"])
  history = json.loads((workdir / "history.json").read_text())
  assert history["epoch"] == [1] and len(history["val_loss"]) == 1
  for figure in ("denoised.png", "loss.png"):
    assert (workdir / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_noisy_pipeline_is_clipped_deterministic_and_keeps_the_clean_target():
  images = np.random.default_rng(0).integers(0, 256, size=(8, 6, 6, 1), dtype=np.uint8)
  clean = data.from_arrays(images, np.zeros(8, np.int32), batch_size=4, seed=0, shuffle=False,
                           normalize="scale", num_classes=1)
  noisy = autoencoder.NoisyPipeline(clean, 0.5, seed=3)
  assert (noisy.batch_size, noisy.steps_per_epoch, noisy.image_shape) == (4, 2, (6, 6, 1))
  first = list(noisy.batches(0))
  again = list(noisy.batches(0))
  for batch, repeat, start in zip(first, again, (0, 4)):
    np.testing.assert_allclose(batch["clean"], images[start:start + 4] / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(batch["image"], repeat["image"])
    assert float(jnp.min(batch["image"])) >= 0.0 and float(jnp.max(batch["image"])) <= 1.0
    # Before clipping the noise has std 0.5: most pixels move.
    assert np.mean(np.abs(np.asarray(batch["image"] - batch["clean"])) > 1e-3) > 0.5
  other_epoch = next(iter(noisy.batches(1)))
  assert not np.array_equal(np.asarray(other_epoch["image"]), np.asarray(first[0]["image"]))
  # Zero noise is the identity.
  plain = next(iter(autoencoder.NoisyPipeline(clean, 0.0, seed=3).batches(0)))
  np.testing.assert_array_equal(plain["image"], plain["clean"])


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
  with pytest.raises(ConfigError, match=r"config: train_examples=70000 exceeds the 60000 train images"):
    autoencoder.main(_tiny_config(train_examples=70000), tmp_path / "big")
  with pytest.raises(ValueError, match=r"noise_factor: expected a number >= 0, got -0.1"):
    autoencoder.main(_tiny_config(noise_factor=-0.1), tmp_path / "noise")
