"""How many occurrences a node makes: none when healthy, each one that matters when broken.

The network, container and storage observers at their default settings, in this process, while
tests/node_workloads.py makes the real kernel do a healthy busy node's day for HEALTHY_S seconds and then
a broken node's faults. Figures:

- ``grep_loop_occurrences``: a shell loop running ``grep -q`` 300 times without a match (before issue 15:
  300 ``abnormal_exit``);
- ``refused_burst_occurrences``: occurrences naming one closed port after 3,000 refused connects (before:
  499 ``connection_refused`` and 2 ``rst_storm``), and ``refused_burst_accounted``: the refused connects
  those occurrences account for (their own, their ``suppressed`` counts, the storm's ``refused``): 3,000;
- ``healthy_node_occurrences_per_min``: every occurrence on the node while the healthy workload ran (goal
  0), and ``healthy_node_own_occurrences``: those about the workload itself;
- ``broken_node_recall``: the share of the broken node's expected occurrences reported (goal 1.0).
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO_DIR, note, report, require_root

HEALTHY_S = 30.0
GREPS = 300
REFUSED = 3000


def _import_workloads():
    for path in (REPO_DIR / "tests", REPO_DIR):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    import network_scenarios
    import node_workloads

    return node_workloads, network_scenarios


def run() -> dict[str, float]:
    require_root("bench_noise")
    workloads, network = _import_workloads()
    from container_scenarios import child_env, in_cgroups, memory_cgroup
    from kernel_helpers import network_namespace

    with tempfile.TemporaryDirectory(prefix="tapio-bench-noise-") as scratch, \
            workloads.observers_at_defaults() as agent:
        work = Path(scratch)
        seen = len(workloads.drained(agent))
        with memory_cgroup(256 << 20) as cgroup:
            subprocess.run(in_cgroups([cgroup], ["sh", "-c", f"for i in $(seq {GREPS}); do "
                                                             "grep -q tapio-no-such-line /etc/hostname; done"]),
                           env=child_env(), check=False)
            occurrences = workloads.drained(agent)[seen:]
            report("grep_loop_occurrences", sum(o["data"].get("cgroup_id") == cgroup.cgroup_id for o in occurrences))
        seen += len(occurrences)

        loops = network.compile_net_loops(work)
        port = network.random_port()
        with network_namespace() as netns:
            outcome = network.loop_report(network.start_refusals(loops, "127.0.0.1", port, REFUSED, netns=netns))
            assert outcome["errors"] == 0, outcome
            deadline = time.monotonic() + 10
            while True:  # until the kernel's clock ended the storm
                occurrences = workloads.drained(agent, settle_s=0.5)[seen:]
                naming = [o for o in occurrences if o["data"].get("dst_port") == port]
                if any(o["data"].get("episode") == "ended" for o in naming) or time.monotonic() > deadline:
                    break
        seen += len(occurrences)
        report("refused_burst_occurrences", len(naming))
        refused = [o["data"] for o in naming if o["type"] == "kernel.network.connection_refused"]
        storms = [o["data"] for o in naming if o["type"] == "kernel.network.rst_storm"]
        report("refused_burst_accounted", len(refused) + sum(d.get("suppressed", 0) for d in refused)
               + sum(d["refused"] for d in storms))

        started = time.monotonic()
        healthy = workloads.healthy_node(work, HEALTHY_S)
        minutes = (time.monotonic() - started) / 60
        occurrences = workloads.drained(agent, settle_s=2.0)[seen:]
        seen += len(occurrences)
        note(f"bench_noise: the healthy workload did {healthy.done}; the node made "
             f"{[o['type'] for o in occurrences]}")
        report("healthy_node_occurrences_per_min", len(occurrences) / minutes)
        report("healthy_node_own_occurrences", sum(healthy.made(o) for o in occurrences))

        broken = workloads.broken_node(work)
        deadline = time.monotonic() + 10
        while True:
            share, missing = workloads.recall(broken, workloads.drained(agent, settle_s=0.5)[seen:])
            if share == 1.0 or time.monotonic() > deadline:
                break
        if missing:
            note(f"bench_noise: the broken node's missing occurrences: {missing}")
        report("broken_node_recall", share)
    return {}
