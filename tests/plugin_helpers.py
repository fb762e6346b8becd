"""Throwaway plugins the tests register next to real ones."""

from tapio_core import SinkSpec, hookimpl


class Collect:
    """A sink named ``collect`` that keeps every occurrence it is given, in order."""

    def __init__(self) -> None:
        self.received = []

    @hookimpl
    def tapio_register_sinks(self, register):
        register(SinkSpec(name="collect"))

    @hookimpl
    def tapio_sink_emit(self, sink, occurrences):
        self.received.extend(occurrences)
