"""Training-step throughput: jaxcnn vs PyTorch (CPU) vs plain Flax linen, interleaved in one run.

    python -m benchmarks.train_step [--models mnist_convnet,cifar10_cnn_same,mnist_bn_cnn] [--batch 128]
                                    [--steps 20] [--repeats 7] [--out PATH]

For each model, every contender trains the same architecture from identical initial weights (copied
across and checked: the initial eval-mode logits agree) with Adam (lr 1e-3, eps 1e-8), softmax
cross-entropy and the model's dropout/BatchNorm, on the same batches of random uint8 images:

  jaxcnn scan       `fit`'s chunk program with device-resident data: one jitted lax.scan over `steps`
                    steps, batches gathered on device by the pipeline's batch_fn, state donated
  jaxcnn host-fed   the same chunk program fed from the host (streaming pipelines, several processes,
                    pmap): the steps' rows read on the host, stacked and placed by the feed's
                    background thread, then finished on device (the input cost included)
  jaxcnn host-fed pre-placed  the host-fed program on a chunk placed beforehand: the step without input
  torch             torch.nn equivalent, NCHW, eager, torch.set_num_threads(<usable cores>)
  flax              the model written with flax.linen's nn.Conv / nn.max_pool / nn.Dense, one jitted
                    call per step (what a plain Flax user writes)
  flax scan         (--flax_scan) the same inside one jitted lax.scan

One measurement = `steps` steps of one contender; rounds go round-robin over the contenders so that
load drift on a shared machine hits all of them alike. Reported: steps/s median and spread, images/s,
achieved GFLOP/s (3 x forward conv/matmul FLOPs per step) and % of --peak_gflops, and the ratio
jaxcnn/PyTorch (ratio of medians, and the median of the per-round ratios). The JSON result goes to
benchmarks/results/train_step.json unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _common, _peers
from jaxcnn import models
from jaxcnn.data import from_arrays
from jaxcnn.train import create_train_state, make_steps, make_strategy
from jaxcnn.train import loop as train_loop
from jaxcnn.train.feed import HostFeed, ResidentFeed

DEFAULT_MODELS = ("mnist_convnet", "cifar10_cnn_same", "mnist_bn_cnn")
LEARNING_RATE = 1e-3


def _make_data(input_shape, batch: int, steps: int, seed: int):
  """A device-resident pipeline over `steps` batches of random uint8 images (one epoch = steps)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(batch * steps, *input_shape), dtype=np.uint8)
  labels = rng.integers(0, 10, size=(batch * steps,)).astype(np.int32)
  return from_arrays(images, labels, batch_size=batch, seed=seed, num_classes=10)


def _jaxcnn_contenders(model, data, steps: int, seed: int, contenders: dict, checks: dict, batches):
  config = dict(optimizer="adam", learning_rate=LEARNING_RATE, seed=seed, batch_size=data.batch_size,
                log_every=steps)
  strategy = make_strategy("auto", data.batch_size)
  train_step, _ = make_steps(model)
  fresh = lambda: strategy.place_state(create_train_state(model, data.image_shape, config))  # noqa: E731
  zero = lambda: strategy.place_state(jnp.zeros((), jnp.int32))  # noqa: E731
  plan = [(0, steps)]
  n = strategy.scalar(np.int32(steps))

  # The programs `fit` compiles: one chunk of `steps` steps, batches gathered on device (resident) or
  # fed from the host (read + placed by the feed's background thread, then finished on device).
  resident = ResidentFeed(data, strategy, steps)
  host = HostFeed(data, strategy, steps)
  scan_fn = train_loop._train_program(strategy, train_step, resident, steps, data.batch_size)
  host_fn = train_loop._train_program(strategy, train_step, host, steps, data.batch_size)
  placed = next(host.chunks(0, plan))

  box = {"scan": fresh(), "host": fresh(), "placed": fresh(), "bad": zero()}
  checks["variables"] = jax.tree.map(np.asarray, box["scan"].variables())

  def replay(name):
    # Each measurement replays the same epoch: rewind the data position (not timed).
    box[name] = jax.block_until_ready(box[name].replace(epoch_step=jnp.zeros((), jnp.int32)))

  def run_scan():
    replay("scan")

    def go():
      box["scan"], box["bad"] = scan_fn(box["scan"], box["bad"], resident.constants, None, n)
      jax.block_until_ready(box["scan"])
    return _common.timed(go)

  def run_host():
    replay("host")

    def go():
      for xs in host.chunks(0, plan):
        box["host"], box["bad"] = host_fn(box["host"], box["bad"], None, xs, n)
      jax.block_until_ready(box["host"])
    return _common.timed(go)

  def run_placed():
    replay("placed")

    def go():
      box["placed"], box["bad"] = host_fn(box["placed"], box["bad"], None, placed, n)
      jax.block_until_ready(box["placed"])
    return _common.timed(go)

  contenders["jaxcnn scan"] = run_scan
  contenders["jaxcnn host-fed"] = run_host
  contenders["jaxcnn host-fed pre-placed"] = run_placed


