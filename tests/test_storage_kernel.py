"""The storage observer on the real kernel, with loop devices, mounts and cgroups the tests make.

How the kernel is made to fail a write or hold one for seconds is in storage_scenarios.py; normal
I/O here is thousands of direct 4 KiB writes to a loop device on a tmpfs.

Other tests on this node may use loop devices at the same time, so every
assertion is about the test's own device, found by its major:minor and name.
Every loop device, mount, freeze and cgroup is undone in ``finally``. Every
wait goes through ``scaled()`` (long in an emulated guest); the durations the
kernel must see (a freeze) do not.
"""

from __future__ import annotations

import contextlib
import errno
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from kernel_helpers import TAPIO, running_agent, scaled, tool_env
from plugin_helpers import Collect
from storage_scenarios import (
    cgroup2_child,
    direct_write,
    failing_writes,
    fill,
    finished,
    frozen,
    loop_device,
    numbers,
    on_device,
    sparse_file,
    stacked_loops,
    tmpfs,
    wait_writes_in_flight,
)

import tapio_observer_storage
from tapio_core import RunningObserver
from tapio_core.agent import Agent
from tapio_core.btf import Btf
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions
from tapio_observer_storage.detect import IO_ERROR, LATENCY_SPIKE
from tapio_observer_storage.records import STORAGE_RECORD, kernel_dev
from tapio_observer_storage.settings import DeviceRule, StorageSettings

pytestmark = pytest.mark.kernel

MS = 1_000_000
#: How long a frozen file system holds the request; only a lower bound on its latency matters.
FREEZE_S = 2.0
#: After the occurrence we wait for, how long a wrongly duplicated one would have had to show up (scaled).
SETTLE_S = 0.5
#: What dd says for each errno a failed write to the full tmpfs's loop device can end with, and the
#: block status behind it.
WRITE_ERRORS = {"No space left on device": ("ENOSPC", "BLK_STS_NOSPC", 3),
                "Input/output error": ("EIO", "BLK_STS_IOERR", 10)}


# -- in-process agent ------------------------------------------------------------------------------


@contextlib.contextmanager
def storage_agent(settings: dict | None = None) -> Iterator[tuple[Agent, Collect]]:
    """The real agent runtime, in this process, with the installed storage plugin and a collecting sink."""
    sink = Collect()
    plugins = load_plugins(allow={"storage"}, extra=[("collect", sink)])
    pipeline = Pipeline.build(plugins, ["collect"], SinkOptions(data_dir=Path(".")), {"storage": settings or {}},
                              KernelClock())
    agent = Agent(plugins, pipeline, recorder=None)
    agent.load(ebpf_dir=None)
    try:
        assert pipeline.observers["storage"].status == "running", pipeline.observers["storage"].status_reason
        yield agent, sink
    finally:
        agent.shutdown()


def counts(bpf) -> tuple[int, int]:
    """(unmatched completions, in-flight overflows) as the kernel counted them, summed over CPUs."""
    table = bpf["storage_counts"]
    return sum(leaf.value for leaf in table[0]), sum(leaf.value for leaf in table[1])


def device_state(bpf, device: str):
    """The kernel's entry for ``device`` in map ``devices`` (keyed by request queue; it records the dev_t)."""
    dev = kernel_dev(*numbers(device))
    table = bpf["devices"]
    return next((state for key in table if (state := table.get(key)) is not None and state.dev == dev), None)


def baseline(bpf, device: str, op: int) -> tuple[int, int]:
    """(mean ns, samples) the kernel learned for ``device`` and operation ``op``."""
    state = device_state(bpf, device)
    return (state.ops[op].mean_ns, state.ops[op].samples) if state is not None else (0, 0)


# -- I/O errors --------------------------------------------------------------------------------------


