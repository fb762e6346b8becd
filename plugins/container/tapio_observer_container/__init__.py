"""Tapio container observer: OOM kills and abnormal process exits, from the real kernel."""

from __future__ import annotations

import logging
from pathlib import Path

import attrs

from tapio_core import BpfCounter, BtfField, ObserverSpec, RawTracepointArg, TracepointField, hookimpl
from tapio_core.bpf import ObserverLoadError, write_struct
from tapio_core.config import token_bucket_ns
from tapio_observer_container.detect import container_anomalies
from tapio_observer_container.layout import (
    CGROUP_V1,
    MAIN_PROCESS,
    KernelLayout,
    detect_cgroup_mode,
    kernel_layout,
    oom_killer_range,
)
from tapio_observer_container.records import CONTAINER_RECORD
from tapio_observer_container.settings import ContainerSettings

log = logging.getLogger("tapio.container")

_CGROUP = "cgroup id and path"
_MEMORY = "memory limit and usage of OOM victims"
LAST_THREAD_FROM_TRACEPOINT = "the process's last thread from the tracepoint (found through signal_struct.live instead)"
_VICTIM_FROM_MARK = "the OOM victim's task from mark_victim"
_VICTIM_FROM_SIGKILL = "the OOM victim's task from the OOM killer's SIGKILL"
OBSERVER = ObserverSpec(
    name="container",
    bpf_source=Path(__file__).with_name("container.bpf.c"),
    record_dtype=CONTAINER_RECORD,
    tracepoints=("sched:sched_process_exit", "raw:mark_victim"),
    btf_fields=(
        BtfField("TAPIO_TASK_EXIT_CODE_OFFSET", "task_struct", "exit_code", feature="abnormal exits"),
        BtfField("TAPIO_TASK_SIGNAL_OFFSET", "task_struct", "signal",
                 feature="group exit status and oom_score_adj"),
        BtfField("TAPIO_SIGNAL_FLAGS_OFFSET", "signal_struct", "flags", feature="group exit status"),
        BtfField("TAPIO_SIGNAL_GROUP_EXIT_CODE_OFFSET", "signal_struct", "group_exit_code",
                 feature="group exit status"),
        BtfField("TAPIO_SIGNAL_LIVE_OFFSET", "signal_struct", "live",
                 feature="telling a process's last thread without the tracepoint's group_dead"),
        BtfField("TAPIO_SIGNAL_OOM_SCORE_ADJ_OFFSET", "signal_struct", "oom_score_adj",
                 feature="oom_score_adj of OOM victims"),
        BtfField("TAPIO_SIGNAL_OOM_MM_OFFSET", "signal_struct", "oom_mm",
                 feature="OOM victims' exits kept out of abnormal exits"),
        BtfField("TAPIO_TASK_GROUP_LEADER_OFFSET", "task_struct", "group_leader",
                 feature="process name (the leader's comm)"),
        BtfField("TAPIO_TASK_START_TIME_OFFSET", "task_struct", "start_time",
                 feature="telling an OOM victim's exit from a reused pid's"),
        BtfField("TAPIO_TASK_COMM_OFFSET", "task_struct", "comm", feature="process names"),
        BtfField("TAPIO_TASK_FLAGS_OFFSET", "task_struct", "flags",
                 feature="kernel threads left out of abnormal exits"),
        BtfField("TAPIO_TASK_TGID_OFFSET", "task_struct", "tgid", feature="OOM kills"),
        BtfField("TAPIO_TASK_PID_OFFSET", "task_struct", "pid", feature="OOM kills"),
        BtfField("TAPIO_TASK_MM_OFFSET", "task_struct", "mm", feature="RSS of OOM victims"),
        BtfField("TAPIO_TASK_CGROUPS_OFFSET", "task_struct", "cgroups", feature=_CGROUP),
        BtfField("TAPIO_CSS_SET_SUBSYS_OFFSET", "css_set", "subsys", feature="memory cgroup"),
        BtfField("TAPIO_CSS_SET_DFL_CGRP_OFFSET", "css_set", "dfl_cgrp", feature="cgroup on cgroup v2"),
        BtfField("TAPIO_CSS_CGROUP_OFFSET", "cgroup_subsys_state", "cgroup", feature="cgroup on cgroup v1"),
        BtfField("TAPIO_CGROUP_KN_OFFSET", "cgroup", "kn", feature=_CGROUP),
        BtfField("TAPIO_KERNFS_NODE_ID_OFFSET", "kernfs_node", "id", feature=_CGROUP),
        BtfField("TAPIO_KERNFS_NODE_NAME_OFFSET", "kernfs_node", "name", feature="cgroup path"),
        BtfField("TAPIO_MEMCG_CSS_OFFSET", "mem_cgroup", "css", feature=_MEMORY),
        BtfField("TAPIO_MEMCG_MAX_OFFSET", "mem_cgroup", "memory.max", feature=_MEMORY),
        BtfField("TAPIO_MEMCG_USAGE_OFFSET", "mem_cgroup", "memory.usage", feature=_MEMORY),
        BtfField("TAPIO_TASK_THREAD_PID_OFFSET", "task_struct", "thread_pid", feature=MAIN_PROCESS),
        BtfField("TAPIO_PID_LEVEL_OFFSET", "pid", "level", feature=MAIN_PROCESS),
        BtfField("TAPIO_PID_NUMBERS_OFFSET", "pid", "numbers", feature=MAIN_PROCESS),
    ),
    # Newer kernels mark a process's last thread in the tracepoint; older ones are asked signal_struct.live.
    tracepoint_fields=(TracepointField("TAPIO_EXIT_HAS_GROUP_DEAD", "sched:sched_process_exit", "group_dead",
                                       feature=LAST_THREAD_FROM_TRACEPOINT),),
    # Kernels before about 6.8 hand mark_victim the victim's pid, not its task: there the victim's task is the
    # target of the SIGKILL the OOM killer sends it just before. Either way the victim is read at its mark.
    raw_tracepoint_args=(RawTracepointArg("TAPIO_MARK_VICTIM_TASK", "mark_victim", 0, "struct task_struct *",
                                          feature=_VICTIM_FROM_MARK),
                         RawTracepointArg("TAPIO_SIGNAL_GENERATE_TASK", "signal_generate", 2, "struct task_struct *",
                                          feature=_VICTIM_FROM_SIGKILL)),
    required_features=((_VICTIM_FROM_MARK, _VICTIM_FROM_SIGKILL),),
    description="OOM kills with their memory cgroup and limit; abnormal process exits",
    config_type=ContainerSettings,
    bpf_counters=(BpfCounter("quiet_exits", "container_counts", 0), BpfCounter("suppressed", "container_counts", 1)),
)


