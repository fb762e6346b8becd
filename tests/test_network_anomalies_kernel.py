"""Retransmit spikes, RTT degradation, RST storms and connection resets, from the real kernel.

Each scenario runs in network namespaces the test creates (recipes in
/work/shared/kernel-scenarios.md, helpers in network_scenarios.py), with the
real ``tapio-agent`` configured through ``--set``, and checks the exact
occurrence type, destination, owner and counts. Counts are checked against
the kernel itself where the observer's own figures could hide a mistake: a
witness BPF program of the test's own records every retransmit, the compiled
loops report every refused connect.

Other processes on the node may reset or retransmit meanwhile, so per-destination
checks use the test's own random port, and node-wide ones only lower bounds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from kernel_helpers import (
    AGENT,
    netns_exec,
    netns_inode,
    network_namespace,
    nft_tcp_port_rule,
    observer_state,
    run_connects,
    running_agent,
    scaled,
    tool_env,
)
from network_scenarios import (
    CLIENT_IP,
    PREFIX,
    SERVER_IP,
    compile_differently,
    compile_net_loops,
    loop_report,
    nft_random_drop,
    of,
    queued_link,
    random_port,
    retransmit_witness,
    run_client,
    start_agent,
    start_refusals,
    tcp_server,
)

import tapio_observer_network
from tapio_core.bpf import tracepoint_exists
from tapio_observer_network import FAILED_RETRANSMITS
from tapio_observer_network.detect import drop_reasons
from tapio_observer_network.settings import NetworkSettings, kernel_settings

pytestmark = pytest.mark.kernel

TCP_SYN_SENT = 2
#: After the occurrence we waited for, how long a wrongly repeated one would have had to show up (scaled).
SETTLE_S = 0.5


def settings_args(**values: object) -> list[str]:
    args = []
    for key, value in values.items():
        args += ["--set", f"network.{key}={value}"]
    return args


# -- retransmits ---------------------------------------------------------------------------------


def test_retransmit_spike_is_one_occurrence_with_the_kernels_counts(tmp_path):
    threshold = 6
    port = random_port()
    settings = settings_args(retransmit_threshold=threshold, retransmit_window_s=10, retransmit_cooldown_s=600)
    with (
        network_namespace() as netns,
        running_agent(tmp_path, extra=settings) as agent,
        retransmit_witness(port) as witness,
        tcp_server(netns, "127.0.0.1", port, "sink"),
        # Input drops make the sender retransmit; output drops make some of those attempts fail.
        nft_random_drop(netns, port, 30, hooks=("input", "output")),
    ):
        # 30 % loss each way can stretch RTOs: give the transfer room on a busy machine.
        client = run_client(netns, "127.0.0.1", port, "bulk", amount=3_000_000, timeout=120)
        spike = of("retransmit_spike", destination=f"127.0.0.1:{port}")
        agent.wait_for(spike, timeout=10)
        time.sleep(scaled(SETTLE_S))
        agent.stop()
        retransmits = [(state, err) for _, state, err in witness.events() if state != TCP_SYN_SENT]
    assert len(retransmits) >= threshold, f"the scenario made only {len(retransmits)} retransmits"
    [occ] = agent.matching(spike)  # one spike: the cool-down holds back the rest
    data = occ["data"]
    assert (occ["severity"], occ["outcome"]) == ("warning", "failure")
    # The spike crossed at the threshold-th retransmit the kernel reported, failures among them included.
    assert data["retransmits"] == threshold
    if witness.has_err:
        assert data["failed_retransmits"] == sum(err != 0 for _, err in retransmits[:threshold])
    else:  # up to 6.12 the kernel does not say which attempts failed: no count, and the agent says so
        assert "failed_retransmits" not in data
        assert observer_state(tmp_path, "network")["disabled"][FAILED_RETRANSMITS] == (
            "tracepoint tcp:tcp_retransmit_skb has no field err")
    assert data["window_ms"] == 10_000
    assert (data["dst_ip"], data["dst_port"], data["src_ip"]) == ("127.0.0.1", port, "127.0.0.1")
    assert data["src_port"] == client["src_ports"][0]
    assert (data["pid"], data["comm"], data["owner_known"]) == (client["pid"], client["comm"], True)
    assert 1 <= data["segments_retransmitted"] <= client["total_retrans"]
    assert data["snd_cwnd"] >= 1
    assert "suppressed" not in data


def test_syn_retransmits_make_no_spike_but_count_on_the_timed_out_connect(tmp_path):
    port = random_port()
    with network_namespace() as netns:
        netns_exec(netns, "sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=1")
        with (
            nft_tcp_port_rule(netns, port),
            retransmit_witness(port) as witness,
            running_agent(tmp_path, extra=settings_args(retransmit_threshold=1)) as agent,
        ):
            connector = run_connects("127.0.0.1", port, netns=netns)
            assert connector["attempts"][0]["errno"] == "ETIMEDOUT"
            [timeout] = agent.wait_for(of("connection_timeout", dst_port=port))
            time.sleep(scaled(SETTLE_S))
            agent.stop()
            syn_retransmits = [event for event in witness.events() if event[1] == TCP_SYN_SENT]
    assert syn_retransmits, "the scenario made no SYN retransmit"
    assert timeout["data"]["syn_retransmits"] == len(syn_retransmits)
    assert agent.matching(of("retransmit_spike", dst_port=port)) == []


# -- RTT -------------------------------------------------------------------------------------------


def test_rtt_degradation_against_the_baseline_learned_across_connections(tmp_path):
    port = random_port()
    settings = settings_args(rtt_learn_interval_s=0.1, rtt_min_samples=5, rtt_cooldown_s=600)
    with queued_link(port) as link, running_agent(tmp_path, extra=settings) as agent:
        link.learn_baseline()
        degraded = of("rtt_degradation", destination=SERVER_IP)
        assert agent.matching(degraded) == []
        bulk = link.fill_queue()
        agent.wait_for(degraded, timeout=10)
        time.sleep(scaled(SETTLE_S))
        agent.stop()
    [occ] = agent.matching(degraded)  # once: the cool-down holds a second report back
    data = occ["data"]
    assert (occ["severity"], occ["outcome"]) == ("warning", "success")
    assert data["samples"] >= 5
    assert 0 < data["baseline_ms"] < 5  # learned from the unloaded link: well under a millisecond
    assert data["current_ms"] >= 20  # the default floor
    assert data["current_ms"] >= 4 * data["baseline_ms"]  # the default factor
    assert (data["dst_ip"], data["dst_port"], data["src_ip"]) == (SERVER_IP, port, CLIENT_IP)
    assert data["src_port"] == bulk["src_ports"][0]
    assert (data["pid"], data["comm"], data["owner_known"]) == (bulk["pid"], bulk["comm"], True)


# -- RSTs ------------------------------------------------------------------------------------------


def test_rst_storm_starts_and_ends_once_per_storm_and_folds_the_refused_connects_it_explains(tmp_path):
    port = random_port()
    loops = compile_net_loops(tmp_path)
    settings = settings_args(rst_storm_threshold=20, rst_storm_window_s=1, rst_storm_cooldown_s=0.5,
                             rst_storm_node_threshold=30, connection_burst=1000)

    def refuse(count: int) -> None:
        report = loop_report(start_refusals(loops, "127.0.0.1", port, count, netns=netns))
        assert (report["ops"], report["errors"]) == (count, 0)

    storm = of("rst_storm", destination=f"127.0.0.1:{port}")
    with network_namespace() as netns, running_agent(tmp_path, extra=settings) as agent:
        storm_netns = netns_inode(netns)
        refuse(19)  # below the threshold: no storm, and gone from the window a second later
        time.sleep(1.3)
        refuse(50)  # a storm: started at its 20th RST; that connect and the other 30 are folded into it
        agent.wait_for(storm, count=2)  # ended by the kernel's clock once it calmed down
        refuse(20)  # another storm, of 20 RSTs: only its 20th connect is folded
        agent.wait_for(storm, count=4)
        time.sleep(scaled(SETTLE_S))
        agent.stop()
    started, ended, again, ended_again = agent.matching(storm)
    where = {"scope": "destination", "window_ms": 1000, "destination": f"127.0.0.1:{port}",
             "dst_ip": "127.0.0.1", "dst_port": port, "family": "ipv4", "netns": storm_netns}
    assert started["data"] == {**where, "episode": "started", "rsts": 20, "refused": 0, "reset": 0,
                               "timestamp_ns": started["data"]["timestamp_ns"]}
    assert (started["severity"], started["outcome"]) == ("warning", "in_progress")
    assert ended["data"] == {**where, "episode": "ended", "rsts": 30, "refused": 31, "reset": 0, "suppressed": 31,
                             "duration_ms": ended["data"]["duration_ms"], "timestamp_ns": ended["data"]["timestamp_ns"]}
    assert ended["outcome"] == "failure"
    assert ended["data"]["duration_ms"] >= 1000  # no earlier than a window after its last RST
    assert (again["data"]["rsts"], again["data"]["refused"]) == (20, 0)
    assert (ended_again["data"]["rsts"], ended_again["data"]["refused"]) == (0, 1)
    node = agent.matching(of("rst_storm", scope="node"))
    assert node, "the node-wide count never crossed"
    assert all(occ["data"]["rsts"] >= 30 and "destination" not in occ["data"] for occ in node)
    # The refused connects no storm explains are each reported on their own (the limit allows them all).
    assert len(agent.matching(of("connection_refused", dst_port=port))) == 19 + 19 + 19


def test_without_the_storm_clock_a_storm_folds_nothing_and_status_says_why(monkeypatch, tmp_path):
    """Where perf events are refused (a seccomp profile), no clock ends storms: they end on their next RST as
    before, every refused connect is reported on its own, and the observer's status says so."""
    def refused(*_args, **_kwargs):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(tapio_observer_network, "start_clock", refused)
    port = random_port()
    loops = compile_net_loops(tmp_path)
    agent, sink = start_agent({"rst_storm_threshold": 20, "connection_burst": 1000, "rst_storm_node_threshold": 1000})
    try:
        reason = agent.pipeline.observers["network"].status_reason
        assert "no clock" in reason and "listen-queue overflows are not watched" in reason
        assert "Operation not permitted" in reason
        with network_namespace() as netns:
            report = loop_report(start_refusals(loops, "127.0.0.1", port, 30, netns=netns))
            assert (report["ops"], report["errors"]) == (30, 0)
            time.sleep(scaled(SETTLE_S))
            agent.drain("network")
    finally:
        agent.shutdown()
    storms = [o for o in sink.received if o.type == PREFIX + "rst_storm" and o.data.get("dst_port") == port]
    refusals = [o for o in sink.received if o.type == PREFIX + "connection_refused" and o.data["dst_port"] == port]
    assert [(o.outcome, o.data["rsts"], o.data["refused"], "episode" in o.data) for o in storms] == [
        ("failure", 20, 0, False)]
    assert len(refusals) == 30


