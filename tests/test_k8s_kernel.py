"""Kubernetes enrichment end to end on this machine: real cgroups, real kernel events, the real agent.

The test makes cgroups where kubelet (systemd driver) and containerd would put
a container (``kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid>.slice/
cri-containerd-<id>.scope``) in the unified hierarchy and, for the container
observer on this machine's v1 memory controller, in the memory hierarchy; its
own API server (:mod:`k8s_api_server`) serves the pods with those UIDs and
container ids, their ReplicaSet/Deployment and Job/CronJob. Processes placed in
those cgroups then make the kernel refuse a connect, exit with a code and get
OOM-killed, and the real ``tapio-agent`` (``NODE_NAME`` and ``KUBECONFIG``
set) must name the pod, namespace, container and workload in ``context``.

Only the cgroup directories a test created are removed (a node's existing
``kubepods.slice`` is left alone); traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
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
from kernel_helpers import CONNECT_SCRIPT, closed_tcp_port, running_agent, scaled

from tapio_enrich_kubernetes.cgroups import HandleResolver, find_cgroup2_root

pytestmark = pytest.mark.kernel

NODE = "tapio-test-node"
REFUSED = "kernel.network.connection_refused"
EXIT = "kernel.container.abnormal_exit"
OOM = "kernel.container.oom_kill"
MIB = 1 << 20
FAST_RETRIES = {"TAPIO_K8S_BACKOFF_INITIAL_S": "0.2", "TAPIO_K8S_BACKOFF_MAX_S": "0.5"}


# -- cgroups laid out like kubelet's ------------------------------------------------------------------


def memory_v1_mount() -> Path | None:
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, fstype, options = line.split()[:4]
        if fstype == "cgroup" and "memory" in options.split(","):
            return Path(where)
    return None


@attrs.frozen
class PodCgroup:
    """One container's cgroup: its leaf directory in each hierarchy the test made it in."""

    uid: str
    container_id: str
    leaves: tuple[Path, ...]

    def enter(self, argv: list[str]) -> list[str]:
        """``argv`` run by a shell that first moves itself into the container's cgroups (exec keeps the pid)."""
        moves = "".join(f'echo $$ > "{leaf / "cgroup.procs"}" || exit 99; ' for leaf in self.leaves)
        return ["sh", "-c", moves + 'exec "$@"', "sh", *argv]


def kubelet_path(uid: str, container_id: str, qos: str = "besteffort") -> Path:
    pod = f"kubepods-{qos}-pod{uid.replace('-', '_')}.slice"
    return Path("kubepods.slice", f"kubepods-{qos}.slice", pod, f"cri-containerd-{container_id}.scope")


@contextmanager
def kubelet_cgroup(mounts: list[Path], uid: str | None = None, memory_limit: int | None = None) -> Iterator[PodCgroup]:
    """A container cgroup at kubelet's path under each mount; what this made is removed on the way out."""
    uid = uid or str(uuid.uuid4())
    cgroup = PodCgroup(uid, secrets.token_hex(32), tuple(m / kubelet_path(uid, "x" * 64).parent for m in mounts))
    cgroup = attrs.evolve(cgroup, leaves=tuple(m / kubelet_path(uid, cgroup.container_id) for m in mounts))
    created: list[Path] = []
    try:
        for mount, leaf in zip(mounts, cgroup.leaves, strict=True):
            for directory in reversed([leaf, *leaf.parents]):
                if not directory.exists():
                    directory.mkdir()
                    created.append(directory)
            if memory_limit is not None and (leaf / "memory.limit_in_bytes").exists():  # the v1 controller
                (leaf / "memory.limit_in_bytes").write_text(str(memory_limit))
            elif memory_limit is not None and "memory" in (mount / "cgroup.controllers").read_text().split():
                # cgroup v2 only (the guests): the controller is handed down kubelet's path, as systemd does
                for ancestor in reversed(leaf.relative_to(mount).parents):  # ".", "kubepods.slice", ...
                    (mount / ancestor / "cgroup.subtree_control").write_text("+memory")
                (leaf / "memory.max").write_text(str(memory_limit))
        yield cgroup
    finally:
        for directory in reversed(created):
            remove_cgroup(directory)


