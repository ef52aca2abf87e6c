"""TensorBoard event files, written directly: scalar summaries as `Event` protocol buffers in TFRecord
framing, the format TensorBoard (and TensorFlow's `summary_iterator`) reads.

Written here rather than through an event-writing library: importing tensorboardX's package imports
PyTorch whenever PyTorch is installed (seconds at every run's first epoch), and its writer flushes from a
background thread, where a full disk would be lost. Only what the TensorBoard callback writes is
implemented: the file-version event and events of scalar values.

    writer = EventFileWriter(logdir)          # logdir/events.out.tfevents.<time>.<host>.<pid>
    writer.add_scalars(step, {"loss": 0.3}); writer.flush(); writer.close()

Every OSError (a full disk, an unwritable folder) is raised to the caller, from the call that made it.
"""
from __future__ import annotations

import math
import os
import pathlib
import socket
import struct
import time
from typing import Mapping

__all__ = ["EventFileWriter", "crc32c", "encode_event", "encode_record"]


def _crc32c_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte
    for _ in range(8):
      crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # the Castagnoli polynomial, reflected
    table.append(crc)
  return tuple(table)


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  """CRC-32C (Castagnoli) of `data`, as TFRecord framing uses it."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  crc = crc32c(data)
  return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def encode_record(data: bytes) -> bytes:
  """One TFRecord: length (uint64 LE), its masked CRC-32C, the data, the data's masked CRC-32C."""
  length = struct.pack("<Q", len(data))
  return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


# -- protocol buffer wire format (the few field kinds an Event of scalars uses) ------------------------

def _varint(value: int) -> bytes:
  value &= (1 << 64) - 1  # int64 fields: negative values as their 64-bit two's complement
  out = bytearray()
  while True:
    low = value & 0x7F
    value >>= 7
    if value:
      out.append(low | 0x80)
    else:
      out.append(low)
      return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
  return _varint(number << 3 | wire_type)


def _bytes_field(number: int, payload: bytes) -> bytes:
  return _key(number, 2) + _varint(len(payload)) + payload


def _float32(value: float) -> bytes:
  """`value` as a little-endian float32 (simple_value's type): rounded, and beyond float32's range the
  infinity of its sign, as a float32 holds it (struct would raise OverflowError)."""
  value = float(value)
  try:
    return struct.pack("<f", value)
  except OverflowError:
    return struct.pack("<f", math.copysign(math.inf, value))


def encode_event(wall_time: float, step: int = 0, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """A serialised `tensorflow.Event`: wall_time (1, double), step (2, int64), file_version (3, string)
  or summary (5) holding one `Summary.Value` (tag (1, string), simple_value (2, float)) per scalar."""
  out = _key(1, 1) + struct.pack("<d", float(wall_time))
  if step:
    out += _key(2, 0) + _varint(int(step))
  if file_version is not None:
    out += _bytes_field(3, file_version.encode())
  if scalars:
    values = b"".join(_bytes_field(1, _bytes_field(1, str(tag).encode()) + _key(2, 5) + _float32(value))
                      for tag, value in scalars.items())
    out += _bytes_field(5, values)
  return out


class EventFileWriter:
  """Appends events to a new file `logdir/events.out.tfevents.<unix time>.<host>.<pid>[.<n>]`, in the
  calling thread. The file starts with TensorBoard's file-version event; `flush` pushes what was added to the OS."""

  def __init__(self, logdir):
    self.logdir = pathlib.Path(logdir)
    self.logdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{os.getpid()}"
    for suffix in range(1000):  # a second writer of this process in the same second gets its own file
      self.path = self.logdir / (name if suffix == 0 else f"{name}.{suffix}")
      try:
        self._file = open(self.path, "xb")  # noqa: SIM115 (closed by close())
        break
      except FileExistsError:
        continue
    else:
      raise FileExistsError(f"{self.logdir}: 1000 event files named {name}* already exist")
    try:
      self._file.write(encode_record(encode_event(now, file_version="brain.Event:2")))
    except BaseException:
      self._file.close()  # no writer is returned to close it
      raise

  def add_scalars(self, step: int, scalars: Mapping[str, float], wall_time: float | None = None) -> None:
    """One event at `step` holding every scalar {tag: value}."""
    event = encode_event(time.time() if wall_time is None else wall_time, step, scalars=scalars)
    self._file.write(encode_record(event))

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    if not self._file.closed:
      self._file.close()