def test_the_same_address_in_two_network_namespaces_is_two_destinations(tmp_path):
    """127.0.0.1:port in one pod is not the one in the next: 15 RSTs in each of two namespaces are two
    quiet destinations under a threshold of 20, not one storm of 30; 20 more in one are its storm."""
    port = random_port()
    loops = compile_net_loops(tmp_path)
    # A window long enough that the storm cannot calm down before the agent stops, however slow the machine.
    settings = settings_args(rst_storm_threshold=20, rst_storm_window_s=60, rst_storm_node_threshold=1000,
                             connection_burst=1000)

    def refuse(netns: str, count: int) -> None:
        report = loop_report(start_refusals(loops, "127.0.0.1", port, count, netns=netns))
        assert (report["ops"], report["errors"]) == (count, 0)

    with (
        network_namespace() as first,
        network_namespace() as second,
        running_agent(tmp_path, extra=settings) as agent,
    ):
        refuse(first, 15)
        refuse(second, 15)
        refuse(second, 5)  # the 20th RST in `second` within the window
        storm = of("rst_storm", destination=f"127.0.0.1:{port}")
        agent.wait_for(storm)
        time.sleep(scaled(SETTLE_S))
        agent.stop()
        namespaces = {netns_inode(first): "first", netns_inode(second): "second"}
    # The storm is still open when the agent stops: its end says so, with the connect it folded.
    started, at_stop = agent.matching(storm)
    assert (namespaces[started["data"]["netns"]], started["data"]["rsts"]) == ("second", 20)
    assert (at_stop["data"]["episode"], at_stop["outcome"], at_stop["data"]["refused"]) == (
        "open_at_stop", "in_progress", 1)
    assert at_stop["data"]["netns"] == started["data"]["netns"]
    refused = agent.matching(of("connection_refused", dst_port=port))
    assert sorted(namespaces[o["data"]["netns"]] for o in refused) == ["first"] * 15 + ["second"] * 19


