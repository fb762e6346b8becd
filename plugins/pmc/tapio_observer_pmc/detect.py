"""Per-CPU counter readings -> intervals -> episodes -> anomalies.

Each record holds cumulative counter values; only the difference between two
consecutive readings of one CPU says what that CPU did in that interval.
Ratios over totals would hide a fresh degradation behind hours of healthy
history, so everything here is judged per interval.

An episode is a run of degraded intervals on one CPU. It opens on the first
degraded interval and ends after ``recovery_intervals`` healthy ones; it is
reported once, when it ends, with its start, end, duration and worst value.
The sampling timer does not fire on an idle CPU, so a CPU that stays quiet for
``recovery_intervals`` + 1 intervals while others report has recovered too.
An episode still going after ``max_episode_s`` is reported then (outcome
``in_progress``) and a new one begins, so a node stalled for an hour is not
silent for an hour. Stall and IPC episodes are separate: a CPU can be in both.

A stall episode opens above ``stall_warning_pct`` and is reported as
``kernel.node.cpu_stall`` when its worst interval went above
``stall_critical_pct``, else as ``kernel.node.memory_pressure``: one
occurrence per episode however its severity moved.

Detection depends only on the records and the settings, so ``tapio replay``
reproduces it: a counter missing from a record (not opened, or not running
during the interval) makes the intervals it touches unknown for what needs it.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np

from tapio_core import Anomaly
from tapio_observer_pmc.records import COUNTERS, CYCLES, INSTRUCTIONS, STALL_CYCLES

CPU_STALL = "kernel.node.cpu_stall"
MEMORY_PRESSURE = "kernel.node.memory_pressure"
IPC_DEGRADATION = "kernel.node.ipc_degradation"
STALL, IPC = "stall", "ipc"


@attrs.frozen
class Interval:
    """What one CPU did between two consecutive readings (counts scaled for multiplexing)."""

    cpu: int
    start_ns: int
    end_ns: int
    cycles: float
    instructions: float | None
    stall_cycles: float | None
    multiplexed: bool
    missing: tuple[str, ...]

    @property
    def ipc(self) -> float | None:
        return None if self.instructions is None else self.instructions / self.cycles

    @property
    def stall_pct(self) -> float | None:
        return None if self.stall_cycles is None else 100.0 * self.stall_cycles / self.cycles


def intervals(readings: np.ndarray) -> tuple[list[Interval], int]:
    """Intervals between consecutive readings of one CPU, in order; and how many were unusable.

    An interval is unusable when its cycles are missing or zero, or a counter
    went backwards (reopened): nothing can be said about it.
    """
    if readings.size < 2:
        return [], 0
    dt = np.diff(readings["timestamp_ns"].astype(np.int64))
    counts = np.diff(readings["counter"].astype(np.int64), axis=0).astype(np.float64)
    enabled = np.diff(readings["enabled"].astype(np.int64), axis=0)
    running = np.diff(readings["running"].astype(np.int64), axis=0)
    valid_bits = readings["valid"][1:] & readings["valid"][:-1]
    valid = ((valid_bits[:, None] >> np.arange(len(COUNTERS))) & 1).astype(bool) & (running > 0)
    # A multiplexed counter ran only part of the time it was enabled: scale it up.
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = np.where(valid, counts * np.where(running > 0, enabled / running, 0.0), 0.0)
    multiplexed = (valid & (running < enabled)).any(axis=1)
    usable = (dt > 0) & valid[:, CYCLES] & (scaled[:, CYCLES] > 0) & ~((counts < 0) & valid).any(axis=1)
    result = []
    starts, ends = readings["timestamp_ns"][:-1].tolist(), readings["timestamp_ns"][1:].tolist()
    cpu = int(readings["cpu"][0])
    for i in np.flatnonzero(usable).tolist():
        row_valid, row = valid[i], scaled[i]
        result.append(Interval(
            cpu=cpu, start_ns=starts[i], end_ns=ends[i], cycles=float(row[CYCLES]),
            instructions=float(row[INSTRUCTIONS]) if row_valid[INSTRUCTIONS] else None,
            stall_cycles=float(row[STALL_CYCLES]) if row_valid[STALL_CYCLES] else None,
            multiplexed=bool(multiplexed[i]),
            missing=tuple(name for name, ok in zip(COUNTERS, row_valid, strict=True) if not ok),
        ))
    return result, int(len(dt) - usable.sum())


@attrs.define
class IpcBaseline:
    """A CPU's usual IPC: the mean of its first ``warmup`` healthy busy intervals, then a moving average."""

    warmup: int
    samples: int = 0
    value: float = 0.0

    @property
    def ready(self) -> bool:
        return self.samples >= self.warmup

    def learn(self, ipc: float) -> None:
        self.samples += 1
        self.value += (ipc - self.value) / min(self.samples, self.warmup)


