"""Batch reader of a BPF ring buffer map (BPF_MAP_TYPE_RINGBUF), read from Python via mmap.

bcc's ``ring_buffer_consume()`` calls back into Python once per record, which caps
throughput at about 2 M records/s. This reader takes every committed record that is
available in one go and, when all of them have the observer's fixed size, finds the
record boundaries and gathers the payloads with a few vectorised numpy operations.

Layout (kernel/bpf/ringbuf.c): page 0 holds the consumer position (ours to write);
page 1 holds the producer position (the kernel's); then the data area, mapped twice
in a row so that any run of records starting inside the first copy is contiguous.
Each record is an 8-byte header (u32 length with BUSY and DISCARD flag bits, u32
page offset) followed by the payload, the whole rounded up to 8 bytes.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import select
import struct
import sys
import time
from types import TracebackType
from typing import Any, Self

import numpy as np

BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
LEN_MASK = DISCARD_BIT - 1
HEADER_SIZE = 8

_ACQUIRE = 2
_SEQ_CST = 5
_HEADER = struct.Struct("=I")


def _load_libatomic() -> tuple[Any, Any, Any]:
    """Python has no atomics; libatomic gives the ordered loads/stores/fences the ABI needs."""
    name = ctypes.util.find_library("atomic")
    if name is None:
        raise OSError("libatomic not found; it is needed for ordered ring buffer access")
    lib = ctypes.CDLL(name)
    load, store, fence = lib["__atomic_load_8"], lib["__atomic_store_8"], lib["atomic_thread_fence"]
    load.argtypes, load.restype = [ctypes.c_void_p, ctypes.c_int], ctypes.c_uint64
    store.argtypes, store.restype = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int], None
    fence.argtypes, fence.restype = [ctypes.c_int], None
    return load, store, fence


_atomic_load, _atomic_store, _atomic_fence = _load_libatomic()


class RingBufferReader:
    """The single consumer of one BPF ring buffer map, returning whole batches of fixed-size records.

    Not thread-safe: the consumer position is ours alone, so use one reader from one thread.
    """

    def __init__(self, map_fd: int, data_size: int, record_size: int) -> None:
        page = mmap.PAGESIZE
        if data_size <= 0 or data_size & (data_size - 1) or data_size % page:
            raise ValueError(f"data_size {data_size} is not a power-of-2 multiple of the page size")
        if record_size <= 0 or record_size + HEADER_SIZE > data_size:
            raise ValueError(f"record_size {record_size} does not fit in a {data_size}-byte ring")
        self.record_size = record_size
        self.malformed = 0
        self.discarded = 0
        self._fd = map_fd
        self._page = page
        self._mask = data_size - 1
        self._stride = (record_size + HEADER_SIZE + 7) & ~7
        self._epoll: select.epoll | None = None
        # Consumer page: read-write, we publish our position there.
        self._cons_mm: mmap.mmap | None = mmap.mmap(
            map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        try:
            # Producer page + double-mapped data: the kernel only allows read-only.
            self._prod_mm: mmap.mmap | None = mmap.mmap(
                map_fd, page + 2 * data_size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
            )
        except BaseException:
            self._cons_mm.close()
            raise
        # These views pin the mappings (an mmap refuses to close while exported), so the raw
        # addresses handed to libatomic stay valid until close() drops the views first.
        self._cons_pos: ctypes.c_uint64 | None = ctypes.c_uint64.from_buffer(self._cons_mm)
        self._cons_addr = ctypes.addressof(self._cons_pos)
        self._ring: np.ndarray | None = np.frombuffer(self._prod_mm, dtype=np.uint8)
        self._prod_addr = self._ring.ctypes.data

    def fileno(self) -> int:
        """The map fd: EPOLLIN (level-triggered) when data is available, for select/epoll loops."""
        return self._fd

    def _positions(self) -> tuple[int, int]:
        if self._ring is None or self._cons_pos is None:
            raise ValueError("ring buffer reader is closed")
        # Only we write the consumer position, so a plain read of it is enough; the producer
        # position needs acquire so the headers it covers are read after it.
        return self._cons_pos.value, _atomic_load(self._prod_addr, _ACQUIRE)

    def _header(self, pos: int) -> int:
        """Header word at pos, then an acquire fence so the payload is read after it."""
        hdr = _HEADER.unpack_from(self._prod_mm, self._page + (pos & self._mask))[0]  # type: ignore[arg-type]
        _atomic_fence(_ACQUIRE)
        return hdr

    def pending(self) -> bool:
        """True when the next record is committed (a reserved but uncommitted one does not count)."""
        cons, prod = self._positions()
        return prod != cons and not self._header(cons) & BUSY_BIT

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a record is committed or timeout (s) passes; checks first, so no wakeup is lost."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.pending():
            left = -1.0 if deadline is None else deadline - time.monotonic()
            if deadline is not None and left <= 0:
                return False
            if self._epoll is None:
                self._epoll = select.epoll(1)
                self._epoll.register(self._fd, select.EPOLLIN)
            self._epoll.poll(left)  # may wake early (stale or uncommitted data): re-check
        return True

    def read_batch(self, max_records: int | None = None) -> bytes:
        """Consume the committed records available now (up to max_records) and return their payloads.

        The result is the payloads concatenated in ring order, record_size bytes each. Reading
        stops at the first record still being written (BUSY): the consumer position moves past
        records only in ring order, so committed ones behind it wait. DISCARD records are consumed
        and counted in ``discarded``; records of another length are consumed and counted in
        ``malformed``.
        """
        cons, prod = self._positions()
        ring = self._ring
        assert ring is not None
        limit = sys.maxsize if max_records is None else max_records
        size, stride = self.record_size, self._stride
        parts: list[bytes] = []
        got = 0
        pos = cons
        while pos < prod and got < limit:
            rows = min((prod - pos) // stride, limit - got)
            good = 0
            if rows:
                # Fast path: treat the next rows as fixed-size records, up to the first that is not.
                start = self._page + (pos & self._mask)
                block = ring[start : start + rows * stride].reshape(rows, stride)
                lens = block[:, :4].copy().view(np.uint32).ravel()
                _atomic_fence(_ACQUIRE)  # payloads are read after their headers
                bad = (lens & ~np.uint32(DISCARD_BIT)) != size  # BUSY or another length
                good = int(bad.argmax()) if bad.any() else rows
                if good:
                    keep = (lens[:good] & DISCARD_BIT) == 0
                    kept = int(np.count_nonzero(keep))
                    payloads = block[:good, HEADER_SIZE : HEADER_SIZE + size]
                    parts.append((payloads if kept == good else payloads[keep]).tobytes())
                    self.discarded += good - kept
                    got += kept
                    pos += good * stride
                if good == rows:
                    continue
                hdr = int(lens[good])
            else:
                hdr = self._header(pos)  # fewer bytes left than one record: not our size
            # Slow path: one record that is busy, discarded or of another length.
            if hdr & BUSY_BIT:
                break
            length = hdr & LEN_MASK
            if hdr & DISCARD_BIT:
                self.discarded += 1
            elif length != size:
                self.malformed += 1
            else:
                off = self._page + (pos & self._mask) + HEADER_SIZE
                parts.append(ring[off : off + size].tobytes())
                got += 1
            pos += (length + HEADER_SIZE + 7) & ~7
            if pos > prod:  # never from a sane kernel; do not publish a position past the producer
                raise RuntimeError(f"ring buffer record ends at {pos}, past the producer position {prod}")
        if pos == cons:
            return b""
        data = b"".join(parts)  # payloads were copied out by tobytes(); safe to release the space
        # Full barrier: the kernel wakes us only if it sees our new position when committing
        # there, and we must see its producer position after publishing ours (no lost wakeup).
        _atomic_store(self._cons_addr, pos, _SEQ_CST)
        return data

    def close(self) -> None:
        """Unmap the ring (drop the views that pin it first); safe to call more than once.

        If a view is still alive elsewhere (e.g. in the traceback of an exception being handled),
        the mapping is left to be unmapped by the garbage collector instead of raising here.
        """
        self._ring = None
        self._cons_pos = None
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        for name in ("_prod_mm", "_cons_mm"):
            mm = getattr(self, name, None)
            if mm is not None:
                setattr(self, name, None)
                with contextlib.suppress(BufferError):
                    mm.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
