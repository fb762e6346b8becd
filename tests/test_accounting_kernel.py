"""Nothing lost without a count, on the real kernel: every record the kernel produced is delivered,
suppressed by a rate limit, counted lost, or dropped by a sink that counts it, and the sum is exact:
with a ring too small for a burst, with a sink's endpoint down during one, and when SIGTERM comes in a
storm (SIGKILL then leaves nothing `tapio` trips on).

The bursts are refused connects inside network namespaces the tests made; storms are turned off so
each connect is one record. Where the agent runs in this process the test decides when it drains,
and checks that no one else's record came through (a lost record carries no port: the sum is only
exact while the test's are the only ones).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_servers import Receiver
from kernel_helpers import TAPIO, closed_tcp_port, network_namespace, run_connects, running_agent, scaled, tool_env
from plugin_helpers import Collect

from tapio_core.agent import Agent
from tapio_core.config import ConfigError, split_ring_pages
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions
from tapio_core.state import read_state

REFUSED = "kernel.network.connection_refused"
#: Far more than a one-page ring holds (about 4 KiB of records).
BURST = 1500
NO_LIMITS = {"connection_burst": 1_000_000, "connection_rate_per_s": 1_000_000.0,
             "rst_storm_threshold": 1_000_000, "rst_storm_node_threshold": 1_000_000}


def network_agent(tmp_path: Path, settings: dict, sinks: tuple[str, ...] = ("collect",)) -> tuple[Agent, Collect]:
    sink = Collect()
    loaded = load_plugins(allow={"network", "http"}, extra=[("collect", sink)])
    pipeline = Pipeline.build(loaded, list(sinks), SinkOptions(data_dir=tmp_path), settings, KernelClock())
    agent = Agent(loaded, pipeline, recorder=None)
    agent.load(None)
    assert pipeline.observers["network"].status == "running", pipeline.observers["network"].status_reason
    return agent, sink


def drain_all(agent: Agent, name: str) -> None:
    while agent.drain(name):
        pass
    agent.housekeeping()


@pytest.mark.kernel
@pytest.mark.parametrize(("ring_pages", "limits", "expect_lost"), [
    (1, NO_LIMITS, True),  # the ring overflows: lost, counted
    (64, {**NO_LIMITS, "connection_burst": 100, "connection_rate_per_s": 0.001}, False),  # the limit holds back
])
def test_every_refused_connect_is_delivered_suppressed_or_counted_lost(tmp_path, ring_pages, limits, expect_lost):
    agent, sink = network_agent(tmp_path, {"network": {"ring_pages": ring_pages, **limits}})
    observer = agent.pipeline.observers["network"]
    try:
        assert agent.pipeline.observers["network"].bpf["events"].max_entries == ring_pages * 4096
        with network_namespace() as netns:
            port = closed_tcp_port("127.0.0.1")
            connector = run_connects("127.0.0.1", port, count=BURST, netns=netns)  # nothing drained meanwhile
        assert {a["errno"] for a in connector["attempts"]} == {"ECONNREFUSED"}
        drain_all(agent, "network")
    finally:
        agent.shutdown()
    delivered = [o for o in sink.received if o.type == REFUSED and o.data["dst_port"] == port]
    others = [o for o in sink.received if o not in delivered]
    assert others == []  # only the test's records were in the ring: the lost ones were the test's too
    suppressed = observer.counters["suppressed"]
    assert len(delivered) + suppressed + observer.lost == BURST
    assert observer.records == len(delivered)
    if expect_lost:
        assert observer.lost > 0 and suppressed == 0
        assert agent.state()["observers"]["network"]["lost"] == observer.lost  # what status and metrics show
    else:
        assert observer.lost == 0 and len(delivered) == 100 and suppressed == BURST - 100


@pytest.mark.parametrize("pages", [0, 3, 32768, "64", True, 1.5])
def test_a_ring_size_that_is_not_a_power_of_two_in_range_is_one_clear_error(pages):
    with pytest.raises(ConfigError, match=r"config \[network\]: 'ring_pages' must be a power of two from 1 to 16384"):
        split_ring_pages("network", {"network": {"ring_pages": pages}})


def test_ring_pages_is_the_cores_key_and_leaves_the_plugins_settings_alone():
    assert split_ring_pages("network", {"network": {"ring_pages": 8, "rst_storm_threshold": 5}}) == (
        8, {"network": {"rst_storm_threshold": 5}})
    assert split_ring_pages("network", {}) == (64, {})


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.kernel
def test_an_endpoint_down_during_a_burst_loses_nothing_but_what_the_sink_counts(tmp_path):
    """The kernel refuses connects in rounds while the agent detects and drains; the http sink's endpoint
    is down for the first rounds (seconds), then comes back: every occurrence is delivered, or dropped
    from the sink's full queue and counted. Nothing else is lost."""
    rounds, per_round, down_rounds = 8, 100, 4
    port = free_port()
    http = {"endpoint": f"http://127.0.0.1:{port}/ingest", "queue_size": 150, "batch_max_count": 50,
            "batch_max_age_s": 0.05, "max_retries": 10_000, "backoff_initial_s": 0.05, "backoff_max_s": 0.2,
            "shutdown_timeout_s": 30.0}
    agent, collected = network_agent(tmp_path, {"network": NO_LIMITS, "http": http}, sinks=("collect", "http"))
    sink = next(s for s in agent.pipeline.sinks if s.name == "http")
    receiver, stopped = None, False
    try:
        with network_namespace() as netns:
            target = closed_tcp_port("127.0.0.1")
            for round_ in range(rounds):
                if round_ == down_rounds:
                    assert sink.counters.get("retried", 0) > 0  # it was trying the dead endpoint meanwhile
                    receiver = Receiver(port=port).__enter__()
                run_connects("127.0.0.1", target, count=per_round, netns=netns)
                drain_all(agent, "network")  # detection goes on, outage or not
                time.sleep(0.5)
        agent.shutdown()  # drains, then flushes the sinks within their deadline
        stopped = True
        assert receiver is not None
        received = [occ["id"] for request in receiver.received for occ in json.loads(request.body)]
    finally:
        if not stopped:
            agent.shutdown()
        if receiver is not None:
            receiver.stop()
    produced = rounds * per_round
    observer = agent.pipeline.observers["network"]
    ours = [o for o in collected.received if o.data.get("dst_port") == target]
    assert len(ours) == produced  # every refusal detected: none lost or held back
    assert observer.lost == 0 and observer.counters["suppressed"] == 0
    # The rest: the sink's own connects to its dead endpoint, which the kernel refused as well.
    assert {(o.type, o.data["dst_port"]) for o in collected.received if o not in ours} <= {(REFUSED, port)}
    counts = sink.counters
    assert counts["emitted"] == len(collected.received)
    assert counts["dropped"] > 0 and counts["failed"] == 0
    assert counts["delivered"] + counts["dropped"] == counts["emitted"]  # the sink's own accounting is exact ...
    assert len(received) == len(set(received)) == counts["delivered"]  # ... and is what the endpoint got
    assert set(received) <= {o.id for o in collected.received}


