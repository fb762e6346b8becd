"""Making the kernel's TCP stack misbehave on purpose, for the network observer's kernel tests.

Recipes from /work/shared/kernel-scenarios.md, each undone on the way out:

- :func:`veth_pair` joins two namespaces (from kernel_helpers' ``network_namespace``) and
  :func:`tbf` shapes one side, so RTT rises under load; :func:`nft_random_drop` drops a share of
  a port's non-SYN segments on input (retransmits) or output (failed retransmit attempts).
- :class:`TcpServer` and :func:`run_client` are Python processes with known pids that serve and
  drive the scenarios inside a namespace and report what they saw as JSON.
- :class:`QueuedLink` (from :func:`queued_link`) is the RTT scenario: a client namespace whose shaped
  link to a server namespace first carries small round trips (the baseline), then a bulk send that
  fills the queue.
- :class:`RetransmitWitness` is a tiny BPF program of the test's own that records every
  retransmit toward a port, so counts can be checked against the kernel, not against the observer.
- :func:`compile_net_loops` builds ``bench/net_loops.c`` (the tight C loops the benchmark uses)
  for storms a Python loop could not produce fast enough.

Traffic stays inside namespaces the tests create (or on loopback).
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
from kernel_helpers import netns_exec, network_namespace, scaled
from plugin_helpers import Collect

import tapio_observer_network
from tapio_core.agent import Agent
from tapio_core.bpf import tracepoint_has_field
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions

REPO = Path(__file__).resolve().parent.parent
NET_LOOPS_SOURCE = REPO / "bench" / "net_loops.c"


# -- links, qdiscs, nftables ---------------------------------------------------------------------


@contextmanager
def veth_pair(ns_a: str, ns_b: str, addr_a: str = "10.200.0.1",
              addr_b: str = "10.200.0.2") -> Iterator[tuple[str, str]]:
    """A veth pair with one end in each namespace, addressed /24 and up; yields the two device names."""
    suffix = secrets.token_hex(3)
    dev_a, dev_b = f"tva{suffix}", f"tvb{suffix}"
    subprocess.run(["ip", "link", "add", dev_a, "netns", ns_a, "type", "veth", "peer", "name", dev_b,
                    "netns", ns_b], check=True, capture_output=True, timeout=scaled(10))
    try:
        netns_exec(ns_a, "ip", "addr", "add", f"{addr_a}/24", "dev", dev_a)
        netns_exec(ns_b, "ip", "addr", "add", f"{addr_b}/24", "dev", dev_b)
        netns_exec(ns_a, "ip", "link", "set", dev_a, "up")
        netns_exec(ns_b, "ip", "link", "set", dev_b, "up")
        yield dev_a, dev_b
    finally:
        netns_exec(ns_a, "ip", "link", "del", dev_a, check=False)  # takes the peer with it


@contextmanager
def tbf(netns: str, dev: str, rate: str = "4mbit", burst: str = "16kb", latency: str = "1s") -> Iterator[None]:
    """A token-bucket qdisc on ``dev``: traffic beyond ``rate`` queues, so RTT grows with the queue."""
    netns_exec(netns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", burst,
               "latency", latency)
    try:
        yield
    finally:
        netns_exec(netns, "tc", "qdisc", "del", "dev", dev, "root", check=False)


@contextmanager
def nft_random_drop(netns: str, port: int, percent: int, hooks: tuple[str, ...] = ("input",),
                    table: str = "tapio_loss") -> Iterator[None]:
    """Drop ``percent`` % of the non-SYN TCP segments to ``port`` at each hook (input: the receiver
    never sees them, so the sender retransmits; output: the sender's own transmission fails)."""
    netns_exec(netns, "nft", "add", "table", "inet", table)
    try:
        for hook in hooks:
            netns_exec(netns, "nft", "add", "chain", "inet", table, hook,
                       f"{{ type filter hook {hook} priority 0; }}")
            netns_exec(netns, "nft", "add", "rule", "inet", table, hook,
                       f"tcp dport {port} tcp flags & syn == 0 numgen random mod 100 < {percent} counter drop")
        yield
    finally:
        netns_exec(netns, "nft", "delete", "table", "inet", table, check=False)


# -- servers and clients -------------------------------------------------------------------------

#: Serves connections one after the other and prints a JSON line per thing it did.
#: Modes: "sink" reads everything and answers "!" to a chunk that ends with "?"; "reset"
#: reads "hello" and closes with SO_LINGER 0 (an RST to the client); "recv" reads "hello",
#: answers "ok" and waits for the client's next move; "read" reads "hello" and only closes its
#: sending side (a FIN, no send) before it waits; "send" sends "ok" without reading, then waits;
#: "silent" neither reads nor writes.
SERVER_SCRIPT = r"""
import errno, json, os, socket, struct, sys, time
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
def say(**what):
    print(json.dumps(what), flush=True)
listener = socket.socket(family, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((host, port))
listener.listen(16)
with open("/proc/self/comm") as f:
    say(ready=True, pid=os.getpid(), comm=f.read().strip())
while True:
    conn, peer = listener.accept()
    say(accepted=peer[1])
    try:
        if mode == "sink":
            while data := conn.recv(1 << 16):
                if data.endswith(b"?"):
                    conn.sendall(b"!")
        elif mode == "reset":
            conn.recv(5)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif mode == "recv":
            conn.recv(5)
            conn.sendall(b"ok")
            conn.recv(5)
        elif mode == "read":
            conn.recv(5)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(5)
        elif mode == "send":
            conn.sendall(b"ok")
            conn.recv(5)
        elif mode == "silent":
            time.sleep(3)
    except OSError as exc:
        say(error=errno.errorcode.get(exc.errno, str(exc.errno)), peer_port=peer[1])
    conn.close()
    say(closed=peer[1])
"""


class TcpServer:
    """:data:`SERVER_SCRIPT` running in ``netns``; ``pid``/``comm`` once ready, its JSON lines in ``lines``."""

    def __init__(self, netns: str | None, host: str, port: int, mode: str) -> None:
        command = [sys.executable, "-c", SERVER_SCRIPT, host, str(port), mode]
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        first = self.process.stdout.readline()
        if not first:
            raise AssertionError(f"server did not start: {self.process.stderr.read()}")
        ready = json.loads(first)
        self.pid, self.comm = ready["pid"], ready["comm"]
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(json.loads(line))
                self._changed.notify_all()

    def wait_for(self, key: str, timeout: float = 10.0) -> dict[str, Any]:
        with self._changed:
            if not self._changed.wait_for(lambda: any(key in line for line in self.lines), scaled(timeout)):
                raise AssertionError(f"server never reported {key!r}: {self.lines}")
            return next(line for line in self.lines if key in line)

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(scaled(10))
        self._reader.join(scaled(5))


@contextmanager
def tcp_server(netns: str | None, host: str, port: int, mode: str) -> Iterator[TcpServer]:
    server = TcpServer(netns, host, port, mode)
    try:
        yield server
    finally:
        server.stop()


#: One client process; prints a JSON report with its pid and comm. Modes: "bulk" sends N bytes
#: then "?" and waits for the "!" (the socket stays open until everything arrived) and reports
#: tcp_info's total_retrans; "pingpong" makes C connections of N round trips each, 50 ms apart;
#: "reset_me" sends "hello" and expects the server's RST; "reset_server" sends "hello", reads
#: "ok" (or the end of the server's data) and closes with SO_LINGER 0 (an RST to the server);
#: "reset_after_reply" does that without sending; "abort" does it without a word either way.
CLIENT_SCRIPT = r"""
import errno, json, os, socket, struct, sys, time
host, port, mode, amount, connections = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
report = {"pid": os.getpid(), "src_ports": []}
with open("/proc/self/comm") as f:
    report["comm"] = f.read().strip()
def connect():
    s = socket.socket(family, socket.SOCK_STREAM)
    s.connect((host, port))
    report["src_ports"].append(s.getsockname()[1])
    return s
def answer(s):
    while not s.recv(1).endswith(b"!"):
        pass
if mode == "bulk":
    s = connect()
    s.sendall(b"x" * amount + b"?")
    answer(s)
    info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    report["total_retrans"] = struct.unpack_from("I", info, 100)[0]
    s.close()
elif mode == "pingpong":
    for _ in range(connections):
        s = connect()
        for _ in range(amount):
            s.sendall(b"x?")
            answer(s)
            time.sleep(0.05)
        s.close()
elif mode == "reset_me":
    s = connect()
    s.sendall(b"hello")
    try:
        s.recv(10)
        report["error"] = None
    except OSError as exc:
        report["error"] = errno.errorcode.get(exc.errno, str(exc.errno))
    s.close()
elif mode in ("reset_server", "reset_after_reply", "abort"):
    s = connect()
    if mode == "reset_server":
        s.sendall(b"hello")
    if mode != "abort":
        s.recv(2)
    else:
        time.sleep(0.2)  # the server has accepted by now
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
print(json.dumps(report))
"""


def run_client(netns: str | None, host: str, port: int, mode: str, amount: int = 0, connections: int = 1,
               timeout: float = 30.0) -> dict[str, Any]:
    """Run :data:`CLIENT_SCRIPT` in a new process (in ``netns`` if given); returns its report."""
    command = [sys.executable, "-c", CLIENT_SCRIPT, host, str(port), mode, str(amount), str(connections)]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=scaled(timeout))
    if done.returncode != 0:
        raise AssertionError(f"client {mode} failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)


SERVER_IP, CLIENT_IP = "10.200.0.2", "10.200.0.1"


def random_port() -> int:
    """Below the ephemeral range (32768-60999), so a connect never picks it as its own source port
    (a self-connect would succeed where a refusal is wanted)."""
    return 10000 + secrets.randbelow(22000)


@attrs.frozen
class QueuedLink:
    """A client namespace and a sink server at :data:`SERVER_IP`:``port`` behind a 4 Mbit/s token bucket."""

    client_ns: str
    port: int

    def learn_baseline(self) -> dict[str, Any]:
        """Small round trips over two connections: what an unloaded link's RTT is (well under a ms)."""
        return run_client(self.client_ns, SERVER_IP, self.port, "pingpong", amount=8, connections=2)

    def fill_queue(self) -> dict[str, Any]:
        """A bulk send the bucket cannot pass at once: the queue, and the RTT, grow to tens of ms."""
        return run_client(self.client_ns, SERVER_IP, self.port, "bulk", amount=400_000)


@contextmanager
def queued_link(port: int) -> Iterator[QueuedLink]:
    """The RTT scenario's two namespaces, veth link, qdisc and server; all removed on the way out."""
    with (
        network_namespace() as client_ns,
        network_namespace() as server_ns,
        veth_pair(client_ns, server_ns, CLIENT_IP, SERVER_IP) as (client_dev, _),
        tbf(client_ns, client_dev, rate="4mbit", burst="16kb", latency="1s"),
        tcp_server(server_ns, SERVER_IP, port, "sink"),
    ):
        yield QueuedLink(client_ns, port)


# -- an independent witness ------------------------------------------------------------------------

WITNESS_SOURCE = r"""
struct retransmit { u64 ts; u32 state; s32 err; };
BPF_QUEUE(witness_events, struct retransmit, WITNESS_CAPACITY);
BPF_ARRAY(witness_overflow, u64, 1);

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb)
{
    if (args->dport != WITNESS_PORT)
        return 0;
    struct retransmit event = {};
    event.ts = bpf_ktime_get_ns();
    event.state = args->state;
#ifdef WITNESS_HAS_ERR
    event.err = args->err;
#endif
    if (witness_events.push(&event, 0) != 0) {
        int zero = 0;
        u64 *overflow = witness_overflow.lookup(&zero);
        if (overflow)
            __sync_fetch_and_add(overflow, 1);  /* result unused: every kernel's verifier takes it */
    }
    return 0;
}
"""


class RetransmitWitness:
    """Every ``tcp_retransmit_skb`` toward ``port``, in kernel time order: (time, TCP state, err); err is 0
    where the kernel's tracepoint has no such field (``has_err`` False: 6.12 and older)."""

    CAPACITY = 8192

    def __init__(self, port: int) -> None:
        from bcc import BPF

        self.has_err = tracepoint_has_field("tcp:tcp_retransmit_skb", "err")
        cflags = [f"-DWITNESS_PORT={port}", f"-DWITNESS_CAPACITY={self.CAPACITY}"]
        cflags += ["-DWITNESS_HAS_ERR=1"] if self.has_err else []
        self.bpf = BPF(text=WITNESS_SOURCE.encode(), cflags=cflags)
        self.seen: list[tuple[int, int, int]] = []

    def events(self) -> list[tuple[int, int, int]]:
        """Everything seen so far (the queue is drained into ``seen``)."""
        overflow = self.bpf[b"witness_overflow"][0].value
        if overflow:
            raise AssertionError(f"witness overflowed: {overflow} retransmits not kept")
        self.seen += [(event.ts, event.state, event.err) for event in self.bpf[b"witness_events"].values()]
        return sorted(self.seen)

    def close(self) -> None:
        self.bpf.cleanup()


@contextmanager
def retransmit_witness(port: int) -> Iterator[RetransmitWitness]:
    witness = RetransmitWitness(port)
    try:
        yield witness
    finally:
        witness.close()


# -- compiled loops ------------------------------------------------------------------------------


def compile_net_loops(directory: Path) -> Path:
    """``bench/net_loops.c`` compiled into ``directory``."""
    binary = directory / "net_loops"
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(NET_LOOPS_SOURCE)], check=True, capture_output=True,
                   timeout=scaled(60))
    return binary


