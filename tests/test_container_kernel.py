"""The container observer on the real kernel.

End to end through the real ``tapio-agent`` (a subprocess): processes the test
starts exit with a code, kill themselves with a signal, exit from a worker
thread, or are OOM-killed inside a memory cgroup the test creates with a known
limit; the agent must print exactly one occurrence per process with the facts
``wait()`` and the cgroup file system give the test. In process: what the
kernel side keeps out of the ring buffer (successful and ignored exits), and a
kernel member missing from BTF costing only its feature, the older kernels' way of
finding a process's last thread; and a recording replayed to the same occurrences.

Every other process on the node may exit abnormally while a test runs, so
every check is taken over the occurrences of the test's own pids. "Nothing was
sent" is proved with a marker: a later exit the kernel must report, once its
occurrence arrived everything before it has too (one ring buffer, FIFO).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import attrs
import numpy as np
import pytest
from container_scenarios import (
    ALLOCATOR,
    MIB,
    cgroup_mounts,
    child_env,
    container_agent,
    in_cgroups,
    memory_cgroup,
    memory_layouts,
    occurrences_until,
    oom_kill,
    own_container_cgroup_id,
    process_name,
    python,
    reap,
    scratch_cgroup,
)
from kernel_helpers import TAPIO, running_agent, scaled, tool_env

import tapio_observer_container
from tapio_core import hookimpl
from tapio_core.agent import Agent
from tapio_core.bpf import tracepoint_cflags, tracepoint_has_field
from tapio_observer_container.records import CONTAINER_RECORD, KIND_ABNORMAL_EXIT

pytestmark = pytest.mark.kernel

EXIT = "kernel.container.abnormal_exit"
OOM = "kernel.container.oom_kill"
#: Settings of the shared agent: values no other process on the node is likely to use.
IGNORED_CODE = 77
IGNORED_SIGNAL = signal.SIGUSR1
IGNORED_NAME = f"tapioign{secrets.token_hex(3)}"
MARKER_CODE = 78
#: The facts of each exit are what this module checks, so the agent reports every short-lived non-zero exit and
#: the signals the scenarios use, unlimited; which exits the default policy reports, test_exit_policy_kernel.py.
SHARED_SETTINGS = [
    "--set", f"container.ignore_exit_codes=[{IGNORED_CODE}]",
    "--set", f'container.ignore_signals=["{IGNORED_SIGNAL.name}"]',
    "--set", f'container.ignore_process_names=["{IGNORED_NAME}"]',
    "--set", 'container.report_signals=["SIGSEGV", "SIGKILL", "SIGABRT", "SIGUSR1", "SIGUSR2"]',
    "--set", "container.min_runtime_s=0",
    "--set", "container.record_rate_per_s=1000000", "--set", "container.record_burst=1000000",
]
AGENT_PLUGINS = "container,stdout"
#: SHARED_SETTINGS' policy as a settings table, for the agents run in this process.
EVERY_EXIT = {"min_runtime_s": 0, "record_rate_per_s": 1_000_000, "record_burst": 1_000_000,
              "report_signals": ["SIGSEGV", "SIGKILL", "SIGABRT", "SIGUSR1", "SIGUSR2"]}


# -- processes -------------------------------------------------------------------------------------


def run_to_end(argv: list[str], cwd: Path | None = None, timeout: float = 20.0) -> tuple[int, int]:
    """Run a process and reap it ourselves: (pid, raw wait status, as the kernel's exit_status)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=child_env(), stdin=subprocess.DEVNULL)
    return proc.pid, reap(proc, timeout)


def of_pid(type_: str, pid: int):
    return lambda occ: occ["type"] == type_ and occ["data"].get("pid") == pid


def marker_exit(agent) -> None:
    """Exit with MARKER_CODE and wait for its occurrence: everything the kernel sent before it has arrived."""
    pid, _ = run_to_end(["sh", "-c", f"exit {MARKER_CODE}"])
    agent.wait_for(of_pid(EXIT, pid))


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    """One agent for the exit scenarios: only the test's own pids are looked at."""
    with running_agent(tmp_path_factory.mktemp("agent"), plugins=AGENT_PLUGINS, extra=SHARED_SETTINGS) as running:
        yield running


# -- abnormal exits --------------------------------------------------------------------------------


def test_exit_code_3_is_one_warning(agent):
    pid, status = run_to_end(["sh", "-c", "exit 3"])
    assert os.WEXITSTATUS(status) == 3
    [occ] = agent.wait_for(of_pid(EXIT, pid))
    marker_exit(agent)
    assert agent.matching(of_pid(EXIT, pid)) == [occ]
    assert (occ["severity"], occ["outcome"], occ["error"]["code"]) == ("warning", "failure", "NONZERO_EXIT")
    data = occ["data"]
    assert (data["tid"], data["comm"]) == (pid, "sh")
    assert (data["exit_code"], data["signal"], data["core_dumped"], data["exit_status"]) == (3, None, False, status)
    assert data["cgroup_id"] == own_container_cgroup_id(data["cgroup_version"])


KILL_SELF = "import os, resource, signal, sys\n" \
            "limit = int(sys.argv[2]); resource.setrlimit(resource.RLIMIT_CORE, (limit, limit))\n" \
            "os.kill(os.getpid(), getattr(signal, sys.argv[1]))"


@pytest.mark.parametrize("name", ["SIGSEGV", "SIGKILL"])
def test_process_killing_itself_is_one_error_naming_the_signal(agent, name):
    pid, status = run_to_end(python(KILL_SELF, name, "0"))
    number = getattr(signal, name)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == number
    [occ] = agent.wait_for(of_pid(EXIT, pid))
    marker_exit(agent)
    assert len(agent.matching(of_pid(EXIT, pid))) == 1
    assert (occ["severity"], occ["error"]["code"]) == ("error", name)
    data = occ["data"]
    assert (data["signal"], data["exit_code"], data["core_dumped"]) == (number, None, False)
    assert data["exit_status"] == status
    assert data["comm"] == process_name(sys.executable)


def test_core_dump_sets_core_dumped(agent, tmp_path):
    pid, status = run_to_end(python(KILL_SELF, "SIGSEGV", str(resource_unlimited())), cwd=tmp_path)
    for core in tmp_path.glob("core*"):  # core_pattern "core" here: written to the cwd
        core.unlink()
    core_pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    assert os.WCOREDUMP(status), f"the kernel dumped no core (core_pattern {core_pattern!r})"
    [occ] = agent.wait_for(of_pid(EXIT, pid))
    assert occ["data"]["core_dumped"] is True
    assert occ["data"]["exit_status"] == status == signal.SIGSEGV | 0x80
    assert occ["error"]["message"] == "killed by SIGSEGV (core dumped)"


def resource_unlimited() -> int:
    import resource

    return resource.RLIM_INFINITY


#: argv: leader name, mode. Nine threads; prints "ready" once all run, then waits for the test:
#: mode "exit" -> a worker calls exit_group(6) on "go"; mode "wait" -> the test kills it.
THREADED = r"""
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NAME = 15
libc.prctl(PR_SET_NAME, sys.argv[1].encode(), 0, 0, 0)
mode, workers = sys.argv[2], 8
started = threading.Barrier(workers + 1)

def worker(index):
    libc.prctl(PR_SET_NAME, f"worker-{index}".encode(), 0, 0, 0)
    started.wait()
    if index == workers - 1 and mode == "exit":
        sys.stdin.readline()
        os._exit(6)
    time.sleep(60)

for index in range(workers):
    threading.Thread(target=worker, args=(index,), daemon=True).start()
started.wait()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["exit", "wait"])
def test_multi_threaded_process_is_one_occurrence_named_after_its_leader(agent, mode):
    leader = f"tapiomt{secrets.token_hex(3)}"
    proc = subprocess.Popen(python(THREADED, leader, mode), env=child_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert len(os.listdir(f"/proc/{proc.pid}/task")) == 9
        if mode == "exit":
            proc.stdin.write("go\n")
            proc.stdin.flush()
        else:
            proc.kill()
        status = reap(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            reap(proc)
    expected = (6, None) if mode == "exit" else (None, signal.SIGKILL)
    [occ] = agent.wait_for(of_pid(EXIT, proc.pid))
    marker_exit(agent)
    assert len(agent.matching(of_pid(EXIT, proc.pid))) == 1
    data = occ["data"]
    assert (data["exit_code"], data["signal"]) == expected
    assert data["exit_status"] == status
    assert data["comm"] == leader  # whichever of the nine threads died last


#: argv: leader name. The leader ends its own thread with exit(5) (not exit_group), then three workers
#: end theirs with exit(6) one after another, each once the previous one is gone. The process ends
#: with its last thread, and must be judged there, once, with the status wait() reports (this kernel
#: gives the last thread's code; the leader's is what a judgement on an earlier thread would see).
LEADER_FIRST = r"""
import ctypes, os, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
SYS_exit, PR_SET_NAME, workers = 60, 15, 3
libc.prctl(PR_SET_NAME, sys.argv[1].encode(), 0, 0, 0)
tids, started = [None] * workers, threading.Barrier(workers + 1)

def worker(index):
    tids[index] = threading.get_native_id()
    started.wait()
    while os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/stat") and \
            open(f"/proc/{os.getpid()}/task/{os.getpid()}/stat").read().split(") ")[1][0] != "Z":
        time.sleep(0.005)  # the leader first
    if index:
        while os.path.exists(f"/proc/{os.getpid()}/task/{tids[index - 1]}"):
            time.sleep(0.005)
    libc.syscall(SYS_exit, 6)

