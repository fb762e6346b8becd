"""parse -> detect -> enrich -> emit with throwaway plugins: dispatch, enrichment, sink isolation."""

from pathlib import Path

import attrs
import numpy as np
import pytest

from tapio_core import Anomaly, Context, EnricherSpec, ObserverSpec, RunningObserver, SinkSpec, hookimpl
from tapio_core.config import ConfigError
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkError, SinkOptions

RECORD = np.dtype([("timestamp_ns", "<u8"), ("value", "<u8")], align=True)


@attrs.frozen
class ToyConfig:
    limit: int = attrs.field(default=10, validator=attrs.validators.ge(0))


class ToyObserver:
    """Flags records whose value exceeds the observer's configured limit."""

    def __init__(self, name):
        self.name = name
        self.batches = []

    @hookimpl
    def tapio_register_observers(self, register):
        register(ObserverSpec(name=self.name, bpf_source=Path("none.bpf.c"), record_dtype=RECORD, tracepoints=(),
                              config_type=ToyConfig))

    @hookimpl
    def tapio_detect_anomalies(self, observer, events):
        self.batches.append(len(events))
        observer.state["seen"] = observer.state.get("seen", 0) + len(events)
        big = events[events["value"] > observer.config.limit]
        return [Anomaly(type=f"kernel.{self.name}.big", timestamp_ns=int(e["timestamp_ns"]), severity="warning",
                        outcome="failure", data={"value": int(e["value"])}) for e in big]


class ListSink:
    def __init__(self, name, fail=False):
        self.name, self.fail, self.received, self.events = name, fail, [], []

    @hookimpl
    def tapio_register_sinks(self, register):
        register(SinkSpec(name=self.name))

    @hookimpl
    def tapio_sink_open(self, sink):
        if sink.name != self.name:
            return
        self.events.append("open")
        sink.state["opened"] = True

    @hookimpl
    def tapio_sink_emit(self, sink, occurrences):
        if self.fail:
            raise OSError("disk on fire")
        self.received.extend(occurrences)

    @hookimpl
    def tapio_sink_close(self, sink):
        self.events.append("close")


def records(*pairs):
    return np.array(list(pairs), dtype=RECORD).tobytes()


def build(plugins_extra, sink_names, settings=None):
    loaded = load_plugins(allow=set(), extra=plugins_extra)
    return Pipeline.build(loaded, sink_names, SinkOptions(data_dir=Path("/nonexistent")), settings or {},
                          KernelClock(offset_ns=1_764_000_000_000_000_000))


def test_detect_and_emit_through_the_hooks():
    toy, sink = ToyObserver("toy"), ListSink("list")
    pipeline = build([("toy", toy), ("list", sink)], ["list"], settings={"toy": {"limit": 5}})
    emitted = pipeline.ingest("toy", records((1_000_000, 3), (2_000_000, 7), (3_000_000, 50)))
    assert [o.data["value"] for o in emitted] == [7, 50]
    assert sink.received == emitted
    first = emitted[0]
    assert first.type == "kernel.toy.big"
    assert first.data["timestamp_ns"] == 2_000_000
    assert first.timestamp.isoformat() == "2025-11-24T16:00:00.002000+00:00"
    assert pipeline.observers["toy"].state["seen"] == 3
    assert (pipeline.observers["toy"].records, pipeline.observers["toy"].anomalies) == (3, 2)
    assert sink.events == ["open"]
    pipeline.close()
    assert sink.events == ["open", "close"]


def test_tapio_detect_anomalies_reaches_only_the_owning_plugin():
    a, b, sink = ToyObserver("a"), ToyObserver("b"), ListSink("list")
    pipeline = build([("a", a), ("b", b), ("list", sink)], ["list"])
    pipeline.ingest("b", records((1, 100)))
    assert (a.batches, b.batches) == ([], [1])


