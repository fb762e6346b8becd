"""parse -> detect -> enrich -> emit: the one path both the agent and replay run."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from tapio_core.config import ConfigError, build_settings, split_ring_pages
from tapio_core.enricher import RunningEnricher
from tapio_core.observer import Anomaly, RunningObserver
from tapio_core.occurrence import Error, KernelClock, Occurrence, occurrence_id
from tapio_core.plugins import LoadedPlugins
from tapio_core.sink import RunningSink, SinkError, SinkOptions

log = logging.getLogger("tapio.pipeline")

#: A plugin raising again and again is logged (with its traceback) at most this often; every error is counted.
PLUGIN_ERROR_LOG_INTERVAL_S = 60.0


class PluginErrors:
    """What plugins' per-batch hooks raised, counted by (plugin, hook): the rest of the batch, the other
    plugins and the agent go on. ``tapio status`` and ``/metrics`` show the counts."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self._logged_at: dict[str, float] = {}

    def record(self, plugin: str, hook: str, what: str, exc: BaseException) -> None:
        """Count one error; call it where ``exc`` was caught. Expected failures (SinkError) log no traceback."""
        self.counts[plugin, hook] = self.counts.get((plugin, hook), 0) + 1
        now = time.monotonic()
        last = self._logged_at.get(plugin)
        if last is not None and now - last < PLUGIN_ERROR_LOG_INTERVAL_S:
            return
        self._logged_at[plugin] = now
        log.error("%s: plugin %s raised in %s: %s (its errors are counted; logged at most once a minute)", what,
                  plugin, hook, exc, exc_info=not isinstance(exc, SinkError))


