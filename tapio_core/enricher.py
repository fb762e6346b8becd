"""What an enrichment plugin declares, and what the agent hands back to its hooks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs


@attrs.frozen
class EnricherSpec:
    """An enricher as a plugin declares it in ``tapio_register_enrichers``."""

    name: str
    description: str = ""
    #: An attrs class built from the config file's table named after the
    #: enricher (``[kubernetes]``); None: no settings.
    config_type: type | None = None


@attrs.define(eq=False)
class RunningEnricher:
    """One enricher while the agent runs it; passed to its hooks.

    ``state`` belongs to the plugin (caches, threads). The plugin keeps
    ``status`` current (``starting``, ``running``, ``degraded``, ``disabled``,
    ...) -- from its own threads too -- and may set ``report`` to a callable
    returning details for `tapio status`. Only enrichers whose status is not
    ``disabled`` after ``tapio_enricher_start`` see occurrences.
    """

    spec: EnricherSpec
    config: Any = None
    state: dict[str, Any] = attrs.field(factory=dict)
    plugin_name: str = ""
    status: str = "starting"
    status_reason: str = ""
    counters: dict[str, int] = attrs.field(factory=dict)
    report: Callable[[], dict[str, Any]] | None = None

    @property
    def name(self) -> str:
        return self.spec.name
