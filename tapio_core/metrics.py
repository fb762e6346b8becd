"""The agent's Prometheus metrics and health endpoints (``tapio-agent --metrics-addr HOST:PORT``), off by default.

``/metrics`` is read from the agent's own counts at each scrape (a custom collector: nothing is
counted twice, and what Prometheus stores is what ``tapio status`` shows); ``/healthz`` answers 200
while the agent's loop runs its housekeeping; ``/readyz`` 200 once every observer is attached (or
said to be unsupported). http.server is imported only when the endpoint is on, prometheus-client only
once something scrapes /metrics.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from typing import TYPE_CHECKING, Any

from tapio_core import __version__
from tapio_core.config import ConfigError

if TYPE_CHECKING:
    from tapio_core.agent import Agent

log = logging.getLogger("tapio.metrics")

#: How stale the agent's last housekeeping may be before /healthz says it is stuck.
HEALTHY_WITHIN_S = 10.0
#: Upper bounds (seconds) of the ring-buffer drain histogram's buckets.
DRAIN_BUCKETS_S = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0)


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6), or ``PORT`` / ``:PORT`` for loopback -> (host, port);
    ConfigError naming what is wrong. All interfaces only when asked for (``0.0.0.0:PORT``)."""
    if text.isdigit() or text.startswith(":"):
        text = "127.0.0.1:" + text.removeprefix(":")
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--metrics-addr {text!r}: expected [HOST:]PORT, e.g. 9464 (loopback) or 10.0.0.5:9464")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"--metrics-addr {text!r}: the host must be an IP address or localhost") from None
    return host, int(port)


class DrainHistogram:
    """Seconds a ring-buffer drain took (parse, detect, enrich, emit), in cumulative buckets; no lock:
    only the agent's thread writes, and a scrape reading mid-update is off by one observation at most."""

    def __init__(self) -> None:
        self.counts = [0] * (len(DRAIN_BUCKETS_S) + 1)
        self.total_s = 0.0

    def observe(self, seconds: float) -> None:
        for index, bound in enumerate(DRAIN_BUCKETS_S):
            if seconds <= bound:
                self.counts[index] += 1
                break
        else:
            self.counts[-1] += 1
        self.total_s += seconds


