"""This checkout's ops against another version's, side by side in one process: the optimized HLO of a
conv stack's training gradient, and an interleaved timing of it.

    python -m benchmarks.versions --baseline /path/to/other/checkout hlo   # op counts, program diff
                                                                           # (conv stack and models)
    python -m benchmarks.versions --baseline /path/to/other/checkout ab    # interleaved A/B timing

The baseline's `jaxcnn` package is copied to a temporary directory as `jaxcnn_baseline` (imports
rewritten), so both versions are imported by one Python. The HLO comparison is the noise-free check
that a change of formulation (e.g. a custom_vjp turned into a primitive) compiles to the same program;
the A/B timing is for changes that do not.
"""
from __future__ import annotations

import argparse
import collections
import difflib
import importlib
import os
import pathlib
import re
import shutil
import statistics
import sys
import tempfile
import time


def _import_baseline(checkout: pathlib.Path):
  source = checkout / "jaxcnn"
  if not (source / "ops").is_dir():
    raise SystemExit(f"error: {checkout} has no jaxcnn package")
  target = pathlib.Path(tempfile.mkdtemp(prefix="jaxcnn_baseline_"))
  shutil.copytree(source, target / "jaxcnn_baseline", ignore=shutil.ignore_patterns("__pycache__"))
  for path in (target / "jaxcnn_baseline").rglob("*.py"):
    text = path.read_text()
    path.write_text(re.sub(r"\bjaxcnn(?=\.|\s+import|$)", "jaxcnn_baseline", text, flags=re.M))
  sys.path.insert(0, str(target))
  return importlib.import_module("jaxcnn_baseline.ops")


def _stack(ops, lowering, shape):
  """The loss of a small CNN: conv (C=1) -> relu -> max pool -> conv -> relu -> max pool -> conv with
  stride 2 and explicit padding -> relu, traced under `lowering`."""
  import jax
  import jax.numpy as jnp

  def loss(params, x):
    w1, w2, w3 = params
    with ops.conv_lowering(lowering):
      h = ops.max_pool2d(jax.nn.relu(ops.conv2d(x, w1, padding="same")), 2)
      h = ops.max_pool2d(jax.nn.relu(ops.conv2d(h, w2, padding="same")), 2)
      h = jax.nn.relu(ops.conv2d(h, w3, strides=2, padding=((1, 0), (0, 1))))
    return jnp.sum(h ** 2)
  return loss


def _inputs(batch, size, width):
  import jax.numpy as jnp
  import numpy as np
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, 1)), jnp.float32)
  params = tuple(jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32)
                 for s in [(3, 3, 1, width), (3, 3, width, width), (3, 3, width, 2 * width)])
  return params, x


