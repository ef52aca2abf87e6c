"""Programs that run once, compiled cheaply.

Initialising a model, or one of verify's small comparison programs, runs for milliseconds, and
compiling it is nearly all its cost. On CPU such programs are compiled at XLA's lowest backend (LLVM)
optimisation level without its expensive passes: the same HLO program after XLA's own passes and the
same IEEE semantics (no fast-math), with less time spent optimising machine code. A model's
initialisation compiles about 5x faster (mnist_fast_cnn: 4.0 s -> 0.8 s on a 2-core AVX2 machine) and
gives the same bits (tests/train/test_train_state.py checks every registered model in the slow run).
"""
from __future__ import annotations

from typing import Any, Callable

import jax

CHEAP_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def run_once(fn: Callable[..., Any], *args) -> Any:
  """jax.jit(fn)(*args), compiled cheaply on CPU (see above); elsewhere as jit compiles it."""
  lowered = jax.jit(fn).lower(*args)
  return lowered.compile(CHEAP_COMPILE if jax.default_backend() == "cpu" else None)(*args)
