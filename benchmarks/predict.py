"""Inference throughput: what users call (TrainedModel.predict / evaluate, jaxcnn.train.evaluate) and a
plain jitted eval-mode apply, against PyTorch eval mode on the same weights, interleaved.

    python -m benchmarks.predict [--model mnist_fast_cnn] [--batch 1000] [--examples 10000] [--repeats 7]
                                   [--out PATH]
    OMP_WAIT_POLICY=PASSIVE python -m benchmarks.predict     # PyTorch's OpenMP threads sleep when idle

Every contender classifies the same `--examples` random uint8 digits with identical weights (the model's
initial variables, copied into the torch twin), in batches of --batch, the last one padded where it is
partial:

  TrainedModel.predict        `jaxcnn.train.TrainedModel(model, state, preprocessing=...)`'s `predict(images,
                              batch_size=...)`: uint8 images in, logits out as a numpy array; the host feed,
                              the featurewise standardisation on device and the fetch included
  TrainedModel.evaluate       the same object's `evaluate(images, labels, batch_size=...)`: loss and accuracy
  jaxcnn.train.evaluate       the functional `evaluate(variables, model, (images, labels), preprocessing=...,
                              batch_size=...)`
  jitted apply                `jax.jit(lambda v, b: model.apply(v, b, train=False))`, one call per batch of
                              standardised float32 device arrays (the default convolution lowering, as a
                              user's own jit traces it); outputs left on the device
  jitted apply, forward-only  the same traced inside `jaxcnn.ops.forward_only_lowering()`, as the
                              library's inference programs are (XLA's fused convolution on CPU)
  torch                       the torch.nn twin in eval mode under torch.no_grad(), NCHW, standardised float32
                              tensors, set_num_threads(usable cores)

The TrainedModel and jaxcnn.train calls do more than the others (uint8 -> float standardisation, host ->
device transfer, results back to the host): they are what a user of the library runs. The first two
calls of each contender are warm-up (compilation); then --repeats rounds go round-robin over them.
Reported: images/s (median, min, max) and the median of the per-round ratios to torch. The JSON result
goes to benchmarks/results/predict.json unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import os

import jax
import numpy as np

from benchmarks import _common, _peers
from jaxcnn import models, ops


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.predict", description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="mnist_fast_cnn")
  parser.add_argument("--batch", type=int, default=1000)
  parser.add_argument("--examples", type=int, default=10000)
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/predict.json)")
  args = parser.parse_args(argv)

  import torch

  from jaxcnn import train
  from jaxcnn.data import from_arrays, preprocess
  cores = _common.usable_cores()
  torch_threads = _common.set_torch_threads(torch, cores)
  spec = models.spec(args.model)
  model = models.get(args.model)
  rng = np.random.default_rng(args.seed)
  images = rng.integers(0, 256, size=(args.examples, *spec.input_shape), dtype=np.uint8)
  labels = rng.integers(0, 10, size=(args.examples,)).astype(np.int32)
  preprocessing = from_arrays(images, labels, batch_size=args.batch, seed=0, shuffle=False,
                              normalize="featurewise").preprocessing
  state = train.create_train_state(model, spec.input_shape, dict(seed=args.seed))
  variables = state.variables()
  trained = train.TrainedModel(model, state, preprocessing=preprocessing, config=dict(seed=args.seed))
  x = np.asarray(preprocess(preprocessing, images), np.float32)

  batch = args.batch
  padded = -(-len(x) // batch) * batch
  x_padded = np.concatenate([x, np.zeros((padded - len(x), *x.shape[1:]), np.float32)])
  device_batches = [jax.device_put(x_padded[i:i + batch]) for i in range(0, padded, batch)]
  apply = jax.jit(lambda v, b: model.apply(v, b, train=False))

  def run_apply():
    jax.block_until_ready([apply(variables, b) for b in device_batches])

  forward_only = getattr(ops, "forward_only_lowering", None)  # absent from older checkouts

  def apply_forward_only(v, b):
    with forward_only():
      return model.apply(v, b, train=False)

  apply_fo = jax.jit(apply_forward_only)

  def run_apply_forward_only():
    jax.block_until_ready([apply_fo(variables, b) for b in device_batches])

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
    reference = torch_net(torch_batches[0]).numpy()
  diffs = {"jitted apply": _peers.max_abs_diff(np.asarray(apply(variables, device_batches[0])), reference),
           "TrainedModel.predict": _peers.max_abs_diff(trained.predict(images[:batch], batch_size=batch),
                                                       reference[:min(batch, len(images))])}
  contenders = {
      "TrainedModel.predict": lambda: trained.predict(images, batch_size=batch),
      "TrainedModel.evaluate": lambda: trained.evaluate(images, labels, batch_size=batch),
      "jaxcnn.train.evaluate": lambda: train.evaluate(variables, model, (images, labels),
                                                      preprocessing=preprocessing, batch_size=batch),
      "jitted apply": run_apply,
      "jitted apply, forward-only": run_apply_forward_only,
      "torch": run_torch,
  }
  if forward_only is None:
    del contenders["jitted apply, forward-only"]
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
  load = _common.load_average()
  print(f"{args.model}: {args.examples} images, batch {batch}; max |logit difference| vs torch: "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
  print(_common.format_table(["contender", "images/s", "min", "max", "x torch"], rows))
  print(f"load average at the end: {load}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}")
  payload = {"benchmark": "predict", "machine": {**_common.machine_info(), "load_average_end": load},
             "settings": {**vars(args), "torch_threads": torch_threads,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
             "max_abs_logit_diff": diffs, "contenders": result}
  path = _common.write_result("predict", payload, args.out)
  print(f"\nwrote {path}")
  return payload


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
