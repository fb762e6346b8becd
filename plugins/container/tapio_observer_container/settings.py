"""The ``[container]`` settings table (documented in the plugin's README)."""

from __future__ import annotations

import signal
from typing import Any

import attrs
from attrs import validators as v

from tapio_core.config import list_of, rate_per_s, whole_count

#: The kernel keeps 15 bytes of a process name (TASK_COMM_LEN - 1).
COMM_MAX_BYTES = 15
#: Bound of the BPF hash the names are written to.
MAX_IGNORED_NAMES = 1024
CGROUP_MODES = ("auto", "v1", "v2")
#: Deaths that mean a crash, not a request to stop: SIGKILL only when not the OOM killer's (an oom_kill).
FATAL_SIGNALS = ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT", "SIGSYS", "SIGKILL")


def exit_code(item: Any) -> int:
    if isinstance(item, int) and not isinstance(item, bool) and 1 <= item <= 255:
        return item
    raise ValueError("exit codes 1..255 (0 is never reported)")


def signal_number(item: Any) -> int:
    """``"SIGTERM"``, ``"TERM"``, ``15`` or ``"15"`` -> 15."""
    text = str(item).strip().upper()
    if text.isdigit() and 1 <= int(text) <= signal.SIGRTMAX:
        return int(text)
    try:
        return int(signal.Signals[text if text.startswith("SIG") else "SIG" + text])
    except KeyError:
        raise ValueError(f"signals: SIGTERM, TERM or 1..{int(signal.SIGRTMAX)}") from None


def process_name(item: Any) -> str:
    if isinstance(item, str) and 1 <= len(item.encode()) <= COMM_MAX_BYTES:
        return item
    raise ValueError(f"process names of 1..{COMM_MAX_BYTES} bytes (the kernel keeps no more)")


# The lists are typed Any for cattrs, which would otherwise split a bare string into
# letters before our converter could refuse it; the converters produce the types below.
@attrs.frozen
class ContainerSettings:
    #: tuple[int, ...]: exit codes that are normal here; such exits are dropped in the kernel.
    ignore_exit_codes: Any = attrs.field(default=(), converter=list_of("ignore_exit_codes", exit_code))
    #: tuple[int, ...]: signals whose deaths are reported (names or numbers); SIGTERM, SIGINT, SIGPIPE
    #: and the like ask a process to stop, and are not, unless listed here.
    report_signals: Any = attrs.field(default=FATAL_SIGNALS, converter=list_of("report_signals", signal_number))
    #: tuple[int, ...]: signals whose deaths are normal here, even if report_signals lists them.
    ignore_signals: Any = attrs.field(default=(), converter=list_of("ignore_signals", signal_number))
    #: A non-zero exit is reported when the process is a container's main process (its PID namespace's
    #: init) or ran at least this long; shorter-lived ones (probes, scripts, `grep -q`) are counted per
    #: cgroup and carried on the cgroup's next occurrence. 0 reports every non-zero exit.
    min_runtime_s: float = attrs.field(default=10.0, converter=float, validator=[v.ge(0.0), v.le(86_400.0)])
    #: A container's main process exiting again within this long (restarted: a crash loop) is folded into
    #: the next occurrence of its pod cgroup and name, which counts it in crash_loop_exits.
    crash_loop_window_s: float = attrs.field(default=600.0, converter=float, validator=[v.ge(0.0), v.le(86_400.0)])
    #: Other abnormal exits: occurrences per cgroup and kind (signal, exit code) and second, on average...
    record_rate_per_s: float = rate_per_s(1.0)
    #: ... and at once after a quiet spell.
    record_burst: Any = whole_count(10)
    #: tuple[str, ...]: process names (the leader's comm, exact) whose abnormal exits are
    #: normal here. OOM kills are always reported.
    ignore_process_names: Any = attrs.field(
        default=(), converter=list_of("ignore_process_names", process_name, MAX_IGNORED_NAMES)
    )
    #: Which cgroup names the container: "auto" (v1 when the memory controller is on a
    #: v1 hierarchy, else v2), or forced.
    cgroup_mode: str = attrs.field(default="auto", validator=v.in_(CGROUP_MODES))
