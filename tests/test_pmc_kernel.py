"""The pmc observer on the real kernel.

This machine kind has no hardware PMU (no ``cpu`` under
/sys/bus/event_source/devices; opening cycles fails with ENOENT), so:

- the real agent started with pmc must report pmc unsupported, once, and keep
  every other observer working;
- the perf/BPF plumbing (counters opened per CPU into perf arrays, read by the
  BPF program on a cpu-clock timer, records drained and judged) runs for real
  with the hidden ``counters = "software"`` preset: cycles -> cpu-clock,
  instructions -> task-clock, stall cycles -> page-faults. Page faults can be
  made on purpose on a chosen CPU, so a real "stall" episode can be provoked.
"""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from kernel_helpers import closed_tcp_port, run_connects, running_agent, scaled
from plugin_helpers import Collect

import tapio_observer_pmc
from tapio_core.agent import Agent
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.recording import RecordedBatch, RecordWriter, read_recording
from tapio_core.sink import SinkOptions
from tapio_observer_pmc.counters import PRESETS, probe
from tapio_observer_pmc.detect import MEMORY_PRESSURE
from tapio_observer_pmc.records import PMC_RECORD

pytestmark = pytest.mark.kernel

HAS_CORE_PMU = Path("/sys/bus/event_source/devices/cpu").exists()
SOFTWARE = {"counters": "software", "interval_ms": 100, "baseline_intervals": 3}
PAGE = 4096

#: Touches SIZE MiB of fresh 4 KiB pages on one CPU: one page fault per page. It spins on that
#: CPU for a while before and after, so the CPU's timer (which does not fire on an idle CPU) reads
#: the counters just before the burst and sees the CPU healthy again after it.
PAGE_FAULTS = r"""
import mmap, os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
def spin(seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass
size = int(sys.argv[2]) << 20
memory = mmap.mmap(-1, size)
memory.madvise(mmap.MADV_NOHUGEPAGE)
spin(float(sys.argv[3]))
for offset in range(0, size, 4096):
    memory[offset] = 1
spin(float(sys.argv[3]))
"""
SPIN = "import os, sys\nos.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass\n"


def perf_event_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[perf_event]"
        except OSError:
            continue
    return count


def online_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


@contextmanager
def pmc_agent(settings: dict, recording: Path | None = None) -> Iterator[tuple[Agent, Collect]]:
    """An in-process agent running only the pmc observer; always shut down (detaching everything)."""
    sink = Collect()
    loaded = load_plugins(allow=set(), extra=[("pmc", tapio_observer_pmc), ("collect", sink)])
    clock = KernelClock()
    pipeline = Pipeline.build(loaded, ["collect"], SinkOptions(data_dir=Path(".")), {"pmc": settings}, clock)
    recorder = RecordWriter(recording, clock.offset_ns) if recording else None
    agent = Agent(loaded, pipeline, recorder=recorder)
    try:
        agent.load(ebpf_dir=None)
        yield agent, sink
    finally:
        agent.shutdown()