def test_reset_by_the_server_is_attributed_to_the_client_not_the_resetting_task(tmp_path):
    port = random_port()
    with (
        network_namespace() as netns,
        running_agent(tmp_path) as agent,
        tcp_server(netns, "127.0.0.1", port, "reset") as server,
    ):
        client = run_client(netns, "127.0.0.1", port, "reset_me")
        assert client["error"] == "ECONNRESET"
        reset = of("connection_reset", dst_port=port)
        agent.wait_for(reset)
        time.sleep(scaled(SETTLE_S))
        agent.stop()
    [occ] = agent.matching(reset)
    data = occ["data"]
    assert occ["error"]["code"] == "ECONNRESET"
    assert (occ["severity"], occ["outcome"]) == ("warning", "failure")
    # On loopback the RST is processed in the server's context: the owner must still be the client.
    assert server.pid != client["pid"]
    assert (data["pid"], data["comm"], data["owner_known"]) == (client["pid"], client["comm"], True)
    assert (data["src_ip"], data["src_port"], data["dst_ip"]) == ("127.0.0.1", client["src_ports"][0], "127.0.0.1")
    assert (data["old_state"], data["new_state"]) == ("ESTABLISHED", "CLOSE")
    assert data["sock_cookie"] > 0
    assert agent.matching(of("connection_refused", dst_port=port)) == []


