"""Tapio pmc observer: per-CPU stalls, memory pressure and IPC degradation from hardware counters."""

from __future__ import annotations

import logging
from pathlib import Path

from tapio_core import ObserverSpec, hookimpl
from tapio_core.bpf import ObserverLoadError, ObserverUnsupported
from tapio_core.perf import online_cpus
from tapio_observer_pmc.counters import (
    NOT_ON_THIS_HARDWARE,
    PRESETS,
    describe_failure,
    open_counters,
    probe,
    start_sampling,
)
from tapio_observer_pmc.detect import Detector
from tapio_observer_pmc.records import PMC_RECORD
from tapio_observer_pmc.settings import PmcSettings

log = logging.getLogger("tapio.pmc")

#: Size of the perf arrays in pmc.bpf.c (PMC_MAX_CPUS).
MAX_CPUS = 1024

OBSERVER = ObserverSpec(
    name="pmc",
    type_prefix="kernel.node.",
    bpf_source=Path(__file__).with_name("pmc.bpf.c"),
    record_dtype=PMC_RECORD,
    tracepoints=(),  # a perf event program, attached in tapio_observer_started
    perf_event_programs=("pmc_sample",),
    config_type=PmcSettings,
    description="per-CPU stalls, memory pressure and IPC degradation from hardware counters",
)


@hookimpl
def tapio_register_observers(register):
    register(OBSERVER)


@hookimpl
def tapio_observer_preflight(observer):
    """No cycles counter on this hardware (most VMs): unsupported, and nothing is compiled."""
    settings = observer.config or PmcSettings()
    cycles, cpu = PRESETS[settings.counters]["cycles"], online_cpus()[0]
    code = probe(cycles, cpu)
    if code in NOT_ON_THIS_HARDWARE:
        observer.state["missing_counters"] = {"cycles": describe_failure(cycles, cpu, code)}
        raise ObserverUnsupported(f"pmc: unsupported: no hardware PMU ({describe_failure(cycles, cpu, code)})")


@hookimpl
def tapio_observer_started(observer):
    """Open the counters, decide supported / degraded / unsupported, start the per-CPU timer."""
    settings = observer.config
    cpus = online_cpus()
    if max(cpus) >= MAX_CPUS:
        raise ObserverLoadError(f"pmc: cpu {max(cpus)} is beyond the {MAX_CPUS} this build supports")
    counters = open_counters(observer.bpf, settings.counters, settings.skip_counters, cpus)
    observer.state["counters"] = {name: event.name for name, event in counters.opened.items()}
    observer.state["missing_counters"] = dict(counters.missing)
    if "cycles" not in counters.opened:
        if counters.cycles_errno in NOT_ON_THIS_HARDWARE:
            raise ObserverUnsupported(f"pmc: unsupported: no hardware PMU ({counters.missing['cycles']})")
        raise ObserverLoadError(f"pmc: cannot open the cycles counter: {counters.missing['cycles']}")
    if not {"instructions", "stall_cycles"} & counters.opened.keys():
        raise ObserverUnsupported(
            f"pmc: unsupported: only cycles can be counted here ({'; '.join(counters.missing.values())})")
    try:
        start_sampling(observer.bpf, cpus, settings.interval_ms)
    except OSError as exc:
        raise ObserverLoadError(f"pmc: cannot start the sampling timer: {exc}") from None
    if counters.missing:
        lost = []
        if "stall_cycles" in counters.missing:
            lost += ["cpu_stall", "memory_pressure"]
        if "instructions" in counters.missing:
            lost.append("ipc_degradation")
        observer.status_reason = "degraded: missing " + "; ".join(
            f"{name} ({why})" for name, why in counters.missing.items())
        log.warning("pmc: %s; %s not detected", observer.status_reason, " and ".join(lost))
    where = " (software events: for testing only)" if settings.counters != "hardware" else ""
    log.info("pmc: counting %s on %d CPUs every %d ms%s", ", ".join(observer.state["counters"].values()),
             len(cpus), settings.interval_ms, where)


@hookimpl
def tapio_detect_anomalies(observer, events):
    detector = observer.state.get("detector")
    if detector is None:
        detector = observer.state["detector"] = Detector(observer.config or PmcSettings())
    anomalies = detector.feed(events)
    observer.counters.update(detector.counts)
    return anomalies


@hookimpl
def tapio_observer_stopping(observer):
    """The agent stops (or a replay ends): episodes still open go out as in progress."""
    detector = observer.state.get("detector")
    return detector.still_open() if detector is not None else None
