"""Packing network records the way the kernel does, for replay-style tests."""

import errno
import socket
import struct

# struct network_record in network.bpf.c, in native C layout ('@' applies C alignment).
NETWORK_RECORD_C = struct.Struct("@QQQ" "IIQ16s" "IHHHH" "BBBB" "16s16s" "IIIIIIIII" "BBBBIi" "IIQII" "QIIB7x")

#: What the kernel's sock.sk_err holds as a failed connect of each kind closes, unless a test says.
SK_ERROR_OF_KIND = {1: errno.ECONNREFUSED, 2: errno.ETIMEDOUT, 7: errno.EHOSTUNREACH}


def pack_network_record(kind, *, ts=1_000, syn_sent=400, cookie=7, pid=4242, tid=4243, cgroup=99, comm=b"curl",
                        family=socket.AF_INET, src="127.0.0.1", dst="127.0.0.1", sport=50000, dport=80,
                        old=2, new=7, syn_rtx=0, in_task=1, count=0, failed=0, suppressed=0, window_ms=0,
                        total_retrans=0, snd_cwnd=0, srtt_us=0, baseline_srtt_us=0, samples=0, owner_known=0,
                        scope=0, protocol=6, netns=0, rst_received=None, sk_error=None, failed_known=0,
                        refused=0, reset=0, started_ns=0, episode_open=0, drop_reason=0, drop_location=0,
                        backlog=0, queue_len=0, tcp_flags=0):
    def addr(text):
        return socket.inet_pton(family, text).ljust(16, b"\0") if text else bytes(16)

    return NETWORK_RECORD_C.pack(ts, syn_sent, cookie, pid, tid, cgroup, comm, kind, family, protocol, sport, dport,
                                 old, new, syn_rtx, in_task, addr(src), addr(dst), count, failed, suppressed,
                                 window_ms, total_retrans, snd_cwnd, srtt_us, baseline_srtt_us, samples,
                                 owner_known, scope, int(kind == 1) if rst_received is None else rst_received,
                                 failed_known, netns, SK_ERROR_OF_KIND.get(kind, 0) if sk_error is None else sk_error,
                                 refused, reset, started_ns, episode_open, drop_reason, drop_location, backlog,
                                 queue_len, tcp_flags)
