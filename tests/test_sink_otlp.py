"""The otlp sink against a receiver that decodes every request with opentelemetry-proto."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta

import pytest
from http_servers import Receiver
from kernel_helpers import closed_tcp_port, run_connects, running_agent
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsPartialSuccess,
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.logs.v1.logs_pb2 import SeverityNumber

import tapio_core
from tapio_core.config import ConfigError
from tapio_core.occurrence import Context, Entity, Error, KernelClock, Occurrence
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions

QUICK = {"batch_max_age_s": 0.05, "backoff_initial_s": 0.01, "backoff_max_s": 0.05}
WHEN = datetime(2026, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
WHEN_NS = 1_778_051_289_123_000_000  # WHEN in Unix nanoseconds, written out


def occurrence(n: int, severity: str = "warning", context: Context | None = None,
               error: Error | None = None) -> Occurrence:
    return Occurrence(id=f"01JOTLPTESTOCCURRENCE{n:05d}", timestamp=WHEN, type="kernel.network.connection_refused",
                      severity=severity, outcome="failure", error=error, context=context,
                      data={"pid": 100 + n, "timestamp_ns": 5_000 + n})


def open_pipeline(tmp_path, **settings) -> Pipeline:
    plugins = load_plugins({"otlp"})
    sinks = Pipeline.open_sinks(plugins, ["otlp"], SinkOptions(data_dir=tmp_path),
                                {"otlp": {**QUICK, "host_name": "worker-7", **settings}})
    return Pipeline(plugins, [], sinks, KernelClock(offset_ns=0))


def export(receiver: Receiver, **settings) -> list[ExportLogsServiceRequest]:
    return [ExportLogsServiceRequest.FromString(request.body) for request in receiver.received]


def unix_ns(timestamp: str) -> int:
    """An occurrence's RFC 3339 timestamp in Unix nanoseconds, in integers."""
    return (datetime.fromisoformat(timestamp) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1) * 1000


def attributes(key_values) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in key_values}


CONTAINER_ID = "0123456789abcdef" * 4  # as the runtime names the container's cgroup


def enriched(pod: str, workload: tuple[str, str] | None = None, namespace: str = "shop") -> Context:
    """A context as tapio_enrich_kubernetes fills it (enrich.py): pod and workload named "namespace/name",
    the container by its name in the pod spec, the workload kind lowercased."""
    entities = [Entity(kind="pod", id=f"uid-{pod}", name=f"{namespace}/{pod}"),
                Entity(kind="container", id=CONTAINER_ID, name="app")]
    if workload is not None:
        kind, name = workload
        entities.append(Entity(kind=kind, id=f"uid-{name}", name=f"{namespace}/{name}"))
    return Context(node="node-1", namespace=namespace, entities=entities)


def test_every_field_of_the_export_request(tmp_path):
    refused = occurrence(1, context=enriched("cart-0", ("statefulset", "cart")),
                         error=Error(code="ECONNREFUSED", message="connection refused"))
    bare = occurrence(2, severity="critical")
    before = time.time_ns()
    with Receiver() as receiver:
        pipeline = open_pipeline(tmp_path, endpoint=receiver.url + "/otlp/")
        pipeline.emit([refused, bare])
        pipeline.close()
    [request] = receiver.received
    assert request.path == "/otlp/v1/logs"
    assert request.headers["Content-Type"] == "application/x-protobuf"
    assert request.headers["Content-Encoding"] == "gzip"  # on by default for OTLP
    [message] = export(receiver)
    assert len(message.resource_logs) == 2  # one per Kubernetes resource
    in_pod, on_host = message.resource_logs
    common = {"service.name": "tapio", "service.version": tapio_core.__version__, "host.name": "worker-7"}
    assert attributes(in_pod.resource.attributes) == {
        **common, "k8s.node.name": "node-1", "k8s.namespace.name": "shop", "k8s.pod.name": "cart-0",
        "k8s.pod.uid": "uid-cart-0", "k8s.container.name": "app", "container.id": CONTAINER_ID,
        "k8s.statefulset.name": "cart", "k8s.statefulset.uid": "uid-cart"}
    assert attributes(on_host.resource.attributes) == common
    for resource_logs, expected in ((in_pod, refused), (on_host, bare)):
        [scope_logs] = resource_logs.scope_logs
        assert (scope_logs.scope.name, scope_logs.scope.version) == ("tapio", tapio_core.__version__)
        [record] = scope_logs.log_records
        assert record.time_unix_nano == WHEN_NS
        assert before <= record.observed_time_unix_nano <= time.time_ns()
        assert record.severity_text == expected.severity
        assert json.loads(record.body.string_value) == expected.to_dict()
    record = in_pod.scope_logs[0].log_records[0]
    assert record.severity_number == SeverityNumber.SEVERITY_NUMBER_WARN
    assert attributes(record.attributes) == {"tapio.type": "kernel.network.connection_refused",
                                             "tapio.id": refused.id, "tapio.outcome": "failure",
                                             "error.type": "ECONNREFUSED"}
    record = on_host.scope_logs[0].log_records[0]
    assert record.severity_number == SeverityNumber.SEVERITY_NUMBER_FATAL
    assert "error.type" not in attributes(record.attributes)
    assert pipeline.sinks[0].counters["delivered"] == 2


