"""Packet drops with the kernel's reason, failed connects told why, and listen-queue overflows, from the real kernel.

Each scenario runs in a network namespace of its own, with the real ``tapio-agent``, and checks counts against the
kernel's own: the nft rule's packet counter for drops, the namespace's TcpExtListenDrops for overflows. Kernels
before 5.17 give no drop reason: there the tests check that the feature is off and says why.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from kernel_helpers import netns_exec, netns_inode, network_namespace, observer_state, running_agent, scaled
from network_scenarios import connects, nft_drop_counted, nft_dropped_packets, of, random_port

from tapio_core.bpf import kernel_version
from tapio_observer_network import PACKET_DROPS

pytestmark = pytest.mark.kernel

#: kfree_skb has carried the reason since 5.17.
HAS_DROP_REASONS = kernel_version() >= (5, 17)
NO_REASON_HERE = "raw tracepoint kfree_skb has no argument 2"
#: Where netfilter frees what a rule dropped, as the kernel's own %pS prints it (6.18: in nft_do_chain itself).
NETFILTER_CODE = re.compile(r"(nf_hook_slow|nft_do_chain)\+0x[0-9a-f]+")

def drops_to(port: int):
    return lambda occ: occ["type"] == "kernel.network.packet_drop" and occ["data"].get("dst_port") == port


def settings(**values: object) -> list[str]:
    return [f"--set=network.{key}={value}" for key, value in values.items()]


def test_dropped_packets_are_reported_with_the_kernels_reason_and_every_one_is_counted(tmp_path):
    """20 SYNs dropped by a firewall, then one more once the limit earned a token: 3 occurrences at once
    (the burst), the fourth carrying the 17 held back; the sum is the nft rule's own packet count. Before
    5.17 (no reason): none, and the feature says why it is off."""
    port = random_port()
    with network_namespace() as netns, \
            running_agent(tmp_path, extra=settings(drop_burst=3, drop_rate_per_s=0.5)) as agent:
        inode = netns_inode(netns)
        nft_drop_counted(netns, port)
        connects(netns, port, 20)
        if not HAS_DROP_REASONS:
            time.sleep(scaled(1))
            agent.stop()
            assert agent.matching(drops_to(port)) == [] and nft_dropped_packets(netns) == 20
            assert observer_state(tmp_path, "network")["disabled"][PACKET_DROPS] == NO_REASON_HERE
            return
        agent.wait_for(drops_to(port), timeout=10, count=3)
        time.sleep(2.2)  # a token (one per 2 s, the kernel's clock): the next drop is sent with what was held
        connects(netns, port, 1)
        agent.wait_for(drops_to(port), timeout=10, count=4)
        time.sleep(scaled(0.5))
        dropped = nft_dropped_packets(netns)
        agent.stop()
    occurrences = agent.matching(drops_to(port))
    assert len(occurrences) == 4
    assert sum(1 + occ["data"].get("suppressed", 0) for occ in occurrences) == dropped == 21
    first = occurrences[0]
    assert (first["severity"], first["outcome"], first["error"]["code"]) == ("warning", "failure", "NETFILTER_DROP")
    data = first["data"]
    assert (data["drop_reason"], data["protocol"], data["tcp_flags"]) == ("NETFILTER_DROP", "tcp", "SYN")
    assert NETFILTER_CODE.fullmatch(data["drop_location"]), data["drop_location"]
    assert (data["dst_ip"], data["src_ip"], data["family"], data["netns"]) == (
        "127.0.0.1", "127.0.0.1", "ipv4", inode)
    assert occurrences[3]["data"]["suppressed"] == 17


def test_routine_drops_are_not_reported(tmp_path):
    """Refused connects: the kernel drops each SYN (NO_SOCKET) after answering it with a RST; the refusal is
    the occurrence, the drop is routine."""
    port = random_port()
    with network_namespace() as netns, running_agent(tmp_path) as agent:
        connects(netns, port, 5)
        agent.wait_for(of("connection_refused", dst_port=port), timeout=10)
        time.sleep(scaled(0.5))
        agent.stop()
    assert agent.matching(drops_to(port)) == []


TIMEOUT_CONNECT = r"""
import json, socket, sys, time
client = socket.socket()
started = time.monotonic()
try:
    client.connect(("127.0.0.1", int(sys.argv[1])))
    outcome = "connected"
except OSError as exc:
    outcome = type(exc).__name__
print(json.dumps({"outcome": outcome, "port": client.getsockname()[1], "seconds": time.monotonic() - started}))
"""


def test_a_connect_timed_out_by_a_firewall_says_which_drop_and_where(tmp_path):
    """The firewall drops the SYN and its retransmits (tcp_syn_retries 1): the connect times out within
    seconds, and its occurrence names the kernel's reason, the place and every packet the rule counted."""
    port = random_port()
    with network_namespace() as netns, running_agent(tmp_path) as agent:
        netns_exec(netns, "sysctl", "-qw", "net.ipv4.tcp_syn_retries=1")
        nft_drop_counted(netns, port)
        done = json.loads(netns_exec(netns, "python3", "-c", TIMEOUT_CONNECT, str(port), timeout=60).stdout)
        assert done["outcome"] == "TimeoutError", done
        [timeout] = agent.wait_for(of("connection_timeout", dst_port=port), timeout=10)
        dropped = nft_dropped_packets(netns)
        agent.stop()
    data = timeout["data"]
    assert (data["src_port"], data["ended_by"], data["syn_retransmits"]) == (done["port"], "kernel", dropped - 1)
    if not HAS_DROP_REASONS:
        assert "drop_reason" not in data
        assert observer_state(tmp_path, "network")["disabled"][PACKET_DROPS] == NO_REASON_HERE
        return
    assert (data["drop_reason"], data["dropped_packets"]) == ("NETFILTER_DROP", dropped)
    assert NETFILTER_CODE.fullmatch(data["drop_location"]), data["drop_location"]


def test_a_listener_that_never_accepts_reports_every_connection_it_dropped(tmp_path):
    """A listener with a backlog of 0 that never accepts, and 20 connects: the first fills its accept queue,
    the kernel drops the others' SYNs. The overflow occurrences name the listener, its owner and limit, and
    their dropped counts add up to the namespace's TcpExtListenDrops."""
    port = random_port()
    with network_namespace() as netns, \
            running_agent(tmp_path, extra=settings(listen_overflow_cooldown_s=600)) as agent:
        inode = netns_inode(netns)
        done = connects(netns, port, 20, listen=True, hold_s=6)  # the agent reads each listener every 4 s
        overflow = of("listen_overflow", listen_port=port)
        agent.wait_for(overflow, timeout=10)
        time.sleep(scaled(0.5))
        agent.stop()
    occurrences = agent.matching(overflow)
    # One from network_tick while it listened; the cool-down holds the rest until the close reports them.
    assert 1 <= len(occurrences) <= 2
    assert sum(occ["data"]["dropped_connections"] for occ in occurrences) == done["listen_drops"] >= 19
    data = occurrences[0]["data"]
    assert (data["listener"], data["backlog"], data["accept_queue"]) == (f"127.0.0.1:{port}", 0, 1)
    assert (data["pid"], data["comm"], data["owner_known"], data["netns"]) == (
        done["pid"], "python3", True, inode)
    assert occurrences[0]["error"]["code"] == "LISTEN_OVERFLOW"