@hookimpl
def tapio_register_observers(register):
    register(OBSERVER)


def bitmap(values: tuple[int, ...], words: int) -> list[int]:
    """Bit n of the words set for each n: the BPF side's ignore sets."""
    out = [0] * words
    for value in values:
        out[value >> 6] |= 1 << (value & 63)
    return out


def exit_policy(settings: ContainerSettings) -> dict[str, object]:
    """``struct exit_filter`` field by field, in the kernel's units."""
    reported = tuple(sorted(set(settings.report_signals) - set(settings.ignore_signals)))
    cost_ns, burst_ns = token_bucket_ns(settings.record_rate_per_s, settings.record_burst)
    return {
        "ignored_exit_codes": bitmap(settings.ignore_exit_codes, 4),
        "reported_signals": bitmap(reported, 2),
        "min_runtime_ns": round(settings.min_runtime_s * 1e9),
        "record_cost_ns": cost_ns,
        "record_burst_ns": burst_ns,
        "crash_loop_ns": round(settings.crash_loop_window_s * 1e9),
    }


def write_settings(bpf, layout: KernelLayout, settings: ContainerSettings) -> None:
    """Filters first, the layout (with ``configured``) last: the BPF side reports nothing before."""
    write_struct(bpf["exit_filter"], exit_policy(settings))
    names = bpf["ignored_process_names"]
    names.clear()
    for name in settings.ignore_process_names:
        key = names.Key()
        key.comm = name.encode()
        names[key] = names.Leaf(1)
    table = bpf["container_layout"]
    leaf = table.Leaf()
    for field, value in attrs.asdict(layout).items():
        setattr(leaf, field, value)
    leaf.configured = 1
    table[table.Key(0)] = leaf


@hookimpl
def tapio_observer_started(observer):
    settings = observer.config or ContainerSettings()
    btf = observer.btf  # parsed once by the agent; None without BTF (kernel_layout names what that disables)
    mode = detect_cgroup_mode(settings.cgroup_mode)
    layout, lost = kernel_layout(btf, mode, oom_killer=oom_killer_range())
    try:
        write_settings(observer.bpf, layout, settings)
    except (KeyError, TypeError, ValueError) as exc:  # a --ebpf-dir source without our maps
        raise ObserverLoadError(f"container: cannot write settings into the BPF maps: {exc}") from None
    if lost:
        observer.status_reason = "disabled: " + ", ".join(lost)
    log.info("container: containers named by their cgroup v%d %s", mode,
             "memory cgroup" if mode == CGROUP_V1 else "(unified) cgroup")


@hookimpl
def tapio_detect_anomalies(observer, events):
    return container_anomalies(events)
