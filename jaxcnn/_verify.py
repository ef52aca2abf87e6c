"""`jaxcnn.verify`: a fast op against its reference twin, forward and gradients, with max errors.

    result = jaxcnn.verify("conv2d", x, w, b, strides=2, padding="same", lowering="im2col")
    print(result)               # a table of max abs / rel errors per output and per gradient
    result.raise_if_failed()    # AssertionError carrying the table

Works for every op that exists under the same name in `jaxcnn.ops` and `jaxcnn.reference`: array
positional arguments are traced (floating ones differentiated), everything else (pool sizes, keyword
options, an `rng` key) is passed unchanged to both, and tuple outputs are compared leaf by leaf.

Transformations: `verify(..., transforms=("jvp", "vmap", ...))` also compares the two ops under each
named transformation (`TRANSFORMS`: jit, grad, vjp, jvp, jacfwd, hessian, vmap, shard_map, checkpoint,
export), all of them traced into one program per side:

    jit         out = f(args)
    grad        the gradient of L = sum(ct * out) + sum(out ** 2) / 2 (over floating output leaves;
                quadratic, so that the hessian is not trivially zero) w.r.t. the differentiated args
    vjp         the pullback of fixed random cotangents
    jvp         (out, tangent out) for fixed random tangents
    jacfwd      the full forward-mode Jacobian of every output w.r.t. every differentiated arg
    hessian     of L (forward over reverse)
    vmap        over the differentiated args stacked with a second copy (for a conv: per-example kernels),
                over the first one only, and per-example gradients (vmap of grad over the examples)
    shard_map   the first argument's batch sharded over the devices (check_vma on), the others
                replicated: outputs and gradients of L equal the reference's on the whole batch
                (`OpSpec.shard_kwargs` adds e.g. the axis name for batch statistics)
    checkpoint  the gradient of L through `jax.checkpoint`
    export      `jax.export` with a symbolic batch dimension, called back: outputs and gradients

`OPS` is the table behind the test suite's transform matrix (tests/test_transforms.py): one `OpSpec`
per public op, with a tiny example call, the conv lowerings it applies to, and what is special about
it under shard_map. Adding an op to the matrix is adding a row:

    OpSpec("depthwise_conv2d", lambda: ((_normal(0, 2, 5, 5, 3), _normal(1, 3, 3, 1, 3)), {}),
           lowerings=CONV_LOWERINGS_CHECKED)

(the op must exist under that name in both `jaxcnn.ops` and `jaxcnn.reference`; the test suite checks
that every public op has a row).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcnn._compile import run_once

__all__ = ["verify", "VerifyResult", "ErrorStat", "default_tolerance", "TRANSFORMS", "OpSpec", "OPS",
           "op_spec"]

# Default tolerances by computation dtype. The two sides sum the same products in different orders (and
# the fast side may use blocked matmuls), so they differ by rounding only:
# - float32: eps = 1.2e-7; sums of up to ~1e3 terms drift by ~sqrt(1e3) * eps ~ 4e-6 relative to the
#   sum of magnitudes, so 2e-5 is tight (a wrong index or a missed tap errs by O(1)) yet safe.
# - float64: the same argument with eps = 2.2e-16 gives ~1e-14; 1e-10 leaves room.
# - bfloat16 keeps 8 significant bits (eps = 2^-8 ~ 4e-3): the fast result is rounded to bf16 at least
#   once and gradients pass through a few bf16 roundings, so a few eps, 5e-2, is the honest bound.
# - float16 (11 bits, eps ~ 1e-3): 1e-2.
# The absolute part is scaled by max(1, max |expected|) of each leaf, because rounding errors scale with
# the magnitude of the terms summed, and entries that cancel to ~0 would otherwise fail a pure rtol.
_TOLERANCES = {
    "float64": (1e-10, 1e-10),
    "float32": (2e-5, 2e-5),
    "bfloat16": (5e-2, 5e-2),
    "float16": (1e-2, 1e-2),
}


def default_tolerance(dtype) -> tuple[float, float]:
  """(rtol, atol) for comparing results computed in floating `dtype` (see the table above for why)."""
  name = jnp.dtype(dtype).name
  if name not in _TOLERANCES:
    raise ValueError(f"no default tolerance for dtype {name}; pass rtol and atol")
  return _TOLERANCES[name]


@dataclasses.dataclass(frozen=True)
class ErrorStat:
  """The comparison of one array: the fast op's value against the reference's.

  Attributes:
    name: what was compared, e.g. "out", "out[1]", "grad x".
    shape: the array's shape.
    max_abs: max |fast - reference|.
    max_rel: max |fast - reference| / max(|reference|, atol scale), finite even where reference is 0.
    ok: every entry satisfies |fast - ref| <= atol * max(1, max |ref|) + rtol * |ref| (NaN only where the
      reference is NaN too); for integer/bool arrays, exact equality.
    note: why it failed when it is not a plain tolerance miss (shape, dtype, structure), else "".
  """
  name: str
  shape: tuple
  max_abs: float
  max_rel: float
  ok: bool
  note: str = ""


@dataclasses.dataclass(frozen=True)
class VerifyResult:
  """What `verify` found.

  Attributes:
    op: the op name.
    dtype: the computation dtype the tolerance was taken from.
    lowering: the conv lowering setting the fast op was traced under ("auto", "xla", "im2col", "rows").
    rtol, atol: the tolerance used.
    forward: one ErrorStat per output leaf.
    grads: one ErrorStat per differentiated positional argument.
    numeric_grads: None when not requested; "ok" or the failure message of the numerical gradient check.
    transformed: one ErrorStat per output leaf of each requested transformation, named
      "<transform>: <what>" (e.g. "jvp: tangent[0]"); a transformation that raised is one failed entry
      whose note is the error.
  """
  op: str
  dtype: str
  lowering: str
  rtol: float
  atol: float
  forward: tuple[ErrorStat, ...]
  grads: tuple[ErrorStat, ...]
  numeric_grads: str | None = None
  transformed: tuple[ErrorStat, ...] = ()

  @property
  def ok(self) -> bool:
    """True when every forward leaf, gradient and transformed output is within tolerance (and the
    numeric check passed)."""
    return (all(s.ok for s in self.forward) and all(s.ok for s in self.grads)
            and all(s.ok for s in self.transformed) and self.numeric_grads in (None, "ok"))

  def of(self, transform: str) -> tuple[ErrorStat, ...]:
    """The comparisons made under one transformation (named "<transform>: ..."), in order."""
    return tuple(s for s in self.transformed if s.name.split(":")[0] == transform)

  def __str__(self) -> str:
    head = (f"verify {self.op} [{self.dtype}, lowering={self.lowering}, rtol={self.rtol:g}, "
            f"atol={self.atol:g}]: {'OK' if self.ok else 'FAILED'}")
    rows = [("compared", "shape", "max abs err", "max rel err", "ok")]
    for s in (*self.forward, *self.grads, *self.transformed):
      rows.append((s.name, str(s.shape), f"{s.max_abs:.3e}", f"{s.max_rel:.3e}",
                   ("yes" if s.ok else "NO") + (f" ({s.note})" if s.note else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [head] + ["  " + "  ".join(c.ljust(wd) for c, wd in zip(r[:4], widths)) + "  " + r[4]
                      for r in rows]
    if self.numeric_grads is not None:
      lines.append(f"  numerical gradient check: {self.numeric_grads}")
    return "\n".join(lines)

  def raise_if_failed(self) -> "VerifyResult":
    """Raises AssertionError with the table unless `ok`; returns self otherwise."""
    if not self.ok:
      raise AssertionError(str(self))
    return self


def _lookup(op) -> tuple[str, Callable, Callable]:
  from jaxcnn import ops, reference  # imported here so `import jaxcnn` stays light
  if isinstance(op, str):
    name = op
  elif callable(op) and isinstance(getattr(op, "__name__", None), str):
    name = op.__name__
    if getattr(ops, name, None) is not op:
      raise ValueError(f"op {op!r} is not a jaxcnn.ops function; pass one of them or its name")
  else:
    raise ValueError(f"op must be an op name or a jaxcnn.ops function, got {op!r}")
  fast, ref = getattr(ops, name, None), getattr(reference, name, None)
  if not callable(fast) or not callable(ref):
    where = " and ".join(m for m, f in (("jaxcnn.ops", fast), ("jaxcnn.reference", ref)) if not callable(f))
    raise ValueError(f"op {name!r} is not a function in {where}")
  return name, fast, ref


def _is_array(value) -> bool:
  return isinstance(value, (jax.Array, np.ndarray))


def _is_float_array(value) -> bool:
  return _is_array(value) and jnp.issubdtype(value.dtype, jnp.floating)


def _arg_names(fn, count: int) -> list[str]:
  try:
    params = [p.name for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  except (TypeError, ValueError):
    params = []
  return [params[i] if i < len(params) else f"arg{i}" for i in range(count)]


def _compare(name: str, actual, expected, rtol: float, atol: float) -> ErrorStat:
  actual, expected = np.asarray(actual), np.asarray(expected)
  shape = tuple(expected.shape)
  if actual.shape != expected.shape:
    return ErrorStat(name, shape, float("inf"), float("inf"), False,
                     f"shape {tuple(actual.shape)} != reference {shape}")
  if actual.dtype != expected.dtype:
    return ErrorStat(name, shape, float("inf"), float("inf"), False,
                     f"dtype {actual.dtype} != reference {expected.dtype}")
  if not jnp.issubdtype(expected.dtype, jnp.inexact):
    wrong = int(np.sum(actual != expected))
    err = float(np.max(np.abs(actual.astype(np.float64) - expected.astype(np.float64)), initial=0.0))
    return ErrorStat(name, shape, err, err, wrong == 0, f"{wrong} entries differ" if wrong else "")
  a, e = actual.astype(np.float64), expected.astype(np.float64)
  both_nan = np.isnan(a) & np.isnan(e)
  diff = np.where(both_nan, 0.0, np.abs(a - e))
  diff = np.where(np.isnan(diff), np.inf, diff)  # NaN on one side only is an infinite error
  finite_e = np.where(np.isfinite(e), np.abs(e), 0.0)
  scale = max(1.0, float(np.max(finite_e, initial=0.0)))
  max_abs = float(np.max(diff, initial=0.0))
  max_rel = float(np.max(diff / np.maximum(finite_e, atol * scale), initial=0.0))
  ok = bool(np.all(diff <= atol * scale + rtol * finite_e))
  return ErrorStat(name, shape, max_abs, max_rel, ok)


def _cotangents(outputs, seed: int):
  """A fixed random normal cotangent per floating output leaf (None for integer leaves).

  Drawn with NumPy: `jax.random` would compile a sampler for every new output shape, which costs more
  than the comparison itself on CPU.
  """
  cts = []
  for i, leaf in enumerate(jax.tree_util.tree_leaves(outputs)):
    if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      rng = np.random.default_rng([seed, i])
      cts.append(jnp.asarray(rng.standard_normal(jnp.shape(leaf)), jnp.float32))
    else:
      cts.append(None)
  return cts


def _make_call(fn, args, kwargs):
  """fn as a function of the array positional args only; other args and kwargs are closed over."""
  traced = [i for i, a in enumerate(args) if _is_array(a)]

  def call(*arrays):
    full = list(args)
    for i, a in zip(traced, arrays):
      full[i] = a
    return fn(*full, **kwargs)

  return call, traced


def _run(fn, args, diff: Sequence[int], kwargs, cts):
  """jit: (outputs, grads of sum_leaves sum(out * ct) w.r.t. args[diff]), computed in one pass."""
  run, traced = _base(fn, args, diff, kwargs, cts)
  return run_once(run, tuple(args[i] for i in diff), {i: args[i] for i in traced if i not in diff})


def _base(fn, args, diff: Sequence[int], kwargs, cts):
  """run(diff_arrays, {index: other array}) -> (outputs, grads of sum_leaves sum(out * ct)), and the
  indices of the array arguments."""
  call, traced = _make_call(fn, args, kwargs)

  def loss(diff_arrays, other_arrays):
    arrays = dict(zip(diff, diff_arrays))
    arrays.update(other_arrays)
    out = call(*(arrays[i] for i in traced))
    total = jnp.zeros((), jnp.float32)
    for leaf, ct in zip(jax.tree_util.tree_leaves(out), cts):
      if ct is not None:
        total = total + jnp.sum(leaf.astype(jnp.float32) * ct)
    return total, out

  def run(diff_arrays, other_arrays):
    if not diff:
      return call(*(other_arrays[i] for i in traced)), ()
    grads, out = jax.grad(loss, has_aux=True)(diff_arrays, other_arrays)
    return out, grads

  return run, traced


def verify(op, *args, argnums: int | Sequence[int] | None = None, lowering: str | None = None,
           rtol: float | None = None, atol: float | None = None, check_grads: bool = False,
           seed: int = 0, transforms: Sequence[str] = (), **kwargs) -> VerifyResult:
  """Runs `jaxcnn.ops.<op>` and `jaxcnn.reference.<op>` on the same inputs and compares them.

  Compares every output leaf, and the gradients of loss = sum_leaves sum(out * ct) (ct a fixed random
  normal cotangent per floating leaf) w.r.t. the differentiated positional arguments. Both sides run
  under `jax.jit` with full-precision float32 matmuls (`jax.default_matmul_precision("float32")`, which
  matters on GPU/TPU only); the fast one traced under `lowering` when given.

  Args:
    op: an op name ("conv2d", "max_pool2d", ...) or the `jaxcnn.ops` function itself.
    *args: positional arguments for both ops. Arrays are traced; other values (ints, tuples) are passed
      as they are.
    argnums: positional indices to differentiate; default None = every floating array argument; () for
      a forward-only check.
    lowering: a conv lowering ("xla", "im2col", "rows", "auto") to trace the fast op under, or None
      (default) for the current setting.
    rtol: relative tolerance; default from the computation dtype (`default_tolerance`).
    atol: absolute tolerance, scaled by max(1, max |reference|) per array; default from the dtype.
    check_grads: also check the fast op's gradient numerically (`jax.test_util.check_grads`, reverse
      mode, order 1) w.r.t. the same arguments, computed in float64; float32/float64 inputs only, meant
      for small inputs. Default False.
    seed: seed of the cotangents (and of the tangents of `transforms`); default 0.
    transforms: names from `TRANSFORMS` to compare the two ops under as well (see the module
      docstring); default () for none. For shard_map the first argument's leading axis is the batch;
      the op's `OPS` row, if any, says which outputs are per-device statistics.
    **kwargs: keyword arguments for both ops (e.g. strides=2, or rng=key for dropout: the same key goes
      to both).

  Returns:
    A VerifyResult; `.ok`, `str(result)` for the table, `.raise_if_failed()`.

  Raises:
    ValueError: unknown op, argnums out of range or naming a non-floating argument, no tolerance for the
      dtype, check_grads on a dtype narrower than float32, or an unknown transform name. Errors the ops
      raise propagate unchanged.
  """
  name, fast, ref = _lookup(op)
  if argnums is None:
    diff = tuple(i for i, a in enumerate(args) if _is_float_array(a))
  else:
    diff = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for i in diff:
      if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(args):
        raise ValueError(f"argnums entry {i!r} is not a positional index below {len(args)}")
      if not _is_float_array(args[i]):
        raise ValueError(f"argnums entry {i} names a non-floating-array argument ({type(args[i]).__name__})")
  names = _arg_names(fast, len(args))
  if isinstance(transforms, str):
    transforms = (transforms,)
  transforms = tuple(transforms)
  unknown = [t for t in transforms if t not in TRANSFORMS]
  if unknown:
    raise ValueError(f"unknown transforms {unknown}; known: {', '.join(TRANSFORMS)}")
  if transforms and not diff:
    raise ValueError("transforms need at least one floating array argument to differentiate")
  if check_grads:
    if not diff:
      raise ValueError("check_grads needs at least one floating array argument to differentiate")
    for i in diff:
      if jnp.dtype(args[i].dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"check_grads needs float32 or float64 inputs; {names[i]} is {args[i].dtype}")

  floating = [a for a in args if _is_float_array(a)]
  from jaxcnn.ops import conv_lowering, get_conv_lowering
  switch = contextlib.nullcontext() if lowering is None else conv_lowering(lowering)

  # Full float32 matmuls and convolutions: GPUs (TF32) and TPUs (bfloat16 passes) otherwise round float32
  # operands to ~10 or 8 bits by default, and the float32 tolerance checks the op, not that setting.
  with switch, jax.default_matmul_precision("float32"):
    # The reference output decides the cotangent shapes; a fast op with other shapes fails the compare.
    call_ref, _ = _make_call(ref, args, kwargs)
    cts = _cotangents(jax.eval_shape(call_ref, *(a for a in args if _is_array(a))), seed)
    if transforms:  # the plain comparison is computed in the transforms' program
      (fast_out, fast_grads), (ref_out, ref_grads), transformed_pairs = _transform_outputs(
          name, fast, ref, args, diff, names, kwargs, transforms, seed, cts)
    else:
      fast_out, fast_grads = _run(fast, args, diff, kwargs, cts)
      ref_out, ref_grads = _run(ref, args, diff, kwargs, cts)
      transformed_pairs = []
    numeric = _check_numeric_grads(fast, args, diff, kwargs) if check_grads else None
    traced_under = get_conv_lowering()

  # The tolerance follows the floating inputs (else the floating outputs; float32 when there are none).
  leaves = floating or [leaf for leaf in jax.tree_util.tree_leaves(ref_out)
                        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
  dtype = jnp.result_type(*leaves) if leaves else jnp.dtype(jnp.float32)
  if rtol is None or atol is None:
    d_rtol, d_atol = default_tolerance(dtype)
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol

  forward = []
  fast_leaves, fast_tree = jax.tree_util.tree_flatten(fast_out)
  ref_leaves, ref_tree = jax.tree_util.tree_flatten(ref_out)
  if fast_tree != ref_tree:
    forward.append(ErrorStat("out", (), float("inf"), float("inf"), False,
                             f"output structure {fast_tree} != reference {ref_tree}"))
  else:
    single = len(ref_leaves) == 1 and not isinstance(ref_out, (tuple, list, dict))
    for i, (a, e) in enumerate(zip(fast_leaves, ref_leaves)):
      forward.append(_compare("out" if single else f"out[{i}]", a, e, rtol, atol))
  grads = tuple(_compare(f"grad {names[i]}", g, r, rtol, atol)
                for i, g, r in zip(diff, fast_grads, ref_grads))
  transformed = tuple(
      ErrorStat(label, (), float("inf"), float("inf"), False, error) if error else
      _compare(label, a, e, rtol, atol)
      for label, a, e, error in transformed_pairs)
  return VerifyResult(op=name, dtype=jnp.dtype(dtype).name, lowering=traced_under,
                      rtol=float(rtol), atol=float(atol), forward=tuple(forward), grads=grads,
                      numeric_grads=numeric, transformed=transformed)


def _check_numeric_grads(fast, args, diff, kwargs) -> str:
  """jax.test_util.check_grads on the fast op w.r.t. args[diff]; "ok" or the failure message.

  Runs in float64 (floating array arguments upcast under `jax.enable_x64`): finite differences in
  float32 lose ~eps/step ~ 1e-7/1e-4 = 1e-3 relative to rounding, as large as the tolerance, so a float32
  check fails or passes by chance. The op's gradient formulas do not depend on the dtype.
  """
  from jax.test_util import check_grads as jax_check_grads
  with jax.enable_x64(True):
    args = [jnp.asarray(a, jnp.float64) if _is_float_array(a) else a for a in args]
    call, traced = _make_call(fast, args, kwargs)

    def f(*diff_arrays):
      values = {i: args[i] for i in traced}
      values.update(zip(diff, diff_arrays))
      out = call(*(values[i] for i in traced))
      # One scalar of every floating leaf keeps the check to one reverse pass per argument.
      cts = _cotangents(out, 1)
      return sum(jnp.sum(leaf * ct.astype(leaf.dtype))
                 for leaf, ct in zip(jax.tree_util.tree_leaves(out), cts) if ct is not None)

    try:
      # jit: the check calls f several times on same-shaped inputs, so one compile serves them all.
      jax_check_grads(jax.jit(f), tuple(args[i] for i in diff), order=1, modes=("rev",))
    except AssertionError as err:
      return "FAILED: " + " ".join(str(err).split())[:300]
  return "ok"


# ---- transformations ------------------------------------------------------------------------------------

TRANSFORMS = ("jit", "grad", "vjp", "jvp", "jacfwd", "hessian", "vmap", "shard_map", "checkpoint", "export")

# The mesh axis the shard_map check shards the batch over (an `OpSpec.shard_kwargs` value may name it).
SHARD_AXIS = "batch"


def _float_leaves(out) -> tuple:
  return tuple(leaf for leaf in jax.tree_util.tree_leaves(out)
               if jnp.issubdtype(jnp.result_type(leaf), jnp.floating))


def _leaf_names(count: int) -> list[str]:
  return ["out"] if count == 1 else [f"out[{j}]" for j in range(count)]


def _loss(leaves, cts, keep=None):
  """sum(ct * out) + sum(out ** 2) / 2 over the float leaves (those in `keep`, when given), in float32."""
  total = jnp.zeros((), jnp.float32)
  for j, (leaf, ct) in enumerate(zip(leaves, cts)):
    if keep is None or j in keep:
      leaf = leaf.astype(jnp.float32)
      total = total + jnp.sum(leaf * ct) + 0.5 * jnp.sum(leaf * leaf)
  return total


def _shard_count(batch: int) -> int:
  """The most devices (at most all local ones) that divide the batch evenly."""
  return max(k for k in range(1, len(jax.devices()) + 1) if batch % k == 0)


def _transform_values(fn, spec, args, diff, names, kwargs, transforms, tangents, cts, base_cts, fast: bool):
  """{transform: {label: array}} of `fn` under each transform, traced into one jitted program, and
  {transform: error message} for those that raised. `fast` selects the side: the fast op runs sharded
  under shard_map and exported under export; the reference computes the same quantities plainly on the
  whole batch."""
  traced = [i for i, a in enumerate(args) if _is_array(a)]
  batch_arg = traced[0]
  diff_names = [names[i] for i in diff]
  errors: dict[str, str] = {}

  def call(values, extra=None):
    full = [values.get(i, a) for i, a in enumerate(args)]
    return fn(*full, **kwargs, **(extra or {}))

  base_run, _ = _base(fn, args, diff, kwargs, base_cts)

  def program(arrays, group, with_base):
    values = dict(zip(traced, arrays))

    def f(*diff_arrays):  # the floating outputs as a function of the differentiated arguments
      return _float_leaves(call({**values, **dict(zip(diff, diff_arrays))}))

    def loss(*diff_arrays):
      return _loss(f(*diff_arrays), cts)

    primals = tuple(values[i] for i in diff)
    argnums = tuple(range(len(diff)))
    results = {}
    if with_base:  # verify's plain comparison rides along in the first program
      results["base"] = base_run(primals, {i: values[i] for i in traced if i not in diff})
    for t in group:
      try:
        if t == "jit":
          leaves = jax.tree_util.tree_leaves(call(values))
          results[t] = dict(zip(_leaf_names(len(leaves)), leaves))
        elif t in ("grad", "checkpoint"):
          g = jax.grad(jax.checkpoint(loss) if t == "checkpoint" else loss, argnums)(*primals)
          results[t] = {f"d/d{n}": v for n, v in zip(diff_names, g)}
        elif t == "vjp":
          out, pullback = jax.vjp(f, *primals)
          cotangent = tuple(jnp.asarray(ct, leaf.dtype) for leaf, ct in zip(out, cts))
          results[t] = {f"d/d{n}": v for n, v in zip(diff_names, pullback(cotangent))}
        elif t == "jvp":
          out, tangent_out = jax.jvp(f, primals, tangents)
          labels = _leaf_names(len(out))
          results[t] = {**dict(zip(labels, out)),
                        **{f"tangent {lab}": v for lab, v in zip(labels, tangent_out)}}
        elif t == "jacfwd":
          jac = jax.jacfwd(f, argnums)(*primals)
          results[t] = {f"d{lab}/d{n}": jac[j][k] for j, lab in enumerate(_leaf_names(len(jac)))
                        for k, n in enumerate(diff_names)}
        elif t == "hessian":
          hess = jax.hessian(loss, argnums)(*primals)
          results[t] = {f"d2/d{a}d{b}": hess[j][k] for j, a in enumerate(diff_names)
                        for k, b in enumerate(diff_names)}
        elif t == "vmap":
          stacked = tuple(jnp.stack([p, p + 0.1 * jnp.asarray(tg, p.dtype)])
                          for p, tg in zip(primals, tangents))
          every = jax.vmap(f)(*stacked)
          first = jax.vmap(f, in_axes=(0, *(None,) * (len(diff) - 1)))(stacked[0], *primals[1:])

          def example_grads(example):  # the gradients of one example's loss (a batch of one)
            one = {**values, batch_arg: example[None]}

            def one_loss(*diff_arrays):
              return _loss(_float_leaves(call({**one, **dict(zip(diff, diff_arrays))})), cts_one)
            return jax.grad(one_loss, argnums)(*(one[i] for i in diff))

          cts_one = _example_cotangents(f(*primals), spec)
          per_example = jax.vmap(example_grads)(values[batch_arg])
          results[t] = {**{f"all args, {lab}": v for lab, v in zip(_leaf_names(len(every)), every)},
                        **{f"first arg, {lab}": v for lab, v in zip(_leaf_names(len(first)), first)},
                        **{f"per-example d/d{n}": v for n, v in zip(diff_names, per_example)}}
        elif t == "shard_map":
          results[t] = (_sharded(call, values, traced, diff, diff_names, batch_arg, spec, cts) if fast
                        else _unsharded(call, values, diff, diff_names, spec, cts))
        elif t == "export":
          if fast:
            continue  # exported and called outside this program
          g = jax.grad(loss, argnums)(*primals)
          out = f(*primals)
          results[t] = {**dict(zip(_leaf_names(len(out)), out)),
                        **{f"d/d{n}": v for n, v in zip(diff_names, g)}}
      except Exception as err:  # noqa: BLE001 -- reported per transform, the others still run
        errors[t] = f"raised {type(err).__name__}: {' '.join(str(err).split())[:300]}"
    return results

  arrays = tuple(args[i] for i in traced)
  # The fast op's shard_map gets a program of its own: in a program that contains it, XLA partitions the
  # other transforms' computations over the devices too, and the comparison of one transform should not
  # depend on which others were requested. (The reference side computes it without shard_map.)
  separate = ("shard_map",) if fast and "shard_map" in transforms else ()
  together = tuple(t for t in transforms if t not in separate)
  values = {}
  for group, with_base in ((together, True), (separate, False)):
    if not group and not with_base:
      continue
    try:
      values.update(run_once(functools.partial(program, group=group, with_base=with_base), arrays))
    except Exception:  # noqa: BLE001 -- some errors surface only when lowering: find whose, one by one
      if with_base:
        values.update(run_once(functools.partial(program, group=(), with_base=True), arrays))
      for t in group:
        try:
          values.update(run_once(functools.partial(program, group=(t,), with_base=False), arrays))
        except Exception as err:  # noqa: BLE001
          errors[t] = f"raised {type(err).__name__}: {' '.join(str(err).split())[:300]}"
  if fast and "export" in transforms:
    try:
      values["export"] = _exported(call, args, traced, diff, diff_names, batch_arg, spec, cts)
    except Exception as err:  # noqa: BLE001
      errors["export"] = f"raised {type(err).__name__}: {' '.join(str(err).split())[:300]}"
  return values, errors


def _example_cotangents(leaves, spec):
  """Fixed random cotangents for one example's outputs (a batch of one; statistics keep their shape)."""
  cts = []
  for j, leaf in enumerate(leaves):
    shape = leaf.shape if j in spec.replicated_outputs else (1, *leaf.shape[1:])
    cts.append(jnp.asarray(np.random.default_rng([11, j]).standard_normal(shape), jnp.float32))
  return tuple(cts)


