"""TensorBoard event files (jaxcnn.train.tfevents): read back by TensorFlow's own event reader, which checks
every record's CRC, with the values, steps and wall times written; and the TensorBoard callback's files
the same. Writing them imports no PyTorch (importing it took seconds at every run's first epoch)."""
from __future__ import annotations

import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest

from helpers import import_tensorflow
from jaxcnn import train
from jaxcnn.train import tfevents

REPO = pathlib.Path(__file__).resolve().parents[2]


def _read(path: pathlib.Path) -> list:
  tf = import_tensorflow()
  return list(tf.compat.v1.train.summary_iterator(str(path)))


def test_crc32c_known_answers():
  # The CRC-32C check value (RFC 3720's test vectors: 32 zero bytes, 32 0xff bytes, 0..31).
  assert tfevents.crc32c(b"123456789") == 0xE3069283
  assert tfevents.crc32c(b"") == 0
  assert tfevents.crc32c(bytes(32)) == 0x8A9136AA
  assert tfevents.crc32c(b"\xff" * 32) == 0x62A8AB43
  assert tfevents.crc32c(bytes(range(32))) == 0x46DD794E


@pytest.mark.oracle
def test_tensorflow_reads_back_every_scalar_step_and_wall_time(tmp_path):
  writer = tfevents.EventFileWriter(tmp_path / "tb")
  written = [(1, {"loss": 0.25, "val/accuracy": 0.9921875}, 1.5e9), (2, {"loss": -3.0e-7, "lr": 1e30}, 1.6e9),
             (2**40, {"ünï": 7.0, "huge": 1e39, "-huge": -1e39}, 1.7e9)]
  for step, scalars, wall_time in written:
    writer.add_scalars(step, scalars, wall_time=wall_time)
  writer.flush()
  writer.close()
  assert writer.path.parent == tmp_path / "tb" and writer.path.name.startswith("events.out.tfevents.")

  events = _read(writer.path)
  assert events[0].file_version == "brain.Event:2" and events[0].wall_time > 1.7e9
  assert len(events) == 1 + len(written)
  for event, (step, scalars, wall_time) in zip(events[1:], written):
    assert (event.step, event.wall_time) == (step, wall_time)
    with np.errstate(over="ignore"):  # simple_value is a float32: beyond its range, the signed infinity
      expected = {tag: float(np.float32(value)) for tag, value in scalars.items()}
    assert {v.tag: v.simple_value for v in event.summary.value} == expected


@pytest.mark.oracle
def test_a_damaged_record_is_refused_by_tensorflow(tmp_path):
  """TensorFlow checks both CRCs of every record, so it reading the file back (above) proves them."""
  tf = import_tensorflow()
  writer = tfevents.EventFileWriter(tmp_path)
  writer.add_scalars(1, {"loss": 1.0})
  writer.close()
  data = bytearray(writer.path.read_bytes())
  first = 12 + struct.unpack("<Q", data[:8])[0] + 4  # the second record starts after the first
  data[first + 12 + 3] ^= 0x01  # a byte of the second record's payload
  writer.path.write_bytes(bytes(data))
  with pytest.raises(tf.errors.DataLossError):
    _read(writer.path)


def test_writers_in_the_same_second_get_their_own_files(tmp_path):
  writers = [tfevents.EventFileWriter(tmp_path) for _ in range(3)]
  for writer in writers:
    writer.close()
  assert len({w.path for w in writers}) == 3 and len(list(tmp_path.iterdir())) == 3


def test_a_writer_whose_first_record_fails_closes_its_file(tmp_path, monkeypatch):
  # The file is opened, then its version record written: a failure there returns no writer to close it.
  opened = []
  real_open = open

  def tracking_open(path, mode="r", *args, **kwargs):
    handle = real_open(path, mode, *args, **kwargs)
    opened.append(handle)
    return handle

  def failing_record(payload):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(tfevents, "open", tracking_open, raising=False)
  monkeypatch.setattr(tfevents, "encode_record", failing_record)
  with pytest.raises(OSError, match="No space left on device"):
    tfevents.EventFileWriter(tmp_path)
  assert len(opened) == 1 and opened[0].closed


@pytest.mark.oracle
def test_the_tensorboard_callback_writes_each_epoch_as_one_event(tmp_path):
  callback = train.TensorBoard(tmp_path / "tb")
  callback.on_epoch_end(0, {"loss": 0.5, "accuracy": 0.75}, None)
  callback.on_epoch_end(1, {"loss": 0.25, "accuracy": 0.875}, None)
  callback.close()
  (path,) = (tmp_path / "tb").iterdir()
  events = _read(path)
  assert [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]] == [
      (1, {"loss": 0.5, "accuracy": 0.75}), (2, {"loss": 0.25, "accuracy": 0.875})]


def test_writing_events_imports_no_pytorch(tmp_path):
  code = ("import sys; from jaxcnn import train; cb = train.TensorBoard(sys.argv[1]); "
          "cb.on_epoch_end(0, {'loss': 1.0}, None); cb.close(); print(sorted(m for m in sys.modules if "
          "m.split('.')[0] in ('torch', 'tensorboardX')))")
  result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, check=True)
  assert result.stdout.strip() == "[]", result.stdout
