"""The real ``kubernetes`` client keeping the pod cache current against an API server run by the test.

:mod:`k8s_api_server` serves list and watch for pods on 127.0.0.1 (chunked
watch streams, resource versions, bookmarks, ``410 Gone``, cut connections,
injected HTTP errors) and ReplicaSet/Job GETs; the watcher talks to it through
a kubeconfig, exactly as the agent does. Backoff delays are checked through an
injected sleep, never by the clock.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import attrs
import pytest
from k8s_api_server import (
    FakeApiServer,
    free_port,
    make_job,
    make_pod,
    make_replica_set,
    owner_ref,
    serve,
    write_kubeconfig,
)

from tapio_core import Occurrence
from tapio_core.config import ConfigError, load_settings
from tapio_core.occurrence import KernelClock
from tapio_core.pipeline import Pipeline
from tapio_core.plugins import load_plugins
from tapio_core.sink import SinkOptions
from tapio_enrich_kubernetes.cgroups import CgroupMap
from tapio_enrich_kubernetes.enrich import KubernetesEnricher
from tapio_enrich_kubernetes.pods import PodCache, PodInfo, Workload
from tapio_enrich_kubernetes.settings import KubernetesSettings, KubernetesTable, SettingsError
from tapio_enrich_kubernetes.watch import Backoff, PodWatcher

NODE = "node-a"
OTHER_NODE = "node-b"


def cid(n: int) -> str:
    return f"{n:064x}"


def eventually(predicate, timeout: float = 10.0, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {message or predicate}")
        time.sleep(0.02)


class Sleeps:
    """The watcher's sleep: records each backoff delay, waits only briefly."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def __call__(self, delay: float) -> bool:
        self.delays.append(round(delay, 6))
        time.sleep(0.02)
        return False


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    with serve() as server:
        yield server


def settings_for(kubeconfig: Path, **overrides) -> KubernetesSettings:
    values = dict(enabled=True, node_name=NODE, kubeconfig=kubeconfig, watch_timeout_s=30,
                  backoff_initial_s=0.05, backoff_max_s=0.4, request_timeout_s=5.0)
    values.update(overrides)
    return KubernetesSettings(**values)


@contextmanager
def watching(settings: KubernetesSettings, cache: PodCache | None = None, **options) -> Iterator[PodWatcher]:
    options.setdefault("sleep", Sleeps())
    options.setdefault("jitter", lambda: 0.0)
    watcher = PodWatcher(settings, cache or PodCache(), **options)
    watcher.start()
    try:
        yield watcher
    finally:
        watcher.stop()


def synced(watcher: PodWatcher, api: FakeApiServer) -> None:
    eventually(lambda: watcher.state == "synced" and api.watches_open >= 1, message="watch open")


def rs_with_deployment(api: FakeApiServer, name: str, namespace: str = "default") -> tuple[dict, dict]:
    deployment = owner_ref("Deployment", name)
    rs = owner_ref("ReplicaSet", f"{name}-7d9f8c")
    api.add_object("replicasets", make_replica_set(rs["name"], namespace, rs["uid"], deployment))
    return rs, deployment


# -- list and watch --------------------------------------------------------------------------------


def test_lists_then_watches_only_this_nodes_pods_from_the_lists_version(api, tmp_path):
    mine = make_pod("web-1", node=NODE, containers=[("app", cid(1))])
    api.add_pod(mine)
    api.add_pod(make_pod("elsewhere", node=OTHER_NODE, containers=[("app", cid(2))]))
    cache = PodCache()
    with watching(settings_for(write_kubeconfig(tmp_path / "kc", api.url)), cache) as watcher:
        synced(watcher, api)
        [listed] = api.requests_of("list")
        [watch] = api.requests_of("watch")
        assert listed["query"]["fieldSelector"] == f"spec.nodeName={NODE}"
        assert watch["query"]["fieldSelector"] == f"spec.nodeName={NODE}"
        assert watch["query"]["resourceVersion"] == "102"  # the list's collection version
        assert watch["query"]["allowWatchBookmarks"] == "true"
        assert listed["authorization"] == "Bearer tapio-test-token"
        assert cache.get(mine["metadata"]["uid"]).containers == {cid(1): "app"}
        assert cache.counts()["known"] == 1

        added = make_pod("web-2", node=NODE, namespace="shop", containers=[("app", cid(3)), ("proxy", cid(4))])
        api.add_pod(added)
        api.add_pod(make_pod("elsewhere-2", node=OTHER_NODE))
        eventually(lambda: cache.get(added["metadata"]["uid"]) is not None)
        info = cache.get(added["metadata"]["uid"])
        assert (info.namespace, info.name, info.containers) == ("shop", "web-2", {cid(3): "app", cid(4): "proxy"})

        api.delete_pod(added["metadata"]["uid"])
        eventually(lambda: cache.counts()["ended_kept"] == 1)
        assert cache.get(added["metadata"]["uid"]) is not None, "an ended pod stays for late kernel events"
    assert len(api.requests_of("list")) == 1
    assert len(api.requests_of("watch")) == 1, "events arrive on the one open watch, no request per event"
    assert watcher.counters["watch_events"] == 2  # web-2 added and deleted; node-b's never reach us


