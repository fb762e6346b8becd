"""What an observer plugin declares, and what the agent hands back to its hooks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import numpy as np

from tapio_core.config import DEFAULT_RING_PAGES

#: Mirrors ``struct tapio_task`` in ``ebpf/tapio.h``: who did it, captured in
#: the task's own context (never the softirq's current task).
TASK_DTYPE = np.dtype(
    [("pid", "<u4"), ("tid", "<u4"), ("cgroup_id", "<u8"), ("comm", "S16")],
    align=True,
)


def record_dtype(fields: list[tuple[str, Any]]) -> np.dtype:
    """A numpy dtype laid out exactly like the C struct with the same fields.

    ``align=True`` applies C's natural alignment, so a plugin declares its
    record once in C and once here, in the same order, and a test can check
    one against the other.
    """
    return np.dtype(fields, align=True)


def with_suppressed(data: dict[str, Any], suppressed: int) -> dict[str, Any]:
    """``data`` with ``suppressed`` set only when a kernel rate limit held back records of the same key
    (a destination, a device) since the previous one: the field observers share for it."""
    if suppressed:
        data["suppressed"] = suppressed
    return data


def c_string(raw: bytes) -> str:
    """A fixed-size C char array from a record (a comm, a device name): up to its NUL, never failing on bad bytes."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


@attrs.frozen
class BtfField:
    """A kernel struct member the BPF source reads at a BTF-resolved offset.

    The agent looks ``struct``.``path`` up in ``/sys/kernel/btf/vmlinux`` and
    compiles with ``-D<macro>=<offset>``; when the member does not exist on the
    running kernel the macro stays undefined, the C code's ``#ifdef`` path is
    taken and the agent logs that ``feature`` is unavailable.
    """

    macro: str
    struct: str
    path: str
    feature: str


@attrs.frozen
class TracepointField:
    """A tracepoint argument the BPF source reads only where this kernel's tracepoint carries it.

    bcc builds a ``TRACEPOINT_PROBE``'s ``args`` from the tracepoint's tracefs
    format, so naming a field an older kernel lacks fails the whole compile. The
    agent compiles with ``-D<macro>=1`` where ``tracepoint`` (``category:name``)
    has ``field``; elsewhere the macro stays undefined, the C code's ``#ifdef``
    path is taken and the agent logs that ``feature`` is unavailable.
    """

    macro: str
    tracepoint: str
    field: str
    feature: str


@attrs.frozen
class OptionalTracepoint:
    """A tracepoint only one feature needs: where this kernel lacks it, that feature alone is off.

    The agent compiles with ``-D<macro>=1`` where tracefs has ``tracepoint``
    (``category:name``); the C code puts its ``TRACEPOINT_PROBE`` behind
    ``#ifdef <macro>``. Tracepoints in ``ObserverSpec.tracepoints`` are required:
    without one the observer does not start.
    """

    macro: str
    tracepoint: str
    feature: str


@attrs.frozen
class RawTracepointArg:
    """A raw tracepoint argument whose type changed between kernels (``int pid`` became a task pointer).

    The agent reads the tracepoint's prototype (``btf_trace_<name>``) from the running kernel's BTF
    and compiles with ``-D<macro>=1`` where argument ``index`` has type ``c_type`` (e.g.
    ``"struct task_struct *"``); elsewhere the C code's ``#ifndef`` path runs and the agent logs that
    ``feature`` is unavailable.
    """

    macro: str
    tracepoint: str
    index: int
    c_type: str
    feature: str


@attrs.frozen
class BpfCounter:
    """A count the BPF side keeps (an array map slot, per-CPU or not) that `tapio status` should show.

    The agent sums ``map[index]`` over CPUs every second into
    ``observer.counters[name]``: e.g. requests completed without a seen issue.
    """

    name: str
    map: str
    index: int = 0