@contextmanager
def busy(cpus: list[int]) -> Iterator[None]:
    """A spinning process pinned to each CPU: the sampling timer does not fire on idle CPUs."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPIN, str(cpu)]) for cpu in cpus]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def drain_for(agent: Agent, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if "pmc" in agent.readers:
            agent.drain("pmc")
        time.sleep(0.05)


def recorded_readings(path: Path) -> np.ndarray:
    batches = [item.records for item in read_recording(path) if isinstance(item, RecordedBatch)]
    return np.frombuffer(b"".join(batches), PMC_RECORD)


# -- no PMU -----------------------------------------------------------------------------------------


def test_probe_tells_software_events_from_missing_hardware():
    assert probe(PRESETS["software"]["cycles"], 0) == 0
    if not HAS_CORE_PMU:
        assert probe(PRESETS["hardware"]["cycles"], 0) == errno.ENOENT


def test_agent_reports_pmc_unsupported_once_and_still_detects_a_refused_connect(tmp_path):
    port = closed_tcp_port("127.0.0.1")
    with running_agent(tmp_path, plugins="pmc,network,stdout", extra=["-v"]) as agent:
        ready = next(line for line in agent.stderr_lines if line.startswith("tapio-agent: running observers"))
        connector = run_connects("127.0.0.1", port)
        [refused] = agent.wait_for(lambda occ: occ["type"] == "kernel.network.connection_refused"
                                   and occ["data"]["dst_port"] == port)
        assert agent.process.poll() is None, agent.stderr_text()
        assert agent.stop() == 0
    assert refused["data"]["pid"] == connector["pid"]
    stderr = agent.stderr_text()
    unsupported = [line for line in agent.stderr_lines if "pmc: unsupported" in line]
    if HAS_CORE_PMU:  # a machine with counters runs pmc instead
        assert unsupported == [] and "pmc" in ready
        return
    assert unsupported == [
        "tapio-agent: WARNING: pmc: unsupported: no hardware PMU "
        "(cpu-cycles: No such file or directory (ENOENT, cpu 0))"
    ], stderr
    assert ready.startswith("tapio-agent: running observers network;"), ready
    assert "perf_event_open" not in stderr  # no libbcc noise per failed counter
    assert "Traceback" not in stderr


@pytest.mark.skipif(HAS_CORE_PMU, reason="this machine has a hardware PMU")
def test_unsupported_observer_leaves_nothing_open_and_is_never_compiled(caplog):
    """tapio_observer_preflight finds no cycles counter before the compile: no helper runs for pmc."""
    caplog.set_level(logging.INFO, logger="tapio.bpf")
    before = perf_event_fds()
    with pmc_agent({}) as (agent, _):
        observer = agent.pipeline.observers["pmc"]
        assert (observer.status, observer.bpf) == ("unsupported", None)
        assert observer.status_reason.startswith("pmc: unsupported: no hardware PMU (cpu-cycles: ")
        assert agent.readers == {}
        assert observer.state["missing_counters"]["cycles"].startswith("cpu-cycles: No such file or directory")
    assert perf_event_fds() == before
    assert not [r for r in caplog.records if r.getMessage().startswith("pmc: compiled")]


# -- the plumbing, with software events ----------------------------------------------------------------


def test_every_cpu_sends_increasing_counters_that_the_detector_judges(tmp_path):
    cpus = online_cpus()
    recording = tmp_path / "pmc.rec"
    before = perf_event_fds()
    with pmc_agent(SOFTWARE, recording) as (agent, _), busy(cpus):
        observer = agent.pipeline.observers["pmc"]
        assert observer.status == "running", observer.status_reason
        assert observer.state["counters"] == {
            "cycles": "cpu-clock", "instructions": "task-clock", "stall_cycles": "page-faults"}
        # three counters per CPU plus the sampling timer per CPU
        assert perf_event_fds() - before == 4 * len(cpus)
        drain_for(agent, 1.2)
    assert perf_event_fds() == before  # shutdown closed counters and timers

    readings = recorded_readings(recording)
    assert sorted(set(readings["cpu"].tolist())) == cpus
    assert set(readings["valid"].tolist()) == {0b111}
    detector = observer.state["detector"]
    for cpu in cpus:
        mine = readings[readings["cpu"] == cpu]
        assert len(mine) >= 5, mine
        counted = np.diff(mine["counter"].astype(np.int64), axis=0)
        elapsed = np.diff(mine["timestamp_ns"].astype(np.int64))
        assert (counted[:, :2] > 0).all() and (counted[:, 2] >= 0).all()
        # cpu-clock counts nanoseconds: read at each timer tick it advances with the kernel's clock
        assert np.allclose(counted[:, 0], elapsed, rtol=0.05)
        # task-clock / cpu-clock on a busy CPU is ~1: the detector learnt that as this CPU's "IPC"
        assert detector.cpus[cpu].baseline.ready
        assert detector.cpus[cpu].baseline.value == pytest.approx(1.0, abs=0.05)
    assert observer.counters["intervals"] == len(readings) - len(cpus)
    assert observer.records == len(readings)


def test_page_faults_on_one_cpu_are_a_real_memory_pressure_episode():
    cpu = online_cpus()[-1]
    megabytes = 256
    # Most of the burst's faults fall inside the episode (its first interval may start mid-burst).
    expected_faults = (megabytes << 20) // PAGE // 4
    # Page faults per cpu-clock ns: 500 faults in a 100 ms interval is 0.0005 %. Low, so the burst stays one
    # episode where faulting is slow (an emulated 5.10 guest split it into pieces at 0.005 %).
    settings = dict(SOFTWARE, stall_warning_pct=0.0005, stall_critical_pct=50.0)

    def ours(sink):
        # Other processes on this CPU may fault too (e.g. a compiler): look for the burst's episode.
        return [o for o in sink.received if o.data["cpu"] == cpu and o.data["stall_cycles"] >= expected_faults]

    with pmc_agent(settings) as (agent, sink):
        drain_for(agent, 0.3)
        # Spins of 3 intervals: readings before the burst, and the recovery intervals after it.
        subprocess.run([sys.executable, "-c", PAGE_FAULTS, str(cpu), str(megabytes), "0.3"], check=True,
                       timeout=scaled(30))
        deadline = time.monotonic() + 5
        while not ours(sink) and time.monotonic() < deadline:
            drain_for(agent, 0.1)
    assert len(ours(sink)) == 1, [o.data for o in sink.received]
    [occurrence] = ours(sink)
    assert (occurrence.type, occurrence.severity, occurrence.outcome) == (MEMORY_PRESSURE, "warning", "failure")
    data = occurrence.data
    assert data["ended"] is True and data["intervals"] >= 1 and data["duration_ns"] > 0
    assert data["worst_stall_pct"] > settings["stall_warning_pct"]
    assert data["stall_pct"] == pytest.approx(100 * data["stall_cycles"] / data["cycles"], abs=0.001)
    assert data["missing_counters"] == []


def test_a_missing_stall_counter_degrades_to_ipc_only(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    recording = tmp_path / "pmc.rec"
    cpus = online_cpus()
    with pmc_agent(dict(SOFTWARE, skip_counters=["stall_cycles"]), recording) as (agent, _), busy(cpus):
        observer = agent.pipeline.observers["pmc"]
        assert observer.status == "running"
        assert observer.state["missing_counters"] == {"stall_cycles": "skipped by skip_counters"}
        drain_for(agent, 0.6)
    readings = recorded_readings(recording)
    assert len(readings) >= len(cpus)
    assert set(readings["valid"].tolist()) == {0b011}  # the BPF read of the empty slot failed
    assert (readings["counter"][:, 2] == 0).all()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "pmc" in r.getMessage()]
    assert warnings == ["pmc: degraded: missing stall_cycles (skipped by skip_counters); "
                        "cpu_stall and memory_pressure not detected"]
    assert observer.counters["intervals"] > 0


def test_a_degraded_observer_says_why_in_its_status():
    with pmc_agent(dict(SOFTWARE, skip_counters=["stall_cycles"])) as (agent, _):
        observer = agent.pipeline.observers["pmc"]
        assert "missing stall_cycles" in observer.status_reason
