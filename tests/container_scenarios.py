"""Making processes die and the OOM killer strike on purpose, for the container observer's kernel tests.

- :func:`scratch_cgroup` / :func:`memory_cgroup`: a fresh cgroup (v1 memory controller or cgroup2,
  whichever this node limits memory with, :func:`memory_layouts`) whose processes are killed and
  which is removed on the way out.
- :func:`oom_kill_holder` / :func:`oom_kill`: in a 128 MiB cgroup, a holder that makes itself the OOM
  killer's first choice is killed when an allocator asks for more; a decoy stands between the
  allocator and a second kill while the holder's memory is still being freed.
- :func:`reap` waits for a child ourselves, so the raw wait status the kernel gave is what the test sees.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import attrs
from kernel_helpers import scaled
from plugin_helpers import Collect

from tapio_core.agent import Agent
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions

MIB = 1 << 20


def child_env() -> dict[str, str]:
    """No faulthandler: a Python child must die of its signal, not print a traceback and abort."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TAPIO_", "PYTHONFAULTHANDLER"))}


def reap(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """The raw wait status once ``proc`` ended (within ``timeout``, scaled)."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)  # Popen must not wait again
            return status
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{proc.args} did not end within {timeout} s")
        time.sleep(0.01)


def python(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


def process_name(path: str) -> str:
    """The comm the kernel gives a program started from ``path``: its base name, 15 bytes at most."""
    return Path(path).name[:15]


@attrs.frozen
class ScratchCgroup:
    path: Path
    mount: Path
    version: int

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    @property
    def cgroup_id(self) -> int:
        return self.path.stat().st_ino  # the kernfs node id is the directory's inode

    @property
    def cgroup_path(self) -> str:
        return "/" + str(self.path.relative_to(self.mount))


def cgroup_mounts() -> tuple[Path | None, Path | None]:
    """(v1 memory controller mount, cgroup2 mount) from /proc/self/mounts."""
    memory_v1 = unified = None
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, fstype, options = line.split()[:4]
        if fstype == "cgroup" and "memory" in options.split(","):
            memory_v1 = Path(where)
        elif fstype == "cgroup2" and unified is None:
            unified = Path(where)
    return memory_v1, unified


@contextmanager
def scratch_cgroup(mount: Path, version: int, memory_limit: int | None = None) -> Iterator[ScratchCgroup]:
    """A fresh cgroup under ``mount``; its processes are killed and it is removed on the way out."""
    cgroup = ScratchCgroup(mount / f"tapio-test-{secrets.token_hex(4)}", mount, version)
    cgroup.path.mkdir()
    try:
        if memory_limit is not None:
            limit_file = "memory.limit_in_bytes" if version == 1 else "memory.max"
            (cgroup.path / limit_file).write_text(str(memory_limit))
        yield cgroup
    finally:
        remove_cgroup(cgroup)


def remove_cgroup(cgroup: ScratchCgroup, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while True:
        for pid in cgroup.procs.read_text().split():
            with suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        try:
            cgroup.path.rmdir()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # killed tasks leave the cgroup once reaped


def memory_layouts() -> list[int]:
    """The cgroup versions this node limits memory with: 1 where the memory controller is on a v1 hierarchy
    (this machine's hybrid layout), 2 where the cgroup2 mount offers it (a pure v2 node, as in the guests;
    Debian's 6.12 has no v1 memory controller at all). The controller lives on one of them at a time."""
    memory_v1, unified = cgroup_mounts()
    layouts = [1] if memory_v1 is not None else []
    if unified is not None and "memory" in (unified / "cgroup.controllers").read_text().split():
        layouts.append(2)
    return layouts


@contextmanager
def memory_cgroup(limit: int, version: int | None = None) -> Iterator[ScratchCgroup]:
    """A memory cgroup with ``limit`` on cgroup ``version`` (default: the first this node has)."""
    layouts = memory_layouts()
    assert layouts, "neither a v1 memory controller nor a cgroup2 mount with the memory controller"
    version = version or layouts[0]
    assert version in layouts, f"this node limits memory only with cgroup v{layouts}"
    memory_v1, unified = cgroup_mounts()
    with scratch_cgroup(memory_v1 if version == 1 else unified, version, limit) as cgroup:
        yield cgroup


def own_container_cgroup_id(version: int) -> int:
    """The cgroup the observer names for this test's children: the memory cgroup on v1, else the unified one."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, relative = line.split(":", 2)
        if (version == 1 and "memory" in controllers.split(",")) or (version == 2 and controllers == ""):
            mount = cgroup_mounts()[0 if version == 1 else 1]
            return (mount / relative.lstrip("/")).stat().st_ino
    raise AssertionError(f"no cgroup v{version} line for memory in /proc/self/cgroup")


def in_cgroups(cgroups: list[ScratchCgroup], argv: list[str]) -> list[str]:
    """``argv`` run by a shell that first moves itself into each cgroup (exec keeps the pid)."""
    moves = "".join(f'echo $$ > "{cgroup.procs}" || exit 99; ' for cgroup in cgroups)
    return ["sh", "-c", moves + 'exec "$@"', "sh", *argv]


#: Holds argv[1] MiB, makes itself the OOM killer's first choice, prints "ready", waits.
HOLDER = r"""
import sys, time
held = b"h" * (int(sys.argv[1]) << 20)
with open("/proc/self/oom_score_adj", "w") as f:
    f.write("1000")
print("ready", flush=True)
time.sleep(60)
"""
#: Allocates argv[1] MiB in 4 MiB steps, touching every page.
ALLOCATOR = r"""
import sys
chunks = [b"a" * (4 << 20) for _ in range(int(sys.argv[1]) // 4)]
print("allocated", len(chunks) * 4, flush=True)
"""


#: oom_kill_holder's sizes in MiB, in a 128 MiB cgroup: held + allocated + two interpreters is over the limit;
#: allocated + one interpreter is far under it, even with the interpreter's files in a cold page cache (~15 MiB)
#: charged to the cgroup.
HELD_MIB, ALLOCATED_MIB = 80, 40
#: A small process the OOM killer prefers to the allocator (oom_score_adj 800 outweighs the allocator's 48 MiB
#: in a 128 MiB cgroup; the holder's 1000 and 80 MiB outweigh it). The kernel can OOM again while the killed
#: holder's memory is still being freed (6.1 marks a victim's memory gone, MMF_OOM_SKIP, before its batched
#: pages are uncharged; an emulated guest widens that): the decoy is then chosen, not the allocator. Once in
#: a while (a 6.1 guest) the window outlasts the decoy too and the allocator is killed third: that kill is
#: the kernel's, after the one the tests look at, so the scenario accepts it. (Making the allocator immune,
#: oom_score_adj -1000, needs CAP_SYS_RESOURCE, which a container may lack.)
DECOY = ["sh", "-c", "echo 800 > /proc/self/oom_score_adj && echo ready && exec sleep 600"]


def kernel_log_tail(lines: int = 40) -> str:
    """The kernel's last log lines (its OOM reports), for a failure message."""
    done = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=scaled(10))
    return "\n".join(done.stdout.splitlines()[-lines:])


def oom_kill_holder(cgroup: ScratchCgroup) -> tuple[int, int]:
    """In ``cgroup`` (128 MiB), a holder of HELD_MIB is OOM-killed when an allocator asks for ALLOCATED_MIB
    more; returns (holder pid, allocator pid) once both ended (the allocator done, or killed after the
    holder, see DECOY)."""
    decoy = subprocess.Popen(in_cgroups([cgroup], DECOY), env=child_env(), stdout=subprocess.PIPE, text=True)
    holder = subprocess.Popen(in_cgroups([cgroup], python(HOLDER, str(HELD_MIB))), env=child_env(),
                              stdout=subprocess.PIPE, text=True)
    allocator = None
    try:
        assert (decoy.stdout.readline().strip(), holder.stdout.readline().strip()) == ("ready", "ready")
        allocator = subprocess.Popen(in_cgroups([cgroup], python(ALLOCATOR, str(ALLOCATED_MIB))), env=child_env(),
                                     stdout=subprocess.PIPE, text=True)
        allocator_status = reap(allocator)
        holder_status = reap(holder)
    finally:
        for proc in (holder, allocator, decoy):  # the decoy may have been OOM-killed: poll() reaps it then
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(scaled(20))
    killed = lambda status: os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    ended = (killed(holder_status),
             killed(allocator_status) or (os.WIFEXITED(allocator_status) and os.WEXITSTATUS(allocator_status) == 0))
    assert ended == (True, True), (f"holder {holder.pid} wait status {holder_status}, allocator {allocator.pid} "
                                   f"{allocator_status}; the kernel said:\n{kernel_log_tail()}")
    return holder.pid, allocator.pid


@attrs.frozen
class OomKill:
    """An OOM kill the test made: the holder killed in ``cgroup`` (``limit``) by the allocator's allocation."""

    cgroup: ScratchCgroup
    cgroup_id: int
    limit: int
    holder_pid: int
    allocator_pid: int

    def assert_reported_by(self, data: dict, with_memory: bool = True, trigger_may_be_unknown: bool = False) -> None:
        """``data`` of its oom_kill names the victim, its trigger, its container and its memory; usage and RSS
        only ``with_memory`` (else null: they were not readable as they were at the kill)."""
        python_name = process_name(sys.executable)
        assert (data["pid"], data["tid"], data["comm"]) == (self.holder_pid, self.holder_pid, python_name)
        trigger = (data["trigger_pid"], data["trigger_comm"])
        assert trigger == (self.allocator_pid, python_name) or (trigger_may_be_unknown and trigger == (None, None))
        assert (data["cgroup_id"], data["cgroup_path"], data["cgroup_version"]) == (
            self.cgroup_id, self.cgroup.cgroup_path, self.cgroup.version)
        assert (data["memory_limit_bytes"], data["oom_score_adj"]) == (self.limit, 1000)
        if with_memory:
            assert self.limit - 4 * MIB <= data["memory_usage_bytes"] <= self.limit
            assert data["anon_rss_bytes"] >= HELD_MIB * MIB
            assert data["rss_bytes"] == data["anon_rss_bytes"] + data["file_rss_bytes"] + data["shmem_rss_bytes"]
        else:
            assert [data[key] for key in ("memory_usage_bytes", "rss_bytes", "anon_rss_bytes")] == [None] * 3


@contextmanager
def oom_kill(version: int | None) -> Iterator[OomKill]:
    """oom_kill_holder in a fresh 128 MiB cgroup of ``version``, which is removed after the block."""
    assert version is not None, "this node has no memory controller to OOM-kill with"
    limit = 128 * MIB
    with memory_cgroup(limit, version) as cgroup:
        holder_pid, allocator_pid = oom_kill_holder(cgroup)
        yield OomKill(cgroup, cgroup.cgroup_id, limit, holder_pid, allocator_pid)


# -- the container observer in this process -----------------------------------------------------------


@contextmanager
def container_agent(settings: dict, plugin=None) -> Iterator[Agent]:
    """The container observer (``plugin``, or the installed one) in this process with a collecting sink."""
    allow = set() if plugin is not None else {"container"}
    extra = [("collect", Collect())] + ([("container", plugin)] if plugin is not None else [])
    loaded = load_plugins(allow, extra=extra)
    pipeline = Pipeline.build(loaded, ["collect"], SinkOptions(data_dir=Path(".")), settings, KernelClock())
    agent = Agent(loaded, pipeline, recorder=None)
    agent.load(ebpf_dir=None)
    try:
        assert pipeline.observers["container"].status == "running", pipeline.observers["container"].status_reason
        yield agent
    finally:
        agent.shutdown()


def occurrences_until(agent: Agent, predicate, timeout: float = 5.0) -> list:
    """Drain the ring through the pipeline until the collecting sink got an occurrence matching ``predicate``."""
    sink = agent.plugins.pm.get_plugin("collect")
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        agent.drain("container")
        found = [occ for occ in sink.received if predicate(occ)]
        if found:
            return found
        time.sleep(0.01)
    raise AssertionError(f"no matching occurrence within {timeout} s")
