"""The plugin manager: finds plugins through the ``tapio`` entry point group.

``TAPIO_LOAD_PLUGINS=network,stdout`` (or ``--plugins``) loads only the named
entry points; ``TAPIO_TRACE_PLUGINS=1`` logs every hook call.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
from collections.abc import Iterable
from typing import Any

import attrs
import pluggy

from tapio_core import hookspecs
from tapio_core.enricher import EnricherSpec
from tapio_core.observer import ObserverSpec
from tapio_core.sink import SinkSpec

ENTRY_POINT_GROUP = "tapio"
log = logging.getLogger("tapio.plugins")


class PluginError(Exception):
    """A plugin could not be loaded or declared something invalid."""


@attrs.define
class PluginInfo:
    name: str
    distribution: str | None
    version: str | None
    hooks: list[str]
    observers: list[str] = attrs.field(factory=list)
    sinks: list[str] = attrs.field(factory=list)
    enrichers: list[str] = attrs.field(factory=list)


@attrs.define
class LoadedPlugins:
    """The plugin manager plus what the plugins declared, keyed by name."""

    pm: pluggy.PluginManager
    observers: dict[str, tuple[str, ObserverSpec]]
    sinks: dict[str, tuple[str, SinkSpec]]
    enrichers: dict[str, tuple[str, EnricherSpec]]
    failed: dict[str, str]
    distributions: dict[str, importlib.metadata.Distribution | None]

    def hook_for(self, hook_name: str, plugin_name: str) -> Any:
        """A caller of ``hook_name`` that reaches only ``plugin_name``'s implementation.

        The per-batch hooks go through these so one observer's batch never
        visits every plugin.
        """
        owner = self.pm.get_plugin(plugin_name)
        others = [p for p in self.pm.get_plugins() if p is not owner]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)

    def info(self) -> list[PluginInfo]:
        result = []
        for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda item: item[0]):
            dist = self.distributions.get(name)
            hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
            result.append(
                PluginInfo(
                    name=name,
                    distribution=dist.metadata["Name"] if dist else None,
                    version=dist.version if dist else None,
                    hooks=hooks,
                    observers=sorted(o for o, (p, _) in self.observers.items() if p == name),
                    sinks=sorted(s for s, (p, _) in self.sinks.items() if p == name),
                    enrichers=sorted(e for e, (p, _) in self.enrichers.items() if p == name),
                )
            )
        return result


def parse_plugin_list(value: str | None) -> set[str] | None:
    """``"network, stdout"`` -> ``{"network", "stdout"}``; None or empty means all."""
    if value is None or not value.strip():
        return None
    return {item.strip() for item in value.split(",") if item.strip()}


def make_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager("tapio")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("TAPIO_TRACE_PLUGINS"):
        pm.trace.root.setwriter(lambda message: log.info("hook %s", message.rstrip()))
        pm.enable_tracing()
    return pm


def load_plugins(
    allow: Iterable[str] | None = None,
    extra: Iterable[tuple[str, object]] = (),
) -> LoadedPlugins:
    """Load the installed plugins (those in ``allow`` only, if given).

    A plugin that fails to import is reported and left out; the others load.
    ``extra`` registers (name, plugin) pairs directly -- tests use it.
    """
    if allow is None:
        allow = parse_plugin_list(os.environ.get("TAPIO_LOAD_PLUGINS"))
    allowed = set(allow) if allow is not None else None
    pm = make_plugin_manager()
    failed: dict[str, str] = {}
    distributions: dict[str, importlib.metadata.Distribution | None] = {}
    found: set[str] = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        found.add(ep.name)
        if pm.get_plugin(ep.name) is not None:
            log.warning("plugin %s is installed twice; keeping the first", ep.name)
            continue
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the host down
            _failed(failed, ep.name, exc)
            continue
        distributions[ep.name] = ep.dist
    for name, plugin in extra:
        found.add(name)
        pm.register(plugin, name=name)
        distributions[name] = None
    if allowed is not None:
        missing = sorted(allowed - found)
        if missing:
            raise PluginError(
                f"plugin(s) not installed: {', '.join(missing)} (see `tapio plugins` for what is installed)"
            )
    while True:  # a misspelled hook leaves that plugin out, named, like one that fails to import
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            pm.unregister(exc.plugin)
            _failed(failed, name, PluginError(f"implements an unknown hook: {exc}"))
    declared = [_collect(pm, hook, what, failed) for hook, what in (
        ("tapio_register_observers", "observer"), ("tapio_register_sinks", "sink"),
        ("tapio_register_enrichers", "enricher"))]
    for name in failed:  # a plugin that failed in one registration hook declares nothing at all
        for table in declared:
            for key in [key for key, (plugin, _) in table.items() if plugin == name]:
                del table[key]
        if pm.get_plugin(name) is not None:
            pm.unregister(name=name)
    return LoadedPlugins(pm, *declared, failed, distributions)


def _failed(failed: dict[str, str], name: str, exc: Exception) -> None:
    failed[name] = f"{type(exc).__name__}: {exc}"
    log.error("plugin %s failed to load and is left out: %s", name, failed[name])


def _collect(pm: pluggy.PluginManager, hook_name: str, what: str, failed: dict[str, str]) -> dict[str, tuple[str, Any]]:
    """Call a registration hook plugin by plugin, so we know who declared what.

    Two plugins declaring one name stop the host (which one was meant is the
    user's choice); any other error in a plugin's registration leaves that plugin out.
    """
    declared: dict[str, tuple[str, Any]] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        # Through pluggy (so TAPIO_TRACE_PLUGINS sees the call), with every other plugin left out.
        others = [plugin for plugin in pm.get_plugins() if plugin is not impl.plugin]
        only_this = pm.subset_hook_caller(hook_name, others)

        def register(spec: Any, _plugin: str = impl.plugin_name) -> None:
            if spec.name in declared:
                raise PluginError(
                    f"{what} {spec.name!r} is declared by both plugin {declared[spec.name][0]!r} "
                    f"and plugin {_plugin!r}; uninstall one or choose with --plugins"
                )
            declared[spec.name] = (_plugin, spec)

        try:
            only_this(**{name: register for name in hook.spec.argnames})
        except PluginError:
            raise
        except Exception as exc:
            _failed(failed, impl.plugin_name, exc)
    return declared