def test_reset_received_by_an_accepted_socket_is_attributed_to_the_server_that_read_from_it(tmp_path):
    port = random_port()
    with (
        network_namespace() as netns,
        running_agent(tmp_path) as agent,
        tcp_server(netns, "127.0.0.1", port, "recv") as server,
    ):
        client = run_client(netns, "127.0.0.1", port, "reset_server")
        assert server.wait_for("error")["error"] == "ECONNRESET"
        reset = of("connection_reset", src_port=port)
        agent.wait_for(reset)
        time.sleep(scaled(SETTLE_S))
        agent.stop()
    [occ] = agent.matching(reset)
    data = occ["data"]
    assert (data["pid"], data["comm"], data["owner_known"]) == (server.pid, server.comm, True)
    assert data["dst_port"] == client["src_ports"][0]
    assert data["old_state"] == "ESTABLISHED"


@pytest.mark.parametrize(("server_mode", "client_mode", "source"), [
    ("read", "reset_server", "reads"),  # tcp_rcv_space_adjust: every kernel
    ("send", "reset_after_reply", "sends"),  # sock_send_length: Linux 6.3 and later
])
def test_an_accepted_socket_that_only_reads_or_only_sends_is_attributed_where_the_kernel_says_who(
        tmp_path, server_mode, client_mode, source):
    """Each source of an accepted socket's owner alone. Where the kernel has none for sends, the owner
    stays unknown -- never the client, in whose context the RST arrives -- and the agent says which
    feature is off and why."""
    feature = f"owners of accepted and older sockets learned from their {source}"
    tracepoint = {"reads": "raw:tcp_rcv_space_adjust", "sends": "sock:sock_send_length"}[source]
    port = random_port()
    with (
        network_namespace() as netns,
        running_agent(tmp_path) as agent,
        tcp_server(netns, "127.0.0.1", port, server_mode) as server,
    ):
        client = run_client(netns, "127.0.0.1", port, client_mode)
        assert server.wait_for("error")["error"] == "ECONNRESET"
        reset = of("connection_reset", src_port=port)
        agent.wait_for(reset)
        time.sleep(scaled(SETTLE_S))
        agent.stop()
    [occ] = agent.matching(reset)
    data = occ["data"]
    assert data["dst_port"] == client["src_ports"][0]
    disabled = observer_state(tmp_path, "network")["disabled"]
    if tracepoint_exists(tracepoint):
        assert (data["pid"], data["comm"], data["owner_known"]) == (server.pid, server.comm, True)
        assert feature not in disabled
    else:
        assert (data["pid"], data["tid"], data["comm"], data["owner_known"]) == (0, 0, "", False)
        assert disabled[feature] == f"the kernel has no tracepoint {tracepoint}"


