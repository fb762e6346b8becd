"""The http sink as the agent and `tapio replay` use it: found by entry point, configured, isolated from other sinks."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from click.testing import CliRunner
from http_servers import Receiver, free_port
from network_records import pack_network_record

from tapio_core.cli import cli
from tapio_core.config import ConfigError
from tapio_core.occurrence import Context, Entity, Error, KernelClock, Occurrence
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.recording import RecordWriter
from tapio_core.sink import SinkError, SinkOptions
from tapio_observer_network.records import KIND_CONNECT_REFUSED, KIND_CONNECT_TIMEOUT, NETWORK_RECORD

QUICK = {"batch_max_age_s": 0.05, "backoff_initial_s": 0.01, "backoff_max_s": 0.05}


def occurrence(n: int) -> Occurrence:
    return Occurrence(
        id=f"01JTESTOCCURRENCE{n:09d}", timestamp=datetime(2026, 5, 6, 7, 8, 9, 123000, tzinfo=UTC),
        type="kernel.network.connection_refused", severity="warning", outcome="failure",
        error=Error(code="ECONNREFUSED", message="connection refused"),
        context=Context(node="node-1", namespace="shop", entities=[Entity(kind="pod", id="uid-1", name="cart-0")]),
        data={"pid": 100 + n, "comm": "curl", "dst_port": 80, "timestamp_ns": 5_000 + n},
    )


def open_pipeline(tmp_path, settings, names=("http",)) -> Pipeline:
    plugins = load_plugins(set(names))
    sinks = Pipeline.open_sinks(plugins, names, SinkOptions(data_dir=tmp_path), settings)
    return Pipeline(plugins, [], sinks, KernelClock(offset_ns=0))


def received_occurrences(receiver: Receiver) -> list[dict]:
    return [item for request in receiver.received for item in json.loads(request.body)]


def test_batches_are_json_arrays_of_occurrences_as_the_protocol_writes_them(tmp_path):
    batch = [occurrence(n) for n in range(5)]
    with Receiver() as receiver:
        pipeline = open_pipeline(tmp_path, {"http": {"endpoint": receiver.url + "/v1/occurrences", **QUICK}})
        pipeline.emit(batch)
        pipeline.close()
    [request] = receiver.received
    assert request.path == "/v1/occurrences"
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["User-Agent"].startswith("tapio/")
    assert "Content-Encoding" not in request.headers  # gzip is opt-in for this sink
    assert json.loads(request.body) == [o.to_dict() for o in batch]
    assert [Occurrence.from_dict(item) for item in json.loads(request.body)] == batch
    [sink] = pipeline.sinks
    assert sink.counters == {"emitted": 5, "delivered": 5, "failed": 0, "dropped": 0, "retried": 0}


def test_gzip_and_batch_size_come_from_the_settings(tmp_path):
    with Receiver() as receiver:
        pipeline = open_pipeline(tmp_path, {"http": {"endpoint": receiver.url, "gzip": True, "batch_max_count": 4,
                                                     **QUICK}})
        pipeline.emit([occurrence(n) for n in range(10)])
        pipeline.close()
    assert [len(json.loads(request.body)) for request in receiver.received] == [4, 4, 2]
    assert {request.headers["Content-Encoding"] for request in receiver.received} == {"gzip"}


def write_recording(path, batches):
    writer = RecordWriter(path, 1_700_000_000_000_000_000)
    for records in batches:
        writer.write_batch("network", NETWORK_RECORD.itemsize, 123, records)
    writer.close()


def test_replay_delivers_the_same_occurrences_as_stdout_prints(tmp_path):
    recording = tmp_path / "rec"
    write_recording(recording, [
        pack_network_record(KIND_CONNECT_REFUSED, ts=1_000_000, dport=81)
        + pack_network_record(KIND_CONNECT_TIMEOUT, ts=2_000_000, dport=82),
        pack_network_record(KIND_CONNECT_REFUSED, ts=3_000_000, dport=83),
    ])
    runner = CliRunner()
    printed = runner.invoke(cli, ["replay", str(recording), "--plugins", "network,stdout"])
    assert printed.exit_code == 0, printed.output
    with Receiver() as receiver:
        result = runner.invoke(cli, ["replay", str(recording), "--plugins", "network,http", "--sink", "http",
                                     "--set", f"http.endpoint={receiver.url!r}".replace("'", '"')])
    assert result.exit_code == 0, result.output
    expected = [json.loads(line) for line in printed.output.splitlines()]
    assert [item["data"]["dst_port"] for item in expected] == [81, 82, 83]
    assert received_occurrences(receiver) == expected


@pytest.mark.parametrize(("args", "message"), [
    ([], "Error: config [http]: endpoint: required field missing"),
    (["--set", "http.endpoint=localhost"], "Error: config [http]: endpoint must be an http:// or https:// URL"),
    (["--set", 'http.endpoint="http://127.0.0.1:9"', "--set", "http.token_env=TAPIO_TEST_UNSET_TOKEN"],
     "Error: config [http]: token_env: the environment variable TAPIO_TEST_UNSET_TOKEN is not set or empty"),
    (["--set", 'http.endpoint="http://127.0.0.1:9"', "--set", "http.batch_max_age_s=0"],
     "Error: config [http]: 'batch_max_age_s' must be > 0"),
])
def test_a_missing_or_invalid_setting_stops_start_up_with_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.delenv("TAPIO_TEST_UNSET_TOKEN", raising=False)
    recording = tmp_path / "rec"
    write_recording(recording, [pack_network_record(KIND_CONNECT_REFUSED)])
    result = CliRunner().invoke(cli, ["replay", str(recording), "--plugins", "network,http", "--sink", "http", *args])
    assert result.exit_code != 0
    assert result.output.startswith(message)
    assert result.output.count("\n") == 1


def test_a_two_line_token_file_stops_start_up_with_one_line_that_does_not_show_it(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cr3t-first-line\nsecond-line\n")
    recording = tmp_path / "rec"
    write_recording(recording, [pack_network_record(KIND_CONNECT_REFUSED)])
    result = CliRunner().invoke(cli, ["replay", str(recording), "--plugins", "network,http", "--sink", "http",
                                      "--set", 'http.endpoint="https://127.0.0.1:9"',
                                      "--set", f'http.token_file="{token_file}"'])
    assert result.exit_code != 0
    assert result.output == (f"Error: config [http]: token_file: {token_file} holds a line break or another "
                             "character not allowed in an HTTP header: put the token alone on one line\n")


def test_settings_come_from_the_config_file_table_named_after_the_sink(tmp_path):
    with Receiver() as receiver:
        config = tmp_path / "tapio.toml"
        config.write_text(f'[http]\nendpoint = "{receiver.url}/hub"\ngzip = true\nbatch_max_age_s = 0.05\n')
        recording = tmp_path / "rec"
        write_recording(recording, [pack_network_record(KIND_CONNECT_REFUSED)])
        result = CliRunner().invoke(cli, ["replay", str(recording), "--plugins", "network,http", "--sink", "http",
                                          "--config", str(config)])
    assert result.exit_code == 0, result.output
    [request] = receiver.received
    assert (request.path, request.headers["Content-Encoding"]) == ("/hub", "gzip")


def test_open_rejects_an_unknown_key():
    with pytest.raises(ConfigError, match=r"^config \[http\]: unknown key endpont"):
        open_pipeline(None, {"http": {"endpont": "http://127.0.0.1:9"}})


def test_a_slow_sink_never_holds_up_another(tmp_path):
    with Receiver() as slow, Receiver() as fast:
        slow.hold()  # the http endpoint takes requests and answers nothing until released
        pipeline = open_pipeline(tmp_path, {
            "http": {"endpoint": slow.url, "timeout_s": 60, **QUICK},
            "otlp": {"endpoint": fast.url, **QUICK},
        }, names=("http", "otlp"))
        for first in range(0, 30, 10):
            pipeline.emit([occurrence(n) for n in range(first, first + 10)])  # returns although http hangs
        assert slow.wait_for(lambda r: len(r.received) >= 1)
        assert fast.wait_for(lambda r: len(r.received) >= 1 and pipeline.sinks[1].counters["delivered"] == 30)
        assert pipeline.sinks[0].counters["delivered"] == 0  # still waiting on the held endpoint
        slow.release()
        pipeline.close()
    http, otlp = pipeline.sinks
    assert len(received_occurrences(slow)) == 30
    assert http.counters == otlp.counters == {"emitted": 30, "delivered": 30, "failed": 0, "dropped": 0,
                                              "retried": 0}


def test_a_dead_sink_fails_alone(tmp_path):
    with Receiver() as fast:
        pipeline = open_pipeline(tmp_path, {
            "http": {"endpoint": f"http://127.0.0.1:{free_port()}", "max_retries": 1, **QUICK},
            "otlp": {"endpoint": fast.url, **QUICK},
        }, names=("http", "otlp"))
        pipeline.emit([occurrence(n) for n in range(4)])
        pipeline.close()
    http, otlp = pipeline.sinks
    assert http.counters == {"emitted": 4, "delivered": 0, "failed": 4, "dropped": 0, "retried": 1}
    assert otlp.counters == {"emitted": 4, "delivered": 4, "failed": 0, "dropped": 0, "retried": 0}


def test_an_unusable_sink_stops_start_up_before_anything_is_sent(tmp_path, monkeypatch):
    monkeypatch.delenv("TAPIO_TEST_UNSET_TOKEN", raising=False)
    with pytest.raises(SinkError, match=r"^config \[http\]: token_env: the environment variable"):
        open_pipeline(tmp_path, {"http": {"endpoint": "https://127.0.0.1:9", "token_env": "TAPIO_TEST_UNSET_TOKEN"}})


def test_a_token_never_reaches_the_state_the_status_or_the_metrics(tmp_path, monkeypatch):
    from prometheus_client import CollectorRegistry, generate_latest

    from tapio_core.agent import Agent
    from tapio_core.metrics import AgentCollector

    secret = "s3cr3t-bearer-value"
    monkeypatch.setenv("TAPIO_TEST_TOKEN", secret)
    settings = {"http": {"endpoint": "http://127.0.0.1:9/ingest", "token_env": "TAPIO_TEST_TOKEN"}}
    pipeline = open_pipeline(tmp_path, settings)
    agent = Agent(pipeline.plugins, pipeline, recorder=None, data_dir=tmp_path, settings=settings)
    try:
        agent.write_state()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(AgentCollector(agent))
        metrics = generate_latest(registry).decode()
    finally:
        pipeline.close()
    status = CliRunner().invoke(cli, ["status", "--data-dir", str(tmp_path), "--json"])
    assert "TAPIO_TEST_TOKEN" in (tmp_path / "state.json").read_text()  # the variable's name, for the operator
    for text in ((tmp_path / "state.json").read_text(), status.output, metrics):
        assert secret not in text
    assert 'tapio_sink_queue_depth{sink="http"} 0.0' in metrics
    assert json.loads(status.output)["state"]["sinks"]["http"]["queued"] == 0