def remove_cgroup(directory: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with suppress(FileNotFoundError):
            for pid in (directory / "cgroup.procs").read_text().split():
                with suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # killed tasks leave the cgroup once reaped


# -- processes ----------------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """No faulthandler: a Python child must die of its signal, not print a traceback and abort."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("TAPIO_", "PYTHONFAULTHANDLER"))}


def refused_connect(port: int, cgroup: PodCgroup | None = None) -> dict:
    """A refused connect to 127.0.0.1:``port`` from a new process (inside ``cgroup`` if given): its report."""
    argv = [sys.executable, "-c", CONNECT_SCRIPT, "127.0.0.1", str(port), "1"]
    done = subprocess.run(cgroup.enter(argv) if cgroup else argv, capture_output=True, text=True, timeout=scaled(20),
                          check=True, env=child_env())
    report = json.loads(done.stdout)
    assert report["attempts"][0]["errno"] == "ECONNREFUSED"
    return report


def of_pid(type_: str, pid: int):
    return lambda occ: occ["type"] == type_ and occ["data"].get("pid") == pid


def refused_from(agent, port: int, cgroup: PodCgroup | None = None) -> dict:
    """One refused connect from ``cgroup`` and the occurrence the agent printed for it."""
    report = refused_connect(port, cgroup)
    [occ] = agent.wait_for(of_pid(REFUSED, report["pid"]), timeout=10)
    return occ


def refused_until_enriched(agent, port: int, cgroup: PodCgroup, timeout: float = 15.0) -> list[dict]:
    """Refused connects from ``cgroup`` until one names its pod (the agent learns pods asynchronously).

    Returns every occurrence, in order: each was printed, with or without context, nothing held back.
    """
    deadline = time.monotonic() + timeout
    seen = []
    while True:
        seen.append(refused_from(agent, port, cgroup))
        if seen[-1]["context"]["entities"]:
            return seen
        assert time.monotonic() < deadline, f"no occurrence named pod {cgroup.uid} in {timeout} s: {seen[-1]}"
        time.sleep(0.2)


def wait_for_log(agent, text: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in agent.stderr_text():
        assert time.monotonic() < deadline, f"agent never logged {text!r}:\n{agent.stderr_text()}"
        time.sleep(0.05)


def expected_context(pod: dict, cgroup: PodCgroup, workload: dict) -> dict:
    meta = pod["metadata"]
    namespace = meta["namespace"]
    return {
        "node": NODE,
        "namespace": namespace,
        "entities": [
            {"kind": "pod", "id": cgroup.uid, "name": f"{namespace}/{meta['name']}"},
            {"kind": "container", "id": cgroup.container_id, "name": "app"},
            {"kind": workload["kind"].lower(), "id": workload["uid"], "name": f"{namespace}/{workload['name']}"},
        ],
    }


# -- one cluster, one agent for most scenarios --------------------------------------------------------


@attrs.define
class Cluster:
    api: FakeApiServer
    agent: object
    v2: Path
    memory: Path | None
    web: tuple[dict, PodCgroup, dict]  # pod, its cgroup, its Deployment
    batch: tuple[dict, PodCgroup, dict]  # pod, its cgroup (with a memory limit), its CronJob


def add_deployment_pod(api: FakeApiServer, cgroup: PodCgroup, name: str = "web") -> tuple[dict, dict]:
    deployment = owner_ref("Deployment", name)
    rs = owner_ref("ReplicaSet", f"{name}-5d8c7b9f4")
    api.add_object("replicasets", make_replica_set(rs["name"], "shop", rs["uid"], deployment))
    pod = make_pod(f"{rs['name']}-x2x4q", node=NODE, namespace="shop", uid=cgroup.uid, owner=rs,
                   containers=[("app", cgroup.container_id)])
    api.add_pod(pod)
    return pod, deployment


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    v2 = find_cgroup2_root()
    assert v2 is not None, "no cgroup2 hierarchy mounted: /proc/self/mountinfo has none"
    memory = memory_v1_mount()
    hierarchies = [v2] + ([memory] if memory is not None else [])
    tmp = tmp_path_factory.mktemp("k8s")
    with ExitStack() as stack:
        api = stack.enter_context(serve())
        web_cgroup = stack.enter_context(kubelet_cgroup(hierarchies))
        web, deployment = add_deployment_pod(api, web_cgroup)
        batch_cgroup = stack.enter_context(kubelet_cgroup(hierarchies, memory_limit=64 * MIB))
        cron = owner_ref("CronJob", "nightly", api_version="batch/v1")
        job = owner_ref("Job", "nightly-29011980", api_version="batch/v1")
        api.add_object("jobs", make_job(job["name"], "batch", job["uid"], cron))
        batch = make_pod(f"{job['name']}-7xk2p", node=NODE, namespace="batch", uid=batch_cgroup.uid, owner=job,
                         containers=[("app", batch_cgroup.container_id)])
        api.add_pod(batch)
        env = {"NODE_NAME": NODE, "KUBECONFIG": str(write_kubeconfig(tmp / "kubeconfig", api.url))}
        agent = stack.enter_context(running_agent(tmp, plugins="network,container,kubernetes,stdout", env=env))
        assert api.wait_until(lambda a: a.watches_open >= 1), "the agent never watched its pods"
        yield Cluster(api, agent, v2, memory, (web, web_cgroup, deployment), (batch, batch_cgroup, cron))


def test_refused_connect_in_a_pod_names_pod_namespace_container_and_deployment(cluster):
    pod, cgroup, deployment = cluster.web
    port = closed_tcp_port("127.0.0.1")
    occ = refused_from(cluster.agent, port, cgroup)
    assert occ["data"]["cgroup_id"] == cgroup.leaves[0].stat().st_ino  # the kernel's id of the v2 leaf
    assert occ["context"] == expected_context(pod, cgroup, deployment)
    selector = {r["query"]["fieldSelector"] for r in cluster.api.requests if r["kind"] in ("list", "watch")}
    assert selector == {f"spec.nodeName={NODE}"}


def test_abnormal_exit_in_a_pod_names_it(cluster):
    pod, cgroup, deployment = cluster.web
    # The container's main process: the init of its own PID namespace (short-lived helpers are only counted).
    proc = subprocess.Popen(cgroup.enter(["unshare", "--pid", "--fork", "sh", "-c", "exit 3"]), env=child_env())
    assert proc.wait(scaled(20)) == 3
    main = lambda occ: occ["type"] == EXIT and occ["data"]["main_process"] and occ["data"]["exit_code"] == 3
    [occ] = cluster.agent.wait_for(main, timeout=10)
    assert occ["data"]["comm"] == "sh"
    assert occ["context"] == expected_context(pod, cgroup, deployment)


def test_oom_killed_process_in_a_job_pod_names_the_cronjob(cluster):
    pod, cgroup, cron = cluster.batch
    allocate = "chunks = [b'a' * (4 << 20) for _ in range(128)]"  # 512 MiB against a 64 MiB limit
    proc = subprocess.Popen(cgroup.enter([sys.executable, "-c", allocate]), env=child_env())
    assert proc.wait(scaled(30)) == -signal.SIGKILL
    [occ] = cluster.agent.wait_for(of_pid(OOM, proc.pid), timeout=10)
    assert occ["data"]["memory_limit_bytes"] == 64 * MIB
    assert occ["context"] == expected_context(pod, cgroup, cron)


def test_pod_started_after_the_agent_is_named_once_the_watch_brings_it(cluster):
    """The pod arrives through the watch and its cgroup after the agent's scan: resolved by its id."""
    port = closed_tcp_port("127.0.0.1")
    uid = str(uuid.uuid4())
    with kubelet_cgroup([cluster.v2], uid=uid) as cgroup:
        before = refused_from(cluster.agent, port, cgroup)
        assert before["context"] == {"node": NODE, "entities": []}, "a pod not known yet: emitted, not held"
        pod, deployment = add_deployment_pod(cluster.api, cgroup, name="late")
        seen = refused_until_enriched(cluster.agent, port, cgroup)
        assert seen[-1]["context"] == expected_context(pod, cgroup, deployment)


def test_processes_outside_pods_carry_only_the_node(cluster):
    port = closed_tcp_port("127.0.0.1")
    on_host = refused_from(cluster.agent, port)
    assert on_host["context"] == {"node": NODE, "entities": []}
    with kubelet_cgroup([cluster.v2]) as unknown:  # kubelet's layout, but no such pod in the API
        assert refused_from(cluster.agent, port, unknown)["context"] == {"node": NODE, "entities": []}


# -- the API server away ----------------------------------------------------------------------------


def test_api_unreachable_at_start_the_agent_emits_anyway_and_enriches_once_it_is_back(tmp_path):
    v2 = find_cgroup2_root()
    port = free_port()
    env = {"NODE_NAME": NODE, "KUBECONFIG": str(write_kubeconfig(tmp_path / "kubeconfig", f"http://127.0.0.1:{port}")),
           **FAST_RETRIES}
    closed = closed_tcp_port("127.0.0.1")
    with ExitStack() as stack:
        cgroup = stack.enter_context(kubelet_cgroup([v2]))
        agent = stack.enter_context(running_agent(tmp_path, plugins="network,kubernetes,stdout", env=env))
        first = refused_from(agent, closed, cgroup)
        assert first["context"] == {"node": NODE, "entities": []}
        wait_for_log(agent, "kubernetes API unreachable (")  # said once, with the reason
        api = stack.enter_context(serve(port=port))
        pod, deployment = add_deployment_pod(api, cgroup)
        seen = refused_until_enriched(agent, closed, cgroup)
        assert seen[-1]["context"] == expected_context(pod, cgroup, deployment)
        api.close()  # and away again: the cache it has keeps naming the pod
        assert refused_from(agent, closed, cgroup)["context"] == expected_context(pod, cgroup, deployment)


# -- the id -> path resolver on the real hierarchy ----------------------------------------------------


def test_file_handles_resolve_a_cgroup_id_to_its_path_until_it_is_removed():
    v2 = find_cgroup2_root()
    resolver = HandleResolver.open(v2)
    assert resolver is not None, "open_by_handle_at refused on the cgroup2 mount"
    try:
        with kubelet_cgroup([v2]) as cgroup:
            leaf = cgroup.leaves[0]
            cgroup_id = leaf.stat().st_ino
            assert resolver.path_of(cgroup_id) == str(leaf)
        assert resolver.path_of(cgroup_id) is None
    finally:
        resolver.close()
