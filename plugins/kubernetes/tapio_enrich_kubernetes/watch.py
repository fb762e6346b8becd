"""Keeps the pod cache current: list this node's pods once, then watch them.

One daemon thread. It lists with a field selector on ``spec.nodeName``,
watches from the list's resource version (bookmarks move it on while nothing
changes), re-watches from the last version it saw after a timeout or a dropped
connection (with exponential backoff after failures), and lists again only
when the server answers ``410 Gone``. Owner references that point to a
ReplicaSet or Job are resolved to their Deployment or CronJob by
:class:`~tapio_enrich_kubernetes.owners.OwnerResolver`, once per owner, never
per kernel event.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from tapio_enrich_kubernetes.api import PODS, api_error, api_get, describe_error, make_api_client, read_json
from tapio_enrich_kubernetes.owners import OwnerResolver
from tapio_enrich_kubernetes.pods import PodCache, pod_info
from tapio_enrich_kubernetes.settings import KubernetesSettings

log = logging.getLogger("tapio.kubernetes")

#: A watch connection open this long counts as healthy even if it brought no event.
HEALTHY_WATCH_S = 10.0


class Backoff:
    """Exponential delays between failed attempts: initial, x2 each failure, capped, with jitter."""

    def __init__(self, initial_s: float, max_s: float, jitter: Callable[[], float] = random.random) -> None:
        self.initial_s = initial_s
        self.max_s = max_s
        self._jitter = jitter
        self.failures = 0

    def next_delay(self) -> float:
        base = min(self.max_s, self.initial_s * 2 ** min(self.failures, 30))
        self.failures += 1
        return base * (1 - 0.25 * self._jitter())  # spread a node fleet's reconnects over a quarter of the delay

    def reset(self) -> None:
        self.failures = 0


class WatchGone(Exception):
    """The server no longer has history from our resource version (410 Gone): list again."""


class PodWatcher:
    """The background list/watch loop and what it has to say for ``tapio status``."""

    def __init__(
        self,
        settings: KubernetesSettings,
        cache: PodCache,
        on_new_containers: Callable[[dict[str, set[str]]], None] = lambda changed: None,
        on_pods_forgotten: Callable[[list[str]], None] = lambda uids: None,
        api_client_factory: Callable[[KubernetesSettings], Any] = make_api_client,
        sleep: Callable[[float], bool] | None = None,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.cache = cache
        self.on_new_containers = on_new_containers
        self.on_pods_forgotten = on_pods_forgotten
        self._api_client_factory = api_client_factory
        self._stopping = threading.Event()
        self._sleep = sleep or self._stopping.wait
        self.backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s, jitter)
        self.selector = f"spec.nodeName={settings.node_name}"
        self.resource_version: str | None = None
        self.state = "connecting"
        self.state_since = time.time()
        self.last_error = ""
        self.synced_once = False
        self.counters = {"lists": 0, "watches": 0, "relists_after_gone": 0, "failures": 0, "watch_events": 0,
                         "bookmarks": 0, "malformed_events": 0}
        self._api: Any = None
        self.owners = OwnerResolver(settings, cache, lambda: self._api, self.counters)
        self._response: Any = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self.owners.start()
        self._thread = threading.Thread(target=self.run, name="tapio-k8s-watch", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        response = self._response
        if response is not None:
            _shutdown(response)  # unblocks the read the thread is waiting in
        if self._thread is not None:
            self._thread.join(timeout)
        self.owners.stop(timeout)

    def run(self) -> None:
        while not self._stopping.is_set():
            try:
                if self._api is None:
                    self._api = self._api_client_factory(self.settings)
                if self.resource_version is None:
                    self.list_pods()
                self.watch_pods()
            except WatchGone:
                self.counters["relists_after_gone"] += 1
                log.info("pod watch expired (410 Gone) at resource version %s; listing again", self.resource_version)
                self.resource_version = None
            except Exception as exc:  # the API being away must never stop the agent
                if self._stopping.is_set():
                    break
                self._failed(exc)
            finally:
                self._prune()

    # -- list and watch -------------------------------------------------------------------

    def list_pods(self) -> None:
        pods = read_json(api_get(self._api, PODS, [("fieldSelector", self.selector)],
                                 self.settings.request_timeout_s))
        infos = [pod_info(pod) for pod in pods.get("items") or []]
        for info in infos:  # before the pods are published, so none is seen with its ReplicaSet only
            self.owners.resolve(info.namespace, info.owner)
        new_containers = self.cache.replace(infos)
        self.resource_version = pods["metadata"]["resourceVersion"]
        self.counters["lists"] += 1
        self.backoff.reset()
        self._set_state("synced")
        log.info("kubernetes: %d pod(s) on node %s at resource version %s",
                 len(infos), self.settings.node_name, self.resource_version)
        self.on_new_containers({uid: ids for uid, ids in new_containers.items() if ids})

    def watch_pods(self) -> None:
        from kubernetes import watch

        started = time.monotonic()
        query = [("fieldSelector", self.selector), ("resourceVersion", self.resource_version), ("watch", True),
                 ("allowWatchBookmarks", True), ("timeoutSeconds", int(self.settings.watch_timeout_s))]
        response = api_get(self._api, PODS, query,
                           (self.settings.request_timeout_s, self.settings.watch_timeout_s + 30.0))
        self._response = response
        events = 0
        try:
            if self._stopping.is_set():
                return  # stop() ran while the request was on its way and found no response to cut
            if not 200 <= response.status < 300:
                raise _api_exception(response)
            self.counters["watches"] += 1
            self._set_state("synced")
            for line in watch.watch.iter_resp_lines(response):
                if not line or line.isspace():
                    continue
                try:
                    event = json.loads(line)
                    if not isinstance(event, dict) or "type" not in event or not isinstance(event.get("object"), dict):
                        raise ValueError("not a watch event: no type or object")
                except ValueError as exc:  # one bad event must not stall the watch
                    self._malformed(line, exc)
                    continue
                self.apply_event(event)
                if not events:
                    self.backoff.reset()  # this connection works: the next failure starts the backoff over
                events += 1
                if self._stopping.is_set():
                    return
        finally:
            self._response = None
            response.release_conn()
        if time.monotonic() - started >= HEALTHY_WATCH_S:
            self.backoff.reset()
        elif not events:  # closed at once without an event: treat like a failure so we do not spin
            self._failed(ConnectionError("watch closed by the server without any event"))

    def apply_event(self, event: dict[str, Any]) -> None:
        kind = event["type"]
        raw = event["object"]
        if kind == "ERROR":
            code = raw.get("code") if isinstance(raw, dict) else None
            if code == 410:
                raise WatchGone(raw.get("message", ""))
            raise RuntimeError(f"watch error {code}: {raw.get('reason', '')} {raw.get('message', '')}".strip())
        self.counters["watch_events"] += 1
        if kind == "BOOKMARK":
            self.counters["bookmarks"] += 1
            self.resource_version = raw["metadata"]["resourceVersion"]
            return
        try:
            info = pod_info(raw)
        except (KeyError, TypeError, AttributeError) as exc:
            self._malformed(json.dumps(event), exc)
            return
        if kind != "DELETED":
            self.owners.resolve(info.namespace, info.owner)
        new_ids = self.cache.upsert(info)
        if kind == "DELETED":
            self.cache.mark_ended(info.uid)
        if info.resource_version:
            self.resource_version = info.resource_version
        if new_ids:
            self.on_new_containers({info.cgroup_uid: new_ids})
        self._prune()

    def _malformed(self, line: str, exc: Exception) -> None:
        """Skip the event but not its resource version, so a reconnect does not bring it back."""
        self.counters["malformed_events"] += 1
        with contextlib.suppress(ValueError, KeyError, TypeError):
            self.resource_version = str(json.loads(line)["object"]["metadata"]["resourceVersion"])
        log.warning("kubernetes: skipped a pod watch event the client cannot read (%s)", describe_error(exc))

    # -- state ----------------------------------------------------------------------------

    def _failed(self, exc: BaseException) -> None:
        self.counters["failures"] += 1
        self.last_error = describe_error(exc)
        delay = self.backoff.next_delay()
        state = "misconfigured" if self._api is None else "unreachable" if self.synced_once else "unreachable_at_start"
        if self.state != state:
            log.warning("kubernetes API %s (%s): occurrences go on with the pods known so far%s; retrying",
                        "not configured" if state == "misconfigured" else "unreachable", self.last_error,
                        "" if self.synced_once else " (none yet)")
        self._set_state(state)
        log.debug("kubernetes: next attempt in %.2f s", delay)
        self._sleep(delay)

    def _set_state(self, state: str) -> None:
        if state == "synced":
            if self.state.startswith("unreachable") and self.synced_once:
                log.info("kubernetes API reachable again; pod watch resumed")
            self.synced_once = True
        if state != self.state:
            self.state = state
            self.state_since = time.time()

    def _prune(self) -> None:
        forgotten = self.cache.prune()
        if forgotten:
            self.on_pods_forgotten(forgotten)

    def status(self) -> dict[str, Any]:
        return {
            "state": self.state, "since": self.state_since, "last_error": self.last_error,
            "field_selector": self.selector, "resource_version": self.resource_version,
            "counters": dict(self.counters), "owners_awaiting_retry": self.owners.pending(),
        }


def _api_exception(response: Any) -> Exception:
    exc = api_error(response)
    if response.status == 410:
        return WatchGone(exc.body or "")
    return exc


def _shutdown(response: Any) -> None:
    sock = getattr(getattr(response, "connection", None), "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
