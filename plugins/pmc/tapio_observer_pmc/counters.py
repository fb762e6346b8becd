"""Opening the per-CPU counters the BPF program reads, and the timer that makes it read them.

Each counter is opened with perf_event_open(2) on every online CPU and its
descriptors put in the counter's BPF perf array; the kernel's errno tells a
missing counter (ENOENT: no such hardware) from a refusal. A counter that
cannot be opened on every CPU leaves its perf array empty; the BPF side then
marks it missing in every record.
"""

from __future__ import annotations

import errno
import os

import attrs

from tapio_core.bpf_objects import LoadedProgram
from tapio_core.perf import PERF_TYPE_HARDWARE, PERF_TYPE_SOFTWARE, perf_event_open, start_clock
from tapio_observer_pmc.records import COUNTERS


@attrs.frozen
class CounterEvent:
    """A perf event as perf(1) names it, and its (type, config) for perf_event_open."""

    name: str
    type: int
    config: int


#: Which perf event stands for each counter. "software" exists so the whole
#: path (open, read in BPF, deltas, classification) runs on machines without a
#: PMU, e.g. in tests: its ratios mean nothing about the CPU.
PRESETS: dict[str, dict[str, CounterEvent]] = {
    "hardware": {
        "cycles": CounterEvent("cpu-cycles", PERF_TYPE_HARDWARE, 0),
        "instructions": CounterEvent("instructions", PERF_TYPE_HARDWARE, 1),
        "stall_cycles": CounterEvent("stalled-cycles-backend", PERF_TYPE_HARDWARE, 8),
    },
    "software": {
        "cycles": CounterEvent("cpu-clock", PERF_TYPE_SOFTWARE, 0),
        "instructions": CounterEvent("task-clock", PERF_TYPE_SOFTWARE, 1),
        "stall_cycles": CounterEvent("page-faults", PERF_TYPE_SOFTWARE, 2),
    },
}
#: Without cycles no ratio exists, so only these may be skipped.
SKIPPABLE = ("instructions", "stall_cycles")
#: The BPF perf array holding each counter (pmc.bpf.c).
TABLES = {name: f"pmc_{name}" for name in COUNTERS}
#: What perf_event_open answers when the hardware has no such counter.
NOT_ON_THIS_HARDWARE = {errno.ENOENT, errno.ENODEV, errno.EOPNOTSUPP}

def probe(event: CounterEvent, cpu: int) -> int:
    """0 when ``event`` can be opened on ``cpu`` (system-wide), else the errno; opens nothing lasting."""
    try:
        os.close(perf_event_open(event.type, event.config, cpu))
    except OSError as exc:
        return exc.errno or errno.EINVAL
    return 0


def describe_failure(event: CounterEvent, cpu: int, code: int) -> str:
    """Why ``event`` could not be opened on ``cpu``, as status and logs say it."""
    return f"{event.name}: {os.strerror(code)} ({errno.errorcode.get(code, code)}, cpu {cpu})"


@attrs.define
class OpenedCounters:
    """What could be opened: counter name -> event, and counter name -> why not."""

    opened: dict[str, CounterEvent] = attrs.field(factory=dict)
    missing: dict[str, str] = attrs.field(factory=dict)
    #: The errno of the cycles counter when it could not be opened.
    cycles_errno: int = 0


def open_counters(program: LoadedProgram, preset: str, skip: tuple[str, ...], cpus: list[int]) -> OpenedCounters:
    """Open every counter of ``preset`` not in ``skip`` on ``cpus`` into the BPF perf arrays.

    A counter that fails on any CPU is left out everywhere, so each counter
    means the same on every CPU. The events are ``program``'s to close.
    """
    result = OpenedCounters()
    for name in COUNTERS:
        event = PRESETS[preset][name]
        if name in skip:
            result.missing[name] = "skipped by skip_counters"
            continue
        fds: list[int] = []
        try:
            for cpu in cpus:
                try:
                    fds.append(perf_event_open(event.type, event.config, cpu))
                except OSError as exc:
                    code = exc.errno or errno.EINVAL
                    result.missing[name] = describe_failure(event, cpu, code)
                    if name == "cycles":
                        result.cycles_errno = code
                    break
            else:
                table = program[TABLES[name]]
                for cpu, fd in zip(cpus, fds, strict=False):
                    table[cpu] = fd
                result.opened[name] = event
        except OSError as exc:  # the perf array refused an event
            result.missing[name] = f"{event.name}: {exc}"
        if name in result.opened:
            program.owned.extend(fds)
        else:
            for fd in fds:
                os.close(fd)
    return result


def start_sampling(program: LoadedProgram, cpus: list[int], interval_ms: int) -> None:
    """Run ``pmc_sample`` on each of ``cpus`` once per ``interval_ms``, from a cpu-clock timer."""
    start_clock(program, "pmc_sample", cpus, interval_ms * 1_000_000)
