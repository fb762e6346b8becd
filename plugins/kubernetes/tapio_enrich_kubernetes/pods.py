"""The local cache of this node's pods that enrichment answers from.

The watch thread writes it, the agent's thread reads it; one lock guards
plain dicts of immutable values, so a reader holds the lock for a dict get.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs

#: Owners that are themselves owned by the workload users name (ReplicaSet -> Deployment, Job -> CronJob).
INTERMEDIATE_OWNERS = frozenset({"ReplicaSet", "Job"})
#: Container ids kept per pod: the current ones plus those of earlier restarts, for late events.
CONTAINERS_KEPT_PER_POD = 64
#: On a static pod's mirror: the UID kubelet runs the pod under (its config hash), which names its cgroup.
MIRROR_ANNOTATION = "kubernetes.io/config.mirror"


@attrs.frozen
class Workload:
    kind: str
    name: str
    uid: str


@attrs.frozen
class PodInfo:
    uid: str
    namespace: str
    name: str
    #: container id (without the ``containerd://`` scheme) -> container name
    containers: dict[str, str]
    #: the controller owner reference, as written on the pod
    owner: Workload | None
    resource_version: str | None = None
    #: a static pod's mirror: the UID kubelet knows the pod by, not the API's
    mirror_of: str | None = None

    @property
    def cgroup_uid(self) -> str:
        """The UID the pod's cgroup is named after."""
        return self.mirror_of or self.uid


def container_id(status_id: str | None) -> str | None:
    """``containerd://abc…`` -> ``abc…`` (the id the runtime names the cgroup after)."""
    if not status_id:
        return None
    return status_id.rpartition("://")[2] or None


def controller_of(metadata: dict[str, Any]) -> Workload | None:
    """The owner reference with ``controller: true`` (else the first), from an object's JSON metadata."""
    references = list(metadata.get("ownerReferences") or [])
    if not references:
        return None
    chosen = next((ref for ref in references if ref.get("controller")), references[0])
    return Workload(kind=chosen["kind"], name=chosen["name"], uid=chosen.get("uid", ""))


def pod_info(pod: dict[str, Any]) -> PodInfo:
    """A :class:`PodInfo` from a pod as the API's JSON has it: every container id its status names.

    Read as JSON, not as the client's ``V1Pod`` model: building the models (pydantic ones in recent
    clients) cost the agent about 40 MB for a node's pods, to read a dozen fields.
    """
    status = pod.get("status") or {}
    containers: dict[str, str] = {}
    for group in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for entry in status.get(group) or []:
            # The previous run's id: its exit is reported after the restart that replaced it.
            last = ((entry.get("lastState") or {}).get("terminated") or {}).get("containerID")
            for found in (last, entry.get("containerID")):
                cid = container_id(found)
                if cid is not None:
                    containers[cid] = entry["name"]
    meta = pod["metadata"]
    mirror_of = (meta.get("annotations") or {}).get(MIRROR_ANNOTATION) or None
    return PodInfo(
        uid=meta["uid"], namespace=meta.get("namespace", ""), name=meta["name"], containers=containers,
        owner=controller_of(meta), resource_version=meta.get("resourceVersion"),
        mirror_of=mirror_of if mirror_of != meta["uid"] else None,
    )