def test_tapio_parse_records_can_replace_the_default_view():
    class Parser:
        @hookimpl
        def tapio_parse_records(self, observer, records):
            # e.g. a plugin whose records need decoding: double every value
            events = np.frombuffer(records, RECORD).copy()
            events["value"] *= 2
            return events

    toy, sink = ToyObserver("toy"), ListSink("list")
    loaded = load_plugins(allow=set(), extra=[("toy", toy), ("list", sink)])
    loaded.pm.register(Parser(), name="toy-parser")
    # Parsing is the observer's plugin's business: another plugin's parser is not consulted...
    pipeline = Pipeline(loaded, [RunningObserver(spec=loaded.observers["toy"][1], plugin_name="toy",
                                                 config=ToyConfig())],
                        Pipeline.open_sinks(loaded, ["list"], SinkOptions(data_dir=Path(".")), {}), KernelClock(0))
    assert [o.data["value"] for o in pipeline.ingest("toy", records((1, 6)))] == []
    # ...while the owning plugin's is.
    loaded.pm.unregister(name="toy-parser")
    toy.tapio_parse_records = Parser().tapio_parse_records
    loaded.pm.unregister(toy)
    loaded.pm.register(toy, name="toy")
    pipeline = Pipeline(loaded, [RunningObserver(spec=loaded.observers["toy"][1], plugin_name="toy",
                                                 config=ToyConfig())],
                        pipeline.sinks, KernelClock(0))
    assert [o.data["value"] for o in pipeline.ingest("toy", records((1, 6)))] == [12]


class NodeEnricher:
    """Names the node; ``fail`` makes it raise, ``disable`` makes it opt out at start."""

    def __init__(self, name, fail=False, disable=False):
        self.name, self.fail, self.disable, self.calls = name, fail, disable, []

    @hookimpl
    def tapio_register_enrichers(self, register):
        register(EnricherSpec(name=self.name))

    @hookimpl
    def tapio_enricher_start(self, enricher):
        self.calls.append("start")
        if self.disable:
            enricher.status, enricher.status_reason = "disabled", "not on a cluster"

    @hookimpl
    def tapio_enrich_occurrence(self, enricher, occurrence):
        if self.fail:
            raise RuntimeError("api down")
        occurrence.context = Context(node=f"node-of-{enricher.name}")

    @hookimpl
    def tapio_enricher_stop(self, enricher):
        self.calls.append("stop")


def test_tapio_enrich_occurrence_adds_context_once_started(caplog):
    toy, sink, node = ToyObserver("toy"), ListSink("list"), NodeEnricher("k8s")
    pipeline = build([("toy", toy), ("list", sink), ("k8s", node)], ["list"])
    [unenriched] = pipeline.ingest("toy", records((1, 100)))  # not started (as in replay): no context
    assert unenriched.context is None
    pipeline.start_enrichers()
    [occurrence] = pipeline.ingest("toy", records((2, 100)))
    assert occurrence.context == Context(node="node-of-k8s")
    pipeline.stop_enrichers()
    assert node.calls == ["start", "stop"]


def test_tapio_enricher_start_may_disable_and_a_failing_enricher_loses_nothing(caplog):
    toy, sink = ToyObserver("toy"), ListSink("list")
    off, broken = NodeEnricher("off", disable=True), NodeEnricher("broken", fail=True)
    pipeline = build([("toy", toy), ("list", sink), ("off", off), ("broken", broken)], ["list"])
    pipeline.start_enrichers()
    assert {e.name: e.status for e in pipeline.enrichers} == {"off": "disabled", "broken": "running"}
    [occurrence] = pipeline.ingest("toy", records((1, 100)))
    assert occurrence.context is None  # "off" never ran; "broken" raised
    assert "enricher broken: " in caplog.text and "raised in tapio_enrich_occurrence: api down" in caplog.text
    assert pipeline.enrichers[1].counters == {"errors": 1}


def test_tapio_sink_emit_failure_is_isolated_to_that_sink(caplog):
    toy, good, bad = ToyObserver("toy"), ListSink("good"), ListSink("bad", fail=True)
    pipeline = build([("toy", toy), ("good", good), ("bad", bad)], ["bad", "good"])
    pipeline.ingest("toy", records((1, 100), (2, 200)))
    assert len(good.received) == 2
    counts = {s.name: (s.delivered, s.failed) for s in pipeline.sinks}
    assert counts == {"good": (2, 0), "bad": (0, 2)}
    assert "sink bad: 2 occurrence(s) not delivered: plugin bad raised in tapio_sink_emit: disk on fire" in caplog.text


class RaisingObserver(ToyObserver):
    """Raises in parse for batches of one record and in detect for the others."""

    @hookimpl
    def tapio_parse_records(self, observer, records):
        if len(records) == RECORD.itemsize:
            raise ValueError("cannot parse")
        return None

    @hookimpl
    def tapio_detect_anomalies(self, observer, events):
        raise KeyError("no such kind")


