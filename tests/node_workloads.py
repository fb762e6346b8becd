"""A healthy busy node and a broken one, made on the real kernel, for the noise test and ``make bench``.

- :func:`healthy_node`: for a while, what a node does all day and no one should be told about: shell
  helpers whose non-zero exit means "no" (``grep -q`` finding nothing, ``test -e`` of a missing file),
  short-lived processes exiting 1, connects that succeed, an application closing a connect the peer
  has not answered yet (a happy-eyeballs loser), direct writes that succeed. All of it in one cgroup,
  one network namespace and one loop device of its own, so what it made can be told from the node's.
- :func:`broken_node`: what must each be one occurrence: a container whose main process segfaults, a
  container in a crash loop, refused and timed-out connects, an OOM kill, failed writes.
  :data:`BROKEN_EXPECTED` says what each should be; :func:`recall` how many of them were reported.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
from container_scenarios import (
    ScratchCgroup,
    child_env,
    in_cgroups,
    memory_cgroup,
    oom_kill_holder,
    remove_cgroup,
)
from kernel_helpers import netns_exec, netns_inode, network_namespace, nft_tcp_port_rule, scaled
from plugin_helpers import Collect
from storage_scenarios import failing_writes, fill, loop_device, numbers, sparse_file, tmpfs

from tapio_core.agent import Agent
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions

#: What the workloads are judged by, each at its default settings.
OBSERVERS = ("network", "container", "storage")


@contextlib.contextmanager
def observers_at_defaults() -> Iterator[Agent]:
    """The network, container and storage observers with their default settings, in this process, and a
    collecting sink."""
    loaded = load_plugins(set(OBSERVERS), extra=[("collect", Collect())])
    pipeline = Pipeline.build(loaded, ["collect"], SinkOptions(data_dir=Path(".")), {}, KernelClock())
    agent = Agent(loaded, pipeline, recorder=None)
    agent.load(ebpf_dir=None)
    try:
        for name in OBSERVERS:
            assert pipeline.observers[name].status == "running", (name, pipeline.observers[name].status_reason)
        yield agent
    finally:
        agent.shutdown()


def drained(agent: Agent, settle_s: float = 1.0) -> list[dict[str, Any]]:
    """Every occurrence so far, in its JSON form, once what the kernel sent meanwhile has been read."""
    deadline = time.monotonic() + scaled(settle_s)
    while time.monotonic() < deadline:
        for name in OBSERVERS:
            agent.drain(name)
        time.sleep(0.05)
    return [json.loads(o.to_json()) for o in agent.plugins.pm.get_plugin("collect").received]


#: The healthy node's processes, in one Python process (its threads) inside the workload's namespace and cgroup.
HEALTHY = r"""
import fcntl, json, mmap, os, socket, struct, subprocess, sys, threading, time

seconds, device, quiet_port, silent_port = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
end = time.monotonic() + seconds
done = {"failing_exits": 0, "connects": 0, "early_closes": 0, "writes": 0}

def helpers():
    while time.monotonic() < end:
        for argv in (["grep", "-q", "tapio-no-such-line", "/etc/hostname"], ["test", "-e", "/tapio/no/such/file"],
                     ["sh", "-c", "exit 1"]):
            if subprocess.run(argv).returncode != 0:
                done["failing_exits"] += 1
        time.sleep(0.01)

def server():
    listener = socket.create_server(("127.0.0.1", quiet_port))
    while True:
        conn, _ = listener.accept()
        conn.sendall(conn.recv(16))
        conn.close()

def connects():
    while time.monotonic() < end:
        with socket.create_connection(("127.0.0.1", quiet_port)) as conn:
            conn.sendall(b"ping")
            conn.recv(16)
        done["connects"] += 1
        time.sleep(0.02)

def black_hole():
    # A peer that never answers, with nothing dropped by this kernel: a route into a tun device whose
    # reader discards every packet (as a network that loses them further out would).
    tun = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(tun, 0x400454CA, struct.pack("16sH22x", b"tapio-hole", 0x0001 | 0x1000))  # TUNSETIFF: TUN, NO_PI
    for argv in (["ip", "addr", "add", "10.251.0.1/24", "dev", "tapio-hole"],
                 ["ip", "link", "set", "tapio-hole", "up"]):
        subprocess.run(argv, check=True)
    threading.Thread(target=lambda: [os.read(tun, 65536) for _ in iter(int, 1)], daemon=True).start()

