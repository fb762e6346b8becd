"""What the agent costs a node in memory and start-up, with everything on.

Starts the real ``tapio-agent`` as the image's entrypoint does (``python3 -OO``), with all four
observers, the stdout (to /dev/null), file and otlp sinks (into a local receiver) and the kubernetes
enricher (``NODE_NAME`` and a kubeconfig pointing at the test suite's API server, which lists PODS
pods of this node) and the metrics endpoint on (as the DaemonSet has it, its probes asked every few
seconds), then reports:

- ``agent_startup_s``: from process start to the agent's ready line (every observer compiled,
  attached and started, or said to be unsupported);
- ``agent_steady_rss_mb``: the agent's resident memory STEADY_AFTER_S seconds after start;
- ``agent_peak_rss_mb``: the agent's high-water mark (VmHWM) by then;
- ``compile_helper_peak_rss_mb``: the largest peak of the compile helpers (from the agent's log),
  which run two at a time at start-up and are gone afterwards;
- ``agent_all_on_idle_cpu_pct``: the CPU its threads used over the IDLE_S seconds before that sample
  (nothing happening but its own housekeeping and the enricher's open watch), % of one core.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench_agent_idle import cpu_ns, stop
from common import BenchError, note, require_root

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

STEADY_AFTER_S = 60.0
IDLE_S = 30.0
START_TIMEOUT_S = 120.0
PODS = 50
NODE = "tapio-bench-node"
READY_LINE = "tapio-agent: running"
PROBE_EVERY_S = 5.0
HELPER_LINE = re.compile(r"(\w+): compiled and attached in [\d.]+ s by a helper process that peaked at (\d+) MB")


def status_kb(pid: int, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    if match is None:
        raise BenchError(f"/proc/{pid}/status has no {field}")
    return int(match.group(1))


def run() -> dict[str, float]:
    require_root("bench_agent_memory")
    from tests.http_servers import Receiver, free_port
    from tests.k8s_api_server import make_pod, serve, write_kubeconfig

    agent_bin = Path(sys.executable).with_name("tapio-agent")
    with serve() as api, tempfile.TemporaryDirectory(prefix="tapio-bench-memory-") as scratch, Receiver() as otlp:
        for index in range(PODS):
            api.add_pod(make_pod(f"pod-{index}", node=NODE, containers=[("app", f"{index:064x}")]))
        work = Path(scratch)
        # The metrics endpoint on, as the DaemonSet has it, and asked as its probes ask it.
        metrics = f"127.0.0.1:{free_port()}"
        env = {"NODE_NAME": NODE, "KUBECONFIG": str(write_kubeconfig(work / "kubeconfig", api.url)),
               "TAPIO_METRICS_ADDR": metrics, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
        # As the image's entrypoint runs it: -OO (no docstrings, about 4 MB less resident).
        command = [sys.executable, "-OO", str(agent_bin), "-v", "--sink", "stdout", "--sink", "file", "--sink", "otlp",
                   "--set", f"otlp.endpoint={otlp.url}", "--data-dir", str(work / "data")]
        started, probing = time.monotonic(), threading.Event()
        agent = subprocess.Popen(command, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            ready_at, helper_peaks = watch_start(agent, started)
            threading.Thread(target=probe, args=(metrics, probing), daemon=True).start()
            time.sleep(max(0.0, started + STEADY_AFTER_S - IDLE_S - time.monotonic()))
            idle_from, idle_ns = time.monotonic(), cpu_ns(agent.pid)
            time.sleep(max(0.0, started + STEADY_AFTER_S - time.monotonic()))
            idle_pct = 100.0 * (cpu_ns(agent.pid) - idle_ns) / 1e9 / (time.monotonic() - idle_from)
            if agent.poll() is not None:
                raise BenchError(f"tapio-agent exited with status {agent.returncode}")
            steady_kb, peak_kb = status_kb(agent.pid, "VmRSS"), status_kb(agent.pid, "VmHWM")
            if not api.requests_of("watch"):
                raise BenchError("the kubernetes enricher never watched the API server: it was not on")
        finally:
            probing.set()
            stop(agent)
    note("  compile helpers' peaks: " + ", ".join(f"{name} {mb} MB" for name, mb in helper_peaks.items()))
    return {
        "agent_startup_s": ready_at - started,
        "agent_steady_rss_mb": steady_kb / 1024,
        "agent_peak_rss_mb": peak_kb / 1024,
        "compile_helper_peak_rss_mb": float(max(helper_peaks.values(), default=0)),
        "agent_all_on_idle_cpu_pct": idle_pct,
    }


def probe(address: str, done: threading.Event) -> None:
    """What kubelet does with the DaemonSet's probes: /readyz and /healthz every few seconds."""
    while not done.wait(PROBE_EVERY_S):
        for path in ("/readyz", "/healthz"):
            with contextlib.suppress(OSError), urllib.request.urlopen(f"http://{address}{path}", timeout=5):
                pass


def watch_start(agent: subprocess.Popen[str], started: float) -> tuple[float, dict[str, int]]:
    """(when the ready line came, each observer's compile helper peak in MB); the agent's stderr goes on
    being read (and dropped) so it never blocks on a full pipe."""
    ready = threading.Event()
    ready_at: list[float] = []
    peaks: dict[str, int] = {}

    def read() -> None:
        assert agent.stderr is not None
        for line in agent.stderr:
            if (match := HELPER_LINE.search(line)) is not None:
                peaks[match.group(1)] = int(match.group(2))
            if READY_LINE in line and not ready.is_set():
                ready_at.append(time.monotonic())
                ready.set()
            if "WARNING" in line or "ERROR" in line:
                note(f"  agent: {line.rstrip()}")

    threading.Thread(target=read, daemon=True).start()
    while not ready.wait(0.05):
        if agent.poll() is not None:
            raise BenchError(f"tapio-agent exited with status {agent.returncode} before running")
        if time.monotonic() - started > START_TIMEOUT_S:
            raise BenchError(f"tapio-agent did not report running within {START_TIMEOUT_S:.0f} s")
    return ready_at[0], peaks