class AgentCollector:
    """Prometheus families from the agent's own counts, at each scrape."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    def collect(self) -> Any:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
            InfoMetricFamily,
        )

        agent, pipeline = self.agent, self.agent.pipeline
        yield InfoMetricFamily("tapio_agent", "The agent", value={
            "version": __version__, "kernel": os.uname().release,
            "node": os.environ.get("NODE_NAME") or os.uname().nodename})
        up = GaugeMetricFamily("tapio_observer_up", "1 while the observer runs", labels=["observer", "status"])
        records = CounterMetricFamily("tapio_observer_records", "Ring-buffer records read", labels=["observer"])
        lost = CounterMetricFamily("tapio_observer_lost_records", "Records the kernel could not put in the ring",
                                   labels=["observer"])
        malformed = CounterMetricFamily("tapio_observer_malformed_records", "Records that could not be read",
                                        labels=["observer"])
        anomalies = CounterMetricFamily("tapio_observer_anomalies", "Anomalies found, by occurrence type",
                                        labels=["observer", "type"])
        counts = CounterMetricFamily("tapio_observer_counts", "The observer's own counts (suppressed, ...)",
                                     labels=["observer", "count"])
        dropped = CounterMetricFamily("tapio_observer_dropped_batches", "Batches whose parse or detect failed",
                                      labels=["observer"])
        for name, observer in pipeline.observers.items():
            up.add_metric([name, observer.status], 1.0 if observer.status == "running" else 0.0)
            records.add_metric([name], observer.records)
            lost.add_metric([name], observer.lost)
            malformed.add_metric([name], observer.malformed)
            dropped.add_metric([name], observer.dropped_batches)
            for type_, count in sorted(observer.anomalies_by_type.items()):
                anomalies.add_metric([name, type_], count)
            for count_name, value in sorted(observer.counters.items()):
                counts.add_metric([name, count_name], value)
        yield from (up, records, lost, malformed, anomalies, counts, dropped)
        delivered = CounterMetricFamily("tapio_sink_delivered", "Occurrences delivered", labels=["sink"])
        failed = CounterMetricFamily("tapio_sink_failed", "Occurrences that could not be delivered", labels=["sink"])
        sink_counts = CounterMetricFamily("tapio_sink_counts", "The sink's own counts (dropped, retried, ...)",
                                          labels=["sink", "count"])
        for sink in pipeline.sinks:
            delivered.add_metric([sink.name], sink.counters.get("delivered", 0) if sink.spec.delivers_later
                                 else sink.delivered)
            failed.add_metric([sink.name], sink.failed + sink.counters.get("failed", 0))
            for count_name, value in sorted(sink.counters.items()):
                if count_name not in ("delivered", "failed"):
                    sink_counts.add_metric([sink.name, count_name], value)
        queued = GaugeMetricFamily("tapio_sink_queue_depth", "Occurrences waiting to be delivered", labels=["sink"])
        for sink in pipeline.sinks:
            if sink.queue_depth is not None:
                queued.add_metric([sink.name], sink.queue_depth())
        yield from (delivered, failed, sink_counts, queued)
        enricher_counts = CounterMetricFamily("tapio_enricher_counts", "The enricher's own counts (hits, misses)",
                                              labels=["enricher", "count"])
        for enricher in pipeline.enrichers:
            for count_name, value in sorted(enricher.counters.items()):
                enricher_counts.add_metric([enricher.name, count_name], value)
        yield enricher_counts
        plugin_errors = CounterMetricFamily("tapio_plugin_errors", "Errors a plugin raised, by hook",
                                            labels=["plugin", "hook"])
        for (plugin, hook), count in sorted(pipeline.plugin_errors.counts.items()):
            plugin_errors.add_metric([plugin, hook], count)
        yield plugin_errors
        histogram = agent.drain_seconds
        buckets, cumulative = [], 0
        for bound, count in zip([*map(str, DRAIN_BUCKETS_S), "+Inf"], histogram.counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        drain = HistogramMetricFamily("tapio_drain_seconds", "Time to drain one ring-buffer batch end to end")
        drain.add_metric([], buckets, histogram.total_s)
        yield drain


class Exposition:
    """The Prometheus text of the agent's counts. prometheus-client is imported at the first scrape: a node
    whose only callers are its probes (/healthz, /readyz) does not pay for it (about 2 MB)."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._registry: Any = None

    def __call__(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

        with self._lock:
            if self._registry is None:
                self._registry = CollectorRegistry(auto_describe=False)
                self._registry.register(AgentCollector(self.agent))
        return generate_latest(self._registry), CONTENT_TYPE_LATEST


class MetricsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` on a daemon thread."""

    def __init__(self, agent: Agent, address: tuple[str, int]) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        exposition = Exposition(agent)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/metrics":
                    self.answer(200, *exposition())
                elif self.path == "/healthz":
                    alive = time.monotonic() - agent.last_housekeeping < HEALTHY_WITHIN_S
                    self.answer(200 if alive else 503, b"ok\n" if alive else b"the agent's loop is stuck\n")
                elif self.path == "/readyz":
                    waiting = agent.not_ready()
                    self.answer(503 if waiting else 200, (waiting or "ready").encode() + b"\n")
                else:
                    self.answer(404, b"not found: /metrics, /healthz, /readyz\n")

            def answer(self, code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
                pass

        try:
            self.httpd = ThreadingHTTPServer(address, Handler)
        except OSError as exc:
            raise ConfigError(f"--metrics-addr {address[0]}:{address[1]}: cannot listen: {exc.strerror}") from None
        self.httpd.daemon_threads = True
        self.address = self.httpd.server_address[:2]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.5},
                                       name="tapio-metrics", daemon=True)
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics", *self.address)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