@pytest.mark.parametrize(("severity", "number"), [
    ("debug", SeverityNumber.SEVERITY_NUMBER_DEBUG), ("info", SeverityNumber.SEVERITY_NUMBER_INFO),
    ("warning", SeverityNumber.SEVERITY_NUMBER_WARN), ("error", SeverityNumber.SEVERITY_NUMBER_ERROR),
    ("critical", SeverityNumber.SEVERITY_NUMBER_FATAL),
])
def test_severity_numbers(tmp_path, severity, number):
    with Receiver() as receiver:
        pipeline = open_pipeline(tmp_path, endpoint=receiver.url)
        pipeline.emit([occurrence(1, severity=severity)])
        pipeline.close()
    [message] = export(receiver)
    assert message.resource_logs[0].scope_logs[0].log_records[0].severity_number == number


def test_names_are_bare_and_workloads_map_to_their_semantic_conventions(tmp_path):
    contexts = {
        "deployment": enriched("web-7d4b9-x2x", ("deployment", "web")),
        "replicaset": enriched("web-7d4b9-x2x", ("replicaset", "web-7d4b9")),  # its Deployment not known yet
        "daemonset": enriched("agent-q8z", ("daemonset", "agent"), namespace="kube-system"),
        "job": enriched("backup-29-abc", ("job", "backup-29")),
        "cronjob": enriched("backup-29-abc", ("cronjob", "backup")),
        "other owner": enriched("canary-0", ("rollout", "canary")),  # a custom controller: no convention for it
        "bare pod name": Context(namespace="shop", entities=[Entity(kind="pod", id="uid-cart-0", name="cart-0")]),
    }
    batch = [occurrence(n, context=context) for n, context in enumerate(contexts.values())]
    with Receiver() as receiver:
        pipeline = open_pipeline(tmp_path, endpoint=receiver.url)
        pipeline.emit(batch)
        pipeline.close()
    [message] = export(receiver)
    k8s = [{key: value for key, value in attributes(rl.resource.attributes).items() if key.startswith("k8s.")}
           for rl in message.resource_logs]
    pod, container = {"k8s.node.name": "node-1", "k8s.namespace.name": "shop"}, {"k8s.container.name": "app"}
    assert dict(zip(contexts, k8s, strict=True)) == {
        "deployment": {**pod, **container, "k8s.pod.name": "web-7d4b9-x2x", "k8s.pod.uid": "uid-web-7d4b9-x2x",
                       "k8s.deployment.name": "web", "k8s.deployment.uid": "uid-web"},
        "replicaset": {**pod, **container, "k8s.pod.name": "web-7d4b9-x2x", "k8s.pod.uid": "uid-web-7d4b9-x2x",
                       "k8s.replicaset.name": "web-7d4b9", "k8s.replicaset.uid": "uid-web-7d4b9"},
        "daemonset": {**pod, **container, "k8s.namespace.name": "kube-system", "k8s.pod.name": "agent-q8z",
                      "k8s.pod.uid": "uid-agent-q8z", "k8s.daemonset.name": "agent", "k8s.daemonset.uid": "uid-agent"},
        "job": {**pod, **container, "k8s.pod.name": "backup-29-abc", "k8s.pod.uid": "uid-backup-29-abc",
                "k8s.job.name": "backup-29", "k8s.job.uid": "uid-backup-29"},
        "cronjob": {**pod, **container, "k8s.pod.name": "backup-29-abc", "k8s.pod.uid": "uid-backup-29-abc",
                    "k8s.cronjob.name": "backup", "k8s.cronjob.uid": "uid-backup"},
        "other owner": {**pod, **container, "k8s.pod.name": "canary-0", "k8s.pod.uid": "uid-canary-0"},
        "bare pod name": {"k8s.namespace.name": "shop", "k8s.pod.name": "cart-0", "k8s.pod.uid": "uid-cart-0"},
    }


