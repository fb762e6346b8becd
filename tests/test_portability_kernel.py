"""The portability scenario: one agent with every observer, every anomaly type made once by the real kernel.

This module is what CI runs on every kernel of the matrix (this machine's and Debian's 5.10, 6.1 and
6.12 in guests, see kernels/matrix.py), so it starts the agent once (a compile under emulation takes
tens of seconds) and provokes each anomaly once, in namespaces, cgroups and loop devices of its own.
Each occurrence is checked exactly once, with its owner; then ``tapio doctor`` is checked against
what the agent did with each observer on this kernel. What it measured is written to
``TAPIO_MATRIX_OUT/support.json``, from which kernels/support.py writes the README's support table.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from container_scenarios import in_cgroups, memory_cgroup, oom_kill_holder
from kernel_helpers import (
    TAPIO,
    closed_tcp_port,
    netns_exec,
    network_namespace,
    nft_tcp_port_rule,
    run_connects,
    running_agent,
    scaled,
    tool_env,
)
from network_scenarios import (
    SERVER_IP,
    compile_net_loops,
    connects,
    loop_report,
    nft_drop_counted,
    nft_random_drop,
    of,
    queued_link,
    random_port,
    run_client,
    start_refusals,
    tcp_server,
)
from storage_scenarios import (
    direct_write,
    fill,
    finished,
    frozen,
    loop_device,
    on_device,
    sparse_file,
    stacked_loops,
    tmpfs,
    wait_writes_in_flight,
)

from tapio_observer_container import LAST_THREAD_FROM_TRACEPOINT
from tapio_observer_network import FAILED_RETRANSMITS, OWNERS_FROM_SENDS, PACKET_DROPS

pytestmark = pytest.mark.kernel

OBSERVERS = ("network", "container", "storage", "pmc")
#: After the occurrence waited for, how long a wrongly repeated one would have had to show up.
SETTLE_S = 0.5
SETTINGS = {
    "network.retransmit_threshold": 6, "network.retransmit_window_s": 10, "network.retransmit_cooldown_s": 600,
    "network.rtt_learn_interval_s": 0.1, "network.rtt_min_samples": 5, "network.rtt_cooldown_s": 600,
    "network.rst_storm_threshold": 20, "network.rst_storm_window_s": 5, "network.rst_storm_cooldown_s": 600,
    "network.rst_storm_node_threshold": 1_000_000, "network.listen_overflow_cooldown_s": 600,
    "storage.warning_ms": 1000, "storage.critical_ms": 1500,
}
#: Every feature an observer turns off on a kernel of the matrix, because that kernel lacks its data; every other
#: feature must be on there. sock:sock_send_length came in 6.3; 6.12 and older have neither the err field of
#: tcp_retransmit_skb nor the group_dead field of sched_process_exit.
LACKING_BEFORE_6_3 = {("network", OWNERS_FROM_SENDS): "the kernel has no tracepoint sock:sock_send_length"}
LACKING_UP_TO_6_12 = {
    ("network", FAILED_RETRANSMITS): "tracepoint tcp:tcp_retransmit_skb has no field err",
    ("container", LAST_THREAD_FROM_TRACEPOINT): "tracepoint sched:sched_process_exit has no field group_dead",
}
#: kfree_skb gave its reason in 5.17.
LACKING_BEFORE_5_17 = {("network", PACKET_DROPS): "raw tracepoint kfree_skb has no argument 2"}
OFF_ON_MATRIX_KERNELS = {
    (5, 10): LACKING_BEFORE_5_17 | LACKING_BEFORE_6_3 | LACKING_UP_TO_6_12,
    (6, 1): LACKING_BEFORE_6_3 | LACKING_UP_TO_6_12,
    (6, 12): LACKING_UP_TO_6_12,
    (6, 18): {},
}
#: What this kernel made, filled in by the tests below and written out when the module ends.
MEASURED: dict = {"kernel": os.uname().release, "detected": {}, "observers": {}, "doctor_matches_agent": None}


def exactly_one(type_: str, occurrences: list[dict]) -> dict:
    """The one occurrence the scenario should have made."""
    assert len(occurrences) == 1, f"{type_}: expected exactly one, got {len(occurrences)}: {occurrences}"
    return occurrences[0]


def detected(type_: str) -> None:
    """Called as a scenario's last line: its type was made exactly once, rightly attributed (for the table)."""
    MEASURED["detected"][type_] = 1


