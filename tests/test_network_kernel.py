"""The network observer and the agent end to end, on the real kernel.

Each test starts the real ``tapio-agent`` (a subprocess), makes the kernel refuse
or time out a TCP connect from a process whose pid it knows, and checks what the
agent printed. Refusals happen on loopback; timeouts inside a throwaway network
namespace with an nft drop rule (recipes in /work/shared/kernel-scenarios.md).

Other processes on the node may fail connects while a test runs, so every
count is taken over the occurrences for the test's own port.
"""

from __future__ import annotations

import json
import secrets
import stat
import subprocess
import time
from pathlib import Path

import attrs
import pytest
from kernel_helpers import (
    AGENT,
    TAPIO,
    bpf_prog_ids_of,
    closed_tcp_port,
    loaded_bpf_programs,
    netns_exec,
    netns_inode,
    network_namespace,
    nft_tcp_port_rule,
    run_connects,
    running_agent,
    scaled,
    tool_env,
)
from plugin_helpers import install_on_path

import tapio_observer_network
from tapio_core.bpf import load_observer, tracepoint_has_field
from tapio_core.btf import Btf

pytestmark = pytest.mark.kernel

REFUSED = "kernel.network.connection_refused"
TIMEOUT = "kernel.network.connection_timeout"
#: After the occurrence we wait for, how long anything wrongly emitted for the same
#: connect would have had to show up (it would come from the same state change); scaled.
SETTLE_S = 0.5


def for_port(type_: str, port: int):
    return lambda occ: occ["type"] == type_ and occ["data"].get("dst_port") == port


def assert_refused(occ: dict, connector: dict, host: str, port: int, family: str) -> None:
    assert occ["severity"] == "warning"
    assert occ["outcome"] == "failure"
    assert occ["error"]["code"] == "ECONNREFUSED"
    data = occ["data"]
    assert (data["pid"], data["comm"]) == (connector["pid"], connector["comm"])
    assert (data["src_ip"], data["dst_ip"]) == (host, host)
    assert (data["src_port"], data["dst_port"]) == (connector["attempts"][0]["src_port"], port)
    assert (data["family"], data["protocol"]) == (family, "tcp")
    assert (data["old_state"], data["new_state"]) == ("SYN_SENT", "CLOSE")
    assert data["netns"] == netns_inode()
    # From the SYN's own transmit time (read from the socket, not a clock on every connect): the
    # kernel's part of what the connector timed around connect().
    assert 0 < data["connect_duration_ns"] < connector["attempts"][0]["duration_ns"]


# -- refused ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "family"), [("127.0.0.1", "ipv4"), ("::1", "ipv6")])
def test_refused_connect_is_one_occurrence_attributed_to_the_connector(tmp_path, host, family):
    port = closed_tcp_port(host)
    # `tapio-agent --plugins network,stdout`, no --sink: the sink --plugins names is the one that runs.
    with running_agent(tmp_path, plugins="network,stdout", sinks=()) as agent:
        connector = run_connects(host, port)
        assert connector["attempts"][0]["errno"] == "ECONNREFUSED"
        agent.wait_for(for_port(REFUSED, port))
        time.sleep(scaled(SETTLE_S))
        agent.stop()
    refused = agent.matching(for_port(REFUSED, port))
    assert len(refused) == 1, refused
    assert_refused(refused[0], connector, host, port, family)
    assert agent.matching(for_port(TIMEOUT, port)) == []


def test_many_refused_connects_reusing_socket_addresses_are_each_reported_once(tmp_path):
    count = 200
    port = closed_tcp_port("127.0.0.1")
    unlimited = ["--set", "network.connection_burst=1000", "--set", "network.rst_storm_threshold=1000"]
    with running_agent(tmp_path, extra=unlimited) as agent:
        connector = run_connects("127.0.0.1", port, count=count)
        assert {a["errno"] for a in connector["attempts"]} == {"ECONNREFUSED"}
        agent.wait_for(for_port(REFUSED, port), timeout=10, count=count)
        time.sleep(scaled(SETTLE_S))
        agent.stop()
    refused = agent.matching(for_port(REFUSED, port))
    assert len(refused) == count
    assert len({occ["id"] for occ in refused}) == count
    assert {occ["data"]["pid"] for occ in refused} == {connector["pid"]}
    assert sorted(occ["data"]["src_port"] for occ in refused) == sorted(a["src_port"] for a in connector["attempts"])
    assert agent.matching(for_port(TIMEOUT, port)) == []


