"""`summary`: a Keras-style table of a Flax model's layers, output shapes and parameter counts.

Everything is computed abstractly: `model.init` runs under `jax.eval_shape`, so no array is allocated
and no FLOP is spent (VGG16 at 224x224 summarises instantly). Each layer's output shape is read from a
Flax method interceptor while the abstract init traces the model.

Counting follows Keras: a row's `Param #` counts every variable of the layer (a BatchNorm over C channels
shows 4 * C: scale and bias are trainable, the running mean and variance are not); the totals split
into trainable (the `params` collection) and non-trainable (every other collection, i.e. `batch_stats`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_TRAINABLE = "params"


@dataclasses.dataclass(frozen=True)
class SummaryRow:
  """One layer of the table.

  Attributes:
    name: the layer's path below the model, "/"-joined (e.g. "conv2d", "block1/conv1").
    type: the layer's class name (e.g. "Conv2D").
    output_shape: the shape of the layer's output with the batch axis as None, e.g.
      (None, 32, 32, 16); a tuple of such shapes for a layer that returns several arrays.
    params: all of the layer's variables (trainable + non_trainable), as Keras' `Param #`.
    trainable: elements in the layer's `params` collection.
    non_trainable: elements in the layer's other collections (`batch_stats`).
  """

  name: str
  type: str
  output_shape: Any
  params: int
  trainable: int
  non_trainable: int


@dataclasses.dataclass(frozen=True)
class ModelSummary:
  """The result of `summary`: the rows plus totals over the whole variables pytree.

  Attributes:
    model: the model's class name.
    input_shape: the input shape with the batch axis as None, e.g. (None, 32, 32, 3).
    output_shape: the model's output shape, batch axis as None.
    rows: the layers, in the order they were first called.
    total_params: every variable element of the model.
    trainable_params: elements of the `params` collection.
    non_trainable_params: elements of the other collections (`batch_stats`).
  """

  model: str
  input_shape: tuple
  output_shape: Any
  rows: tuple[SummaryRow, ...]
  total_params: int
  trainable_params: int
  non_trainable_params: int

  def table(self) -> str:
    """The Keras-style text table with the three totals below it."""
    headers = ("Layer (type)", "Output Shape", "Param #")
    body = [(f"{row.name} ({row.type})", _format_shape(row.output_shape), f"{row.params:,}")
            for row in self.rows]
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(3)]
    widths = [max(w, m) for w, m in zip(widths, (28, 22, 10))]
    total_width = sum(widths) + 4

    def render(cells):
      return f"{cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]:>{widths[2]}}".rstrip()

    lines = [f'Model: "{self.model}"', "_" * total_width, render(headers), "=" * total_width]
    for i, cells in enumerate(body):
      lines.append(render(cells))
      lines.append("_" * total_width if i < len(body) - 1 else "=" * total_width)
    if not body:
      lines.append("=" * total_width)
    lines += [f"Total params: {self.total_params:,}",
              f"Trainable params: {self.trainable_params:,}",
              f"Non-trainable params: {self.non_trainable_params:,}",
              "_" * total_width]
    return "\n".join(lines)

  def __str__(self) -> str:
    return self.table()


def _format_shape(shape) -> str:
  if isinstance(shape, tuple) and all(d is None or isinstance(d, int) for d in shape):
    return "(" + ", ".join("None" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
  if isinstance(shape, (tuple, list)):
    return "[" + ", ".join(_format_shape(s) for s in shape) + "]"
  if isinstance(shape, dict):
    return "{" + ", ".join(f"{k}: {_format_shape(v)}" for k, v in shape.items()) + "}"
  return str(shape)


def _batchless_shape(tree):
  """Output pytree -> its array shapes with the batch axis replaced by None (None for non-arrays)."""
  def one(leaf):
    shape = getattr(leaf, "shape", None)
    if shape is None:
      return None
    return (None, *shape[1:]) if len(shape) else ()
  if isinstance(tree, dict):
    return {k: _batchless_shape(v) for k, v in tree.items()}
  if isinstance(tree, (tuple, list)):
    return tuple(_batchless_shape(v) for v in tree)
  return one(tree)


def _count(tree) -> int:
  return sum(int(math.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _subtree(collection, path: Sequence[str]):
  node = collection
  for key in path:
    if not isinstance(node, dict) or key not in node:
      return {}
    node = node[key]
  return node


def _check_input_shape(input_shape) -> tuple[int, ...]:
  try:
    shape = tuple(input_shape)
  except TypeError:
    raise ValueError(f"summary: input_shape must be a sequence of ints without the batch axis, e.g. "
                     f"(28, 28, 1), got {input_shape!r}") from None
  if not shape or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in shape):
    raise ValueError(f"summary: input_shape must be a non-empty sequence of positive ints without the "
                     f"batch axis, e.g. (28, 28, 1), got {input_shape!r}")
  return shape


def summary(model: nn.Module, input_shape: Sequence[int], *, print_fn: Optional[Callable[[str], Any]] = print,
            train: bool = False, depth: int = 1, batch_size: int = 1, dtype=jnp.float32) -> ModelSummary:
  """Prints and returns a Keras-style summary of `model` on inputs of `input_shape`.

  Nothing is computed: the model is initialised under `jax.eval_shape`.

  Args:
    model: an unbound Flax module whose `__call__(x, train=...)` takes one array.
    input_shape: the shape of one example, without the batch axis, e.g. (28, 28, 1).
    print_fn: called once with the table text; default `print`; None prints nothing.
    train: the `train` flag the model is traced with (shapes rarely differ); default False.
    depth: show layers down to this nesting depth below the model (1: its direct children, as Keras
      does for a Sequential); default 1.
    batch_size: the batch size of the abstract input (shown as None); default 1.
    dtype: the input dtype; default float32.

  Returns:
    A `ModelSummary` (rows and totals); `str()` of it is the printed table.

  Raises:
    ValueError: a bad input_shape, depth or batch_size, or any error the model raises for that shape.
  """
  if not isinstance(model, nn.Module):
    raise ValueError(f"summary: model must be a flax.linen Module, got {type(model).__name__}")
  shape = _check_input_shape(input_shape)
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
    raise ValueError(f"summary: depth must be an int >= 1, got {depth!r}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"summary: batch_size must be an int >= 1, got {batch_size!r}")

  calls: dict[tuple[str, ...], dict] = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    path = tuple(module.scope.path) if module.scope is not None else ()
    # Rows are reserved on entry, so a parent precedes its children and layers keep their call order;
    # a layer called twice (shared weights) is listed once, like Keras.
    wanted = context.method_name == "__call__" and 1 <= len(path) <= depth and path not in calls
    if wanted:
      calls[path] = dict(type=type(module).__name__, output_shape=None)
    out = next_fun(*args, **kwargs)
    if wanted:
      calls[path]["output_shape"] = _batchless_shape(out)
    return out

  def trace(x):
    # Both rng streams are given so that models with Dropout also trace with train=True.
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    with nn.intercept_methods(record):
      out, variables = model.init_with_output(rngs, x, train=train)
    return variables, out

  variables, out = jax.eval_shape(trace, jax.ShapeDtypeStruct((batch_size, *shape), dtype))
  variables = dict(variables)

  rows = []
  for path, info in calls.items():
    trainable = _count(_subtree(variables.get(_TRAINABLE, {}), path))
    non_trainable = sum(_count(_subtree(tree, path)) for col, tree in variables.items() if col != _TRAINABLE)
    rows.append(SummaryRow(name="/".join(path), type=info["type"], output_shape=info["output_shape"],
                           params=trainable + non_trainable, trainable=trainable, non_trainable=non_trainable))
  trainable_total = _count(variables.get(_TRAINABLE, {}))
  non_trainable_total = sum(_count(tree) for col, tree in variables.items() if col != _TRAINABLE)
  result = ModelSummary(model=type(model).__name__, input_shape=(None, *shape),
                        output_shape=_batchless_shape(out), rows=tuple(rows),
                        total_params=trainable_total + non_trainable_total,
                        trainable_params=trainable_total, non_trainable_params=non_trainable_total)
  if print_fn is not None:
    print_fn(result.table())
  return result