def off_here(type_: str, feature: str, agent) -> None:
    """Called instead where this kernel lacks the type's data: none was made, and the agent says why (the table
    shows it off)."""
    from tapio_core.state import read_state

    disabled = read_state(agent.data_dir)["observers"]["network"]["disabled"]
    assert disabled[feature] == OFF_ON_MATRIX_KERNELS.get(release(), {})[("network", feature)], disabled
    MEASURED["detected"][type_] = "off"


def settled(agent, predicate) -> list[dict]:
    """The occurrences matching ``predicate``, once a repeat would have had time to show up."""
    time.sleep(scaled(SETTLE_S))
    return agent.matching(predicate)


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("portability")
    extra = [arg for key, value in SETTINGS.items() for arg in ("--set", f"{key}={value}")]
    with running_agent(data_dir, plugins=",".join((*OBSERVERS, "stdout", "file")), sinks=("stdout", "file"),
                       extra=extra, ready_timeout=60) as running:
        running.data_dir = data_dir
        yield running
    out = os.environ.get("TAPIO_MATRIX_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "support.json").write_text(json.dumps(MEASURED, indent=2, sort_keys=True))


def test_observers_start_as_this_kernel_allows(agent):
    from tapio_core.state import read_state

    deadline = time.monotonic() + scaled(10)
    while not (state := read_state(agent.data_dir) or {}).get("observers"):
        assert time.monotonic() < deadline, "the agent wrote no state"
        time.sleep(0.2)
    for name in OBSERVERS:
        entry = state["observers"][name]
        MEASURED["observers"][name] = {key: entry.get(key) for key in ("status", "reason", "disabled")}
    statuses = {name: state["observers"][name]["status"] for name in OBSERVERS}
    # No hardware PMU in a guest or on this machine: pmc says so and the rest runs.
    assert statuses == {"network": "running", "container": "running", "storage": "running",
                        "pmc": "running" if has_pmu() else "unsupported"}, state["observers"]


def release() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int(minor)


def test_what_this_kernel_lacks_is_off_alone_and_status_and_health_say_which_and_why(agent):
    from tapio_core.state import read_state

    observers = (read_state(agent.data_dir) or {})["observers"]
    off = {(name, feature): why for name in OBSERVERS
           for feature, why in (observers[name].get("disabled") or {}).items()}
    if release() in OFF_ON_MATRIX_KERNELS:  # elsewhere (a developer's own kernel) only what is said is checked
        assert off == OFF_ON_MATRIX_KERNELS[release()]
    said = {}
    for command in ("status", "health"):
        done = subprocess.run([str(TAPIO), command, "--json", "--data-dir", str(agent.data_dir)], capture_output=True,
                              text=True, timeout=scaled(60), env=tool_env())
        assert done.stdout, done.stderr
        report = json.loads(done.stdout)
        said[command] = ({name: entry.get("reason") or "" for name, entry in report["state"]["observers"].items()}
                         if command == "status" else {item["name"]: item["reason"] for item in report["observers"]})
    for (name, feature), why in off.items():
        assert f"{feature} ({why})" in said["status"][name], said["status"][name]
        assert f"{feature} ({why})" in said["health"][name], said["health"][name]


def has_pmu() -> bool:
    return Path("/sys/bus/event_source/devices/cpu").exists()


# -- network -----------------------------------------------------------------------------------------


def test_connection_refused(agent):
    port = closed_tcp_port("127.0.0.1")
    connector = run_connects("127.0.0.1", port)
    assert connector["attempts"][0]["errno"] == "ECONNREFUSED"
    agent.wait_for(of("connection_refused", dst_port=port))
    occ = exactly_one("connection_refused", settled(agent, of("connection_refused", dst_port=port)))
    assert (occ["data"]["pid"], occ["data"]["comm"]) == (connector["pid"], connector["comm"])
    assert occ["data"]["src_port"] == connector["attempts"][0]["src_port"]
    detected("connection_refused")


def test_connection_timeout(agent):
    port = random_port()
    with network_namespace() as netns:
        netns_exec(netns, "sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=1")
        with nft_tcp_port_rule(netns, port):
            connector = run_connects("127.0.0.1", port, netns=netns, timeout=30)
            assert connector["attempts"][0]["errno"] == "ETIMEDOUT"
            agent.wait_for(of("connection_timeout", dst_port=port))
    occ = exactly_one("connection_timeout", settled(agent, of("connection_timeout", dst_port=port)))
    assert (occ["data"]["pid"], occ["data"]["comm"]) == (connector["pid"], connector["comm"])
    # Its SYNs were dropped by the firewall, which the kernel says where it gives the reason (5.17).
    assert occ["data"].get("drop_reason") == (None if kernel_lacks(PACKET_DROPS) else "NETFILTER_DROP")
    detected("connection_timeout")


def kernel_lacks(feature: str) -> bool:
    return ("network", feature) in OFF_ON_MATRIX_KERNELS.get(release(), {})


def test_packet_drop(agent):
    port = random_port()
    dropped = of("packet_drop", dst_port=port)
    with network_namespace() as netns:
        nft_drop_counted(netns, port)
        connects(netns, port, 1)  # one SYN, closed before its retransmit
        if kernel_lacks(PACKET_DROPS):
            time.sleep(scaled(1))
            assert agent.matching(dropped) == []
            off_here("packet_drop", PACKET_DROPS, agent)
            return
        agent.wait_for(dropped)
    occ = exactly_one("packet_drop", settled(agent, dropped))
    assert (occ["data"]["drop_reason"], occ["data"]["tcp_flags"]) == ("NETFILTER_DROP", "SYN")
    detected("packet_drop")


def test_listen_overflow(agent):
    port = random_port()
    overflow = of("listen_overflow", listen_port=port)
    with network_namespace() as netns:
        done = connects(netns, port, 4, listen=True, hold_s=6)  # backlog 0, never accepting: 3 dropped
        agent.wait_for(overflow)
    occ = exactly_one("listen_overflow", settled(agent, overflow))
    assert (occ["data"]["dropped_connections"], occ["data"]["backlog"]) == (done["listen_drops"], 0)
    assert occ["data"]["pid"] == done["pid"]
    detected("listen_overflow")


def test_connection_unreachable(agent):
    port = random_port()
    with network_namespace() as netns, nft_tcp_port_rule(netns, port, "reject", "with", "icmpx", "type",
                                                          "host-unreachable"):
        connector = run_connects("127.0.0.1", port, netns=netns)
        assert connector["attempts"][0]["errno"] == "EHOSTUNREACH"
        agent.wait_for(of("connection_unreachable", dst_port=port))
    occ = exactly_one("connection_unreachable", settled(agent, of("connection_unreachable", dst_port=port)))
    assert (occ["data"]["pid"], occ["error"]["code"]) == (connector["pid"], "EHOSTUNREACH")
    detected("connection_unreachable")


def test_connection_reset_of_a_connecting_and_of_an_accepting_socket(agent):
    """The client's reset names the client; the accepted socket's reset names the server that read from it."""
    port = random_port()
    with network_namespace() as netns:
        with tcp_server(netns, "127.0.0.1", port, "reset"):
            client = run_client(netns, "127.0.0.1", port, "reset_me")
            assert client["error"] == "ECONNRESET"
            agent.wait_for(of("connection_reset", dst_port=port))
        server_port = random_port()
        with tcp_server(netns, "127.0.0.1", server_port, "recv") as server:
            run_client(netns, "127.0.0.1", server_port, "reset_server")
            assert server.wait_for("error")["error"] == "ECONNRESET"
            agent.wait_for(of("connection_reset", src_port=server_port))
    by_client = settled(agent, of("connection_reset", dst_port=port))
    by_server = agent.matching(of("connection_reset", src_port=server_port))
    assert len(by_client) == 1 and (by_client[0]["data"]["pid"], by_client[0]["data"]["comm"]) == (
        client["pid"], client["comm"])
    occ = exactly_one("connection_reset", by_server)
    assert (occ["data"]["pid"], occ["data"]["comm"], occ["data"]["owner_known"]) == (server.pid, server.comm, True)
    detected("connection_reset")


def test_retransmit_spike(agent):
    port = random_port()
    spike = of("retransmit_spike", destination=f"127.0.0.1:{port}")
    with (
        network_namespace() as netns,
        tcp_server(netns, "127.0.0.1", port, "sink"),
        nft_random_drop(netns, port, 30),
    ):
        client = run_client(netns, "127.0.0.1", port, "bulk", amount=3_000_000, timeout=120)
        agent.wait_for(spike, timeout=10)
    occ = exactly_one("retransmit_spike", settled(agent, spike))
    assert occ["data"]["retransmits"] == SETTINGS["network.retransmit_threshold"]
    assert (occ["data"]["pid"], occ["data"]["src_port"]) == (client["pid"], client["src_ports"][0])
    detected("retransmit_spike")


def test_rtt_degradation(agent):
    port = random_port()
    degraded = of("rtt_degradation", destination=SERVER_IP, dst_port=port)
    with queued_link(port) as link:
        link.learn_baseline()
        bulk = link.fill_queue()
        agent.wait_for(degraded, timeout=10)
    occ = exactly_one("rtt_degradation", settled(agent, degraded))
    assert (occ["data"]["pid"], occ["data"]["src_port"]) == (bulk["pid"], bulk["src_ports"][0])
    assert occ["data"]["current_ms"] >= 4 * occ["data"]["baseline_ms"]
    detected("rtt_degradation")


def test_rst_storm(agent, tmp_path):
    port = random_port()
    loops = compile_net_loops(tmp_path)
    threshold = SETTINGS["network.rst_storm_threshold"]
    with network_namespace() as netns:
        report = loop_report(start_refusals(loops, "127.0.0.1", port, threshold + 10, netns=netns))
        assert (report["ops"], report["errors"]) == (threshold + 10, 0)
        # Its start, then (the kernel's clock, once the window calmed down) its end with what it folded: the
        # connect whose RST crossed the threshold and the 10 after it.
        ended = of("rst_storm", destination=f"127.0.0.1:{port}", episode="ended")
        agent.wait_for(ended, timeout=SETTINGS["network.rst_storm_window_s"] + 10)
    started = exactly_one("rst_storm", settled(agent, of("rst_storm", destination=f"127.0.0.1:{port}",
                                                         episode="started")))
    end = exactly_one("rst_storm", agent.matching(ended))
    assert (started["data"]["rsts"], started["outcome"]) == (threshold, "in_progress")
    assert (end["data"]["rsts"], end["data"]["refused"]) == (10, 11)
    detected("rst_storm")


# -- container -----------------------------------------------------------------------------------------


def test_abnormal_exit(agent):
    """A container's main process (its PID namespace's init, in its own cgroup) exiting 3 is reported; the
    short-lived unshare that waited for it and exited 3 too is only counted."""
    with memory_cgroup(256 << 20) as cgroup:
        process = subprocess.Popen(in_cgroups([cgroup], ["unshare", "--pid", "--fork", "sh", "-c", "exit 3"]))
        assert process.wait(scaled(20)) == 3
        cgroup_id = cgroup.cgroup_id
        mine = lambda occ: occ["type"] == "kernel.container.abnormal_exit" and occ["data"]["cgroup_id"] == cgroup_id
        agent.wait_for(mine)
        occ = exactly_one("abnormal_exit", settled(agent, mine))
    assert (occ["data"]["exit_code"], occ["data"]["comm"], occ["data"]["main_process"]) == (3, "sh", True)
    assert occ["data"]["pid"] != process.pid  # not the unshare, whose exit is only counted
    detected("abnormal_exit")


def test_oom_kill(agent):
    with memory_cgroup(128 << 20) as cgroup:
        holder_pid, _trigger_pid = oom_kill_holder(cgroup)
        cgroup_id = cgroup.cgroup_id
        victim = lambda occ: occ["type"] == "kernel.container.oom_kill" and occ["data"]["pid"] == holder_pid
        agent.wait_for(victim)
        occ = exactly_one("oom_kill", settled(agent, victim))
    exits = agent.matching(lambda o: o["type"] == "kernel.container.abnormal_exit" and o["data"]["pid"] == holder_pid)
    assert exits == []  # its SIGKILL is the OOM kill, never a second report
    data = occ["data"]
    assert (data["cgroup_id"], data["memory_limit_bytes"]) == (cgroup_id, 128 << 20)
    assert data["memory_usage_bytes"] > 0 and data["comm"].startswith("python")
    detected("oom_kill")


# -- storage -----------------------------------------------------------------------------------------


def test_io_error(agent, tmp_path):
    with tmpfs(tmp_path / "small", "4M") as small, loop_device(sparse_file(small / "backing", 64 << 20)) as loop:
        fill(small)
        writer = direct_write(loop, bs="64k", count=4, seek=200)
        code, _ = finished(writer, timeout=scaled(30))
        assert code != 0
        agent.wait_for(on_device("kernel.storage.io_error", loop))
        occ = exactly_one("io_error", settled(agent, on_device("kernel.storage.io_error", loop)))
    assert occ["data"]["operation"] == "write"
    assert occ["error"]["code"] in ("ENOSPC", "EIO")
    detected("io_error")


def test_latency_spike(agent, tmp_path):
    with stacked_loops(tmp_path) as (ext4, upper):
        with frozen(ext4):
            writer = direct_write(upper, seek=1000)
            wait_writes_in_flight(upper, 1, timeout=scaled(10))
            time.sleep(2.0)  # the request's latency: longer than critical_ms
        assert finished(writer, timeout=scaled(30))[0] == 0
        agent.wait_for(on_device("kernel.storage.latency_spike", upper))
        occ = exactly_one("latency_spike", settled(agent, on_device("kernel.storage.latency_spike", upper)))
    assert occ["data"]["latency_ns"] >= 1500 * 1_000_000
    assert occ["data"]["operation"] == "write"
    detected("latency_spike")


# -- what doctor says against what the agent did -------------------------------------------------------


def test_doctor_says_what_the_agent_did_with_each_observer(agent):
    from tapio_core.state import read_state

    done = subprocess.run([str(TAPIO), "doctor", "--json", "--plugins", ",".join(OBSERVERS)], capture_output=True,
                          text=True, timeout=scaled(60), env=tool_env())
    checks = json.loads(done.stdout)["checks"]
    observers = (read_state(agent.data_dir) or {})["observers"]
    for name in OBSERVERS:
        group = [check for check in checks if check["group"] == f"observer {name}"]
        doctor_fails = any(check["status"] == "fail" for check in group)
        doctor_off = {check["name"] for check in group if check["status"] == "warn"}
        entry = observers[name]
        assert doctor_fails == (entry["status"] == "failed"), (name, group, entry)
        assert doctor_off == set(entry.get("disabled") or {}), (name, group, entry)
    MEASURED["doctor_matches_agent"] = True