# -- timed out -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("host", "family"), [("127.0.0.1", "ipv4"), ("::1", "ipv6")])
def test_timed_out_connect_is_attributed_to_the_connector_not_the_timer(tmp_path, host, family):
    port = 20000 + secrets.randbelow(20000)  # not 5555: other tests on this node may use the recipe's port
    with network_namespace() as netns:
        # The connect gives up after ~3 s instead of ~2 minutes; this sysctl governs IPv6 too.
        netns_exec(netns, "sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=1")
        with nft_tcp_port_rule(netns, port), running_agent(tmp_path) as agent:
            connector = run_connects(host, port, netns=netns)
            timed_out_in = netns_inode(netns)
            assert connector["attempts"][0]["errno"] == "ETIMEDOUT"
            agent.wait_for(for_port(TIMEOUT, port))
            time.sleep(scaled(SETTLE_S))
            agent.stop()
    timeouts = agent.matching(for_port(TIMEOUT, port))
    assert len(timeouts) == 1, timeouts
    occ = timeouts[0]
    assert (occ["data"]["pid"], occ["data"]["comm"]) == (connector["pid"], connector["comm"])
    assert occ["data"]["syn_retransmits"] >= 1
    assert occ["data"]["netns"] == timed_out_in
    # From tcp_sock.retrans_stamp (the first SYN's time, to the millisecond): ~3 s, as the connector saw, which
    # also timed its own Python around connect() (20 ms here, more on a slower CPU: scaled).
    timed = connector["attempts"][0]["duration_ns"]
    assert timed - scaled(0.02) * 1e9 < occ["data"]["connect_duration_ns"] < timed + 2_000_000
    assert (occ["data"]["family"], occ["data"]["src_ip"], occ["data"]["dst_ip"]) == (family, host, host)
    assert occ["data"]["src_port"] == connector["attempts"][0]["src_port"]
    assert (occ["data"]["old_state"], occ["data"]["new_state"]) == ("SYN_SENT", "CLOSE")
    assert occ["error"]["code"] == "ETIMEDOUT"
    assert occ["outcome"] == "timeout"
    assert agent.matching(for_port(REFUSED, port)) == []


# -- the agent -------------------------------------------------------------------------------------


