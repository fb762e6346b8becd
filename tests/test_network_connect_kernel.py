"""How a failed connect ended, from the socket's own error, on the real kernel.

A connect that leaves SYN_SENT for CLOSE without a RST is not always a timeout:
an ICMP error ends it at once (a host unreachable, or a port unreachable, which
is a refusal), and an application may close it itself -- after waiting for an
answer that never came (its own timeout), or at once (a cancelled attempt, such
as a happy-eyeballs client's losing one). Each scenario runs in a network
namespace the test creates, with an nft rule on the test's own port.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import time

import pytest
from kernel_helpers import (
    netns_exec,
    network_namespace,
    nft_tcp_port_rule,
    observer_state,
    run_connects,
    running_agent,
    scaled,
)
from network_scenarios import PREFIX, compile_differently, of, start_agent

pytestmark = pytest.mark.kernel

#: After the occurrence we waited for, how long a wrong second one would have had to show up (scaled).
SETTLE_S = 0.5
HOSTS = [("127.0.0.1", "ipv4"), ("::1", "ipv6")]


def failed_connects(agent, port: int) -> list[dict]:
    """The connection failures naming ``port`` (the firewall's drops of its packets are other occurrences)."""
    return [occ for occ in agent.occurrences
            if occ["data"].get("dst_port") == port and occ["type"].startswith(PREFIX + "connection_")]


@pytest.mark.parametrize(("host", "family"), HOSTS)
@pytest.mark.parametrize(("icmp", "code", "kind", "message"), [
    ("host-unreachable", "EHOSTUNREACH", "connection_unreachable", "connection attempt failed: No route to host"),
    ("port-unreachable", "ECONNREFUSED", "connection_refused", "connection refused: ICMP port unreachable"),
])
def test_an_icmp_error_ends_a_connect_as_what_it_is_not_as_a_timeout(tmp_path, host, family, icmp, code, kind,
                                                                      message):
    port = 20000 + secrets.randbelow(20000)
    with network_namespace() as netns:
        # Should the ICMP error arrive while connect() holds the socket, the kernel keeps it as a soft
        # error and gives up at the next timeout with that error: 3 s with one SYN retry, not 2 minutes.
        netns_exec(netns, "sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=1")
        with (
            nft_tcp_port_rule(netns, port, "reject", "with", "icmpx", "type", icmp),
            running_agent(tmp_path) as agent,
        ):
            connector = run_connects(host, port, netns=netns)
            assert connector["attempts"][0]["errno"] == code
            agent.wait_for(of(kind, dst_port=port))
            time.sleep(scaled(SETTLE_S))
            agent.stop()
    [occ] = failed_connects(agent, port)  # one occurrence, of the right type, and no timeout beside it
    assert occ["type"] == PREFIX + kind
    assert (occ["error"]["code"], occ["error"]["message"], occ["outcome"]) == (code, message, "failure")
    data = occ["data"]
    assert (data["pid"], data["comm"]) == (connector["pid"], connector["comm"])
    assert (data["family"], data["dst_ip"], data["src_port"]) == (family, host, connector["attempts"][0]["src_port"])
    assert (data["old_state"], data["new_state"]) == ("SYN_SENT", "CLOSE")
    assert "ended_by" not in data


#: A cancelled connect (non-blocking, closed after 0.2 s), then one given up after its own 1.5 s
#: timeout (after the kernel's first SYN retransmit at 1 s); prints the source port of each.
ABANDON_SCRIPT = r"""
import json, os, socket, sys, time
host, port = sys.argv[1], int(sys.argv[2])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
report = {"pid": os.getpid()}
cancelled = socket.socket(family, socket.SOCK_STREAM)
cancelled.setblocking(False)
cancelled.connect_ex((host, port))
report["cancelled_port"] = cancelled.getsockname()[1]
time.sleep(0.2)
cancelled.close()
given_up = socket.socket(family, socket.SOCK_STREAM)
given_up.settimeout(1.5)
try:
    given_up.connect((host, port))
    report["outcome"] = "connected"
except TimeoutError:
    report["outcome"] = "timed out"
report["given_up_port"] = given_up.getsockname()[1]
given_up.close()
print(json.dumps(report))
"""


@pytest.mark.parametrize(("host", "family"), HOSTS)
def test_a_cancelled_connect_is_counted_and_one_the_application_gave_up_on_is_a_timeout(tmp_path, host, family):
    port = 20000 + secrets.randbelow(20000)
    with network_namespace() as netns, nft_tcp_port_rule(netns, port), running_agent(tmp_path) as agent:
        before = observer_state(tmp_path, "network", wait_for_counter="abandoned_connects")
        done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", ABANDON_SCRIPT, host, str(port)],
                              capture_output=True, text=True, timeout=scaled(30), check=True)
        report = json.loads(done.stdout)
        assert report["outcome"] == "timed out"
        agent.wait_for(of("connection_timeout", dst_port=port))
        time.sleep(scaled(SETTLE_S))
        agent.stop()
    after = observer_state(tmp_path, "network")
    [occ] = failed_connects(agent, port)  # the given-up one; the cancelled one is not an anomaly
    data = occ["data"]
    assert (occ["type"], occ["outcome"], occ["error"]["code"]) == (PREFIX + "connection_timeout", "timeout",
                                                                   "ETIMEDOUT")
    assert occ["error"]["message"] == "connection attempt abandoned by the application without a reply"
    assert (data["ended_by"], data["pid"], data["src_port"]) == ("application", report["pid"],
                                                                 report["given_up_port"])
    assert data["syn_retransmits"] >= 1
    assert 1_400_000_000 < data["connect_duration_ns"] < 3_000_000_000
    assert data["family"] == family
    # Other processes on the node may cancel connects too: at least ours was counted.
    assert after["counters"]["abandoned_connects"] >= before["counters"]["abandoned_connects"] + 1


