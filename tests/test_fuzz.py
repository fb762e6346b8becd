"""Bad input found by machine: hypothesis feeds every reader Tapio has with what its authors did not think of.

Each property is the same promise: no crash -- a clear one-line error, or a skip that is counted.
The strategies live here so CI runs them; the profile is derandomized, so a CI run is repeatable
(``TAPIO_FUZZ_EXAMPLES`` raises the number of examples for a longer local search).
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tapio_core.cli import cli
from tapio_core.config import ConfigError, load_settings
from tapio_core.http_transport import Reply
from tapio_core.occurrence import OUTCOMES, SEVERITIES, Context, Entity, Error, KernelClock, Occurrence
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.recording import MAGIC, VERSION, RecordedBatch, RecordingError, RecordWriter, read_recording
from tapio_core.sink import SinkOptions

settings.register_profile("tapio", derandomize=True, max_examples=int(os.environ.get("TAPIO_FUZZ_EXAMPLES", 150)),
                          deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                HealthCheck.function_scoped_fixture])
settings.load_profile("tapio")

OBSERVERS = ("network", "container", "storage", "pmc")


@pytest.fixture(scope="module")
def pipeline():
    plugins = load_plugins({*OBSERVERS, "collect"}, extra=[("collect", Collect())])
    built = Pipeline.build(plugins, ["collect"], SinkOptions(data_dir=Path("/nonexistent")), {},
                           KernelClock(offset_ns=1_700_000_000_000_000_000))
    yield built
    built.close()


class Collect:
    """A sink that keeps nothing: only that emitting never raises matters here."""

    from tapio_core import hookimpl

    @hookimpl
    def tapio_register_sinks(self, register):
        from tapio_core import SinkSpec

        register(SinkSpec(name="collect", description="drops occurrences"))

    @hookimpl
    def tapio_sink_emit(self, sink, occurrences):
        for occurrence in occurrences:
            occurrence.to_json()


@pytest.mark.parametrize("observer", OBSERVERS)
@given(data=st.data())
def test_any_whole_records_are_parsed_and_judged_without_a_crash(pipeline, observer, data):
    """Whatever the ring holds (kinds, families, sizes, counters no kernel wrote), parse and detect go
    through: a batch that raised would be dropped by the agent with every good record in it."""
    size = pipeline.observers[observer].spec.record_dtype.itemsize
    count = data.draw(st.integers(min_value=0, max_value=8))
    records = data.draw(st.binary(min_size=size * count, max_size=size * count))
    pipeline.ingest(observer, records)
    assert pipeline.plugin_errors.counts == {}  # the pipeline counts a raising hook and goes on: none may


@pytest.mark.parametrize("observer", OBSERVERS)
@given(data=st.data())
def test_a_truncated_or_oversized_batch_keeps_its_whole_records_and_counts_the_rest(pipeline, observer, data):
    running = pipeline.observers[observer]
    size = running.spec.record_dtype.itemsize
    count = data.draw(st.sampled_from([0, 1, 3, 2048]))  # 2048: far more than one drain usually holds
    tail = data.draw(st.integers(min_value=0, max_value=size - 1))
    seed = data.draw(st.binary(min_size=size, max_size=size))
    records, before, malformed = seed * count + seed[:tail], running.records, running.malformed
    pipeline.ingest(observer, records)
    assert pipeline.plugin_errors.counts == {}
    assert running.records - before == count
    assert running.malformed - malformed == (1 if tail else 0)


@given(tail=st.binary(max_size=256), cut=st.integers(min_value=0, max_value=200))
def test_a_corrupted_recording_reads_whole_frames_or_is_one_error(tmp_path_factory, tail, cut):
    path = tmp_path_factory.mktemp("rec") / "rec"
    writer = RecordWriter(path, 1)
    writer.write_batch("network", 8, 2, b"\0" * 16)
    writer.close()
    data = path.read_bytes()
    path.write_bytes(data[: max(len(MAGIC) + 2, len(data) - cut)] + tail)
    try:
        items = list(read_recording(path))
    except RecordingError as exc:
        assert "\n" not in str(exc)
        return
    assert all(isinstance(item, int | RecordedBatch) for item in items)


@given(content=st.binary(max_size=300))
def test_any_bytes_as_a_recording_are_read_or_refused_in_one_line(tmp_path_factory, content):
    path = tmp_path_factory.mktemp("rec") / "rec"
    path.write_bytes(MAGIC + VERSION.to_bytes(2, "little") + content if content[:1] == b"\1" else content)
    try:
        list(read_recording(path))
    except RecordingError as exc:
        assert "\n" not in str(exc)


TOML_KEYS = st.sampled_from(["network", "container", "storage", "pmc", "stdout", "file", "http", "otlp",
                             "kubernetes", "nonsense"])
TOML_VALUES = st.recursive(
    st.one_of(st.integers(min_value=-2**63, max_value=2**63 - 1), st.floats(allow_nan=False, allow_infinity=False),
              st.booleans(), st.text(max_size=20)),
    lambda inner: st.lists(inner, max_size=3), max_leaves=6)


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return repr(value)


@given(tables=st.dictionaries(TOML_KEYS, st.dictionaries(st.from_regex(r"[a-z_]{1,20}", fullmatch=True),
                                                         TOML_VALUES, max_size=4), max_size=4))
def test_any_settings_file_loads_or_is_one_clear_error(tmp_path_factory, tables):
    path = tmp_path_factory.mktemp("cfg") / "tapio.toml"
    path.write_text("".join(f"[{name}]\n" + "".join(f"{key} = {toml_value(value)}\n" for key, value in table.items())
                            for name, table in tables.items()))
    try:
        loaded = load_settings(path, [])
        plugins = load_plugins({*OBSERVERS, "stdout", "file"})
        Pipeline.build(plugins, ["stdout"], SinkOptions(data_dir=path.parent), loaded, KernelClock(offset_ns=0)).close()
    except ConfigError as exc:
        assert "\n" not in str(exc).strip()


@given(raw=st.binary(max_size=2000))
def test_any_bytes_in_an_occurrence_file_are_read_or_skipped_by_the_cli(tmp_path_factory, raw):
    data_dir = tmp_path_factory.mktemp("data")
    (data_dir / "occurrences").mkdir(mode=0o700)
    (data_dir / "occurrences" / "occurrences-20261203T000000Z.jsonl").write_bytes(raw)
    for command in (["recent", "--since", "100000d"], ["health"], ["status"]):
        result = CliRunner().invoke(cli, [*command, "--data-dir", str(data_dir)])
        assert result.exception is None or isinstance(result.exception, SystemExit), (command, result.output)
        assert "Traceback" not in result.output


# -- the remote sinks' encoders -------------------------------------------------------------------

TEXT = st.text(max_size=40)  # any code points, lone surrogates aside (occurrences are JSON text)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | TEXT
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=12)
ENTITIES = st.builds(Entity, kind=st.sampled_from(["pod", "container", "deployment", "job", "node"]) | TEXT,
                     id=TEXT, name=TEXT)
OCCURRENCES = st.builds(
    Occurrence,
    id=st.text(alphabet="0123456789ABCDEFGHJKMNPQRSTVWXYZ", min_size=26, max_size=26),
    timestamp=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))
    .map(lambda when: when.replace(microsecond=when.microsecond // 1000 * 1000)),  # the protocol's milliseconds
    type=TEXT, severity=st.sampled_from(SEVERITIES), outcome=st.sampled_from(OUTCOMES),
    error=st.none() | st.builds(Error, code=TEXT, message=TEXT),
    context=st.none() | st.builds(Context, node=st.none() | TEXT, namespace=st.none() | TEXT,
                                  entities=st.lists(ENTITIES, max_size=4)),
    data=st.dictionaries(TEXT, JSON_VALUES, max_size=6),
)


@given(batch=st.lists(OCCURRENCES, min_size=1, max_size=5), host=TEXT)
def test_any_occurrences_encode_to_an_otlp_request_that_decodes_to_them(batch, host):
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    from tapio_sink_otlp.encode import OtlpLogs

    encoder = OtlpLogs(host)
    items = [encoder.encode(occurrence) for occurrence in batch]
    assert all(size > 0 for _, size in items)
    request = ExportLogsServiceRequest.FromString(encoder.body([item for item, _ in items]))
    bodies = [record.body.string_value for resource in request.resource_logs for scope in resource.scope_logs
              for record in scope.log_records]
    assert sorted(bodies) == sorted(occurrence.to_json() for occurrence in batch)


@given(body=st.binary(max_size=300), content_type=st.sampled_from(["application/json", "application/x-protobuf",
                                                                    "text/html", ""]),
       sent=st.integers(min_value=0, max_value=1000))
def test_any_answer_to_an_otlp_export_is_read_as_a_count_of_refusals_within_what_was_sent(body, content_type, sent):
    from tapio_sink_otlp.encode import OtlpLogs

    refused, message = OtlpLogs("node").rejected(Reply(200, {"Content-Type": content_type}, body), sent)
    assert 0 <= refused <= sent and isinstance(message, str)


@given(batch=st.lists(OCCURRENCES, min_size=1, max_size=5))  # the sink never sends an empty batch
def test_any_occurrences_encode_to_a_json_array_the_protocol_reads_back(batch):
    from tapio_sink_http import JsonArray

    encoder = JsonArray()
    items = [encoder.encode(occurrence) for occurrence in batch]
    body = encoder.body([item for item, _ in items])
    assert sum(size for _, size in items) >= len(body) - 1  # the batch bound counts every byte but one bracket
    assert [Occurrence.from_json(json.dumps(item)) for item in json.loads(body)] == batch