def start_refusals(binary: Path, host: str, port: int, count: int, netns: str | None = None) -> subprocess.Popen:
    """``count`` connects to a closed port from a compiled loop, started in the background."""
    command = [str(binary), "refuse", host, str(port), str(count)]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def loop_report(process: subprocess.Popen, timeout: float = 60.0) -> dict[str, Any]:
    """The JSON line a compiled loop printed, once it exited."""
    out, err = process.communicate(timeout=scaled(timeout))
    if process.returncode != 0:
        raise AssertionError(f"net_loops failed ({process.returncode}): {err.strip()}")
    return json.loads(out)


# -- the network observer in this process ----------------------------------------------------------


def start_agent(settings: dict) -> tuple[Agent, Collect]:
    sink = Collect()
    loaded = load_plugins(["network"], extra=[("collect", sink)])
    pipeline = Pipeline.build(loaded, ["collect"], SinkOptions(data_dir=Path(".")), {"network": settings},
                              KernelClock())
    agent = Agent(loaded, pipeline, recorder=None)
    agent.load(ebpf_dir=None)
    assert pipeline.observers["network"].status == "running", pipeline.observers["network"].status_reason
    return agent, sink


def compile_differently(monkeypatch, missing: frozenset[str] = frozenset(), cflags: tuple[str, ...] = ()) -> None:
    """Make the network plugin register its observer as a kernel without the ``missing`` BTF members
    would build it, or with extra cflags (for the agents this test starts afterwards)."""
    spec = tapio_observer_network.OBSERVER
    fields = tuple(attrs.evolve(field, path="no_such_member") if field.macro in missing else field
                   for field in spec.btf_fields)
    monkeypatch.setattr(tapio_observer_network, "OBSERVER",
                        attrs.evolve(spec, btf_fields=fields, cflags=(*spec.cflags, *cflags)))


