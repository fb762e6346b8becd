"""Which exits the container observer reports, judged in the kernel: the default policy, on the real kernel.

Each scenario runs its processes in a fresh cgroup of its own, so the counts it checks are exact: what
the kernel reported for that cgroup, held back for it, or counted as its short-lived helpers' exits.
"""

from __future__ import annotations

import math
import subprocess
import time

import pytest
from container_scenarios import (
    ScratchCgroup,
    child_env,
    container_agent,
    in_cgroups,
    memory_cgroup,
    occurrences_until,
    remove_cgroup,
)
from kernel_helpers import scaled

pytestmark = pytest.mark.kernel

EXIT = "kernel.container.abnormal_exit"
#: How long after the last exit a wrongly reported one would have had to arrive.
SETTLE_S = 1.0


def run_in(cgroup: ScratchCgroup, script: str) -> int:
    return subprocess.run(in_cgroups([cgroup], ["sh", "-c", script]), env=child_env(),
                          timeout=scaled(60)).returncode


def exits_of(agent, cgroup: ScratchCgroup) -> list:
    """Every abnormal_exit of ``cgroup`` so far, once a repeat would have had time to arrive."""
    deadline = time.monotonic() + scaled(SETTLE_S)
    while time.monotonic() < deadline:
        agent.drain("container")
        time.sleep(0.05)
    received = agent.plugins.pm.get_plugin("collect").received
    return [o for o in received if o.type == EXIT and o.data["cgroup_id"] == cgroup.cgroup_id]


def test_short_lived_non_zero_exits_are_counted_and_carried_on_the_cgroups_next_occurrence():
    """50 helpers exiting 1 and a SIGTERM death: nothing; then a SIGSEGV death carries the 50."""
    with container_agent({}) as agent, memory_cgroup(256 << 20) as cgroup:
        assert run_in(cgroup, "for i in $(seq 50); do grep -q tapio-no-such-line /etc/hostname; done; "
                              "sh -c 'kill -TERM $$'; exit 0") == 0
        assert exits_of(agent, cgroup) == []
        run_in(cgroup, "kill -SEGV $$")
        [occ] = occurrences_until(agent, lambda o: o.type == EXIT and o.data["cgroup_id"] == cgroup.cgroup_id)
        assert (occ.data["signal"], occ.data["quiet_exits"], occ.data["main_process"]) == (11, 50, False)
        assert occ.severity == "error"


def test_a_non_zero_exit_is_reported_once_the_process_ran_min_runtime():
    with container_agent({"container": {"min_runtime_s": 1.0}}) as agent, memory_cgroup(256 << 20) as cgroup:
        run_in(cgroup, "sleep 0.1; exit 4")  # short-lived: counted
        run_in(cgroup, "sleep 1.5; exit 5")
        [occ] = occurrences_until(agent, lambda o: o.type == EXIT and o.data["cgroup_id"] == cgroup.cgroup_id)
        assert exits_of(agent, cgroup) == [occ]
    assert (occ.data["exit_code"], occ.data["quiet_exits"]) == (5, 1)
    assert 1500 <= occ.data["runtime_ms"] < 1500 + scaled(5) * 1000


def test_deaths_in_one_cgroup_are_rate_limited_with_an_exact_count_of_what_was_held_back():
    """30 SIGABRT deaths at once: the burst of 10 (and what the rate earns meanwhile); the next one a second later
    carries what was held back since the last."""
    with container_agent({}) as agent, memory_cgroup(256 << 20) as cgroup:
        started = time.monotonic()
        run_in(cgroup, "for i in $(seq 30); do sh -c 'kill -ABRT $$'; done; exit 0")
        burst_s = time.monotonic() - started
        reported = exits_of(agent, cgroup)
        time.sleep(1.1)
        run_in(cgroup, "kill -ABRT $$")
        occurrences_until(agent, lambda o: o.type == EXIT and o.data["cgroup_id"] == cgroup.cgroup_id
                          and o not in reported)
        after = exits_of(agent, cgroup)
    earned = math.ceil(burst_s)  # the rate (1 a second) earned at most this many more during the burst
    assert 10 <= len(reported) <= 10 + earned
    # Every death is in exactly one place: its own occurrence, or a later one's suppressed count.
    assert len(after) + sum(o.data.get("suppressed", 0) for o in after) == 30 + 1
    assert all(o.data["signal"] == 6 for o in after)


def test_a_crash_loop_is_one_occurrence_per_window_carrying_the_restarts_it_folded():
    """A pod's container restarted (a new cgroup each time) whose main process exits 1: the first exit is
    reported, the next three folded; past the window, the next carries them."""
    window = scaled(2.0)  # longer than the four restarts take here (a few seconds in an emulated guest)
    with (
        container_agent({"container": {"crash_loop_window_s": window}}) as agent,
        memory_cgroup(256 << 20) as pod,
    ):
        restarts = []

        def restart() -> ScratchCgroup:
            cgroup = ScratchCgroup(pod.path / f"c{len(restarts)}", pod.mount, pod.version)
            cgroup.path.mkdir()
            restarts.append(cgroup)
            status = subprocess.run(in_cgroups([cgroup], ["unshare", "--pid", "--fork", "sh", "-c", "exit 1"]),
                                    env=child_env(), timeout=scaled(30)).returncode
            assert status == 1
            return cgroup

        try:
            started = time.monotonic()
            first = restart()
            for _ in range(3):
                restart()
            assert time.monotonic() - started < window, "the restarts outlasted the window: slow machine"
            [reported] = occurrences_until(agent, lambda o: o.type == EXIT and o.data["main_process"]
                                           and o.data["cgroup_id"] == first.cgroup_id)
            folded = [o for r in restarts[1:] for o in exits_of(agent, r)]
            assert folded == []
            time.sleep(window)
            last = restart()
            [carrying] = occurrences_until(agent, lambda o: o.type == EXIT and o.data["cgroup_id"] == last.cgroup_id)
        finally:
            for cgroup in reversed(restarts):
                remove_cgroup(cgroup)
    assert (reported.data["exit_code"], reported.data["comm"], reported.data["crash_loop_exits"]) == (1, "sh", 0)
    assert (carrying.data["main_process"], carrying.data["crash_loop_exits"]) == (True, 3)
