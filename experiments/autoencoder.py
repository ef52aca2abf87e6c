"""The textbook convolutional denoising autoencoder on MNIST (offline: the data ships with the repo).

    python -m experiments.autoencoder [--workdir=DIR] [--config.train.epochs=10]

As the textbook does it: the images get Gaussian noise once (noise factor 0.5, clipped to [0, 1]) and
`jaxcnn.train.fit(model, (noisy, clean))` trains the model (`jaxcnn.models.conv_autoencoder`:
Conv/MaxPool encoder to 4x4x8, Conv/UpSampling decoder, sigmoid output folded into the loss) to return
the clean digit under binary cross-entropy; `--config.model=conv_transpose_autoencoder` trains the keras.io
Conv2DTranspose decoder instead. Reports the test reconstruction loss and the PSNR of noisy
vs denoised test images against the clean ones, and draws clean / noisy / denoised rows (denoised.png)
and the loss curves (loss.png). With the defaults (5 epochs, batch 128, Adam 1e-3) the denoised digits
should come out several dB closer to the clean ones than the noisy inputs (benchmarks/README.md has
the measured run); about a CPU-minute per epoch.

Outputs in the workdir: summary.json (config, device, results), history.json (per-epoch loss,
val_loss), denoised.png, loss.png, model/ (the trained model: `jaxcnn.train.load`), checkpoints/ (a
re-run with the same workdir resumes).
"""
from __future__ import annotations

import math
import pathlib
import time

import ml_collections
import numpy as np

from experiments import _common, _runner
from jaxcnn.train import default_config


def get_config() -> ml_collections.ConfigDict:
  """The defaults of the run; every key can be overridden with --config.<key>=<value>."""
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict(dict(
      data_dir="",            # raw MNIST IDX dir; "" = the files shipped in experiments/data
      noise_factor=0.5,       # std of the Gaussian noise added to [0, 1] images, then clipped
      train_examples=0,       # first N training images (0 = all 60,000)
      test_examples=0,        # first N test images (0 = all 10,000)
  ))
  config.model = "conv_autoencoder"  # or "conv_transpose_autoencoder" (keras.io's Conv2DTranspose decoder)
  # jaxcnn.train.fit's config, passed unchanged: (noisy, clean) float arrays, so normalize "auto" leaves
  # them as they are; binary cross-entropy of the sigmoid of the outputs against the clean pixels
  config.train = default_config(epochs=5, batch_size=128, loss="sigmoid_binary_cross_entropy", optimizer="adam",
                                learning_rate=1e-3, log_every=100)
  config.num_images = 10          # columns of the clean / noisy / denoised figure
  return config


def check_model(name: str) -> None:
  """ConfigError unless `name` is a registered reconstruction model (conv_autoencoder: UpSampling2D
  decoder; conv_transpose_autoencoder: keras.io's Conv2DTranspose decoder)."""
  from jaxcnn import models
  from jaxcnn.errors import ConfigError
  reconstruction = [n for n in models.names() if models.spec(n).task == "reconstruction"]
  if name not in reconstruction:
    raise ConfigError(f"config: model={name!r} is not a registered reconstruction model; expected one of "
                      f"{', '.join(reconstruction)}")


def add_noise(clean, noise_factor: float, seed: int) -> np.ndarray:
  """clip(clean + noise_factor * N(0, 1), 0, 1) as float32: the textbook's noisy inputs, drawn once.

  Args:
    clean: float images in [0, 1].
    noise_factor: the noise's standard deviation (>= 0; 0 returns the clean images).
    seed: the noise seed (numpy), so a resumed run and every evaluation see the same noisy images.
  """
  if not (isinstance(noise_factor, (int, float)) and not isinstance(noise_factor, bool)
          and math.isfinite(noise_factor) and noise_factor >= 0):
    raise ValueError(f"noise_factor: expected a number >= 0, got {noise_factor!r}")
  clean = np.asarray(clean, np.float32)
  noise = np.random.default_rng(seed).standard_normal(clean.shape, dtype=np.float32)
  return np.clip(clean + np.float32(noise_factor) * noise, 0.0, 1.0)


def psnr(images, reference) -> np.ndarray:
  """Peak signal-to-noise ratio in dB of each image against its reference, both in [0, 1] (peak 1).

  Args:
    images: (N, H, W, C) float.
    reference: (N, H, W, C) float, the clean images.

  Returns:
    (N,) float64: 10 log10(1 / mean squared error) per image (inf for an exact copy).
  """
  images, reference = np.asarray(images, np.float64), np.asarray(reference, np.float64)
  if images.shape != reference.shape:
    raise ValueError(f"psnr: images {images.shape} and reference {reference.shape} differ in shape")
  mse = np.mean((images - reference) ** 2, axis=tuple(range(1, images.ndim)))
  with np.errstate(divide="ignore"):
    return 10.0 * np.log10(1.0 / mse)


def _load(config, split: str, count: int):
  """[0, 1] float32 images (N, 28, 28, 1) of a split of the MNIST files, the first `count` (0: all)."""
  from jaxcnn import data
  data_dir = config.data.data_dir or _runner.SHIPPED_DATA
  images, _ = _common.primary_first(lambda: data.load_arrays("mnist", split, data_dir=data_dir, download=False))
  if count:
    if count > len(images):
      from jaxcnn.errors import ConfigError
      raise ConfigError(f"config: data.{split}_examples={count} exceeds the {len(images)} {split} images")
    images = images[:count]
  return images.astype(np.float32) / 255.0


