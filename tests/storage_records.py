"""Packing storage records the way the kernel does, for replay-style tests."""

import struct

# struct storage_record in storage.bpf.c, in native C layout ('@' applies C alignment):
# seven u64, struct tapio_task {u32 pid, u32 tid, u64 cgroup_id, char comm[16]}, six u32,
# u8 status, u8 partial, u8 device_matched, u8 status_is_errno, char disk_name[32], and the 4 bytes of
# padding C adds at the end (struct's '@' aligns members, not the whole).
STORAGE_RECORD_C = struct.Struct("@7Q" "IIQ16s" "6I" "BBBB" "32s" "4x")

WRITE, FLUSH = 1, 2
REQ_SYNC = 1 << 11  # a flag above the operation bits, as the kernel sets it on direct writes


def pack_storage_record(*, ts=5_000_000_000, latency=2_000_000_000, sector=25_600, baseline=12_000,
                        deviation=3_000, samples=50, queue=None, pid=4242, tid=4243,
                        cgroup=99, comm=b"dd", major=7, minor=3, size=65_536, completed=None,
                        cmd_flags=WRITE | REQ_SYNC, suppressed=0, status=0, partial=0, matched=0, status_is_errno=0,
                        disk=b"loop3"):
    return STORAGE_RECORD_C.pack(
        ts, latency, sector, baseline, deviation, samples,
        queue if queue is not None else 0xFFFF_8880_0000_0000 + (major << 20 | minor) * 4096,
        pid, tid, cgroup, comm, major, minor, size, size if completed is None else completed, cmd_flags,
        suppressed, status, partial, matched, status_is_errno, disk,
    )