def test_occurrences_of_one_pod_share_one_resource_in_order(tmp_path):
    pod, other = enriched("cart-0"), enriched("cart-1")
    batch = [occurrence(1, context=pod), occurrence(2, context=other), occurrence(3, context=pod)]
    with Receiver() as receiver:
        pipeline = open_pipeline(tmp_path, endpoint=receiver.url)
        pipeline.emit(batch)
        pipeline.close()
    [message] = export(receiver)
    grouped = [[attributes(r.attributes)["tapio.id"] for r in rl.scope_logs[0].log_records]
               for rl in message.resource_logs]
    assert grouped == [[batch[0].id, batch[2].id], [batch[1].id]]


PARTIAL = ExportLogsServiceResponse(partial_success=ExportLogsPartialSuccess(
    rejected_log_records=2, error_message="2 records older than the retention window"))


@pytest.mark.parametrize(("content_type", "body"), [
    ("application/x-protobuf", PARTIAL.SerializeToString()),
    # The OTLP/HTTP JSON mapping: lowerCamelCase keys, an int64 as a string (a plain number is read too).
    ("application/json", json.dumps({"partialSuccess": {
        "rejectedLogRecords": "2", "errorMessage": "2 records older than the retention window"}}).encode()),
    ("application/json; charset=utf-8", json.dumps({"partialSuccess": {
        "rejectedLogRecords": 2, "errorMessage": "2 records older than the retention window"}}).encode()),
], ids=["protobuf", "json", "json with a number"])
def test_a_partial_success_counts_the_rejected_records_as_failed(tmp_path, caplog, content_type, body):
    caplog.set_level(logging.WARNING)
    with Receiver() as receiver:
        receiver.reply(200, {"Content-Type": content_type}, body)
        pipeline = open_pipeline(tmp_path, endpoint=receiver.url)
        pipeline.emit([occurrence(n) for n in range(5)])
        pipeline.close()
    assert pipeline.sinks[0].counters == {"emitted": 5, "delivered": 3, "failed": 2, "dropped": 0, "retried": 0}
    assert "rejected 2 of 5 occurrences: 2 records older than the retention window" in caplog.text


@pytest.mark.parametrize(("content_type", "body"), [
    ("application/x-protobuf", ExportLogsServiceResponse().SerializeToString()),
    ("application/json", b"{}"),
    ("application/json", b""),
    ("text/html", b"<html>ok</html>"),
])
def test_an_empty_or_unreadable_success_response_accepts_everything(tmp_path, content_type, body):
    with Receiver() as receiver:
        receiver.reply(200, {"Content-Type": content_type}, body)
        pipeline = open_pipeline(tmp_path, endpoint=receiver.url)
        pipeline.emit([occurrence(n) for n in range(3)])
        pipeline.close()
    assert pipeline.sinks[0].counters["delivered"] == 3


