"""Records/s of the agent's ingest path against a bare bcc ring-buffer drain, same records, same run.

A BPF program (synthetic_network.bpf.c, compiled together with the real network
observer so the ``events`` ring and ``struct network_record`` are the real ones)
writes RECORDS records into the ring on getppid(2); then one consumer drains them
and only the drain is timed. Consumers, each on its own freshly filled ring:

- bare_drain: bcc ``open_ring_buffer`` + ``ring_buffer_consume()``, no-op callback;
- reader_drain: ``RingBufferReader.read_batch`` alone;
- parse_detect: read_batch, ``Pipeline.parse``, the network plugin's ``tapio_detect_anomalies``;
- ingest: read_batch and the agent's full ``Pipeline.ingest`` (parse, detect, occurrences,
  enrichment, emit) into a null sink.

Rounds are interleaved; rates are the median round, ratios the median of per-round
ratios to that round's bare drain. parse_detect and ingest run on two streams: every
record a failed connect, and 1 % (the rest kind 0, which the detector ignores); the
unsuffixed figures are the 1 % ones. bare_drain runs on the all-anomalies stream only:
its no-op callback never looks at the contents. Goal: ingest_vs_bare_drain >= 1.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import gc
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import BENCH_DIR, BenchError, median, note, require_root, timed

from tapio_core import SinkSpec, hookimpl

RECORDS = 200_000
BURST = 64  # records per getppid() call; RECORDS must be a multiple
#: Rounds per consumer; the all-anomalies paths take seconds a round, the others tenths.
ROUNDS = 15
SLOW_ROUNDS = 3
#: 32 MiB: 200,000 records of 152 bytes take 32.0 MB with their 8-byte headers.
RING_PAGES = 8192
#: Stream name -> one record in N is a failed connect.
ANOMALY_EVERY = {"all_anomalies": 1, "1pct_anomalies": 100}
HEADLINE = "1pct_anomalies"
SOURCE = BENCH_DIR / "synthetic_network.bpf.c"
CONFIG_TGID, CONFIG_ANOMALY_EVERY, CONFIG_SEQ = 0, 1, 2


class NullSink:
    """A throwaway sink plugin that drops what it gets: the sink's own cost is not measured."""

    @hookimpl
    def tapio_register_sinks(self, register: Callable[[SinkSpec], None]) -> None:
        register(SinkSpec(name="bench-null", description="drops occurrences (benchmark)"))

    @hookimpl
    def tapio_sink_emit(self, sink: Any, occurrences: Any) -> None:
        pass


