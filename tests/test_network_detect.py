"""The network observer's record layout and classification, from records packed as the kernel packs them."""

import errno
import socket

import numpy as np
import pytest
from network_records import NETWORK_RECORD_C, pack_network_record

from tapio_core.bpf import kernel_symbol, tracepoint_symbols
from tapio_observer_network.detect import connect_failures, listen_overflows, network_anomalies, packet_drops
from tapio_observer_network.records import (
    KIND_CONNECT_FAILED,
    KIND_CONNECT_REFUSED,
    KIND_CONNECT_TIMEOUT,
    KIND_LISTEN_OVERFLOW,
    KIND_PACKET_DROP,
    NETWORK_RECORD,
)
from tapio_observer_network.settings import NetworkSettings, ignored_drops_bitmap


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


# -- packet drops and listen-queue overflows ----------------------------------------------------------------

#: Reason numbers as some kernel numbers them (they moved between kernels: the names come from the kernel).
REASONS = {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 12: "NETFILTER_DROP", 64: "QDISC_DROP"}
KALLSYMS = "ffffffff81000000 T _stext\nffffffff81100000 T nf_hook_slow\nffffffff81100200 t nf_other\n"


def test_a_timeout_whose_syns_were_dropped_says_which_reason_where_and_how_many(tmp_path, monkeypatch):
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(KALLSYMS)
    monkeypatch.setattr("tapio_observer_network.detect.kernel_symbol",
                        lambda address: kernel_symbol(address, kallsyms))
    raw = pack_network_record(KIND_CONNECT_TIMEOUT, syn_rtx=1, drop_reason=12, drop_location=0xFFFFFFFF81100042,
                              count=2)
    [anomaly] = connect_failures(np.frombuffer(raw, NETWORK_RECORD), REASONS)
    assert (anomaly.data["drop_reason"], anomaly.data["drop_location"], anomaly.data["dropped_packets"]) == (
        "NETFILTER_DROP", "nf_hook_slow+0x42", 2)
    assert anomaly.error_message == "SYN unanswered: the kernel gave up after 1 retransmit(s)"  # the errno's story
    # Without a drop, none of it.
    [plain] = connect_failures(np.frombuffer(pack_network_record(KIND_CONNECT_TIMEOUT), NETWORK_RECORD), REASONS)
    assert "drop_reason" not in plain.data


def test_a_packet_drop_record_becomes_one_occurrence_with_the_kernels_names(monkeypatch):
    monkeypatch.setattr("tapio_observer_network.detect.kernel_symbol", lambda address: f"f+{address:#x}")
    raw = pack_network_record(KIND_PACKET_DROP, src="10.0.0.1", dst="10.0.0.2", sport=40000, dport=443,
                              drop_reason=64, drop_location=0x10, tcp_flags=0x12, netns=4026531840, suppressed=7)
    [anomaly] = packet_drops(np.frombuffer(raw, NETWORK_RECORD), REASONS)
    assert (anomaly.type, anomaly.error_code) == ("kernel.network.packet_drop", "QDISC_DROP")
    assert anomaly.data == {
        "drop_reason": "QDISC_DROP", "drop_location": "f+0x10", "src_ip": "10.0.0.1", "dst_ip": "10.0.0.2",
        "family": "ipv4", "protocol": "tcp", "src_port": 40000, "dst_port": 443, "destination": "10.0.0.2:443",
        "tcp_flags": "SYN|ACK", "netns": 4026531840, "suppressed": 7,
    }
    # A number this kernel does not name, and a protocol without ports.
    raw = pack_network_record(KIND_PACKET_DROP, drop_reason=99, protocol=1)
    [other] = packet_drops(np.frombuffer(raw, NETWORK_RECORD), REASONS)
    assert (other.data["drop_reason"], other.data["protocol"]) == ("reason 99", "icmp")
    assert "dst_port" not in other.data and "tcp_flags" not in other.data


