"""``tapio-agent``: load observers into the kernel, turn their records into occurrences."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import attrs
import click

from tapio_core import __version__
from tapio_core.bpf import (
    ObserverLoadError,
    ObserverUnsupported,
    can_load_bpf,
    load_observer,
    read_counter,
    read_lost,
)
from tapio_core.bpf_objects import LoadedProgram
from tapio_core.config import ConfigError, config_options, load_settings
from tapio_core.metrics import DrainHistogram
from tapio_core.observer import RunningObserver
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import LoadedPlugins, PluginError, load_plugins, parse_plugin_list
from tapio_core.recording import RecordWriter
from tapio_core.ringbuf import RingBufferReader
from tapio_core.sink import SinkError, SinkOptions
from tapio_core.state import STATE_INTERVAL_S, process_identity, write_state

log = logging.getLogger("tapio.agent")

#: After a batch smaller than this, pause briefly so the next one can grow:
#: re-reading the ring for a record or two at a time burns a core.
SMALL_BATCH = 64
SMALL_BATCH_PAUSE_S = 0.002
HOUSEKEEPING_S = 1.0
#: Compile helpers running at once at start-up. Each peaks near 140 MB (bcc and LLVM), paid by the
#: node while observers start: two halve the start-up on a two-core node and bound that cost.
COMPILE_HELPERS = 2


def compile_helpers_at_once() -> int:
    return max(1, min(COMPILE_HELPERS, len(os.sched_getaffinity(0))))


#: mallopt's M_ARENA_MAX: glibc gives each thread that allocates its own arena, which keeps what it
#: freed; the agent's few threads (sinks, enrichers) mostly wait on I/O under the GIL.
M_ARENA_MAX = -8
MALLOC_ARENAS = 1


def tune_malloc() -> None:
    """One malloc arena for the whole agent (about 1 MB less resident); a no-op without glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def trim_malloc() -> None:
    """Hand back to the kernel what start-up freed (bcc's build descriptions, the BTF index, the first list)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def configure_logging(verbose: int) -> None:
    """Logs go to stderr so that stdout carries nothing but occurrence JSON lines."""
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(stream=sys.stderr, level=level, format="tapio-agent: %(levelname)s: %(message)s")


class Agent:
    """Owns the loaded observers, their ring-buffer readers and the poll loop."""

    def __init__(
        self,
        plugins: LoadedPlugins,
        pipeline: Pipeline,
        recorder: RecordWriter | None,
        data_dir: Path | None = None,
        settings: dict | None = None,
    ) -> None:
        self.plugins = plugins
        self.pipeline = pipeline
        self.recorder = recorder
        self.data_dir = data_dir
        self.settings = settings or {}
        self.readers: dict[str, object] = {}
        self.started_at = time.time()
        self._stop = False
        self._last_state: tuple[float, dict[str, tuple[int, int, int]]] | None = None
        self._next_state = 0.0
        self.drain_seconds = DrainHistogram()
        self.last_housekeeping = time.monotonic()
        self.loaded = False
        #: Lets `tapio status` tell this process from a later one with the same pid.
        self.identity = process_identity()

    def load(self, ebpf_dir: Path | None, meanwhile: Callable[[], None] | None = None,
             loader: Callable[..., tuple[LoadedProgram, dict[str, str]]] = load_observer) -> None:
        """Compile and attach every observer, up to COMPILE_HELPERS helpers at a time; ``meanwhile`` (e.g. the
        enrichers' start) runs while they compile. One observer failing leaves the others running.
        ``loader`` is :func:`tapio_core.bpf.load_observer` but for benchmarks that compile in-process."""
        from tapio_core.btf import Btf

        try:
            btf = Btf.load()
        except Exception as exc:
            log.warning("cannot read kernel BTF (%s): features that need struct offsets are disabled", exc)
            btf = None
        observers = list(self.pipeline.observers.values())
        compiles: dict[str, Future] = {}
        with ThreadPoolExecutor(compile_helpers_at_once(), thread_name_prefix="tapio-compile") as pool:
            for observer in observers:
                observer.btf = btf
                try:
                    self.plugins.hook_for("tapio_observer_preflight", observer.plugin_name)(observer=observer)
                except Exception as exc:
                    self._not_started(observer, exc)
                    continue
                spec = attrs.evolve(observer.spec, cflags=(*observer.spec.cflags,
                                                          f"-DTAPIO_RING_PAGES={observer.ring_pages}"))
                compiles[observer.name] = pool.submit(loader, spec, ebpf_dir, btf)
            try:
                if meanwhile is not None:
                    meanwhile()
            except BaseException:
                for future in compiles.values():
                    with contextlib.suppress(Exception):
                        future.result()[0].close()
                raise
            for observer in observers:
                if observer.name in compiles:
                    self._start(observer, compiles[observer.name])
        # The parsed BTF index is about 30 MB of small objects, needed only while observers start.
        for observer in observers:
            observer.btf = None
        del btf
        gc.collect()
        trim_malloc()
        self.loaded = True

    def _start(self, observer: RunningObserver, compiled: Future) -> None:
        try:
            observer.bpf, disabled = compiled.result()
            self.plugins.hook_for("tapio_observer_started", observer.plugin_name)(observer=observer)
            ring = observer.bpf[observer.spec.ring_buffer]
            self.readers[observer.name] = RingBufferReader(ring.fd, ring.max_entries,
                                                           observer.spec.record_dtype.itemsize)
        except Exception as exc:
            self._not_started(observer, exc)
            return
        observer.status = "running"
        observer.disabled = disabled
        # Keep what tapio_observer_started said (e.g. "degraded: ..."), add what this kernel lacks.
        reasons = [observer.status_reason] if observer.status_reason else []
        if disabled:
            reasons.append("disabled: " + "; ".join(f"{feature} ({why})" for feature, why in disabled.items()))
        observer.status_reason = "; ".join(reasons)
        log.info("observer %s running%s", observer.name, f" ({observer.status_reason})" if reasons else "")

    def _not_started(self, observer: RunningObserver, exc: Exception) -> None:
        """One observer's failure, of whatever kind: recorded, its program detached; the others run on."""
        unsupported = isinstance(exc, ObserverUnsupported)
        if isinstance(exc, ObserverLoadError):
            reason = str(exc)
            log.log(logging.WARNING if unsupported else logging.ERROR, "%s", exc)
        else:  # a bug in the plugin or the core: its traceback is wanted
            reason = f"{observer.name}: failed to start: {type(exc).__name__}: {exc}"
            log.exception("%s", reason)
        observer.status, observer.status_reason = ("unsupported" if unsupported else "failed"), reason
        self.readers.pop(observer.name, None)
        if observer.bpf is not None:
            observer.bpf.close()
            observer.bpf = None

    def not_ready(self) -> str:
        """Why the agent is not ready (observers still starting, or one failed); empty when it is."""
        if not self.loaded:
            return "observers are being compiled and attached"
        failed = [f"{o.name}: {o.status_reason}" for o in self.pipeline.observers.values() if o.status == "failed"]
        return "failed: " + "; ".join(failed) if failed else ""

    def stop(self, *_: object) -> None:
        self._stop = True

    def run(self) -> None:
        # Everything loaded so far (plugins, numpy) lives as long as the agent: keep it out of
        # the garbage collector's way, so a burst of anomalies does not pay for scanning it.
        gc.freeze()
        poller = select.epoll()
        by_fd = {}
        for name, reader in self.readers.items():
            poller.register(reader.fileno(), select.EPOLLIN)
            by_fd[reader.fileno()] = name
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        poller.register(wake_read, select.EPOLLIN)
        previous_wakeup = signal.set_wakeup_fd(wake_write)
        next_housekeeping = time.monotonic() + HOUSEKEEPING_S
        try:
            while not self._stop:
                ready = poller.poll(HOUSEKEEPING_S)
                drained = 0
                for fd, _ in ready:
                    if fd == wake_read:
                        os.read(wake_read, 512)
                    else:
                        drained += self.drain(by_fd[fd])
                if 0 < drained < SMALL_BATCH:
                    time.sleep(SMALL_BATCH_PAUSE_S)
                if time.monotonic() >= next_housekeeping:
                    self.housekeeping()
                    next_housekeeping = time.monotonic() + HOUSEKEEPING_S
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            poller.close()
            os.close(wake_read)
            os.close(wake_write)
            self.shutdown()

    def drain(self, name: str) -> int:
        reader = self.readers[name]
        records = reader.read_batch()
        if not records:
            return 0
        if self.recorder is not None:
            size = self.pipeline.observers[name].spec.record_dtype.itemsize
            self.recorder.write_batch(name, size, time.clock_gettime_ns(time.CLOCK_MONOTONIC), records)
        started = time.perf_counter()
        try:
            self.pipeline.ingest(name, records)  # a plugin raising is counted there
        except Exception:  # the core's own bug: the batch is lost, the agent goes on
            self.pipeline.observers[name].dropped_batches += 1
            log.exception("observer %s: a batch of %d bytes failed", name, len(records))
        self.drain_seconds.observe(time.perf_counter() - started)
        return len(records) // self.pipeline.observers[name].spec.record_dtype.itemsize

    def housekeeping(self) -> None:
        self.last_housekeeping = time.monotonic()
        for observer in self.pipeline.observers.values():
            if observer.bpf is None:
                continue
            reader = self.readers.get(observer.name)
            if reader is not None:
                # Records of the wrong length in the ring are malformed too (status shows one figure).
                observer.malformed += reader.malformed - observer.counters.get("ring_malformed", 0)
                observer.counters["ring_malformed"] = reader.malformed
                observer.counters["ring_discarded"] = reader.discarded
            for counter in observer.spec.bpf_counters:
                observer.counters[counter.name] = read_counter(observer.bpf, counter.map, counter.index)
            lost = read_lost(observer.bpf, observer.spec.lost_counter)
            if lost > observer.lost:
                log.warning("observer %s: ring buffer full, %d record(s) lost", observer.name, lost - observer.lost)
                observer.lost = lost
        step = self.pipeline.clock.follow()
        if step:
            log.warning("the wall clock stepped by %+.3f s: occurrences from now on carry the new time", step / 1e9)
            if self.recorder is not None:
                self.recorder.write_clock(self.pipeline.clock.offset_ns)  # a replay steps where the agent did
        if self.recorder is not None:
            self.recorder.flush()
        if self.data_dir is not None and time.monotonic() >= self._next_state:
            self.write_state()
            self._next_state = time.monotonic() + STATE_INTERVAL_S

    def state(self, running: bool = True) -> dict:
        """What `tapio status` shows: per observer and sink, states and counts, with rates since last time."""
        now = time.time()
        previous_time, previous = self._last_state or (self.started_at, {})
        elapsed = max(now - previous_time, 1e-9)
        observers = {}
        for name, obs in self.pipeline.observers.items():
            before_records, before_anomalies, before_lost = previous.get(name, (0, 0, 0))
            observers[name] = {
                "status": obs.status, "reason": obs.status_reason, "plugin": obs.plugin_name,
                "type_prefix": obs.type_prefix, "disabled": dict(obs.disabled),
                "records": obs.records, "anomalies": obs.anomalies, "lost": obs.lost, "malformed": obs.malformed,
                "records_per_s": round((obs.records - before_records) / elapsed, 3),
                "anomalies_per_s": round((obs.anomalies - before_anomalies) / elapsed, 3),
                "lost_per_s": round((obs.lost - before_lost) / elapsed, 3),
                "counters": dict(obs.counters),
                "dropped_batches": obs.dropped_batches,
            }
        self._last_state = (now, {n: (o.records, o.anomalies, o.lost) for n, o in self.pipeline.observers.items()})
        return {
            "agent": {"version": __version__, "pid": os.getpid(), **self.identity, "running": running,
                      "started_at": self.started_at, "node": os.environ.get("NODE_NAME") or os.uname().nodename},
            "updated_at": now,
            "config": self.settings,
            "plugin_errors": [{"plugin": plugin, "hook": hook, "count": count}
                              for (plugin, hook), count in sorted(self.pipeline.plugin_errors.counts.items())],
            "observers": observers,
            "sinks": {s.name: {"plugin": s.plugin_name,
                               "delivered": s.counters.get("delivered", 0) if s.spec.delivers_later else s.delivered,
                               "failed": s.failed + s.counters.get("failed", 0),
                               "counters": dict(s.counters),
                               **({"queued": s.queue_depth()} if s.queue_depth is not None else {})}
                      for s in self.pipeline.sinks},
            "enrichers": {e.name: self._enricher_state(e) for e in self.pipeline.enrichers},
        }

    @staticmethod
    def _enricher_state(enricher) -> dict:
        state = {"plugin": enricher.plugin_name, "status": enricher.status, "reason": enricher.status_reason,
                 "counters": dict(enricher.counters)}
        if enricher.report is not None:
            try:
                state["details"] = enricher.report()
            except Exception as exc:
                state["details"] = {"error": f"{type(exc).__name__}: {exc}"}
        return state

    def write_state(self, running: bool = True) -> None:
        try:
            write_state(self.data_dir, self.state(running))
        except OSError as exc:
            log.warning("cannot write agent state under %s: %s", self.data_dir, exc)

    def shutdown(self) -> None:
        # Detached first, then drained to empty: every record the kernel produced is then read or was
        # counted lost, even in a storm (draining while still attached would never end, or end short).
        for name in self.readers:
            self.pipeline.observers[name].bpf.detach()
        for name in self.readers:
            while self.drain(name):  # what arrived before the signal still counts
                pass
            self.pipeline.finish(name)
        self.housekeeping()  # the last state written carries the kernel's final counts
        self.pipeline.stop_enrichers()
        self.pipeline.close()
        if self.recorder is not None:
            self.recorder.close()
        for reader in self.readers.values():
            reader.close()
        for observer in self.pipeline.observers.values():
            if observer.bpf is not None:
                observer.bpf.close()  # detaches the tracepoints
                observer.bpf = None
            if observer.status == "running":
                observer.status = "stopped"
        if self.data_dir is not None:
            self.write_state(running=False)


def default_sinks(plugins: LoadedPlugins, plugin_list: str | None) -> list[str]:
    """Without --sink: the sinks --plugins named, or stdout and file when it named none (or was not given)."""
    chosen = parse_plugin_list(plugin_list) or set()
    named = sorted(name for name, (plugin, _) in plugins.sinks.items() if plugin in chosen)
    return named or ["stdout", "file"]


def fail(message: str, code: int = 2) -> None:
    click.echo(f"tapio-agent: error: {message}", err=True)
    sys.exit(code)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--plugins", "plugin_list", envvar="TAPIO_LOAD_PLUGINS", metavar="NAMES",
              help="Comma-separated plugins to load (entry point names, e.g. network,stdout). Default: all installed.")