def test_a_restarted_container_keeps_the_id_of_its_previous_run(api, tmp_path):
    pod = make_pod("crashy", node=NODE, containers=[("app", cid(20))], restarted={"app": cid(10)})
    api.add_pod(pod)
    cache = PodCache()
    with watching(settings_for(write_kubeconfig(tmp_path / "kc", api.url)), cache) as watcher:
        synced(watcher, api)
        uid = pod["metadata"]["uid"]
        assert cache.get(uid).containers == {cid(10): "app", cid(20): "app"}
        api.update_pod(make_pod("crashy", node=NODE, uid=uid, containers=[("app", cid(30))],
                                restarted={"app": cid(20)}))
        eventually(lambda: cid(30) in cache.get(uid).containers)
        assert cache.get(uid).containers == {cid(10): "app", cid(20): "app", cid(30): "app"}


def test_bookmark_moves_the_version_a_reconnect_resumes_from(api, tmp_path):
    api.add_pod(make_pod("web-1", node=NODE))
    with watching(settings_for(write_kubeconfig(tmp_path / "kc", api.url))) as watcher:
        synced(watcher, api)
        for n in range(3):  # other nodes' changes move the collection's version, invisibly to us
            api.add_pod(make_pod(f"other-{n}", node=OTHER_NODE))
        revision = api.bookmark()
        eventually(lambda: watcher.counters["bookmarks"] == 1)
        assert watcher.resource_version == str(revision) == "104"
        api.drop_watches()
        eventually(lambda: len(api.requests_of("watch")) == 2)
        assert api.requests_of("watch")[1]["query"]["resourceVersion"] == "104"
    assert len(api.requests_of("list")) == 1, "a bookmark's version is resumable: no re-list"


def test_dropped_watch_reconnects_from_the_last_version_with_growing_backoff(api, tmp_path):
    pod = make_pod("web-1", node=NODE)
    api.add_pod(pod)
    sleeps = Sleeps()
    with watching(settings_for(write_kubeconfig(tmp_path / "kc", api.url)), sleep=sleeps) as watcher:
        synced(watcher, api)
        api.update_pod(pod)
        eventually(lambda: watcher.resource_version == "102")
        with api.outage():  # the watch is cut and every attempt gets 503
            eventually(lambda: len(sleeps.delays) >= 6)
            assert watcher.state == "unreachable"
            assert watcher.last_error == "HTTP 503 Service Unavailable"
        assert sleeps.delays[:6] == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
        synced(watcher, api)
        assert api.requests_of("watch")[-1]["query"]["resourceVersion"] == "102"
        assert len(api.requests_of("list")) == 1, "the history was still there: no re-list"
        api.update_pod(pod)
        eventually(lambda: watcher.resource_version == "103")
        failures = len(sleeps.delays)
        api.drop_watches()
        eventually(lambda: len(sleeps.delays) > failures)
        assert sleeps.delays[failures] == 0.05, "a watch that delivered events resets the backoff"


def test_410_gone_lists_again_and_reconciles_what_changed_meanwhile(api, tmp_path):
    stays = make_pod("stays", node=NODE, containers=[("app", cid(1))])
    leaves = make_pod("leaves", node=NODE, containers=[("app", cid(2))])
    api.add_pod(stays)
    api.add_pod(leaves)
    cache = PodCache()
    with watching(settings_for(write_kubeconfig(tmp_path / "kc", api.url)), cache) as watcher:
        synced(watcher, api)
        before = watcher.resource_version
        arrives = make_pod("arrives", node=NODE, containers=[("app", cid(3))])
        with api.outage():
            eventually(lambda: watcher.state == "unreachable")
            api.delete_pod(leaves["metadata"]["uid"])
            api.add_pod(arrives)
            api.compact()  # the server no longer has the history we missed
        eventually(lambda: watcher.counters["relists_after_gone"] == 1 and len(api.requests_of("list")) == 2)
        synced(watcher, api)
        assert cache.get(arrives["metadata"]["uid"]) is not None
        assert cache.counts() == {"known": 2, "ended_kept": 1, "workloads_resolved": 0}
        gone_watch = [w for w in api.requests_of("watch") if w["query"]["resourceVersion"] == before]
        assert len(gone_watch) >= 2  # the first watch, and the one answered 410
        assert api.requests_of("watch")[-1]["query"]["resourceVersion"] == "104"