for index in range(workers):
    threading.Thread(target=worker, args=(index,)).start()
started.wait()
print("ready", tids[-1], flush=True)
libc.syscall(SYS_exit, 5)  # ctypes let go of the GIL: the workers run on
"""


def run_leader_first() -> tuple[int, int, int, str]:
    """(pid, wait status, tid of the last thread, leader name) of a LEADER_FIRST run."""
    leader = f"tapiolf{secrets.token_hex(3)}"
    proc = subprocess.Popen(python(LEADER_FIRST, leader), env=child_env(), stdout=subprocess.PIPE, text=True)
    try:
        word, last_tid = proc.stdout.readline().split()
        assert word == "ready"
        status = reap(proc)
    finally:
        if proc.returncode is None:
            proc.kill()
            reap(proc)
    return proc.pid, status, int(last_tid), leader


def test_leader_exiting_first_is_judged_once_on_the_last_thread_as_wait_reports_it(agent):
    pid, status, last_tid, leader = run_leader_first()
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) in (5, 6)
    [occ] = agent.wait_for(of_pid(EXIT, pid))
    marker_exit(agent)
    assert len(agent.matching(of_pid(EXIT, pid))) == 1
    data = occ["data"]
    assert (data["exit_status"], data["tid"], data["comm"]) == (status, last_tid, leader)


def test_ignore_lists_keep_exits_out_and_others_in(agent, tmp_path):
    renamed = tmp_path / IGNORED_NAME
    renamed.symlink_to("/bin/sh")  # the kernel names a process after the file it executes
    ignored = [
        run_to_end(["sh", "-c", f"exit {IGNORED_CODE}"])[0],
        run_to_end(["sh", "-c", f"kill -{IGNORED_SIGNAL.name[3:]} $$"])[0],
        run_to_end([str(renamed), "-c", "exit 5"])[0],
        run_to_end([str(renamed), "-c", "kill -SEGV $$"])[0],
    ]
    reported, status = run_to_end(["sh", "-c", f"kill -{signal.SIGUSR2.name[3:]} $$"])
    assert os.WTERMSIG(status) == signal.SIGUSR2
    agent.wait_for(of_pid(EXIT, reported))
    marker_exit(agent)
    assert [occ for occ in agent.occurrences if occ["data"].get("pid") in ignored] == []


def test_replay_of_a_recording_gives_the_same_occurrences_and_ids(tmp_path):
    import json

    recording = tmp_path / "container.rec"
    with running_agent(tmp_path, plugins=AGENT_PLUGINS, record=recording, extra=SHARED_SETTINGS) as recorder:
        pids = [run_to_end(["sh", "-c", "exit 3"])[0], run_to_end(python(KILL_SELF, "SIGSEGV", "0"))[0]]
        for pid in pids:
            recorder.wait_for(of_pid(EXIT, pid))
        assert recorder.stop() == 0
    replay = subprocess.run(
        [str(TAPIO), "replay", str(recording), "--sink", "stdout", "--plugins", AGENT_PLUGINS,
         "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=scaled(60), env=tool_env(), cwd=tmp_path,
    )
    assert replay.returncode == 0, replay.stderr
    replayed = [json.loads(line) for line in replay.stdout.splitlines() if line.strip()]
    assert replayed == recorder.occurrences
    assert sorted(occ["data"]["pid"] for occ in replayed if occ["data"]["pid"] in pids) == sorted(pids)


# -- OOM kills -------------------------------------------------------------------------------------

#: Runs an OOM test once per memory layout this node has (None: it has none, and the test says so).
each_memory_layout = pytest.mark.parametrize("version", memory_layouts() or [None],
                                             ids=lambda version: f"cgroup-v{version}")


@each_memory_layout
def test_oom_kill_reports_the_victim_not_the_trigger_with_its_cgroup_and_limit(agent, version):
    with oom_kill(version) as kill:
        [occ] = agent.wait_for(of_pid(OOM, kill.holder_pid))
        marker_exit(agent)
    assert len(agent.matching(of_pid(OOM, kill.holder_pid))) == 1
    assert agent.matching(of_pid(EXIT, kill.holder_pid)) == []  # its SIGKILL is the OOM kill, not a second report
    assert (occ["severity"], occ["outcome"], occ["error"]["code"]) == ("critical", "failure", "OOM_KILLED")
    kill.assert_reported_by(occ["data"])


def features_this_tracepoint_format_lacks() -> set[str]:
    """The container's features off on every build here: sched_process_exit has group_dead only from 6.16."""
    [group_dead] = tapio_observer_container.OBSERVER.tracepoint_fields
    return set() if tracepoint_has_field(group_dead.tracepoint, group_dead.field) else {group_dead.feature}


