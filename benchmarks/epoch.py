"""End-to-end `experiments.mnist` run with its default config, compile time separated.

    python -m benchmarks.epoch [--set train.epochs=1 --set model='"mnist_convnet"'] [--workdir DIR] [--out PATH]

Runs `experiments.mnist.main(get_config(), workdir)` in this fresh process and measures:
  wall_seconds       from this module's first line (before jax is imported) to the end of main: data
                     preparation, compilation, training, evaluation and figures (interpreter start-up,
                     a few tens of ms, is not included)
  compile_seconds    time jax spent tracing, lowering and compiling (jax.monitoring's
                     jaxpr_trace / jaxpr_to_mlir_module / backend_compile events), summed
  from summary.json  train_seconds, images_per_second (measured by the experiment after compilation),
                     test_accuracy, epochs
The target on this 2-core CPU: >= 99.3% test accuracy within 120 s wall. The JSON result goes to
benchmarks/results/epoch.json unless --out says otherwise.
"""
from __future__ import annotations

import time

_START = time.perf_counter()

import argparse  # noqa: E402
import ast  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import tempfile  # noqa: E402

_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def _parse_override(text: str) -> tuple[str, object]:
  """'key=value' -> (key, value); the value is a Python literal, or a plain string if it is not one."""
  if "=" not in text:
    raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
  key, raw = text.split("=", 1)
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  return key.strip(), value


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.epoch", description=__doc__.splitlines()[0])
  parser.add_argument("--set", dest="overrides", action="append", type=_parse_override, default=[],
                      help="override a config key of experiments.mnist (repeatable), e.g. --set train.epochs=1")
  parser.add_argument("--workdir", default=None, help="run directory (default: a fresh temporary one)")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/epoch.json)")
  args = parser.parse_args(argv)

  import jax
  from benchmarks import _common
  from experiments import mnist

  compile_seconds = {event: 0.0 for event in _COMPILE_EVENTS}

  def listen(event: str, duration: float, **_):
    if event in compile_seconds:
      compile_seconds[event] += duration

  jax.monitoring.register_event_duration_secs_listener(listen)
  config = mnist.get_config()
  for key, value in args.overrides:
    _common.set_config_path(config, key, value, parser)
  workdir = pathlib.Path(args.workdir) if args.workdir else pathlib.Path(tempfile.mkdtemp(prefix="bench_epoch_"))
  machine = _common.machine_info()
  mnist.main(config, workdir)
  wall = time.perf_counter() - _START

  summary_path = workdir / "summary.json"
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
  flat = {**summary.get("results", {}), **summary.get("timing", {}), **summary.get("run", {})}
  flat["batch_size"] = summary.get("config", {}).get("train", {}).get("batch_size")
  summary = flat
  keys = ("test_accuracy", "train_seconds", "images_per_second", "epochs", "model", "batch_size")
  payload = {
      "benchmark": "epoch", "machine": {**machine, "load_average_end": _common.load_average()},
      "config": config.to_dict(), "workdir": str(workdir),
      "wall_seconds": wall, "compile_seconds": sum(compile_seconds.values()),
      "compile_seconds_by_event": compile_seconds,
      "summary": {k: summary.get(k) for k in keys},
  }
  rows = [["wall (start to summary)", wall], ["compile (trace+lower+XLA)", payload["compile_seconds"]]]
  rows += [[k, f"{summary[k]:.4f}" if k == "test_accuracy" else summary[k]] for k in keys if k in summary]
  print(_common.format_table(["experiments.mnist", "value"], rows))
  path = _common.write_result("epoch", payload, args.out)
  print(f"\nwrote {path}")
  return payload


if __name__ == "__main__":
  main()
