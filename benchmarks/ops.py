"""Op timings: each fast op (every conv lowering) vs its reference twin vs torch.nn.functional.

    python -m benchmarks.ops [--batch 32] [--iters 10] [--repeats 5] [--cases conv_mnist2,maxpool_2x2]
                             [--out PATH]

Shapes are those of the registered small CNNs' layers (batch --batch). Convolutions are timed under every
lowering; the one the default setting ("auto") picks for the shape is marked "= auto". For each case and mode
(forward; forward+backward = the gradients of sum(y^2)/2 w.r.t. every floating input, i.e. x and
the weights), every
JAX contender runs `--iters` iterations inside ONE jitted lax.scan, the way `fit` runs training steps
(XLA CPU treats loops differently from straight-line code: XLA's own convolution is many times slower
inside one); torch runs the same number of eager calls. Each iteration's input depends on the previous
result through a scalar (x * (1 + 1e-30 * sum(result))), which keeps XLA from hoisting the op out of the
loop; torch computes the same sum so that both pay for it. Contenders are interleaved round-robin;
reported: ms per iteration (median and spread) and the ratio fast/reference. The JSON result goes to
benchmarks/results/ops.json unless --out says otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from jaxcnn import ops, reference
from jaxcnn.ops import conv_lowering
from jaxcnn.ops.conv import CONV_LOWERINGS


@dataclasses.dataclass(frozen=True)
class Case:
  """One op at one shape.

  Attributes:
    name: short id (the --cases key).
    op: the jaxcnn op name (the same in jaxcnn.ops and jaxcnn.reference).
    shapes: shapes of the floating inputs, x first (the batch is replaced by --batch).
    kwargs: keyword arguments of the op.
    torch_fn: (F, *tensors NCHW/OIHW) -> output, the torch.nn.functional equivalent, or None.
    note: what the shape is.
  """

  name: str
  op: str
  shapes: tuple
  kwargs: dict
  torch_fn: Callable | None
  note: str


def _bn_jax(fn):
  """batch_norm's train-mode output only (running statistics are not what is timed)."""
  def call(x, scale, bias, **kwargs):
    c = x.shape[-1]
    y, _, _ = fn(x, scale, bias, jnp.zeros((c,), x.dtype), jnp.ones((c,), x.dtype), train=True, **kwargs)
    return y
  return call


