"""Opening the per-CPU counters the BPF program reads, and the timer that makes it read them.

Each counter is probed with perf_event_open(2) on every online CPU before bcc
opens it for real: the probe learns the errno (ENOENT: this machine has no
such counter) without libbcc printing a line per failure on the agent's
stderr. A counter that cannot be opened leaves its perf array empty; the BPF
side then marks it missing in every record.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct

import attrs

from tapio_observer_pmc.records import COUNTERS

PERF_TYPE_HARDWARE, PERF_TYPE_SOFTWARE = 0, 1
PERF_COUNT_SW_CPU_CLOCK = 0


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
TABLES = {name: f"pmc_{name}".encode() for name in COUNTERS}
#: What perf_event_open answers when the hardware has no such counter.
NOT_ON_THIS_HARDWARE = {errno.ENOENT, errno.ENODEV, errno.EOPNOTSUPP}

_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "ppc64le": 319, "ppc64": 319, "s390x": 331}
_PERF_ATTR_SIZE_VER0 = 64
_PERF_FLAG_FD_CLOEXEC = 8
_libc = ctypes.CDLL(None, use_errno=True)


def probe(event: CounterEvent, cpu: int) -> int:
    """0 when ``event`` can be opened on ``cpu`` (system-wide), else the errno; opens nothing lasting."""
    number = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if number is None:
        return 0  # unknown syscall number: let bcc's own open decide
    attr = ctypes.create_string_buffer(_PERF_ATTR_SIZE_VER0)
    struct.pack_into("=IIQ", attr, 0, event.type, _PERF_ATTR_SIZE_VER0, event.config)
    fd = _libc.syscall(ctypes.c_long(number), attr, ctypes.c_int(-1), ctypes.c_int(cpu), ctypes.c_int(-1),
                       ctypes.c_ulong(_PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        return ctypes.get_errno()
    os.close(fd)
    return 0


def online_cpus() -> list[int]:
    from bcc.utils import get_online_cpus

    return list(get_online_cpus())


@attrs.define
class OpenedCounters:
    """What could be opened: counter name -> event, and counter name -> why not."""

    opened: dict[str, CounterEvent] = attrs.field(factory=dict)
    missing: dict[str, str] = attrs.field(factory=dict)
    #: The errno of the cycles counter when it could not be opened.
    cycles_errno: int = 0


def open_counters(bpf, preset: str, skip: tuple[str, ...], cpus: list[int]) -> OpenedCounters:
    """Open every counter of ``preset`` not in ``skip`` on ``cpus`` into the BPF perf arrays.

    A counter that fails on any CPU is left out everywhere, so each counter
    means the same on every CPU. bcc closes what it opened in ``bpf.cleanup()``.
    """
    result = OpenedCounters()
    for name in COUNTERS:
        event = PRESETS[preset][name]
        if name in skip:
            result.missing[name] = "skipped by skip_counters"
            continue
        failed = next(((cpu, code) for cpu in cpus if (code := probe(event, cpu))), None)
        if failed is not None:
            cpu, code = failed
            result.missing[name] = f"{event.name}: {os.strerror(code)} ({errno.errorcode.get(code, code)}, cpu {cpu})"
            if name == "cycles":
                result.cycles_errno = code
            continue
        try:
            bpf[TABLES[name]].open_perf_event(event.type, event.config)
        except Exception as exc:  # bcc raises bare Exception
            result.missing[name] = f"{event.name}: {exc}"
            continue
        result.opened[name] = event
    return result


def start_sampling(bpf, interval_ms: int) -> None:
    """Run ``pmc_sample`` on every online CPU once per ``interval_ms``, from a cpu-clock timer."""
    bpf.attach_perf_event(ev_type=PERF_TYPE_SOFTWARE, ev_config=PERF_COUNT_SW_CPU_CLOCK, fn_name=b"pmc_sample",
                          sample_period=interval_ms * 1_000_000, cpu=-1)
