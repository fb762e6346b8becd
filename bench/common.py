"""What every benchmark module shares: the output format and a few measuring helpers.

Every figure is one line ``name: value`` on stdout, so later benchmarks add lines and
tools can parse the output with one split. Commentary for humans goes to stderr.
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_reported: set[str] = set()


class BenchError(Exception):
    """A benchmark cannot run here; the message is one line saying what to do."""


def report(name: str, value: float) -> None:
    """Print one figure; a name may appear only once per run."""
    if not _NAME.match(name):
        raise ValueError(f"figure name {name!r} is not lower_snake_case")
    if name in _reported:
        raise ValueError(f"figure {name!r} reported twice")
    _reported.add(name)
    print(f"{name}: {format_value(value)}", flush=True)


def format_value(value: float) -> str:
    """Rates as whole numbers, ratios and percentages with two decimals."""
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.2f}"


def note(message: str) -> None:
    """Commentary for humans: stderr, never stdout."""
    print(message, file=sys.stderr, flush=True)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise BenchError(f"{what} loads BPF programs: run `make bench` as root")


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """(seconds, result) of one call, on the monotonic high-resolution clock."""
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


BPF_STATS_RUN_TIME = 0  # enum bpf_stats_type


@contextlib.contextmanager
def bpf_run_time_stats() -> Iterator[None]:
    """The kernel counts time inside every BPF program while the fd ``bpf_enable_stats`` returns is
    open. Every program on the machine pays a clock read or two meanwhile, so measure in a pass of
    its own, apart from timed rounds."""
    from tapio_core.bpf_objects import libbpf

    fd = libbpf().bpf_enable_stats(BPF_STATS_RUN_TIME)
    if fd < 0:
        raise BenchError(f"bpf_enable_stats failed: {os.strerror(-fd)}")
    try:
        yield
    finally:
        os.close(fd)


def program_stats(fd: int, pid: int | str = "self") -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a loaded BPF program, from the fdinfo of process ``pid`` (this one)."""
    lines = Path(f"/proc/{pid}/fdinfo/{fd}").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(fields["run_time_ns"]), int(fields["run_cnt"])


#: Where Debian's bpfcc-tools package puts bcc's tools (``tcpstates`` is ``tcpstates-bpfcc``).
TOOLS_DIR = Path("/usr/sbin")
TOOL_START_S = 60.0


class RunningTool:
    """One of bcc's own tools, running with its output discarded, whose BPF programs can be timed."""

    def __init__(self, name: str, process: Any) -> None:
        self.name, self.process = name, process

    def program_fds(self) -> list[int]:
        fds = []
        for entry in Path(f"/proc/{self.process.pid}/fdinfo").iterdir():
            with contextlib.suppress(OSError):
                if "prog_id:" in entry.read_text():
                    fds.append(int(entry.name))
        return fds

    def run_time(self) -> tuple[int, int]:
        """(ns, runs) inside the tool's programs so far, summed, while BPF run-time statistics are on."""
        stats = [program_stats(fd, self.process.pid) for fd in self.program_fds()]
        return sum(ns for ns, _ in stats), sum(runs for _, runs in stats)


@contextlib.contextmanager
def running_tool(name: str, *args: str) -> Iterator[RunningTool]:
    """Start ``NAME-bpfcc ARGS`` and wait until its programs are loaded and attached (their number holds
    still for a second); stop it with SIGINT, as a user does, afterwards."""
    import signal
    import subprocess

    path = TOOLS_DIR / f"{name}-bpfcc"
    if not path.exists():
        raise BenchError(f"{path} is missing: apt-get install bpfcc-tools (`make bench` does)")
    process = subprocess.Popen([str(path), *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    tool = RunningTool(name, process)
    try:
        deadline, seen, steady_since = time.monotonic() + TOOL_START_S, -1, time.monotonic()
        while True:
            if process.poll() is not None:
                raise BenchError(f"{name}-bpfcc exited with {process.returncode}: {process.stderr.read()[-300:]}")
            count = len(tool.program_fds())
            if count != seen:
                seen, steady_since = count, time.monotonic()
            elif count and time.monotonic() - steady_since >= 1.0:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{name}-bpfcc loaded no BPF program within {TOOL_START_S:.0f} s")
            time.sleep(0.1)
        yield tool
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