def built_as_if(no_task_from: set[str], **spec_changes: object) -> ContainerVariant:
    """The container plugin built as it would be where raw tracepoints ``no_task_from`` hand over no task
    (mark_victim before about 6.8 hands a pid): the same on every kernel, this one included."""
    spec = tapio_observer_container.OBSERVER
    args = tuple(attrs.evolve(arg, c_type="no task") if arg.tracepoint in no_task_from else arg
                 for arg in spec.raw_tracepoint_args)
    return ContainerVariant(raw_tracepoint_args=args, **spec_changes)


def the_one_occurrence_in_process(agent: Agent, pid: int):
    """The one occurrence ``agent`` reported for process ``pid``, once a later exit proved everything before it
    arrived: an OOM victim's SIGKILL exit is no second occurrence beside its oom_kill."""
    [occ] = occurrences_until(agent, lambda o: o.data.get("pid") == pid)
    marker, _ = run_to_end(["sh", "-c", f"exit {MARKER_CODE}"])
    occurrences_until(agent, lambda o: o.type == EXIT and o.data["pid"] == marker)
    received = agent.plugins.pm.get_plugin("collect").received
    assert [o for o in received if o.data.get("pid") == pid] == [occ]
    return occ


@each_memory_layout
def test_a_kernel_that_names_the_oom_victim_by_pid_still_reports_it_in_full_once(version):
    """Kernels before about 6.8 hand mark_victim a pid (their BTF prototype says so; 5.10 here). Built as
    there, the observer takes the victim's task from the SIGKILL the OOM killer sent it just before, from
    the same task: the report is as complete as on newer kernels, and no feature is lost."""
    with agent_in_process({}, built_as_if({"mark_victim"})) as agent:
        assert set(agent.pipeline.observers["container"].disabled) == features_this_tracepoint_format_lacks()
        with oom_kill(version) as kill:
            occ = the_one_occurrence_in_process(agent, kill.holder_pid)
    assert occ.type == OOM
    kill.assert_reported_by(occ.data)