@attrs.define
class Episode:
    """A run of degraded intervals of one kind on one CPU."""

    kind: str
    cpu: int
    start_ns: int
    end_ns: int = 0
    worst: float = 0.0
    worst_at_ns: int = 0
    intervals: int = 0
    cycles: float = 0.0
    instructions: float | None = 0.0
    stall_cycles: float | None = 0.0
    multiplexed: bool = False
    missing: set[str] = attrs.field(factory=set)
    healthy_streak: int = 0
    baseline_ipc: float | None = None

    def add(self, interval: Interval, value: float) -> None:
        worse = value > self.worst if self.kind == STALL else value < self.worst
        if self.intervals == 0 or worse:
            self.worst, self.worst_at_ns = value, interval.end_ns
        self.intervals += 1
        self.end_ns = interval.end_ns
        self.cycles += interval.cycles
        self.instructions = _add(self.instructions, interval.instructions)
        self.stall_cycles = _add(self.stall_cycles, interval.stall_cycles)
        self.multiplexed |= interval.multiplexed
        self.missing.update(interval.missing)
        self.healthy_streak = 0


def _add(total: float | None, value: float | None) -> float | None:
    return None if total is None or value is None else total + value


@attrs.define
class CpuState:
    baseline: IpcBaseline
    last: np.ndarray | None = None  # the last reading, a 1-record array
    episodes: dict[str, Episode] = attrs.field(factory=dict)


