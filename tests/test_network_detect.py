"""The network observer's record layout and classification, from records packed as the kernel packs them."""

import errno
import socket

import numpy as np
import pytest
from network_records import NETWORK_RECORD_C, pack_network_record

from tapio_observer_network.detect import connect_failures
from tapio_observer_network.records import (
    KIND_CONNECT_FAILED,
    KIND_CONNECT_REFUSED,
    KIND_CONNECT_TIMEOUT,
    NETWORK_RECORD,
)


def test_numpy_layout_matches_the_c_struct():
    assert NETWORK_RECORD.itemsize == NETWORK_RECORD_C.size


def test_refused_ipv4_record_becomes_one_exact_anomaly():
    raw = pack_network_record(KIND_CONNECT_REFUSED, ts=5_000_000, syn_sent=4_000_000, src="127.0.0.1",
                              dst="127.0.0.2", sport=40000, dport=9, owner_known=1)
    [anomaly] = connect_failures(np.frombuffer(raw, NETWORK_RECORD))
    assert anomaly.type == "kernel.network.connection_refused"
    assert (anomaly.severity, anomaly.outcome, anomaly.error_code) == ("warning", "failure", "ECONNREFUSED")
    assert anomaly.timestamp_ns == 5_000_000
    assert anomaly.data == {
        "pid": 4242, "tid": 4243, "comm": "curl", "cgroup_id": 99, "owner_known": True,
        "src_ip": "127.0.0.1", "dst_ip": "127.0.0.2", "src_port": 40000, "dst_port": 9,
        "family": "ipv4", "protocol": "tcp", "old_state": "SYN_SENT", "new_state": "CLOSE",
        "sock_cookie": 7, "syn_retransmits": 0, "connect_duration_ns": 1_000_000,
    }


def test_timeout_ipv6_record():
    raw = pack_network_record(KIND_CONNECT_TIMEOUT, family=socket.AF_INET6, src="::1", dst="fd00::5", syn_rtx=2)
    [anomaly] = connect_failures(np.frombuffer(raw, NETWORK_RECORD))
    assert anomaly.type == "kernel.network.connection_timeout"
    assert (anomaly.outcome, anomaly.error_code) == ("timeout", "ETIMEDOUT")
    assert (anomaly.data["family"], anomaly.data["src_ip"], anomaly.data["dst_ip"]) == ("ipv6", "::1", "fd00::5")
    assert anomaly.data["syn_retransmits"] == 2


@pytest.mark.parametrize(("kind", "sk_error", "rst", "expected"), [
    (KIND_CONNECT_REFUSED, errno.ECONNREFUSED, 1,
     ("connection_refused", "failure", "ECONNREFUSED", "connection refused: peer answered SYN with RST", None)),
    (KIND_CONNECT_REFUSED, errno.ECONNREFUSED, 0,
     ("connection_refused", "failure", "ECONNREFUSED", "connection refused: ICMP port unreachable", None)),
    (KIND_CONNECT_FAILED, errno.EHOSTUNREACH, 0,
     ("connection_unreachable", "failure", "EHOSTUNREACH", "connection attempt failed: No route to host", None)),
    (KIND_CONNECT_FAILED, errno.ENETUNREACH, 0,
     ("connection_unreachable", "failure", "ENETUNREACH", "connection attempt failed: Network is unreachable",
      None)),
    (KIND_CONNECT_TIMEOUT, errno.ETIMEDOUT, 0,
     ("connection_timeout", "timeout", "ETIMEDOUT", "SYN unanswered: the kernel gave up after 2 retransmit(s)",
      "kernel")),
    (KIND_CONNECT_TIMEOUT, 0, 0,
     ("connection_timeout", "timeout", "ETIMEDOUT",
      "connection attempt abandoned by the application without a reply", "application")),
    (KIND_CONNECT_TIMEOUT, -1, 0,  # a kernel whose BTF does not say where sk_err is
     ("connection_timeout", "timeout", "ETIMEDOUT", "connection attempt ended in SYN_SENT without a reply", None)),
])
def test_how_a_failed_connect_ended_is_in_its_type_error_and_data(kind, sk_error, rst, expected):
    raw = pack_network_record(kind, sk_error=sk_error, rst_received=rst, syn_rtx=2)
    [anomaly] = connect_failures(np.frombuffer(raw, NETWORK_RECORD))
    assert (anomaly.type.rsplit(".", 1)[1], anomaly.outcome, anomaly.error_code, anomaly.error_message,
            anomaly.data.get("ended_by")) == expected


def test_mixed_batch_keeps_kernel_order_and_ignores_unknown_kinds():
    raw = b"".join([
        pack_network_record(KIND_CONNECT_TIMEOUT, ts=30),
        pack_network_record(0, ts=15),
        pack_network_record(KIND_CONNECT_REFUSED, ts=10),
        pack_network_record(99, ts=20),
        pack_network_record(KIND_CONNECT_REFUSED, ts=40),
    ])
    anomalies = connect_failures(np.frombuffer(raw, NETWORK_RECORD))
    assert [(a.timestamp_ns, a.type.rsplit(".", 1)[1]) for a in anomalies] == [
        (10, "connection_refused"), (30, "connection_timeout"), (40, "connection_refused"),
    ]


def test_comm_stops_at_nul_and_survives_bad_utf8():
    raw = pack_network_record(KIND_CONNECT_REFUSED, comm=b"a\xffb\0junk")
    [anomaly] = connect_failures(np.frombuffer(raw, NETWORK_RECORD))
    assert anomaly.data["comm"] == "a\ufffdb"
