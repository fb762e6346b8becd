"""Tapio core: the plugin contract, the occurrence model, the agent and the CLI.

Plugin authors need only this package's root: ``from tapio_core import hookimpl``
plus the declaration types re-exported below.
"""

from tapio_core.enricher import EnricherSpec, RunningEnricher
from tapio_core.hookspecs import hookimpl
from tapio_core.observer import (
    Anomaly,
    BpfCounter,
    BtfField,
    ObserverSpec,
    OptionalTracepoint,
    RawTracepointArg,
    RunningObserver,
    TracepointField,
    c_string,
    record_dtype,
    with_suppressed,
)
from tapio_core.occurrence import Context, Entity, Error, Occurrence
from tapio_core.sink import RunningSink, SinkSpec

__version__ = "0.1.0"

__all__ = [
    "Anomaly",
    "BpfCounter",
    "BtfField",
    "Context",
    "EnricherSpec",
    "Entity",
    "Error",
    "ObserverSpec",
    "Occurrence",
    "OptionalTracepoint",
    "RawTracepointArg",
    "RunningEnricher",
    "RunningObserver",
    "RunningSink",
    "SinkSpec",
    "TracepointField",
    "c_string",
    "hookimpl",
    "record_dtype",
    "with_suppressed",
]