@attrs.frozen
class ObserverSpec:
    """An observer as a plugin declares it in ``tapio_register_observers``."""

    name: str
    bpf_source: Path
    record_dtype: np.dtype
    tracepoints: tuple[str, ...]
    btf_fields: tuple[BtfField, ...] = ()
    tracepoint_fields: tuple[TracepointField, ...] = ()
    raw_tracepoint_args: tuple[RawTracepointArg, ...] = ()
    optional_tracepoints: tuple[OptionalTracepoint, ...] = ()
    #: Features (named by the declarations above) without which the observer cannot run: where this
    #: kernel lacks one, the agent does not start the observer and ``tapio doctor`` says so. A tuple
    #: entry is a choice: any one of its features will do (e.g. two kernels' layouts of one fact).
    required_features: tuple[str | tuple[str, ...], ...] = ()
    ring_buffer: str = "events"
    lost_counter: str | None = "tapio_lost"
    description: str = ""
    #: An attrs class with defaults and validators, built from the config
    #: file's table named after the observer (``[network]``); None: no settings.
    config_type: type | None = None
    #: Extra compiler flags for the BPF source, e.g. ``("-DMAX_CPUS=64",)``.
    cflags: tuple[str, ...] = ()
    #: What its occurrence types start with, when not ``kernel.<name>.``.
    type_prefix: str | None = None
    bpf_counters: tuple[BpfCounter, ...] = ()
    #: BPF functions the observer attaches itself to perf events in ``tapio_observer_started`` (e.g. a
    #: sampling timer): loaded, not attached, each handed over as ``observer.bpf.programs[name]``.
    perf_event_programs: tuple[str, ...] = ()


@attrs.define(eq=False)
class RunningObserver:
    """One observer while the agent (or a replay) runs it; passed to its hooks.

    ``state`` belongs to the observer's plugin for detection state kept across
    batches; ``bpf`` is the loaded program (a :class:`tapio_core.bpf_objects.LoadedProgram`: maps and
    programs by file descriptor; None in replay); ``config`` is
    an instance of ``spec.config_type`` holding the user's settings.
    """

    spec: ObserverSpec
    config: Any = None
    state: dict[str, Any] = attrs.field(factory=dict)
    bpf: Any = None
    #: The running kernel's BTF (tapio_core.btf.Btf), already parsed, during ``tapio_observer_started`` only
    #: (the agent lets go of it afterwards: it is large); None in replay.
    btf: Any = None
    plugin_name: str = ""
    #: Pages of its ring buffer (the ``ring_pages`` key of its table; a power of two).
    ring_pages: int = DEFAULT_RING_PAGES
    status: str = "starting"
    status_reason: str = ""
    #: Features this kernel lacks, each with why (from tapio_core.bpf.kernel_fit); the observer runs without them.
    disabled: dict[str, str] = attrs.field(factory=dict)
    records: int = 0
    anomalies: int = 0
    #: Anomalies by occurrence type (``/metrics`` shows them).
    anomalies_by_type: dict[str, int] = attrs.field(factory=dict)
    lost: int = 0
    malformed: int = 0
    #: Batches dropped because its parse or detect hook raised (``Pipeline.plugin_errors`` has which).
    dropped_batches: int = 0
    #: The plugin's own counts (suppressed, unmatched, ...); `tapio status` shows them.
    counters: dict[str, int] = attrs.field(factory=dict)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def type_prefix(self) -> str:
        return self.spec.type_prefix or f"kernel.{self.spec.name}."


@attrs.define(slots=True)
class Anomaly:
    """What a detector found: kernel facts, no interpretation.

    ``timestamp_ns`` is the kernel's monotonic clock (``bpf_ktime_get_ns``); the
    agent turns it into wall-clock time. ``type`` is the full occurrence type,
    e.g. ``kernel.network.connection_refused``. ``fingerprint`` names this
    anomaly uniquely and stably -- usually the raw record it came from; the
    occurrence id derives from it (without one, from the type, time and data).
    """

    type: str
    timestamp_ns: int
    severity: str
    outcome: str
    data: dict[str, Any]
    error_code: str | None = None
    error_message: str | None = None
    fingerprint: bytes | None = None