def _flax_contenders(specs, variables, batches, steps: int, seed: int, contenders: dict, with_scan: bool):
  net = _peers.PlainFlaxNet(tuple(specs))
  tx = optax.adam(LEARNING_RATE)
  key = jax.random.key(seed)

  def step(carry, batch):
    params, stats, opt_state, count = carry

    def objective(p):
      variables = {"params": p, **({"batch_stats": stats} if stats else {})}
      logits, updates = net.apply(variables, batch["image"], train=True,
                                  rngs={"dropout": jax.random.fold_in(key, count)}, mutable=["batch_stats"])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
      return loss, updates

    grads, updates = jax.grad(objective, has_aux=True)(params)
    delta, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, delta), updates.get("batch_stats", stats), opt_state, count + 1), None

  def fresh():
    params = jax.tree.map(jnp.array, variables["params"])
    stats = jax.tree.map(jnp.array, variables.get("batch_stats", {}))
    return (params, stats, tx.init(params), jnp.zeros((), jnp.int32))

  call_fn = jax.jit(lambda carry, batch: step(carry, batch)[0], donate_argnums=(0,))
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *batches)
  scan_fn = jax.jit(lambda carry, xs: jax.lax.scan(step, carry, xs)[0], donate_argnums=(0,))
  box = {"call": fresh(), "scan": fresh()}

  def run_call():
    def go():
      carry = box["call"]
      for batch in batches:
        carry = call_fn(carry, batch)
      box["call"] = jax.block_until_ready(carry)
    return _common.timed(go)

  def run_scan():
    def go():
      box["scan"] = jax.block_until_ready(scan_fn(box["scan"], stacked))
    return _common.timed(go)

  contenders["flax"] = run_call
  if with_scan:
    contenders["flax scan"] = run_scan
  return net


def _torch_contender(torch, specs, variables, input_shape, batches, contenders: dict):
  net, plan = _peers.build_torch(torch, specs, input_shape)
  _peers.copy_to_torch(torch, plan, variables)
  opt = torch.optim.Adam(net.parameters(), lr=LEARNING_RATE, eps=1e-8)
  data = [(torch.from_numpy(np.ascontiguousarray(np.asarray(b["image"]).transpose(0, 3, 1, 2))),
           torch.from_numpy(np.asarray(b["label"]).astype(np.int64))) for b in batches]
  loss_fn = torch.nn.functional.cross_entropy

  def run():
    net.train()

    def go():
      for x, y in data:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()
    return _common.timed(go)

  contenders["torch"] = run
  return net


def _check_same_start(model, flax_net, torch_net, torch, variables, x) -> dict:
  """Eval-mode logits of the three builds on one batch; they must agree (identical weights)."""
  ours = np.asarray(model.apply(variables, x, train=False))
  flax_out = np.asarray(flax_net.apply(variables, x, train=False))
  torch_net.eval()
  with torch.no_grad():
    torch_out = torch_net(torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))).numpy()
  scale = max(1.0, float(np.max(np.abs(ours))))
  diffs = {"flax": _peers.max_abs_diff(flax_out, ours), "torch": _peers.max_abs_diff(torch_out, ours)}
  for peer, diff in diffs.items():
    if diff > 1e-3 * scale:
      raise RuntimeError(f"initial logits of {peer} differ from jaxcnn's by {diff:.3g}: the weight copy is wrong")
  return {"max_abs_logit_diff": diffs, "logit_scale": scale}


