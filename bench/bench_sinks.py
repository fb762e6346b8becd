"""What the remote sinks cost the agent's thread, and how fast they deliver to a loopback endpoint.

- ``sink_<name>_emit_ns_per_occurrence``: one ``tapio_sink_emit`` of a 64-occurrence
  batch, divided by 64, for the http and otlp sinks (a queue append) and for the
  stdout sink writing JSON lines to /dev/null (the baseline: what a synchronous
  sink costs). Median of rounds; ``sink_<name>_emit_vs_stdout`` is the ratio to the
  baseline measured in the same run (below 1: emitting to a remote sink is cheaper
  for the agent than printing).
- ``sink_<name>_delivered_per_s``: occurrences per second from the first emit until
  the endpoint acknowledged all of DELIVERED, through the real sender thread,
  requests session and a ThreadingHTTPServer on 127.0.0.1 that reads each body and
  answers 200 (gzip as each sink defaults: off for http, on for otlp).
"""

from __future__ import annotations

import http.server
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from common import median, note, timed

from tapio_core.occurrence import Context, Entity, Error, KernelClock, Occurrence
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions

BATCH = 64
ROUNDS = 200
DELIVERED = 50_000


def occurrences(count: int, start: int = 0) -> list[Occurrence]:
    context = Context(node="node-1", namespace="shop", entities=[Entity(kind="pod", id="uid-1", name="cart-0")])
    return [
        Occurrence(
            id=f"01JBENCH{n:018d}", timestamp=datetime(2026, 5, 6, 7, 8, 9, tzinfo=UTC),
            type="kernel.network.connection_refused", severity="warning", outcome="failure",
            error=Error(code="ECONNREFUSED", message="connection refused"), context=context,
            data={"pid": 4242, "tid": 4243, "comm": "curl", "cgroup_id": 99, "src_ip": "10.0.0.1",
                  "dst_ip": "10.0.0.2", "src_port": 40000 + n % 20000, "dst_port": 80, "family": "ipv4",
                  "protocol": "tcp", "timestamp_ns": 1_000_000 + n},
        )
        for n in range(start, start + count)
    ]


class Endpoint:
    """Reads each request body and answers 200 with nothing."""

    def __init__(self) -> None:
        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Endpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def open_sink(name: str, data_dir: Path, settings: dict):
    plugins = load_plugins({name})
    [sink] = Pipeline.open_sinks(plugins, [name], SinkOptions(data_dir=data_dir), settings)
    return Pipeline(plugins, [], [sink], KernelClock(offset_ns=0)), sink


def emit_cost_ns(pipeline: Pipeline, batches: list[list[Occurrence]]) -> float:
    costs = [timed(lambda batch=batch: pipeline.emit(batch))[0] for batch in batches]
    return median(costs) / BATCH * 1e9


def run() -> dict[str, float]:
    figures: dict[str, float] = {}
    batches = [occurrences(BATCH, start=i * BATCH) for i in range(ROUNDS)]
    with tempfile.TemporaryDirectory() as tmp, Endpoint() as endpoint, open("/dev/null", "wb") as devnull:
        data_dir = Path(tmp)
        stdout, stdout_sink = open_sink("stdout", data_dir, {})
        stdout_sink.state["stream"] = devnull
        baseline = emit_cost_ns(stdout, batches)
        figures["sink_stdout_emit_ns_per_occurrence"] = baseline
        for name in ("http", "otlp"):
            # A queue big enough for the whole run and batches that never fill: the emits measure the append only.
            settings = {name: {"endpoint": endpoint.url, "queue_size": DELIVERED + BATCH * ROUNDS,
                               "batch_max_count": 500}}
            pipeline, sink = open_sink(name, data_dir, settings)
            cost = emit_cost_ns(pipeline, batches)
            figures[f"sink_{name}_emit_ns_per_occurrence"] = cost
            figures[f"sink_{name}_emit_pct_of_stdout"] = 100 * cost / baseline
            while sink.counters["delivered"] < BATCH * ROUNDS:
                time.sleep(0.01)
            target = sink.counters["delivered"] + DELIVERED
            load = occurrences(DELIVERED, start=BATCH * ROUNDS)
            start = time.perf_counter()
            for first in range(0, DELIVERED, BATCH):
                pipeline.emit(load[first:first + BATCH])
            while sink.counters["delivered"] < target:
                if sink.counters["failed"] or sink.counters["dropped"]:
                    raise RuntimeError(f"{name} sink lost occurrences in the benchmark: {sink.counters}")
                time.sleep(0.002)
            elapsed = time.perf_counter() - start
            pipeline.close()
            figures[f"sink_{name}_delivered_per_s"] = DELIVERED / elapsed
            note(f"bench_sinks: {name}: {sink.counters}")
    return figures
