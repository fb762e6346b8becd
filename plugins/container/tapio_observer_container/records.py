"""The container observer's ring-buffer record, as ``struct container_record`` in container.bpf.c lays it out."""

from tapio_core import record_dtype
from tapio_core.observer import TASK_DTYPE

KIND_ABNORMAL_EXIT = 1
KIND_OOM_KILL = 2

# Which facts the kernel gave; a fact whose flag is clear is reported as null.
FLAG_CGROUP = 1 << 0          # task.cgroup_id and cgroup_path
FLAG_MEMORY = 1 << 1          # memory_usage_bytes (and the limit, if FLAG_LIMITED)
FLAG_LIMITED = 1 << 2         # the memory cgroup has a limit (memory.max is not "max")
FLAG_RSS = 1 << 3             # the *_rss_bytes counters
FLAG_OOM_SCORE_ADJ = 1 << 4
FLAG_PATH_TRUNCATED = 1 << 5  # cgroup_path lost components (too deep or too long)
FLAG_TRIGGER = 1 << 6         # trigger_pid and trigger_comm (an OOM kill's mark was seen)
FLAG_MAIN_PROCESS = 1 << 7    # the process was its PID namespace's init: a container's main process

CGROUP_PATH_LEN = 256

CONTAINER_RECORD = record_dtype([
    ("timestamp_ns", "<u8"),
    ("task", TASK_DTYPE),
    ("memory_limit_bytes", "<u8"),
    ("memory_usage_bytes", "<u8"),
    ("file_rss_bytes", "<u8"),
    ("anon_rss_bytes", "<u8"),
    ("shmem_rss_bytes", "<u8"),
    ("kind", "<u4"),
    ("exit_status", "<u4"),
    ("trigger_pid", "<u4"),
    ("oom_score_adj", "<i2"),
    ("flags", "u1"),
    ("cgroup_mode", "u1"),
    ("trigger_comm", "S16"),
    ("cgroup_path", f"S{CGROUP_PATH_LEN}"),
    ("runtime_ns", "<u8"),
    ("suppressed", "<u4"),  # this cgroup's exits of this kind the rate limit held back since its last
    ("crash_loop_exits", "<u4"),  # main process: its earlier exits folded into this record
    ("quiet_exits", "<u4"),  # short-lived non-zero exits in the cgroup since its last record
    ("reserved", "<u4"),
])
