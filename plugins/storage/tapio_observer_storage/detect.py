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

from tapio_core import Anomaly, c_string, with_suppressed
from tapio_observer_storage.records import BlockStatus, Operations, block_status, block_status_of_errno
from tapio_observer_storage.settings import StorageSettings, Thresholds

log = logging.getLogger("tapio.storage")

IO_ERROR = "kernel.storage.io_error"
LATENCY_SPIKE = "kernel.storage.latency_spike"


class DeviceScreens:
    """Gives each device the kernel meets its own warning threshold, chosen by the device's name.

    ``table`` is the BPF map ``devices`` (None in a replay, where nothing is
    written), keyed by the device's request queue pointer. A device is matched
    again when the kernel says it judged it with the common screen (its entry
    was new, or evicted) or when its key now carries another name (a disk
    removed and another created at the same address).
    """

    def __init__(self, table: Any = None) -> None:
        self.table = table
        self.names: dict[int, str] = {}  # queue pointer -> disk name
        self._warned = False

    def learn(self, queue: int, name: str, thresholds: Thresholds, matched_in_kernel: bool) -> None:
        if matched_in_kernel and self.names.get(queue) == name:
            return
        if self.table is not None:
            key = self.table.Key(queue)
            # Keep the baselines the kernel learned: only the threshold is ours to set.
            state = self.table.get(key) or self.table.Leaf()
            state.warning_ns = thresholds.warning_ns
            try:
                self.table[key] = state
            except Exception as exc:  # e.g. BpfMapError: the map is full; the device keeps the common screen
                if not self._warned:
                    log.warning("storage: cannot give %s its own threshold (%s); it stays screened "
                                "at the lowest warning threshold", name, exc)
                self._warned = True
                return
        self.names[queue] = name


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

    def thresholds(self, device: str) -> Thresholds:
        found = self._thresholds.get(device)
        if found is None:
            found = self._thresholds[device] = self.settings.thresholds(device)
        return found

    def counters(self) -> dict[str, int]:
        return {
            "screened_in_userspace": self.screened,
            "devices_screened_in_kernel": len(self.screens.names),
        }

    def detect(self, events: np.ndarray) -> list[Anomaly]:
        if events.size == 0:
            return []
        task = events["task"]
        columns = zip(
            events["timestamp_ns"].tolist(), events["latency_ns"].tolist(), events["sector"].tolist(),
            events["baseline_ns"].tolist(), events["baseline_deviation_ns"].tolist(),
            events["baseline_samples"].tolist(), events["queue"].tolist(), task["pid"].tolist(), task["tid"].tolist(),
            task["cgroup_id"].tolist(), task["comm"].tolist(), events["dev_major"].tolist(),
            events["dev_minor"].tolist(), events["bytes"].tolist(), events["completed_bytes"].tolist(),
            events["cmd_flags"].tolist(), events["status"].tolist(), events["partial"].tolist(),
            events["device_matched"].tolist(), events["status_is_errno"].tolist(), events["disk_name"].tolist(),
            events["suppressed"].tolist(), strict=True,
        )
        anomalies = []
        for row, (ts, latency, sector, baseline, deviation, samples, queue, pid, tid, cgroup, comm, major, minor, size,
                  completed, cmd_flags, status, partial, matched, status_is_errno, disk,
                  suppressed) in zip(events, columns, strict=True):
            device = c_string(disk) or f"{major}:{minor}"
            thresholds = self.thresholds(device)
            self.screens.learn(queue, device, thresholds, bool(matched))
            if status == 0 and latency < thresholds.warning_ns:
                self.screened += 1
                continue
            data = {
                "pid": pid, "tid": tid, "comm": c_string(comm), "cgroup_id": cgroup,
                "device": device, "dev_major": major, "dev_minor": minor,
                "operation": self.operations.name(cmd_flags), "cmd_flags": cmd_flags,
                "sector": sector, "bytes": size, "completed_bytes": completed, "partial": bool(partial),
                "latency_ns": latency,
                "baseline_latency_ns": baseline if samples else None,
                "baseline_deviation_ns": deviation if samples else None,
                "baseline_samples": samples,
            }
            with_suppressed(data, suppressed)  # the kernel's rate limit, per device and kind
            if status != 0:
                anomalies.append(self.io_error(ts, status, bool(status_is_errno), data, row))
            else:
                anomalies.append(self.latency_spike(ts, thresholds, data, row))
        return anomalies

    def io_error(self, ts: int, code: int, is_errno: bool, data: dict[str, Any], row: np.void) -> Anomaly:
        if is_errno:  # the kernel handed over blk_status_to_errno()'s result: the status is what maps to it
            status_code, status = block_status_of_errno(code, self.statuses)
            data.update(status=status.name, status_code=status_code, errno=code)
        else:
            status = block_status(code, self.statuses)
            data.update(status=status.name, status_code=code, errno=getattr(errno, status.errno, errno.EIO))
        data["status_from_errno"] = is_errno
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


