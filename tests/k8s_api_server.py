"""A small Kubernetes API server for tests: pods (list and watch), ReplicaSets and Jobs (get).

It speaks the real wire protocol the ``kubernetes`` client uses, on 127.0.0.1:

- ``GET /api/v1/pods?fieldSelector=spec.nodeName=N`` lists the pods of node N
  with the collection's resource version;
- the same with ``watch=true&resourceVersion=R`` streams, in chunked transfer
  encoding, one JSON event per line for every change after R (``ADDED``,
  ``MODIFIED``, ``DELETED``), ``BOOKMARK`` events when the test calls
  :meth:`FakeApiServer.bookmark` and the client allowed them, and an ``ERROR``
  event with a ``410 Gone`` Status when R is older than the history kept
  (:meth:`FakeApiServer.compact`); it ends cleanly after ``timeoutSeconds``;
- ``GET /apis/apps/v1/namespaces/NS/replicasets/NAME`` and
  ``/apis/batch/v1/namespaces/NS/jobs/NAME`` for owner resolution.

Tests drive failures: :meth:`drop_watches` cuts open watch connections
mid-stream, :meth:`fail_requests` answers with an HTTP error, :meth:`hold`
keeps requests unanswered (a slow server), and every request is recorded
(:attr:`requests`, with when it came) so tests can check what the client asked.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "tapio-test-token"


def make_pod(
    name: str,
    *,
    node: str,
    namespace: str = "default",
    uid: str | None = None,
    containers: list[tuple[str, str]] = (),
    owner: dict[str, Any] | None = None,
    runtime: str = "containerd",
    restarted: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A pod as the API returns it; ``containers`` are (name, 64-hex id); ``restarted`` maps a name
    to the id of its previous run (``lastState.terminated``)."""
    statuses = []
    for cname, cid in containers:
        status: dict[str, Any] = {
            "name": cname, "containerID": f"{runtime}://{cid}", "image": "busybox:1.36",
            "imageID": "docker.io/library/busybox@sha256:" + "0" * 64, "ready": True,
            "restartCount": 0, "started": True, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
            "lastState": {},
        }
        if restarted and cname in restarted:
            status["restartCount"] = 1
            status["lastState"] = {"terminated": {"exitCode": 3, "reason": "Error",
                                                  "containerID": f"{runtime}://{restarted[cname]}"}}
        statuses.append(status)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name, "namespace": namespace, "uid": uid or str(uuid.uuid4()),
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "ownerReferences": [owner] if owner else [], "annotations": annotations or {},
        },
        "spec": {"nodeName": node, "containers": [{"name": c, "image": "busybox:1.36"} for c, _ in containers]},
        "status": {"phase": "Running", "qosClass": "BestEffort", "containerStatuses": statuses},
    }


def owner_ref(kind: str, name: str, uid: str | None = None, api_version: str = "apps/v1") -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": uid or str(uuid.uuid4()),
            "controller": True, "blockOwnerDeletion": True}


def make_replica_set(name: str, namespace: str, uid: str, owner: dict[str, Any] | None) -> dict[str, Any]:
    """A ReplicaSet with its owner reference (a Deployment, usually)."""
    labels = {"app": name}
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "ownerReferences": [owner] if owner else []},
            "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [{"name": "app", "image": "busybox:1.36"}]}}}}


