"""The PyTorch twin of `python -m experiments.mnist`: the same recipe written as a PyTorch user would.

    python -m benchmarks.mnist_torch [--data-dir DIR] [--epochs 3] [--seed 0] [--init torch|keras] [--out PATH]

The recipe of experiments/mnist.py's default config, step for step:
  data       the MNIST IDX files (default: the copy shipped in experiments/data/mnist); the last 5% of the
             training file (3,000 images) held out for validation, as Keras' validation_split does
  inputs     featurewise standardisation: the training portion's pixel mean and std (one channel)
  model      mnist_fast_cnn: Conv(32,3)-BN-ReLU-MaxPool(2), [Conv(64,3)-BN-ReLU] x 2-MaxPool(2),
             Flatten-Dense(128)-BN-ReLU-Dropout(0.3)-Dense(10); no bias before a BatchNorm; BatchNorm
             with Keras' settings (epsilon 1e-3, momentum 0.9 = torch momentum 0.1)
  training   3 epochs, batch 128, a reshuffle each epoch, the last partial batch dropped (445 steps an
             epoch); Adam (betas 0.9/0.999, eps 1e-8) with optax's warmup_cosine_decay_schedule: linear
             0 -> 3e-3 over 130 steps, cosine to 0 at the last step; softmax cross-entropy
  evaluation the 10,000 test images in eval mode, batches of 1000
`--init torch` keeps PyTorch's default initialisation (kaiming_uniform with a=sqrt(5), uniform biases);
`--init keras` uses jaxcnn's (Keras') initialisation: glorot_uniform kernels and zero biases.

Times: `wall_seconds` from this module's first line to the end, `train_seconds` the training loop alone,
`images_per_second` = training images / train_seconds (PyTorch compiles nothing, so no warm-up is
excluded). Prints one JSON object (and writes it to --out).
"""
from __future__ import annotations

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import gzip  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import pathlib  # noqa: E402
import struct  # noqa: E402

import numpy as np  # noqa: E402

SHIPPED_MNIST = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "data" / "mnist"
RECIPE = dict(epochs=3, batch_size=128, validation_split=0.05, learning_rate=3e-3, warmup_steps=130,
              dropout=0.3, bn_epsilon=1e-3, bn_momentum=0.9, eval_batch_size=1000)


def read_idx(path: pathlib.Path) -> np.ndarray:
  """An IDX file (gzipped or not) as a uint8 array."""
  raw = path.read_bytes()
  if raw[:2] == b"\x1f\x8b":
    raw = gzip.decompress(raw)
  ndim = raw[3]
  dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path:
  for name in (f"{stem}.gz", stem):
    for where in (directory, directory / "mnist"):
      if (where / name).is_file():
        return where / name
  raise SystemExit(f"error: --data-dir {directory}: no {stem}[.gz] (MNIST IDX files) there")


def load(directory: pathlib.Path):
  files = {k: _find(directory, s) for k, s in (("x", "train-images-idx3-ubyte"), ("y", "train-labels-idx1-ubyte"),
                                                ("tx", "t10k-images-idx3-ubyte"), ("ty", "t10k-labels-idx1-ubyte"))}
  return {k: read_idx(p) for k, p in files.items()}


def build(torch, init: str):
  nn = torch.nn
  eps, momentum = RECIPE["bn_epsilon"], 1.0 - RECIPE["bn_momentum"]

  def block(cin, cout):
    return [nn.Conv2d(cin, cout, 3, bias=False), nn.BatchNorm2d(cout, eps=eps, momentum=momentum), nn.ReLU()]

  model = nn.Sequential(
      *block(1, 32), nn.MaxPool2d(2),
      *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
      nn.Flatten(), nn.Linear(4 * 4 * 64, 128, bias=False), nn.BatchNorm1d(128, eps=eps, momentum=momentum),
      nn.ReLU(), nn.Dropout(RECIPE["dropout"]), nn.Linear(128, 10))
  if init == "keras":
    for module in model.modules():
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
          nn.init.zeros_(module.bias)
  return model


