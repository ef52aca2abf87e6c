"""Runs one fit in a subprocess for the resume, preemption and multi-process tests (not collected).

    python _fit_worker.py OUT_DIR [--workdir W] [--epochs E] [--sleep S] [--lr LR] [--devices D]

Writes OUT_DIR/params.npz (flattened final params and batch_stats, process 0) and OUT_DIR/history.json.
A JaxcnnError is printed as one line "ERROR <exit code>: <message>" and the process exits with its code
at once (os._exit: a multi-process runtime whose peer died would otherwise abort at exit).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--workdir", default=None)
parser.add_argument("--epochs", type=int, default=3)
parser.add_argument("--sleep", type=float, default=0.0, help="seconds to pause after each epoch")
parser.add_argument("--lr", type=float, default=0.01)
parser.add_argument("--devices", type=int, default=4)
parser.add_argument("--checkpoint-every", type=int, default=2)
parser.add_argument("--heartbeat", type=int, default=5)
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import logging  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _train_models import make_data, make_model  # noqa: E402

from jaxcnn import train  # noqa: E402
from jaxcnn.errors import JaxcnnError  # noqa: E402

CONFIG = dict(log_every=2, learning_rate=args.lr, seed=0, async_checkpointing=True, progress="log",
              checkpoint_every_steps=args.checkpoint_every, epochs=args.epochs, heartbeat_timeout_s=args.heartbeat,
              distributed_init_timeout_s=30)


class Pause(train.Callback):
  def on_epoch_end(self, epoch, logs, state):
    print(f"epoch {epoch + 1} done", flush=True)
    time.sleep(args.sleep)


def main() -> int:
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  try:
    # Join the job (when JAX_* describe one) before the data pipelines touch a device.
    train.maybe_initialize_distributed(CONFIG["distributed_init_timeout_s"], CONFIG["heartbeat_timeout_s"])
    train_data, val_data = make_data()
    result = train.fit(make_model(), train_data, config=CONFIG, workdir=args.workdir, val_data=val_data,
                       callbacks=[Pause()])
  except JaxcnnError as err:
    print(f"ERROR {err.exit_code}: {err}", flush=True)
    sys.stdout.flush()
    os._exit(err.exit_code)
  if jax.process_index() == 0:
    leaves = jax.tree_util.tree_flatten_with_path({"params": result.state.params,
                                                   "batch_stats": result.state.batch_stats})[0]
    np.savez(out / "params.npz", **{jax.tree_util.keystr(p): np.asarray(train.parallel.fetch(x))
                                    for p, x in leaves})
    (out / "history.json").write_text(json.dumps(result.history))
  print("DONE", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
