"""The network observer's ring-buffer record, as ``struct network_record`` in network.bpf.c lays it out."""

from tapio_core import record_dtype
from tapio_core.observer import TASK_DTYPE

KIND_CONNECT_REFUSED = 1
KIND_CONNECT_TIMEOUT = 2
KIND_CONNECTION_RESET = 3
KIND_RETRANSMIT_SPIKE = 4
KIND_RTT_DEGRADATION = 5
KIND_RST_STORM = 6
KIND_CONNECT_FAILED = 7
KIND_RST_STORM_END = 8  # a destination's storm calmed down: what it folded
KIND_PACKET_DROP = 9
KIND_LISTEN_OVERFLOW = 10

#: ``scope`` of an rst_storm record.
SCOPE_DESTINATION = 1
SCOPE_NODE = 2
SCOPES = {SCOPE_DESTINATION: "destination", SCOPE_NODE: "node"}

NETWORK_RECORD = record_dtype([
    ("timestamp_ns", "<u8"),
    ("syn_sent_ns", "<u8"),
    ("sock_cookie", "<u8"),
    ("task", TASK_DTYPE),
    ("kind", "<u4"),
    ("family", "<u2"),
    ("protocol", "<u2"),
    ("src_port", "<u2"),
    ("dst_port", "<u2"),
    ("old_state", "u1"),
    ("new_state", "u1"),
    ("syn_retransmits", "u1"),
    ("in_task_context", "u1"),
    ("src_addr", "V16"),  # raw bytes: IPv4 in the first 4
    ("dst_addr", "V16"),
    ("count", "<u4"),
    ("failed", "<u4"),
    ("suppressed", "<u4"),
    ("window_ms", "<u4"),
    ("total_retrans", "<u4"),
    ("snd_cwnd", "<u4"),
    ("srtt_us", "<u4"),
    ("baseline_srtt_us", "<u4"),
    ("samples", "<u4"),
    ("owner_known", "u1"),
    ("scope", "u1"),
    ("rst_received", "u1"),
    ("failed_known", "u1"),  # retransmit_spike: the kernel told failed attempts apart
    ("netns", "<u4"),
    ("sk_error", "<i4"),
    ("refused", "<u4"),  # rst_storm: refused connects to the destination folded into the record
    ("reset", "<u4"),  # rst_storm: resets from the destination folded into the record
    ("started_ns", "<u8"),  # rst_storm end: when the episode started
    ("episode_open", "<u4"),  # rst_storm start: an end record follows
    ("drop_reason", "<u4"),  # packet_drop, or a failed connect whose SYN was dropped: the kernel's number
    ("drop_location", "<u8"),  # ...and the kernel text address that freed the packet
    ("backlog", "<u4"),  # listen_overflow: the accept-queue limit
    ("queue_len", "<u4"),  # listen_overflow: connections waiting to be accepted
    ("tcp_flags", "u1"),  # packet_drop: the dropped TCP segment's flags
    ("reserved", "V7"),
])

#: include/net/tcp_states.h
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
}
FAMILIES = {2: "ipv4", 10: "ipv6"}
PROTOCOLS = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
#: TCP header flag bits, lowest first.
TCP_FLAGS = ("FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR")
