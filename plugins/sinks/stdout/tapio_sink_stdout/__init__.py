"""Tapio sink: one occurrence JSON object per line on standard output."""

import sys

from tapio_core import SinkSpec, hookimpl


@hookimpl
def tapio_register_sinks(register):
    register(SinkSpec(name="stdout", description="one JSON object per line on standard output"))


@hookimpl
def tapio_sink_emit(sink, occurrences):
    stream = sink.state.get("stream") or sys.stdout
    stream.write("".join(occurrence.to_json() + "\n" for occurrence in occurrences))
    stream.flush()