def test_reset_of_a_socket_whose_owner_never_showed_has_no_pid_rather_than_a_wrong_one(tmp_path):
    port = random_port()
    with (
        network_namespace() as netns,
        running_agent(tmp_path) as agent,
        tcp_server(netns, "127.0.0.1", port, "silent") as server,
    ):
        client = run_client(netns, "127.0.0.1", port, "abort")
        server.wait_for("accepted")
        reset = of("connection_reset", src_port=port)
        agent.wait_for(reset)
        agent.stop()
    [occ] = agent.matching(reset)
    data = occ["data"]
    # The RST ran in the client's context and the server never read: nobody is known to own it.
    assert (data["pid"], data["tid"], data["comm"], data["cgroup_id"], data["owner_known"]) == (0, 0, "", 0, False)
    assert data["dst_port"] == client["src_ports"][0]


def test_an_invalid_setting_stops_the_agent_with_one_line_naming_the_key(tmp_path):
    done = subprocess.run(
        [str(AGENT), "--plugins", "network,stdout", "--sink", "stdout", "--data-dir", str(tmp_path),
         "--set", "network.retransmit_window_s=0"],
        capture_output=True, text=True, timeout=scaled(60), env=tool_env(), cwd=tmp_path,
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert lines == ["tapio-agent: error: config [network]: 'retransmit_window_s' must be >= 0.01: 0.0"]
    assert done.stdout == ""


# -- storm safety (in-process agent: records and losses counted exactly) -------------------------------


def test_settings_reach_the_kernel_map_as_written():
    settings = {"retransmit_threshold": 7, "rst_storm_window_s": 2.5, "rtt_factor": 3.0, "connection_burst": 9}
    agent, _ = start_agent(settings)
    try:
        leaf = agent.pipeline.observers["network"].bpf["network_settings"][0]
        in_kernel = {name: getattr(leaf, name) for name, *_ in leaf._fields_}
        in_kernel["ignored_drops"] = list(in_kernel["ignored_drops"])
    finally:
        agent.shutdown()
    # The clock runs; the routine drops are ignored by this kernel's numbers for them.
    assert in_kernel == kernel_settings(NetworkSettings(**settings), storm_clock=True, drop_reasons=drop_reasons())
    assert any(in_kernel["ignored_drops"]) == bool(drop_reasons())  # none to ignore before 5.17
    assert (in_kernel["retransmit_threshold"], in_kernel["rst_slot_ns"], in_kernel["rtt_factor_x16"]) == (
        7, 312_500_000, 48)


@pytest.mark.parametrize("source", ["syn_segment", "retrans_stamp", "clock"])
def test_a_refused_connects_duration_comes_from_the_socket_or_else_the_clock(monkeypatch, source):
    """Exact from the SYN's own transmit time; to the millisecond from tcp_sock.retrans_stamp when the
    kernel's BTF has no retransmit queue to read it from; from a clock read at SYN_SENT without either."""
    missing = {"syn_segment": set(), "retrans_stamp": {"TAPIO_SK_RTX_QUEUE_OFFSET"},
               "clock": {"TAPIO_SK_RTX_QUEUE_OFFSET", "TAPIO_TCP_RETRANS_STAMP_OFFSET"}}[source]
    compile_differently(monkeypatch, missing=frozenset(missing))
    agent, sink = start_agent({})
    try:
        port = random_port()
        connector = run_connects("127.0.0.1", port)
        assert connector["attempts"][0]["errno"] == "ECONNREFUSED"
        deadline = time.monotonic() + scaled(5)
        refused = []
        while not refused and time.monotonic() < deadline:
            agent.drain("network")
            refused = [o.data for o in sink.received
                       if o.type == PREFIX + "connection_refused" and o.data["dst_port"] == port]
            time.sleep(0.02)
    finally:
        agent.shutdown()
    [data] = refused
    duration, timed = data["connect_duration_ns"], connector["attempts"][0]["duration_ns"]
    syn_sent = data["timestamp_ns"] - duration
    if source == "retrans_stamp":
        assert syn_sent % 1_000_000 == 0 and 0 <= duration < timed + 1_000_000
    else:
        assert syn_sent % 1_000_000 != 0 and 0 < duration < timed


#: N connections to a listener of its own, kept open; a forked child (another pid, same comm) then
#: resets each from the accepting end (SO_LINGER 0) while the parent, which connected them all, waits
#: for its N ECONNRESETs. Prints the parent's and the child's pid, the port and the client ports.
RESET_MANY = r"""
import errno, json, os, socket, struct, sys
n = int(sys.argv[1])
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(n)
port = listener.getsockname()[1]
clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(n)]
accepted = [listener.accept()[0] for _ in range(n)]
child = os.fork()
if child == 0:
    for conn in accepted:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()
    os._exit(0)
for conn in accepted:
    conn.close()  # the child's copies are the last: its close is what resets
os.waitpid(child, 0)
errors = []
for c in clients:
    try:
        c.recv(1)
        errors.append(None)
    except OSError as exc:
        errors.append(errno.errorcode.get(exc.errno))
print(json.dumps({"pid": os.getpid(), "resetter": child, "port": port,
                  "src_ports": [c.getsockname()[1] for c in clients], "errors": errors}))
"""


@pytest.mark.parametrize("bucket_bits", [None, 1])
def test_a_full_owner_table_forgets_owners_but_never_names_a_wrong_one(monkeypatch, bucket_bits):
    """The table of socket owners compiled with 2 buckets of 4 ways (bucket_bits 1) cannot hold 40 live
    connections: the sockets it lost are reported without an owner and counted untracked, the others
    with the process that connected them. At its real size (None) it remembers all 40."""
    count = 40
    if bucket_bits is not None:
        compile_differently(monkeypatch, cflags=(f"-DOWNER_BUCKET_BITS={bucket_bits}",))
    agent, sink = start_agent({"connection_burst": 1000, "rst_storm_threshold": 1000})
    observer = agent.pipeline.observers["network"]
    try:
        with network_namespace() as netns:
            done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", RESET_MANY, str(count)],
                                  capture_output=True, text=True, timeout=scaled(30), check=True)
            report = json.loads(done.stdout)
            assert report["errors"] == ["ECONNRESET"] * count
            deadline = time.monotonic() + scaled(5)
            while time.monotonic() < deadline:
                agent.drain("network")
                resets = [o.data for o in sink.received
                          if o.type == PREFIX + "connection_reset" and o.data["dst_port"] == report["port"]]
                if len(resets) >= count:
                    break
                time.sleep(0.05)
        agent.housekeeping()
        untracked = observer.counters["untracked"]
    finally:
        agent.shutdown()
    assert sorted(d["src_port"] for d in resets) == sorted(report["src_ports"])
    known = [d for d in resets if d["owner_known"]]
    assert {d["pid"] for d in known} <= {report["pid"]}  # never the resetting child, whose softirq ran it
    assert all((d["pid"], d["comm"]) == (0, "") for d in resets if not d["owner_known"])
    if bucket_bits is None:
        assert (len(known), untracked) == (count, 0)
    else:
        assert 1 <= len(known) <= 4 << bucket_bits
        assert untracked >= count - (4 << bucket_bits)