def exit_sees_the_victims_memory() -> bool:
    """Whether sched_process_exit runs before exit_mm() frees the exiting task's memory: from Linux 6.16, whose
    "exit: move and extend sched_process_exit() tracepoint" also gave it group_dead; before, the memory is
    gone (and uncharged from its cgroup)."""
    return tracepoint_has_field("sched:sched_process_exit", "group_dead")


@each_memory_layout
def test_a_victim_marked_without_a_readable_task_is_reported_from_its_own_exit_once(version):
    """Where the mark gives no task (the kernel also marks a process that is already dying, without sending
    it a signal; built here so that neither mark_victim nor the SIGKILL hands one over): the kernel marked the
    victim (signal_struct.oom_mm), so its exit reports it, once, from its own context -- name, cgroup, limit,
    score -- with the trigger its mark left. Usage and RSS only where the exit still sees its memory;
    elsewhere null, never the after-free value.

    Before 6.16 the victim cannot get past exit_mm(), and so to the exit tracepoint, before the OOM killer
    has marked it (it holds the victim's task lock until then): exact. From 6.16 the tracepoint comes before
    exit_mm() and can outrun the mark, which only the SIGKILL this build cannot read would tell: a rare exit
    that comes before the kernel set oom_mm is then one abnormal SIGKILL exit, one after it an oom_kill whose
    trigger is unknown -- never two occurrences, never a wrong fact."""
    blind = built_as_if({"mark_victim", "signal_generate"}, required_features=())
    with agent_in_process({}, blind) as agent:
        assert set(agent.pipeline.observers["container"].disabled) == features_this_tracepoint_format_lacks() | {
            "the OOM victim's task from mark_victim", "the OOM victim's task from the OOM killer's SIGKILL"}
        with oom_kill(version) as kill:
            occ = the_one_occurrence_in_process(agent, kill.holder_pid)
    exit_can_come_first = exit_sees_the_victims_memory()
    if exit_can_come_first and occ.type == EXIT:
        assert (occ.data["signal"], occ.data["comm"]) == (signal.SIGKILL, process_name(sys.executable))
        return
    assert occ.type == OOM
    kill.assert_reported_by(occ.data, with_memory=exit_can_come_first, trigger_may_be_unknown=exit_can_come_first)