class Pipeline:
    """Runs batches of raw records from named observers through the plugins.

    Per batch, parse and detect reach only the observer's own plugin; per
    occurrence, enrichment reaches every plugin; per batch, each sink gets one
    emit on its own plugin, isolated from the others' failures.
    """

    def __init__(
        self,
        plugins: LoadedPlugins,
        observers: Iterable[RunningObserver],
        sinks: Iterable[RunningSink],
        clock: KernelClock,
        enrichers: Iterable[RunningEnricher] = (),
    ) -> None:
        self.plugins = plugins
        self.clock = clock
        self.observers = {obs.name: obs for obs in observers}
        self.sinks = list(sinks)
        self.plugin_errors = PluginErrors()
        self.enrichers = list(enrichers)
        self._parse = {}
        self._detect = {}
        for obs in self.observers.values():
            self._parse[obs.name] = plugins.hook_for("tapio_parse_records", obs.plugin_name)
            self._detect[obs.name] = plugins.hook_for("tapio_detect_anomalies", obs.plugin_name)
        self._emit = {id(s): plugins.hook_for("tapio_sink_emit", s.plugin_name) for s in self.sinks}
        self._enrich = {id(e): plugins.hook_for("tapio_enrich_occurrence", e.plugin_name) for e in self.enrichers}

    @classmethod
    def build(
        cls,
        plugins: LoadedPlugins,
        sink_names: Iterable[str],
        options: SinkOptions,
        settings: dict[str, Any],
        clock: KernelClock,
        with_enrichers: bool = True,
    ) -> Pipeline:
        """Every loaded observer and enricher and the chosen sinks, configured from ``settings``; sinks opened.

        Enrichers are configured here but started by the agent (``start_enrichers``).
        Raises ConfigError or SinkError with one line for the user.
        """
        unknown = sorted(set(settings) - set(plugins.observers) - set(plugins.sinks) - set(plugins.enrichers))
        if unknown:
            raise ConfigError(f"config [{unknown[0]}]: no loaded observer, enricher or sink has that name")
        observers = []
        for name, (plugin, spec) in plugins.observers.items():
            ring_pages, own = split_ring_pages(name, settings)
            observers.append(RunningObserver(spec=spec, plugin_name=plugin, ring_pages=ring_pages,
                                             config=build_settings(spec.config_type, name, own)))
        enrichers = [
            RunningEnricher(spec=spec, plugin_name=plugin, config=build_settings(spec.config_type, name, settings))
            for name, (plugin, spec) in plugins.enrichers.items()
        ] if with_enrichers else []
        sinks = cls.open_sinks(plugins, sink_names, options, settings)
        return cls(plugins, observers, sinks, clock, enrichers)

    def start_enrichers(self) -> None:
        """Start every enricher; one that fails is reported and left out, the others run.

        A ConfigError (a setting the user must fix) is raised, to stop start-up with one line.
        """
        for enricher in self.enrichers:
            try:
                self.plugins.hook_for("tapio_enricher_start", enricher.plugin_name)(enricher=enricher)
            except ConfigError:
                raise
            except Exception as exc:
                enricher.status, enricher.status_reason = "failed", f"{type(exc).__name__}: {exc}"
                log.error("enricher %s failed to start: %s", enricher.name, enricher.status_reason)
            else:
                if enricher.status == "starting":
                    enricher.status = "running"

    def stop_enrichers(self) -> None:
        for enricher in self.enrichers:
            if enricher.status in ("starting", "failed"):
                continue
            try:
                self.plugins.hook_for("tapio_enricher_stop", enricher.plugin_name)(enricher=enricher)
            except Exception as exc:
                log.error("enricher %s failed to stop cleanly: %s", enricher.name, exc)

    @staticmethod
    def open_sinks(
        plugins: LoadedPlugins, names: Iterable[str], options: SinkOptions, settings: dict[str, Any]
    ) -> list[RunningSink]:
        """Open the chosen sinks; raises SinkError or ConfigError (one line) when one cannot work."""
        opened: list[RunningSink] = []
        for name in dict.fromkeys(names):  # a sink named twice is opened once
            if name not in plugins.sinks:
                available = ", ".join(sorted(plugins.sinks)) or "none"
                raise SinkError(f"unknown sink {name!r} (installed and loaded: {available})")
            plugin_name, spec = plugins.sinks[name]
            sink = RunningSink(spec=spec, options=options, plugin_name=plugin_name,
                               config=build_settings(spec.config_type, name, settings))
            plugins.hook_for("tapio_sink_open", plugin_name)(sink=sink)
            opened.append(sink)
        return opened

    def ingest(self, observer_name: str, records: bytes) -> list[Occurrence]:
        """Run one batch of raw records; returns the occurrences emitted."""
        observer = self.observers[observer_name]
        hook = "tapio_parse_records"
        try:
            events = self.parse(observer, records)
            observer.records += len(events)
            hook = "tapio_detect_anomalies"
            anomalies = [a for found in self._detect[observer_name](observer=observer, events=events) if found
                         for a in found]
        except Exception as exc:
            observer.dropped_batches += 1
            self.plugin_errors.record(observer.plugin_name, hook,
                                      f"observer {observer_name}: a batch of {len(records)} bytes dropped", exc)
            return []
        return self._emit_anomalies(observer, anomalies)

    def _emit_anomalies(self, observer: RunningObserver, anomalies: list[Anomaly]) -> list[Occurrence]:
        if not anomalies:
            return []
        observer.anomalies += len(anomalies)
        by_type = observer.anomalies_by_type
        for anomaly in anomalies:
            by_type[anomaly.type] = by_type.get(anomaly.type, 0) + 1
        occurrences = [self.occurrence(a) for a in anomalies]
        active = [e for e in self.enrichers if e.status not in ("starting", "failed", "disabled")]
        for enricher in active:
            for occurrence in occurrences:
                self.enrich(enricher, occurrence)
        self.emit(occurrences)
        return occurrences

    def finish(self, observer_name: str) -> list[Occurrence]:
        """Emit what the observer's detector still holds (open episodes) at shutdown or end of replay."""
        observer = self.observers[observer_name]
        hook = self.plugins.hook_for("tapio_observer_stopping", observer.plugin_name)
        try:
            anomalies = [a for found in hook(observer=observer) if found for a in found]
        except Exception:
            log.exception("observer %s failed to hand over its pending anomalies", observer_name)
            return []
        return self._emit_anomalies(observer, anomalies)

    def parse(self, observer: RunningObserver, records: bytes) -> np.ndarray:
        dtype = observer.spec.record_dtype
        usable = len(records) - len(records) % dtype.itemsize
        if usable != len(records):
            observer.malformed += 1
            log.warning("%s: dropped %d trailing bytes of a partial record", observer.name, len(records) - usable)
            records = records[:usable]
        events = self._parse[observer.name](observer=observer, records=records)
        if events is None:
            events = np.frombuffer(records, dtype=dtype)
        return events

    def occurrence(self, anomaly: Anomaly) -> Occurrence:
        wall_ns = self.clock.wall_ns(anomaly.timestamp_ns)
        if anomaly.fingerprint is not None:
            fingerprint = anomaly.type.encode() + anomaly.fingerprint
        else:
            fingerprint = json.dumps([anomaly.type, anomaly.timestamp_ns, anomaly.data], sort_keys=True,
                                     default=str).encode()
        error = None
        if anomaly.error_code is not None:
            error = Error(code=anomaly.error_code, message=anomaly.error_message or "")
        return Occurrence(
            id=occurrence_id(wall_ns, fingerprint),
            timestamp=wall_time_ms(wall_ns),
            type=anomaly.type,
            severity=anomaly.severity,
            outcome=anomaly.outcome,
            error=error,
            data=dict(anomaly.data, timestamp_ns=anomaly.timestamp_ns),
        )

    def enrich(self, enricher: RunningEnricher, occurrence: Occurrence) -> None:
        try:
            self._enrich[id(enricher)](enricher=enricher, occurrence=occurrence)
        except Exception as exc:
            enricher.counters["errors"] = enricher.counters.get("errors", 0) + 1
            self.plugin_errors.record(enricher.plugin_name, "tapio_enrich_occurrence",
                                      f"enricher {enricher.name}: {occurrence.id} emitted without it", exc)

    def emit(self, occurrences: list[Occurrence]) -> None:
        for sink in self.sinks:
            try:
                self._emit[id(sink)](sink=sink, occurrences=occurrences)
            except Exception as exc:
                sink.failed += len(occurrences)
                self.plugin_errors.record(sink.plugin_name, "tapio_sink_emit",
                                          f"sink {sink.name}: {len(occurrences)} occurrence(s) not delivered", exc)
            else:
                if not sink.spec.delivers_later:
                    sink.delivered += len(occurrences)

    def close(self) -> None:
        """Close every sink at once: each may spend its own flush deadline, not one after another."""

        def close_one(sink: RunningSink) -> None:
            try:
                self.plugins.hook_for("tapio_sink_close", sink.plugin_name)(sink=sink)
            except Exception as exc:
                log.error("sink %s failed to close cleanly: %s", sink.name, exc)

        if len(self.sinks) <= 1:
            for sink in self.sinks:
                close_one(sink)
            return
        with ThreadPoolExecutor(max_workers=len(self.sinks), thread_name_prefix="tapio-sink-close") as pool:
            list(pool.map(close_one, self.sinks))


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def wall_time_ms(wall_ns: int) -> datetime:
    """Wall-clock nanoseconds as a UTC datetime truncated to milliseconds (integer maths, no float rounding)."""
    return _EPOCH + timedelta(milliseconds=wall_ns // 1_000_000)