def _batched_leaves(spec, count: int) -> set:
  return {j for j in range(count) if j not in spec.replicated_outputs}


def _sharded(call, values, traced, diff, diff_names, batch_arg, spec, cts):
  """Outputs and loss gradients of the op under shard_map: batch sharded, everything else replicated."""
  from jax.sharding import PartitionSpec as P
  batch = values[batch_arg].shape[0]
  count = _shard_count(batch)
  mesh = jax.make_mesh((count,), (SHARD_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:count])
  shard_kwargs = dict(spec.shard_kwargs)

  def local(*arrays):
    here = dict(zip(traced, arrays))

    def leaves(*diff_arrays):
      return _float_leaves(call({**here, **dict(zip(diff, diff_arrays))}, shard_kwargs))

    def loss(*diff_arrays):
      out = leaves(*diff_arrays)
      return _loss(out, local_cts, _batched_leaves(spec, len(out)))

    local_cts = tuple(_local_block(ct, j) for j, ct in enumerate(cts))
    primals = tuple(here[i] for i in diff)
    return leaves(*primals), jax.grad(loss, tuple(range(len(diff))))(*primals)

  def _local_block(ct, j):
    if j in spec.replicated_outputs:
      return ct
    index = jax.lax.axis_index(SHARD_AXIS)
    size = ct.shape[0] // count
    return jax.lax.dynamic_slice_in_dim(ct, index * size, size, axis=0)

  n_out = len(cts)
  in_specs = tuple(P(SHARD_AXIS) if i == batch_arg else P() for i in traced)
  out_specs = (tuple(P() if j in spec.replicated_outputs else P(SHARD_AXIS) for j in range(n_out)),
               tuple(P(SHARD_AXIS) if i == batch_arg else P() for i in diff))
  arrays = tuple(values[i] for i in traced)
  out, grads = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(*arrays)
  return {**dict(zip(_leaf_names(n_out), out)), **{f"d/d{n}": g for n, g in zip(diff_names, grads)}}


