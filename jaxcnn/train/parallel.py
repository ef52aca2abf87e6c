"""Where the computation runs: one device, a data-parallel mesh, pmap, and multi-process jobs.

`make_strategy` chooses the execution mode of a run once; a `Strategy` owns everything that differs
between the modes (where arrays live, how the loop's pure programs are compiled, how values come back
to the host), so the training loop is written once. Data parallel with jax.sharding: a 1-D Mesh over
every device (of every process) with axis "data"; the batch is split along it and the state replicated,
and XLA inserts the all-reduces (so BatchNorm statistics and metric sums are global without any axis
name). The pmap strategy splits every chunk of batches into per-device slices and relies on
`axis_name="data"` collectives instead.

Multi-process: with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or on a
multi-host TPU VM), `maybe_initialize_distributed` joins the job before any device is touched; every
process reads only the rows of every global batch that its own devices hold
(jax.make_array_from_process_local_data).
"""
from __future__ import annotations

import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcnn.errors import ConfigError, DistributedError

_LOG = logging.getLogger(__name__)

AXIS = "data"
_ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _distributed_is_initialized() -> bool:
  from jax._src import distributed  # the public API has no "is initialized" query in this version
  return distributed.global_state.client is not None


def maybe_initialize_distributed(init_timeout_s: int = 60, heartbeat_timeout_s: int = 10) -> bool:
  """Joins a multi-process job when the environment describes one; returns whether one is running.

  Must run before anything touches a device. Reads JAX_COORDINATOR_ADDRESS ("host:port"),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID; on a multi-host TPU VM (TPU_WORKER_HOSTNAMES lists several
  hosts) lets JAX discover the job itself.

  Args:
    init_timeout_s: seconds to wait for every peer to connect (default 60).
    heartbeat_timeout_s: seconds without a heartbeat after which a peer counts as dead (default 10;
      JAX's own default is 100, which makes a survivor hang that long).

  Raises:
    ConfigError: the JAX_* variables are only partly set or not integers.
    DistributedError: the coordinator or a peer could not be reached in time.
  """
  if _distributed_is_initialized():
    return True
  present = [k for k in _ENV if os.environ.get(k)]
  tpu_hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if not present and len(tpu_hosts) <= 1:
    return False
  kwargs = dict(initialization_timeout=int(init_timeout_s), heartbeat_timeout_seconds=int(heartbeat_timeout_s))
  if present:
    if len(present) != len(_ENV):
      missing = [k for k in _ENV if k not in present]
      raise ConfigError(f"multi-process: {', '.join(present)} set but {', '.join(missing)} missing")
    try:
      num, pid = int(os.environ["JAX_NUM_PROCESSES"]), int(os.environ["JAX_PROCESS_ID"])
    except ValueError:
      raise ConfigError("multi-process: JAX_NUM_PROCESSES and JAX_PROCESS_ID must be integers, got "
                        f"{os.environ['JAX_NUM_PROCESSES']!r} and {os.environ['JAX_PROCESS_ID']!r}") from None
    if not (num >= 1 and 0 <= pid < num):
      raise ConfigError(f"multi-process: JAX_PROCESS_ID={pid} is not in [0, JAX_NUM_PROCESSES={num})")
    kwargs.update(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"], num_processes=num, process_id=pid)
  try:
    jax.distributed.initialize(**kwargs)
  except Exception as err:  # the runtime raises several types; all mean the job could not form
    if "must be called before" in str(err):
      raise DistributedError("multi-process: the job must be joined before anything touches a device; call "
                             "jaxcnn.train.maybe_initialize_distributed() first thing (before building "
                             "data pipelines)") from err
    raise DistributedError(f"multi-process: could not join the job at "
                           f"{os.environ.get('JAX_COORDINATOR_ADDRESS', 'TPU metadata')}: {err}") from err
  _report_runtime_abort()
  _LOG.info("joined multi-process job: process %d of %d, %d devices in all",
               jax.process_index(), jax.process_count(), jax.device_count())
  return True


_ABORT_MESSAGE = (b"error: multi-process: the JAX runtime is terminating this process: it lost the coordination "
                  b"service or a peer process (the coordinator or a peer probably died; its log is above)\n")
_abort_handler = None  # kept referenced: the C runtime calls it for as long as the process lives


def _report_runtime_abort() -> None:
  """Turns the runtime's abort on a lost coordinator/peer into one line on stderr and exit code 4.

  When the coordinator process dies, JAX's coordination agent terminates the survivors with a fatal log
  and abort(), from a runtime thread that Python cannot catch (jax.distributed offers no callback that
  works here). A C-level SIGABRT handler, installed only in a multi-process job, writes one line saying
  what happened and exits with DistributedError's code instead of dumping core.
  """
  global _abort_handler
  try:
    import ctypes
    libc = ctypes.CDLL(None)
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
    libc.signal.argtypes = [ctypes.c_int, handler_type]
    libc.signal.restype = ctypes.c_void_p
  except (OSError, AttributeError) as err:  # no C library to call (not POSIX): keep the runtime's abort
    _LOG.debug("cannot report runtime aborts: %s", err)
    return

  def on_abort(signum):
    os.write(2, _ABORT_MESSAGE)
    os._exit(DistributedError.exit_code)

  _abort_handler = handler_type(on_abort)
  libc.signal(signal.SIGABRT, _abort_handler)


def make_mesh(devices=None) -> Mesh:
  """A 1-D Mesh with axis "data" over `devices` (default: every device of every process)."""
  devices = list(jax.devices() if devices is None else devices)
  if devices == list(jax.devices()):
    # Auto axes: XLA propagates the shardings (Explicit axes would make every op declare them).
    return jax.make_mesh((len(devices),), (AXIS,), devices=devices, axis_types=(jax.sharding.AxisType.Auto,))
  return Mesh(np.asarray(devices), (AXIS,))


class Strategy:
  """How a run uses its devices, chosen once (`make_strategy`): placement, compiled programs, host fetch.

  The training loop is written once against this interface; the three execution modes differ only here:
    single device ("none")  a 1-device mesh;
    mesh ("jit"/"auto")     jit over a 1-D mesh of every device of every process, the state replicated and
                            batches split along their batch axis (NamedSharding); XLA inserts the
                            all-reduces, so BatchNorm statistics and metric sums are global. Several
                            processes run the same program, each placing only its own rows;
    pmap ("pmap")           one process; the state stacked along a leading device axis, chunks split into
                            per-device slices, collectives over `axis_name`.

  Attributes:
    name: "none", "jit" or "pmap".
    num_devices: devices a batch is split over.
    axis_name: the axis the pure steps' collectives reduce over (pmap), or None (XLA partitions jit).
    resident_ok: whether a program may gather its batches from data replicated on the devices (the
      single-process mesh); elsewhere batches are read on the host, each process its own rows.
  """

  name: str
  num_devices: int
  axis_name: str | None = None
  resident_ok: bool = False

  def place_state(self, tree, *, copy: bool = False):
    """`tree` (e.g. a TrainState) on the devices as every replica holds it; `copy`: never aliased."""
    raise NotImplementedError

  def local_state(self, tree):
    """`tree` as one replica holds it (what checkpoints and callbacks see)."""
    return tree

  def from_local(self, tree):
    """The inverse of `local_state`: a tree as one replica holds it (e.g. restored) in this layout."""
    return tree

  def scalar(self, value):
    """A scalar argument of a compiled program (the same on every device and process)."""
    raise NotImplementedError

  def place_replicated(self, tree):
    """Data every device reads whole (a device-resident split)."""
    raise NotImplementedError

  def batch_rows(self, batch_size: int) -> tuple[int, int]:
    """The rows [start, stop) of every global batch this process supplies."""
    return 0, batch_size

  def place_chunk(self, chunk: dict, batch_size: int):
    """Host arrays (K, rows, ...) of K batches' rows of this process -> the chunk on the devices."""
    raise NotImplementedError

  def row_offset(self, rows: int):
    """Inside a program: the index in the global batch of the first row this device holds."""
    return 0

  def constrain(self, batch: dict) -> dict:
    """Inside a program: a batch made there, laid out as the batches fed in are."""
    return batch

  def replicate(self, tree):
    """Inside a program: `tree` computed whole on every device (no cross-device communication for it)."""
    return tree

  def compile(self, fn, *, per_replica: tuple[int, ...], donate: tuple[int, ...] = ()):
    """`fn` compiled for this mode; `per_replica`: the positional arguments held per replica (state-like);
    the others are the same for every device. Outputs are per replica."""
    raise NotImplementedError

  def fetch(self, x) -> np.ndarray:
    """A host copy of one replica of `x`."""
    return fetch(x)


class MeshStrategy(Strategy):
  """jit over a 1-D mesh: replicated state, batch-sharded batches; one or several processes."""

  def __init__(self, mesh: Mesh, name: str):
    self.mesh, self.name, self.num_devices = mesh, name, mesh.size
    self.resident_ok = jax.process_count() == 1
    self.replicated = NamedSharding(mesh, PartitionSpec())
    self.batch_sharding = NamedSharding(mesh, PartitionSpec(AXIS))
    self.chunk_sharding = NamedSharding(mesh, PartitionSpec(None, AXIS))
    self._copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree), out_shardings=self.replicated)

  def place_state(self, tree, *, copy: bool = False):
    placed = jax.tree.map(lambda x: _put_global(x, self.replicated), tree)
    # A caller's arrays already on these devices come back as the same buffers from device_put: the
    # copy keeps a donating program from deleting them.
    return self._copy(placed) if copy else placed

  def scalar(self, value):
    return _put_global(np.asarray(value), self.replicated)

  def place_replicated(self, tree):
    return jax.tree.map(lambda x: _put_global(x, self.replicated), tree)

  def batch_rows(self, batch_size: int) -> tuple[int, int]:
    index_map = self.batch_sharding.addressable_devices_indices_map((batch_size,))
    spans = sorted({(idx[0].start or 0, batch_size if idx[0].stop is None else idx[0].stop)
                    for idx in index_map.values()})
    start, stop = spans[0][0], spans[-1][1]
    if sum(b - a for a, b in spans) != stop - start:
      raise DistributedError(f"multi-process: this process's devices hold rows {spans} of a batch, not one "
                             "contiguous block; the mesh must list each process's devices together")
    return start, stop

  def place_chunk(self, chunk: dict, batch_size: int):
    def put(x):
      shape = (x.shape[0], batch_size, *x.shape[2:])
      if jax.process_count() == 1:
        return jax.device_put(x, self.chunk_sharding)
      return jax.make_array_from_process_local_data(self.chunk_sharding, x, shape)
    return jax.tree.map(put, chunk)

  def constrain(self, batch: dict) -> dict:
    return jax.lax.with_sharding_constraint(batch, self.batch_sharding)

  def replicate(self, tree):
    return jax.lax.with_sharding_constraint(tree, self.replicated)

  def compile(self, fn, *, per_replica: tuple[int, ...], donate: tuple[int, ...] = ()):
    return jax.jit(fn, donate_argnums=donate, out_shardings=self.replicated)


