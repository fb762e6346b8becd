"""`tapio recent` and `tapio health` with 100,000 stored occurrences: do they stay interactive?

A data dir is filled as a busy agent's file sink leaves it at its file bound:
10,000 files (the store's default retention) of 10 occurrences each, spread over
the last 10 minutes, file mtimes set to their write times; a state.json says an
agent is running. Each command runs as an operator runs it -- a fresh `tapio`
process, so interpreter start-up is included (`cli_startup_s` shows that floor).

Baselines measured in the same run, in-process, over the same files:
- json_loads_100k_s: read every file and ``json.loads`` every line, nothing else;

Rounds interleave the baseline and the commands; figures are medians of ROUNDS
rounds, ratios the median of per-round ratios. The page cache is warm throughout.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BenchError, median, note, timed

from tapio_core.occurrence import format_timestamp, occurrence_id
from tapio_core.state import write_state
from tapio_core.store import SUFFIX, occurrences_dir

OCCURRENCES = 100_000
PER_FILE = 10
SPAN_S = 600
ROUNDS = 3
TYPES = [  # (type, severity, weight): mostly network, some of each other observer
    ("kernel.network.connection_refused", "warning", 70),
    ("kernel.network.connection_timeout", "error", 10),
    ("kernel.container.abnormal_exit", "warning", 10),
    ("kernel.storage.io_error", "error", 5),
    ("kernel.storage.latency_spike", "warning", 4),
    ("kernel.container.oom_kill", "critical", 1),
]


def tapio_command() -> str:
    beside = Path(sys.executable).with_name("tapio")
    found = str(beside) if beside.exists() else shutil.which("tapio")
    if found is None:
        raise BenchError("tapio is not installed: run `make setup`")
    return found


def occurrence(rng: random.Random, wall_ns: int) -> dict:
    """One occurrence as the agent writes it (same keys, same order, realistic data)."""
    type_, severity = rng.choices([(t, s) for t, s, _ in TYPES], weights=[w for *_, w in TYPES])[0]
    pid = rng.randrange(1000, 60000)
    data = {"pid": pid, "tid": pid, "comm": rng.choice(["curl", "java", "envoy", "python3", "nginx"]),
            "cgroup_id": rng.randrange(1, 5000)}
    if type_.startswith("kernel.network."):
        data.update(src_ip="10.0.0.5", dst_ip=f"10.1.{rng.randrange(4)}.{rng.randrange(1, 20)}",
                    src_port=rng.randrange(30000, 60000), dst_port=rng.choice([80, 443, 5432, 6379]),
                    family="ipv4", protocol="tcp", old_state="SYN_SENT", new_state="CLOSE",
                    sock_cookie=rng.randrange(1 << 40), syn_retransmits=0, connect_duration_ns=291274)
    elif type_.startswith("kernel.storage."):
        data.update(dev_major=7, dev_minor=rng.randrange(8), sector=rng.randrange(1 << 20), bytes=65536,
                    latency_ns=rng.randrange(10_000, 2_000_000_000))
    else:
        data.update(exit_code=rng.choice([1, 3, 137]), signal=rng.choice([0, 9, 11]))
    data["timestamp_ns"] = wall_ns % 10**12
    timestamp = format_timestamp_ns(wall_ns)
    return {"id": occurrence_id(wall_ns, repr((type_, pid, wall_ns)).encode()), "timestamp": timestamp,
            "source": "tapio", "type": type_, "protocol_version": "1.0", "severity": severity, "outcome": "failure",
            "error": {"code": "ECONNREFUSED", "message": "connection refused: peer answered SYN with RST"},
            "context": {"node": "bench-node", "entities": [{"kind": "pod", "id": f"uid-{pid % 40}",
                                                           "name": f"web-{pid % 40}"}]},
            "data": data}


def format_timestamp_ns(wall_ns: int) -> str:
    from datetime import UTC, datetime

    return format_timestamp(datetime.fromtimestamp(wall_ns / 1e9, tz=UTC))


def fill(data_dir: Path) -> int:
    """The store and a fresh state; returns the bytes written."""
    rng = random.Random(9)
    directory = occurrences_dir(data_dir)
    directory.mkdir(parents=True, mode=0o700)
    start_ns = time.time_ns() - SPAN_S * 10**9
    step_ns = SPAN_S * 10**9 // OCCURRENCES
    total = 0
    for first in range(0, OCCURRENCES, PER_FILE):
        stamps = [start_ns + (first + k) * step_ns for k in range(PER_FILE)]
        body = "".join(json.dumps(occurrence(rng, ns), separators=(",", ":")) + "\n" for ns in stamps).encode()
        written_ns = stamps[-1] + 1_000_000  # the batch is written just after its last occurrence
        path = directory / f"{written_ns:020d}-1-{first // PER_FILE:06d}{SUFFIX}"
        path.write_bytes(body)
        os.utime(path, ns=(written_ns, written_ns))
        total += len(body)
    now = time.time()
    write_state(data_dir, {"agent": {"version": "bench", "pid": os.getpid(), "running": True,
                                     "started_at": now - SPAN_S, "node": "bench-node"},
                           "updated_at": now, "config": {}, "sinks": {},
                           "observers": {name: {"status": "running", "reason": "", "records": 0, "anomalies": 0}
                                         for name in ("network", "container", "storage")}})
    return total


def json_loads_only(data_dir: Path) -> int:
    lines = 0
    for path in occurrences_dir(data_dir).iterdir():
        for line in path.read_bytes().splitlines():
            json.loads(line)
            lines += 1
    return lines


def run_cli(*args: str) -> float:
    """Wall seconds of one `tapio` process; fails loudly when it fails."""
    start = time.perf_counter()
    done = subprocess.run([tapio_command(), *args], capture_output=True, timeout=300)
    elapsed = time.perf_counter() - start
    if done.returncode not in (0, 1, 2):  # health exits 1/2 for degraded/critical: that is an answer
        raise BenchError(f"tapio {' '.join(args)} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return elapsed


def run() -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="tapio-bench-cli-") as workdir:
        data_dir = Path(workdir)
        seconds, size = timed(lambda: fill(data_dir))
        note(f"  store: {OCCURRENCES:,} occurrences in {OCCURRENCES // PER_FILE:,} files, "
             f"{size / 2**20:.1f} MiB, written in {seconds:.1f} s")
        lines = json_loads_only(data_dir)  # warms the page cache too
        if lines != OCCURRENCES:
            raise BenchError(f"wrote {OCCURRENCES} occurrences but read back {lines}")
        figures = {}
        where = ("--data-dir", str(data_dir))
        commands = {
            "cli_startup_s": ("--help",),
            "cli_recent_100k_s": ("recent", "-n", "20", "--since", "1h", *where),
            "cli_recent_all_100k_s": ("recent", "-n", str(OCCURRENCES), "--since", "1h", "--json", *where),
            "cli_health_100k_s": ("health", "--since", "1h", *where),
            "cli_health_network_100k_s": ("health", "network", "--since", "1h", *where),
        }
        # Interleaved rounds: the baseline and the commands share each round's load on the machine.
        rounds: list[dict[str, float]] = []
        for _ in range(ROUNDS):
            measured = {"json_loads_100k_s": timed(lambda: json_loads_only(data_dir))[0]}
            measured.update((name, run_cli(*args)) for name, args in commands.items())
            rounds.append(measured)
    for name in rounds[0]:
        figures[name] = median(measured[name] for measured in rounds)
    for command in ("cli_recent_100k_s", "cli_recent_all_100k_s", "cli_health_100k_s", "cli_health_network_100k_s"):
        ratio = command.removesuffix("_100k_s") + "_vs_json_loads"
        figures[ratio] = median(measured[command] / measured["json_loads_100k_s"] for measured in rounds)
    return figures
