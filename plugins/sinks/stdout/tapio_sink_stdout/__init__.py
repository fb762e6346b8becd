"""Tapio sink: one occurrence JSON object per line on standard output."""

import sys

from tapio_core import SinkSpec, hookimpl
from tapio_core.sink import whole_writes


@hookimpl
def tapio_register_sinks(register):
    register(SinkSpec(name="stdout", description="one JSON object per line on standard output"))


@hookimpl
def tapio_sink_open(sink):
    sink.state["stream"] = whole_writes(sys.stdout)


@hookimpl
def tapio_sink_emit(sink, occurrences):
    stream = sink.state["stream"]
    stream.write("".join(occurrence.to_json() + "\n" for occurrence in occurrences).encode())
    stream.flush()


@hookimpl
def tapio_sink_close(sink):
    sink.state["stream"].flush()
