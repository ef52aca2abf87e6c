"""`python -m experiments.mnist` and its PyTorch twin (benchmarks/mnist_torch.py), side by side, in one run.

    python -m benchmarks.mnist_recipe [--data-dir DIR] [--epochs 3] [--rounds 1] [--seeds 0]
                                      [--torch-init torch,keras] [--train-examples N] [--out PATH]

Each contender runs as its own fresh process, cold: the jaxcnn command gets a fresh workdir and an empty
compilation cache directory (--config.compilation_cache), so it compiles everything; PyTorch compiles
nothing. Rounds interleave the contenders (jaxcnn, torch, jaxcnn, torch, ...) so machine load hits both
alike. Reported per run:
  wall_seconds       process start to exit, measured by this driver around the child process
  images_per_second  jaxcnn: the experiment's own figure (training images over fit's time minus
                     compilation); torch: training images over its training loop
  test_accuracy      on the 10,000 test images
and, per contender, the medians, with jaxcnn / torch ratios. Several `--seeds` give the seed-to-seed
spread of the accuracy (the torch runs use the same seeds), which says whether an accuracy gap between the
two is noise; `--torch-init keras` trains the twin with jaxcnn's (Keras') glorot-uniform initialisation,
`torch` with PyTorch's default. The JSON result goes to benchmarks/results/mnist_recipe.json unless --out
says otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def _child_env() -> dict[str, str]:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
  return env


def _run_timed(args: list[str]) -> float:
  """Runs `python -m <module> ...` as a fresh process; its wall time from start to exit (SystemExit with
  the end of its stderr when it fails)."""
  started = time.perf_counter()
  proc = subprocess.run(args, cwd=REPO, env=_child_env(), capture_output=True, text=True)
  wall = time.perf_counter() - started
  if proc.returncode != 0:
    raise SystemExit(f"error: {args[2]} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
  return wall


def run_jaxcnn(scratch: pathlib.Path, *, epochs: int, seed: int, data_dir, train_examples: int) -> dict:
  """One cold `python -m experiments.mnist` (fresh workdir, empty compilation cache)."""
  workdir = pathlib.Path(tempfile.mkdtemp(prefix="jaxcnn-", dir=scratch))
  cache = workdir.parent / (workdir.name + "-cache")
  args = [sys.executable, "-m", "experiments.mnist", f"--workdir={workdir / 'run'}",
          f"--config.compilation_cache={cache}", f"--config.train.epochs={epochs}", f"--config.train.seed={seed}"]
  if data_dir is not None:
    args.append(f"--config.data.data_dir={data_dir}")
  if train_examples:
    args.append(f"--config.data.train_examples={train_examples}")
  wall = _run_timed(args)
  summary = json.loads((workdir / "run" / "summary.json").read_text())
  timing = summary["timing"]
  return {"contender": "jaxcnn", "seed": seed, "wall_seconds": wall, "images_per_second": timing["images_per_second"],
          "train_seconds": timing["train_seconds"], "compile_seconds": timing["compile_seconds"],
          "test_accuracy": summary["results"]["test_accuracy"], "compilation_cache": timing.get("compilation_cache")}


def run_torch(scratch: pathlib.Path, *, epochs: int, seed: int, init: str, data_dir, train_examples: int,
              threads: int | None = None) -> dict:
  """One `python -m benchmarks.mnist_torch`."""
  out = pathlib.Path(tempfile.mkdtemp(prefix="torch-", dir=scratch)) / "result.json"
  args = [sys.executable, "-m", "benchmarks.mnist_torch", f"--epochs={epochs}", f"--seed={seed}",
          f"--init={init}", f"--out={out}"]
  if data_dir is not None:
    args.append(f"--data-dir={data_dir}")
  if train_examples:
    args.append(f"--train-examples={train_examples}")
  if threads:
    args.append(f"--threads={threads}")
  wall = _run_timed(args)
  result = json.loads(out.read_text())
  return {"contender": f"torch (init {init})", "seed": seed, "wall_seconds": wall,
          "images_per_second": result["images_per_second"], "train_seconds": result["train_seconds"],
          "compile_seconds": 0.0, "test_accuracy": result["test_accuracy"], "threads": result["threads"]}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.mnist_recipe", description=__doc__.splitlines()[0])
  parser.add_argument("--data-dir", default=None,
                      help="directory holding mnist/ IDX files (default: the experiment's shipped copy)")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--rounds", type=int, default=1, help="interleaved repetitions per seed")
  parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2")
  parser.add_argument("--torch-init", default="torch", help="comma-separated: torch, keras")
  parser.add_argument("--contenders", default="jaxcnn,torch", help="comma-separated: jaxcnn, torch")
  parser.add_argument("--train-examples", type=int, default=0, help="the first n training images (smoke runs)")
  parser.add_argument("--torch-threads", type=int, default=None, help="torch threads (default: one per core)")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/mnist_recipe.json)")
  args = parser.parse_args(argv)

  from benchmarks import _common
  seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  inits = [s.strip() for s in args.torch_init.split(",") if s.strip()]
  contenders = {s.strip() for s in args.contenders.split(",")}
  machine = _common.machine_info()
  runs = []
  with tempfile.TemporaryDirectory(prefix="bench_recipe_") as scratch:
    scratch = pathlib.Path(scratch)
    for _ in range(args.rounds):
      for seed in seeds:
        if "jaxcnn" in contenders:
          runs.append(run_jaxcnn(scratch, epochs=args.epochs, seed=seed, data_dir=args.data_dir,
                                 train_examples=args.train_examples))
          print(json.dumps(runs[-1]), flush=True)
        if "torch" in contenders:
          for init in inits:
            runs.append(run_torch(scratch, epochs=args.epochs, seed=seed, init=init, data_dir=args.data_dir,
                                  train_examples=args.train_examples, threads=args.torch_threads))
            print(json.dumps(runs[-1]), flush=True)

  names = list(dict.fromkeys(r["contender"] for r in runs))
  medians = {}
  for name in names:
    mine = [r for r in runs if r["contender"] == name]
    medians[name] = {k: statistics.median(r[k] for r in mine)
                     for k in ("wall_seconds", "images_per_second", "compile_seconds", "test_accuracy")}
    accs = [r["test_accuracy"] for r in mine]
    medians[name]["test_accuracy_min"], medians[name]["test_accuracy_max"] = min(accs), max(accs)
    medians[name]["runs"] = len(mine)
  rows = []
  base = medians.get("jaxcnn")
  for name in names:
    m = medians[name]
    ratio = (f"{base['images_per_second'] / m['images_per_second']:.2f}x / "
             f"{base['wall_seconds'] / m['wall_seconds']:.2f}x") if base and name != "jaxcnn" else ""
    rows.append([name, m["runs"], f"{m['images_per_second']:.0f}", f"{m['wall_seconds']:.1f}",
                 f"{m['compile_seconds']:.1f}",
                 f"{100 * m['test_accuracy']:.2f} ({100 * m['test_accuracy_min']:.2f}-{100 * m['test_accuracy_max']:.2f})",
                 ratio])
  print(_common.format_table(["contender", "runs", "images/s", "wall s (cold)", "compile s",
                              "test acc % median (min-max)", "jaxcnn / it: images/s, wall"], rows))
  payload = {"benchmark": "mnist_recipe", "machine": {**machine, "load_average_end": _common.load_average()},
             "epochs": args.epochs, "seeds": seeds, "rounds": args.rounds, "train_examples": args.train_examples,
             "runs": runs, "medians": medians}
  path = _common.write_result("mnist_recipe", payload, args.out)
  print(f"\nwrote {path}")
  return payload


if __name__ == "__main__":
  main()
