"""Scaling figure: images/s over 1, 2 and 4 (forced) CPU devices and a 2-process job; step time over batch
sizes next to PyTorch's.

    python -m benchmarks.scaling [--devices 1,2,4] [--batches 32,64,128,256,512] [--train-examples 6000]
                                 [--steps 10] [--repeats 3] [--skip devices|batches] [--out PATH]

Part 1, the data-parallel layout's cost: `python -m experiments.mnist` (mnist_fast_cnn, batch 128, one
epoch over the first --train-examples images) in fresh processes with
XLA_FLAGS=--xla_force_host_platform_device_count=N, for each N of --devices (the default feed), then the
host-fed program on 2 devices in 1 process, and the 2-process job (2 x 1 device, JAX_COORDINATOR_ADDRESS
on localhost, the host-fed program every multi-process job runs). images/s is the experiment's own figure
(after compilation). The forced devices share the same cores, so this measures the layout's overhead
(the per-device batch shrinks, collectives are added), not a speed-up.

Part 2, `python -m benchmarks.train_step --models mnist_fast_cnn --batch B` for each B of --batches, in
fresh 1-device processes: the median step time of "jaxcnn scan" and "torch" (interleaved rounds in each
process) and their ratio.

The runs share one scratch compilation cache (the repeated programs compile once). The JSON result goes to
benchmarks/results/scaling.json unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
COLLECTIVE_FLAGS = "--xla_cpu_collective_call_terminate_timeout_seconds=300 --xla_cpu_collective_timeout_seconds=300"


def _env(devices: int, cache: pathlib.Path, **extra) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", JAXCNN_COMPILATION_CACHE=str(cache),
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {COLLECTIVE_FLAGS}", **extra)
  return env


def _mnist_args(workdir: pathlib.Path, train_examples: int, feed: str) -> list[str]:
  return [sys.executable, "-m", "experiments.mnist", f"--workdir={workdir}", "--config.train.epochs=1",
          f"--config.data.train_examples={train_examples}", "--config.data.test_examples=1000",
          f"--config.train.feed={feed}", "--config.train.heartbeat_timeout_s=60",
          "--config.train.distributed_init_timeout_s=300"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _summary(workdir: pathlib.Path, procs, outputs) -> dict:
  for proc, out in zip(procs, outputs):
    if proc.returncode != 0:
      raise SystemExit(f"error: experiments.mnist exited {proc.returncode}: {out.strip()[-800:]}")
  return json.loads((workdir / "summary.json").read_text())


def run_layout(scratch: pathlib.Path, cache: pathlib.Path, *, devices: int, processes: int, feed: str,
               train_examples: int) -> dict:
  """One experiments.mnist run on `processes` x `devices` CPU devices."""
  workdir = pathlib.Path(tempfile.mkdtemp(prefix=f"p{processes}d{devices}-", dir=scratch))
  args = _mnist_args(workdir, train_examples, feed)
  started = time.perf_counter()
  if processes == 1:
    procs = [subprocess.Popen(args, cwd=REPO, env=_env(devices, cache), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)]
  else:
    port = _free_port()
    procs = [subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=_env(devices, cache, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                                       JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(i)))
             for i in range(processes)]
  outputs = [proc.communicate()[0] for proc in procs]
  wall = time.perf_counter() - started
  summary = _summary(workdir, procs, outputs)
  device = summary["device"]
  return {"processes": device["process_count"], "devices": device["device_count"], "feed": feed,
          "images_per_second": summary["timing"]["images_per_second"],
          "train_seconds": summary["timing"]["train_seconds"], "compile_seconds": summary["timing"]["compile_seconds"],
          "wall_seconds": wall, "test_accuracy": summary["results"]["test_accuracy"]}


def run_batch(scratch: pathlib.Path, cache: pathlib.Path, *, batch: int, steps: int, repeats: int) -> dict:
  """benchmarks.train_step for mnist_fast_cnn at `batch`: step times of jaxcnn scan and torch."""
  out = scratch / f"train_step_b{batch}.json"
  args = [sys.executable, "-m", "benchmarks.train_step", "--models=mnist_fast_cnn", f"--batch={batch}",
          f"--steps={steps}", f"--repeats={repeats}", f"--out={out}"]
  proc = subprocess.run(args, cwd=REPO, env=_env(1, cache), capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"error: benchmarks.train_step exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
  contenders = json.loads(out.read_text())["models"]["mnist_fast_cnn"]["contenders"]
  row = {"batch": batch}
  for key, name in (("jaxcnn scan", "jaxcnn"), ("torch", "torch")):
    steps_per_s = contenders[key]["steps_per_s"]["median"]
    row[f"{name}_ms_per_step"] = 1000.0 / steps_per_s
    row[f"{name}_images_per_second"] = steps_per_s * batch
  row["jaxcnn_vs_torch"] = contenders["jaxcnn scan"]["vs_torch"]["median_per_round_ratio"]
  return row


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="1,2,4", help="forced CPU device counts for part 1")
  parser.add_argument("--batches", default="32,64,128,256,512", help="batch sizes for part 2")
  parser.add_argument("--train-examples", type=int, default=6000, help="part 1: training images per run")
  parser.add_argument("--steps", type=int, default=10, help="part 2: steps per measurement")
  parser.add_argument("--repeats", type=int, default=3, help="part 2: interleaved rounds")
  parser.add_argument("--skip", choices=("devices", "batches"), default=None)
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/scaling.json)")
  args = parser.parse_args(argv)

  from benchmarks import _common
  machine = _common.machine_info()
  layouts, batches = [], []
  with tempfile.TemporaryDirectory(prefix="bench_scaling_") as scratch:
    scratch = pathlib.Path(scratch)
    cache = scratch / "jax-compilation"
    if args.skip != "devices":
      plan = [(int(n), 1, "auto") for n in args.devices.split(",") if n.strip()]
      plan += [(2, 1, "host"), (1, 2, "host")]
      for devices, processes, feed in plan:
        layouts.append(run_layout(scratch, cache, devices=devices, processes=processes, feed=feed,
                                  train_examples=args.train_examples))
        print(json.dumps(layouts[-1]), flush=True)
    if args.skip != "batches":
      for batch in (int(b) for b in args.batches.split(",") if b.strip()):
        batches.append(run_batch(scratch, cache, batch=batch, steps=args.steps, repeats=args.repeats))
        print(json.dumps(batches[-1]), flush=True)

  if layouts:
    base = layouts[0]["images_per_second"]
    print(_common.format_table(
        ["processes x devices", "feed", "images/s", "vs first row", "compile s", "test acc"],
        [[f"{r['processes']} x {r['devices'] // r['processes']}", r["feed"], f"{r['images_per_second']:.0f}",
          f"{r['images_per_second'] / base:.2f}", f"{r['compile_seconds']:.1f}", f"{r['test_accuracy']:.4f}"]
         for r in layouts]))
  if batches:
    print(_common.format_table(
        ["batch", "jaxcnn ms/step", "torch ms/step", "jaxcnn images/s", "torch images/s", "jaxcnn / torch"],
        [[r["batch"], f"{r['jaxcnn_ms_per_step']:.1f}", f"{r['torch_ms_per_step']:.1f}",
          f"{r['jaxcnn_images_per_second']:.0f}", f"{r['torch_images_per_second']:.0f}", f"{r['jaxcnn_vs_torch']:.2f}"]
         for r in batches]))
  payload = {"benchmark": "scaling", "machine": {**machine, "load_average_end": _common.load_average()},
             "settings": vars(args), "layouts": layouts, "batches": batches}
  path = _common.write_result("scaling", payload, args.out)
  print(f"\nwrote {path}")
  return payload


if __name__ == "__main__":
  main()