CASES = (
    Case("conv_mnist1", "conv2d", ((1, 28, 28, 1), (3, 3, 1, 32), (32,)), {},
         lambda F, x, w, b: F.conv2d(x, w, b), "mnist_convnet conv 1: 28x28x1 -> 26x26x32, 3x3 valid"),
    Case("conv_mnist2", "conv2d", ((1, 13, 13, 32), (3, 3, 32, 64), (64,)), {},
         lambda F, x, w, b: F.conv2d(x, w, b), "mnist_convnet conv 2: 13x13x32 -> 11x11x64, 3x3 valid"),
    Case("conv_cifar_same", "conv2d", ((1, 32, 32, 32), (3, 3, 32, 32), (32,)), {"padding": "same"},
         lambda F, x, w, b: F.conv2d(x, w, b, padding=1), "cifar10_cnn_same conv 2: 32x32x32 -> 32, 3x3 same"),
    Case("conv_cifar_rgb", "conv2d", ((1, 32, 32, 3), (3, 3, 3, 32), (32,)), {"padding": "same"},
         lambda F, x, w, b: F.conv2d(x, w, b, padding=1), "cifar10_cnn_same conv 1: 32x32x3 -> 32, 3x3 same"),
    Case("conv_stride2", "conv2d", ((1, 16, 16, 64), (3, 3, 64, 128), (128,)), {"strides": 2, "padding": 1},
         lambda F, x, w, b: F.conv2d(x, w, b, stride=2, padding=1), "ResNet-style downsampling: 16x16x64 -> "
         "8x8x128, 3x3 stride 2 pad 1"),
    Case("maxpool_2x2", "max_pool2d", ((1, 26, 26, 32),), {"pool_size": 2},
         lambda F, x: F.max_pool2d(x, 2), "mnist_convnet pool 1: 26x26x32, 2x2"),
    Case("maxpool_3x3s2", "max_pool2d", ((1, 32, 32, 64),), {"pool_size": 3, "strides": 2},
         lambda F, x: F.max_pool2d(x, 3, 2), "overlapping 3x3 stride 2 on 32x32x64"),
    Case("avgpool_2x2", "avg_pool2d", ((1, 28, 28, 16),), {"pool_size": 2},
         lambda F, x: F.avg_pool2d(x, 2), "LeNet-style 2x2 average on 28x28x16"),
    Case("global_avg", "global_avg_pool2d", ((1, 8, 8, 256),), {},
         lambda F, x: F.adaptive_avg_pool2d(x, 1).flatten(1), "global average of 8x8x256"),
    Case("batch_norm", "batch_norm", ((1, 24, 24, 32), (32,), (32,)), {"momentum": 0.9, "epsilon": 1e-3},
         lambda F, x, s, b: F.batch_norm(x, None, None, s, b, training=True, eps=1e-3),
         "mnist_bn_cnn BN 1, train mode: 24x24x32"),
    # The kernels arrive in torch's ConvTranspose layout (C, O, kh, kw) by the HWIO -> OIHW transpose.
    Case("conv_transpose_ae1", "conv2d_transpose", ((1, 7, 7, 32), (3, 3, 32, 32), (32,)),
         {"strides": 2, "padding": 1, "output_padding": 1},
         lambda F, x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
         "conv_transpose_autoencoder decoder 1: 7x7x32 -> 14x14x32, 3x3 stride 2"),
    Case("conv_transpose_ae2", "conv2d_transpose", ((1, 14, 14, 32), (3, 3, 32, 32), (32,)),
         {"strides": 2, "padding": 1, "output_padding": 1},
         lambda F, x, w, b: F.conv_transpose2d(x, w, b, stride=2, padding=1, output_padding=1),
         "conv_transpose_autoencoder decoder 2: 14x14x32 -> 28x28x32, 3x3 stride 2"),
    # Depthwise kernels (kh, kw, C, 1) arrive as (1, C, kh, kw); torch's groups=C weight is (C, 1, kh, kw).
    Case("depthwise_same", "depthwise_conv2d", ((1, 32, 32, 32), (3, 3, 32, 1), (32,)), {"padding": "same"},
         lambda F, x, w, b: F.conv2d(x, w.transpose(0, 1), b, padding=1, groups=x.shape[1]),
         "mobilenet_cifar depthwise 1: 32x32x32, 3x3 same"),
    Case("depthwise_stride2", "depthwise_conv2d", ((1, 16, 16, 128), (3, 3, 128, 1), (128,)),
         {"strides": 2, "padding": 1},
         lambda F, x, w, b: F.conv2d(x, w.transpose(0, 1), b, stride=2, padding=1, groups=x.shape[1]),
         "mobilenet_cifar depthwise 4: 16x16x128 -> 8x8, 3x3 stride 2 pad 1"),
    Case("group_norm", "group_norm", ((1, 24, 24, 32), (32,), (32,)), {"groups": 8, "epsilon": 1e-3},
         lambda F, x, s, b: F.group_norm(x, 8, s, b, eps=1e-3), "8 groups over 24x24x32"),
    Case("layer_norm", "layer_norm", ((1, 256, 64), (64,), (64,)), {"epsilon": 1e-3},
         lambda F, x, s, b: F.layer_norm(x, (64,), s, b, eps=1e-3), "256 positions x 64 features"),
)


def _jax_contender(fn, args, backward: bool, iters: int):
  """A jitted function running `iters` dependent iterations of fn (or of its gradient) in one scan."""
  def once(*a):
    if not backward:
      return fn(*a)
    # The loss sum(y^2)/2 makes the cotangent y itself: the forward must run, and the backward gets a
    # real cotangent (with ones, XLA could drop the forward and fold the backward into sums).
    return jax.grad(lambda *b: 0.5 * jnp.sum(jnp.square(fn(*b))), argnums=tuple(range(len(a))))(*a)

  def run(*a):
    def body(c, _):
      result = once(a[0] * (1.0 + c), *a[1:])
      total = sum(jnp.sum(r) for r in jax.tree.leaves(result))
      return c + 1e-30 * total, None
    return jax.lax.scan(body, jnp.zeros((), a[0].dtype), None, length=iters)[0]

  jitted = jax.jit(run)

  def measure():
    return _common.timed(lambda: jax.block_until_ready(jitted(*args)))
  return measure


def _torch_contender(torch, case: Case, args, backward: bool, iters: int):
  F = torch.nn.functional
  tensors = []
  for a in args:
    a = np.asarray(a)
    if a.ndim == 4 and len(tensors) == 0:
      a = a.transpose(0, 3, 1, 2)  # NHWC -> NCHW
    elif a.ndim == 4:
      a = a.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    tensors.append(torch.from_numpy(np.ascontiguousarray(a)).requires_grad_(backward))

  def measure():
    def go():
      c = 0.0
      for _ in range(iters):
        x = tensors[0] * (1.0 + c) if c else tensors[0]
        out = case.torch_fn(F, x, *tensors[1:])
        if backward:
          grads = torch.autograd.grad(0.5 * out.square().sum(), tensors)
          total = sum(g.sum() for g in grads)
        else:
          total = out.sum()
        c = 1e-30 * float(total.detach())
    return _common.timed(go)
  return measure


