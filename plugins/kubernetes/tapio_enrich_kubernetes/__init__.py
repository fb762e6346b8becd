"""Tapio Kubernetes enrichment: the pod, container and workload each occurrence happened to.

Enabled when ``NODE_NAME`` is set (the Downward API) or ``TAPIO_K8S_ENABLED=1``.
It watches this node's pods in a background thread and answers every
``tapio_enrich_occurrence`` from that local cache; see README.md.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from tapio_core import Occurrence, hookimpl
from tapio_core.plugins import PluginError
from tapio_enrich_kubernetes.enrich import KubernetesEnricher
from tapio_enrich_kubernetes.settings import KubernetesSettings, SettingsError

log = logging.getLogger("tapio.kubernetes")

_enricher: KubernetesEnricher | None = None
_settings: KubernetesSettings | None = None
_start_lock = threading.Lock()


def start() -> KubernetesEnricher | None:
    """Read the environment and, when enabled, start the watch (once per process)."""
    global _enricher, _settings
    with _start_lock:
        if _settings is not None:
            return _enricher
        try:
            settings = KubernetesSettings.from_env()
        except SettingsError as exc:
            raise PluginError(f"kubernetes enrichment: {exc}") from None
        _settings = settings
        if settings.enabled:
            _enricher = KubernetesEnricher.start(settings)
            log.info("kubernetes enrichment on for node %s", settings.node_name)
        return _enricher


def stop() -> None:
    global _enricher, _settings
    with _start_lock:
        if _enricher is not None:
            _enricher.stop()
        _enricher = _settings = None


def status() -> dict[str, Any]:
    """What `tapio status` should show for this plugin: API connection, cache sizes, per-outcome counts."""
    enricher = _enricher
    if enricher is None:
        return {"enabled": False, "reason": "NODE_NAME is not set (and TAPIO_K8S_ENABLED is not 1)"}
    return enricher.status()


@hookimpl
def tapio_register_observers(register) -> None:
    """Registers nothing: it is the one hook every plugin gets at start-up, so the watch starts here."""
    start()


@hookimpl
def tapio_enrich_occurrence(occurrence: Occurrence) -> None:
    enricher = _enricher
    if enricher is not None:
        enricher.enrich(occurrence)
