"""The ``[pmc]`` settings table (documented in the plugin's README)."""

from __future__ import annotations

from typing import Any

import attrs
from attrs import validators as v

from tapio_observer_pmc.counters import PRESETS, SKIPPABLE


def _above_warning(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if value <= instance.stall_warning_pct:
        raise ValueError(
            f"'{attribute.name}' must be above stall_warning_pct ({instance.stall_warning_pct}): {value}"
        )


def _skippable(instance: Any, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    unknown = sorted(set(value) - set(SKIPPABLE))
    if unknown:
        raise ValueError(f"'{attribute.name}' must name only {', '.join(SKIPPABLE)}: {', '.join(unknown)}")


def _percent(default: float) -> Any:
    return attrs.field(default=default, converter=float, validator=[v.ge(0.0), v.le(100.0)])


@attrs.frozen
class PmcSettings:
    #: How often each CPU's counters are read (a cpu-clock timer per CPU).
    interval_ms: int = attrs.field(default=1000, validator=[v.instance_of(int), v.ge(10), v.le(60_000)])
    #: Backend-stall share of cycles above which an interval is under memory pressure.
    stall_warning_pct: float = _percent(50.0)
    #: ... and above which an episode is a CPU stall.
    stall_critical_pct: float = attrs.field(default=75.0, converter=float, validator=[v.le(100.0), _above_warning])
    #: IPC below this (and well below the CPU's own baseline) is degraded.
    ipc_threshold: float = attrs.field(default=1.0, converter=float, validator=v.gt(0.0))
    #: "Well below the baseline": at least this many percent below it.
    ipc_drop_pct: float = attrs.field(default=50.0, converter=float, validator=[v.gt(0.0), v.lt(100.0)])
    #: Healthy busy intervals a CPU needs before its IPC baseline is trusted.
    baseline_intervals: int = attrs.field(default=30, validator=[v.instance_of(int), v.ge(1)])
    #: Intervals with fewer cycles per ms than this are idle and not judged.
    min_cycles_per_ms: int = attrs.field(default=100_000, validator=[v.instance_of(int), v.ge(0)])
    #: Consecutive healthy intervals that end an episode.
    recovery_intervals: int = attrs.field(default=2, validator=[v.instance_of(int), v.ge(1)])
    #: An episode still going after this long is reported (in_progress) and a new one begins.
    max_episode_s: int = attrs.field(default=60, validator=[v.instance_of(int), v.ge(1)])
    #: Counters not to open, e.g. to leave a PMU slot to another tool; judged as missing.
    skip_counters: tuple[str, ...] = attrs.field(default=(), converter=tuple, validator=_skippable)
    #: "hardware"; "software" maps the counters to software events, for testing the plumbing only.
    counters: str = attrs.field(default="hardware", validator=v.in_(tuple(PRESETS)))