class SyntheticStream:
    """The network observer's program plus the synthetic producer, loaded once."""

    def __init__(self, spec: Any) -> None:
        from bcc import BPF

        from tapio_core.bpf import kernel_fit, program_text, shared_include_dir
        from tapio_core.btf import Btf
        from tapio_core.ringbuf import RingBufferReader

        self.spec = spec
        flags = list(kernel_fit(spec, Btf.load()).cflags)  # as the agent compiles it
        text = f'{program_text(Path(spec.bpf_source), None)}\n#line 1 "{SOURCE}"\n{SOURCE.read_text()}'
        cflags = [f"-I{shared_include_dir()}", f"-DTAPIO_RING_PAGES={RING_PAGES}", f"-DBENCH_BURST={BURST}"]
        self.bpf = BPF(text=text.encode(), cflags=cflags + flags)
        # The observer's own probes attach on load; detach them so only the synthetic stream flows.
        for tracepoint in [*spec.tracepoints, *(optional.tracepoint for optional in spec.optional_tracepoints)]:
            category, _, event = tracepoint.partition(":")
            with contextlib.suppress(Exception):  # an optional one this kernel lacks was never attached
                if category == "raw":
                    self.bpf.detach_raw_tracepoint(tp=event.encode())
                else:
                    self.bpf.detach_tracepoint(tracepoint)
        self.config = self.bpf[b"bench_config"]
        self.set(CONFIG_TGID, os.getpid())
        table = self.bpf[spec.ring_buffer.encode()]
        self.reader = RingBufferReader(table.map_fd, table.max_entries, spec.record_dtype.itemsize)

        def bare_callback(ctx: Any, data: Any, size: int) -> int:
            return 0  # bcc turns a None return into 0 through an exception: return 0 outright

        table.open_ring_buffer(bare_callback)

    def set(self, slot: int, value: int) -> None:
        self.config[ct.c_int(slot)] = ct.c_uint64(value)

    def lost(self) -> int:
        """tapio_lost summed over CPUs, read through bcc: this benchmark's program stays bcc's own (its bare
        drain is bcc's ring-buffer reader)."""
        return int(self.bpf[self.spec.lost_counter.encode()].sum(ct.c_int(0)).value)

    def fill(self, anomaly_every: int) -> None:
        """Put exactly RECORDS records in the (empty) ring; fails if any did not fit."""
        if self.reader.pending():
            raise RuntimeError("ring not empty before fill")
        gc.collect()  # the previous consumer's garbage is not the next one's to pay for
        lost = self.lost()
        self.set(CONFIG_SEQ, 0)
        self.set(CONFIG_ANOMALY_EVERY, anomaly_every)
        for _ in range(RECORDS // BURST):
            os.getppid()
        self.set(CONFIG_ANOMALY_EVERY, 0)
        produced = int(self.config[ct.c_int(CONFIG_SEQ)].value)
        if produced != RECORDS or self.lost() != lost:
            raise RuntimeError(f"producer wrote {produced} records, {self.lost() - lost} lost; want {RECORDS}")

    def check_empty(self) -> None:
        if self.reader.pending():
            raise RuntimeError("consumer left records in the ring")

    def close(self) -> None:
        self.reader.close()
        self.bpf.cleanup()


def build_pipeline(data_dir: Path) -> tuple[Any, Any, Any]:
    """(pipeline, observer, detect): the network plugin and a null sink, built as the agent builds them."""
    from tapio_core.occurrence import KernelClock
    from tapio_core.pipeline import Pipeline
    from tapio_core.plugins import load_plugins
    from tapio_core.sink import SinkOptions

    plugins = load_plugins(["network"], extra=[("bench-null-sink", NullSink())])
    pipeline = Pipeline.build(plugins, ["bench-null"], SinkOptions(data_dir=data_dir), {}, KernelClock())
    observer = pipeline.observers["network"]
    detect = plugins.hook_for("tapio_detect_anomalies", observer.plugin_name)
    return pipeline, observer, detect


def run() -> dict[str, float]:
    require_root("bench_ingest")
    try:
        import bcc  # noqa: F401
    except ImportError:
        raise BenchError("bcc's Python module is missing: run `make setup`") from None
    with tempfile.TemporaryDirectory(prefix="tapio-bench-") as data_dir:
        pipeline, observer, detect = build_pipeline(Path(data_dir))
        stream = SyntheticStream(observer.spec)
        try:
            seconds = measure(stream, pipeline, observer, detect)
        finally:
            pipeline.close()
            stream.close()
    return figures(seconds)


def measure(stream: SyntheticStream, pipeline: Any, observer: Any, detect: Any) -> dict[str, list[float]]:
    """Drain seconds per consumer and stream, checked for a complete drain and the expected anomalies."""
    reader = stream.reader
    size = observer.spec.record_dtype.itemsize

    def bare() -> tuple[int, int | None]:
        stream.bpf.ring_buffer_consume()
        return RECORDS, None  # fill() put exactly RECORDS in; check_empty() proves all were taken

    def reader_only() -> tuple[int, int | None]:
        got = 0
        while data := reader.read_batch():
            got += len(data) // size
        return got, None

    def parse_detect() -> tuple[int, int | None]:
        got = found = 0
        while data := reader.read_batch():
            events = pipeline.parse(observer, data)
            found += sum(len(anomalies) for anomalies in detect(observer=observer, events=events) if anomalies)
            got += len(events)
        return got, found

    def ingest() -> tuple[int, int | None]:
        got = found = 0
        while data := reader.read_batch():
            got += len(data) // size
            found += len(pipeline.ingest(observer.name, data))
        return got, found

    consumers: list[tuple[str, int, int, Callable[[], tuple[int, int | None]]]] = [
        ("bare_drain", 1, ROUNDS, bare),
        ("reader_drain", 1, ROUNDS, reader_only),
    ]
    for stream_name, every in ANOMALY_EVERY.items():
        rounds = SLOW_ROUNDS if every == 1 else ROUNDS
        consumers.append((f"parse_detect_{stream_name}", every, rounds, parse_detect))
        consumers.append((f"ingest_{stream_name}", every, rounds, ingest))
    seconds: dict[str, list[float]] = {name: [] for name, _, _, _ in consumers}
    sink = pipeline.sinks[0]
    for round_no in range(ROUNDS):
        for name, every, rounds, consume in consumers:
            if round_no >= rounds:
                continue
            stream.fill(every)
            delivered = sink.delivered
            elapsed, (got, found) = timed(consume)
            stream.check_empty()
            if got != RECORDS:
                raise RuntimeError(f"{name}: drained {got} records, want {RECORDS}")
            if found is not None and found != RECORDS // every:
                raise RuntimeError(f"{name}: {found} anomalies, want {RECORDS // every}")
            if name.startswith("ingest_") and sink.delivered - delivered != found:
                raise RuntimeError(f"{name}: sink got {sink.delivered - delivered} occurrences, want {found}")
            seconds[name].append(elapsed)
        note(
            f"bench_ingest: round {round_no + 1}/{ROUNDS}: "
            + ", ".join(f"{name} {RECORDS / s[round_no] / 1e6:.2f}" for name, s in seconds.items() if len(s) > round_no)
            + " M records/s"
        )
    return seconds


def figures(seconds: dict[str, list[float]]) -> dict[str, float]:
    """Median rates; each ratio is the median of per-round ratios, so a slow spell of the
    shared machine (which lasts longer than a round) cancels out instead of skewing it."""
    rate = {name: RECORDS / median(values) for name, values in seconds.items()}

    def vs_bare(name: str) -> float:
        return median(bare / own for own, bare in zip(seconds[name], seconds["bare_drain"], strict=False))

    out = {
        "bare_drain_records_per_s": rate["bare_drain"],
        "reader_drain_records_per_s": rate["reader_drain"],
        "reader_vs_bare_drain": vs_bare("reader_drain"),
    }
    for path in ("parse_detect", "ingest"):
        for stream_name in ANOMALY_EVERY:
            out[f"{path}_records_per_s_{stream_name}"] = rate[f"{path}_{stream_name}"]
            out[f"{path}_vs_bare_drain_{stream_name}"] = vs_bare(f"{path}_{stream_name}")
        out[f"{path}_records_per_s"] = rate[f"{path}_{HEADLINE}"]
        out[f"{path}_vs_bare_drain"] = vs_bare(f"{path}_{HEADLINE}")
    return out
