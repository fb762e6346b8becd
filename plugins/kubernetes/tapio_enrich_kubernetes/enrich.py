"""Fills an occurrence's context from the cgroup it happened in, answering from local caches only."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from tapio_core import Context, Entity, Occurrence
from tapio_enrich_kubernetes.cgroups import CgroupMap, CgroupRef, HandleResolver, find_cgroup2_root, parse_cgroup_path
from tapio_enrich_kubernetes.pods import PodCache
from tapio_enrich_kubernetes.settings import KubernetesSettings
from tapio_enrich_kubernetes.watch import PodWatcher

log = logging.getLogger("tapio.kubernetes")

#: Outcomes counted per occurrence; ``enriched`` named its pod, the others say why not.
OUTCOMES = ("enriched", "pod_unknown", "outside_pods", "no_cgroup")


class KubernetesEnricher:
    """The pod cache, the cgroup map and the watch feeding them, behind one ``enrich`` call."""

    def __init__(self, settings: KubernetesSettings, cache: PodCache, cgroups: CgroupMap | None,
                 watcher: PodWatcher | None = None) -> None:
        self.settings = settings
        self.cache = cache
        self.cgroups = cgroups
        self.watcher = watcher
        self.counters = dict.fromkeys((*OUTCOMES, "container_unknown"), 0)

    @classmethod
    def start(cls, settings: KubernetesSettings, **watcher_options: Any) -> KubernetesEnricher:
        """Index this node's pod cgroups, then start watching its pods in a background thread."""
        cache = PodCache(grace_s=settings.ended_pod_grace_s)
        cgroups = open_cgroup_map(settings)
        enricher = cls(settings, cache, cgroups)
        enricher.watcher = PodWatcher(settings, cache, on_new_containers=enricher._rescan_pods,
                                      on_pods_forgotten=enricher._forget_pods, **watcher_options)
        enricher.watcher.start()
        return enricher

    def stop(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.cgroups is not None and self.cgroups.resolver is not None:
            self.cgroups.resolver.close()
            self.cgroups.resolver = None

    # -- the per-occurrence path ----------------------------------------------------------

    def enrich(self, occurrence: Occurrence) -> None:
        context = occurrence.context
        if context is None:
            context = occurrence.context = Context()
        if context.node is None:
            context.node = self.settings.node_name  # a fact of this agent, whatever the pod
        ref = self.cgroup_ref(occurrence.data)
        if ref is None:
            return
        pod = self.cache.get(ref.pod_uid)
        if pod is None:
            self.counters["pod_unknown"] += 1  # not listed yet, or the API is away: emitted as is
            return
        self.counters["enriched"] += 1
        if context.namespace is None:
            context.namespace = pod.namespace
        context.entities.append(Entity(kind="pod", id=pod.uid, name=f"{pod.namespace}/{pod.name}"))
        if ref.container_id is not None:
            name = pod.containers.get(ref.container_id)
            if name is None:
                self.counters["container_unknown"] += 1  # the sandbox, or not in the pod's status yet
            else:
                context.entities.append(Entity(kind="container", id=ref.container_id, name=name))
        workload = self.cache.workload_of(pod)
        if workload is not None:
            context.entities.append(
                Entity(kind=workload.kind.lower(), id=workload.uid, name=f"{pod.namespace}/{workload.name}"))

    def cgroup_ref(self, data: dict[str, Any]) -> CgroupRef | None:
        """The pod/container of the occurrence's ``cgroup_path`` if it names one, else of its ``cgroup_id``.

        An id is looked up only when it is a v2 one: ``cgroup_version: 1`` (the
        container observer on a v1 memory controller) means it numbers another
        hierarchy, whose ids collide with the unified one's.
        """
        path = data.get("cgroup_path")
        if isinstance(path, str) and path:
            ref = parse_cgroup_path(path)
            if ref is not None:
                return ref
        cgroup_id = data.get("cgroup_id")
        usable = isinstance(cgroup_id, int) and not isinstance(cgroup_id, bool) and cgroup_id > 0
        if not usable or data.get("cgroup_version", 2) != 2:
            self.counters["outside_pods" if path or usable else "no_cgroup"] += 1
            return None
        ref = self.cgroups.lookup(cgroup_id) if self.cgroups is not None else None
        if ref is None:
            self.counters["outside_pods"] += 1
        return ref

    # -- fed by the watch thread ----------------------------------------------------------

    def _rescan_pods(self, new_containers: dict[str, set[str]]) -> None:
        if self.cgroups is None:
            return
        for uid in new_containers:
            self.cgroups.rescan_pod(uid)

    def _forget_pods(self, uids: list[str]) -> None:
        if self.cgroups is not None:
            self.cgroups.forget_pods(uids)

    def status(self) -> dict[str, Any]:
        return {
            "enabled": True,
            "node": self.settings.node_name,
            "api": self.watcher.status() if self.watcher is not None else {"state": "not_started"},
            "pods": self.cache.counts(),
            "cgroups": {
                "root": str(self.cgroups.root) if self.cgroups is not None else None,
                "resolve_by": ("file handle" if self.cgroups is not None and self.cgroups.resolver is not None
                               else "rescan" if self.cgroups is not None else "cgroup_path only"),
                "indexed": len(self.cgroups) if self.cgroups is not None else 0,
                "counters": dict(self.cgroups.counters) if self.cgroups is not None else {},
            },
            "occurrences": dict(self.counters),
        }


def open_cgroup_map(settings: KubernetesSettings) -> CgroupMap | None:
    root: Path | None = settings.cgroup_root or find_cgroup2_root()
    if root is None or not root.is_dir():
        log.warning("kubernetes: no cgroup v2 hierarchy found%s: only occurrences carrying a cgroup_path get "
                    "pod context (set kubernetes.cgroup_root or TAPIO_K8S_CGROUP_ROOT to its mount)",
                    f" at {root}" if root else "")
        return None
    cgroups = CgroupMap(root, HandleResolver.open(root), rescan_interval_s=settings.rescan_interval_s)
    cgroups.scan()
    log.info("kubernetes: %d pod cgroup(s) indexed under %s", len(cgroups), root)
    return cgroups