def storms_of(sink, port: int) -> list[dict]:
    return [o for o in sink.received if o.type == PREFIX + "rst_storm" and o.data.get("dst_port") == port]


def drain_until_storm_ends(agent, sink, port: int, ends: int) -> None:
    """Drain until ``port`` has ``ends`` ended storms: the kernel's clock ends one once it calmed down."""
    deadline = time.monotonic() + scaled(10)
    while sum(o.data.get("episode") == "ended" for o in storms_of(sink, port)) < ends:
        assert time.monotonic() < deadline, [o.data for o in storms_of(sink, port)]
        agent.drain("network")
        time.sleep(0.05)


def refused_accounted(sink, port: int) -> int:
    """Refused connects to ``port`` the occurrences account for: their own, their suppressed counts, and
    those their storms folded."""
    refused = [o.data for o in sink.received if o.type == PREFIX + "connection_refused" and o.data["dst_port"] == port]
    return (len(refused) + sum(d.get("suppressed", 0) for d in refused)
            + sum(o.data["refused"] for o in storms_of(sink, port)))


def test_a_burst_of_refused_connects_is_a_storm_that_folds_them_into_a_few_occurrences(tmp_path):
    """3,000 refused connects to one closed port with the default settings: a few connection_refused,
    then one storm that starts (in progress) and ends (its clock) with the rest counted in it; every
    connect is in exactly one place, and every RST in the storm's counts."""
    connects = 3000
    port = random_port()
    loops = compile_net_loops(tmp_path)
    agent, sink = start_agent({})
    try:
        with network_namespace() as netns:
            report = loop_report(start_refusals(loops, "127.0.0.1", port, connects, netns=netns))
            assert (report["ops"], report["errors"]) == (connects, 0), report
            drain_until_storm_ends(agent, sink, port, 1)
            time.sleep(scaled(SETTLE_S))
            agent.drain("network")
    finally:
        agent.shutdown()
    naming = [o for o in sink.received if o.data.get("dst_port") == port]
    defaults = NetworkSettings()
    assert len(naming) <= 25, [(o.type, o.data) for o in naming]
    start, end = (o.data for o in storms_of(sink, port))
    assert (start["episode"], end["episode"]) == ("started", "ended")
    assert start["rsts"] == defaults.rst_storm_threshold
    assert start["rsts"] + end["rsts"] == connects  # one RST refused each connect
    assert end["reset"] == 0 and end["suppressed"] == end["refused"] > 0
    assert refused_accounted(sink, port) == connects
    refused = [o for o in naming if o.type == PREFIX + "connection_refused"]
    assert len(refused) == defaults.connection_burst  # the burst, then all the rest in the storm


