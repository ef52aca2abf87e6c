"""JAX primitives for ops whose derivatives are written by hand, so that every transformation composes.

`jax.custom_vjp` gives an op a hand-written backward pass but closes it to forward mode (jvp, linearize,
jacfwd) and to `shard_map`'s varying-manual-axes typing. A primitive with its own rules has neither limit:
JAX derives every transformation from a handful of rules, and reverse mode runs the hand-written
computations as the transposes.

Two kinds of primitive are offered, both defined by pure `jax.numpy`/`lax` functions:

  `bilinear(name, forward, transpose_lhs, transpose_rhs, batch)` -- an op p(x, w) linear in each
  argument separately (a convolution):
    value        forward(x, w, **params), lowered with `mlir.lower_fun` (XLA compiles the same ops as a
                 direct call would); abstract evaluation traces `forward` on the input types, so output
                 shape, dtype, sharding and varying manual axes are whatever the forward's own ops give.
    jvp          p(dx, w) + p(x, dw) (symbolic zero tangents skipped).
    transpose    transpose_lhs(ct, w, x_aval, **params) -> dx; transpose_rhs(ct, x, w_aval, **params)
                 -> dw: the hand-written backward passes. They are jnp code themselves, so they can be
                 differentiated and batched again (grad of grad, hessian, per-example gradients).
    vmap         batch(bind, args, dims, **params) -> (out, out_dim); `bind` is the primitive's binder
                 (the rule usually folds the mapped axis into an existing one and binds again).

  `linear(name, forward, transpose, batch)` -- an op q(t, *consts) linear in `t`, constant (piecewise,
  derivative zero) in `consts` (the tangent of a max pool: route t to each window's first maximum):
    jvp q(dt, *consts); transpose(ct, *consts, t_aval, **params) -> dt; vmap as above.

Varying manual axes (`shard_map` with check_vma=True): JAX's own binary primitives require operands of
equal type and `lax.dot_general` first casts invariant operands to varying (`pcast(..., to="varying")`,
whose transpose is a `psum`). The binders here do the same, so the hand-written transposes always see
operands, cotangents and results of one type, and the cotangent of a replicated kernel is summed over the
devices by the cast's transpose, as for a plain matmul.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["bilinear", "linear"]


def _match_varying(*args):
  """Casts every operand to the union of the operands' varying manual axes (no-op outside shard_map)."""
  varying = [jax.typeof(a).mat.varying for a in args]
  union = frozenset().union(*varying)
  if not union:
    return args
  return tuple(a if v == union else jax.lax.pcast(a, tuple(sorted(union - v)), to="varying")
               for a, v in zip(args, varying))


def _abstract_eval(forward, *avals, **params):
  """The output type of `forward` on these input types, found by tracing it (no computation runs)."""
  return jax.make_jaxpr(functools.partial(forward, **params))(*avals).out_avals[0]


def _define(name: str, forward: Callable, batch: Callable) -> tuple[Primitive, Callable]:
  prim = Primitive(name)
  prim.def_impl(forward)
  prim.def_abstract_eval(functools.partial(_abstract_eval, forward))
  mlir.register_lowering(prim, mlir.lower_fun(forward, multiple_results=False))

  def bind(*args, **params):
    return prim.bind(*_match_varying(*args), **params)

  def batch_rule(axis_data, args, dims, **params):
    del axis_data
    if all(d is None for d in dims):
      return prim.bind(*args, **params), None
    return batch(bind, args, dims, **params)

  batching.fancy_primitive_batchers[prim] = batch_rule
  return prim, bind


def bilinear(name: str, forward: Callable, transpose_lhs: Callable, transpose_rhs: Callable,
             batch: Callable) -> Callable:
  """Defines p(x, w), linear in x for fixed w and in w for fixed x; returns its binder `bind(x, w,
  **params)`. Params must be hashable (ints, tuples, strings, dtypes). See the module docstring."""
  prim, bind = _define(name, forward, batch)

  def lhs_rule(ct, x, w, **params):
    return transpose_lhs(ct, w, x.aval, **params)

  def rhs_rule(ct, x, w, **params):
    return transpose_rhs(ct, x, w.aval, **params)

  ad.defbilinear(prim, lhs_rule, rhs_rule)
  return bind


def linear(name: str, forward: Callable, transpose: Callable, batch: Callable) -> Callable:
  """Defines q(t, *consts), linear in t, with zero derivative in consts; returns `bind(t, *consts,
  **params)`. In a transpose, only t may be the unknown. See the module docstring."""
  prim, bind = _define(name, forward, batch)

  def jvp(dt, t, *consts, **params):
    del t
    return prim.bind(dt, *consts, **params)

  def transpose_rule(ct, t, *consts, **params):
    if any(ad.is_undefined_primal(c) for c in consts):
      raise ValueError(f"{name} is linear in its first operand only; it cannot be transposed in the others")
    if type(ct) is ad.Zero:
      return (ad.Zero(t.aval.to_ct_aval()), *(None for _ in consts))
    return (transpose(ct, *consts, t.aval, **params), *(None for _ in consts))

  ad.primitive_jvps[prim] = functools.partial(_linear_jvp, prim, jvp)
  ad.primitive_transposes[prim] = transpose_rule
  return bind


def _linear_jvp(prim, rule, primals, tangents, **params):
  out = prim.bind(*primals, **params)
  dt = tangents[0]
  if type(dt) is ad.Zero:
    return out, ad.Zero(jax.typeof(out).to_tangent_aval())
  return out, rule(dt, *primals, **params)
