"""Record files: the raw ring-buffer batches an agent saw, for ``tapio replay``.

Layout: the magic ``TAPIOREC``, a u16 version, then frames. A ``C`` frame pins
the monotonic-to-wall clock offset (i64). An ``R`` frame holds one batch: u16
observer-name length, the name, u32 record size, u32 record count, u64
monotonic drain time, then the records exactly as the kernel wrote them (each
record carries its own kernel timestamp). Little-endian throughout. A file cut
short by a crash replays up to its last whole frame.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import attrs

from tapio_core.store import open_private

MAGIC = b"TAPIOREC"
VERSION = 1
_HEADER = struct.Struct("<8sH")
_CLOCK = struct.Struct("<cq")
_BATCH_HEAD = struct.Struct("<cH")
_BATCH_SIZES = struct.Struct("<IIQ")


class RecordingError(Exception):
    """The file is not a Tapio recording (or a newer version of one)."""


@attrs.frozen
class RecordedBatch:
    observer: str
    record_size: int
    drained_ns: int
    records: bytes


class RecordWriter:
    def __init__(self, path: Path, clock_offset_ns: int) -> None:
        self._file: BinaryIO = open_private(path)
        self._file.write(_HEADER.pack(MAGIC, VERSION))
        self.write_clock(clock_offset_ns)

    def write_clock(self, offset_ns: int) -> None:
        self._file.write(_CLOCK.pack(b"C", offset_ns))

    def write_batch(self, observer: str, record_size: int, drained_ns: int, records: bytes) -> None:
        name = observer.encode()
        self._file.write(
            _BATCH_HEAD.pack(b"R", len(name)) + name
            + _BATCH_SIZES.pack(record_size, len(records) // record_size, drained_ns)
            + records
        )

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_recording(path: Path) -> Iterator[int | RecordedBatch]:
    """Yields clock offsets (int) and batches in file order."""
    with open(path, "rb") as handle:
        data = handle.read()
    if len(data) < _HEADER.size:
        raise RecordingError(f"{path}: too short to be a Tapio recording")
    magic, version = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RecordingError(f"{path}: not a Tapio recording (bad magic)")
    if version != VERSION:
        raise RecordingError(f"{path}: recording version {version}, this Tapio reads version {VERSION}")
    pos = _HEADER.size
    while pos < len(data):
        kind = data[pos : pos + 1]
        try:
            if kind == b"C":
                (_, offset) = _CLOCK.unpack_from(data, pos)
                pos += _CLOCK.size
                yield offset
            elif kind == b"R":
                _, name_len = _BATCH_HEAD.unpack_from(data, pos)
                pos += _BATCH_HEAD.size
                try:
                    name = data[pos : pos + name_len].decode()
                except UnicodeDecodeError:
                    raise RecordingError(f"{path}: corrupt observer name at byte {pos}") from None
                pos += name_len
                size, count, drained = _BATCH_SIZES.unpack_from(data, pos)
                pos += _BATCH_SIZES.size
                end = pos + size * count
                if end > len(data):
                    return  # cut short mid-batch
                yield RecordedBatch(name, size, drained, data[pos:end])
                pos = end
            else:
                raise RecordingError(f"{path}: corrupt frame at byte {pos}")
        except struct.error:
            return  # cut short mid-header
