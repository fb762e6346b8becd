"""Nothing lost without a count, on the real kernel: every record the kernel produced is delivered,
suppressed by a rate limit or counted lost, and the sum is exact.

The agent runs in this process so the test decides when it drains: the burst fills the ring first.
The burst is refused connects inside a network namespace the test made; storms are turned off so
each connect is one record, and the test checks that no one else's record came through meanwhile
(a lost record carries no port: the sum is only exact while the test's are the only ones).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kernel_helpers import closed_tcp_port, network_namespace, run_connects
from plugin_helpers import Collect

from tapio_core.agent import Agent
from tapio_core.config import ConfigError, split_ring_pages
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions

REFUSED = "kernel.network.connection_refused"
#: Far more than a one-page ring holds (about 4 KiB of records).
BURST = 1500
NO_LIMITS = {"connection_burst": 1_000_000, "connection_rate_per_s": 1_000_000.0,
             "rst_storm_threshold": 1_000_000, "rst_storm_node_threshold": 1_000_000}


def network_agent(tmp_path: Path, settings: dict) -> tuple[Agent, Collect]:
    sink = Collect()
    loaded = load_plugins(allow={"network"}, extra=[("collect", sink)])
    pipeline = Pipeline.build(loaded, ["collect"], SinkOptions(data_dir=tmp_path), settings, KernelClock())
    agent = Agent(loaded, pipeline, recorder=None)
    agent.load(None)
    assert pipeline.observers["network"].status == "running", pipeline.observers["network"].status_reason
    return agent, sink


def drain_all(agent: Agent, name: str) -> None:
    while agent.drain(name):
        pass
    agent.housekeeping()


@pytest.mark.kernel
@pytest.mark.parametrize(("ring_pages", "limits", "expect_lost"), [
    (1, NO_LIMITS, True),  # the ring overflows: lost, counted
    (64, {**NO_LIMITS, "connection_burst": 100, "connection_rate_per_s": 0.001}, False),  # the limit holds back
])
def test_every_refused_connect_is_delivered_suppressed_or_counted_lost(tmp_path, ring_pages, limits, expect_lost):
    agent, sink = network_agent(tmp_path, {"network": {"ring_pages": ring_pages, **limits}})
    observer = agent.pipeline.observers["network"]
    try:
        assert agent.pipeline.observers["network"].bpf["events"].max_entries == ring_pages * 4096
        with network_namespace() as netns:
            port = closed_tcp_port("127.0.0.1")
            connector = run_connects("127.0.0.1", port, count=BURST, netns=netns)  # nothing drained meanwhile
        assert {a["errno"] for a in connector["attempts"]} == {"ECONNREFUSED"}
        drain_all(agent, "network")
    finally:
        agent.shutdown()
    delivered = [o for o in sink.received if o.type == REFUSED and o.data["dst_port"] == port]
    others = [o for o in sink.received if o not in delivered]
    assert others == []  # only the test's records were in the ring: the lost ones were the test's too
    suppressed = observer.counters["suppressed"]
    assert len(delivered) + suppressed + observer.lost == BURST
    assert observer.records == len(delivered)
    if expect_lost:
        assert observer.lost > 0 and suppressed == 0
        assert agent.state()["observers"]["network"]["lost"] == observer.lost  # what status and metrics show
    else:
        assert observer.lost == 0 and len(delivered) == 100 and suppressed == BURST - 100


@pytest.mark.parametrize("pages", [0, 3, 32768, "64", True, 1.5])
def test_a_ring_size_that_is_not_a_power_of_two_in_range_is_one_clear_error(pages):
    with pytest.raises(ConfigError, match=r"config \[network\]: 'ring_pages' must be a power of two from 1 to 16384"):
        split_ring_pages("network", {"network": {"ring_pages": pages}})


def test_ring_pages_is_the_cores_key_and_leaves_the_plugins_settings_alone():
    assert split_ring_pages("network", {"network": {"ring_pages": 8, "rst_storm_threshold": 5}}) == (
        8, {"network": {"rst_storm_threshold": 5}})
    assert split_ring_pages("network", {}) == (64, {})
