"""Turning container records into anomalies.

The kernel sends only what is abnormal (one record per OOM victim, one per
abnormal process exit, nothing for the rest), so detection is classification:
pick the rows of each kind and name the facts. A fact the kernel could not give
(its flag is clear) is null, never a made-up zero.
"""

from __future__ import annotations

import signal
from typing import Any

import numpy as np

from tapio_core import Anomaly, c_string, with_suppressed
from tapio_observer_container.records import (
    FLAG_CGROUP,
    FLAG_LIMITED,
    FLAG_MAIN_PROCESS,
    FLAG_MEMORY,
    FLAG_OOM_SCORE_ADJ,
    FLAG_PATH_TRUNCATED,
    FLAG_RSS,
    FLAG_TRIGGER,
    KIND_ABNORMAL_EXIT,
    KIND_OOM_KILL,
)

ABNORMAL_EXIT = "kernel.container.abnormal_exit"
OOM_KILL = "kernel.container.oom_kill"
CORE_DUMPED = 0x80


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN < number < signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return f"SIG{number}"




def process_facts(row: np.void) -> dict[str, Any]:
    """Who: the process and the cgroup that names its container."""
    task, flags = row["task"], int(row["flags"])
    has_cgroup = bool(flags & FLAG_CGROUP)
    return {
        "pid": int(task["pid"]),
        "tid": int(task["tid"]),
        "comm": c_string(task["comm"]),
        "cgroup_id": int(task["cgroup_id"]) if has_cgroup else None,
        "cgroup_path": (c_string(row["cgroup_path"]) or None) if has_cgroup else None,
        "cgroup_path_truncated": bool(flags & FLAG_PATH_TRUNCATED),
        "cgroup_version": int(row["cgroup_mode"]) if has_cgroup else None,
    }


def abnormal_exit(row: np.void) -> Anomaly:
    """``suppressed``: this cgroup's exits of the kind the rate limit held back before it; ``crash_loop_exits``
    (a container's main process): its earlier exits within the crash-loop window, folded into this one;
    ``quiet_exits``: short-lived non-zero exits in the cgroup since its previous occurrence."""
    status = int(row["exit_status"])
    number = status & 0x7F
    facts = process_facts(row)
    runtime_ns = int(row["runtime_ns"])
    facts.update(
        exit_status=status,
        exit_code=None if number else status >> 8 & 0xFF,
        signal=number or None,
        core_dumped=bool(status & CORE_DUMPED),
        main_process=bool(int(row["flags"]) & FLAG_MAIN_PROCESS),
        runtime_ms=runtime_ns // 1_000_000 if runtime_ns else None,
        crash_loop_exits=int(row["crash_loop_exits"]),
        quiet_exits=int(row["quiet_exits"]),
    )
    with_suppressed(facts, int(row["suppressed"]))
    if number:
        name = signal_name(number)
        dumped = " (core dumped)" if status & CORE_DUMPED else ""
        return Anomaly(type=ABNORMAL_EXIT, timestamp_ns=int(row["timestamp_ns"]), severity="error",
                       outcome="failure", data=facts, error_code=name, error_message=f"killed by {name}{dumped}",
                       fingerprint=row.tobytes())
    return Anomaly(type=ABNORMAL_EXIT, timestamp_ns=int(row["timestamp_ns"]), severity="warning", outcome="failure",
                   data=facts, error_code="NONZERO_EXIT", error_message=f"exited with code {facts['exit_code']}",
                   fingerprint=row.tobytes())


def oom_kill(row: np.void) -> Anomaly:
    flags = int(row["flags"])
    has_rss = bool(flags & FLAG_RSS)
    rss = {name: int(row[name]) if has_rss else None
           for name in ("anon_rss_bytes", "file_rss_bytes", "shmem_rss_bytes")}
    facts = process_facts(row)
    facts.update(
        memory_limit_bytes=int(row["memory_limit_bytes"]) if flags & FLAG_LIMITED else None,
        memory_usage_bytes=int(row["memory_usage_bytes"]) if flags & FLAG_MEMORY else None,
        rss_bytes=sum(rss.values()) if has_rss else None,
        **rss,
        oom_score_adj=int(row["oom_score_adj"]) if flags & FLAG_OOM_SCORE_ADJ else None,
        trigger_pid=int(row["trigger_pid"]) if flags & FLAG_TRIGGER else None,
        trigger_comm=c_string(row["trigger_comm"]) if flags & FLAG_TRIGGER else None,
    )
    return Anomaly(type=OOM_KILL, timestamp_ns=int(row["timestamp_ns"]), severity="critical", outcome="failure",
                   data=facts, error_code="OOM_KILLED", error_message="killed by the kernel's OOM killer",
                   fingerprint=row.tobytes())


BUILDERS = {KIND_ABNORMAL_EXIT: abnormal_exit, KIND_OOM_KILL: oom_kill}


def container_anomalies(events: np.ndarray) -> list[Anomaly]:
    """One anomaly per record of a known kind, in kernel time order."""
    known = events[np.isin(events["kind"], list(BUILDERS))]
    anomalies = [BUILDERS[int(row["kind"])](row) for row in known]
    anomalies.sort(key=lambda anomaly: anomaly.timestamp_ns)
    return anomalies
