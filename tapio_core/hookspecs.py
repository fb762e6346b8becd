"""The whole Tapio plugin contract.

A plugin is a module (or object) with functions named after the hooks below,
decorated with ``@tapio_core.hookimpl``, published under the ``tapio`` entry
point group. The agent calls them in this order:

1. ``tapio_register_observers`` / ``tapio_register_enrichers`` /
   ``tapio_register_sinks`` once at start-up: plugins declare what they provide.
2. ``tapio_sink_open`` once per sink the user chose, ``tapio_enricher_start``
   once per enricher, then per observer ``tapio_observer_preflight`` (may
   it run here at all?) and, once its BPF program loaded,
   ``tapio_observer_started``.
3. Per batch of raw ring-buffer records drained from one observer:
   ``tapio_parse_records`` then ``tapio_detect_anomalies`` -- called **only on
   the plugin that registered that observer**, never on every plugin.
4. Per anomaly found: the agent builds an :class:`~tapio_core.Occurrence`, calls
   ``tapio_enrich_occurrence`` once per running enricher, then
   ``tapio_sink_emit`` once per sink with the batch's occurrences (each
   enricher and sink only on its own plugin).
5. At shutdown: ``tapio_observer_stopping`` once per observer (pending
   anomalies still go out), ``tapio_enricher_stop`` once per enricher, then
   ``tapio_sink_close`` once per sink.

The same path runs without BPF in ``tapio replay``, so parse and detect must
depend on nothing but their arguments and ``observer.state``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import numpy as np

    from tapio_core.enricher import EnricherSpec, RunningEnricher
    from tapio_core.observer import Anomaly, ObserverSpec, RunningObserver
    from tapio_core.occurrence import Occurrence
    from tapio_core.sink import RunningSink, SinkSpec

hookspec = pluggy.HookspecMarker("tapio")
hookimpl = pluggy.HookimplMarker("tapio")


# --- observer load -----------------------------------------------------------


@hookspec
def tapio_register_observers(register: Callable[[ObserverSpec], None]) -> None:
    """Declare the observers this plugin provides.

    Called once at start-up (agent and replay). Call ``register(spec)`` once per
    observer: its name, its BPF C source, the tracepoints it attaches, the BTF
    struct fields it reads and the layout of its ring-buffer records. A name
    another plugin already registered is rejected with an error naming both;
    any other exception leaves this whole plugin out, named in ``tapio
    plugins``. Returns nothing: the ``register`` calls are the answer.
    """


@hookspec
def tapio_observer_preflight(observer: RunningObserver) -> None:
    """Say, before its BPF program is compiled, whether this machine can run the observer at all.

    Called once per observer by the agent, before the compile (which costs
    seconds and a helper process of 100+ MB), only on the plugin that
    registered it; never in replay. ``observer.config`` holds the user's
    settings; ``observer.bpf`` is still None. Raise
    ``tapio_core.bpf.ObserverUnsupported`` when the machine lacks what the
    observer needs (e.g. a hardware PMU): it is then reported unsupported and
    never compiled. Returns nothing; without an implementation the observer
    is compiled.
    """


@hookspec
def tapio_observer_started(observer: RunningObserver) -> None:
    """Prepare the kernel side of an observer that was just loaded.

    Called once per observer after its BPF program compiled and attached and
    before its first batch, only on the plugin that registered it; never in
    replay. ``observer.bpf`` is the loaded program (maps and programs by name,
    held by file descriptor: bcc compiled it in a helper process),
    ``observer.config`` the user's settings and ``observer.btf`` the kernel's
    parsed BTF (during this call only): write the values the BPF side reads
    into its maps here, so changing a setting needs no recompile. Raise
    ``tapio_core.bpf.ObserverLoadError`` to mark the observer failed, or
    ``ObserverUnsupported`` when this machine lacks what it needs (e.g. a
    hardware PMU); either way the other observers go on (any other exception
    marks it failed too, with its traceback in the log). Returns nothing.
    """


# --- event parse ---------------------------------------------------------------


@hookspec(firstresult=True)
def tapio_parse_records(observer: RunningObserver, records: bytes) -> np.ndarray | None:
    """Turn one batch of raw ring-buffer records into typed events.

    Called for every batch drained from ``observer``'s ring buffer (and for
    every recorded batch in replay), only on the plugin that registered it.
    ``records`` holds whole records back to back, each
    ``observer.spec.record_dtype.itemsize`` bytes, exactly as the BPF program
    wrote them. Return a numpy structured array of events, or None to let the
    agent view the bytes through ``record_dtype`` (what most observers want).
    Stops at the first non-None result.
    """


# --- anomaly detection ---------------------------------------------------------


@hookspec
def tapio_detect_anomalies(observer: RunningObserver, events: np.ndarray) -> list[Anomaly] | None:
    """Judge a batch of typed events and return the anomalies among them.

    Called after ``tapio_parse_records`` with its result, only on the plugin
    that registered ``observer``. Keep state across batches in
    ``observer.state`` (a dict owned by this observer) and read thresholds from
    ``observer.config``. Return a list of :class:`~tapio_core.Anomaly` (empty
    or None when the batch holds nothing abnormal). Prefer vectorised numpy
    over per-event Python: this is the hot path.
    """


@hookspec
def tapio_observer_stopping(observer: RunningObserver) -> list[Anomaly] | None:
    """Hand over anomalies the detector still holds, because no more events will come.

    Called once per observer when the agent shuts down (its BPF program
    detached and drained to empty, its maps still readable through
    ``observer.bpf``) and at the end of a ``tapio replay`` (``observer.bpf``
    None), only on the plugin that registered it. Return the anomalies still
    pending -- in ``observer.state``, or in the kernel's maps, whose counts
    are final now -- e.g. an episode that has not ended yet, reported with
    outcome ``in_progress``; or None.
    """


# --- enrichment ----------------------------------------------------------------


@hookspec
def tapio_register_enrichers(register: Callable[[EnricherSpec], None]) -> None:
    """Declare the enrichers this plugin provides.

    Called once at start-up. Call ``register(spec)`` once per enricher. A name
    another plugin already registered is rejected with an error naming both.
    Returns nothing, like ``tapio_register_observers``.
    """


@hookspec
def tapio_enricher_start(enricher: RunningEnricher) -> None:
    """Start an enricher: open its caches, start its background threads.

    Called once by the agent (never by replay or the CLI, so a replay shows
    the kernel's facts alone), only on the plugin that registered it. Set
    ``enricher.status = "disabled"`` (with ``status_reason``) when it should
    not run here, e.g. outside Kubernetes. Must return quickly: an API that
    is unreachable is the background thread's problem, not start-up's. Raise
    ``tapio_core.config.ConfigError`` for a setting the user must fix: the
    agent stops with that one line before attaching anything. Returns nothing.
    """


@hookspec
def tapio_enrich_occurrence(enricher: RunningEnricher, occurrence: Occurrence) -> None:
    """Add context to an occurrence before any sink sees it.

    Called once per occurrence for each started, not disabled enricher, only on
    its own plugin. Mutate ``occurrence.context`` (node, namespace, entities)
    or add keys to ``occurrence.data``; never change ``type``, ``id`` or kernel
    facts. Must not block: answer from a local cache, never a remote call per
    occurrence. An exception is logged and the occurrence goes on without
    that enrichment. Returns nothing: the occurrence is changed in place.
    """


@hookspec
def tapio_enricher_stop(enricher: RunningEnricher) -> None:
    """Stop an enricher's threads and release what it holds.

    Called once at agent shutdown for each enricher ``tapio_enricher_start``
    was called on, only on its own plugin. Returns nothing.
    """


# --- sink emit -----------------------------------------------------------------


@hookspec
def tapio_register_sinks(register: Callable[[SinkSpec], None]) -> None:
    """Declare the sinks this plugin provides.

    Called once at start-up. Call ``register(spec)`` once per sink name; the
    user picks sinks by that name (``tapio-agent --sink NAME``). A name another
    plugin already registered is rejected with an error naming both.
    Returns nothing, like ``tapio_register_observers``.
    """


@hookspec
def tapio_sink_open(sink: RunningSink) -> None:
    """Prepare a sink the user chose, before the first emit.

    Called once, only on the plugin that registered ``sink.spec``. Read
    ``sink.options`` (e.g. ``data_dir``), keep handles in ``sink.state``. Raise
    ``tapio_core.sink.SinkError`` with one clear line when the sink cannot work:
    the agent stops before attaching anything. Returns nothing.
    """


@hookspec
def tapio_sink_emit(sink: RunningSink, occurrences: Sequence[Occurrence]) -> None:
    """Deliver a batch of enriched occurrences.

    Called once per batch for each chosen sink, only on the plugin that
    registered it, with at least one occurrence. Deliver or hand off quickly:
    the agent's ring-buffer consumption waits for this call. An exception is
    logged and counted as failed for this sink only; other sinks still get the
    batch. Returns nothing: a sink that delivers later (``SinkSpec.delivers_later``)
    counts its own outcomes.
    """


@hookspec
def tapio_sink_close(sink: RunningSink) -> None:
    """Flush and release a sink at shutdown (SIGINT/SIGTERM or end of replay).

    Called once, only on the plugin that registered ``sink.spec``, after the
    last ``tapio_sink_emit``. Returns nothing.
    """
