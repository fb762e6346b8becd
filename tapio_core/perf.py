"""perf_event_open(2) for observers: system-wide counters, and a clock that runs a BPF program on a timer.

The clock is the one in-kernel timer every supported kernel has for a tracing program (bpf_timer is
5.15+): a cpu-clock software event on one CPU, whose overflow runs the program attached to it. No
hardware PMU is needed. Observers use it to end episodes the kernel cannot end on a later event,
because no later event may come.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
from pathlib import Path

from tapio_core.bpf_objects import LoadedProgram

PERF_TYPE_HARDWARE, PERF_TYPE_SOFTWARE = 0, 1
PERF_COUNT_SW_CPU_CLOCK = 0

_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241, "riscv64": 241, "ppc64le": 319, "ppc64": 319, "s390x": 331}
_PERF_ATTR_SIZE_VER0 = 64
_PERF_FLAG_FD_CLOEXEC = 8
#: _IO('$', 0) and _IOW('$', 8, __u32) from uapi/linux/perf_event.h.
_PERF_EVENT_IOC_ENABLE, _PERF_EVENT_IOC_SET_BPF = 0x2400, 0x40042408
_libc = ctypes.CDLL(None, use_errno=True)


def perf_event_open(event_type: int, config: int, cpu: int, sample_period: int = 0) -> int:
    """A system-wide perf event on ``cpu``, counting from now; its fd. Raises OSError with the kernel's errno."""
    number = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if number is None:
        raise OSError(errno.ENOSYS, f"perf_event_open: no syscall number known for {platform.machine()}")
    attr = ctypes.create_string_buffer(_PERF_ATTR_SIZE_VER0)
    struct.pack_into("=IIQQ", attr, 0, event_type, _PERF_ATTR_SIZE_VER0, config, sample_period)
    fd = _libc.syscall(ctypes.c_long(number), attr, ctypes.c_int(-1), ctypes.c_int(cpu), ctypes.c_int(-1),
                       ctypes.c_ulong(_PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return fd


def online_cpus() -> list[int]:
    """The CPUs ``/sys/devices/system/cpu/online`` lists (e.g. ``0-3,6``)."""
    cpus: list[int] = []
    for part in Path("/sys/devices/system/cpu/online").read_text().strip().split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def start_clock(program: LoadedProgram, name: str, cpus: list[int], interval_ns: int) -> None:
    """Run ``program``'s perf event program ``name`` on each of ``cpus`` once per ``interval_ns``.

    The events are ``program``'s (closed when it detaches). Raises OSError when the kernel refuses one.
    """
    function = program.programs[name]
    for cpu in cpus:
        fd = perf_event_open(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK, cpu, sample_period=interval_ns)
        program.owned.append(fd)
        for request, argument in ((_PERF_EVENT_IOC_SET_BPF, function), (_PERF_EVENT_IOC_ENABLE, 0)):
            if _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.c_int(argument)) < 0:
                code = ctypes.get_errno()
                raise OSError(code, f"cpu {cpu}: {os.strerror(code)}")
