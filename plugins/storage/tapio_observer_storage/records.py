"""The storage observer's ring-buffer record and the kernel's codes in it.

``STORAGE_RECORD`` mirrors ``struct storage_record`` in storage.bpf.c. The
record carries raw kernel values (``blk_status_t``, ``cmd_flags``); the tables
here turn them into names: operations from the running kernel's BTF, block
statuses from the kernel source (they are macros, absent from BTF).
"""

from __future__ import annotations

import errno

import attrs

from tapio_core import record_dtype
from tapio_core.bpf import kernel_version
from tapio_core.btf import Btf, BtfError
from tapio_core.observer import TASK_DTYPE

DISK_NAME_LEN = 32
MINORBITS = 20  # the kernel's internal dev_t: major << 20 | minor

STORAGE_RECORD = record_dtype([
    ("timestamp_ns", "<u8"),
    ("latency_ns", "<u8"),
    ("sector", "<u8"),
    ("baseline_ns", "<u8"),
    ("baseline_deviation_ns", "<u8"),
    ("baseline_samples", "<u8"),
    ("queue", "<u8"),  # the kernel's request queue pointer: the device's key in BPF map `devices`
    ("task", TASK_DTYPE),
    ("dev_major", "<u4"),
    ("dev_minor", "<u4"),
    ("bytes", "<u4"),
    ("completed_bytes", "<u4"),
    ("cmd_flags", "<u4"),
    ("suppressed", "<u4"),  # records of this device and kind the kernel held back since its previous one
    ("status", "u1"),
    ("partial", "u1"),
    ("device_matched", "u1"),
    ("status_is_errno", "u1"),  # status is an errno: the kernel's block_rq_complete hands one over (5.10)
    ("disk_name", f"S{DISK_NAME_LEN}"),
])


def kernel_dev(major: int, minor: int) -> int:
    """The kernel's internal dev_t, as the BPF side stores it."""
    return major << MINORBITS | minor


# -- block status ---------------------------------------------------------------------------------


@attrs.frozen
class BlockStatus:
    """One ``blk_status_t`` as block/blk-core.c's ``blk_errors`` describes it."""

    name: str
    errno: str
    description: str


def _status(name: str, errno: str, description: str) -> BlockStatus:
    return BlockStatus(f"BLK_STS_{name}", errno, description)


# include/linux/blk_types.h and the blk_errors table: codes 0-13 have not moved since 4.x.
_STABLE_STATUSES = {
    1: _status("NOTSUPP", "EOPNOTSUPP", "operation not supported"),
    2: _status("TIMEOUT", "ETIMEDOUT", "timeout"),
    3: _status("NOSPC", "ENOSPC", "critical space allocation"),
    4: _status("TRANSPORT", "ENOLINK", "recoverable transport"),
    5: _status("TARGET", "EREMOTEIO", "critical target"),
    6: _status("RESV_CONFLICT", "EBADE", "reservation conflict"),  # BLK_STS_NEXUS before 6.5
    7: _status("MEDIUM", "ENODATA", "critical medium"),
    8: _status("PROTECTION", "EILSEQ", "protection"),
    9: _status("RESOURCE", "ENOMEM", "kernel resource"),
    10: _status("IOERR", "EIO", "I/O"),
    11: _status("DM_REQUEUE", "EREMCHG", "dm internal retry"),
    12: _status("AGAIN", "EAGAIN", "nonblocking retry"),
    13: _status("DEV_RESOURCE", "EBUSY", "device resource"),
}
_ZONE_OPEN = _status("ZONE_OPEN_RESOURCE", "ETOOMANYREFS", "open zones exceeded")
_ZONE_ACTIVE = _status("ZONE_ACTIVE_RESOURCE", "EOVERFLOW", "active zones exceeded")
_OFFLINE = _status("OFFLINE", "ENODEV", "device offline")
_DURATION_LIMIT = _status("DURATION_LIMIT", "ETIME", "duration limit exceeded")
_INVAL = _status("INVAL", "EINVAL", "invalid")
# Before 6.10, BLK_STS_ZONE_RESOURCE (driver-internal, no blk_errors entry) sat at 14.
_STATUSES_BEFORE_6_10 = {
    **_STABLE_STATUSES,
    14: _status("ZONE_RESOURCE", "EIO", "zone resource"),
    15: _ZONE_OPEN, 16: _ZONE_ACTIVE, 17: _OFFLINE, 18: _DURATION_LIMIT,
}
# 6.10 removed it and shifted the rest down; 6.11 added INVAL at 19, leaving 18 unused, and a
# 2026 fix moved INVAL to 18. Each code has one meaning on every kernel from 6.10 on.
_STATUSES_SINCE_6_10 = {
    **_STABLE_STATUSES,
    14: _ZONE_OPEN, 15: _ZONE_ACTIVE, 16: _OFFLINE, 17: _DURATION_LIMIT, 18: _INVAL, 19: _INVAL,
}


