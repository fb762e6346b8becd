"""An example third-party Tapio sink: one summary line per occurrence, appended to a file or stderr."""

from __future__ import annotations

import io
import sys

import attrs

from tapio_core import SinkSpec, hookimpl
from tapio_core.sink import SinkError, whole_writes

SEVERITY_ORDER = ("debug", "info", "warning", "error", "critical")


@attrs.define(kw_only=True)
class ExampleSettings:
    """The ``[example]`` table of the config file, or ``--set example.KEY=VALUE``."""

    #: Where the lines go; "-" is standard error.
    path: str = "-"
    #: Only occurrences at least this severe.
    min_severity: str = attrs.field(default="debug", validator=attrs.validators.in_(SEVERITY_ORDER))


@hookimpl
def tapio_register_sinks(register):
    register(SinkSpec(name="example", description="one summary line per occurrence", config_type=ExampleSettings))


@hookimpl
def tapio_sink_open(sink):
    if sink.config.path == "-":
        # Not sys.stderr itself: under PYTHONUNBUFFERED a signal mid-write would silently cut a batch short.
        sink.state["stream"] = io.TextIOWrapper(whole_writes(sys.stderr), encoding="utf-8")
        return
    try:
        sink.state["stream"] = open(sink.config.path, "a", encoding="utf-8")  # noqa: SIM115 -- closed in close
    except OSError as exc:
        raise SinkError(f"config [example]: path: cannot open {sink.config.path}: {exc.strerror}") from None


@hookimpl
def tapio_sink_emit(sink, occurrences):
    floor = SEVERITY_ORDER.index(sink.config.min_severity)
    lines = [
        f"{o.timestamp.isoformat()} {o.severity} {o.type} {o.id}\n"
        for o in occurrences
        if SEVERITY_ORDER.index(o.severity) >= floor
    ]
    sink.state["stream"].write("".join(lines))
    sink.state["stream"].flush()


@hookimpl
def tapio_sink_close(sink):
    if sink.config.path == "-":
        sink.state["stream"].flush()  # stderr stays open for the agent's log
    else:
        sink.state["stream"].close()