def bench_case(case: Case, *, batch: int, iters: int, repeats: int, torch, seed: int) -> dict:
  """Times every contender of `case` in both modes; returns the JSON-ready result."""
  rng = np.random.default_rng(seed)
  shapes = [(batch, *case.shapes[0][1:]), *case.shapes[1:]]
  # Distinct values (no ties in max pools) of unit scale; kernels scaled like a fan-in initialiser.
  args = []
  for i, shape in enumerate(shapes):
    value = rng.standard_normal(shape).astype(np.float32)
    if i == 1 and len(shape) == 4:
      value /= np.sqrt(np.prod(shape[:-1]))  # a conv kernel: unit-scale outputs
    args.append(jnp.asarray(value))
  fast, ref = getattr(ops, case.op), getattr(reference, case.op)
  if case.op == "batch_norm":
    fast, ref = _bn_jax(fast), _bn_jax(ref)
  bound = lambda f: (lambda *a: f(*a, **case.kwargs))  # noqa: E731
  result = {"op": case.op, "note": case.note, "shapes": [list(s) for s in shapes], "kwargs": case.kwargs,
            "modes": {}}
  if case.op == "conv2d":
    # The lowering the default setting ("auto") traces this shape with: the fast path users get.
    result["auto_lowering"] = ops.resolve_conv_lowering(shapes[0], shapes[1],
                                                        strides=case.kwargs.get("strides", 1))
  for mode in ("forward", "forward+backward"):
    backward = mode != "forward"
    contenders = {}
    if case.op == "conv2d":
      for lowering in CONV_LOWERINGS:
        if lowering == "auto":
          continue
        with conv_lowering(lowering):
          measure = _jax_contender(bound(fast), args, backward, iters)
          measure()  # compile under this lowering (the choice is read at trace time)
        contenders[f"fast[{lowering}]"] = measure
    else:
      contenders["fast"] = _jax_contender(bound(fast), args, backward, iters)
    contenders["reference"] = _jax_contender(bound(ref), args, backward, iters)
    if case.torch_fn is not None and torch is not None:
      contenders["torch"] = _torch_contender(torch, case, args, backward, iters)
    for measure in contenders.values():
      measure()  # compile / warm up
    samples = _common.interleave(contenders, repeats)
    per_iter = {k: [1e3 * t / iters for t in v] for k, v in samples.items()}
    stats = {k: _common.spread(v) for k, v in per_iter.items()}
    ref_ms = stats["reference"]["median"]
    result["modes"][mode] = {
        "ms_per_iter": stats, "samples_ms": per_iter,
        "fast_over_reference": {k: s["median"] / ref_ms for k, s in stats.items() if k.startswith("fast")},
    }
    if "torch" in stats:
      result["modes"][mode]["fast_over_torch"] = {k: s["median"] / stats["torch"]["median"]
                                                  for k, s in stats.items() if k.startswith("fast")}
  return result


def print_report(results: dict) -> None:
  rows = []
  for name, r in results.items():
    auto = f"fast[{r['auto_lowering']}]" if "auto_lowering" in r else None
    for mode, m in r["modes"].items():
      for k, s in m["ms_per_iter"].items():
        label = f"{k} = auto" if k == auto else k
        rows.append([f"{name} {mode}", label, s["median"], s["min"], s["max"],
                     m["fast_over_reference"].get(k), m.get("fast_over_torch", {}).get(k)])
  print(_common.format_table(["case", "contender", "ms/iter", "min", "max", "/ reference", "/ torch"], rows))


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(prog="python -m benchmarks.ops", description=__doc__.splitlines()[0])
  parser.add_argument("--cases", default="", help="comma-separated case names (default: all): "
                      + ", ".join(c.name for c in CASES))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--iters", type=int, default=10, help="iterations per measurement")
  parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no_torch", action="store_true", help="skip the torch contender")
  parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/ops.json)")
  args = parser.parse_args(argv)
  for flag in ("batch", "iters", "repeats"):
    if getattr(args, flag) < 1:
      parser.error(f"--{flag} must be >= 1")
  known = {c.name: c for c in CASES}
  names = [n for n in args.cases.split(",") if n] or list(known)
  unknown = [n for n in names if n not in known]
  if unknown:
    parser.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(known)}")
  torch = None
  threads = None
  if not args.no_torch:
    import torch
    threads = _common.set_torch_threads(torch, _common.usable_cores())
  payload = {"benchmark": "ops", "machine": _common.machine_info(),
             "settings": {**vars(args), "torch_threads": threads}, "cases": {}}
  for name in names:
    print(f"[{name}] ...", file=sys.stderr, flush=True)
    payload["cases"][name] = bench_case(known[name], batch=args.batch, iters=args.iters, repeats=args.repeats,
                                        torch=torch, seed=args.seed)
  payload["machine"]["load_average_end"] = _common.load_average()
  print_report(payload["cases"])
  path = _common.write_result("ops", payload, args.out)
  print(f"\nwrote {path}")
  return payload


if __name__ == "__main__":
  main()
