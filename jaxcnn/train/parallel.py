"""Where the computation runs: one device, a data-parallel mesh, pmap, and multi-process jobs.

Data parallel with jax.sharding: a 1-D Mesh over every device (of every process) with axis "data"; the
batch is split along it and the state replicated, and XLA inserts the all-reduces (so BatchNorm
statistics and metric sums are global without any axis name). The pmap variant splits the batch into a
leading device axis and relies on `axis_name="data"` collectives instead.

Multi-process: with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set (or on a
multi-host TPU VM), `maybe_initialize_distributed` joins the job before any device is touched; every
process computes the same global host batch and contributes only the rows of its own devices
(jax.make_array_from_process_local_data).
"""
from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class Layout:
  """How arrays are placed for one parallel mode.

  Attributes:
    mode: "none" (one device), "jit" (mesh + NamedSharding), or "pmap".
    mesh: the Mesh for "jit"/"none" (one device for "none"); None for "pmap".
    num_devices: devices the batch is split over.
  """

  mode: str
  mesh: Mesh | None
  num_devices: int

  @property
  def batch_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec(AXIS))

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, PartitionSpec())

  def put_state(self, state):
    """`state` replicated on every device (pmap: stacked along a new leading device axis)."""
    if self.mode == "pmap":
      devices = jax.local_devices()
      stacked = jax.tree.map(lambda x: np.broadcast_to(fetch(x), (len(devices), *np.shape(x))), state)
      # pmap places its input one slice per device: an identity pmap replicates the whole tree at once.
      return jax.pmap(lambda tree: tree, devices=devices)(stacked)
    return jax.tree.map(lambda x: _put_global(x, self.replicated), state)

  def get_state(self, state):
    """`state` as it is on one device (pmap: the first replica)."""
    if self.mode == "pmap":
      return jax.tree.map(lambda x: x[0], state)
    return state

  def put_batch(self, batch: dict) -> dict:
    """A global host/device batch split over the devices (pmap: reshaped to (devices, B/devices, ...))."""
    if self.mode == "pmap":
      n = self.num_devices
      return jax.tree.map(lambda x: jnp.reshape(jnp.asarray(x), (n, x.shape[0] // n, *x.shape[1:])), batch)
    return jax.tree.map(lambda x: _put_global(x, self.batch_sharding), batch)


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


def make_layout(parallel: str, batch_size: int) -> Layout:
  """The Layout for config.parallel and a global batch size.

  Args:
    parallel: "auto" (= "jit" over every device), "jit", "pmap", or "none" (the first device only).
    batch_size: the global batch size; must be divisible by the number of devices used.

  Raises:
    ConfigError: batch_size not divisible by the device count, or pmap in a multi-process job.
  """
  if parallel == "none":
    if jax.process_count() > 1:
      raise ConfigError("config: parallel='none' cannot run in a multi-process job; use 'auto' or 'jit'")
    return Layout("none", Mesh(np.asarray(jax.devices()[:1]), (AXIS,)), 1)
  if parallel == "pmap":
    if jax.process_count() > 1:
      raise ConfigError("config: parallel='pmap' is single-process here; use 'auto' or 'jit' for multi-process")
    n = jax.local_device_count()
    layout = Layout("pmap", None, n)
  else:
    mesh = make_mesh()
    layout = Layout("jit", mesh, mesh.size)
  if batch_size % layout.num_devices:
    raise ConfigError(f"config: batch_size={batch_size} is not divisible by the {layout.num_devices} devices "
                      f"(parallel={parallel!r}); use a multiple of {layout.num_devices}")
  return layout


def fetch(x) -> np.ndarray:
  """A host copy of `x`; for replicated arrays of a multi-process job, the local replica."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)
