"""One training run in a subprocess, for the kill/SIGTERM/multi-process reliability tests (not collected).

    python _rel_worker.py OUT_DIR --workdir W --config JSON [--devices D] [--sleep S]

Trains the tiny model of tests/train/_train_models.py through `jaxcnn.train.fit` (the same code path as
an experiment) with the fit config given as JSON, printing "READY" once training is about to start and
"DONE" at the end. Process 0 writes
OUT_DIR/state.npz: every saved leaf of the final TrainState (step, params, batch_stats, opt_state, rng,
data position, metric sums) keyed by its tree path, and OUT_DIR/history.json. A JaxcnnError is printed as
one line "ERROR <exit code>: <message>" and the process exits with the error's code at once.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--workdir", required=True)
parser.add_argument("--config", required=True, help="the fit config as a JSON object")
parser.add_argument("--devices", type=int, default=4)
parser.add_argument("--sleep", type=float, default=0.0, help="seconds to pause after each epoch")
args = parser.parse_args()
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import logging  # noqa: E402
import time  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _rel_common import saved_leaves  # noqa: E402
from _train_models import make_data, make_model  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxcnn import train  # noqa: E402
from jaxcnn.errors import JaxcnnError  # noqa: E402


class _Announce(train.Callback):
  def on_train_begin(self, history):
    print("READY", flush=True)

  def on_epoch_end(self, epoch, logs, state):
    print(f"epoch {epoch + 1} done", flush=True)
    if args.sleep:
      time.sleep(args.sleep)


def main() -> int:
  logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
  for noisy in ("absl", "jax._src", "orbax"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  config = json.loads(args.config)
  try:
    train.maybe_initialize_distributed(config.get("distributed_init_timeout_s", 60),
                                       config.get("heartbeat_timeout_s", 10))
    train_data, val_data = make_data()
    result = train.fit(make_model(), train_data, config=config, workdir=args.workdir, val_data=val_data,
                       callbacks=[_Announce()])
  except JaxcnnError as err:
    print(f"ERROR {err.exit_code}: {err}", flush=True)
    os._exit(err.exit_code)
  if jax.process_index() == 0:
    np.savez(out / "state.npz", **saved_leaves(result.state))
    (out / "history.json").write_text(json.dumps(result.history))
  print("DONE", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