def test_an_event_the_client_cannot_read_is_skipped_without_stalling_the_watch(api, tmp_path):
    pod = make_pod("web-1", node=NODE)
    api.add_pod(pod)
    cache = PodCache()
    with watching(settings_for(write_kubeconfig(tmp_path / "kc", api.url)), cache) as watcher:
        synced(watcher, api)
        broken = make_pod("broken", node=NODE)
        broken["status"]["containerStatuses"] = "not a list"
        api.add_pod(broken)
        later = make_pod("later", node=NODE)
        api.add_pod(later)
        eventually(lambda: cache.get(later["metadata"]["uid"]) is not None)
        assert watcher.counters["malformed_events"] == 1
        assert watcher.resource_version == "103"
        assert cache.get(broken["metadata"]["uid"]) is None
    assert len(api.requests_of("watch")) == 1, "no reconnect"


def test_api_unreachable_at_start_then_reachable(tmp_path):
    port = free_port()
    cache = PodCache()
    kubeconfig = write_kubeconfig(tmp_path / "kc", f"http://127.0.0.1:{port}")
    with watching(settings_for(kubeconfig), cache) as watcher:
        eventually(lambda: watcher.counters["failures"] >= 2)
        assert watcher.state == "unreachable_at_start"
        assert "refused" in watcher.last_error.lower()
        assert cache.counts()["known"] == 0
        server = FakeApiServer()
        pod = make_pod("late", node=NODE)
        server.add_pod(pod)
        with serve(server, port=port):
            synced(watcher, server)
            assert cache.get(pod["metadata"]["uid"]) is not None
            assert watcher.last_error  # kept for status: what the last failure was


def test_missing_kubeconfig_is_reported_and_retried(tmp_path):
    with watching(settings_for(tmp_path / "absent")) as watcher:
        eventually(lambda: watcher.counters["failures"] >= 2)
        assert watcher.state == "misconfigured"
        assert "absent" in watcher.last_error or "kube-config" in watcher.last_error.lower()


def test_a_watch_closed_at_once_backs_off_instead_of_spinning(api, tmp_path):
    api.add_pod(make_pod("web-1", node=NODE))
    sleeps = Sleeps()
    with watching(settings_for(write_kubeconfig(tmp_path / "kc", api.url), watch_timeout_s=1),
                  sleep=sleeps) as watcher:
        synced(watcher, api)
        eventually(lambda: len(api.requests_of("watch")) >= 3, timeout=15)
    assert sleeps.delays[:2] == [0.05, 0.1]


# -- owners ---------------------------------------------------------------------------------------


def test_owners_resolved_once_each_to_the_workload_users_name(api, tmp_path):
    rs, deployment = rs_with_deployment(api, "web")
    job = owner_ref("Job", "backup-28911", api_version="batch/v1")
    cron = owner_ref("CronJob", "backup", api_version="batch/v1")
    api.add_object("jobs", make_job(job["name"], "default", job["uid"], cron))
    orphan_rs = owner_ref("ReplicaSet", "by-hand")
    api.add_object("replicasets", make_replica_set(orphan_rs["name"], "default", orphan_rs["uid"], None))
    deleted_rs = owner_ref("ReplicaSet", "already-gone")
    statefulset = owner_ref("StatefulSet", "db")
    daemonset = owner_ref("DaemonSet", "agent")
    node = owner_ref("Node", NODE, api_version="v1")
    pods = {
        "web-a": make_pod("web-a", node=NODE, owner=rs),
        "web-b": make_pod("web-b", node=NODE, owner=rs),
        "web-c": make_pod("web-c", node=NODE, owner=rs),
        "backup": make_pod("backup", node=NODE, owner=job),
        "by-hand": make_pod("by-hand", node=NODE, owner=orphan_rs),
        "gone": make_pod("gone", node=NODE, owner=deleted_rs),
        "db-0": make_pod("db-0", node=NODE, owner=statefulset),
        "agent": make_pod("agent", node=NODE, owner=daemonset),
        "static": make_pod("static", node=NODE, owner=node),
        "bare": make_pod("bare", node=NODE),
    }
    for pod in pods.values():
        api.add_pod(pod)
    cache = PodCache()
    with watching(settings_for(write_kubeconfig(tmp_path / "kc", api.url)), cache) as watcher:
        synced(watcher, api)
        for _ in range(3):  # status churn on the web pods must not cost lookups
            api.update_pod(pods["web-a"])
        eventually(lambda: watcher.counters["watch_events"] == 3)

        def workload(name: str) -> Workload | None:
            return cache.workload_of(cache.get(pods[name]["metadata"]["uid"]))

        as_workload = lambda ref: Workload(ref["kind"], ref["name"], ref["uid"])
        assert {workload(n) for n in ("web-a", "web-b", "web-c")} == {as_workload(deployment)}
        assert workload("backup") == as_workload(cron)
        assert workload("by-hand") == as_workload(orphan_rs)
        assert workload("gone") == as_workload(deleted_rs)
        assert workload("db-0") == as_workload(statefulset)
        assert workload("agent") == as_workload(daemonset)
        assert workload("static") is None
        assert workload("bare") is None
    gets = sorted(r["path"] for r in api.requests_of("get"))
    assert gets == [
        "/apis/apps/v1/namespaces/default/replicasets/already-gone",
        "/apis/apps/v1/namespaces/default/replicasets/by-hand",
        "/apis/apps/v1/namespaces/default/replicasets/web-7d9f8c",
        "/apis/batch/v1/namespaces/default/jobs/backup-28911",
    ]


