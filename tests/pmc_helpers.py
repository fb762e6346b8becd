"""Counter streams for the pmc observer, packed the way the kernel packs them.

:class:`CounterStream` plays CPUs forward interval by interval from rates
("IPC 1.8, 20 % stalls") and emits the cumulative readings ``pmc.bpf.c``
would send, so tests can record an hour of history and a short degradation
and replay them through the real parse and detect path.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from tapio_core.recording import RecordWriter
from tapio_observer_pmc.detect import Detector
from tapio_observer_pmc.records import PMC_RECORD
from tapio_observer_pmc.settings import PmcSettings

# struct pmc_record in pmc.bpf.c, in native C layout ('@' applies C alignment).
PMC_RECORD_C = struct.Struct("@Q3Q3Q3QII")
ALL_COUNTERS = 0b111
NO_STALLS = 0b011
SECOND = 1_000_000_000


def pack_pmc_record(cpu: int, timestamp_ns: int, counters: Iterable[int], enabled: Iterable[int] = (0, 0, 0),
                    running: Iterable[int] = (0, 0, 0), valid: int = ALL_COUNTERS) -> bytes:
    return PMC_RECORD_C.pack(timestamp_ns, *counters, *enabled, *running, cpu, valid)


class CounterStream:
    """Per-CPU cumulative counters advanced one interval at a time."""

    def __init__(self, cpus: Iterable[int] = (0, 1), interval_ns: int = SECOND, start_ns: int = 5 * SECOND,
                 valid: int = ALL_COUNTERS) -> None:
        self.interval_ns = interval_ns
        self.now = start_ns
        self.valid = valid
        self.totals = {cpu: [0, 0, 0] for cpu in cpus}
        self.enabled = {cpu: [0, 0, 0] for cpu in cpus}
        self.running = {cpu: [0, 0, 0] for cpu in cpus}
        self.records: list[bytes] = []
        self._emit()  # the first reading: a baseline for the first interval

    def _emit(self, cpus: Iterable[int] | None = None) -> None:
        for cpu in self.totals if cpus is None else cpus:
            self.records.append(pack_pmc_record(cpu, self.now + cpu * 1000, self.totals[cpu], self.enabled[cpu],
                                                self.running[cpu], self.valid))

    def run(self, intervals: int, *, ipc: float = 1.8, stall_pct: float = 20.0, cycles: int = 2_000_000_000,
            cpus: Iterable[int] | None = None, running_share: float = 1.0, **per_cpu: dict) -> CounterStream:
        """Advance ``intervals`` intervals; every CPU does the same unless overridden in ``per_cpu``.

        ``per_cpu={"cpu1": {"stall_pct": 80}}``-style overrides are given as ``cpu1={...}``.
        ``running_share`` < 1 makes the counters multiplexed: they count only that share of the time.
        """
        for _ in range(intervals):
            self.now += self.interval_ns
            for cpu in self.totals:
                rates = {"ipc": ipc, "stall_pct": stall_pct, "cycles": cycles, "running_share": running_share}
                rates.update(per_cpu.get(f"cpu{cpu}", {}))
                share = rates["running_share"]
                counted = rates["cycles"] * share
                self.totals[cpu][0] += round(counted)
                self.totals[cpu][1] += round(counted * rates["ipc"])
                self.totals[cpu][2] += round(counted * rates["stall_pct"] / 100)
                for i in range(3):
                    self.enabled[cpu][i] += self.interval_ns
                    self.running[cpu][i] += round(self.interval_ns * share)
            self._emit(cpus)
        return self

    def data(self) -> bytes:
        return b"".join(self.records)

    def events(self) -> np.ndarray:
        return np.frombuffer(self.data(), PMC_RECORD)

    def write_recording(self, path: Path, batch: int = 16) -> Path:
        """The standard ``tapio-agent --record`` file, ``batch`` records per batch."""
        writer = RecordWriter(path, clock_offset_ns=1_700_000_000 * SECOND)
        for start in range(0, len(self.records), batch):
            chunk = b"".join(self.records[start:start + batch])
            writer.write_batch("pmc", PMC_RECORD.itemsize, self.now, chunk)
        writer.close()
        return path


def classify(data: bytes, batch: int | None = None, detector: Detector | None = None, **settings):
    """Anomalies the detector finds in kernel-packed readings fed ``batch`` records at a time."""
    detector = detector or Detector(PmcSettings(**settings))
    events = np.frombuffer(data, PMC_RECORD)
    step = batch or max(len(events), 1)
    found = []
    for start in range(0, len(events), step):
        found.extend(detector.feed(events[start:start + step]))
    return found