def _unsharded(call, values, diff, diff_names, spec, cts):
  """What `_sharded` computes, on the whole batch without shard_map (the reference side)."""
  def leaves(*diff_arrays):
    return _float_leaves(call({**values, **dict(zip(diff, diff_arrays))}))

  def loss(*diff_arrays):
    out = leaves(*diff_arrays)
    return _loss(out, cts, _batched_leaves(spec, len(out)))

  primals = tuple(values[i] for i in diff)
  out = leaves(*primals)
  grads = jax.grad(loss, tuple(range(len(diff))))(*primals)
  return {**dict(zip(_leaf_names(len(out)), out)), **{f"d/d{n}": g for n, g in zip(diff_names, grads)}}


def _exported(call, args, traced, diff, diff_names, batch_arg, spec, cts):
  """Outputs and loss gradients through `jax.export` with a symbolic batch dimension, called back; the
  cotangents are inputs, batch-sized like the outputs they weigh."""
  from jax import export

  def program(arrays, cts):
    values = dict(zip(traced, arrays))

    def leaves(*diff_arrays):
      return _float_leaves(call({**values, **dict(zip(diff, diff_arrays))}))

    def loss(*diff_arrays):
      return _loss(leaves(*diff_arrays), cts)

    primals = tuple(values[i] for i in diff)
    return leaves(*primals), jax.grad(loss, tuple(range(len(diff))))(*primals)

  (batch,) = export.symbolic_shape("b")

  def symbolic(shape, dtype, batched):
    return jax.ShapeDtypeStruct((batch, *shape[1:]) if batched else shape, dtype)

  array_shapes = tuple(symbolic(args[i].shape, args[i].dtype, i == batch_arg) for i in traced)
  ct_shapes = tuple(symbolic(ct.shape, ct.dtype, j not in spec.replicated_outputs)
                    for j, ct in enumerate(cts))
  exported = export.export(jax.jit(program))(array_shapes, ct_shapes)
  out, grads = run_once(exported.call, tuple(args[i] for i in traced), tuple(cts))
  return {**dict(zip(_leaf_names(len(out)), out)), **{f"d/d{n}": g for n, g in zip(diff_names, grads)}}


