"""Inference throughput: jaxcnn's evaluate and a jitted eval-mode apply vs PyTorch eval mode, interleaved.

    python -m benchmarks.predict [--model mnist_fast_cnn] [--batch 1000] [--examples 10000] [--repeats 5]
                                 [--out PATH]

Every contender classifies the same `--examples` featurewise-standardised images (random uint8 digits)
with identical weights (jaxcnn's initial variables, copied into the torch module), in batches of --batch,
the last one padded where it is partial:

  jaxcnn evaluate   `jaxcnn.train.evaluate(variables, model, (images, labels), batch_size=...)`: the whole
                    call, loss and accuracy included (what a user runs)
  jaxcnn apply      `jax.jit(model.apply(..., train=False))` once per batch shape, batches of device arrays
  jaxcnn predict    the trained-model object's `predict` when `jaxcnn.train` provides one
                    (`jaxcnn.train.model.TrainedModel.predict` or `jaxcnn.train.predict`), else skipped
  torch             the torch.nn twin in eval mode under torch.no_grad(), NCHW, set_num_threads(cores)

The first two calls of each contender are warm-up (compilation); then --repeats rounds go round-robin over
the contenders. Reported: images/s (median) and the ratio to torch. The JSON result goes to
benchmarks/results/predict.json unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common, _peers
from jaxcnn import models


def _predict_hook():
  """The trained-model predict the project offers, as fn(model, variables, images, batch_size) -> logits,
  or None where there is none yet."""
  from jaxcnn import train
  fn = getattr(train, "predict", None)
  if callable(fn):
    return lambda model, variables, images, batch: fn(model, variables, images, batch_size=batch)
  return None


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.predict", description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="mnist_fast_cnn")
  parser.add_argument("--batch", type=int, default=1000)
  parser.add_argument("--examples", type=int, default=10000)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/predict.json)")
  args = parser.parse_args(argv)

  import torch

  from jaxcnn.train import evaluate
  cores = _common.usable_cores()
  torch_threads = _common.set_torch_threads(torch, cores)
  spec = models.spec(args.model)
  model = models.get(args.model)
  rng = np.random.default_rng(args.seed)
  images = rng.integers(0, 256, size=(args.examples, *spec.input_shape), dtype=np.uint8)
  labels = rng.integers(0, 10, size=(args.examples,)).astype(np.int32)
  from jaxcnn.data import from_arrays, preprocess
  preprocessing = from_arrays(images, labels, batch_size=args.batch, seed=0, shuffle=False,
                              normalize="featurewise").preprocessing
  x = np.asarray(preprocess(preprocessing, images), np.float32)
  variables = model.init(jax.random.PRNGKey(args.seed), jnp.zeros((1, *spec.input_shape)), train=False)
  variables = {k: v for k, v in variables.items()}

  batch = args.batch
  padded = -(-len(x) // batch) * batch
  x_padded = np.concatenate([x, np.zeros((padded - len(x), *x.shape[1:]), np.float32)])
  device_batches = [jax.device_put(x_padded[i:i + batch]) for i in range(0, padded, batch)]
  apply = jax.jit(lambda v, b: model.apply(v, b, train=False))

  def run_apply():
    outs = [apply(variables, b) for b in device_batches]
    jax.block_until_ready(outs)

  def run_evaluate():
    evaluate(variables, model, (images, labels), preprocessing=preprocessing, batch_size=batch)

  specs = _peers.layer_specs(model)
  torch_net, plan = _peers.build_torch(torch, specs, spec.input_shape)
  _peers.copy_to_torch(torch, plan, variables)
  torch_net.eval()
  torch_batches = [torch.from_numpy(np.ascontiguousarray(x_padded[i:i + batch].transpose(0, 3, 1, 2)))
                   for i in range(0, padded, batch)]

  def run_torch():
    with torch.no_grad():
      for b in torch_batches:
        torch_net(b)

  with torch.no_grad():
    diff = _peers.max_abs_diff(np.asarray(apply(variables, device_batches[0])), torch_net(torch_batches[0]).numpy())
  contenders = {"jaxcnn evaluate": run_evaluate, "jaxcnn apply": run_apply, "torch": run_torch}
  hook = _predict_hook()
  if hook is not None:
    contenders["jaxcnn predict"] = lambda: hook(model, variables, images, batch)
  for run in contenders.values():
    run()
    run()
  samples = _common.interleave({k: (lambda r=r: _common.timed(r)) for k, r in contenders.items()}, args.repeats)
  rates = {k: [len(x) / t for t in v] for k, v in samples.items()}
  torch_median = _common.spread(rates["torch"])["median"]
  rows, result = [], {}
  for k, r in rates.items():
    stats = _common.spread(r)
    ratio = _common.spread(_common.per_round_ratios(r, rates["torch"]))["median"]
    result[k] = {"images_per_s": stats, "vs_torch_median_per_round": ratio,
                 "vs_torch_ratio_of_medians": stats["median"] / torch_median}
    rows.append([k, f"{stats['median']:.0f}", f"{stats['min']:.0f}", f"{stats['max']:.0f}", f"{ratio:.2f}"])
  print(f"{args.model}: {args.examples} images, batch {batch}; max |logit difference| jaxcnn vs torch {diff:.2e}")
  print(_common.format_table(["contender", "images/s", "min", "max", "x torch"], rows))
  payload = {"benchmark": "predict", "machine": {**_common.machine_info(), "load_average_end": _common.load_average()},
             "settings": {**vars(args), "torch_threads": torch_threads}, "max_abs_logit_diff": diff,
             "contenders": result}
  path = _common.write_result("predict", payload, args.out)
  print(f"\nwrote {path}")
  return payload


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
