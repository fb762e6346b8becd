"""The storage observer on the real kernel, with loop devices, mounts and cgroups the tests make.

Recipes (see /work/shared/kernel-scenarios.md):

- I/O error: a loop device whose backing file lives on a tmpfs that is full;
  a direct write to a sparse part of it fails. The loop drivers of 6.12 and
  6.18 hand the backing file's ENOSPC on (BLK_STS_NOSPC); those of 5.10 and
  6.1 turn every failed backing write into EIO (BLK_STS_IOERR), as dd sees too.
- Latency spike: loop (upper) on a file in an ext4 that sits on another loop
  (lower); while ``fsfreeze`` holds the ext4, a direct write to the upper loop
  device cannot complete.
- Normal I/O: thousands of direct 4 KiB writes to a loop device on a tmpfs.

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
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from kernel_helpers import TAPIO, running_agent, scaled, tool_env
from plugin_helpers import Collect

import tapio_observer_storage
from tapio_core import RunningObserver
from tapio_core.agent import Agent
from tapio_core.btf import Btf
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions
from tapio_enrich_kubernetes.cgroups import find_cgroup2_root
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


# -- kernel objects the tests make -------------------------------------------------------------------


def sh(*command: str, timeout: float = scaled(30.0)) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tapio-test", str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)
        where.rmdir()


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    device = sh("losetup", "--find", "--show", str(backing))
    try:
        yield device
    finally:
        end_writers()  # a writer still holding the device would keep it, and its backing mount, busy
        subprocess.run(["losetup", "-d", device], capture_output=True)


@contextlib.contextmanager
def mounted(device: str, where: Path) -> Iterator[Path]:
    where.mkdir()
    sh("mount", device, str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)
        where.rmdir()


@contextlib.contextmanager
def frozen(mountpoint: Path) -> Iterator[None]:
    sh("fsfreeze", "-f", str(mountpoint))
    try:
        yield
    finally:
        sh("fsfreeze", "-u", str(mountpoint))


@contextlib.contextmanager
def stacked_loops(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(ext4 mount point, upper loop device): upper's backing file lives in the ext4 on the lower loop."""
    with tmpfs(tmp_path / "stack", "200M") as stack, loop_device(sparse_file(stack / "lower", 100 << 20)) as lower:
        sh("mkfs.ext4", "-q", lower)
        with mounted(lower, stack / "ext4") as ext4, loop_device(sparse_file(ext4 / "upper", 32 << 20)) as upper:
            yield ext4, upper


@contextlib.contextmanager
def cgroup2_child() -> Iterator[Path]:
    """A fresh cgroup v2 directory (hybrid hosts mount v2 at /sys/fs/cgroup/unified, pure v2 ones at
    /sys/fs/cgroup); removed once its processes have exited."""
    root = find_cgroup2_root()
    assert root is not None, "no cgroup2 mount in /proc/self/mountinfo"
    path = root / f"tapio-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        deadline = time.monotonic() + scaled(5.0)
        while True:
            try:
                path.rmdir()
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def fill(directory: Path) -> None:
    """Write a file until its file system is full."""
    with open(directory / "filler", "wb") as handle:
        chunk = b"\xa5" * (1 << 20)
        with contextlib.suppress(OSError):
            while True:
                handle.write(chunk)
                handle.flush()


def numbers(device: str) -> tuple[int, int]:
    rdev = os.stat(device).st_rdev
    return os.major(rdev), os.minor(rdev)


_writers: list[subprocess.Popen] = []


def direct_write(device: str, *, count: int = 1, seek: int = 0, bs: str = "4k", sync: bool = False,
                 cgroup: Path | None = None) -> subprocess.Popen:
    """dd writing zeros to ``device`` with O_DIRECT (or O_SYNC), as its own process, optionally in ``cgroup``."""
    command = ["dd", "if=/dev/zero", f"of={device}", f"bs={bs}", f"count={count}", f"seek={seek}",
               "oflag=sync" if sync else "oflag=direct"]
    if cgroup is not None:  # the shell joins the cgroup and becomes dd: same pid, comm "dd"
        command = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *command]
    writer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _writers.append(writer)
    return writer


def end_writers() -> None:
    """Kill and reap every writer still running (a test that failed half-way leaves some)."""
    while _writers:
        writer = _writers.pop()
        if writer.poll() is None:
            writer.kill()
        writer.communicate(timeout=scaled(30.0))


def finished(process: subprocess.Popen, timeout: float = scaled(30.0)) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def wait_writes_in_flight(device: str, writes: int, timeout: float = scaled(10.0)) -> None:
    """Until the block layer counts ``writes`` write requests in flight on ``device``."""
    inflight = Path("/sys/block") / Path(device).name / "inflight"
    deadline = time.monotonic() + timeout
    while int(inflight.read_text().split()[1]) < writes:
        if time.monotonic() > deadline:
            raise AssertionError(f"{device}: {writes} writes never in flight ({inflight.read_text().strip()})")
        time.sleep(0.02)


def on_device(type_: str, device: str):
    name = Path(device).name
    return lambda occ: occ["type"] == type_ and occ["data"].get("device") == name


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
    table = bpf[b"storage_counts"]
    return sum(table.getvalue(table.Key(0))), sum(table.getvalue(table.Key(1)))


def device_state(bpf, device: str):
    """The kernel's entry for ``device`` in map ``devices`` (keyed by request queue; it records the dev_t)."""
    dev = kernel_dev(*numbers(device))
    return next((state for state in bpf[b"devices"].values() if state.dev == dev), None)


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
    from bcc import BPF

    from tapio_core.bpf import kernel_fit, program_text, read_counter, shared_include_dir
    from tapio_core.ringbuf import RingBufferReader, ringbuf_map_info

    spec = tapio_observer_storage.OBSERVER
    fit = kernel_fit(spec, Btf.load())
    # 5.10, 6.1, 6.12 and 6.18 each have one of every pair of layouts: nothing missing, no feature off.
    assert (fit.missing, fit.disabled) == ((), {})
    flags = list(fit.cflags)
    bpf = BPF(text=program_text(spec.bpf_source, None).encode(),
              cflags=[f"-I{shared_include_dir()}", *flags, "-DSTORAGE_MAX_INFLIGHT=4"])
    try:
        with stacked_loops(tmp_path) as (ext4, upper):
            name = Path(upper).name
            settings = StorageSettings(warning_ms=60_000.0, critical_ms=120_000.0,
                                       devices=(DeviceRule(name, warning_ms=300.0, critical_ms=300.0),))
            observer = RunningObserver(spec=spec, config=settings, bpf=bpf)
            tapio_observer_storage.tapio_observer_started(observer=observer)
            reader = RingBufferReader(*ringbuf_map_info(bpf[b"events"]), STORAGE_RECORD.itemsize)
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
        bpf.cleanup()
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
