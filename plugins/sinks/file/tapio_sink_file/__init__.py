"""Tapio sink: occurrences as private, bounded JSON-lines files in the data directory."""

from tapio_core import SinkSpec, hookimpl
from tapio_core.sink import SinkError
from tapio_core.store import OccurrenceWriter


@hookimpl
def tapio_register_sinks(register):
    register(SinkSpec(name="file", description="JSON-lines files under <data-dir>/occurrences/, read by `tapio`"))


@hookimpl
def tapio_sink_open(sink):
    try:
        sink.state["writer"] = OccurrenceWriter(sink.options.data_dir)
    except OSError as exc:
        raise SinkError(f"file sink cannot use {sink.options.data_dir}: {exc.strerror or exc}") from None


@hookimpl
def tapio_sink_emit(sink, occurrences):
    sink.state["writer"].write(occurrences)