def test_owner_lookup_refused_is_retried_on_its_own_until_it_succeeds(api, tmp_path):
    rs, deployment = rs_with_deployment(api, "web")
    pod = make_pod("web-a", node=NODE, owner=rs)
    api.add_pod(pod)
    api.fail_requests(403, 403, kind="get")
    cache = PodCache()
    settings = settings_for(write_kubeconfig(tmp_path / "kc", api.url), backoff_initial_s=0.3, backoff_max_s=0.6)
    with watching(settings, cache) as watcher:
        synced(watcher, api)
        info = cache.get(pod["metadata"]["uid"])
        assert cache.workload_of(info) == Workload("ReplicaSet", rs["name"], rs["uid"])
        assert watcher.counters["owner_lookup_failures"] == 1
        assert watcher.status()["owners_awaiting_retry"] == 1
        # no further event for the pod: the retries come on their own, after 0.3 s then 0.6 s
        eventually(lambda: cache.workload_of(info) == Workload("Deployment", "web", deployment["uid"]))
        gets = [r["at"] for r in api.requests_of("get")]
        assert watcher.counters["watch_events"] == 0
        assert watcher.counters["owner_lookup_failures"] == 2
        assert watcher.status()["owners_awaiting_retry"] == 0
        time.sleep(0.7)
    assert len(gets) == len(api.requests_of("get")) == 3, "once resolved, never looked up again"
    assert gets[1] - gets[0] >= 0.3 and gets[2] - gets[1] >= 0.6, "the retries back off"


def test_a_slow_owner_lookup_does_not_hold_up_the_watch(api, tmp_path):
    rs, deployment = rs_with_deployment(api, "web")
    other_rs, other_deployment = rs_with_deployment(api, "shop")
    first = make_pod("web-a", node=NODE, owner=rs)
    second = make_pod("shop-a", node=NODE, owner=other_rs)
    api.add_pod(first)
    cache = PodCache()
    settings = settings_for(write_kubeconfig(tmp_path / "kc", api.url), request_timeout_s=1.0)
    with watching(settings, cache) as watcher:
        with api.hold("get"):  # the API server takes forever to answer GETs
            synced(watcher, api)  # the list waited for the first lookup, its short timeout at most
            assert watcher.counters["owner_lookup_failures"] == 1
            api.add_pod(second)
            eventually(lambda: cache.get(second["metadata"]["uid"]) is not None)
            # published before its own owner's lookup (held by the server) has timed out: not waited for
            assert watcher.counters["owner_lookup_failures"] == 1, "while lookups time out, a new owner was waited for"
        # the API answers again; no event comes for either pod
        workload = lambda pod: cache.workload_of(cache.get(pod["metadata"]["uid"]))
        eventually(lambda: workload(first) == Workload("Deployment", "web", deployment["uid"]))
        eventually(lambda: workload(second) == Workload("Deployment", "shop", other_deployment["uid"]))
        assert watcher.counters["watch_events"] == 1


def test_ended_pods_are_forgotten_after_the_grace_period(api, tmp_path):
    now = [1000.0]
    cache = PodCache(grace_s=60, clock=lambda: now[0])
    ended = make_pod("ended", node=NODE)
    other = make_pod("other", node=NODE)
    api.add_pod(ended)
    api.add_pod(other)
    forgotten: list[list[str]] = []
    with watching(settings_for(write_kubeconfig(tmp_path / "kc", api.url)), cache,
                  on_pods_forgotten=forgotten.append) as watcher:
        synced(watcher, api)
        api.delete_pod(ended["metadata"]["uid"])
        eventually(lambda: cache.counts()["ended_kept"] == 1)
        now[0] += 59
        api.update_pod(other)
        eventually(lambda: watcher.counters["watch_events"] == 2)
        assert cache.get(ended["metadata"]["uid"]) is not None
        now[0] += 1
        api.update_pod(other)
        eventually(lambda: forgotten == [[ended["metadata"]["uid"]]])
        assert cache.get(ended["metadata"]["uid"]) is None