def test_cgroup_mode_v2_names_the_unified_cgroup_and_keeps_the_memory_limit(tmp_path):
    """Forced v2 on this v1-memory machine: the id and path are the unified cgroup's, the limit the memcg's."""
    limit = 64 * MIB
    with ExitStack() as stack:
        memory = stack.enter_context(memory_cgroup(limit))
        if memory.version == 2:
            unified = memory
        else:
            unified_mount = cgroup_mounts()[1]
            assert unified_mount is not None, "no cgroup2 mount next to the v1 memory controller"
            unified = stack.enter_context(scratch_cgroup(unified_mount, 2))
        agent = stack.enter_context(running_agent(tmp_path, plugins=AGENT_PLUGINS,
                                                  extra=["--set", "container.cgroup_mode=v2"]))
        victim, status = run_to_end(in_cgroups(list(dict.fromkeys([memory, unified])), python(ALLOCATOR, "512")))
        assert os.WTERMSIG(status) == signal.SIGKILL
        [occ] = agent.wait_for(of_pid(OOM, victim))
        data = occ["data"]
        assert (data["cgroup_id"], data["cgroup_path"], data["cgroup_version"]) == (
            unified.cgroup_id, unified.cgroup_path, 2)
        assert data["memory_limit_bytes"] == limit
        assert data["trigger_pid"] == victim


# -- in process: what never crosses the ring buffer -------------------------------------------------


