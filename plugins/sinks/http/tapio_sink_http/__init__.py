"""Tapio sink: occurrences as batched JSON POSTs to an HTTP endpoint (a POLKU hub).

Queueing, batching, retries and counts are ``tapio_core.delivery``'s; this
plugin only says what a body looks like.
"""

from tapio_core import SinkSpec, hookimpl
from tapio_core.delivery import QUEUED, DeliverySettings, start_delivery


class JsonArray:
    """A batch is one JSON array of occurrences, each exactly as ``Occurrence.to_json`` writes it."""

    content_type = "application/json"

    def encode(self, occurrence):
        item = occurrence.to_json().encode()
        return item, len(item) + 1  # the comma or bracket

    def body(self, items):
        return b"[" + b",".join(items) + b"]"

    def rejected(self, reply, sent):
        return 0, ""  # a 2xx takes the whole batch


@hookimpl
def tapio_register_sinks(register):
    register(SinkSpec(name="http", description="batched JSON POSTs to an HTTP endpoint (a POLKU hub)",
                      config_type=DeliverySettings, delivers_later=True))


@hookimpl
def tapio_sink_open(sink):
    start_delivery(sink, sink.config.endpoint, JsonArray())


# Emit queues for the sender thread; close flushes within the deadline (shared by the remote sinks).
tapio_sink_emit = QUEUED.tapio_sink_emit
tapio_sink_close = QUEUED.tapio_sink_close