#: Refused connects to 127.0.0.1:PORT, as fast as they come, until SIGTERM: then it prints how many.
STORM_SCRIPT = r"""
import signal, socket, sys
port, refused, stopping = int(sys.argv[1]), 0, []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))  # the connect under way is still counted
print("started", flush=True)
while not stopping:
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", port))
        except ConnectionRefusedError:
            refused += 1
print(refused, flush=True)
"""


@contextlib.contextmanager
def connect_storm(port: int) -> Iterator[subprocess.Popen]:
    """A refused-connect storm inside a network namespace of its own; stopped (and the namespace gone) after."""
    with network_namespace() as netns:
        storm = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", STORM_SCRIPT, str(port)],
                                 stdout=subprocess.PIPE, text=True)
        try:
            assert storm.stdout.readline() == "started\n"
            yield storm
        finally:
            if storm.poll() is None:
                storm.kill()
            storm.communicate()


def stop_storm(storm: subprocess.Popen) -> int:
    """SIGTERM the storm; how many connects the kernel refused it."""
    storm.send_signal(signal.SIGTERM)
    out, _ = storm.communicate(timeout=scaled(30))
    return int(out.split()[-1])


UNLIMITED = [f"--set=network.{key}={value}" for key, value in NO_LIMITS.items()]