@click.option("--sink", "sinks", multiple=True, metavar="NAME",
              help="Where occurrences go; repeatable (stdout, file, or any installed sink). "
                   "Default: the sinks --plugins names, else stdout and file.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=".tapio", envvar="TAPIO_DATA_DIR",
              show_default=True, help="Directory for occurrence files (file sink) and agent state.")
@click.option("--ebpf-dir", type=click.Path(path_type=Path, exists=True, file_okay=False),
              help="Directory whose BPF sources and headers replace the installed ones (same file names).")
@click.option("--record", "record_path", type=click.Path(path_type=Path, dir_okay=False),
              help="Also write every raw ring-buffer batch to this file, for `tapio replay`.")
@click.option("--list-plugins", is_flag=True, help="List installed plugins and what they provide, then exit.")
@click.option("--metrics-addr", envvar="TAPIO_METRICS_ADDR", metavar="HOST:PORT",
              help="Serve Prometheus metrics (/metrics) and probes (/healthz, /readyz) on [HOST:]PORT; a port "
                   "alone binds loopback (9464 = 127.0.0.1:9464). Default: off.")
@config_options
@click.option("-v", "--verbose", count=True, help="More log output on stderr (-v info, -vv debug).")
def main(plugin_list, sinks, data_dir, ebpf_dir, record_path, list_plugins, metrics_addr, config_path, assignments,
         verbose) -> None:
    """Observe this node's kernel with eBPF and emit anomalies as occurrences.

    Needs root (or CAP_BPF and CAP_PERFMON). Stops cleanly on SIGINT/SIGTERM,
    flushing sinks and detaching its programs.
    """
    configure_logging(verbose)
    tune_malloc()
    try:
        plugins = load_plugins(parse_plugin_list(plugin_list) or None)
    except PluginError as exc:
        fail(str(exc))
    if list_plugins:
        from tapio_core.render import console, print_plugins  # rich only for this listing

        print_plugins(plugins, console())
        return
    if not can_load_bpf():
        fail("loading BPF programs needs root or CAP_BPF+CAP_PERFMON; run with sudo")
    # Only found, not imported: bcc (and LLVM) run in the compile helpers, never in this process.
    if importlib.util.find_spec("bcc") is None:
        fail("bcc's Python module is missing: install python3-bpfcc (`make setup` does)")
    if not plugins.observers:
        fail("no observer plugin is loaded (see `tapio-agent --list-plugins`)")
    clock = KernelClock()
    try:
        settings = load_settings(config_path, assignments)
        pipeline = Pipeline.build(plugins, sinks or default_sinks(plugins, plugin_list),
                                  SinkOptions(data_dir=data_dir), settings, clock)
    except (ConfigError, SinkError) as exc:
        fail(str(exc))
    try:
        recorder = RecordWriter(record_path, clock.offset_ns) if record_path else None
    except OSError as exc:
        fail(f"cannot write the recording {record_path}: {exc.strerror or exc}")
    agent = Agent(plugins, pipeline, recorder, data_dir=data_dir, settings=settings)
    metrics = None
    if metrics_addr:
        from tapio_core.metrics import MetricsServer, parse_address

        try:
            metrics = MetricsServer(agent, parse_address(metrics_addr))
        except ConfigError as exc:
            pipeline.close()
            fail(str(exc))
    signal.signal(signal.SIGTERM, agent.stop)
    signal.signal(signal.SIGINT, agent.stop)
    try:
        agent.load(ebpf_dir, meanwhile=pipeline.start_enrichers)  # the enrichers' first list while bcc compiles
    except ConfigError as exc:
        pipeline.close()
        fail(str(exc))
    agent.write_state(running=bool(agent.readers))
    if not agent.readers:
        pipeline.stop_enrichers()
        pipeline.close()
        fail("no observer could be loaded; see the errors above", code=1)
    click.echo(f"tapio-agent: running observers {', '.join(agent.readers)}; "
               f"sinks {', '.join(s.name for s in pipeline.sinks)}; Ctrl-C stops", err=True)
    try:
        agent.run()
    finally:
        if metrics is not None:
            metrics.close()
