"""What every benchmark module shares: the output format and a few measuring helpers.

Every figure is one line ``name: value`` on stdout, so later benchmarks add lines and
tools can parse the output with one split. Commentary for humans goes to stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

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
    fd = ctypes.CDLL("libbpf.so.1", use_errno=True).bpf_enable_stats(BPF_STATS_RUN_TIME)
    if fd < 0:
        raise BenchError(f"bpf_enable_stats failed: {os.strerror(-fd)}")
    try:
        yield
    finally:
        os.close(fd)


def program_stats(fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a loaded BPF program, from /proc/self/fdinfo."""
    lines = Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    return int(fields["run_time_ns"]), int(fields["run_cnt"])