def for_port(port: int):
    return lambda occ: occ["type"] == REFUSED and occ["data"].get("dst_port") == port


@pytest.mark.kernel
def test_sigterm_in_a_storm_drains_and_flushes_and_the_last_state_holds_the_final_counts(tmp_path):
    port = closed_tcp_port("127.0.0.1")
    with running_agent(tmp_path, plugins="network,stdout,file", sinks=("stdout", "file"), extra=UNLIMITED) as agent, \
            connect_storm(port) as storm:
        agent.wait_for(for_port(port), timeout=10, count=200)
        os.kill(agent.pid, signal.SIGSTOP)  # behind the storm, however fast it reads on this machine
        try:
            time.sleep(0.5)
            refused = stop_storm(storm)
            backlog = refused - len(agent.occurrences)
            agent.process.send_signal(signal.SIGTERM)  # waiting for it when it wakes, behind
        finally:
            os.kill(agent.pid, signal.SIGCONT)
        assert agent.stop() == 0
    state = read_state(tmp_path)
    assert state["agent"]["running"] is False
    network, sinks = state["observers"]["network"], state["sinks"]
    ours = agent.matching(for_port(port))
    assert backlog > 0
    # Every refusal the kernel produced was detected and sent, or counted lost when the ring was full;
    # the state written last carries the final counts, and both sinks agree with it.
    assert len(ours) + network["lost"] == refused, (network, agent.stderr_text()[-3000:])
    assert network["anomalies"] == len(agent.occurrences) == sinks["stdout"]["delivered"]
    assert sinks["file"]["delivered"] == network["anomalies"] and sinks["file"]["failed"] == 0
    assert network["dropped_batches"] == 0
    recent = subprocess.run([str(TAPIO), "recent", "--data-dir", str(tmp_path), "--since", "1h", "--json",
                             "-n", "1000000"], capture_output=True, text=True, timeout=scaled(60), env=tool_env())
    assert recent.returncode == 0, recent.stderr
    assert sorted(json.loads(line)["id"] for line in recent.stdout.splitlines()) == sorted(
        occ["id"] for occ in agent.occurrences)
    assert "Traceback" not in agent.stderr_text()


@pytest.mark.kernel
def test_sigkill_in_a_storm_leaves_nothing_tapio_trips_on(tmp_path):
    port = closed_tcp_port("127.0.0.1")
    with running_agent(tmp_path, plugins="network,file", sinks=("file",), extra=UNLIMITED) as agent, \
            connect_storm(port):
        deadline = time.monotonic() + scaled(10)
        while not list((tmp_path / "occurrences").glob("*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # writing the whole while
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait()
    assert read_state(tmp_path)["observers"]["network"]["status"] == "running"  # its last word, whole
    for command in (["status"], ["health"], ["recent", "--since", "1h", "-n", "1000000", "--json"]):
        done = subprocess.run([str(TAPIO), *command, "--data-dir", str(tmp_path)], capture_output=True, text=True,
                              timeout=scaled(60), env=tool_env())
        assert "Traceback" not in done.stderr, (command, done.stderr)
        # status: 3, no agent runs; health: 0-2 by what it read (a storm is critical); recent: 0.
        assert done.returncode in {"status": (3,), "health": (0, 1, 2), "recent": (0,)}[command[0]], done.stderr
    written = [json.loads(line) for line in done.stdout.splitlines()]
    assert written and all(occ["type"] == REFUSED for occ in written if occ["data"].get("dst_port") == port)