def bench_model(name: str, *, batch: int, steps: int, repeats: int, seed: int, peak_gflops: float,
                flax_scan: bool, torch) -> dict:
  """Measures every contender on registry model `name`; returns the JSON-ready result."""
  spec = models.spec(name)
  model = models.get(name)
  specs = _peers.layer_specs(model)
  data = _make_data(spec.input_shape, batch, steps, seed)
  batch_fn = jax.jit(data.batch_fn)
  arrays = data.device_arrays()
  batches = [jax.device_get(batch_fn(arrays, jnp.int32(0), jnp.int32(i))) for i in range(steps)]
  batches = [jax.tree.map(jnp.asarray, b) for b in batches]

  contenders: dict = {}
  checks: dict = {}
  _jaxcnn_contenders(model, data, steps, seed, contenders, checks, batches)
  variables = checks.pop("variables")
  flax_net = _flax_contenders(specs, variables, batches, steps, seed, contenders, flax_scan)
  torch_net = _torch_contender(torch, specs, variables, spec.input_shape, batches, contenders)
  same_start = _check_same_start(model, flax_net, torch_net, torch, variables, batches[0]["image"])

  flops = _peers.training_flops(_peers.forward_flops(model, variables, batches[0]["image"]))
  print(f"[{name}] warming up (compiles)...", file=sys.stderr, flush=True)
  compile_seconds = {k: round(run() + run(), 2) for k, run in contenders.items()}
  print(f"[{name}] measuring {repeats} interleaved rounds of {steps} steps...", file=sys.stderr, flush=True)
  samples = _common.interleave(contenders, repeats)
  rates = {k: [steps / t for t in v] for k, v in samples.items()}

  result = {"input_shape": list(spec.input_shape), "batch": batch, "steps_per_measurement": steps,
            "train_gflop_per_step": flops / 1e9, "same_start": same_start,
            "warmup_seconds_two_calls": compile_seconds, "contenders": {}}
  for k, r in rates.items():
    stats = _common.spread(r)
    result["contenders"][k] = {
        "steps_per_s": stats, "samples_steps_per_s": r,
        "images_per_s": stats["median"] * batch,
        "gflop_per_s": stats["median"] * flops / 1e9,
        "percent_of_peak": 100.0 * stats["median"] * flops / 1e9 / peak_gflops,
    }
  torch_rates = rates["torch"]
  for k in ("jaxcnn scan", "jaxcnn host-fed", "jaxcnn host-fed pre-placed", "flax"):
    per_round = _common.per_round_ratios(rates[k], torch_rates)
    result["contenders"][k]["vs_torch"] = {
        "ratio_of_medians": _common.spread(rates[k])["median"] / _common.spread(torch_rates)["median"],
        "median_per_round_ratio": _common.spread(per_round)["median"],
    }
  return result


def print_report(name: str, result: dict, peak: float) -> None:
  rows = []
  for k, c in result["contenders"].items():
    s = c["steps_per_s"]
    ratio = c.get("vs_torch", {}).get("median_per_round_ratio")
    rows.append([k, s["median"], s["min"], s["max"], c["images_per_s"], c["gflop_per_s"], c["percent_of_peak"],
                 ratio])
  print(f"\n{name}: batch {result['batch']}, {result['train_gflop_per_step']:.2f} GFLOP/step, peak {peak:g} GFLOP/s")
  print(_common.format_table(["contender", "steps/s", "min", "max", "images/s", "GFLOP/s", "% peak",
                              "x torch"], rows))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.splitlines()[0])
  parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated registry names")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20, help="steps per measurement")
  parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--peak_gflops", type=float, default=None,
                      help="the CPU's fp32 peak, for %% of peak (default: derived from /proc/cpuinfo's flags, "
                           "clock and the usable cores; see benchmarks/_common.cpu_peak)")
  parser.add_argument("--flax_scan", action="store_true", help="also time plain Flax inside one lax.scan")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_step.json)")
  args = parser.parse_args(argv)
  for flag in ("batch", "steps", "repeats"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} must be >= 1")
  names = [n for n in args.models.split(",") if n]
  unknown = [n for n in names if n not in models.names()]
  if unknown:
    parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(models.names())}")

  import torch
  cores = _common.usable_cores()
  if args.peak_gflops is None:
    peak = _common.cpu_peak(cores)
    args.peak_gflops = peak["gflops"]
    print(f"peak {peak['gflops']:.0f} GFLOP/s fp32: {peak['how']}")
  torch_threads = _common.set_torch_threads(torch, cores)
  payload = {"benchmark": "train_step", "machine": _common.machine_info(),
             "settings": {**vars(args), "torch_threads": torch_threads, "optimizer": "adam",
                          "learning_rate": LEARNING_RATE, "data": "random uint8 images, featurewise-normalised"},
             "models": {}}
  for name in names:
    payload["models"][name] = bench_model(name, batch=args.batch, steps=args.steps, repeats=args.repeats,
                                          seed=args.seed, peak_gflops=args.peak_gflops,
                                          flax_scan=args.flax_scan, torch=torch)
    print_report(name, payload["models"][name], args.peak_gflops)
  payload["machine"]["load_average_end"] = _common.load_average()
  path = _common.write_result("train_step", payload, args.out)
  print(f"\nwrote {path}")
  return payload


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  main()
