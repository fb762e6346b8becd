"""Packing container records the way the kernel does, for replay-style tests."""

import struct

from tapio_observer_container.records import (
    FLAG_CGROUP,
    FLAG_LIMITED,
    FLAG_MEMORY,
    FLAG_OOM_SCORE_ADJ,
    FLAG_RSS,
    FLAG_TRIGGER,
    KIND_ABNORMAL_EXIT,
    KIND_OOM_KILL,
)

# struct container_record in container.bpf.c, in native C layout ('@' applies C alignment).
CONTAINER_RECORD_C = struct.Struct("@Q" "IIQ16s" "QQQQQ" "IIIhBB" "16s256s" "QIIII")

ALL_OOM_FACTS = FLAG_CGROUP | FLAG_MEMORY | FLAG_LIMITED | FLAG_RSS | FLAG_OOM_SCORE_ADJ | FLAG_TRIGGER


def pack_container_record(kind, *, ts=1_000, pid=4242, tid=4243, cgroup=99, comm=b"app", limit=0, usage=0,
                          file_rss=0, anon_rss=0, shmem_rss=0, status=0, trigger_pid=0, oom_score_adj=0,
                          flags=FLAG_CGROUP, cgroup_mode=1, trigger_comm=b"", path=b"/kubepods/pod1/app",
                          runtime_ns=0, suppressed=0, crash_loop_exits=0, quiet_exits=0):
    return CONTAINER_RECORD_C.pack(ts, pid, tid, cgroup, comm, limit, usage, file_rss, anon_rss, shmem_rss,
                                   kind, status, trigger_pid, oom_score_adj, flags, cgroup_mode, trigger_comm, path,
                                   runtime_ns, suppressed, crash_loop_exits, quiet_exits, 0)


def pack_exit(status, **fields):
    return pack_container_record(KIND_ABNORMAL_EXIT, status=status, **fields)


def pack_oom(**fields):
    fields.setdefault("flags", ALL_OOM_FACTS)
    return pack_container_record(KIND_OOM_KILL, **fields)