class PodCache:
    """Pods by UID; ended pods stay ``grace_s`` seconds so late kernel events still find them.

    A static pod's mirror is found under its API UID and under the UID kubelet
    runs it with (the ``kubernetes.io/config.mirror`` annotation), which is the
    one in its cgroup's name.
    """

    def __init__(self, grace_s: float = 300.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pods: dict[str, PodInfo] = {}
        self._ended: dict[str, float] = {}  # uid -> when it ended
        self._mirrors: dict[str, str] = {}  # kubelet's UID of a static pod -> its mirror's API UID
        self._workloads: dict[tuple[str, str, str], Workload] = {}

    def get(self, uid: str) -> PodInfo | None:
        """The pod by its API UID or, for a static pod, by the UID its cgroup is named after."""
        with self._lock:
            found = self._pods.get(uid)
            if found is None and uid in self._mirrors:
                found = self._pods.get(self._mirrors[uid])
            return found

    def upsert(self, pod: PodInfo) -> set[str]:
        """Add or update a pod; returns the container ids not known for it before."""
        with self._lock:
            previous = self._pods.get(pod.uid)
            known = previous.containers if previous is not None else {}
            new_ids = set(pod.containers) - set(known)
            if previous is not None:
                merged = dict(known)
                merged.update(pod.containers)
                if len(merged) > CONTAINERS_KEPT_PER_POD:  # keep the newest: the status's ids come last
                    merged = dict(list(merged.items())[-CONTAINERS_KEPT_PER_POD:])
                pod = attrs.evolve(pod, containers=merged)
            self._pods[pod.uid] = pod
            self._ended.pop(pod.uid, None)
            if pod.mirror_of is not None:  # a mirror deleted and made again points at the newest
                self._mirrors[pod.mirror_of] = pod.uid
            return new_ids

    def mark_ended(self, uid: str) -> None:
        with self._lock:
            if uid in self._pods and uid not in self._ended:
                self._ended[uid] = self._clock()

    def replace(self, pods: Iterable[PodInfo]) -> dict[str, set[str]]:
        """A full list from the API: pods absent from it have ended. Returns new container ids per cgroup UID."""
        listed = list(pods)
        new_ids = {pod.cgroup_uid: self.upsert(pod) for pod in listed}
        present = {pod.uid for pod in listed}
        with self._lock:
            missing = [uid for uid in self._pods if uid not in present]
        for uid in missing:
            self.mark_ended(uid)
        return new_ids

    def prune(self) -> list[str]:
        """Forget pods ended more than ``grace_s`` ago; returns the UIDs their cgroups are named after
        (a static pod's only when no newer mirror of it is known)."""
        now = self._clock()
        forgotten: list[str] = []
        with self._lock:
            expired = [uid for uid, ended in self._ended.items() if now - ended >= self.grace_s]
            for uid in expired:
                del self._ended[uid]
                pod = self._pods.pop(uid)
                if pod.mirror_of is None:
                    forgotten.append(uid)
                elif self._mirrors.get(pod.mirror_of) == uid:
                    del self._mirrors[pod.mirror_of]
                    forgotten.append(pod.mirror_of)
            owners = {(p.namespace, p.owner.kind, p.owner.name) for p in self._pods.values() if p.owner}
            self._workloads = {key: w for key, w in self._workloads.items() if key in owners}
        return forgotten

    # -- workloads ------------------------------------------------------------------------

    def set_workload(self, namespace: str, owner: Workload, workload: Workload) -> None:
        with self._lock:
            self._workloads[(namespace, owner.kind, owner.name)] = workload

    def names_owner(self, namespace: str, kind: str, name: str) -> bool:
        """Whether a known pod (ended ones included) has this controller owner."""
        with self._lock:
            return any(p.owner is not None and (p.namespace, p.owner.kind, p.owner.name) == (namespace, kind, name)
                       for p in self._pods.values())

    def has_workload(self, namespace: str, owner: Workload) -> bool:
        with self._lock:
            return (namespace, owner.kind, owner.name) in self._workloads

    def workload_of(self, pod: PodInfo) -> Workload | None:
        """The workload users name: the owner's owner for ReplicaSets and Jobs once resolved, else the owner."""
        owner = pod.owner
        if owner is None or owner.kind == "Node":  # static pods' mirror objects are owned by the node
            return None
        if owner.kind in INTERMEDIATE_OWNERS:
            with self._lock:
                return self._workloads.get((pod.namespace, owner.kind, owner.name), owner)
        return owner

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {"known": len(self._pods) - len(self._ended), "ended_kept": len(self._ended),
                    "workloads_resolved": len(self._workloads)}