def test_a_million_refused_connects_cross_as_a_bounded_number_of_records_with_exact_suppressed_counts(tmp_path):
    per_port = 500_000
    first = random_port()
    ports = (first, 10000 + (first - 10000 + 11000) % 22000)  # two distinct ones
    threshold = 50
    loops = compile_net_loops(tmp_path)
    agent, sink = start_agent({
        "connection_rate_per_s": 1, "connection_burst": 5, "rst_storm_threshold": threshold,
        "rst_storm_window_s": 1, "rst_storm_cooldown_s": 0, "rst_storm_node_threshold": 1000,
    })
    observer = agent.pipeline.observers["network"]

    def refuse_all(netns: str, count: int, storms: int | None) -> None:
        loops_running = [start_refusals(loops, "127.0.0.1", port, count, netns=netns) for port in ports]
        while any(process.poll() is None for process in loops_running):
            agent.drain("network")
            time.sleep(0.05)
        for process in loops_running:
            report = loop_report(process)
            assert (report["ops"], report["errors"]) == (count, 0), report
        for port in ports:
            if storms:
                drain_until_storm_ends(agent, sink, port, storms)
        agent.drain("network")

    try:
        with network_namespace() as netns:
            refuse_all(netns, per_port, 1)  # one storm per port, both ports at once
            refuse_all(netns, threshold, 2)  # a second storm per port
            refuse_all(netns, 1, None)  # and a last refusal, sent: the limiter earned credit meanwhile
            time.sleep(scaled(0.2))
            agent.drain("network")
        agent.housekeeping()  # reads the kernel's counts
        records, lost, counters = observer.records, observer.lost, dict(observer.counters)
    finally:
        agent.shutdown()
    events = len(ports) * (per_port + threshold + 1)
    assert lost == 0
    assert records / events <= 0.0001, f"{records} records for {events} refused connects"
    for port in ports:
        # Every refused connect is in exactly one place: its own occurrence, a later one's suppressed count,
        # or a storm's.
        assert refused_accounted(sink, port) == per_port + threshold + 1
        storms = [o.data for o in storms_of(sink, port)]
        assert [(d["episode"], d["rsts"]) for d in storms] == [
            ("started", threshold), ("ended", per_port - threshold), ("started", threshold), ("ended", 0)]
        assert [d["refused"] > 0 for d in storms] == [True, True, True, True]
    # Node-wide, in the kernel: at least what the two ports' keys held back and folded; all of it reached
    # userspace in records.
    held_back = sum(o.data.get("suppressed", 0) for o in sink.received if o.data.get("dst_port") in ports)
    assert counters["suppressed"] >= held_back >= 2 * per_port
    assert counters["suppressed_reported"] >= held_back
    assert counters["untracked"] == 0
