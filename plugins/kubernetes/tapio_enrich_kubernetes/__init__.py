"""Tapio Kubernetes enrichment: the pod, container and workload each occurrence happened to.

On when ``NODE_NAME`` is set (the Downward API) or by ``kubernetes.enabled``
(``--set kubernetes.enabled=true``, or ``TAPIO_K8S_ENABLED=1``). The agent
starts it (``tapio_enricher_start``); it then watches this node's pods in a
background thread and answers every ``tapio_enrich_occurrence`` from that
local cache. Replay and the CLI never start it. See README.md.
"""

from __future__ import annotations

import logging

from tapio_core import EnricherSpec, Occurrence, RunningEnricher, hookimpl
from tapio_core.config import ConfigError
from tapio_enrich_kubernetes.enrich import KubernetesEnricher
from tapio_enrich_kubernetes.settings import KubernetesSettings, KubernetesTable, SettingsError

log = logging.getLogger("tapio.kubernetes")


@hookimpl
def tapio_register_enrichers(register) -> None:
    register(EnricherSpec(name="kubernetes", description="pod, container and workload of each occurrence",
                          config_type=KubernetesTable))


@hookimpl
def tapio_enricher_start(enricher: RunningEnricher) -> None:
    try:
        settings = KubernetesSettings.from_config(enricher.config)
    except SettingsError as exc:
        raise ConfigError(f"kubernetes enrichment: {exc}") from None
    if not settings.enabled:
        enricher.status = "disabled"
        enricher.status_reason = (
            "turned off (kubernetes.enabled = false or TAPIO_K8S_ENABLED=0)" if settings.node_name
            else "NODE_NAME is not set (nor kubernetes.enabled = true or TAPIO_K8S_ENABLED=1)")
        return
    running = KubernetesEnricher.start(settings)
    enricher.state["enricher"] = running
    enricher.report = running.status
    log.info("kubernetes enrichment on for node %s", settings.node_name)


@hookimpl
def tapio_enrich_occurrence(enricher: RunningEnricher, occurrence: Occurrence) -> None:
    enricher.state["enricher"].enrich(occurrence)


@hookimpl
def tapio_enricher_stop(enricher: RunningEnricher) -> None:
    running = enricher.state.pop("enricher", None)
    if running is not None:
        running.stop()