class ContainerVariant:
    """The container plugin compiled differently: some BtfFields pointing at members no kernel has,
    or other cflags -- what an older or differently built kernel would give it."""

    def __init__(self, missing: set[str] = frozenset(), **spec_changes: object):
        spec = tapio_observer_container.OBSERVER
        fields = tuple(attrs.evolve(field, path="no_such_member") if field.macro in missing else field
                       for field in spec.btf_fields)
        self.spec = attrs.evolve(spec, btf_fields=fields, **spec_changes)

    @hookimpl
    def tapio_register_observers(self, register):
        register(self.spec)

    @hookimpl
    def tapio_observer_started(self, observer):
        tapio_observer_container.tapio_observer_started(observer)

    @hookimpl
    def tapio_detect_anomalies(self, observer, events):
        return tapio_observer_container.tapio_detect_anomalies(observer, events)


def agent_in_process(settings: dict, plugin=None):
    """The container observer in this process, reporting every exit as the shared agent does (SHARED_SETTINGS)."""
    return container_agent({**settings, "container": {**EVERY_EXIT, **settings.get("container", {})}}, plugin)


def raw_records_until(agent: Agent, pid: int, timeout: float = 5.0) -> np.ndarray:
    """Every record in the ring up to and including the first from ``pid``."""
    reader = agent.readers["container"]
    timeout = scaled(timeout)
    batches, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        data = reader.read_batch()
        if data:
            batches.append(np.frombuffer(data, CONTAINER_RECORD))
            if (batches[-1]["task"]["pid"] == pid).any():
                return np.concatenate(batches)
        else:
            time.sleep(0.01)
    raise AssertionError(f"no record for pid {pid} within {timeout} s")


def test_successful_and_ignored_exits_never_reach_the_ring_buffer(tmp_path):
    renamed = tmp_path / IGNORED_NAME
    renamed.symlink_to("/bin/sh")
    settings = {"container": {"ignore_exit_codes": [IGNORED_CODE], "ignore_signals": ["USR1"],
                              "ignore_process_names": [IGNORED_NAME]}}
    with agent_in_process(settings) as agent:
        layout = agent.pipeline.observers["container"].bpf["container_layout"][0]
        assert layout.configured == 1 and layout.page_size == os.sysconf("SC_PAGE_SIZE")
        quiet = [
            run_to_end(["true"])[0],
            run_to_end(python("import threading; [threading.Thread(target=len, args=('',)).start() "
                              "for _ in range(4)]"))[0],
            run_to_end(["sh", "-c", f"exit {IGNORED_CODE}"])[0],
            run_to_end(["sh", "-c", "kill -USR1 $$"])[0],
            run_to_end([str(renamed), "-c", "exit 9"])[0],
        ]
        marker, _ = run_to_end(["sh", "-c", f"exit {MARKER_CODE}"])
        records = raw_records_until(agent, marker)
    assert set(records["task"]["pid"].tolist()) & set(quiet) == set()
    [mark] = records[records["task"]["pid"] == marker]
    assert (mark["kind"], mark["exit_status"]) == (KIND_ABNORMAL_EXIT, MARKER_CODE << 8)


def test_a_member_missing_from_btf_costs_only_its_feature():
    plugin = ContainerVariant(missing={"TAPIO_CGROUP_KN_OFFSET", "TAPIO_TASK_GROUP_LEADER_OFFSET"})
    with agent_in_process({}, plugin) as agent:
        reason = agent.pipeline.observers["container"].status_reason
        assert "cgroup id and path" in reason and "process name (the leader's comm)" in reason
        pid, _ = run_to_end(["sh", "-c", "exit 4"])
        [occ] = occurrences_until(agent, lambda o: o.type == EXIT and o.data["pid"] == pid)
    assert (occ.data["exit_code"], occ.data["comm"]) == (4, "sh")  # the thread's own comm: the same here
    assert (occ.data["cgroup_id"], occ.data["cgroup_path"]) == (None, None)


