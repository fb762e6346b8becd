"""``make soak``: the real agent for a long while under mixed real load; nothing may grow after warm-up.

Runs ``tapio-agent`` with every observer, the stdout (to /dev/null) and file sinks, while a load loop
makes the kernel refuse connects, retransmit (random drops in a namespace), end processes abnormally,
OOM-kill a cgroup's process and fail block writes (a loop device on a full tmpfs), over and over.
Each second it samples the agent's resident memory, open descriptors and threads. After the warm-up
it compares the first minute with the last (medians): resident memory may not grow by more than
RSS_TOLERANCE_MB (the file sink's retention list fills up to its 10,000 names, about 1 MB),
descriptors and threads not at all. Prints ``name: value`` lines as ``make bench``
does and exits 1 if anything grew or a load failed. Not in CI: it takes ten minutes.

    .venv/bin/python bench/soak.py [SECONDS]        # default 600
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
for path in (REPO / "tests", REPO / "bench", REPO):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_agent_idle import stop  # noqa: E402
from bench_agent_memory import status_kb, watch_start  # noqa: E402
from common import BenchError, note, report, require_root  # noqa: E402

DEFAULT_S = 600.0
WARM_UP_S = 60.0
WINDOW_S = 60.0
RSS_TOLERANCE_MB = 2.0


def sample(pid: int) -> tuple[float, int, int]:
    """(resident MB, open descriptors, threads) of ``pid`` now."""
    return status_kb(pid, "VmRSS") / 1024, len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))


class Load:
    """The kernel scenarios of the test suite, in a loop on a thread of its own, until stopped."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.done: Counter[str] = Counter()
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        from container_scenarios import memory_layouts, oom_kill
        from kernel_helpers import closed_tcp_port, network_namespace, run_connects
        from network_scenarios import nft_random_drop, random_port, run_client, tcp_server
        from storage_scenarios import failing_writes, fill, loop_device, sparse_file, tmpfs

        versions = memory_layouts()
        with contextlib.ExitStack() as stack:
            netns = stack.enter_context(network_namespace())
            small = stack.enter_context(tmpfs(self.scratch / "small", "4M"))
            loop = stack.enter_context(loop_device(sparse_file(small / "backing", 64 << 20)))
            fill(small)
            port = random_port()
            stack.enter_context(nft_random_drop(netns, port, 30))
            stack.enter_context(tcp_server(netns, "127.0.0.1", port, "sink"))
            refused_port = closed_tcp_port("127.0.0.1")
            round_ = 0

            def one_oom_kill() -> None:
                with oom_kill(versions[0]):
                    pass
            while not self.stop.is_set():
                round_ += 1
                self.step("refused_connects", run_connects, "127.0.0.1", refused_port, count=20, netns=netns)
                self.step("abnormal_exits", subprocess.run, ["sh", "-c", "for i in 1 2 3 4 5; do (exit 3); done"])
                self.step("io_errors", failing_writes, loop, 20, first_block=4096 + (20 * round_) % 8192)
                if round_ % 5 == 0:
                    self.step("retransmitting_transfers", run_client, netns, "127.0.0.1", port, "bulk", amount=1 << 20)
                if round_ % 15 == 0 and versions:
                    self.step("oom_kills", one_oom_kill)
                self.stop.wait(2.0)

    def step(self, name: str, action, *args, **kwargs) -> None:
        try:
            action(*args, **kwargs)
            self.done[name] += 1
        except Exception as exc:  # a load that fails is reported, the soak goes on
            self.failures.append(f"{name}: {type(exc).__name__}: {exc}")


def main(argv: list[str]) -> int:
    require_root("soak")
    duration = float(argv[0]) if argv else DEFAULT_S
    if duration < WARM_UP_S + 2 * WINDOW_S:
        raise SystemExit(f"soak: at least {WARM_UP_S + 2 * WINDOW_S:.0f} s (warm-up and two minutes to compare)")
    agent_bin = Path(sys.executable).with_name("tapio-agent")
    with tempfile.TemporaryDirectory(prefix="tapio-soak-") as scratch:
        work = Path(scratch)
        command = [str(agent_bin), "--sink", "stdout", "--sink", "file", "--data-dir", str(work / "data")]
        agent = subprocess.Popen(command, cwd=work, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
        samples: list[tuple[float, float, int, int]] = []
        load = Load(work)
        try:
            watch_start(agent, time.monotonic())  # and its stderr read on, so it never blocks
            started = time.monotonic()
            load.thread.start()
            note(f"soak: {duration:.0f} s under load (warm-up {WARM_UP_S:.0f} s) ...")
            while (elapsed := time.monotonic() - started) < duration:
                if agent.poll() is not None:
                    raise BenchError(f"tapio-agent exited with status {agent.returncode} during the soak")
                samples.append((elapsed, *sample(agent.pid)))
                time.sleep(1.0)
        finally:
            load.stop.set()
            if load.thread.is_alive():
                load.thread.join(120)
            stop(agent)
        state = json.loads((work / "data" / "state.json").read_text())
    return judge(samples, load, state, agent.returncode)


def judge(samples: list[tuple[float, float, int, int]], load: Load, state: dict, exit_code: int) -> int:
    first = [s for s in samples if WARM_UP_S <= s[0] < WARM_UP_S + WINDOW_S]
    last = [s for s in samples if s[0] >= samples[-1][0] - WINDOW_S]
    rss_first, rss_last = statistics.median(s[1] for s in first), statistics.median(s[1] for s in last)
    figures = {
        "soak_duration_s": samples[-1][0],
        "soak_rss_mb_after_warm_up": rss_first, "soak_rss_mb_at_end": rss_last,
        "soak_rss_mb_peak": max(s[1] for s in samples),
        # Medians: a descriptor open for one write (the file sink's temporary file) is not growth.
        "soak_fds_after_warm_up": statistics.median(s[2] for s in first),
        "soak_fds_at_end": statistics.median(s[2] for s in last),
        "soak_threads_after_warm_up": statistics.median(s[3] for s in first),
        "soak_threads_at_end": statistics.median(s[3] for s in last),
        "soak_agent_exit_code": exit_code,
    }
    for name, count in sorted(load.done.items()):
        figures[f"soak_load_{name}"] = count
    for name, entry in sorted(state.get("observers", {}).items()):
        figures[f"soak_{name}_anomalies"] = entry.get("anomalies", 0)
        figures[f"soak_{name}_lost"] = entry.get("lost", 0)
    for figure, value in figures.items():
        report(figure, value)
    problems = [f"load failed: {failure}" for failure in load.failures[:5]]
    if rss_last - rss_first > RSS_TOLERANCE_MB:
        problems.append(f"resident memory grew {rss_last - rss_first:.1f} MB after warm-up")
    if figures["soak_fds_at_end"] > figures["soak_fds_after_warm_up"]:
        problems.append("open descriptors grew after warm-up")
    if figures["soak_threads_at_end"] > figures["soak_threads_after_warm_up"]:
        problems.append("threads grew after warm-up")
    if exit_code != 0:
        problems.append(f"the agent exited with status {exit_code} on SIGTERM")
    for problem in problems:
        note(f"soak: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except BenchError as exc:
        note(f"soak: error: {exc}")
        sys.exit(1)