def test_write_error_on_a_full_tmpfs_loop_is_one_io_error_with_exact_device_status_and_issuer(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    recording = tmp_path / "storage.rec"
    with tmpfs(tmp_path / "small", "4M") as small, loop_device(sparse_file(small / "backing", 64 << 20)) as loop:
        fill(small)
        with cgroup2_child() as cgroup, running_agent(data_dir, plugins="storage,stdout", record=recording) as agent:
            writer = direct_write(loop, bs="64k", count=4, seek=200, cgroup=cgroup)
            code, stderr = finished(writer)
            said = [message for message in WRITE_ERRORS if message in stderr]
            assert code != 0 and len(said) == 1, stderr
            errno_name, status, status_code = WRITE_ERRORS[said[0]]
            agent.wait_for(on_device(IO_ERROR, loop))
            time.sleep(scaled(SETTLE_S))
            assert agent.stop() == 0
            cgroup_id = cgroup.stat().st_ino
    errors = agent.matching(on_device(IO_ERROR, loop))
    assert len(errors) == 1, errors  # dd stops at its first failed write: one request, one occurrence
    occ = errors[0]
    assert (occ["severity"], occ["outcome"]) == ("critical", "failure")
    assert occ["error"]["code"] == errno_name  # what the kernel told dd
    data = occ["data"]
    major, minor = numbers(loop)
    assert (data["device"], data["dev_major"], data["dev_minor"]) == (Path(loop).name, major, minor)
    assert (data["status"], data["status_code"], data["errno"]) == (status, status_code, getattr(errno, errno_name))
    # 5.10's block_rq_complete hands over blk_status_to_errno()'s errno, not the status: its BTF prototype says so.
    assert data["status_from_errno"] is (Btf.load().raw_tracepoint_arg("block_rq_complete", 1) == "int")
    assert (data["operation"], data["sector"], data["bytes"]) == ("write", 200 * 65536 // 512, 65536)
    # Completion ran in the loop worker, the issue (on 5.10 and 6.1) in a kblockd worker; the request is dd's,
    # who inserted it, in the cgroup the test made.
    assert (data["pid"], data["tid"], data["comm"], data["cgroup_id"]) == (writer.pid, writer.pid, "dd", cgroup_id)
    assert data["latency_ns"] > 0
    assert agent.matching(on_device(LATENCY_SPIKE, loop)) == []

    replay = subprocess.run(
        [str(TAPIO), "replay", str(recording), "--sink", "stdout", "--plugins", "storage,stdout",
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=scaled(60.0), env=tool_env(), cwd=tmp_path,
    )
    assert replay.returncode == 0, replay.stderr
    assert [json.loads(line) for line in replay.stdout.splitlines() if line.strip()] == agent.occurrences


def test_a_device_failing_thousands_of_requests_sends_its_burst_and_counts_every_other_failure(tmp_path):
    """The kernel's rate limit per device: a burst of records, the rest held back and counted, and the next
    record sent carries how many; delivered + suppressed is exactly the failures the kernel completed."""
    failures, burst = 2000, 50
    with tmpfs(tmp_path / "small", "4M") as small, loop_device(sparse_file(small / "backing", 64 << 20)) as loop:
        fill(small)
        with storage_agent({"record_burst": burst, "record_rate_per_s": 0.001}) as (agent, sink):
            assert failing_writes(loop, failures) == failures
            while agent.drain("storage"):
                pass
            agent.housekeeping()
            observer = agent.pipeline.observers["storage"]
            held_back = observer.counters["suppressed"]
            # The limit lifted (a record now costs 1 ns): the next failure is sent, carrying the count.
            table = observer.bpf["storage_settings"]
            table[table.Key(tapio_observer_storage.SETTING_RECORD_COST_NS)] = table.Leaf(1)
            assert failing_writes(loop, 1, first_block=8192) == 1
            while agent.drain("storage"):
                pass
            agent.housekeeping()
    errors = [occ for occ in sink.received if occ.type == IO_ERROR and occ.data["device"] == Path(loop).name]
    assert len(errors) == burst + 1
    assert len(errors) - 1 + held_back == failures  # none lost, none counted twice
    assert "suppressed" not in errors[0].data and errors[-1].data["suppressed"] == held_back == failures - burst
    assert observer.counters["suppressed"] == held_back and observer.lost == 0


def test_completions_never_seen_issued_are_counted_and_reach_the_observers_counters(tmp_path):
    """O_SYNC writes end in flush completions that were never issued as such: counted, never judged."""
    with (tmpfs(tmp_path / "roomy", "64M") as roomy,
          loop_device(sparse_file(roomy / "backing", 32 << 20)) as loop,
          storage_agent() as (agent, sink)):
        observer = agent.pipeline.observers["storage"]
        unmatched_before, _ = counts(observer.bpf)
        assert finished(direct_write(loop, count=50, sync=True))[0] == 0
        unmatched_after, _ = counts(observer.bpf)
        agent.housekeeping()  # what the agent does every second: the kernel's counts into `tapio status`
        agent.drain("storage")
    assert unmatched_after - unmatched_before >= 50
    assert observer.counters["unmatched_completions"] >= unmatched_after
    assert [o for o in sink.received if o.data["device"] == Path(loop).name] == []  # no guessed latency


# -- latency -----------------------------------------------------------------------------------------


def test_request_held_by_a_frozen_filesystem_is_one_critical_spike_judged_by_its_device_rule(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with stacked_loops(tmp_path) as (ext4, upper):
        name = Path(upper).name
        settings = ["--set", "storage.warning_ms=60000", "--set", "storage.critical_ms=120000",
                    "--set", f'storage.devices=[{{match="{name}", warning_ms=500, critical_ms=1500}}]']
        with running_agent(data_dir, plugins="storage,stdout", extra=settings) as agent:
            # Normal writes first, so the kernel has learned what this device's writes usually take.
            assert finished(direct_write(upper, count=200))[0] == 0
            with frozen(ext4):
                writer = direct_write(upper, seek=1000)
                wait_writes_in_flight(upper, 1)
                time.sleep(FREEZE_S)
            assert finished(writer)[0] == 0
            agent.wait_for(on_device(LATENCY_SPIKE, upper))
            time.sleep(scaled(SETTLE_S))
            assert agent.stop() == 0
    spikes = agent.matching(on_device(LATENCY_SPIKE, upper))
    assert len(spikes) == 1, spikes
    occ = spikes[0]
    assert (occ["severity"], occ["outcome"], occ.get("error")) == ("critical", "success", None)
    data = occ["data"]
    assert (data["dev_major"], data["dev_minor"]) == numbers(upper)
    assert (data["pid"], data["comm"], data["operation"]) == (writer.pid, "dd", "write")
    assert (data["sector"], data["bytes"]) == (1000 * 8, 4096)
    assert (data["threshold_rule"], data["warning_threshold_ns"], data["critical_threshold_ns"]) == (
        name, 500 * MS, 1500 * MS)
    assert data["latency_ns"] >= data["critical_threshold_ns"]
    assert data["baseline_samples"] == 200  # one request per write, each completed before the next
    assert 0 < data["baseline_latency_ns"] < data["warning_threshold_ns"]
    assert agent.matching(on_device(IO_ERROR, upper)) == []


def test_normal_direct_io_under_load_is_judged_in_the_kernel_and_never_crosses(tmp_path):
    writers, writes = 2, 2000
    with (tmpfs(tmp_path / "roomy", "64M") as roomy,
          loop_device(sparse_file(roomy / "backing", 32 << 20)) as loop,
          storage_agent() as (agent, sink)):  # the default thresholds
        observer = agent.pipeline.observers["storage"]
        _, samples_before = baseline(observer.bpf, loop, op=1)
        processes = [direct_write(loop, count=writes, seek=i * writes) for i in range(writers)]
        assert [finished(p)[0] for p in processes] == [0] * writers
        agent.drain("storage")
        mean_ns, samples = baseline(observer.bpf, loop, op=1)
    # Every write was judged in the kernel (racing CPUs may drop a few baseline updates, never many)...
    assert samples - samples_before >= 0.9 * writers * writes
    assert 0 < mean_ns < StorageSettings().warning_ms * MS
    # ...and none of them crossed to userspace (with no device rules the kernel's screen is exact).
    assert [o for o in sink.received if o.data["device"] == Path(loop).name] == []
    assert observer.counters.get("screened_in_userspace", 0) == 0


# -- the bounded in-flight map ----------------------------------------------------------------------


def test_requests_beyond_a_full_inflight_map_are_counted_and_never_reported_with_a_guess(tmp_path):
    """Compiled with room for 4 in-flight requests; 8 writes held by a frozen file system."""
    from tapio_core.bpf import kernel_fit, program_text, read_counter, shared_include_dir
    from tapio_core.bpf_objects import compile_in_helper
    from tapio_core.ringbuf import RingBufferReader

    spec = tapio_observer_storage.OBSERVER
    fit = kernel_fit(spec, Btf.load())
    # 5.10, 6.1, 6.12 and 6.18 each have one of every pair of layouts: nothing missing, no feature off.
    assert (fit.missing, fit.disabled) == ((), {})
    flags = list(fit.cflags)
    bpf, _ = compile_in_helper(program_text(spec.bpf_source, None),
                               [f"-I{shared_include_dir()}", *flags, "-DSTORAGE_MAX_INFLIGHT=4"])
    try:
        with stacked_loops(tmp_path) as (ext4, upper):
            name = Path(upper).name
            settings = StorageSettings(warning_ms=60_000.0, critical_ms=120_000.0,
                                       devices=(DeviceRule(name, warning_ms=300.0, critical_ms=300.0),))
            observer = RunningObserver(spec=spec, config=settings, bpf=bpf)
            tapio_observer_storage.tapio_observer_started(observer=observer)
            reader = RingBufferReader(bpf["events"].fd, bpf["events"].max_entries, STORAGE_RECORD.itemsize)
            unmatched_before, overflows_before = counts(bpf)
            with frozen(ext4):
                writers = [direct_write(upper, seek=i) for i in range(8)]
                wait_writes_in_flight(upper, 8)
                time.sleep(0.5)
            assert [finished(w)[0] for w in writers] == [0] * 8
            unmatched, overflows = counts(bpf)
            shown = {c.name: read_counter(bpf, c.map, c.index) for c in spec.bpf_counters}
            events = np.frombuffer(reader.read_batch(), STORAGE_RECORD)
            anomalies = tapio_observer_storage.tapio_detect_anomalies(observer=observer, events=events)
            device_warning = device_state(bpf, upper).warning_ns
            reader.close()
    finally:
        bpf.close()
    ours = [a for a in anomalies if a.data["device"] == name]
    assert 1 <= len(ours) <= 4  # other I/O on the node may hold some of the 4 slots
    assert all(a.type == LATENCY_SPIKE and a.data["latency_ns"] >= 300 * MS for a in ours)
    assert {a.data["pid"] for a in ours} <= {w.pid for w in writers}
    assert len({a.data["sector"] for a in ours}) == len(ours)
    # The writes without a slot were counted at issue and, at completion, counted instead of judged.
    assert overflows - overflows_before >= 8 - len(ours)
    assert unmatched - unmatched_before >= 8 - len(ours)
    # The agent reads the same counts into `tapio status` through the observer's BpfCounters.
    assert shown["inflight_overflows"] >= overflows and shown["unmatched_completions"] >= unmatched
    # Userspace gave the kernel this device's own threshold once it saw the device.
    assert device_warning == 300 * MS