def test_replay_of_a_recording_prints_what_the_agent_printed(tmp_path):
    recording = tmp_path / "network.rec"
    port = closed_tcp_port("127.0.0.1")
    with running_agent(tmp_path, record=recording) as agent:
        run_connects("127.0.0.1", port)
        agent.wait_for(for_port(REFUSED, port))
        assert agent.stop() == 0
    replay = subprocess.run(
        [str(TAPIO), "replay", str(recording), "--sink", "stdout", "--plugins", "network,stdout",
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=scaled(30), env=tool_env(), cwd=tmp_path,
    )
    assert replay.returncode == 0, replay.stderr
    replayed = [json.loads(line) for line in replay.stdout.splitlines() if line.strip()]
    assert replayed == agent.occurrences
    assert len([occ for occ in replayed if for_port(REFUSED, port)(occ)]) == 1


def test_sigterm_stops_the_agent_cleanly_and_detaches_its_programs(tmp_path):
    with running_agent(tmp_path) as agent:
        programs = bpf_prog_ids_of(agent.pid)
        names = loaded_bpf_programs()
        assert "tracepoint__sock__inet_sock_set_state" in {names.get(prog) for prog in programs}
        # Compiled apart: bcc and LLVM never enter the agent's own process.
        mapped = Path(f"/proc/{agent.pid}/maps").read_text()
        assert "libbcc" not in mapped and "libLLVM" not in mapped and "libclang" not in mapped
        assert agent.stop(timeout=5) == 0
    # Program ids are never reused; the kernel frees a program once its last reference goes.
    deadline = time.monotonic() + scaled(5)
    while programs & loaded_bpf_programs().keys() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert programs & loaded_bpf_programs().keys() == set()
    assert "Traceback" not in agent.stderr_text()


def test_file_sink_writes_private_files_that_tapio_recent_reads(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port = closed_tcp_port("127.0.0.1")
    with running_agent(data_dir, plugins="network,file", sinks=()) as agent:
        connector = run_connects("127.0.0.1", port)
        # The record is in the ring buffer once connect() returned; shutdown drains and writes it.
        assert agent.stop() == 0
    recent = subprocess.run(
        [str(TAPIO), "recent", "--data-dir", str(data_dir), "--json", "-n", "1000"],
        capture_output=True, text=True, timeout=scaled(30), env=tool_env(),
    )
    assert recent.returncode == 0, recent.stderr
    printed = [json.loads(line) for line in recent.stdout.splitlines() if line.strip()]
    ours = [occ for occ in printed if for_port(REFUSED, port)(occ)]
    assert len(ours) == 1, printed
    assert_refused(ours[0], connector, "127.0.0.1", port, "ipv4")
    directory = data_dir / "occurrences"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    files = list(directory.iterdir())
    assert files
    assert {oct(stat.S_IMODE(path.stat().st_mode)) for path in files} == {oct(0o600)}


def test_without_privileges_the_agent_exits_2_with_one_error_line():
    unprivileged = [
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
    ]
    done = subprocess.run(
        [*unprivileged, str(AGENT), "--plugins", "network"],
        capture_output=True, text=True, timeout=scaled(30), cwd="/", env=tool_env({"HOME": "/"}),
    )
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("tapio-agent: error:")
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


BROKEN_PLUGIN = '''
"""A throwaway observer plugin whose BPF source does not compile."""
from pathlib import Path

from tapio_core import ObserverSpec, hookimpl, record_dtype

OBSERVER = ObserverSpec(
    name="broken",
    bpf_source=Path(__file__).with_name("broken.bpf.c"),
    record_dtype=record_dtype([("timestamp_ns", "<u8")]),
    tracepoints=("sock:inet_sock_set_state",),
)


@hookimpl
def tapio_register_observers(register):
    register(OBSERVER)


@hookimpl
def tapio_detect_anomalies(observer, events):
    return []
'''


def test_an_observer_that_fails_to_load_does_not_stop_the_others(tmp_path):
    pythonpath = install_on_path(tmp_path / "site", "broken", "tapio_test_broken", BROKEN_PLUGIN, {
        "broken.bpf.c": "TRACEPOINT_PROBE(sock, inet_sock_set_state) { this is not C; }\n"})
    port = closed_tcp_port("127.0.0.1")
    with running_agent(tmp_path, plugins="network,broken,stdout", env={"PYTHONPATH": pythonpath}) as agent:
        errors = [line for line in agent.stderr_lines if "ERROR" in line and "broken" in line]
        assert errors, agent.stderr_text()
        ready = next(line for line in agent.stderr_lines if line.startswith("tapio-agent: running observers"))
        assert "network" in ready and "broken" not in ready
        run_connects("127.0.0.1", port)
        agent.wait_for(for_port(REFUSED, port))
        time.sleep(scaled(SETTLE_S))
        assert agent.process.poll() is None, agent.stderr_text()
        assert agent.stop() == 0


def test_on_a_kernel_whose_retransmit_tracepoint_lacks_err_the_observer_still_compiles():
    """tcp_retransmit_skb has ``err`` only after 6.12; naming it elsewhere would fail the whole compile."""
    feature = "failed retransmit attempts told apart in retransmit spikes"
    spec = tapio_observer_network.OBSERVER
    older = attrs.evolve(spec, tracepoint_fields=tuple(
        attrs.evolve(field, field="no_such_field") for field in spec.tracepoint_fields))
    bpf, disabled = load_observer(older, None, Btf.load())
    bpf.close()
    assert feature in disabled
    bpf, disabled = load_observer(spec, None, Btf.load())  # as this kernel has it, or not
    bpf.close()
    assert (feature in disabled) == (not tracepoint_has_field("tcp:tcp_retransmit_skb", "err"))


def test_kernel_helpers_clean_up_their_namespace_and_table():
    with network_namespace() as netns, nft_tcp_port_rule(netns, 5555):
        assert "tapio_test" in netns_exec(netns, "nft", "list", "tables").stdout
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert netns not in listed
