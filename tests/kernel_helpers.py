"""Helpers for tests that run the real agent against the real kernel.

- :func:`running_agent` starts ``tapio-agent`` as a subprocess, waits until its
  observers are attached, collects the occurrences it prints, and always stops
  it (SIGTERM, then SIGKILL) on the way out.
- :func:`network_namespace`, :func:`netns_exec` and :func:`nft_tcp_port_rule`
  build throwaway network namespaces where the kernel can be made to misbehave
  (see /work/shared/kernel-scenarios.md) without touching the host's traffic.
- :func:`run_connects` makes TCP connects from a separate process and reports
  its pid, comm and what each connect got, so tests can check attribution.

Traffic goes only to loopback or to namespaces a test made.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

BIN_DIR = Path(sys.executable).parent
AGENT = BIN_DIR / "tapio-agent"
TAPIO = BIN_DIR / "tapio"
READY_MARK = "tapio-agent: running observers"
#: Every wait of a kernel test is multiplied by this: 1 on a real machine, more in a guest that
#: runs under qemu's emulation, where a bcc compile takes 15-30 times as long (kernels/matrix.py
#: sets it). Only waits scale, never the durations a scenario needs the kernel to see.
TIME_SCALE = float(os.environ.get("TAPIO_TEST_TIME_SCALE") or 1)


def scaled(seconds: float) -> float:
    """A wait of ``seconds`` on this machine: longer in an emulated guest (:data:`TIME_SCALE`)."""
    return seconds * TIME_SCALE


#: The agent compiles its observers before it is ready: about a second here.
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 10.0

Occurrence = dict[str, Any]


def wait_until(predicate, timeout: float) -> bool:
    """Poll ``predicate`` every half second for ``timeout`` seconds (scaled in a guest); its last answer."""
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return predicate()


def tool_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without Tapio settings that would change what the tools load (nor the
    BCC_KERNEL_SOURCE conftest set for the tests' own programs: the tools choose their headers themselves)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAPIO_") and k != "BCC_KERNEL_SOURCE"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class AgentProcess:
    """A running ``tapio-agent``: its stdout occurrences and stderr lines, read in background threads."""

    def __init__(self, args: Sequence[str], *, cwd: Path, env: dict[str, str]) -> None:
        self.args = [str(AGENT), *map(str, args)]
        self.occurrences: list[Occurrence] = []
        self.other_stdout: list[str] = []
        self.stderr_lines: list[str] = []
        self.returncode: int | None = None
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            self.args, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        self._threads = [
            threading.Thread(target=self._read_stdout, daemon=True, name="agent-stdout"),
            threading.Thread(target=self._read_stderr, daemon=True, name="agent-stderr"),
        ]
        for thread in self._threads:
            thread.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read_stdout(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._changed:
                try:
                    parsed = json.loads(line)
                except ValueError:
                    parsed = None
                if isinstance(parsed, dict):
                    self.occurrences.append(parsed)
                elif line:
                    self.other_stdout.append(line)
                self._changed.notify_all()

    def _read_stderr(self) -> None:
        for raw in self.process.stderr:
            with self._changed:
                self.stderr_lines.append(raw.decode("utf-8", "replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()  # EOF: the process is gone; wake waiters

    def stderr_text(self) -> str:
        with self._changed:
            return "\n".join(self.stderr_lines)

    def is_ready(self) -> bool:
        return any(line.startswith(READY_MARK) for line in self.stderr_lines)

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self.is_ready():
                if self.process.poll() is not None and not self._threads[1].is_alive():
                    raise AssertionError(
                        f"tapio-agent exited with {self.process.returncode} before it was ready:\n"
                        + "\n".join(self.stderr_lines)
                    )
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"tapio-agent not ready after {timeout:.0f} s:\n" + "\n".join(self.stderr_lines)
                    )
                self._changed.wait(min(remaining, 0.2))

    def matching(self, predicate: Callable[[Occurrence], bool]) -> list[Occurrence]:
        with self._changed:
            return [occ for occ in self.occurrences if predicate(occ)]

    def wait_for(
        self, predicate: Callable[[Occurrence], bool], timeout: float = 5.0, count: int = 1
    ) -> list[Occurrence]:
        """Occurrences matching ``predicate`` once there are at least ``count``; AssertionError after ``timeout``
        (scaled)."""
        timeout = scaled(timeout)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [occ for occ in self.occurrences if predicate(occ)]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.process.poll() is not None and not self._threads[0].is_alive()):
                    raise AssertionError(
                        f"expected {count} matching occurrence(s) within {timeout} s, got {len(found)}; "
                        f"agent printed {len(self.occurrences)} occurrence(s); stderr:\n"
                        + "\n".join(self.stderr_lines[-20:])
                    )
                self._changed.wait(min(remaining, 0.2))

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``; returns the exit code.

        Afterwards ``occurrences`` holds everything the agent printed, including
        what it drained while shutting down.
        """
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(scaled(timeout))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for thread in self._threads:
            thread.join(scaled(5))  # to the end of its output
        self.returncode = self.process.returncode
        return self.returncode


