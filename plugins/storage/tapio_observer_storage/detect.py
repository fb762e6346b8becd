"""Turning storage records into anomalies.

The kernel sends a record only for a request that failed or that it screened
as slow, so a batch is small; each record is judged here against the exact
thresholds of its device (its name is in the record), which also lets a replay
judge a recording again under other settings. A device judged for the first
time is handed to :class:`DeviceScreens`, which gives the kernel that device's
own warning threshold.
"""

from __future__ import annotations

import errno
import logging
from typing import Any

import numpy as np

from tapio_core import Anomaly
from tapio_observer_storage.records import BlockStatus, Operations, block_status, kernel_dev
from tapio_observer_storage.settings import StorageSettings, Thresholds

log = logging.getLogger("tapio.storage")

IO_ERROR = "kernel.storage.io_error"
LATENCY_SPIKE = "kernel.storage.latency_spike"


class DeviceScreens:
    """The devices the kernel screens with their own warning threshold, and the name each was matched by.

    ``table`` is the BPF map ``device_warning_ns`` (None in a replay, where
    nothing is written). A device whose name changed (its dev_t was reused) is
    matched again.
    """

    def __init__(self, settings: StorageSettings, table: Any = None) -> None:
        self.settings = settings
        self.table = table
        self.names: dict[int, str] = {}
        self.full = False

    def learn(self, dev: int, name: str, thresholds: Thresholds) -> None:
        if self.names.get(dev) == name:
            return
        if self.table is not None:
            try:
                self.table[self.table.Key(dev)] = self.table.Leaf(thresholds.warning_ns)
            except Exception as exc:  # bcc raises a bare Exception when the map is full
                if not self.full:
                    log.warning("storage: cannot give %s its own threshold (%s); it stays screened "
                                "at the lowest warning threshold", name, exc)
                self.full = True
                return
        self.names[dev] = name


class StorageDetector:
    """Judges batches of records for one observer; lives in ``observer.state``."""

    def __init__(self, settings: StorageSettings, operations: Operations, statuses: dict[int, BlockStatus],
                 screens: DeviceScreens) -> None:
        self.settings = settings
        self.operations = operations
        self.statuses = statuses
        self.screens = screens
        self._thresholds: dict[str, Thresholds] = {}
        #: Records the kernel sent that were below their device's exact warning threshold.
        self.screened = 0
        self.unmatched_completions = 0
        self.inflight_overflows = 0

    def thresholds(self, device: str) -> Thresholds:
        found = self._thresholds.get(device)
        if found is None:
            found = self._thresholds[device] = self.settings.thresholds(device)
        return found

    def counters(self) -> dict[str, int]:
        return {
            "unmatched_completions": self.unmatched_completions,
            "inflight_overflows": self.inflight_overflows,
            "screened_in_userspace": self.screened,
            "devices_screened_in_kernel": len(self.screens.names),
        }

    def detect(self, events: np.ndarray) -> list[Anomaly]:
        if events.size == 0:
            return []
        self.unmatched_completions = max(self.unmatched_completions, int(events["unmatched_completions"].max()))
        self.inflight_overflows = max(self.inflight_overflows, int(events["inflight_overflows"].max()))
        task = events["task"]
        columns = zip(
            events["timestamp_ns"].tolist(), events["latency_ns"].tolist(), events["sector"].tolist(),
            events["baseline_ns"].tolist(), events["baseline_deviation_ns"].tolist(),
            events["baseline_samples"].tolist(), task["pid"].tolist(), task["tid"].tolist(),
            task["cgroup_id"].tolist(), task["comm"].tolist(), events["dev_major"].tolist(),
            events["dev_minor"].tolist(), events["bytes"].tolist(), events["completed_bytes"].tolist(),
            events["cmd_flags"].tolist(), events["status"].tolist(), events["partial"].tolist(),
            events["disk_name"].tolist(),
            strict=True,
        )
        anomalies = []
        for row, (ts, latency, sector, baseline, deviation, samples, pid, tid, cgroup, comm, major, minor, size,
                  completed, cmd_flags, status, partial, disk) in zip(events, columns, strict=True):
            device = _text(disk) or f"{major}:{minor}"
            thresholds = self.thresholds(device)
            self.screens.learn(kernel_dev(major, minor), device, thresholds)
            if status == 0 and latency < thresholds.warning_ns:
                self.screened += 1
                continue
            data = {
                "pid": pid, "tid": tid, "comm": _text(comm), "cgroup_id": cgroup,
                "device": device, "dev_major": major, "dev_minor": minor,
                "operation": self.operations.name(cmd_flags), "cmd_flags": cmd_flags,
                "sector": sector, "bytes": size, "completed_bytes": completed, "partial": bool(partial),
                "latency_ns": latency,
                "baseline_latency_ns": baseline if samples else None,
                "baseline_deviation_ns": deviation if samples else None,
                "baseline_samples": samples,
            }
            if status != 0:
                anomalies.append(self.io_error(ts, status, data, row))
            else:
                anomalies.append(self.latency_spike(ts, thresholds, data, row))
        return anomalies

    def io_error(self, ts: int, code: int, data: dict[str, Any], row: np.void) -> Anomaly:
        status = block_status(code, self.statuses)
        data.update(status=status.name, status_code=code, errno=getattr(errno, status.errno, errno.EIO))
        message = (f"{data['operation']} of {data['bytes']} bytes at sector {data['sector']} on {data['device']} "
                   f"completed with {status.name} ({status.description})")
        return Anomaly(type=IO_ERROR, timestamp_ns=ts, severity="critical", outcome="failure", data=data,
                       error_code=status.errno, error_message=message, fingerprint=row.tobytes())

    def latency_spike(self, ts: int, thresholds: Thresholds, data: dict[str, Any], row: np.void) -> Anomaly:
        critical = data["latency_ns"] >= thresholds.critical_ns
        data.update(warning_threshold_ns=thresholds.warning_ns, critical_threshold_ns=thresholds.critical_ns,
                    threshold_rule=thresholds.rule or "default")
        return Anomaly(type=LATENCY_SPIKE, timestamp_ns=ts, severity="critical" if critical else "warning",
                       outcome="success", data=data, fingerprint=row.tobytes())


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")
