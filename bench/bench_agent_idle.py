"""CPU the real agent uses while nothing happens: what Tapio costs a quiet node.

Starts ``tapio-agent --plugins network,stdout --sink stdout`` (stdout to /dev/null),
waits for it to report running, then reads the time its threads spent on CPU
(/proc/PID/task/*/schedstat, in ns) across IDLE_S seconds. The figure is % of one
core; utime+stime from /proc/PID/stat is printed beside it for comparison (clock
ticks: 10 ms at 100 Hz, a resolution of 0.2 % over 5 s, too coarse for this).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import BenchError, note, require_root

IDLE_S = 5.0
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
READY_LINE = "tapio-agent: running"


def agent_command() -> list[str]:
    beside = Path(sys.executable).with_name("tapio-agent")  # the venv's, as `make bench` runs it
    agent = str(beside) if beside.exists() else shutil.which("tapio-agent")
    if agent is None:
        raise BenchError("tapio-agent is not installed: run `make setup`")
    return [agent, "--plugins", "network,stdout", "--sink", "stdout"]


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads), in clock ticks."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()  # comm may hold spaces; skip past it
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def cpu_ns(pid: int) -> int:
    """Time on CPU of all the process's threads, in ns (finer than the ticks, for the commentary)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a thread that just exited
            total += int((task / "schedstat").read_text().split()[0])
    return total


def run() -> dict[str, float]:
    require_root("bench_agent_idle")
    with tempfile.TemporaryDirectory(prefix="tapio-bench-") as workdir:
        agent = subprocess.Popen(
            agent_command(),
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until_running(agent)
            before, before_ns, start = cpu_ticks(agent.pid), cpu_ns(agent.pid), time.monotonic()
            time.sleep(IDLE_S)
            after, after_ns, elapsed = cpu_ticks(agent.pid), cpu_ns(agent.pid), time.monotonic() - start
            if agent.poll() is not None:
                raise BenchError(f"tapio-agent exited with status {agent.returncode} while idle")
        finally:
            stop(agent)
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    note(f"  agent: {(after_ns - before_ns) / 1e6:.1f} ms on CPU in {elapsed:.1f} s idle; utime+stime say "
         f"{100.0 * (after - before) / ticks_per_s / elapsed:.2f} % (clock ticks)")
    return {"agent_idle_cpu_pct": 100.0 * (after_ns - before_ns) / 1e9 / elapsed}


def wait_until_running(agent: subprocess.Popen[str]) -> None:
    """Block until the agent prints its ready line; its stderr keeps flowing to ours afterwards."""
    ready = threading.Event()

    def forward() -> None:
        assert agent.stderr is not None
        for line in agent.stderr:
            if READY_LINE in line:
                ready.set()
            note(f"  agent: {line.rstrip()}")

    threading.Thread(target=forward, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready.wait(0.1):
        if agent.poll() is not None:
            raise BenchError(f"tapio-agent exited with status {agent.returncode} before running (see above)")
        if time.monotonic() > deadline:
            raise BenchError(f"tapio-agent did not report running within {START_TIMEOUT_S:.0f} s")


def stop(agent: subprocess.Popen[str]) -> None:
    if agent.poll() is None:
        agent.send_signal(signal.SIGTERM)
        try:
            agent.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            note(f"  agent: no exit {STOP_TIMEOUT_S:.0f} s after SIGTERM; killing it")
            agent.kill()
            agent.wait()
