"""Feeds: how a pipeline's batches reach the loop's chunked program, chosen once per run (`make_feed`).

Every feed serves the same program: one jitted lax.scan over a chunk of K steps (K = config.log_every,
the last chunk of an epoch masked to its length). What differs is where a step's batch comes from:

  ResidentFeed   the whole split replicated on the devices; each step gathers its batch inside the
                 program (`pipeline.batch_fn`). Single-process jit only.
  HostFeed       each process reads its rows of K batches on the host (`pipeline.read`), stacks them and
                 places them sharded along the batch axis, in a background thread one chunk ahead of
                 the program; the program finishes each batch on device (`pipeline.transform`:
                 scaling, augmentation, standardisation). Streaming pipelines, several processes, pmap.
  BatchesFeed    any other pipeline: its finished batches (`pipeline.batches`), K stacked per chunk.

A chunk is described by a plan entry (first step, number of steps); batches stay a pure function of
(seed, epoch, step), so which feed ran a step does not change the batch it saw.
"""
from __future__ import annotations

import inspect
from typing import Iterator, Sequence

import jax
import numpy as np

from jaxcnn.data.pipeline import prefetch
from jaxcnn.errors import ConfigError
from jaxcnn.train.parallel import Strategy

FEEDS = ("auto", "device", "host")


class ResidentFeed:
  """Batches gathered on device from the replicated split (`pipeline.batch_fn`)."""

  kind = "device"

  def __init__(self, pipeline, strategy: Strategy, chunk: int):
    self.pipeline, self.chunk = pipeline, int(chunk)
    arrays = pipeline.host_arrays() if hasattr(pipeline, "host_arrays") else pipeline.device_arrays()
    self.constants = strategy.place_replicated(arrays)
    # The batch's example indices computed whole on every device where batch_fn lets the caller lay them
    # out (see ResidentPipeline.batch_fn): no collective inside the shuffle's loop.
    takes_layout = "index_layout" in inspect.signature(pipeline.batch_fn).parameters
    self._layout = {"index_layout": strategy.replicate} if takes_layout else {}

  def chunks(self, epoch: int, plan: Sequence[tuple[int, int]]) -> Iterator[None]:
    """One (empty) input per plan entry: the program reads the constants."""
    for _ in plan:
      yield None

  def batch(self, constants, x, epoch, step, offset):
    return self.pipeline.batch_fn(constants, epoch, step, **self._layout)


class _HostChunks:
  """K batches' rows stacked on the host and placed one chunk ahead of the program."""

  constants = None

  def __init__(self, pipeline, strategy: Strategy, chunk: int):
    self.pipeline, self.strategy, self.chunk = pipeline, strategy, int(chunk)
    self.rows = strategy.batch_rows(int(pipeline.batch_size))

  def _stack(self, rows: list[dict]) -> dict:
    """(K, rows, ...) per key; the slots past the plan's steps are zeros (masked out by the program)."""
    out = {}
    for key in rows[0]:
      stacked = np.stack([np.asarray(r[key]) for r in rows])
      if len(rows) < self.chunk:
        stacked = np.concatenate([stacked, np.zeros((self.chunk - len(rows), *stacked.shape[1:]), stacked.dtype)])
      out[key] = stacked
    return out

  def chunks(self, epoch: int, plan: Sequence[tuple[int, int]]) -> Iterator:
    """The placed input of each plan entry, read and placed by a background thread one chunk ahead."""
    source = self._rows(epoch, plan)

    def make(item):
      _, n = item
      return self.strategy.place_chunk(self._stack([next(source) for _ in range(n)]), self.pipeline.batch_size)

    for _, placed in prefetch(make, list(plan), size=1):
      yield placed


class HostFeed(_HostChunks):
  """Raw rows read on the host (`pipeline.read`), finished on device (`pipeline.transform`)."""

  kind = "host"

  def _rows(self, epoch: int, plan):
    start, stop = self.rows
    for first, n in plan:
      for step in range(first, first + n):
        yield self.pipeline.read(epoch, step, start, stop)

  def batch(self, constants, x, epoch, step, offset):
    return self.pipeline.transform(x, epoch, step, offset)


class BatchesFeed(_HostChunks):
  """A pipeline's own finished batches (`pipeline.batches`), this process's rows of each."""

  kind = "batches"

  def _rows(self, epoch: int, plan):
    if not plan:
      return
    start, stop = self.rows
    for batch in self.pipeline.batches(epoch, plan[0][0]):
      rows = {}
      for key, value in batch.items():
        if isinstance(value, jax.Array) and not value.is_fully_addressable:
          raise ConfigError("train_data: a pipeline without `read`/`transform` must yield host-visible batches "
                            "in a multi-process job (every process the whole global batch)")
        rows[key] = np.asarray(value)[start:stop]
      yield rows

  def batch(self, constants, x, epoch, step, offset):
    return x


def choose_feed(pipeline, strategy: Strategy, feed: str) -> type:
  """The feed class for `pipeline` under `strategy`.

  Args:
    pipeline: an InputPipeline.
    strategy: the run's Strategy.
    feed: "auto" (on device when the pipeline is device-resident and the strategy allows it, else from
      the host), "device" (require it) or "host" (host-fed chunks even for resident pipelines).

  Raises:
    ConfigError: feed="device" where it cannot be.
  """
  resident = hasattr(pipeline, "batch_fn") and hasattr(pipeline, "device_arrays")
  if feed == "device" and not (resident and strategy.resident_ok):
    why = ("the pipeline is not device-resident" if not resident else
           f"parallel={strategy.name!r} in a {jax.process_count()}-process job reads batches on the host")
    raise ConfigError(f"config: feed='device' is not possible here: {why}; use 'auto' or 'host'")
  if resident and strategy.resident_ok and feed != "host":
    return ResidentFeed
  if hasattr(pipeline, "read") and hasattr(pipeline, "transform"):
    return HostFeed
  return BatchesFeed


def make_feed(pipeline, strategy: Strategy, feed: str, chunk: int):
  """The feed (see `choose_feed`) serving chunks of `chunk` steps."""
  return choose_feed(pipeline, strategy, feed)(pipeline, strategy, chunk)
