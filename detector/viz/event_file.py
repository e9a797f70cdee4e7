"""A TensorBoard events file written on the caller's thread.

TensorBoard's own writer (`SummaryWriter` -> `EventFileWriter`) writes from a background thread. On a full disk
that thread printed its own traceback, and the error reached the trainer only later, at its next call. Here each
record is written, and flushed, by the call that adds it, so an OSError (disk full, quota) is raised there, where
`RunLogger` turns it into one line naming the file. The records are TensorBoard's (TFRecord framing, the `Event`
and `Summary` protos of `torch.utils.tensorboard.summary`), so `tensorboard --logdir` reads the file as its own.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from pathlib import Path
from typing import BinaryIO

import google_crc32c
import torch
from tensorboard.compat.proto.event_pb2 import Event
from torch.utils.tensorboard.summary import image, scalar

_CRC_MASK_DELTA = 0xA282EAD8  # TFRecord's masked CRC: rotate right by 15 bits, add this (tensorflow/core/lib/hash/crc32c.h)


def tf_record(data: bytes) -> bytes:
    """`data` framed as one TFRecord, the events file's unit: its length (uint64, little-endian), the length's masked
    CRC-32C, the data, the data's masked CRC-32C. google-crc32c computes the checksums in C; TensorBoard's own
    `RecordWriter` does it in a Python loop, about 0.16 µs a byte (0.1 s for a 600 kB image)."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc32c(length)) + data + struct.pack("<I", _masked_crc32c(data))


def _masked_crc32c(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _CRC_MASK_DELTA) & 0xFFFFFFFF


def _create(log_dir: Path) -> tuple[Path, BinaryIO]:
    """A new file named as TensorBoard names its own (time, host, pid, then a number); created exclusively, so a
    second file of the same second (a resume in the same process) never overwrites the first."""
    stem = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
    number = 0
    while True:
        path = log_dir / f"{stem}.{number}"
        try:
            return path, path.open("xb")
        except FileExistsError:
            number += 1


class EventFile:
    """Scalars and images for TensorBoard in `log_dir/events.out.tfevents.*`; every call writes and flushes."""

    def __init__(self, log_dir: Path) -> None:
        self.path, self._file = _create(log_dir)
        try:
            self._write(Event(file_version="brain.Event:2"))
        except OSError as err:  # (a full disk): no empty file left behind, and the error names the file
            with contextlib.suppress(OSError):
                self._file.close()
            with contextlib.suppress(OSError):
                self.path.unlink()
            err.filename = err.filename or str(self.path)
            raise

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(Event(step=step, summary=scalar(tag, value)))

    def add_image(self, tag: str, image_chw: torch.Tensor, step: int) -> None:
        """`image_chw`: (3, H, W) uint8."""
        self._write(Event(step=step, summary=image(tag, image_chw, dataformats="CHW")))

    def close(self) -> None:
        self._file.close()

    def _write(self, event: Event) -> None:
        event.wall_time = time.time()
        self._file.write(tf_record(event.SerializeToString()))
        self._file.flush()  # a full disk fails this call, and TensorBoard sees the record now: at most a few
        # hundred bytes per log interval, and per validation an image of a few hundred kB