def test_a_plugin_raising_in_any_hook_is_counted_per_plugin_and_hook_and_logged_once_a_minute(caplog, monkeypatch):
    import tapio_core.pipeline

    now = [1000.0]
    monkeypatch.setattr(tapio_core.pipeline.time, "monotonic", lambda: now[0])
    toy, raising, broken = ToyObserver("toy"), RaisingObserver("raising"), NodeEnricher("broken", fail=True)
    sink, bad = ListSink("good"), ListSink("bad", fail=True)
    pipeline = build([("toy", toy), ("raising", raising), ("good", sink), ("bad", bad), ("broken", broken)],
                     ["good", "bad"])
    pipeline.start_enrichers()
    for _ in range(5):
        assert pipeline.ingest("raising", records((1, 100))) == []  # parse raised: dropped
        assert pipeline.ingest("raising", records((1, 100), (2, 100))) == []  # detect raised: dropped
        assert len(pipeline.ingest("toy", records((1, 100), (2, 5)))) == 1  # the others go on
    assert pipeline.plugin_errors.counts == {
        ("raising", "tapio_parse_records"): 5, ("raising", "tapio_detect_anomalies"): 5,
        ("broken", "tapio_enrich_occurrence"): 5, ("bad", "tapio_sink_emit"): 5}
    assert pipeline.observers["raising"].dropped_batches == 10 and pipeline.observers["toy"].dropped_batches == 0
    assert len(sink.received) == 5  # enriched or not, every occurrence reached the working sink
    logged = [r.getMessage() for r in caplog.records if "its errors are counted" in r.getMessage()]
    assert len(logged) == 3  # one per plugin in the first minute
    now[0] += 61
    pipeline.ingest("raising", records((1, 100)))
    assert len([r for r in caplog.records if "its errors are counted" in r.getMessage()]) == 4


def test_tapio_sink_open_unknown_sink_is_a_clear_error():
    with pytest.raises(SinkError, match="unknown sink 'nope'"):
        build([("toy", ToyObserver("toy")), ("list", ListSink("list"))], ["nope"])


def test_settings_reach_the_observer_and_bad_ones_name_the_key():
    toy, sink = ToyObserver("toy"), ListSink("list")
    assert build([("toy", toy), ("list", sink)], ["list"]).observers["toy"].config == ToyConfig(limit=10)
    with pytest.raises(ConfigError, match=r"config \[toy\]: 'limit' must be >= 0: -1"):
        build([("toy", toy), ("list", sink)], ["list"], settings={"toy": {"limit": -1}})
    with pytest.raises(ConfigError, match=r"config \[toy\]: unknown key limt \(known: limit\)"):
        build([("toy", toy), ("list", sink)], ["list"], settings={"toy": {"limt": 1}})
    with pytest.raises(ConfigError, match=r"config \[list\]: this plugin takes no settings"):
        build([("toy", toy), ("list", sink)], ["list"], settings={"list": {"x": 1}})
    with pytest.raises(ConfigError, match=r"config \[tyo\]: no loaded observer, enricher or sink has that name"):
        build([("toy", toy), ("list", sink)], ["list"], settings={"tyo": {}})


def test_tapio_observer_stopping_hands_over_pending_anomalies():
    class Episodes(ToyObserver):
        @hookimpl
        def tapio_observer_stopping(self, observer):
            return [Anomaly(type="kernel.toy.episode", timestamp_ns=5, severity="warning", outcome="in_progress",
                            data={"open": True})]

    sink = ListSink("list")
    pipeline = build([("toy", Episodes("toy")), ("list", sink)], ["list"])
    [occurrence] = pipeline.finish("toy")
    assert (occurrence.type, occurrence.outcome) == ("kernel.toy.episode", "in_progress")
    assert sink.received == [occurrence]
    assert pipeline.observers["toy"].anomalies == 1


def test_partial_trailing_record_is_dropped_and_counted(caplog):
    toy, sink = ToyObserver("toy"), ListSink("list")
    pipeline = build([("toy", toy), ("list", sink)], ["list"])
    pipeline.ingest("toy", records((1, 100)) + b"\x01\x02\x03")
    assert len(sink.received) == 1
    assert pipeline.observers["toy"].malformed == 1


def test_same_records_give_the_same_occurrences():
    toy, sink = ToyObserver("toy"), ListSink("list")
    batch = records((1_000, 100), (2_000, 200))
    first = [o.to_json() for o in build([("toy", toy), ("list", sink)], ["list"]).ingest("toy", batch)]
    second = [o.to_json() for o in build([("toy", toy), ("list", sink)], ["list"]).ingest("toy", batch)]
    assert first == second
    assert len({o for o in first}) == 2