def denoise(trained, noisy, *, batch_size: int) -> np.ndarray:
  """sigmoid(model(noisy)) for a logits model, model(noisy) for one ending in a sigmoid: the denoised
  images, float32 in [0, 1] (`trained.predict`: the run's preprocessing, one compiled program)."""
  outputs = trained.predict(noisy, batch_size=batch_size)
  if trained.from_logits:
    outputs = 1.0 / (1.0 + np.exp(-outputs.astype(np.float64)))
  return outputs.astype(np.float32)


def plot_denoised(path, clean, noisy, denoised, *, title: str) -> None:
  """A 3-row figure: clean, noisy and denoised versions of the same images (one per column)."""
  from matplotlib.figure import Figure

  from jaxcnn.inspect import save_figure
  columns = len(clean)
  fig = Figure(figsize=(1.3 * columns + 1.2, 4.6), layout="tight")
  axes = fig.subplots(3, columns, squeeze=False)
  for row, (label, images) in enumerate((("clean", clean), ("noisy input", noisy), ("denoised", denoised))):
    for col in range(columns):
      ax = axes[row, col]
      ax.imshow(images[col][..., 0], cmap="gray", vmin=0.0, vmax=1.0)
      ax.set_xticks([])
      ax.set_yticks([])
    axes[row, 0].set_ylabel(label, fontsize=11)
  fig.suptitle(title, fontsize=12)
  save_figure(fig, path)


def plot_losses(path, history: dict, *, title: str) -> None:
  """Training and test loss per epoch."""
  from matplotlib.figure import Figure

  from jaxcnn.inspect import save_figure
  fig = Figure(figsize=(6, 4), layout="tight")
  ax = fig.subplots()
  ax.plot(history["epoch"], history["loss"], "o-", label="training (noisy -> clean)")
  if "val_loss" in history:
    ax.plot(history["epoch"], history["val_loss"], "s-", label="test (noisy -> clean)")
  ax.set_xlabel("epoch")
  ax.set_ylabel("binary cross-entropy per pixel")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  save_figure(fig, path)


def main(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> dict:
  """Trains the denoising autoencoder, evaluates it, writes the summary and figures; returns the summary."""
  from jaxcnn import models, train
  started = time.perf_counter()
  workdir = pathlib.Path(workdir)
  fit_config = train.validate_config(config.train)
  check_model(config.model)

  # input: clean [0, 1] images -> (noisy, clean) arrays; the test noise is another stream than training's
  clean_train = _load(config, "train", config.data.train_examples)
  clean_test = _load(config, "test", config.data.test_examples)
  noisy_train = add_noise(clean_train, config.data.noise_factor, seed=fit_config.seed)
  noisy_test = add_noise(clean_test, config.data.noise_factor, seed=fit_config.seed + 1)

  # model -> fit (resumes from workdir/checkpoints)
  model = models.get(config.model, channels=clean_train.shape[-1])
  result, run, timing = _common.fit(model, (noisy_train, clean_train), config=config.train, workdir=workdir,
                                    val_data=(noisy_test, clean_test))

  result.save(workdir / "model")  # jaxcnn.train.load(workdir / "model") gives it back

  # report: test loss, PSNR of noisy and denoised images against the clean ones
  test_loss = result.evaluate(noisy_test, clean_test, batch_size=fit_config.batch_size)["loss"]
  denoised = denoise(result, noisy_test, batch_size=fit_config.batch_size)
  psnr_noisy = float(np.mean(psnr(noisy_test, clean_test)))
  psnr_denoised = float(np.mean(psnr(denoised, clean_test)))
  print(f"test BCE {test_loss:.4f}; PSNR noisy {psnr_noisy:.2f} dB -> denoised {psnr_denoised:.2f} dB")

  figures = []
  if _common.is_primary():
    shown = min(config.num_images, len(clean_test))
    plot_denoised(workdir / "denoised.png", clean_test[:shown], noisy_test[:shown], denoised[:shown],
                  title=f"MNIST test digits, noise factor {config.data.noise_factor}: PSNR {psnr_noisy:.1f} dB "
                        f"(noisy) -> {psnr_denoised:.1f} dB (denoised)")
    figures.append(workdir / "denoised.png")
    if result.history.get("epoch"):
      plot_losses(workdir / "loss.png", result.history, title=f"Denoising autoencoder: test BCE {test_loss:.4f}")
      figures.append(workdir / "loss.png")
  return _common.write_summary(
      workdir, experiment="autoencoder", config=config,
      results={"test_loss": test_loss, "psnr_noisy_db": psnr_noisy, "psnr_denoised_db": psnr_denoised},
      data={"source": f"mnist {config.data.data_dir or _runner.SHIPPED_DATA}",
            "train_examples": result.data["train_examples"], "validation_examples": result.data["validation_examples"],
            "test_examples": len(clean_test)},
      run=run, timing=timing, figures=figures, started=started)


if __name__ == "__main__":
  _runner.run(__name__, get_config, main)
