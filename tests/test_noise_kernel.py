"""Occurrences an operator acts on: a healthy busy node makes none, a broken node makes each it should.

The network, container and storage observers run with their default settings, in this process, while
node_workloads.py makes the real kernel do a healthy node's day and then a broken node's faults.
``make bench`` runs the same workloads longer and prints the figures (bench/bench_noise.py).
"""

from __future__ import annotations

import time

import pytest
from kernel_helpers import scaled
from node_workloads import CRASH_LOOP_RESTARTS, broken_node, drained, healthy_node, observers_at_defaults, recall

pytestmark = pytest.mark.kernel

#: Long enough for every kind of healthy activity to happen hundreds of times.
HEALTHY_S = 10.0


@pytest.fixture(scope="module")
def agent():
    """Compiled once for the module: slow in the guests."""
    with observers_at_defaults() as running:
        yield running


def test_a_healthy_busy_node_makes_no_occurrence(agent, tmp_path):
    """Hundreds of failing helpers, connects, early closes and writes: no occurrence about any of them; the
    helpers' exits are counted, node-wide and on their cgroup."""
    before = drained(agent)
    run = healthy_node(tmp_path, HEALTHY_S)
    after = drained(agent, settle_s=2.0)  # a storm or a limit's end would come within a second
    agent.housekeeping()
    made = [o for o in after[len(before):] if run.made(o)]
    assert made == [], [(o["type"], o["data"]) for o in made]
    assert min(run.done.values()) >= 10, run.done  # every kind of activity really happened
    quiet = agent.pipeline.observers["container"].counters["quiet_exits"]
    assert quiet >= run.done["failing_exits"]
    assert agent.pipeline.observers["network"].counters["abandoned_connects"] >= run.done["early_closes"]


def test_a_broken_node_makes_every_occurrence_it_should_and_a_crash_loop_once(agent, tmp_path):
    run = broken_node(tmp_path)
    deadline = time.monotonic() + scaled(10)
    while True:
        occurrences = drained(agent, settle_s=0.5)
        share, missing = recall(run, occurrences)
        if share == 1.0 or time.monotonic() > deadline:
            break
    assert missing == [], f"broken_node_recall {share:.2f}: missing {missing}"
    [crash_loop] = [e for e in run.expected if e.name == "crash loop"]
    reported = [o for o in occurrences if o["type"] == crash_loop.type and crash_loop.matches(o["data"])]
    assert len(reported) == 1, [o["data"] for o in reported]  # the other restarts are folded, not sent
    agent.housekeeping()  # reads the kernel's counts
    assert agent.pipeline.observers["container"].counters["suppressed"] >= CRASH_LOOP_RESTARTS - 1