def _transform_outputs(name, fast, ref, args, diff, names, kwargs, transforms, seed, base_cts):
  """((fast out, fast grads), (reference out, reference grads), [(label, fast value, reference value,
  error or "")] for every output of every transform)."""
  spec = op_spec(name)
  for t in transforms:
    if t in spec.not_applicable:
      raise ValueError(f"transform {t!r} does not apply to {name}: {spec.not_applicable[t]}")
  call_ref, _ = _make_call(ref, args, kwargs)
  shapes = _float_leaves(jax.eval_shape(call_ref, *(a for a in args if _is_array(a))))
  cts = tuple(jnp.asarray(np.random.default_rng([seed, 100 + j]).standard_normal(leaf.shape), jnp.float32)
              for j, leaf in enumerate(shapes))
  tangents = tuple(jnp.asarray(np.random.default_rng([seed, 200 + i]).standard_normal(args[i].shape),
                               args[i].dtype) for i in diff)
  run = functools.partial(_transform_values, spec=spec, args=args, diff=diff, names=names, kwargs=kwargs,
                          transforms=transforms, tangents=tangents, cts=cts, base_cts=base_cts)
  fast_values, fast_errors = run(fast, fast=True)
  key = _reference_key(ref, args, diff, kwargs, transforms, seed)
  if key is not None and key in _REFERENCE_CACHE:
    ref_values, ref_errors = _REFERENCE_CACHE[key]
  else:
    ref_values, ref_errors = run(ref, fast=False)
    if key is not None:
      _REFERENCE_CACHE[key] = (ref_values, ref_errors)
      while len(_REFERENCE_CACHE) > 16:
        _REFERENCE_CACHE.pop(next(iter(_REFERENCE_CACHE)))
  pairs = []
  for t in transforms:
    error = fast_errors.get(t) or (f"reference {ref_errors[t]}" if t in ref_errors else "")
    if error:
      pairs.append((t, None, None, error))
      continue
    for label, expected in ref_values[t].items():
      pairs.append((f"{t}: {label}", fast_values[t][label], expected, ""))
  return fast_values["base"], ref_values["base"], pairs


