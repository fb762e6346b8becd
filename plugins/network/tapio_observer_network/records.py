"""The network observer's ring-buffer record, as ``struct network_record`` in network.bpf.c lays it out."""

from tapio_core import record_dtype
from tapio_core.observer import TASK_DTYPE

KIND_CONNECT_REFUSED = 1
KIND_CONNECT_TIMEOUT = 2

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
])

#: include/net/tcp_states.h
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
}
FAMILIES = {2: "ipv4", 10: "ipv6"}
PROTOCOLS = {6: "tcp"}