@attrs.define
class Detector:
    """Per-CPU state across batches; lives in ``observer.state["detector"]``."""

    settings: Any
    cpus: dict[int, CpuState] = attrs.field(factory=dict)
    #: Counts for ``observer.counters`` (`tapio status`).
    counts: dict[str, int] = attrs.field(factory=lambda: dict.fromkeys(
        ("intervals", "idle_intervals", "unusable_intervals", "out_of_order_records", "episodes_open"), 0))

    def feed(self, events: np.ndarray) -> list[Anomaly]:
        """Judge one batch of readings (any CPUs, any order); anomalies for the episodes that were reported."""
        anomalies: list[Anomaly] = []
        if events.size == 0:
            return anomalies
        ordered = events[np.lexsort((events["timestamp_ns"], events["cpu"]))]
        cpu_ids, firsts = np.unique(ordered["cpu"], return_index=True)
        for cpu, rows in zip(cpu_ids.tolist(), np.split(ordered, firsts[1:]), strict=True):
            state = self.cpus.get(cpu)
            if state is None:
                state = self.cpus[cpu] = CpuState(IpcBaseline(self.settings.baseline_intervals))
            if state.last is not None:
                fresh = rows["timestamp_ns"] > state.last["timestamp_ns"][0]
                self.counts["out_of_order_records"] += int(rows.size - fresh.sum())
                rows = np.concatenate([state.last, rows[fresh]])
            state.last = rows[-1:].copy()
            found, unusable = intervals(rows)
            self.counts["unusable_intervals"] += unusable
            for interval in found:
                anomalies.extend(self.judge(state, interval))
        anomalies.extend(self.close_quiet(int(events["timestamp_ns"].max())))
        self.counts["episodes_open"] = sum(len(state.episodes) for state in self.cpus.values())
        anomalies.sort(key=lambda anomaly: anomaly.timestamp_ns)
        return anomalies

    def close_quiet(self, newest_ns: int) -> list[Anomaly]:
        """End the episodes of CPUs that went quiet: the sampling timer does not fire on an idle CPU."""
        quiet_ns = (self.settings.recovery_intervals + 1) * self.settings.interval_ms * 1_000_000
        anomalies = []
        for state in self.cpus.values():
            if state.episodes and newest_ns - int(state.last["timestamp_ns"][0]) >= quiet_ns:
                anomalies.extend(self.report(episode, ended=True) for episode in state.episodes.values())
                state.episodes.clear()
        return anomalies

    def still_open(self) -> list[Anomaly]:
        """Every episode not yet ended, reported as in progress: no more readings will come."""
        anomalies = [self.report(episode, ended=False)
                     for state in self.cpus.values() for episode in state.episodes.values()]
        for state in self.cpus.values():
            state.episodes.clear()
        self.counts["episodes_open"] = 0
        return anomalies

    def judge(self, state: CpuState, interval: Interval) -> list[Anomaly]:
        settings = self.settings
        self.counts["intervals"] += 1
        busy = interval.cycles >= settings.min_cycles_per_ms * (interval.end_ns - interval.start_ns) / 1e6
        if not busy:
            self.counts["idle_intervals"] += 1
        stall_pct, ipc = interval.stall_pct, interval.ipc
        # None: cannot be judged (counter missing, or no baseline yet).
        stall_bad = None if stall_pct is None else busy and stall_pct > settings.stall_warning_pct
        ipc_bad = None
        if ipc is not None and state.baseline.ready:
            ipc_bad = busy and ipc < settings.ipc_threshold and (
                ipc < state.baseline.value * (1 - settings.ipc_drop_pct / 100))
        anomalies = [a for a in (self.step(state, STALL, stall_bad, stall_pct, interval),
                                 self.step(state, IPC, ipc_bad, ipc, interval)) if a is not None]
        if busy and ipc is not None and not stall_bad and not ipc_bad and not state.episodes:
            state.baseline.learn(ipc)
        return anomalies

    def step(self, state: CpuState, kind: str, bad: bool | None, value: float | None,
             interval: Interval) -> Anomaly | None:
        episode = state.episodes.get(kind)
        if bad is None:
            return None
        if not bad:
            if episode is None:
                return None
            episode.healthy_streak += 1
            if episode.healthy_streak < self.settings.recovery_intervals:
                return None
            del state.episodes[kind]
            return self.report(episode, ended=True)
        if episode is None:
            baseline = state.baseline.value if state.baseline.ready else None
            episode = state.episodes[kind] = Episode(kind, interval.cpu, interval.start_ns, baseline_ipc=baseline)
        episode.add(interval, value)
        if episode.end_ns - episode.start_ns >= self.settings.max_episode_s * 1_000_000_000:
            del state.episodes[kind]
            return self.report(episode, ended=False)
        return None

    def report(self, episode: Episode, ended: bool) -> Anomaly:
        settings = self.settings
        data: dict[str, Any] = {
            "cpu": episode.cpu,
            "start_ns": episode.start_ns,
            "end_ns": episode.end_ns,
            "duration_ns": episode.end_ns - episode.start_ns,
            "ended": ended,
            "intervals": episode.intervals,
            "cycles": round(episode.cycles),
            "instructions": _round(episode.instructions, 0),
            "stall_cycles": _round(episode.stall_cycles, 0),
            "ipc": _round(None if episode.instructions is None else episode.instructions / episode.cycles, 3),
            "stall_pct": _round(None if episode.stall_cycles is None else
                                100.0 * episode.stall_cycles / episode.cycles, 3),
            "worst_at_ns": episode.worst_at_ns,
            "multiplexed": episode.multiplexed,
            "missing_counters": [name for name in COUNTERS if name in episode.missing],
        }
        if episode.kind == STALL:
            critical = episode.worst > settings.stall_critical_pct
            type_, severity = (CPU_STALL, "critical") if critical else (MEMORY_PRESSURE, "warning")
            data.update(worst_stall_pct=round(episode.worst, 3), stall_warning_pct=settings.stall_warning_pct,
                        stall_critical_pct=settings.stall_critical_pct)
        else:
            type_, severity = IPC_DEGRADATION, "warning"
            data.update(worst_ipc=round(episode.worst, 3), baseline_ipc=_round(episode.baseline_ipc, 3),
                        ipc_threshold=settings.ipc_threshold, ipc_drop_pct=settings.ipc_drop_pct)
        return Anomaly(
            type=type_, timestamp_ns=episode.start_ns, severity=severity,
            outcome="failure" if ended else "in_progress", data=data,
            fingerprint=f"{episode.cpu}:{episode.start_ns}:{episode.end_ns}".encode(),
        )


def _round(value: float | None, digits: int) -> float | int | None:
    if value is None:
        return None
    return round(value) if digits == 0 else round(value, digits)