def test_backoff_doubles_to_its_cap_and_resets():
    backoff = Backoff(0.5, 30.0, jitter=lambda: 0.0)
    assert [backoff.next_delay() for _ in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    backoff.reset()
    assert backoff.next_delay() == 0.5
    spread = Backoff(1.0, 30.0, jitter=lambda: 1.0)
    assert spread.next_delay() == 0.75


# -- enrichment from the caches ---------------------------------------------------------------------


def occurrence(**data) -> Occurrence:
    return Occurrence(id="01JTAPIOTEST0000000000000", timestamp=datetime.now(UTC),
                      type="kernel.network.connection_refused", severity="warning", outcome="failure", data=data)


def entities(occ: Occurrence) -> list[tuple[str, str, str]]:
    return [(e.kind, e.id, e.name) for e in occ.context.entities]


def pod_dir(root: Path, uid: str) -> Path:
    path = (root / "kubepods.slice" / "kubepods-besteffort.slice"
            / f"kubepods-besteffort-pod{uid.replace('-', '_')}.slice")
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_enricher_names_pod_container_and_workload_from_local_caches_only(api, tmp_path):
    rs, deployment = rs_with_deployment(api, "web", namespace="shop")
    uid = str(uuid.uuid4())
    api.add_pod(make_pod("web-7d9f8c-x2x4q", node=NODE, namespace="shop", uid=uid, owner=rs,
                         containers=[("app", cid(1))]))
    container = pod_dir(tmp_path / "cg", uid) / f"cri-containerd-{cid(1)}.scope"
    container.mkdir()
    sandbox = pod_dir(tmp_path / "cg", uid) / f"cri-containerd-{cid(9)}.scope"
    sandbox.mkdir()
    host = tmp_path / "cg" / "system.slice"
    host.mkdir()
    settings = settings_for(write_kubeconfig(tmp_path / "kc", api.url))
    cgroups = CgroupMap(tmp_path / "cg", clock=lambda: 0.0)  # a frozen clock: misses never rescan here
    cgroups.scan()
    cache = PodCache()
    enricher = KubernetesEnricher(settings, cache, cgroups)
    with watching(settings, cache, on_new_containers=enricher._rescan_pods) as watcher:
        enricher.watcher = watcher
        synced(watcher, api)
        requests = len(api.requests)

        by_id = occurrence(cgroup_id=os.stat(container).st_ino)
        enricher.enrich(by_id)
        assert (by_id.context.node, by_id.context.namespace) == (NODE, "shop")
        assert entities(by_id) == [
            ("pod", uid, "shop/web-7d9f8c-x2x4q"),
            ("container", cid(1), "app"),
            ("deployment", deployment["uid"], "shop/web"),
        ]
        by_path = occurrence(cgroup_id=1, cgroup_path=f"/kubepods/besteffort/pod{uid}/{cid(1)}")  # a v1 path
        enricher.enrich(by_path)
        assert entities(by_path) == entities(by_id)

        in_sandbox = occurrence(cgroup_id=os.stat(sandbox).st_ino)  # the pause container: no status entry
        enricher.enrich(in_sandbox)
        assert [kind for kind, _, _ in entities(in_sandbox)] == ["pod", "deployment"]

        unknown_pod = occurrence(cgroup_path=f"/kubepods/besteffort/pod{uuid.uuid4()}/{cid(5)}")
        on_host = occurrence(cgroup_id=os.stat(host).st_ino)
        # a v1 memory cgroup's id numbers another hierarchy: even equal to a pod's v2 id it names nothing
        v1_host = occurrence(cgroup_id=os.stat(container).st_ino, cgroup_path="/system.slice", cgroup_version=1)
        no_cgroup = occurrence(pid=1)
        for occ in (unknown_pod, on_host, v1_host, no_cgroup):
            enricher.enrich(occ)
            assert (occ.context.node, occ.context.namespace, occ.context.entities) == (NODE, None, [])
        assert len(api.requests) == requests, "enrichment made API calls"

        # a container that starts later is indexed when the watch reports it, not by walking the tree
        late = pod_dir(tmp_path / "cg", uid) / f"cri-containerd-{cid(2)}.scope"
        late.mkdir()
        rescans = cgroups.counters["pod_rescans"]
        api.update_pod(make_pod("web-7d9f8c-x2x4q", node=NODE, namespace="shop", uid=uid, owner=rs,
                                containers=[("app", cid(1)), ("sidecar", cid(2))]))
        eventually(lambda: cgroups.counters["pod_rescans"] == rescans + 1)
        later = occurrence(cgroup_id=os.stat(late).st_ino)
        enricher.enrich(later)
        assert entities(later)[1] == ("container", cid(2), "sidecar")
        assert cgroups.counters["scans"] == 1

        status = enricher.status()
    assert status["api"]["state"] == "synced"
    assert status["pods"] == {"known": 1, "ended_kept": 0, "workloads_resolved": 1}
    assert status["occurrences"] == {"enriched": 4, "pod_unknown": 1, "outside_pods": 2, "no_cgroup": 1,
                                     "container_unknown": 1}
    assert status["cgroups"]["resolve_by"] == "rescan"


CONFIG_HASH = "0b6b7e1e4a0c5e0e8f8c6a1b2c3d4e5f"  # kubelet's UID of a static pod, which its cgroup is named after


def static_pod(uid: str, containers: list[tuple[str, str]]) -> dict:
    """kube-apiserver's mirror pod as kubelet writes it to the API: another UID, kubelet's in an annotation."""
    return make_pod(f"kube-apiserver-{NODE}", node=NODE, namespace="kube-system", uid=uid, containers=containers,
                    owner=owner_ref("Node", NODE, api_version="v1"),
                    annotations={"kubernetes.io/config.mirror": CONFIG_HASH, "kubernetes.io/config.hash": CONFIG_HASH,
                                 "kubernetes.io/config.source": "file"})


def test_a_static_pod_is_found_through_its_mirrors_annotation(api, tmp_path):
    mirror_uid = str(uuid.uuid4())
    api.add_pod(static_pod(mirror_uid, [("kube-apiserver", cid(1))]))
    container = pod_dir(tmp_path / "cg", CONFIG_HASH) / f"cri-containerd-{cid(1)}.scope"
    container.mkdir()
    settings = settings_for(write_kubeconfig(tmp_path / "kc", api.url))
    cgroups = CgroupMap(tmp_path / "cg", clock=lambda: 0.0)
    cgroups.scan()
    cache = PodCache()
    enricher = KubernetesEnricher(settings, cache, cgroups)
    changes: list[dict[str, set[str]]] = []

    def new_containers(changed: dict[str, set[str]]) -> None:
        changes.append(changed)
        enricher._rescan_pods(changed)

    with watching(settings, cache, on_new_containers=new_containers) as watcher:
        synced(watcher, api)
        by_id = occurrence(cgroup_id=os.stat(container).st_ino)
        by_path = occurrence(cgroup_path=f"/kubepods/burstable/pod{CONFIG_HASH}/{cid(1)}")
        for occ in (by_id, by_path):
            enricher.enrich(occ)
            assert occ.context.namespace == "kube-system"
            assert entities(occ) == [("pod", mirror_uid, f"kube-system/kube-apiserver-{NODE}"),
                                     ("container", cid(1), "kube-apiserver")]  # owned by the node: no workload

        late = container.parent / f"cri-containerd-{cid(2)}.scope"  # restarted after the scan
        late.mkdir()
        api.update_pod(static_pod(mirror_uid, [("kube-apiserver", cid(2))]))
        eventually(lambda: len(changes) == 2)  # the list's, then this update's
        assert changes == [{CONFIG_HASH: {cid(1)}}, {CONFIG_HASH: {cid(2)}}], "cgroups are named by kubelet's UID"
        restarted = occurrence(cgroup_id=os.stat(late).st_ino)
        enricher.enrich(restarted)
        assert entities(restarted)[1] == ("container", cid(2), "kube-apiserver")


def test_a_mirror_made_again_takes_over_and_the_static_pods_cgroups_are_forgotten_with_the_last():
    now = [0.0]
    cache = PodCache(grace_s=10, clock=lambda: now[0])
    old = PodInfo(uid="mirror-1", namespace="kube-system", name="etcd-n", containers={}, owner=None,
                  mirror_of=CONFIG_HASH)
    new = PodInfo(uid="mirror-2", namespace="kube-system", name="etcd-n", containers={}, owner=None,
                  mirror_of=CONFIG_HASH)
    cache.upsert(old)
    cache.mark_ended(old.uid)  # someone deleted the mirror; kubelet makes it again
    cache.upsert(new)
    assert cache.get(CONFIG_HASH).uid == "mirror-2"
    now[0] += 10
    assert cache.prune() == [], "the static pod still runs: its cgroups must stay known"
    assert cache.get(CONFIG_HASH).uid == "mirror-2"
    cache.mark_ended(new.uid)
    now[0] += 10
    assert cache.prune() == [CONFIG_HASH]
    assert cache.get(CONFIG_HASH) is None


# -- the plugin as the agent loads it -----------------------------------------------------------------


@pytest.fixture
def fresh_plugin(monkeypatch):
    for name in list(os.environ):
        if name == "NODE_NAME" or name.startswith("TAPIO_K8S_"):
            monkeypatch.delenv(name)
    return monkeypatch


def started_pipeline(settings: dict | None = None):
    """The kubernetes plugin through its entry point, built (with ``settings``: the config file and
    ``--set`` flags, see :func:`load_settings`) and started as the agent does."""
    plugins = load_plugins(["kubernetes"])
    pipeline = Pipeline.build(plugins, [], SinkOptions(data_dir=Path(".")), settings or {}, KernelClock(0))
    pipeline.start_enrichers()
    return plugins, pipeline


def test_settings_from_the_environment():
    assert KubernetesSettings.from_config(None, {}).enabled is False
    on = KubernetesSettings.from_config(
        None, {"NODE_NAME": "n1", "KUBECONFIG": "/k", "TAPIO_K8S_ENDED_POD_GRACE_S": "30"})
    assert (on.enabled, on.node_name, on.kubeconfig, on.ended_pod_grace_s) == (True, "n1", Path("/k"), 30.0)
    assert KubernetesSettings.from_config(None, {"NODE_NAME": "n1", "TAPIO_K8S_ENABLED": "0"}).enabled is False
    flagged = KubernetesSettings.from_config(None, {"TAPIO_K8S_ENABLED": "true"})
    assert (flagged.enabled, flagged.node_name) == (True, os.uname().nodename)
    for env, message in [
        ({"TAPIO_K8S_WATCH_TIMEOUT_S": "x"}, "TAPIO_K8S_WATCH_TIMEOUT_S must be a whole number of seconds, got 'x'"),
        ({"TAPIO_K8S_BACKOFF_MAX_S": "-1"}, "TAPIO_K8S_BACKOFF_MAX_S must be a positive number, got -1.0"),
        ({"TAPIO_K8S_ENABLED": "maybe"}, "TAPIO_K8S_ENABLED must be 1 or 0 (true/false), got 'maybe'"),
    ]:
        with pytest.raises(SettingsError) as raised:
            KubernetesSettings.from_config(None, env)
        assert str(raised.value) == message


def test_table_keys_override_their_environment_variables():
    env = {"NODE_NAME": "n1", "TAPIO_K8S_ENDED_POD_GRACE_S": "30", "TAPIO_K8S_WATCH_TIMEOUT_S": "60"}
    assert KubernetesSettings.from_config(KubernetesTable(), env) == KubernetesSettings.from_config(None, env)
    table = KubernetesTable(ended_pod_grace_s=90, kubeconfig="/etc/kc", watch_timeout_s=120.0)
    both = KubernetesSettings.from_config(table, env)
    assert (both.enabled, both.node_name, both.kubeconfig, both.ended_pod_grace_s, both.watch_timeout_s) == (
        True, "n1", Path("/etc/kc"), 90, 120)
    assert type(both.watch_timeout_s) is int
    assert KubernetesSettings.from_config(KubernetesTable(enabled=False), env).enabled is False
    assert KubernetesSettings.from_config(KubernetesTable(enabled=True), {"TAPIO_K8S_ENABLED": "0"}).enabled is True
    named = KubernetesSettings.from_config(KubernetesTable(node_name="n2"), env)
    assert (named.enabled, named.node_name) == (True, "n2")
    flagged = KubernetesSettings.from_config(KubernetesTable(enabled=True), {})
    assert (flagged.enabled, flagged.node_name) == (True, os.uname().nodename)
    overridden = KubernetesSettings.from_config(KubernetesTable(backoff_max_s=5), {"TAPIO_K8S_BACKOFF_MAX_S": "x"})
    assert overridden.backoff_max_s == 5, "a variable the table overrides is not read"


def test_the_table_has_a_key_for_every_setting():
    assert [f.name for f in attrs.fields(KubernetesTable)] == [f.name for f in attrs.fields(KubernetesSettings)]


@pytest.mark.parametrize(("assignment", "message"), [
    ("kubernetes.enabled=maybe", "'enabled' must be true or false, got 'maybe'"),
    ("kubernetes.enabled=1", "'enabled' must be true or false, got 1"),
    ("kubernetes.ended_pod_grace_s=soon", "'ended_pod_grace_s' must be a positive number of seconds, got 'soon'"),
    ("kubernetes.backoff_max_s=-1", "'backoff_max_s' must be a positive number of seconds, got -1"),
    ("kubernetes.watch_timeout_s=2.5", "'watch_timeout_s' must be a positive whole number of seconds, got 2.5"),
    ('kubernetes.node_name=""', "'node_name' must be a non-empty string, got ''"),
    ("kubernetes.kubeconfig=true", "'kubeconfig' must be a path, got True"),
    ("kubernetes.node=x", "unknown key node (known: backoff_initial_s, backoff_max_s, cgroup_root, enabled, "
                          "ended_pod_grace_s, kubeconfig, node_name, request_timeout_s, rescan_interval_s, "
                          "watch_timeout_s)"),
])
def test_a_bad_key_in_the_table_stops_start_up_with_one_line_naming_it(fresh_plugin, assignment, message):
    with pytest.raises(ConfigError) as raised:
        started_pipeline(load_settings(None, [assignment]))
    assert str(raised.value) == f"config [kubernetes]: {message}"


def test_turned_on_by_the_config_file_and_set_flags_without_node_name(fresh_plugin, api, tmp_path):
    """`tapio-agent --config tapio.toml --set kubernetes.enabled=true`, no NODE_NAME in the environment."""
    uid = str(uuid.uuid4())
    api.add_pod(make_pod("web-1", node=NODE, namespace="shop", uid=uid, containers=[("app", cid(1))]))
    config = tmp_path / "tapio.toml"
    kubeconfig = write_kubeconfig(tmp_path / "kc", api.url)
    config.write_text(f'[kubernetes]\nnode_name = "{NODE}"\nkubeconfig = "{kubeconfig}"\nended_pod_grace_s = 60\n')
    fresh_plugin.setenv("TAPIO_K8S_ENABLED", "0")  # the flag wins over the variable
    _, pipeline = started_pipeline(load_settings(config, ["kubernetes.enabled=true"]))
    try:
        [enricher] = pipeline.enrichers
        assert enricher.status == "running"
        assert enricher.config == KubernetesTable(enabled=True, node_name=NODE, kubeconfig=str(tmp_path / "kc"),
                                                  ended_pod_grace_s=60)
        eventually(lambda: enricher.report()["api"]["state"] == "synced" and enricher.report()["pods"]["known"] == 1)
        occ = occurrence(cgroup_path=f"/kubepods/besteffort/pod{uid}/{cid(1)}")
        pipeline.enrich(enricher, occ)
        assert occ.context.node == NODE
        assert entities(occ) == [("pod", uid, "shop/web-1"), ("container", cid(1), "app")]
    finally:
        pipeline.stop_enrichers()
    eventually(lambda: not [t for t in threading.enumerate() if t.name == "tapio-k8s-watch"])


def test_bad_setting_stops_start_up_with_one_line(fresh_plugin):
    fresh_plugin.setenv("NODE_NAME", NODE)
    fresh_plugin.setenv("TAPIO_K8S_ENDED_POD_GRACE_S", "soon")
    with pytest.raises(ConfigError) as raised:
        started_pipeline()
    assert str(raised.value) == (
        "kubernetes enrichment: TAPIO_K8S_ENDED_POD_GRACE_S must be a number of seconds, got 'soon'")


def test_without_node_name_the_plugin_is_off(fresh_plugin):
    _, pipeline = started_pipeline()
    [enricher] = pipeline.enrichers
    assert (enricher.status, enricher.status_reason) == (
        "disabled", "NODE_NAME is not set (nor kubernetes.enabled = true or TAPIO_K8S_ENABLED=1)")
    assert not [t for t in threading.enumerate() if t.name == "tapio-k8s-watch"]


def test_loading_the_plugin_starts_nothing(fresh_plugin):
    fresh_plugin.setenv("NODE_NAME", NODE)
    plugins = load_plugins(["kubernetes"])  # what `tapio plugins` and `tapio replay` do
    assert set(plugins.enrichers) == {"kubernetes"}
    assert not [t for t in threading.enumerate() if t.name == "tapio-k8s-watch"]


def test_started_through_its_entry_point_it_watches_and_enriches(fresh_plugin, api, tmp_path):
    uid = str(uuid.uuid4())
    api.add_pod(make_pod("web-1", node=NODE, namespace="shop", uid=uid, containers=[("app", cid(1))]))
    fresh_plugin.setenv("NODE_NAME", NODE)
    fresh_plugin.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kc", api.url)))
    _, pipeline = started_pipeline()
    try:
        [enricher] = pipeline.enrichers
        assert enricher.status == "running"
        eventually(lambda: enricher.report()["api"]["state"] == "synced" and enricher.report()["pods"]["known"] == 1)
        occ = occurrence(cgroup_path=f"/kubepods/besteffort/pod{uid}/{cid(1)}")
        pipeline.enrich(enricher, occ)
        assert entities(occ) == [("pod", uid, "shop/web-1"), ("container", cid(1), "app")]
    finally:
        pipeline.stop_enrichers()
    eventually(lambda: not [t for t in threading.enumerate() if t.name == "tapio-k8s-watch"])
