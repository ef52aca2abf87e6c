"""Holds a workdir's lock as a run does, until it is killed: for the lock tests (not collected).

    python _rel_hold_lock.py WORKDIR            # jaxcnn.train.workdir.workdir_lock(WORKDIR); joins the
                                                # multi-process job the JAX_* variables describe
    python _rel_hold_lock.py WORKDIR --file F   # only flock WORKDIR/F (a process of another job that lives on)

Prints "HELD" once the lock is held, then sleeps; a JaxcnnError is printed as one line
"ERROR <exit code>: <message>" and the process exits with the error's code.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("workdir")
parser.add_argument("--file", default=None)
args = parser.parse_args()
os.environ["CUDA_VISIBLE_DEVICES"] = ""
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"

if args.file:
  fd = os.open(os.path.join(args.workdir, args.file), os.O_RDWR | os.O_CREAT, 0o644)
  fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  line = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "process": 1,
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode()
  os.pwrite(fd, line, 0)
  os.ftruncate(fd, len(line))
  print("HELD", flush=True)
  time.sleep(600)
  sys.exit(0)

from jaxcnn.errors import JaxcnnError  # noqa: E402
from jaxcnn.train import maybe_initialize_distributed  # noqa: E402
from jaxcnn.train.workdir import workdir_lock  # noqa: E402

try:
  maybe_initialize_distributed(60, 5)
  with workdir_lock(args.workdir):
    print("HELD", flush=True)
    time.sleep(600)
except JaxcnnError as err:
  print(f"ERROR {err.exit_code}: {err}", flush=True)
  os._exit(err.exit_code)