# The reference side of a transform comparison does not depend on the conv lowering, so checking one call
# under several lowerings computes it once. Keyed by everything the result depends on: the reference
# function, the arguments' values, the options, the transforms and the seed.
_REFERENCE_CACHE: dict = {}


def _reference_key(ref, args, diff, kwargs, transforms, seed):
  def fingerprint(value):
    if isinstance(value, jax.Array) and jnp.issubdtype(value.dtype, jax.dtypes.prng_key):
      value = jax.random.key_data(value)
    if _is_array(value):
      array = np.asarray(value)
      return ("array", array.shape, str(array.dtype), array.tobytes())
    if isinstance(value, (tuple, list)):
      return (type(value).__name__, *map(fingerprint, value))
    if isinstance(value, (int, float, str, bool, type(None))):
      return (type(value).__name__, value)
    raise TypeError("not fingerprinted")

  try:
    return (id(ref), ref, fingerprint(tuple(args)), tuple(diff),
            tuple(sorted((k, fingerprint(v)) for k, v in kwargs.items())), tuple(transforms), seed,
            jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision))
  except TypeError:
    return None


# ---- the transform matrix: one row per public op --------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OpSpec:
  """How to check one op under every transformation (a row of the transform matrix).

  Attributes:
    name: the op's name in `jaxcnn.ops` and `jaxcnn.reference`.
    example: () -> (args, kwargs), a tiny call of the op (the first argument's leading axis is a batch
      of 2); arrays drawn with NumPy so that building them compiles nothing. None for ops without a row.
    lowerings: conv lowerings to check it under, or (None,) for ops that have none.
    variants: more () -> (args, kwargs) builders (other paddings, strides, modes), for the slow run.
    shard_kwargs: keyword arguments the op gets inside shard_map, e.g. the axis name batch statistics are
      averaged over (`SHARD_AXIS`).
    replicated_outputs: indices of the floating output leaves that are the same on every shard (batch
      statistics), not batch-sharded.
    not_applicable: {transform: why the comparison does not hold for this op}.
  """
  name: str
  example: Callable[[], tuple[tuple, dict]] | None
  lowerings: tuple = (None,)
  variants: tuple = ()
  shard_kwargs: dict = dataclasses.field(default_factory=dict)
  replicated_outputs: tuple[int, ...] = ()
  not_applicable: dict = dataclasses.field(default_factory=dict)