def agent_args(
    data_dir: Path,
    plugins: str = "network,stdout",
    sinks: Sequence[str] = ("stdout",),
    record: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    args = ["--plugins", plugins, "--data-dir", str(data_dir)]
    for sink in sinks:
        args += ["--sink", sink]
    if record is not None:
        args += ["--record", str(record)]
    return args + list(extra)


@contextmanager
def running_agent(
    data_dir: Path,
    plugins: str = "network,stdout",
    sinks: Sequence[str] = ("stdout",),
    record: Path | None = None,
    extra: Sequence[str] = (),
    env: dict[str, str] | None = None,
    ready_timeout: float = READY_TIMEOUT_S,
) -> Iterator[AgentProcess]:
    """Start ``tapio-agent``, yield it once its observers are attached, always stop it afterwards.

    Teardown asserts nothing: a test that cares about the exit calls ``agent.stop()`` itself.
    """
    agent = AgentProcess(
        agent_args(data_dir, plugins, sinks, record, extra), cwd=data_dir, env=tool_env(env)
    )
    try:
        agent.wait_ready(ready_timeout)
        yield agent
    finally:
        agent.stop()


def observer_state(data_dir: Path, observer: str, wait_for_counter: str | None = None,
                   timeout: float = 10.0) -> dict:
    """``observer``'s entry in the state the agent writes to ``data_dir`` (once it has ``wait_for_counter``)."""
    from tapio_core.state import read_state

    deadline = time.monotonic() + scaled(timeout)
    while True:
        entry = ((read_state(data_dir) or {}).get("observers") or {}).get(observer) or {}
        if wait_for_counter is None or wait_for_counter in entry.get("counters", {}):
            return entry
        if time.monotonic() > deadline:
            raise AssertionError(f"the agent's state has no {observer} counter {wait_for_counter!r}: {entry}")
        time.sleep(0.2)


# -- processes that connect --------------------------------------------------------------------

#: Connects ``count`` times (a new socket each time) and prints its pid, comm and, per
#: attempt, the errno name and the source port the kernel chose.
CONNECT_SCRIPT = r"""
import errno, json, os, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
attempts = []
for _ in range(count):
    s = socket.socket(family, socket.SOCK_STREAM)
    started = time.monotonic_ns()
    try:
        s.connect((host, port))
        code = "OK"
    except OSError as exc:
        code = errno.errorcode.get(exc.errno, str(exc.errno))
    attempts.append({"errno": code, "src_port": s.getsockname()[1], "duration_ns": time.monotonic_ns() - started})
    s.close()
with open("/proc/self/comm") as f:
    comm = f.read().strip()
print(json.dumps({"pid": os.getpid(), "comm": comm, "attempts": attempts}))
"""


def run_connects(host: str, port: int, count: int = 1, netns: str | None = None, timeout: float = 20.0) -> dict:
    """Run :data:`CONNECT_SCRIPT` in a new process (inside ``netns`` if given); returns its report."""
    command = [sys.executable, "-c", CONNECT_SCRIPT, host, str(port), str(count)]
    if netns is not None:
        command = ["ip", "netns", "exec", netns, *command]
    done = subprocess.run(command, capture_output=True, text=True, timeout=scaled(timeout), check=True)
    return json.loads(done.stdout)


def closed_tcp_port(host: str) -> int:
    """A port on ``host`` that nothing listens on: bound to learn a free one, then closed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


# -- network namespaces and nftables -------------------------------------------------------------


def _run(command: Sequence[str], check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=scaled(timeout))
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


@contextmanager
def network_namespace() -> Iterator[str]:
    """A fresh network namespace with ``lo`` up; always deleted on the way out."""
    name = f"tapio-test-{secrets.token_hex(4)}"
    _run(["ip", "netns", "add", name])
    try:
        _run(["ip", "-n", name, "link", "set", "lo", "up"])
        yield name
    finally:
        _run(["ip", "netns", "del", name], check=False)


def netns_inode(netns: str | None = None) -> int:
    """The inode number that names ``netns`` (this process's own namespace if None), as the kernel reports it."""
    return os.stat(f"/run/netns/{netns}" if netns else "/proc/self/ns/net").st_ino


def netns_exec(netns: str, *command: str, check: bool = True, timeout: float = 10.0) -> subprocess.CompletedProcess:
    """Run ``command`` inside ``netns`` (``ip netns exec``)."""
    return _run(["ip", "netns", "exec", netns, *command], check=check, timeout=timeout)


@contextmanager
def nft_tcp_port_rule(netns: str, port: int, *verdict: str, table: str = "tapio_test") -> Iterator[None]:
    """Apply ``verdict`` (default ``drop``; e.g. ``reject with icmpx type host-unreachable``) to incoming
    TCP for ``port`` inside ``netns``; the table is deleted on the way out.

    Separate ``nft`` commands: the one-line form failed on this machine.
    """
    netns_exec(netns, "nft", "add", "table", "inet", table)
    try:
        netns_exec(netns, "nft", "add", "chain", "inet", table, "input",
                   "{ type filter hook input priority 0; }")
        netns_exec(netns, "nft", "add", "rule", "inet", table, "input", "tcp", "dport", str(port),
                   *(verdict or ("drop",)))
        yield
    finally:
        netns_exec(netns, "nft", "delete", "table", "inet", table, check=False)


# -- BPF programs --------------------------------------------------------------------------------


def bpf_prog_ids_of(pid: int) -> set[int]:
    """Ids of the BPF programs process ``pid`` holds file descriptors to (from /proc/PID/fdinfo)."""
    ids = set()
    fdinfo = Path(f"/proc/{pid}/fdinfo")
    for entry in fdinfo.iterdir():
        try:
            text = entry.read_text()
        except OSError:
            continue  # closed meanwhile
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def loaded_bpf_programs() -> dict[int, str]:
    """Every BPF program the kernel holds, id -> name (``bpftool prog show``)."""
    done = _run(["bpftool", "prog", "show", "--json"])
    return {prog["id"]: prog.get("name", "") for prog in json.loads(done.stdout or "[]")}