def test_a_replay_under_a_longer_ignore_list_drops_those_reasons_and_counts_them():
    raw = b"".join(pack_network_record(KIND_PACKET_DROP, drop_reason=reason) for reason in (12, 64, 64))
    counters = {}
    settings = NetworkSettings(drop_ignore_reasons=["QDISC_DROP"])
    anomalies = network_anomalies(np.frombuffer(raw, NETWORK_RECORD), settings, counters, REASONS)
    assert [a.data["drop_reason"] for a in anomalies] == ["NETFILTER_DROP"]
    assert counters["below_threshold"] == 2


def test_a_listen_overflow_record_names_the_listener_its_owner_and_limit():
    raw = pack_network_record(KIND_LISTEN_OVERFLOW, src="0.0.0.0", sport=8080, count=19, backlog=128, queue_len=129,
                              owner_known=1, netns=7)
    [anomaly] = listen_overflows(np.frombuffer(raw, NETWORK_RECORD))
    assert (anomaly.type, anomaly.error_code) == ("kernel.network.listen_overflow", "LISTEN_OVERFLOW")
    assert anomaly.error_message == "listener 0.0.0.0:8080 dropped 19 connection(s): its accept queue (limit 128) " \
                                    "was full"
    data = anomaly.data
    assert (data["pid"], data["comm"], data["listener"], data["listen_port"]) == (4242, "curl", "0.0.0.0:8080", 8080)
    assert (data["dropped_connections"], data["backlog"], data["accept_queue"], data["netns"]) == (19, 128, 129, 7)


def test_ignored_drop_reasons_become_the_kernels_bitmap_by_this_kernels_numbers():
    words = ignored_drops_bitmap(("NO_SOCKET", "QDISC_DROP", "NOT_IN_THIS_KERNEL"), REASONS)
    assert words == [1 << 3, 1 << 0, 0, 0]  # 3 is word 0's bit 3; 64 is word 1's bit 0


@pytest.mark.parametrize(("given", "name"), [("netfilter_drop", "NETFILTER_DROP"),
                                             ("SKB_DROP_REASON_NO_SOCKET", "NO_SOCKET")])
def test_drop_reason_names_are_taken_as_the_kernel_prints_them(given, name):
    assert NetworkSettings(drop_ignore_reasons=[given]).drop_ignore_reasons == (name,)


def test_a_drop_reason_list_refuses_a_bare_string_and_nonsense():
    with pytest.raises(ValueError, match="must be a list"):
        NetworkSettings(drop_ignore_reasons="NO_SOCKET")
    with pytest.raises(ValueError, match="drop reason names"):
        NetworkSettings(drop_ignore_reasons=["no socket!"])


def test_the_names_of_a_tracepoints_values_come_from_its_print_format(tmp_path, monkeypatch):
    event = tmp_path / "skb" / "kfree_skb"
    event.mkdir(parents=True)
    (event / "format").write_text(
        'print fmt: "reason: %s", __print_symbolic(REC->reason, { 2, "NOT_SPECIFIED" }, { 12, "NETFILTER_DROP" })\n')
    monkeypatch.setattr("tapio_core.bpf.TRACEFS_EVENTS", tmp_path)
    assert tracepoint_symbols("skb:kfree_skb", "reason") == {2: "NOT_SPECIFIED", 12: "NETFILTER_DROP"}
    assert tracepoint_symbols("skb:kfree_skb", "other") == {}
    assert tracepoint_symbols("skb:absent", "reason") == {}


def test_a_kernel_address_is_named_as_the_kernel_prints_it(tmp_path):
    kallsyms = tmp_path / "kallsyms"
    kallsyms.write_text(KALLSYMS + "ffffffffc0000000 d some_data\n")
    assert kernel_symbol(0xFFFFFFFF81100204, kallsyms) == "nf_other+0x4"
    assert kernel_symbol(0x10, kallsyms) == "0x10"  # before every symbol
    assert kernel_symbol(0x10, tmp_path / "absent") == "0x10"