class PmapStrategy(Strategy):
  """pmap over this process's devices: stacked state, per-device slices of every chunk."""

  name = "pmap"
  axis_name = AXIS

  def __init__(self, devices):
    self.devices = list(devices)
    self.num_devices = len(self.devices)
    self.stacked = NamedSharding(Mesh(np.asarray(self.devices), (AXIS,)), PartitionSpec(AXIS))

  def place_state(self, tree, *, copy: bool = False):
    # Through the host: every replica gets fresh buffers (so `copy` holds by construction).
    n = self.num_devices
    return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(fetch(x), (n, *np.shape(x))), self.stacked),
                        tree)

  def local_state(self, tree):
    return jax.tree.map(lambda x: x[0], tree)

  def from_local(self, tree):
    return self.place_state(tree)

  def scalar(self, value):
    return jnp.asarray(value)

  def place_replicated(self, tree):
    raise ConfigError("parallel='pmap' feeds batches from the host; device-resident data is for 'jit'")

  def place_chunk(self, chunk: dict, batch_size: int):
    n = self.num_devices

    def put(x):
      k, rows = x.shape[0], x.shape[1]
      split = x.reshape(k, n, rows // n, *x.shape[2:]).swapaxes(0, 1)
      return jax.device_put(np.ascontiguousarray(split), self.stacked)
    return jax.tree.map(put, chunk)

  def row_offset(self, rows: int):
    return jax.lax.axis_index(AXIS) * rows

  def compile(self, fn, *, per_replica: tuple[int, ...], donate: tuple[int, ...] = ()):
    import inspect
    count = len(inspect.signature(fn).parameters)
    in_axes = tuple(0 if i in per_replica else None for i in range(count))
    return jax.pmap(fn, axis_name=AXIS, in_axes=in_axes, donate_argnums=donate)

  def fetch(self, x) -> np.ndarray:
    return np.asarray(x[0])


def _put_global(x, sharding: NamedSharding) -> jax.Array:
  """`x` (the same global value in every process) placed with `sharding`.

  One process: a device_put. Several: each process supplies only the rows its own devices hold.
  """
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return x if x.sharding == sharding else jax.device_put(x, sharding)
  host = np.asarray(x)
  index_map = sharding.addressable_devices_indices_map(host.shape)
  if not host.ndim or all(idx == tuple(slice(None) for _ in idx) or not idx for idx in index_map.values()):
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])
  starts = [idx[0].start or 0 for idx in index_map.values()]
  stops = [host.shape[0] if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
  local = host[min(starts):max(stops)]
  return jax.make_array_from_process_local_data(sharding, local, host.shape)


def device_count(parallel: str) -> int:
  """How many devices a batch is split over under config.parallel (what batch sizes must divide)."""
  if parallel == "none":
    return 1
  return jax.local_device_count() if parallel == "pmap" else jax.device_count()


def make_strategy(parallel: str, batch_size: int) -> Strategy:
  """The Strategy for config.parallel and a global batch size.

  Args:
    parallel: "auto" (= "jit" over every device), "jit", "pmap", or "none" (the first device only).
    batch_size: the global batch size; must be divisible by the number of devices used.

  Raises:
    ConfigError: batch_size not divisible by the device count, or pmap/none in a multi-process job.
  """
  if parallel == "none":
    if jax.process_count() > 1:
      raise ConfigError("config: parallel='none' cannot run in a multi-process job; use 'auto' or 'jit'")
    strategy = MeshStrategy(Mesh(np.asarray(jax.devices()[:1]), (AXIS,)), "none")
  elif parallel == "pmap":
    if jax.process_count() > 1:
      raise ConfigError("config: parallel='pmap' is single-process here; use 'auto' or 'jit' for multi-process")
    strategy = PmapStrategy(jax.local_devices())
  else:
    strategy = MeshStrategy(make_mesh(), "jit")
  if batch_size % strategy.num_devices:
    raise ConfigError(f"config: batch_size={batch_size} is not divisible by the {strategy.num_devices} devices "
                      f"(parallel={parallel!r}); use a multiple of {strategy.num_devices}")
  return strategy


def fetch(x) -> np.ndarray:
  """A host copy of `x`; for replicated arrays of a multi-process job, the local replica."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)
