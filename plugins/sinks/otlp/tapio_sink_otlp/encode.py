"""Occurrences as OTLP log records: one LogRecord each, grouped under the Kubernetes resource they happened in."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import (
    ExportLogsServiceRequest,
    ExportLogsServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, InstrumentationScope, KeyValue
from opentelemetry.proto.logs.v1.logs_pb2 import LogRecord, ResourceLogs, ScopeLogs, SeverityNumber
from opentelemetry.proto.resource.v1.resource_pb2 import Resource

from tapio_core import Context, Occurrence, __version__
from tapio_core.delivery import Reply

SEVERITY_NUMBERS = {
    "debug": SeverityNumber.SEVERITY_NUMBER_DEBUG,
    "info": SeverityNumber.SEVERITY_NUMBER_INFO,
    "warning": SeverityNumber.SEVERITY_NUMBER_WARN,
    "error": SeverityNumber.SEVERITY_NUMBER_ERROR,
    "critical": SeverityNumber.SEVERITY_NUMBER_FATAL,
}

#: Owner kinds the Kubernetes enricher names (lowercased) that the OTel conventions have k8s.<kind>.name/uid for.
WORKLOAD_KINDS = frozenset({"deployment", "statefulset", "daemonset", "replicaset", "job", "cronjob"})

ResourceKey = tuple[tuple[str, str], ...]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class OtlpLogs:
    """Encoder for ``tapio_core.delivery``: protobuf ``ExportLogsServiceRequest`` bodies."""

    content_type = "application/x-protobuf"

    def __init__(self, host_name: str) -> None:
        self.host_name = host_name
        self.scope = InstrumentationScope(name="tapio", version=__version__)

    def encode(self, occurrence: Occurrence) -> tuple[tuple[ResourceKey, LogRecord], int]:
        record = log_record(occurrence)
        return (self.resource_key(occurrence), record), record.ByteSize() + 4  # tag and length

    def resource_key(self, occurrence: Occurrence) -> ResourceKey:
        attributes = {"service.name": "tapio", "service.version": __version__, "host.name": self.host_name}
        if occurrence.context is not None:
            attributes.update(k8s_attributes(occurrence.context))
        return tuple(attributes.items())

    def body(self, items: Sequence[tuple[ResourceKey, LogRecord]]) -> bytes:
        by_resource: dict[ResourceKey, list[LogRecord]] = {}
        for resource, record in items:
            by_resource.setdefault(resource, []).append(record)
        request = ExportLogsServiceRequest(resource_logs=[
            ResourceLogs(resource=Resource(attributes=[_string(k, v) for k, v in resource]),
                         scope_logs=[ScopeLogs(scope=self.scope, log_records=records)])
            for resource, records in by_resource.items()
        ])
        return request.SerializeToString()

    def rejected(self, reply: Reply, sent: int) -> tuple[int, str]:
        """The ``partial_success`` of a 2xx ``ExportLogsServiceResponse``, protobuf or JSON: records refused."""
        response = ExportLogsServiceResponse()
        try:
            if reply.headers.get("Content-Type", "").partition(";")[0].strip().lower() == "application/json":
                # The OTLP/HTTP JSON mapping: {"partialSuccess": {"rejectedLogRecords": "2", "errorMessage": ...}}
                json_format.Parse(reply.body, response, ignore_unknown_fields=True)
            else:
                response.ParseFromString(reply.body)
        except (DecodeError, json_format.ParseError, ValueError):
            return 0, ""  # unreadable (e.g. a proxy's own page): nothing says it refused any
        partial = response.partial_success
        return min(max(partial.rejected_log_records, 0), sent), partial.error_message


def k8s_attributes(context: Context) -> dict[str, str]:
    """OTel Kubernetes (``k8s.*``, ``container.id``) resource attributes from an enriched context.

    The enricher names pods and workloads ``namespace/name``; the conventions want the bare
    name, unique within ``k8s.namespace.name``. The first entity of each kind counts.
    """
    attributes = {"k8s.node.name": context.node} if context.node else {}
    namespace = context.namespace
    for entity in context.entities:
        kind = entity.kind.lower()
        if kind == "container":
            attributes.setdefault("k8s.container.name", entity.name)  # the name in the pod spec
            attributes.setdefault("container.id", entity.id)
        elif kind == "pod" or kind in WORKLOAD_KINDS:
            prefix, _, name = entity.name.rpartition("/")
            if kind == "pod" and "k8s.pod.name" not in attributes:
                namespace = prefix or namespace  # the pod's own namespace, where its name is unique
            attributes.setdefault(f"k8s.{kind}.name", name)
            attributes.setdefault(f"k8s.{kind}.uid", entity.id)
    if namespace:
        attributes["k8s.namespace.name"] = namespace
    return attributes


def log_record(occurrence: Occurrence) -> LogRecord:
    attributes = [_string("tapio.type", occurrence.type), _string("tapio.id", occurrence.id),
                  _string("tapio.outcome", occurrence.outcome)]
    if occurrence.error is not None:
        attributes.append(_string("error.type", occurrence.error.code))
    return LogRecord(
        # The kernel's timestamp as the agent turned it into wall-clock time (millisecond precision).
        time_unix_nano=(occurrence.timestamp - _EPOCH) // timedelta(microseconds=1) * 1000,
        observed_time_unix_nano=time.time_ns(),
        severity_number=SEVERITY_NUMBERS[occurrence.severity],
        severity_text=occurrence.severity,
        body=AnyValue(string_value=occurrence.to_json()),
        attributes=attributes,
    )


def _string(key: str, value: str) -> KeyValue:
    return KeyValue(key=key, value=AnyValue(string_value=value))