def make_job(name: str, namespace: str, uid: str, owner: dict[str, Any] | None) -> dict[str, Any]:
    """A Job with its owner reference (a CronJob, usually)."""
    return {"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "ownerReferences": [owner] if owner else []},
            "spec": {"template": {"spec": {"restartPolicy": "Never",
                                           "containers": [{"name": "job", "image": "busybox:1.36"}]}}}}


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class FakeApiServer:
    """The server's state and controls; :func:`serve` runs it."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.revision = 100
        self.oldest_revision = 100  # history from here on is kept
        self.pods: dict[str, dict[str, Any]] = {}
        self.history: list[tuple[int, str, dict[str, Any]]] = []
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}  # (resource, ns, name)
        self.requests: list[dict[str, Any]] = []
        self.failures: list[tuple[str | None, int]] = []  # (request kind or None for any, HTTP code)
        self.unavailable = False  # while set, every request gets 503
        self.held: set[str] = set()  # request kinds left unanswered while held
        self.watches_open = 0
        self._bookmarks = 0
        self._drops = 0
        self._closing = False
        self.httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    # -- changes ---------------------------------------------------------------------------

    def _change(self, kind: str, pod: dict[str, Any]) -> None:
        self.revision += 1
        pod = json.loads(json.dumps(pod))
        pod["metadata"]["resourceVersion"] = str(self.revision)
        if kind == "DELETED":
            self.pods.pop(pod["metadata"]["uid"], None)
        else:
            self.pods[pod["metadata"]["uid"]] = pod
        self.history.append((self.revision, kind, pod))
        self.lock.notify_all()

    def add_pod(self, pod: dict[str, Any]) -> None:
        with self.lock:
            self._change("ADDED", pod)

    def update_pod(self, pod: dict[str, Any]) -> None:
        with self.lock:
            self._change("MODIFIED", pod)

    def delete_pod(self, uid: str) -> None:
        with self.lock:
            self._change("DELETED", self.pods[uid])

    def add_object(self, resource: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        with self.lock:
            self.objects[(resource, meta["namespace"], meta["name"])] = obj

    # -- failures ----------------------------------------------------------------------------

    def bookmark(self) -> int:
        """Send a BOOKMARK at the current revision to every open watch that allowed bookmarks."""
        with self.lock:
            self._bookmarks += 1
            self.lock.notify_all()
            return self.revision

    def compact(self) -> None:
        """Forget the history: a watch from an older revision now gets ``410 Gone``."""
        with self.lock:
            self.oldest_revision = self.revision
            self.history.clear()

    def drop_watches(self) -> None:
        """Cut every open watch connection mid-stream (no terminating chunk)."""
        with self.lock:
            self._drops += 1
            self.lock.notify_all()

    @contextmanager
    def outage(self) -> Iterator[None]:
        """While inside: open watches are cut and every request is answered 503."""
        with self.lock:
            self.unavailable = True
            self._drops += 1
            self.lock.notify_all()
        try:
            yield
        finally:
            with self.lock:
                self.unavailable = False
                self.lock.notify_all()

    @contextmanager
    def hold(self, kind: str) -> Iterator[None]:
        """While inside: requests of ``kind`` (list, watch, get) get no answer; they are answered after."""
        with self.lock:
            self.held.add(kind)
        try:
            yield
        finally:
            with self.lock:
                self.held.discard(kind)
                self.lock.notify_all()

    def fail_requests(self, *codes: int, kind: str | None = None) -> None:
        """Answer the next ``len(codes)`` requests (of ``kind``: list, watch, get) with these HTTP codes."""
        with self.lock:
            self.failures.extend((kind, code) for code in codes)

    def wait_until(self, predicate, timeout: float = 10.0) -> bool:
        """Block until ``predicate(self)`` holds (checked on every request and change)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while not predicate(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.lock.wait(min(remaining, 0.1))
            return True

    def requests_of(self, kind: str) -> list[dict[str, Any]]:
        """Recorded requests of one kind: ``list``, ``watch``, ``get``."""
        with self.lock:
            return [r for r in self.requests if r["kind"] == kind]

    def close(self) -> None:
        with self.lock:
            self._closing = True
            self.lock.notify_all()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HttpServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet: pytest shows failures, not traffic
        pass

    def do_GET(self) -> None:
        api = self.server.api
        split = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        parts = [p for p in split.path.split("/") if p]
        watch = query.get("watch") in ("true", "1")
        kind = "watch" if watch else "list" if parts == ["api", "v1", "pods"] else "get"
        with api.lock:
            api.requests.append({"kind": kind, "path": split.path, "query": query, "at": time.monotonic(),
                                 "authorization": self.headers.get("Authorization")})
            failure = 503 if api.unavailable else None
            for index, (only, code) in enumerate(api.failures):
                if only in (None, kind):
                    failure = code
                    del api.failures[index]
                    break
            api.lock.notify_all()
            while kind in api.held and not api._closing:
                api.lock.wait(0.05)
        if failure is not None:
            return self._json(failure, status_object(failure, HTTPStatus(failure).phrase.replace(" ", ""),
                                                      "injected by the test"))
        if self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self._json(401, status_object(401, "Unauthorized", "Unauthorized"))
        if parts == ["api", "v1", "pods"]:
            selector = query.get("fieldSelector", "")
            node = selector.removeprefix("spec.nodeName=") if selector.startswith("spec.nodeName=") else None
            if node is None:
                return self._json(400, status_object(400, "BadRequest", "this server needs spec.nodeName=<node>"))
            return self._watch(node, query) if watch else self._list(node)
        if len(parts) == 7 and parts[:2] in (["apis", "apps"], ["apis", "batch"]) and parts[3] == "namespaces":
            with api.lock:
                obj = api.objects.get((parts[5], parts[4], parts[6]))
            if obj is None:
                return self._json(404, status_object(404, "NotFound", f"{parts[5]} {parts[6]} not found"))
            return self._json(200, obj)
        return self._json(404, status_object(404, "NotFound", f"no such path {split.path}"))

    def _json(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client gave up waiting (a held request)

    def _list(self, node: str) -> None:
        api = self.server.api
        with api.lock:
            items = [p for p in api.pods.values() if p["spec"]["nodeName"] == node]
            body = {"apiVersion": "v1", "kind": "PodList",
                    "metadata": {"resourceVersion": str(api.revision)}, "items": items}
        self._json(200, body)

    def _chunk(self, event: dict[str, Any]) -> None:
        data = json.dumps(event).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _watch(self, node: str, query: dict[str, str]) -> None:
        api = self.server.api
        since = int(query.get("resourceVersion") or api.revision)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        deadline = time.monotonic() + float(query.get("timeoutSeconds", 1800))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        with api.lock:
            api.watches_open += 1
            seen_bookmarks, seen_drops = api._bookmarks, api._drops
            api.lock.notify_all()
        try:
            if since < api.oldest_revision:
                self._chunk({"type": "ERROR", "object": status_object(
                    410, "Expired", f"too old resource version: {since} ({api.oldest_revision})")})
                self._end()
                return
            while True:
                with api.lock:
                    while True:
                        pending = [(rv, kind, pod) for rv, kind, pod in api.history
                                   if rv > since and pod["spec"]["nodeName"] == node]
                        bookmark = api._bookmarks != seen_bookmarks
                        dropped = api._drops != seen_drops
                        remaining = deadline - time.monotonic()
                        if pending or bookmark or dropped or api._closing or remaining <= 0:
                            break
                        api.lock.wait(min(remaining, 0.1))
                    seen_bookmarks = api._bookmarks
                    revision = api.revision
                if dropped or api._closing:
                    self.connection.shutdown(socket.SHUT_RDWR)  # mid-stream: no terminating chunk
                    return
                for rv, kind, pod in pending:
                    self._chunk({"type": kind, "object": pod})
                    since = rv
                if bookmark and bookmarks:
                    self._chunk({"type": "BOOKMARK", "object": {
                        "kind": "Pod", "apiVersion": "v1", "metadata": {"resourceVersion": str(revision)}}})
                    since = max(since, revision)
                if not pending and not bookmark and remaining <= 0:
                    self._end()
                    return
        except OSError:
            return  # the client went away
        finally:
            with api.lock:
                api.watches_open -= 1
                api.lock.notify_all()

    def _end(self) -> None:
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


class _HttpServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, api: FakeApiServer, port: int) -> None:
        self.api = api
        super().__init__(("127.0.0.1", port), _Handler)


@contextmanager
def serve(api: FakeApiServer | None = None, port: int = 0) -> Iterator[FakeApiServer]:
    """Run a :class:`FakeApiServer` on 127.0.0.1 in a background thread; always shut down afterwards."""
    api = api or FakeApiServer()
    api.httpd = _HttpServer(api, port)
    thread = threading.Thread(target=api.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield api
    finally:
        api.close()
        thread.join(5)


def write_kubeconfig(path: Path, server_url: str) -> Path:
    """A kubeconfig whose one context points at ``server_url`` with the server's token."""
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "tapio-test", "cluster": {"server": server_url}}],
        "users": [{"name": "tapio-test", "user": {"token": TOKEN}}],
        "contexts": [{"name": "tapio-test", "context": {"cluster": "tapio-test", "user": "tapio-test"}}],
        "current-context": "tapio-test",
    }))
    return path


def free_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound to learn it, then closed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