def test_throttling_is_retried_like_the_http_sink(tmp_path):
    with Receiver() as receiver:
        receiver.reply(429)
        receiver.reply(503)
        receiver.reply(400)
        pipeline = open_pipeline(tmp_path, endpoint=receiver.url, batch_max_count=2)
        pipeline.emit([occurrence(n) for n in range(4)])
        pipeline.close()
    # First batch: 429, 503, then refused with 400 (no retry); second batch: accepted at once.
    assert len(receiver.received) == 4
    assert pipeline.sinks[0].counters == {"emitted": 4, "delivered": 2, "failed": 2, "dropped": 0, "retried": 2}


@pytest.mark.parametrize(("status", "retried"), [(500, False), (501, False), (505, False), (429, True),
                                                (502, True), (503, True), (504, True)])
def test_only_the_statuses_otlp_allows_are_retried(tmp_path, status, retried):
    with Receiver() as receiver:
        receiver.reply(status)
        pipeline = open_pipeline(tmp_path, endpoint=receiver.url)
        pipeline.emit([occurrence(n) for n in range(3)])
        pipeline.close()
    if retried:
        assert len(receiver.received) == 2
        assert pipeline.sinks[0].counters == {"emitted": 3, "delivered": 3, "failed": 0, "dropped": 0, "retried": 1}
    else:
        assert len(receiver.received) == 1
        assert pipeline.sinks[0].counters == {"emitted": 3, "delivered": 0, "failed": 3, "dropped": 0, "retried": 0}


def test_the_endpoint_is_required(tmp_path):
    with pytest.raises(ConfigError, match=r"^config \[otlp\]: endpoint: required field missing$"):
        Pipeline.open_sinks(load_plugins({"otlp"}), ["otlp"], SinkOptions(data_dir=tmp_path), {})


@pytest.mark.kernel
def test_the_real_agent_exports_a_refused_connect_while_a_hung_http_sink_waits(tmp_path):
    """Kernel refuses a loopback connect; the agent's otlp sink delivers it although its http sink's endpoint hangs."""
    port = closed_tcp_port("127.0.0.1")
    with Receiver() as collector, Receiver() as hub:
        hub.hold()
        settings = ["--set", f"otlp.endpoint={collector.url}", "--set", "otlp.batch_max_age_s=0.05",
                    "--set", f"http.endpoint={hub.url}", "--set", "http.batch_max_age_s=0.05",
                    "--set", "http.timeout_s=60"]
        with running_agent(tmp_path, plugins="network,stdout,otlp,http", sinks=("stdout", "otlp", "http"),
                           extra=settings) as agent:
            connector = run_connects("127.0.0.1", port)
            assert connector["attempts"][0]["errno"] == "ECONNREFUSED"

            def exported(receiver):
                return [record for message in export(receiver) for resource in message.resource_logs
                        for record in resource.scope_logs[0].log_records
                        if json.loads(record.body.string_value)["data"].get("dst_port") == port]

            assert collector.wait_for(lambda r: len(exported(r)) == 1), agent.stderr_text()
            assert hub.wait_for(lambda r: len(r.received) >= 1)  # the http sink is stuck on its request...
            [printed] = agent.wait_for(lambda o: o["data"].get("dst_port") == port)  # ...and stdout is not
            hub.release()
            assert agent.stop() == 0, agent.stderr_text()
    [record] = exported(collector)
    occurrence = json.loads(record.body.string_value)
    assert occurrence == printed
    assert (occurrence["type"], occurrence["data"]["pid"]) == ("kernel.network.connection_refused",
                                                              connector["pid"])
    assert attributes(record.attributes)["tapio.id"] == printed["id"]
    assert record.time_unix_nano == unix_ns(printed["timestamp"])
    hub_ids = [item["id"] for request in hub.received for item in json.loads(request.body)]
    assert printed["id"] in hub_ids  # flushed at shutdown once the hub answered
    state = json.loads((tmp_path / "state.json").read_text())
    for name in ("otlp", "http"):
        counts = state["sinks"][name]["counters"]
        assert counts["delivered"] + counts["failed"] + counts["dropped"] == counts["emitted"] >= 1, state