# -- matching occurrences ----------------------------------------------------------------------------

#: Non-blocking connects to one port, closed before the first SYN retransmit (1 s): prints what it did. With
#: "listen", first a listener on that port with a backlog of 0 that never accepts, closed at the end.
CONNECTS_SCRIPT = r"""
import json, os, socket, sys, time
port, count, listen = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "listen"
if listen:
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(0)
clients = []
for _ in range(count):
    client = socket.socket()
    client.setblocking(False)
    try:
        client.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    clients.append(client)
time.sleep(0.3)
for client in clients:
    client.close()
netstat = open("/proc/net/netstat").read().splitlines()  # this namespace's counters
names, values = [line.split()[1:] for line in netstat if line.startswith("TcpExt:")]
if listen:
    time.sleep(float(sys.argv[4]))  # the listener stays (the agent reads it meanwhile), then closes
    listener.close()
print(json.dumps({"pid": os.getpid(), "listen_drops": int(dict(zip(names, values))["ListenDrops"])}))
"""


def connects(netns: str, port: int, count: int, *, listen: bool = False, hold_s: float = 0.0) -> dict:
    """Run CONNECTS_SCRIPT in ``netns``: what it printed (its pid, the namespace's TcpExtListenDrops)."""
    done = netns_exec(netns, "python3", "-c", CONNECTS_SCRIPT, str(port), str(count), "listen" if listen else "-",
                      str(scaled(hold_s)), timeout=60)
    return json.loads(done.stdout)


def nft_drop_counted(netns: str, port: int) -> None:
    """An nft rule in ``netns`` that counts and drops incoming TCP to ``port`` (the table stays with the namespace)."""
    for command in (["add", "table", "inet", "t"],
                    ["add", "chain", "inet", "t", "input", "{ type filter hook input priority 0; }"],
                    ["add", "rule", "inet", "t", "input", "tcp", "dport", str(port), "counter", "drop"]):
        netns_exec(netns, "nft", *command)


def nft_dropped_packets(netns: str) -> int:
    ruleset = netns_exec(netns, "nft", "list", "table", "inet", "t").stdout
    return int(re.search(r"counter packets (\d+)", ruleset).group(1))


PREFIX = "kernel.network."


def of(kind: str, **data: object):
    """Occurrences (as JSON dicts) of ``kernel.network.<kind>`` whose ``data`` has every given value."""

    def match(occ: dict) -> bool:
        return occ["type"] == PREFIX + kind and all(occ["data"].get(k) == v for k, v in data.items())

    return match