def early_closes():
    while time.monotonic() < end:
        conn = socket.socket()
        conn.setblocking(False)
        try:
            conn.connect(("10.251.0.2", silent_port))
        except BlockingIOError:
            pass
        time.sleep(0.1)  # the peer never answers: the application gives up
        conn.close()
        done["early_closes"] += 1

def writes():
    buffer = mmap.mmap(-1, 4096)
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    block = 0
    while time.monotonic() < end:
        os.pwritev(fd, [buffer], (block % 1024) * 4096)
        block += 1
        done["writes"] += 1
        time.sleep(0.01)
    os.close(fd)

threading.Thread(target=server, daemon=True).start()
black_hole()
time.sleep(0.2)
workers = [threading.Thread(target=work) for work in (helpers, connects, early_closes, writes)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
print(json.dumps(done))
"""


@attrs.frozen
class HealthyRun:
    """What :func:`healthy_node` did, and where: its cgroup (as the container observer names it), network
    namespace and loop device."""

    done: dict[str, int]
    seconds: float
    cgroup_id: int
    netns: int
    device: tuple[int, int]

    def made(self, occurrence: dict[str, Any]) -> bool:
        """Whether ``occurrence`` (its JSON form) is about this workload."""
        data = occurrence["data"]
        return (data.get("cgroup_id") == self.cgroup_id or data.get("netns") == self.netns
                or (data.get("dev_major"), data.get("dev_minor")) == self.device)


def healthy_node(tmp_path: Path, seconds: float, *, quiet_port: int = 18080, silent_port: int = 18081) -> HealthyRun:
    """Run the healthy node's workload for ``seconds`` (wall time, unscaled)."""
    with contextlib.ExitStack() as stack:
        netns = stack.enter_context(network_namespace())
        backing = stack.enter_context(tmpfs(tmp_path / "healthy-io", "16m"))
        device = stack.enter_context(loop_device(sparse_file(backing / "disk", 8 << 20)))
        cgroup = stack.enter_context(memory_cgroup(512 << 20))
        # Into the cgroup first: ip netns exec mounts a /sys of its own, without the cgroup file systems.
        command = in_cgroups([cgroup], ["ip", "netns", "exec", netns, sys.executable, "-c", HEALTHY, str(seconds),
                                        device, str(quiet_port), str(silent_port)])
        done = subprocess.run(command, capture_output=True, text=True, env=child_env(),
                              timeout=seconds + scaled(60))
        assert done.returncode == 0, f"the healthy workload failed ({done.returncode}): {done.stderr[-3000:]}"
        return HealthyRun(json.loads(done.stdout), seconds, cgroup.cgroup_id, netns_inode(netns), numbers(device))


@attrs.frozen
class Expected:
    """One occurrence the broken node must produce: its type and a test of its data."""

    name: str
    type: str
    matches: Callable[[dict[str, Any]], bool]


def _container(cgroup: ScratchCgroup, argv: list[str]) -> int:
    """``argv`` as a container's main process: the init of a new PID namespace, in ``cgroup``. Its exit status."""
    return subprocess.run(in_cgroups([cgroup], ["unshare", "--pid", "--fork", *argv]), env=child_env(),
                          timeout=scaled(30)).returncode


@attrs.frozen
class BrokenRun:
    expected: tuple[Expected, ...]


@contextlib.contextmanager
def _child_cgroups(parent: ScratchCgroup, count: int) -> Iterator[list[ScratchCgroup]]:
    """``count`` fresh cgroups under ``parent`` (a pod's containers, each restart a new one)."""
    with contextlib.ExitStack() as stack:
        children = []
        for index in range(count):
            path = parent.path / f"c{index}"
            path.mkdir()
            child = ScratchCgroup(path, parent.mount, parent.version)
            stack.callback(remove_cgroup, child)
            children.append(child)
        yield children


CRASH_LOOP_RESTARTS = 5
REFUSED_CONNECTS = 30


def broken_node(tmp_path: Path, *, refused_port: int = 18082, silent_port: int = 18083) -> BrokenRun:
    """Make each thing of the broken node happen once; returns what must have been reported."""
    prefix = "kernel."
    expected = []
    with memory_cgroup(512 << 20) as pod:
        # A segfaulting container: its main process dies of SIGSEGV (a real fault: init may die of it).
        with _child_cgroups(pod, 1) as [segfaulting]:
            status = _container(segfaulting, [sys.executable, "-c", "import ctypes; ctypes.string_at(0)"])
            assert status != 0
            segv_cgroup = segfaulting.cgroup_id
        expected.append(Expected("segfaulting container", prefix + "container.abnormal_exit",
                                 lambda d, c=segv_cgroup: d["cgroup_id"] == c and d["signal"] == 11
                                 and d["main_process"]))
        # A crash loop: the same container restarted (a new cgroup each time) and exiting 1 again and again.
        with _child_cgroups(pod, CRASH_LOOP_RESTARTS) as restarts:
            for restart in restarts:
                assert _container(restart, ["sh", "-c", "sleep 0.1; exit 1"]) == 1
            loop_cgroups = {restart.cgroup_id for restart in restarts}
        expected.append(Expected("crash loop", prefix + "container.abnormal_exit",
                                 lambda d, c=loop_cgroups: d["cgroup_id"] in c and d["exit_code"] == 1
                                 and d["main_process"]))
    with network_namespace() as netns:
        inode = netns_inode(netns)
        report = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", REFUSE, str(refused_port),
                                 str(REFUSED_CONNECTS)], capture_output=True, text=True, check=True,
                                timeout=scaled(30))
        assert json.loads(report.stdout) == {"refused": REFUSED_CONNECTS}
        expected.append(Expected("refused connects", prefix + "network.connection_refused",
                                 lambda d, n=inode: d.get("netns") == n and d["dst_port"] == refused_port))
        netns_exec(netns, "sysctl", "-q", "-w", "net.ipv4.tcp_syn_retries=1")
        with nft_tcp_port_rule(netns, silent_port):
            timed_out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", TIME_OUT,
                                        str(silent_port)], capture_output=True, text=True, timeout=scaled(60))
            assert timed_out.stdout.strip() == "ETIMEDOUT", timed_out
        expected.append(Expected("timed-out connect", prefix + "network.connection_timeout",
                                 lambda d, n=inode: d.get("netns") == n and d["dst_port"] == silent_port))
    with memory_cgroup(128 << 20) as cgroup:
        holder_pid, _ = oom_kill_holder(cgroup)
    expected.append(Expected("OOM kill", prefix + "container.oom_kill", lambda d, p=holder_pid: d["pid"] == p))
    with tmpfs(tmp_path / "broken-io", "8m") as backing:
        disk = sparse_file(backing / "disk", 32 << 20)
        with loop_device(disk) as device:
            fill(backing)
            assert failing_writes(device, 20) == 20
            major_minor = numbers(device)
    expected.append(Expected("failed writes", prefix + "storage.io_error",
                             lambda d, m=major_minor: (d["dev_major"], d["dev_minor"]) == m))
    return BrokenRun(tuple(expected))


def recall(run: BrokenRun, occurrences: list[dict[str, Any]]) -> tuple[float, list[str]]:
    """The share of the expected occurrences reported, and the names of those missing."""
    missing = [e.name for e in run.expected
               if not any(o["type"] == e.type and e.matches(o["data"]) for o in occurrences)]
    return 1 - len(missing) / len(run.expected), missing


REFUSE = r"""
import json, socket, sys
port, count = int(sys.argv[1]), int(sys.argv[2])
refused = 0
for _ in range(count):
    try:
        socket.create_connection(("127.0.0.1", port)).close()
    except ConnectionRefusedError:
        refused += 1
print(json.dumps({"refused": refused}))
"""

TIME_OUT = r"""
import errno, socket, sys
try:
    socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    print("connected")
except OSError as exc:
    print(errno.errorcode.get(exc.errno, exc))
"""
