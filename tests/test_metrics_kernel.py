"""A real Prometheus server scrapes the real agent while the kernel refuses connections; what it stored is
what the agent counted.

The server is Debian's ``prometheus`` package, unpacked by ``make prometheus`` into a cache (never
installed as a service), listening on loopback with its own temporary storage.
"""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from k8s_api_server import free_port
from kernel_helpers import closed_tcp_port, run_connects, running_agent, scaled, wait_until

from tapio_core.state import read_state

PROMETHEUS = Path(os.environ.get("TAPIO_PROMETHEUS",
                                 Path.home() / ".cache/tapio/prometheus/root/usr/bin/prometheus"))
REFUSED = 5


def query(url: str, expression: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Prometheus' instant query API: labels (without __name__, job, instance) -> value."""
    with urllib.request.urlopen(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expression}),
                                timeout=10) as response:
        answer = json.load(response)
    assert answer["status"] == "success", answer
    return {tuple(sorted((k, v) for k, v in r["metric"].items() if k not in ("__name__", "job", "instance"))):
            float(r["value"][1]) for r in answer["data"]["result"]}


@pytest.mark.kernel
def test_prometheus_stores_exactly_what_the_agent_counted(tmp_path):
    if not PROMETHEUS.exists():
        message = f"no Prometheus server at {PROMETHEUS}: `make prometheus` unpacks Debian's"
        if os.environ.get("TAPIO_REQUIRE_KERNEL_TESTS") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    metrics_port, web_port = free_port(), free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
        "scrape_configs": [{"job_name": "tapio", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    }))
    server = subprocess.Popen([str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                               f"--web.listen-address=127.0.0.1:{web_port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{web_port}"
    data = tmp_path / "data"
    data.mkdir()
    try:
        with running_agent(data, extra=["--metrics-addr", f"127.0.0.1:{metrics_port}"]) as agent:
            port = closed_tcp_port("127.0.0.1")
            for _ in range(REFUSED):
                run_connects("127.0.0.1", port)
            refused = 'tapio_observer_anomalies_total{observer="network",type="kernel.network.connection_refused"}'
            mine = lambda: [o for o in agent.occurrences if o["data"].get("dst_port") == port]
            assert wait_until(lambda: len(mine()) == REFUSED, 20), agent.stderr_text()
            # Prometheus holds the agent's count once a scrape after the last anomaly went through.
            expected = agent_count = None

            def scraped_up_to_date() -> bool:
                nonlocal expected, agent_count
                agent_count = read_metric(metrics_port, refused)
                expected = query(url, refused).get((("observer", "network"),
                                                     ("type", "kernel.network.connection_refused")))
                return agent_count is not None and agent_count >= REFUSED and expected == agent_count

            assert wait_until(scraped_up_to_date, 30), (expected, agent_count)
            stored = {
                "records": query(url, 'tapio_observer_records_total{observer="network"}'),
                "anomalies": query(url, 'sum(tapio_observer_anomalies_total{observer="network"})'),
                "delivered": query(url, 'tapio_sink_delivered_total{sink="stdout"}'),
                "up": query(url, 'tapio_observer_up{observer="network"}'),
            }
            assert agent.stop() == 0
        final = read_state(data)["observers"]["network"]
        # Nothing happened between the scrape and the stop that the agent counted: the same numbers.
        assert stored["records"] == {(("observer", "network"),): final["records"]}
        assert stored["anomalies"] == {(): final["anomalies"]}
        assert stored["up"] == {(("observer", "network"), ("status", "running")): 1.0}
        assert list(stored["delivered"].values()) == [float(final["anomalies"])]
        assert final["anomalies"] >= REFUSED
    finally:
        server.terminate()
        server.wait(scaled(30))


def read_metric(port: int, sample: str) -> float | None:
    """One sample's value as the agent serves it now."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(sample + " "):
                return float(line.rsplit(" ", 1)[1])
    return None