def _opcodes(text):
  counts = collections.Counter()
  for line in text.splitlines():
    match = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+ = [^ ]+(?:\{[^}]*\})? ([\w\-]+)\(", line)
    if match:
      counts[match.group(1)] += 1
  return counts


def _normalized(text):
  """The instructions with names and metadata stripped, sorted: equal for equal programs."""
  lines = []
  for line in text.splitlines():
    if " = " not in line:
      continue
    line = re.sub(r", metadata=\{[^}]*\}", "", line)
    line = re.sub(r"%[\w.\-]+", "%v", line)
    line = re.sub(r"\b[\w.\-]+\.\d+\b", "N", line)
    lines.append(line.strip())
  return sorted(lines)


def hlo(baseline, current):
  import jax
  params, x = _inputs(16, 24, 16)
  for lowering in ("rows", "im2col"):
    for argnums in ((0,), (0, 1)):
      texts = [jax.jit(jax.grad(_stack(ops, lowering, x.shape), argnums=argnums)).lower(params, x)
               .compile().as_text() for ops in (baseline, current)]
      entry = [_opcodes(t[t.index("ENTRY"):][:t[t.index("ENTRY"):].index("\n}")]) for t in texts]
      whole = [_opcodes(t) for t in texts]
      print(f"lowering={lowering}, gradient w.r.t. {'params and x' if argnums == (0, 1) else 'params'}:")
      for kind in ("dot", "fusion", "transpose", "copy", "convolution"):
        print(f"  {kind:12s} entry {entry[0][kind]:3d} / {entry[1][kind]:3d}   all computations "
              f"{whole[0][kind]:3d} / {whole[1][kind]:3d}   (baseline / current)")
      diff = [line for line in difflib.unified_diff(*map(_normalized, texts), lineterm="", n=0)
              if not line.startswith(("---", "+++", "@@"))]
      print(f"  instructions differing after normalising names and metadata: {len(diff)}")
      for line in diff[:20]:
        print("   ", line[:200])


def _model_step(models, name):
  """jit(value_and_grad) of a registered model's training loss (train=True: BatchNorm statistics and
  dropout), batch 128, and its inputs."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  spec = models.spec(name)
  model = models.get(name, num_classes=10)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(128, *spec.input_shape)), jnp.float32)
  labels = jnp.arange(128, dtype=jnp.int32) % 10
  variables = jax.eval_shape(model.init, jax.random.key(0), x)

  def loss(params, batch_stats, x):
    logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), updates

  args = (variables["params"], variables.get("batch_stats", {}), x)
  return jax.jit(jax.value_and_grad(loss, has_aux=True)), args


def hlo_models(baseline_models, current_models, names):
  """`names`: registry names, or "baseline_name:current_name" for a model renamed in between."""
  for entry in names:
    old, _, name = entry.partition(":")
    name = name or old
    if old not in baseline_models.names() or name not in current_models.names():
      print(f"{entry}: not registered in both versions; skipped")
      continue
    texts = []
    for models, registered in ((baseline_models, old), (current_models, name)):
      fn, args = _model_step(models, registered)
      texts.append(fn.lower(*args).compile().as_text())
    whole = [_opcodes(t) for t in texts]
    diff = [line for line in difflib.unified_diff(*map(_normalized, texts), lineterm="", n=0)
            if not line.startswith(("---", "+++", "@@"))]
    counts = ", ".join(f"{k} {whole[0][k]}/{whole[1][k]}" for k in ("dot", "fusion", "transpose", "copy",
                                                                    "convolution"))
    print(f"{name} training gradient (batch 128): {counts} (baseline/current); instructions differing "
          f"after normalising: {len(diff)}")
    for line in diff[:20]:
      print("   ", line[:200])


def ab(baseline, current, rounds, reps):
  import jax
  params, x = _inputs(128, 28, 32)
  fns = {}
  for lowering in ("auto", "im2col"):
    for name, ops in (("baseline", baseline), ("current", current)):
      fn = jax.jit(jax.value_and_grad(_stack(ops, lowering, x.shape)))
      jax.block_until_ready(fn(params, x))
      fns[(lowering, name)] = fn
  print("load average before:", os.getloadavg())
  times = {key: [] for key in fns}
  for r in range(rounds):
    for key in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
      start = time.perf_counter()
      for _ in range(reps):
        out = fns[key](params, x)
      jax.block_until_ready(out)
      times[key].append((time.perf_counter() - start) / reps * 1e3)
  print("load average after:", os.getloadavg())
  for lowering in ("auto", "im2col"):
    a, b = times[(lowering, "baseline")], times[(lowering, "current")]
    ratios = [bi / ai for ai, bi in zip(a, b)]
    print(f"{lowering:7s} baseline {statistics.median(a):7.2f} ms  current {statistics.median(b):7.2f} ms  "
          f"current/baseline {statistics.median(b) / statistics.median(a):.3f} "
          f"(per-round median {statistics.median(ratios):.3f}, {rounds} rounds x {reps} steps)")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--baseline", required=True, type=pathlib.Path, help="a checkout of the other version")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--models", default="mnist_convnet,cifar10_cnn_same,mnist_bn_cnn",
                      help="registered models whose training gradients `hlo` compares too (comma-separated; "
                           "old_name:new_name for a renamed one)")
  parser.add_argument("what", choices=("hlo", "ab"))
  args = parser.parse_args(argv)
  baseline = _import_baseline(args.baseline.resolve())
  import jaxcnn.ops as current
  if args.what == "hlo":
    hlo(baseline, current)
    import jaxcnn.models
    baseline_models = importlib.import_module("jaxcnn_baseline.models")
    hlo_models(baseline_models, jaxcnn.models, [n for n in args.models.split(",") if n])
  else:
    ab(baseline, current, args.rounds, args.reps)


if __name__ == "__main__":
  main()