def test_a_timeout_the_kernel_decided_says_so(tmp_path):
    port = 20000 + secrets.randbelow(20000)
    with network_namespace() as netns:
        netns_exec(netns, "sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=1")
        with nft_tcp_port_rule(netns, port), running_agent(tmp_path) as agent:
            connector = run_connects("127.0.0.1", port, netns=netns)
            assert connector["attempts"][0]["errno"] == "ETIMEDOUT"
            agent.wait_for(of("connection_timeout", dst_port=port))
            time.sleep(scaled(SETTLE_S))
            agent.stop()
    [occ] = failed_connects(agent, port)
    assert occ["data"]["ended_by"] == "kernel"
    assert occ["error"]["message"] == (
        f"SYN unanswered: the kernel gave up after {occ['data']['syn_retransmits']} retransmit(s)")


#: ``count`` non-blocking connects at once; waits until every one has failed (for at most ``wait`` s) and
#: prints the pid and, per connect, its source port and errno.
MANY_PENDING_SCRIPT = r"""
import errno, json, os, select, socket, sys, time
host, port, count, wait = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
sockets = []
for _ in range(count):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.connect_ex((host, port))
    sockets.append(s)
pending, results, deadline = set(sockets), {}, time.monotonic() + wait
while pending and time.monotonic() < deadline:
    _, writable, _ = select.select([], list(pending), [], 0.5)
    for s in writable:
        code = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        results[s.getsockname()[1]] = errno.errorcode.get(code, str(code))
        pending.discard(s)
print(json.dumps({"pid": os.getpid(), "results": results}))
"""


def test_failed_connects_whose_owners_were_forgotten_are_still_each_reported(monkeypatch):
    """Owners compiled into 2 buckets of 4 ways cannot hold 30 pending connects: every one that times out
    is still one occurrence -- the socket's error says how it ended -- with its owner where the table kept
    it and pid 0 / owner_known false where it did not; none is lost."""
    count = 30
    port = 20000 + secrets.randbelow(20000)
    compile_differently(monkeypatch, cflags=("-DOWNER_BUCKET_BITS=1",))
    agent, sink = start_agent({"connection_burst": 1000})
    try:
        with network_namespace() as netns:
            netns_exec(netns, "sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=1")
            with nft_tcp_port_rule(netns, port):
                done = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", MANY_PENDING_SCRIPT,
                                       "127.0.0.1", str(port), str(count), str(scaled(20))],
                                      capture_output=True, text=True, timeout=scaled(40), check=True)
        report = json.loads(done.stdout)
        assert set(report["results"].values()) == {"ETIMEDOUT"} and len(report["results"]) == count
        deadline = time.monotonic() + scaled(5)
        while time.monotonic() < deadline:
            agent.drain("network")
            timeouts = [o.data for o in sink.received
                        if o.type == PREFIX + "connection_timeout" and o.data["dst_port"] == port]
            if len(timeouts) >= count:
                break
            time.sleep(0.05)
        time.sleep(scaled(SETTLE_S))
        agent.drain("network")
    finally:
        agent.shutdown()
    timeouts = [o.data for o in sink.received if o.data.get("dst_port") == port and o.type != PREFIX + "packet_drop"]
    assert sorted(d["src_port"] for d in timeouts) == sorted(int(p) for p in report["results"])
    known = [d for d in timeouts if d["owner_known"]]
    assert 1 <= len(known) <= 8 and {d["pid"] for d in known} == {report["pid"]}
    assert all((d["pid"], d["comm"]) == (0, "") for d in timeouts if not d["owner_known"])
    assert all(d["ended_by"] == "kernel" and d["syn_retransmits"] >= 1 for d in timeouts)
