"""The workload users name for a pod's ReplicaSet (its Deployment) or Job (its CronJob): one GET per owner, cached.

The watch thread tries a new owner at once, with a short timeout, so the pod
is published already naming its Deployment. A lookup that fails (403, a
timeout, the API away) is retried by a thread of its own -- after
``backoff_initial_s``, doubling up to ``backoff_max_s`` -- for as long as a
known pod names that owner, so a pod that never changes again still gets its
Deployment once the API answers. While lookups time out, new owners go
straight to that thread: a slow API never holds the pod watch up for long.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from tapio_enrich_kubernetes.api import JOB, REPLICA_SET, api_get, describe_error, read_json
from tapio_enrich_kubernetes.pods import INTERMEDIATE_OWNERS, PodCache, Workload, controller_of
from tapio_enrich_kubernetes.settings import KubernetesSettings

log = logging.getLogger("tapio.kubernetes")

#: The watch thread waits at most this long for an owner; retries get the full request timeout.
INLINE_TIMEOUT_S = 2.0

Key = tuple[str, str, str]  # namespace, kind, name


class OwnerResolver:
    """Owner lookups for the watch thread (:meth:`resolve`) and the thread retrying the failed ones."""

    def __init__(self, settings: KubernetesSettings, cache: PodCache, api: Callable[[], Any],
                 counters: dict[str, int]) -> None:
        self.settings = settings
        self.cache = cache
        self._api = api
        self.counters = counters
        self.counters.update(owner_lookups=0, owner_lookup_failures=0)
        self._cond = threading.Condition()
        self._retry_at: dict[Key, float] = {}  # failed lookups -> when to try again (inf: in flight)
        self._failures: dict[Key, int] = {}
        self._owners: dict[Key, Workload] = {}
        self._slow: set[Key] = set()  # failed without an answer from the API (timeout, connection)
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._retry_loop, name="tapio-k8s-owners", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def pending(self) -> int:
        """Owners waiting for a retry."""
        with self._cond:
            return len(self._retry_at)

    def resolve(self, namespace: str, owner: Workload | None) -> None:
        """From the watch thread, for each pod it publishes: look the owner up unless known or queued."""
        if owner is None or owner.kind not in INTERMEDIATE_OWNERS or self.cache.has_workload(namespace, owner):
            return
        key = (namespace, owner.kind, owner.name)
        with self._cond:
            if key in self._retry_at:
                return  # the retry thread has it
            if self._slow:  # the API is slow to answer: do not wait for it here
                self._schedule(key, owner, 0.0)
                return
        failure = self._lookup(key, owner, min(INLINE_TIMEOUT_S, self.settings.request_timeout_s))
        if failure is not None:
            with self._cond:
                self._failed(key, owner, *failure)

    def _retry_loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopping:
                        return
                    key = min(self._retry_at, key=self._retry_at.__getitem__, default=None)
                    wait = None if key is None else self._retry_at[key] - time.monotonic()
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                self._retry_at[key] = math.inf
                owner = self._owners[key]
            failure = self._lookup(key, owner, self.settings.request_timeout_s)
            if failure is not None and not self.cache.names_owner(*key):
                failure = None  # its pods are gone: nothing left to name
            with self._cond:
                if failure is None:
                    self._done(key)
                else:
                    self._failed(key, owner, *failure)

    def _lookup(self, key: Key, owner: Workload, timeout: float) -> tuple[str, bool] | None:
        """GET the owner and cache the workload it names; else (why, whether the API did not answer)."""
        from kubernetes.client.exceptions import ApiException

        namespace = key[0]
        with self._cond:  # both threads count
            self.counters["owner_lookups"] += 1
        try:
            path = REPLICA_SET if owner.kind == "ReplicaSet" else JOB
            found = read_json(api_get(self._api(), path.format(namespace=quote(namespace, safe=""),
                                                               name=quote(owner.name, safe="")), [], timeout))
        except ApiException as exc:
            if exc.status != 404:
                return f"{exc.status} {exc.reason}", False
            workload = owner  # deleted already: the owner itself is the best name left
        except Exception as exc:
            return describe_error(exc), True
        else:
            workload = controller_of(found.get("metadata") or {}) or owner
        self.cache.set_workload(namespace, owner, Workload(workload.kind, workload.name, workload.uid))
        return None

    def _schedule(self, key: Key, owner: Workload, delay: float) -> None:
        self._owners[key] = owner
        self._retry_at[key] = time.monotonic() + delay
        self._cond.notify_all()

    def _failed(self, key: Key, owner: Workload, reason: str, slow: bool) -> None:
        self.counters["owner_lookup_failures"] += 1
        failures = self._failures.get(key, 0)
        if not failures:
            log.warning("kubernetes: cannot read %s %s/%s (%s): its pods name it until a retry succeeds",
                        key[1], key[0], key[2], reason)
        self._failures[key] = failures + 1
        (self._slow.add if slow else self._slow.discard)(key)
        delay = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * 2 ** min(failures, 30))
        self._schedule(key, owner, delay)

    def _done(self, key: Key) -> None:
        if self._failures.pop(key, 0):
            log.info("kubernetes: %s %s/%s read on retry", key[1], key[0], key[2])
        self._retry_at.pop(key, None)
        self._owners.pop(key, None)
        self._slow.discard(key)