def _normal(seed, *shape, scale=1.0, loc=0.0):
  return (loc + scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _distinct(seed, *shape):
  """Distinct values (a permutation, scaled): max pools are differentiable there, with no ties."""
  return (np.random.default_rng(seed).permutation(int(np.prod(shape))).reshape(shape) / 10.0).astype(
      np.float32)


def _conv2d_case(padding="same", strides=1, dilation=1, groups=1, channels=3):
  return lambda: ((_normal(0, 2, 5, 5, channels), _normal(1, 3, 3, channels // groups, 2 * groups, scale=0.3),
                   _normal(2, 2 * groups)),
                  dict(padding=padding, strides=strides, dilation=dilation, groups=groups))


def _conv1d_case(padding="same", strides=1, dilation=1):
  return lambda: ((_normal(0, 2, 7, 3), _normal(1, 3, 3, 2, scale=0.3), _normal(2, 2)),
                  dict(padding=padding, strides=strides, dilation=dilation))


def _conv_transpose_case(strides, padding, n=2, **kwargs):
  spatial = (4, 4)[:n] if n == 2 else (5,)
  window = (3, 3)[:n] if n == 2 else (3,)
  return lambda: ((_normal(0, 2, *spatial, 3), _normal(1, *window, 2, 3, scale=0.3), _normal(2, 2)),
                  dict(strides=strides, padding=padding, **kwargs))


def _pool_case(shape, pool, distinct=False, **kwargs):
  return lambda: (((_distinct if distinct else _normal)(3, *shape), pool), kwargs)


def _global_case(shape, distinct=False):
  return lambda: (((_distinct if distinct else _normal)(4, *shape),), {})


def _batch_norm_case(train=True, **kwargs):
  return lambda: ((_normal(5, 2, 4, 4, 3, scale=2.0, loc=1.0), _normal(6, 3, loc=1.0), _normal(7, 3),
                   _normal(8, 3, scale=0.1), 1.0 + _normal(9, 3) ** 2),
                  dict(train=train, momentum=0.9, **kwargs))


def _dropout_case():
  import jax.random as random
  return ((_normal(10, 2, 4, 4, 3), 0.4), dict(rng=random.PRNGKey(0)))


# The conv lowerings a convolution row is checked under: every explicit one and the default.
CONV_LOWERINGS_CHECKED = ("xla", "im2col", "rows", "auto")

OPS: tuple[OpSpec, ...] = (
    OpSpec("conv2d", _conv2d_case(), lowerings=CONV_LOWERINGS_CHECKED,
           variants=(_conv2d_case("valid"), _conv2d_case("same", strides=2),
                     _conv2d_case(((2, 1), (0, 1)), strides=(1, 2), dilation=(2, 1)),
                     _conv2d_case(1, groups=2, channels=4))),
    # "rows" is a 2-D lowering; conv1d takes the im2col path under it.
    OpSpec("conv1d", _conv1d_case(), lowerings=("xla", "im2col", "auto"),
           variants=(_conv1d_case("valid", strides=2), _conv1d_case(((2, 0),), dilation=2))),
    OpSpec("max_pool2d", _pool_case((2, 6, 5, 3), 2, distinct=True),
           variants=(_pool_case((2, 6, 5, 3), 3, distinct=True, strides=2, padding="same"),
                     _pool_case((2, 6, 5, 3), (2, 3), distinct=True, padding=1))),
    OpSpec("avg_pool2d", _pool_case((2, 5, 5, 3), 2, padding="same"),
           variants=(_pool_case((2, 5, 5, 3), 3, strides=1, padding=1, count_include_pad=True),)),
    OpSpec("global_avg_pool2d", _global_case((2, 4, 3, 3))),
    OpSpec("global_max_pool2d", _global_case((2, 4, 3, 3), distinct=True)),
    OpSpec("max_pool1d", _pool_case((2, 7, 3), 3, distinct=True, strides=2, padding="same"),
           variants=(_pool_case((2, 7, 3), 2, distinct=True),)),
    OpSpec("avg_pool1d", _pool_case((2, 7, 3), 3, strides=1, padding=1),
           variants=(_pool_case((2, 7, 3), 2),)),
    OpSpec("global_avg_pool1d", _global_case((2, 5, 3))),
    OpSpec("global_max_pool1d", _global_case((2, 5, 3), distinct=True)),
    OpSpec("batch_norm", _batch_norm_case(), shard_kwargs={"axis_name": SHARD_AXIS},
           replicated_outputs=(1, 2),
           variants=(_batch_norm_case(False), _batch_norm_case(True, unbiased_running_var=True))),
    OpSpec("local_response_norm", lambda: ((_normal(11, 2, 3, 3, 6), 3), dict(alpha=0.5, beta=0.75, k=1.0))),
    OpSpec("dropout", _dropout_case,
           not_applicable={"shard_map": "every shard draws its own mask from the key, so the sharded "
                                        "masks are not the whole batch's mask"}),
    OpSpec("upsample2d", lambda: ((_normal(12, 2, 3, 3, 2), 2), dict(method="bilinear")),
           variants=(lambda: ((_normal(12, 2, 3, 3, 2), (2, 3)), dict(method="nearest")),)),
    OpSpec("zero_pad2d", lambda: ((_normal(13, 2, 3, 3, 2), ((1, 0), (2, 1))), {})),
    # Compositions of conv2d / conv1d (sub-pixel phases): every lowering of the convolution under them.
    OpSpec("conv2d_transpose", _conv_transpose_case(2, "same"), lowerings=CONV_LOWERINGS_CHECKED,
           variants=(_conv_transpose_case(2, "valid", output_padding=1),
                     _conv_transpose_case(1, "same", dilation=2))),
    OpSpec("conv1d_transpose", _conv_transpose_case(2, "same", n=1), lowerings=("xla", "im2col", "auto"),
           variants=(_conv_transpose_case(3, "valid", n=1),)),
    # "rows" is dense-only; a depthwise convolution takes the im2col path under it.
    OpSpec("depthwise_conv2d", lambda: ((_normal(14, 2, 5, 5, 3), _normal(15, 3, 3, 3, 2, scale=0.3),
                                         _normal(16, 6)), dict(padding="same")),
           lowerings=("xla", "im2col", "auto"),
           variants=(lambda: ((_normal(14, 2, 6, 5, 3), _normal(15, 3, 3, 3, 2, scale=0.3)),
                              dict(strides=2, padding="valid")),)),
    OpSpec("group_norm", lambda: ((_normal(17, 2, 4, 4, 4, scale=2.0, loc=1.0), _normal(18, 4, loc=1.0),
                                   _normal(19, 4)), dict(groups=2))),
    OpSpec("layer_norm", lambda: ((_normal(20, 2, 4, 4, 3, scale=2.0, loc=1.0), _normal(21, 3, loc=1.0),
                                   _normal(22, 3)), {})),
)

_BY_NAME = {spec.name: spec for spec in OPS}


def op_spec(name: str) -> OpSpec:
  """The op's row of the transform matrix; a bare row (no example, no special cases) for other ops."""
  return _BY_NAME.get(name, OpSpec(name, None))