def schedule(step: int, peak: float, warmup: int, total: int) -> float:
  """optax.warmup_cosine_decay_schedule(0, peak, warmup, total) at `step`."""
  if step < warmup:
    return peak * step / warmup
  progress = min((step - warmup) / max(total - warmup, 1), 1.0)
  return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def run(data_dir: pathlib.Path, *, epochs: int, seed: int, init: str, train_examples: int = 0,
        threads: int | None = None) -> dict:
  import torch

  if threads:
    torch.set_num_threads(threads)
  torch.manual_seed(seed)
  data = load(data_dir)
  x, y = data["x"], data["y"].astype(np.int64)
  if train_examples:
    x, y = x[:train_examples], y[:train_examples]
  n_val = int(len(x) * RECIPE["validation_split"])
  x_train, y_train, x_val, y_val = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
  mean, std = float(x_train.mean()), float(x_train.std())

  def prepare(images):
    return torch.from_numpy(((images.astype(np.float32) - mean) / std)[:, None, :, :])

  xt, yt = prepare(x_train), torch.from_numpy(y_train)
  model = build(torch, init)
  optimizer = torch.optim.Adam(model.parameters(), lr=RECIPE["learning_rate"], betas=(0.9, 0.999), eps=1e-8)
  batch = RECIPE["batch_size"]
  steps_per_epoch = len(xt) // batch
  total = epochs * steps_per_epoch
  lr_at = lambda step: schedule(step, RECIPE["learning_rate"], RECIPE["warmup_steps"], total)  # noqa: E731
  loss_fn = torch.nn.CrossEntropyLoss()
  generator = torch.Generator().manual_seed(seed)
  step = 0
  started = time.perf_counter()
  for _ in range(epochs):
    model.train()
    order = torch.randperm(len(xt), generator=generator)
    for i in range(steps_per_epoch):
      index = order[i * batch:(i + 1) * batch]
      for group in optimizer.param_groups:
        group["lr"] = lr_at(step)
      optimizer.zero_grad(set_to_none=True)
      loss = loss_fn(model(xt[index]), yt[index])
      loss.backward()
      optimizer.step()
      step += 1
  train_seconds = time.perf_counter() - started

  def accuracy(images, labels):
    model.eval()
    correct = 0
    with torch.no_grad():
      inputs = prepare(images)
      for i in range(0, len(inputs), RECIPE["eval_batch_size"]):
        logits = model(inputs[i:i + RECIPE["eval_batch_size"]])
        correct += int((logits.argmax(1).numpy() == labels[i:i + RECIPE["eval_batch_size"]]).sum())
    return correct / len(images)

  return {"framework": f"torch {torch.__version__}", "threads": torch.get_num_threads(), "init": init, "seed": seed,
          "epochs": epochs, "steps": step, "batch_size": batch, "train_seconds": train_seconds,
          "images_per_second": step * batch / train_seconds, "val_accuracy": accuracy(x_val, y_val),
          "test_accuracy": accuracy(data["tx"], data["ty"].astype(np.int64))}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.mnist_torch", description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", type=pathlib.Path, default=SHIPPED_MNIST, help="MNIST IDX files")
  parser.add_argument("--epochs", type=int, default=RECIPE["epochs"])
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--init", choices=("torch", "keras"), default="torch")
  parser.add_argument("--train-examples", type=int, default=0, help="the first n training images (smoke runs)")
  parser.add_argument("--threads", type=int, default=None,
                      help="torch.set_num_threads (default: torch's, one per usable core)")
  parser.add_argument("--out", type=pathlib.Path, default=None, help="also write the JSON here")
  args = parser.parse_args(argv)
  result = run(args.data_dir, epochs=args.epochs, seed=args.seed, init=args.init,
               train_examples=args.train_examples, threads=args.threads)
  result["wall_seconds"] = time.perf_counter() - _START
  text = json.dumps(result, indent=2)
  if args.out:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
  print(text)
  return result


if __name__ == "__main__":
  main()