def start_threaded(mode: str) -> tuple[subprocess.Popen, str]:
    """THREADED running with all nine threads started; returns it and its leader's name."""
    leader = f"tapiomt{secrets.token_hex(3)}"
    proc = subprocess.Popen(python(THREADED, leader, mode), env=child_env(), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc, leader


def test_exits_of_tasks_flagged_as_kernel_threads_are_left_out():
    """No user command can make a kernel thread exit non-zero, so the filter is shown on the flag it reads:
    compiled to treat PF_EXITING (0x4, set on every exiting task) as the kernel-thread flag, it leaves out
    an `exit 3` that the real build reports."""
    with agent_in_process({}, ContainerVariant(cflags=("-DTAPIO_PF_KTHREAD=0x00000004",))) as agent:
        pid, status = run_to_end(["sh", "-c", "exit 3"])
        assert os.WEXITSTATUS(status) == 3
        marker, _ = run_to_end(["sh", "-c", "kill -9 $$"])  # also filtered: nothing reaches the ring
        time.sleep(scaled(0.5))
        agent.drain("container")
        received = agent.plugins.pm.get_plugin("collect").received
        assert [o for o in received if o.data.get("pid") in (pid, marker)] == []
    with agent_in_process({}) as agent:
        pid, _ = run_to_end(["sh", "-c", "exit 3"])
        [occ] = occurrences_until(agent, lambda o: o.data.get("pid") == pid)
        assert occ.data["exit_code"] == 3


def test_without_group_dead_threads_dying_together_still_make_one_record():
    """Kernels whose sched_process_exit lacks group_dead (before 6.16): the last thread is found through
    signal->live. Built so whatever this kernel has; the real build takes group_dead exactly where it is."""
    cflags, _ = tracepoint_cflags(tapio_observer_container.OBSERVER)
    assert ("-DTAPIO_EXIT_HAS_GROUP_DEAD=1" in cflags) == (not features_this_tracepoint_format_lacks())
    with agent_in_process({}, ContainerVariant(tracepoint_fields=())) as agent:
        pids = {}
        for _ in range(5):  # exit_group from a worker: nine threads die at once, racing for the last
            proc, _leader = start_threaded("exit")
            proc.stdin.write("go\n")
            proc.stdin.flush()
            pids[proc.pid] = reap(proc)
        single, single_status = run_to_end(["sh", "-c", "exit 3"])
        pids[single] = single_status
        leader_first, leader_first_status, last_tid, _leader = run_leader_first()
        pids[leader_first] = leader_first_status
        marker, _ = run_to_end(["sh", "-c", f"exit {MARKER_CODE}"])
        records = raw_records_until(agent, marker)
    for pid, status in pids.items():
        ours = records[records["task"]["pid"] == pid]
        assert len(ours) == 1, (pid, len(ours))
        assert ours[0]["exit_status"] == status
    [judged] = records[records["task"]["pid"] == leader_first]
    assert judged["task"]["tid"] == last_tid  # signal->live found the last thread, not the first to go


def test_without_map_fed_facts_exits_still_report_the_unified_cgroup():
    class NoBtfForMaps:
        """The container plugin, but its start hook sees no BTF (the agent compiled with the real one)."""

        @hookimpl
        def tapio_register_observers(self, register):
            register(tapio_observer_container.OBSERVER)

        @hookimpl
        def tapio_observer_started(self, observer):
            observer.btf = None
            tapio_observer_container.tapio_observer_started(observer)

        @hookimpl
        def tapio_detect_anomalies(self, observer, events):
            return tapio_observer_container.tapio_detect_anomalies(observer, events)

    with agent_in_process({}, plugin=NoBtfForMaps()) as agent:
        reason = agent.pipeline.observers["container"].status_reason
        assert "memory limit and usage" in reason and "cgroup paths" in reason and "RSS" in reason
        pid, _ = run_to_end(["sh", "-c", "exit 5"])
        [occ] = occurrences_until(agent, lambda o: o.type == EXIT and o.data["pid"] == pid)
    data = occ.data
    assert (data["exit_code"], data["cgroup_version"], data["cgroup_path"]) == (5, 2, None)
    assert data["cgroup_id"] == own_container_cgroup_id(2)
