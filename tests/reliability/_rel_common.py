"""Helpers shared by the reliability tests (not collected): worker processes, their output, comparisons."""
from __future__ import annotations

import json
import os
import pathlib
import queue
import subprocess
import sys
import threading
import time

import jax
import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "_rel_worker.py"
sys.path.insert(0, str(HERE.parent / "train"))

# The runs the kill/SIGTERM tests interrupt: 4 steps per epoch (64 examples, batch 16), a checkpoint every
# 2 steps (asynchronous, as in a real run) and at epoch ends, a host sync every 2 steps.
RUN_CONFIG = dict(log_every=2, learning_rate=0.01, seed=0, async_checkpointing=True, progress="log",
                  checkpoint_every_steps=2, keep_checkpoints=3, heartbeat_timeout_s=5,
                  distributed_init_timeout_s=30)


def clean_env(**extra) -> dict:
  """This environment with the repo importable and no multi-process job described (unless in extra)."""
  env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
  for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    env.pop(key, None)
  env.update(extra)
  return env


class Worker:
  """A `_rel_worker.py` process whose output lines are collected by a thread (so polling never blocks)."""

  def __init__(self, out, workdir, config: dict, *, devices: int = 4, sleep: float = 0.0, env: dict | None = None):
    cmd = [sys.executable, str(WORKER), str(out), "--workdir", str(workdir), "--config", json.dumps(config),
           "--devices", str(devices), "--sleep", str(sleep)]
    self.proc = subprocess.Popen(cmd, env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
    self.lines: list[str] = []
    self._queue: queue.Queue = queue.Queue()
    self._thread = threading.Thread(target=self._pump, daemon=True)
    self._thread.start()

  def _pump(self):
    for line in self.proc.stdout:
      self._queue.put(line.rstrip("\n"))
    self._queue.put(None)

  def new_lines(self) -> list[str]:
    """Lines printed since the last call (never blocks)."""
    got = []
    while True:
      try:
        line = self._queue.get_nowait()
      except queue.Empty:
        break
      if line is not None:
        got.append(line)
    self.lines += got
    return got

  def wait_for(self, predicate, timeout: float) -> str | None:
    """The first new line for which predicate(line) holds, or None when the process ended or time ran out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      for line in self.new_lines():
        if predicate(line):
          return line
      if self.proc.poll() is not None and self._queue.empty():
        self.new_lines()
        return None
      time.sleep(0.005)
    return None

  def finish(self, timeout: float) -> int:
    """Waits for the process (killing it after `timeout` s); returns its exit code."""
    try:
      self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      self.proc.wait()
    self._thread.join(timeout=10)
    self.new_lines()
    return self.proc.returncode

  @property
  def output(self) -> str:
    return "\n".join(self.lines)

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()


def saved_leaves(state) -> dict[str, np.ndarray]:
  """{tree path: host array} of everything a checkpoint of `state` holds (as _rel_worker writes them)."""
  from jaxcnn.train.parallel import fetch  # the local replica of a multi-process job's replicated array
  leaves = jax.tree_util.tree_flatten_with_path(state.to_checkpoint())[0]
  return {jax.tree_util.keystr(p): fetch(x) for p, x in leaves}


def assert_bitwise(actual: dict, expected: dict) -> None:
  """Same keys, and every array equal bit for bit (dtype and shape included)."""
  assert sorted(actual) == sorted(expected)
  for key in expected:
    a, e = np.asarray(actual[key]), np.asarray(expected[key])
    assert a.dtype == e.dtype and a.shape == e.shape, key
    assert a.tobytes() == e.tobytes(), f"{key} differs"


# -- tiny MNIST for runs of the real experiment command ---------------------------------------------------

SHIPPED_MNIST = REPO / "experiments" / "data" / "mnist"
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")


def read_idx(path: pathlib.Path) -> np.ndarray:
  """A gzip'd IDX file's uint8 array."""
  import gzip
  import struct
  content = gzip.decompress(path.read_bytes())
  ndim = content[3]
  dims = struct.unpack(f">{ndim}I", content[4:4 + 4 * ndim])
  return np.frombuffer(content, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def idx_content(array: np.ndarray, magic: int | None = None) -> bytes:
  """An IDX file's bytes: big-endian magic (2051 images, 2049 labels), the dims, the uint8 data."""
  import struct
  array = np.ascontiguousarray(array, np.uint8)
  magic = magic if magic is not None else (0x0803 if array.ndim == 3 else 0x0801)
  return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def write_tiny_mnist(root: pathlib.Path, train: int = 320, test: int = 96) -> pathlib.Path:
  """root/tiny_digits/ with the first `train`/`test` examples of the shipped MNIST; returns root.

  A dataset name the data layer does not know skips the full-size count and checksum checks, so a few
  hundred real digits take exactly the path the full dataset takes.
  """
  import gzip
  target = root / "tiny_digits"
  target.mkdir(parents=True, exist_ok=True)
  for name in IDX_FILES:
    count = train if name.startswith("train") else test
    array = read_idx(SHIPPED_MNIST / f"{name}.gz")[:count]
    (target / f"{name}.gz").write_bytes(gzip.compress(idx_content(array), mtime=0))
  return root


def mnist_cli(workdir, data_root, *overrides, timeout: float = 600, env: dict | None = None,
              popen: bool = False, **popen_kwargs):
  """`python -m experiments.mnist` on the tiny digits of `data_root` with small sizes, plus `overrides`.

  Returns the CompletedProcess (stdout and stderr apart), or with popen=True the running Popen (stderr
  merged into stdout, so a long run cannot block on a full stderr pipe); popen_kwargs go to Popen.
  """
  args = [sys.executable, "-m", "experiments.mnist", f"--workdir={workdir}", "--config.data.dataset=tiny_digits",
          f"--config.data.data_dir={data_root}", f"--config.data.tfds_data_dir={pathlib.Path(data_root) / 'tfds'}",
          "--config.data.download=False", "--config.train.epochs=1", "--config.train.batch_size=32",
          "--config.train.validation_batch_size=32", "--config.eval_batch_size=32", "--config.train.log_every=3",
          "--config.train.warmup_steps=2", *overrides]
  env = clean_env(**(env or {}))
  if popen:
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **popen_kwargs)
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
