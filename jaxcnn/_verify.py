"""`jaxcnn.verify`: a fast op against its reference twin, forward and gradients, with max errors.

    result = jaxcnn.verify("conv2d", x, w, b, strides=2, padding="same", lowering="im2col")
    print(result)               # a table of max abs / rel errors per output and per gradient
    result.raise_if_failed()    # AssertionError carrying the table

Works for every op that exists under the same name in `jaxcnn.ops` and `jaxcnn.reference`: array
positional arguments are traced (floating ones differentiated), everything else (pool sizes, keyword
options, an `rng` key) is passed unchanged to both, and tuple outputs are compared leaf by leaf.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["verify", "VerifyResult", "ErrorStat", "default_tolerance"]

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
  """
  op: str
  dtype: str
  lowering: str
  rtol: float
  atol: float
  forward: tuple[ErrorStat, ...]
  grads: tuple[ErrorStat, ...]
  numeric_grads: str | None = None

  @property
  def ok(self) -> bool:
    """True when every forward leaf and gradient is within tolerance (and the numeric check passed)."""
    return (all(s.ok for s in self.forward) and all(s.ok for s in self.grads)
            and self.numeric_grads in (None, "ok"))

  def __str__(self) -> str:
    head = (f"verify {self.op} [{self.dtype}, lowering={self.lowering}, rtol={self.rtol:g}, "
            f"atol={self.atol:g}]: {'OK' if self.ok else 'FAILED'}")
    rows = [("compared", "shape", "max abs err", "max rel err", "ok")]
    for s in (*self.forward, *self.grads):
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

  @jax.jit
  def run(diff_arrays, other_arrays):
    if not diff:
      return call(*(other_arrays[i] for i in traced)), ()
    grads, out = jax.grad(loss, has_aux=True)(diff_arrays, other_arrays)
    return out, grads

  return run(tuple(args[i] for i in diff), {i: args[i] for i in traced if i not in diff})


def verify(op, *args, argnums: int | Sequence[int] | None = None, lowering: str | None = None,
           rtol: float | None = None, atol: float | None = None, check_grads: bool = False,
           seed: int = 0, **kwargs) -> VerifyResult:
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
    seed: seed of the cotangents; default 0.
    **kwargs: keyword arguments for both ops (e.g. strides=2, or rng=key for dropout: the same key goes
      to both).

  Returns:
    A VerifyResult; `.ok`, `str(result)` for the table, `.raise_if_failed()`.

  Raises:
    ValueError: unknown op, argnums out of range or naming a non-floating argument, no tolerance for the
      dtype, or check_grads on a dtype narrower than float32. Errors the ops raise propagate unchanged.
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
    fast_out, fast_grads = _run(fast, args, diff, kwargs, cts)
    ref_out, ref_grads = _run(ref, args, diff, kwargs, cts)
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
  return VerifyResult(op=name, dtype=jnp.dtype(dtype).name, lowering=traced_under,
                      rtol=float(rtol),
                      atol=float(atol), forward=tuple(forward), grads=grads, numeric_grads=numeric)


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
