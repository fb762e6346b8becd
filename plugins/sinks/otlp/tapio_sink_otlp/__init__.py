"""Tapio sink: occurrences as OTLP/HTTP log records (Grafana, any OpenTelemetry backend).

Queueing, batching, retries and counts are ``tapio_core.delivery``'s; this
plugin only builds ``ExportLogsServiceRequest`` bodies, reads partial successes and
names the statuses OTLP/HTTP lets a client retry.
"""

from __future__ import annotations

import os

import attrs

from tapio_core import SinkSpec, hookimpl
from tapio_core.delivery import QUEUED, DeliverySettings, start_delivery
from tapio_sink_otlp.encode import OtlpLogs

#: The only statuses OTLP/HTTP allows a client to retry; any other error is final.
OTLP_RETRY_STATUSES = frozenset({429, 502, 503, 504})


@attrs.define(kw_only=True)
class OtlpSettings(DeliverySettings):
    """``endpoint`` is the OTLP/HTTP base URL; logs go to ``{endpoint}/v1/logs``."""

    gzip: bool = True
    #: The resource's host.name (default: $NODE_NAME, else this machine's host name).
    host_name: str = attrs.field(factory=lambda: os.environ.get("NODE_NAME") or os.uname().nodename)


@hookimpl
def tapio_register_sinks(register):
    register(SinkSpec(name="otlp", description="OTLP/HTTP log records (Grafana, any OpenTelemetry backend)",
                      config_type=OtlpSettings, delivers_later=True))


@hookimpl
def tapio_sink_open(sink):
    start_delivery(sink, sink.config.endpoint.rstrip("/") + "/v1/logs", OtlpLogs(sink.config.host_name),
                   retry_statuses=OTLP_RETRY_STATUSES)


# Emit queues for the sender thread; close flushes within the deadline (shared by the remote sinks).
tapio_sink_emit = QUEUED.tapio_sink_emit
tapio_sink_close = QUEUED.tapio_sink_close