def block_statuses(release: str | None = None) -> dict[int, BlockStatus]:
    """``blk_status_t`` code -> status, for the kernel ``release`` (default: the running one)."""
    return _STATUSES_SINCE_6_10 if (kernel_version(release) or (0, 0)) >= (6, 10) else _STATUSES_BEFORE_6_10


def block_status(code: int, statuses: dict[int, BlockStatus]) -> BlockStatus:
    """A code the table does not know is reported by number, with the kernel's own fallback errno."""
    return statuses.get(code) or BlockStatus(f"BLK_STS_{code}", "EIO", "unknown block status")


def block_status_of_errno(errno_value: int, statuses: dict[int, BlockStatus]) -> tuple[int | None, BlockStatus]:
    """(code, status) that ``blk_status_to_errno`` turned into ``errno_value``, for kernels whose
    block_rq_complete hands over that errno (5.10). ``blk_errors`` gives each errno to one status;
    ZONE_RESOURCE has no entry there, so EIO is IOERR (or a status the table did not know)."""
    name = errno.errorcode.get(errno_value, str(errno_value))
    for code, status in sorted(statuses.items()):
        if status.errno == name and status.name != "BLK_STS_ZONE_RESOURCE":
            return code, status
    return None, BlockStatus(f"errno {name}", name, "errno without a block status")


# -- operations -----------------------------------------------------------------------------------

_REQ_OP_NAMES = (
    "READ", "WRITE", "FLUSH", "DISCARD", "SECURE_ERASE", "ZONE_APPEND", "WRITE_ZEROES", "ZONE_OPEN",
    "ZONE_CLOSE", "ZONE_FINISH", "ZONE_RESET", "ZONE_RESET_ALL", "DRV_IN", "DRV_OUT",
)
# enum req_op as of 6.x, for when no BTF can be read (a replay elsewhere).
_UPSTREAM_OPERATIONS = {0: "read", 1: "write", 2: "flush", 3: "discard", 5: "secure_erase", 7: "zone_append",
                        9: "write_zeroes", 10: "zone_open", 11: "zone_close", 12: "zone_finish",
                        13: "zone_reset", 15: "zone_reset_all", 34: "drv_in", 35: "drv_out"}
_UPSTREAM_OP_BITS = 8


@attrs.frozen
class Operations:
    """The kernel's request operations: ``cmd_flags & mask`` names one of ``names``."""

    mask: int
    names: dict[int, str]

    def name(self, cmd_flags: int) -> str:
        op = cmd_flags & self.mask
        return self.names.get(op, f"op_{op}")


def operations_from_btf(btf: Btf) -> Operations:
    """Values of ``enum req_op`` (``enum req_opf`` before 6.0) and REQ_OP_BITS (the first flag bit,
    ``__REQ_FAILFAST_DEV``)."""
    names = {}
    for enum in ("req_op", "req_opf"):
        for name in _REQ_OP_NAMES:
            value = btf.enum_value(enum, f"REQ_OP_{name}")
            if value is not None:
                names[value] = name.lower()
        if names:
            break
    bits = btf.enum_value("req_flag_bits", "__REQ_FAILFAST_DEV")
    if not names or bits is None:
        raise BtfError("kernel BTF has no enum req_op (or req_opf) / req_flag_bits")
    return Operations(mask=(1 << bits) - 1, names=names)


def running_kernel_operations() -> Operations:
    """From the running kernel's BTF; the upstream values when it cannot be read."""
    try:
        return operations_from_btf(Btf.load())
    except BtfError:
        return Operations(mask=(1 << _UPSTREAM_OP_BITS) - 1, names=dict(_UPSTREAM_OPERATIONS))
