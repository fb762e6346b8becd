"""Network anomalies from records packed exactly as the kernel packs them: layout, settings, thresholds, replay.

The windows, cool-downs and rate limits run in the kernel (tested in
test_network_anomalies_kernel.py); here: that the record and settings layouts
agree with the C source, that every setting reaches the kernel in the units
it expects, that each kind of record becomes the exact occurrence users parse,
and that the thresholds in force are applied again in userspace, so a replay
under stricter settings reports less.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from network_records import NETWORK_RECORD_C, pack_network_record

import tapio_observer_network
from tapio_core.cli import cli
from tapio_core.config import ConfigError, build_settings
from tapio_core.recording import RecordWriter
from tapio_observer_network.detect import network_anomalies
from tapio_observer_network.records import (
    KIND_CONNECT_REFUSED,
    KIND_CONNECTION_RESET,
    KIND_RETRANSMIT_SPIKE,
    KIND_RST_STORM,
    KIND_RST_STORM_END,
    KIND_RTT_DEGRADATION,
    NETWORK_RECORD,
    SCOPE_DESTINATION,
    SCOPE_NODE,
)
from tapio_observer_network.settings import NetworkSettings, kernel_settings, rtt_factor_x16

BPF_SOURCE = Path(tapio_observer_network.__file__).with_name("network.bpf.c").read_text()


def c_struct_members(name: str) -> list[str]:
    """Member names of ``struct name { ... };`` in network.bpf.c, in order."""
    body = re.search(rf"struct {name} \{{(.*?)\n\}};", BPF_SOURCE, re.S).group(1)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return [re.match(r"\s*(?:struct )?\w+ (\w+)", line).group(1) for line in body.split(";") if line.strip()]


def detect(raw: bytes, settings: NetworkSettings | None = None, counters: dict | None = None):
    events = np.frombuffer(raw, NETWORK_RECORD)
    return network_anomalies(events, settings or NetworkSettings(), {} if counters is None else counters)


# -- layouts -----------------------------------------------------------------------------------------


def test_record_dtype_follows_the_c_struct_member_for_member():
    assert NETWORK_RECORD.itemsize == NETWORK_RECORD_C.size == 200
    assert list(NETWORK_RECORD.names) == c_struct_members("network_record")


def test_a_record_packed_as_the_kernel_packs_it_parses_back_field_for_field():
    raw = pack_network_record(
        KIND_RETRANSMIT_SPIKE, ts=11, syn_sent=12, cookie=13, pid=14, tid=15, cgroup=16, comm=b"comm", sport=17,
        dport=18, old=1, new=0, syn_rtx=3, in_task=0, count=19, failed=20, suppressed=21, window_ms=22,
        total_retrans=23, snd_cwnd=24, srtt_us=25, baseline_srtt_us=26, samples=27, owner_known=1, scope=2,
        netns=28, rst_received=1, sk_error=-1, failed_known=1, src="10.0.0.1", dst="10.0.0.2",
    )
    [row] = np.frombuffer(raw, NETWORK_RECORD)
    assert row["task"].tolist() == (14, 15, 16, b"comm")
    assert row["src_addr"].tobytes()[:4] == socket.inet_aton("10.0.0.1")
    assert row["dst_addr"].tobytes()[:4] == socket.inet_aton("10.0.0.2")
    expected = {
        "timestamp_ns": 11, "syn_sent_ns": 12, "sock_cookie": 13, "kind": KIND_RETRANSMIT_SPIKE, "family": 2,
        "protocol": 6, "src_port": 17, "dst_port": 18, "old_state": 1, "new_state": 0, "syn_retransmits": 3,
        "in_task_context": 0, "count": 19, "failed": 20, "suppressed": 21, "window_ms": 22, "total_retrans": 23,
        "snd_cwnd": 24, "srtt_us": 25, "baseline_srtt_us": 26, "samples": 27, "owner_known": 1, "scope": 2,
        "rst_received": 1, "failed_known": 1, "netns": 28, "sk_error": -1,
    }
    assert {name: int(row[name]) for name in expected} == expected


def test_kernel_settings_fill_struct_network_settings_exactly():
    assert list(kernel_settings(NetworkSettings())) == c_struct_members("network_settings")


# -- settings ----------------------------------------------------------------------------------------


def test_default_settings_in_the_kernels_units():
    assert kernel_settings(NetworkSettings()) == {
        "configured": 1,
        "connection_cost_ns": 1_000_000_000, "connection_burst_ns": 10 * 1_000_000_000,
        "retransmit_slot_ns": 125_000_000, "retransmit_cooldown_ns": 30_000_000_000,
        "rst_slot_ns": 125_000_000, "rst_cooldown_ns": 10_000_000_000,
        "rtt_learn_interval_ns": 1_000_000_000, "rtt_cooldown_ns": 60_000_000_000,
        "abandoned_min_ns": 1_000_000_000,
        "retransmit_threshold": 10, "retransmit_window_ms": 1000,
        "rst_threshold": 20, "rst_node_threshold": 200, "rst_window_ms": 1000,
        "rtt_factor_x16": 64, "rtt_floor_us": 20_000, "rtt_min_samples": 8, "storm_clock": 0, "reserved": 0,
        "drop_cost_ns": 5_000_000_000, "drop_burst_ns": 15_000_000_000, "listen_cooldown_ns": 60_000_000_000,
        "ignored_drops": [0, 0, 0, 0],  # no names given: nothing this kernel numbers is ignored
    }


def test_settings_from_a_table_convert_to_the_kernels_units():
    settings = build_settings(NetworkSettings, "network", {"network": {
        "retransmit_window_s": 2, "rst_storm_window_s": 0.08, "connection_rate_per_s": 0.5, "connection_burst": 3,
        "rtt_factor": 2.5, "rtt_floor_ms": 0.5, "rtt_cooldown_s": 0,
    }})
    values = kernel_settings(settings)
    assert (values["retransmit_slot_ns"], values["retransmit_window_ms"]) == (250_000_000, 2000)
    assert (values["rst_slot_ns"], values["rst_window_ms"]) == (10_000_000, 80)
    assert (values["connection_cost_ns"], values["connection_burst_ns"]) == (2_000_000_000, 6_000_000_000)
    assert (values["rtt_factor_x16"], values["rtt_floor_us"], values["rtt_cooldown_ns"]) == (40, 500, 0)


@pytest.mark.parametrize(("table", "message"), [
    ({"retransmit_threshold": 0}, "config [network]: 'retransmit_threshold' must be >= 1: 0"),
    ({"retransmit_threshold": 2.5}, "config [network]: 'retransmit_threshold' must be a whole number: 2.5"),
    ({"rst_storm_threshold": True}, "config [network]: 'rst_storm_threshold' must be a whole number: True"),
    ({"rtt_factor": 1}, "config [network]: 'rtt_factor' must be > 1.0: 1.0"),
    ({"retransmit_window_s": 0.001}, "config [network]: 'retransmit_window_s' must be >= 0.01: 0.001"),
    ({"rst_storm_cooldown_s": -1}, "config [network]: 'rst_storm_cooldown_s' must be >= 0.0: -1.0"),
    ({"connection_rate_per_s": 0}, "config [network]: 'connection_rate_per_s' must be >= 0.001: 0.0"),
    ({"rtt_floor_ms": "fast"}, "config [network]: rtt_floor_ms: invalid value for type, expected float"),
    ({"rst_threshold": 5}, "config [network]: unknown key rst_threshold (known: "),
])
def test_an_invalid_setting_is_one_line_naming_the_key(table, message):
    with pytest.raises(ConfigError) as caught:
        build_settings(NetworkSettings, "network", {"network": table})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


# -- each kind, exactly ---------------------------------------------------------------------------------


def test_retransmit_spike_record():
    raw = pack_network_record(
        KIND_RETRANSMIT_SPIKE, ts=9_000, cookie=77, pid=10, tid=11, cgroup=12, comm=b"java", src="10.0.0.1",
        dst="10.0.0.9", sport=40000, dport=443, old=1, new=0, count=12, failed=2, window_ms=1000,
        total_retrans=30, snd_cwnd=7, owner_known=1, failed_known=1,
    )
    [anomaly] = detect(raw)
    assert (anomaly.type, anomaly.severity, anomaly.outcome) == ("kernel.network.retransmit_spike", "warning",
                                                                  "failure")
    assert anomaly.timestamp_ns == 9_000
    assert anomaly.fingerprint == raw
    assert anomaly.data == {
        "pid": 10, "tid": 11, "comm": "java", "cgroup_id": 12, "owner_known": True,
        "src_ip": "10.0.0.1", "src_port": 40000, "dst_ip": "10.0.0.9", "dst_port": 443,
        "family": "ipv4", "protocol": "tcp", "sock_cookie": 77, "destination": "10.0.0.9:443",
        "retransmits": 12, "failed_retransmits": 2, "window_ms": 1000, "segments_retransmitted": 30,
        "snd_cwnd": 7, "state": "ESTABLISHED",
    }


def test_a_retransmit_spike_from_a_kernel_that_cannot_tell_failed_attempts_has_no_failed_count():
    """Before tcp_retransmit_skb had ``err`` the kernel did not say: no count beats a made-up zero."""
    raw = pack_network_record(KIND_RETRANSMIT_SPIKE, old=1, new=0, count=12, failed=0, failed_known=0)
    [anomaly] = detect(raw)
    assert anomaly.data["retransmits"] == 12
    assert "failed_retransmits" not in anomaly.data


def test_rtt_degradation_record_ipv6():
    raw = pack_network_record(
        KIND_RTT_DEGRADATION, family=socket.AF_INET6, src="fd00::1", dst="fd00::2", sport=50000, dport=8080,
        srtt_us=412_345, baseline_srtt_us=80, samples=9, snd_cwnd=43, owner_known=1, old=0, new=0,
    )
    [anomaly] = detect(raw)
    assert (anomaly.type, anomaly.outcome) == ("kernel.network.rtt_degradation", "success")
    data = anomaly.data
    assert (data["destination"], data["dst_ip"], data["dst_port"], data["family"]) == (
        "fd00::2", "fd00::2", 8080, "ipv6")
    assert (data["baseline_ms"], data["current_ms"], data["samples"], data["snd_cwnd"]) == (0.08, 412.345, 9, 43)


def test_rst_storm_records_per_destination_and_node_wide():
    raw = (pack_network_record(KIND_RST_STORM, ts=5, count=20, window_ms=1000, scope=SCOPE_DESTINATION,
                               family=socket.AF_INET6, src=None, dst="::1", sport=0, dport=9, suppressed=30)
           + pack_network_record(KIND_RST_STORM, ts=6, count=200, window_ms=1000, scope=SCOPE_NODE, family=0,
                                 src=None, dst=None, sport=0, dport=0, protocol=0))
    destination, node = detect(raw)
    assert destination.data == {
        "scope": "destination", "rsts": 20, "window_ms": 1000, "destination": "[::1]:9", "dst_ip": "::1",
        "dst_port": 9, "family": "ipv6", "suppressed": 30, "refused": 0, "reset": 0,
    }
    assert node.data == {"scope": "node", "rsts": 200, "window_ms": 1000}
    assert (node.type, node.severity, node.outcome, node.error_code) == (
        "kernel.network.rst_storm", "warning", "failure", None)


def test_a_storm_ended_by_the_clock_is_a_start_in_progress_and_an_end_with_what_it_folded():
    def storm(kind, **fields):
        return pack_network_record(kind, window_ms=1000, scope=SCOPE_DESTINATION, src=None, dst="10.0.0.9",
                                   sport=0, dport=80, netns=4026531840, **fields)

    raw = (storm(KIND_RST_STORM, ts=2_000_000_000, count=20, refused=5, episode_open=1)
           + storm(KIND_RST_STORM_END, ts=3_500_000_000, started_ns=2_000_000_000, count=2980, refused=2970,
                   reset=10))
    start, end = detect(raw)
    assert (start.outcome, start.data["episode"], start.data["rsts"], start.data["refused"]) == (
        "in_progress", "started", 20, 5)
    assert start.data["suppressed"] == 5
    assert (end.type, end.outcome, end.data["episode"], end.data["duration_ms"]) == (
        "kernel.network.rst_storm", "failure", "ended", 1500)
    assert (end.data["rsts"], end.data["refused"], end.data["reset"], end.data["suppressed"]) == (2980, 2970, 10, 2980)
    assert end.data["destination"] == "10.0.0.9:80"


def test_connection_reset_of_a_socket_with_no_known_owner():
    raw = pack_network_record(KIND_CONNECTION_RESET, pid=0, tid=0, cgroup=0, comm=b"", owner_known=0, old=8, new=7,
                              sport=8080, dport=51000, cookie=5)
    [anomaly] = detect(raw)
    assert (anomaly.type, anomaly.error_code, anomaly.outcome) == ("kernel.network.connection_reset", "ECONNRESET",
                                                                   "failure")
    assert anomaly.error_message == "connection reset by peer in CLOSE_WAIT"
    data = anomaly.data
    assert (data["pid"], data["comm"], data["owner_known"]) == (0, "", False)
    assert (data["old_state"], data["new_state"], data["src_port"], data["dst_port"]) == (
        "CLOSE_WAIT", "CLOSE", 8080, 51000)


@pytest.mark.parametrize("kind", [KIND_CONNECT_REFUSED, KIND_CONNECTION_RESET, KIND_RETRANSMIT_SPIKE,
                                  KIND_RTT_DEGRADATION, KIND_RST_STORM])
def test_the_network_namespace_is_in_data_when_the_kernel_said_it(kind):
    fields = {"count": 1000, "scope": SCOPE_DESTINATION, "srtt_us": 900_000, "baseline_srtt_us": 1000, "samples": 99}
    known, unknown = detect(pack_network_record(kind, ts=1, netns=4026531840, **fields)
                            + pack_network_record(kind, ts=2, netns=0, **fields))
    assert known.data["netns"] == 4026531840
    assert "netns" not in unknown.data


def test_suppressed_counts_travel_in_data_and_add_up_in_the_counters():
    counters: dict = {}
    raw = (pack_network_record(KIND_CONNECT_REFUSED, ts=1, suppressed=0)
           + pack_network_record(KIND_CONNECT_REFUSED, ts=2, suppressed=41)
           + pack_network_record(KIND_CONNECTION_RESET, ts=3, suppressed=9))
    first, second, reset = detect(raw, counters=counters)
    assert "suppressed" not in first.data
    assert (second.data["suppressed"], reset.data["suppressed"]) == (41, 9)
    assert counters == {"suppressed_reported": 50}


def test_a_batch_comes_out_in_kernel_time_order_and_unknown_kinds_are_skipped():
    raw = b"".join([
        pack_network_record(KIND_RST_STORM, ts=40, count=20, scope=SCOPE_NODE),
        pack_network_record(0, ts=15),
        pack_network_record(KIND_RETRANSMIT_SPIKE, ts=10, count=10),
        pack_network_record(99, ts=20),
        pack_network_record(KIND_CONNECT_REFUSED, ts=30),
        pack_network_record(KIND_CONNECTION_RESET, ts=5),
    ])
    assert [(a.timestamp_ns, a.type.rsplit(".", 1)[1]) for a in detect(raw, NetworkSettings(
        rst_storm_node_threshold=20))] == [
        (5, "connection_reset"), (10, "retransmit_spike"), (30, "connection_refused"), (40, "rst_storm"),
    ]


def test_unknown_state_and_scope_codes_are_reported_as_numbers():
    raw = (pack_network_record(KIND_CONNECTION_RESET, old=99, new=7)
           + pack_network_record(KIND_RST_STORM, scope=7, count=50))
    reset, storm = detect(raw)
    assert reset.data["old_state"] == "99"
    assert storm.data["scope"] == "7"


# -- thresholds in force -------------------------------------------------------------------------------


@pytest.mark.parametrize(("count", "kept"), [(9, False), (10, True), (11, True)])
def test_retransmit_spike_threshold(count, kept):
    counters: dict = {}
    raw = pack_network_record(KIND_RETRANSMIT_SPIKE, count=count)
    assert len(detect(raw, NetworkSettings(retransmit_threshold=10), counters)) == int(kept)
    assert counters.get("below_threshold", 0) == int(not kept)


def test_rst_storm_thresholds_differ_by_scope():
    settings = NetworkSettings(rst_storm_threshold=20, rst_storm_node_threshold=100)
    raw = b"".join([
        pack_network_record(KIND_RST_STORM, ts=1, count=20, scope=SCOPE_DESTINATION),
        pack_network_record(KIND_RST_STORM, ts=2, count=19, scope=SCOPE_DESTINATION),
        pack_network_record(KIND_RST_STORM, ts=3, count=99, scope=SCOPE_NODE),
        pack_network_record(KIND_RST_STORM, ts=4, count=100, scope=SCOPE_NODE),
    ])
    assert [a.timestamp_ns for a in detect(raw, settings)] == [1, 4]


@pytest.mark.parametrize(("srtt_us", "baseline_us", "samples", "kept"), [
    (20_000, 5_000, 8, True),    # exactly factor x baseline and exactly the floor
    (19_999, 1_000, 8, False),   # under the floor
    (20_000, 5_001, 8, False),   # under factor x baseline
    (400_000, 80, 7, False),     # baseline not trusted yet
    (400_000, 80, 8, True),
])
def test_rtt_degradation_factor_floor_and_samples(srtt_us, baseline_us, samples, kept):
    settings = NetworkSettings(rtt_factor=4.0, rtt_floor_ms=20.0, rtt_min_samples=8)
    raw = pack_network_record(KIND_RTT_DEGRADATION, srtt_us=srtt_us, baseline_srtt_us=baseline_us,
                              samples=samples)
    assert len(detect(raw, settings)) == int(kept)


def test_the_rtt_factor_is_compared_in_sixteenths_as_the_kernel_does():
    # 4.03 rounds to 64/16 = 4.0 in the kernel; userspace must agree, or it would drop what the kernel sent.
    assert rtt_factor_x16(4.03) == 64
    raw = pack_network_record(KIND_RTT_DEGRADATION, srtt_us=40_000, baseline_srtt_us=10_000, samples=8)
    assert len(detect(raw, NetworkSettings(rtt_factor=4.03))) == 1


def test_replay_under_stricter_settings_reports_less(tmp_path):
    path = tmp_path / "network.rec"
    writer = RecordWriter(path, 1_700_000_000_000_000_000)
    writer.write_batch("network", NETWORK_RECORD.itemsize, 0, b"".join([
        pack_network_record(KIND_RETRANSMIT_SPIKE, ts=1_000_000, count=12, dst="10.0.0.9", dport=443),
        pack_network_record(KIND_RST_STORM, ts=2_000_000, count=25, scope=SCOPE_DESTINATION, dport=9),
    ]))
    writer.close()
    runner = CliRunner()

    def replay(*extra: str) -> list[str]:
        result = runner.invoke(cli, ["replay", str(path), "--plugins", "network,stdout", *extra])
        assert result.exit_code == 0, result.output
        return [json.loads(line)["type"].rsplit(".", 1)[1] for line in result.stdout.splitlines()]

    assert replay() == ["retransmit_spike", "rst_storm"]
    assert replay("--set", "network.retransmit_threshold=13") == ["rst_storm"]
    assert replay("--set", "network.rst_storm_threshold=26", "--set", "network.retransmit_threshold=12") == [
        "retransmit_spike"]


def test_replay_rejects_an_invalid_setting_with_one_line(tmp_path):
    path = tmp_path / "network.rec"
    RecordWriter(path, 0).close()
    result = CliRunner().invoke(cli, ["replay", str(path), "--plugins", "network,stdout",
                                      "--set", "network.rtt_factor=0.5"])
    assert result.exit_code != 0
    assert "config [network]: 'rtt_factor' must be > 1.0: 0.5" in result.output
    assert "Traceback" not in result.output
