"""Kernel facts the BPF side reads from its ``container_layout`` map.

Most struct offsets reach the BPF program as ``-D`` macros from the
``BtfField``s in the ObserverSpec. These cannot: an enum value
(``memory_cgrp_id``), a member renamed across kernels (``kernfs_node.parent``
became ``__parent`` in 6.15), offsets inside an array whose stride depends on
the kernel's config (``mm_struct.rss_stat``), and which cgroup hierarchy the
memory controller lives on. They are worked out here from BTF and written into
the map when the observer starts. -1 means "this kernel lacks it": only the
feature that needs it is lost.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import attrs

from tapio_core.btf import Btf

log = logging.getLogger("tapio.container")

CGROUP_V1, CGROUP_V2 = 1, 2
UNKNOWN = -1
#: include/linux/page_counter.h: a memory.max of "max" is LONG_MAX / PAGE_SIZE pages.
LONG_MAX = (1 << 63) - 1
#: The function every OOM kill runs in; its SIGKILLs are the OOM killer's.
OOM_KILLER = "out_of_memory"
#: Needs OOM_KILLER's place in kernel text (kallsyms): without it, an OOM victim's exit that comes before its mark
#: (possible from 6.16) is reported as an abnormal exit too.
OOM_KILLER_SIGKILL = "an OOM victim's exit told by the OOM killer's SIGKILL"
#: Needs struct upid's size: without it, no exit is known as a container's main process's.
MAIN_PROCESS = "container main processes (their PID namespace's init) told apart"


@attrs.frozen
class KernelLayout:
    """Mirrors ``struct kernel_layout`` in container.bpf.c (same names, same order)."""

    page_size: int
    unlimited_pages: int
    memory_cgrp_id: int
    kn_parent_offset: int
    rss_file_offset: int
    rss_anon_offset: int
    rss_shmem_offset: int
    oom_killer_start: int
    oom_killer_end: int
    upid_size: int
    cgroup_mode: int


def memory_controller_version(proc_cgroups: str) -> int:
    """CGROUP_V1 when /proc/cgroups puts the memory controller on a v1 hierarchy, else CGROUP_V2.

    Hierarchy 0 means the unified (v2) hierarchy; a controller bound to a v1
    mount has that mount's hierarchy id.
    """
    for line in proc_cgroups.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == "memory":
            return CGROUP_V1 if fields[1] != "0" and fields[3] == "1" else CGROUP_V2
    return CGROUP_V2


def detect_cgroup_mode(setting: str, proc_cgroups: Path = Path("/proc/cgroups")) -> int:
    if setting == "v1":
        return CGROUP_V1
    if setting == "v2":
        return CGROUP_V2
    try:
        return memory_controller_version(proc_cgroups.read_text())
    except OSError:
        return CGROUP_V2  # kernels without v1 support may lack /proc/cgroups


def rss_counter_offsets(btf: Btf) -> tuple[int, int, int] | None:
    """Offsets in mm_struct of the file, anon and shmem RSS counters, as get_mm_counter() reads them."""
    base = btf.field_offset("mm_struct", "rss_stat")
    members = [btf.enum_value("", name) for name in ("MM_FILEPAGES", "MM_ANONPAGES", "MM_SHMEMPAGES")]
    if base is None or None in members:
        return None
    legacy = btf.field_offset("mm_struct", "rss_stat.count")
    if legacy is not None:  # before 6.2: struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; }
        return tuple(legacy + 8 * index for index in members)
    # 6.2 on: struct percpu_counter rss_stat[NR_MM_COUNTERS]; the shared part is .count
    count = btf.field_offset("percpu_counter", "count")
    size = btf.field_size("mm_struct", "rss_stat")
    counters = btf.enum_value("", "NR_MM_COUNTERS")
    if count is None or not size or not counters:
        return None
    stride = size // counters
    return tuple(base + stride * index + count for index in members)


def struct_upid_size(btf: Btf) -> int | None:
    """The stride of ``struct pid``'s ``numbers[]``: a pid's number in each namespace level (nr, then ns, the last
    member, so the struct ends with it)."""
    nr, ns, ns_size = (btf.field_offset("upid", "nr"), btf.field_offset("upid", "ns"), btf.field_size("upid", "ns"))
    if nr != 0 or ns is None or not ns_size:
        return None
    return ns + ns_size


def function_range(kallsyms: str, name: str) -> tuple[int, int]:
    """[start, end) of kernel function ``name`` in /proc/kallsyms' text (sorted by address: a function ends where
    the next symbol starts); (0, 0) when it is not there or its address is hidden (kptr_restrict)."""
    found = re.search(rf"^([0-9a-f]+) [tT] {re.escape(name)}\n([0-9a-f]+) ", kallsyms, re.MULTILINE)
    if not found:
        return 0, 0
    start, end = int(found[1], 16), int(found[2], 16)
    return (start, end) if 0 < start < end else (0, 0)


def oom_killer_range(kallsyms: Path = Path("/proc/kallsyms")) -> tuple[int, int]:
    try:
        return function_range(kallsyms.read_text(), OOM_KILLER)
    except OSError:
        return 0, 0


def kernel_layout(btf: Btf | None, cgroup_mode: int, page_size: int | None = None,
                  oom_killer: tuple[int, int] = (0, 0)) -> tuple[KernelLayout, list[str]]:
    """What this kernel's BTF (and ``oom_killer``, where kallsyms puts OOM_KILLER) says, and the features lost to
    what it lacks."""
    page_size = page_size or os.sysconf("SC_PAGE_SIZE")
    memory_cgrp_id = kn_parent = rss = upid_size = None
    if btf is not None:
        upid_size = struct_upid_size(btf)
        memory_cgrp_id = btf.enum_value("cgroup_subsys_id", "memory_cgrp_id")
        kn_parent = btf.field_offset("kernfs_node", "__parent")
        if kn_parent is None:
            kn_parent = btf.field_offset("kernfs_node", "parent")  # before 6.15
        rss = rss_counter_offsets(btf)
    lost = []
    if memory_cgrp_id is None:
        lost.append("memory limit and usage" + (" and the v1 memory cgroup" if cgroup_mode == CGROUP_V1 else ""))
    if kn_parent is None:
        lost.append("cgroup paths")
    if rss is None:
        lost.append("RSS of OOM victims")
    if upid_size is None:
        lost.append(MAIN_PROCESS)
    if not oom_killer[0]:
        lost.append(OOM_KILLER_SIGKILL)
    for feature in lost:
        log.warning("container: kernel BTF lacks what %s needs; %s disabled", feature, feature)
    rss = rss or (UNKNOWN, UNKNOWN, UNKNOWN)
    layout = KernelLayout(
        page_size=page_size,
        unlimited_pages=LONG_MAX // page_size,
        memory_cgrp_id=UNKNOWN if memory_cgrp_id is None else memory_cgrp_id,
        kn_parent_offset=UNKNOWN if kn_parent is None else kn_parent,
        rss_file_offset=rss[0],
        rss_anon_offset=rss[1],
        rss_shmem_offset=rss[2],
        oom_killer_start=oom_killer[0],
        oom_killer_end=oom_killer[1],
        upid_size=UNKNOWN if upid_size is None else upid_size,
        cgroup_mode=cgroup_mode,
    )
    return layout, lost
