"""Cgroup paths -> pod UID and container id, for the layouts real nodes use; the id -> path map.

Path samples are the shapes kubelet (cgroupfs and systemd drivers) and the
runtimes (containerd, CRI-O, docker via cri-dockerd, crun's sub-group) create,
in cgroup v1 controller hierarchies and the v2 unified one, as seen in
``/proc/PID/cgroup`` and under ``/sys/fs/cgroup``. :class:`CgroupMap` is
exercised on a directory tree laid out the same way (directory inodes stand
in for cgroup ids, which are the inodes of cgroup directories).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tapio_enrich_kubernetes.cgroups import CgroupMap, CgroupRef, cgroup2_mount, parse_cgroup_path

UID = "7c9a9c6e-6f3e-11e9-9f6b-0800271c8f94"
UID_ = UID.replace("-", "_")
STATIC_UID = "0b6b7e1e4a0c5e0e8f8c6a1b2c3d4e5f"  # a static pod's UID is its manifest hash
CID = "a2b4c0c6e0a5f0c1a0d5f3c6b1f4a7e9d2c3b4a5f6e7d8c9b0a1f2e3d4c5b6a7"
OTHER = "5f1e8d2c3b4a59687766554433221100ffeeddccbbaa99887766554433221100"

SAMPLES = [
    # cgroupfs driver (v1 controllers and v2 alike): containerd and docker name the directory by the id
    (f"/kubepods/burstable/pod{UID}/{CID}", CgroupRef(UID, CID, None)),
    (f"/kubepods/besteffort/pod{UID}/{CID}", CgroupRef(UID, CID, None)),
    (f"/kubepods/pod{UID}/{CID}", CgroupRef(UID, CID, None)),  # Guaranteed QoS: no QoS level
    (f"/sys/fs/cgroup/memory/kubepods/burstable/pod{UID}/{CID}", CgroupRef(UID, CID, None)),  # v1, absolute
    (f"/kubepods/burstable/pod{STATIC_UID}/{CID}", CgroupRef(STATIC_UID, CID, None)),
    # cgroupfs driver, CRI-O
    (f"/kubepods/burstable/pod{UID}/crio-{CID}", CgroupRef(UID, CID, "cri-o")),
    (f"/kubepods/burstable/pod{UID}/crio-conmon-{CID}", CgroupRef(UID, None, "cri-o")),
    # systemd driver
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope",
     CgroupRef(UID, CID, "containerd")),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/docker-{CID}.scope",
     CgroupRef(UID, CID, "docker")),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope",
     CgroupRef(UID, CID, "cri-o")),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-conmon-{CID}.scope",
     CgroupRef(UID, None, "cri-o")),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope", CgroupRef(UID, CID, "containerd")),
    (f"/sys/fs/cgroup/kubepods.slice/kubepods-pod{UID_}.slice/cri-containerd-{CID}.scope",
     CgroupRef(UID, CID, "containerd")),
    (f"/sys/fs/cgroup/unified/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/"
     f"cri-containerd-{CID}.scope", CgroupRef(UID, CID, "containerd")),
    # crun's sub-group below the container (CRI-O / cgroup v2), and a process's own sub-group
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/crio-{CID}.scope/container",
     CgroupRef(UID, CID, "cri-o")),
    (f"/kubepods/burstable/pod{UID}/{CID}/init.scope", CgroupRef(UID, CID, None)),
    # kind: kubelet's cgroup root under kubelet.slice, or below the node container's own cgroup
    (f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope", CgroupRef(UID, CID, "containerd")),
    (f"/docker/{OTHER}/kubepods/besteffort/pod{UID}/{CID}", CgroupRef(UID, CID, None)),
    # the pod's own level (processes kubelet charges to the pod)
    (f"/kubepods/burstable/pod{UID}", CgroupRef(UID)),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice", CgroupRef(UID)),
]

NOT_PODS = [
    "/",
    "",
    "/system.slice/containerd.service",
    "/system.slice/kubelet.service",
    "/user.slice/user-1000.slice/session-2.scope",
    "/kubepods",
    "/kubepods/burstable",
    "/kubepods.slice/kubepods-burstable.slice",
    f"/docker/{CID}",  # a plain docker container, no pod
    f"/machine.slice/libpod-{CID}.scope",  # podman, no pod
    f"/system.slice/pod{UID}/{CID}",  # pod-like name outside kubelet's root
    f"/kubepods/burstable/podnot-a-uid/{CID}",
]


@pytest.mark.parametrize(("path", "expected"), SAMPLES)
def test_kubelet_and_runtime_layouts_give_pod_and_container(path, expected):
    assert parse_cgroup_path(path) == expected


@pytest.mark.parametrize("path", NOT_PODS)
def test_cgroups_outside_pods_are_not_attributed(path):
    assert parse_cgroup_path(path) is None


def test_container_directory_with_an_unknown_prefix_is_the_pod_only():
    assert parse_cgroup_path(f"/kubepods/burstable/pod{UID}/runsc-{CID}") == CgroupRef(UID)


# -- the v2 mount ------------------------------------------------------------------------------

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""
UNIFIED_MOUNTINFO = """\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/root rw
26 24 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""
#: The DaemonSet's pod: in its private cgroup namespace (the default on cgroup v2) the host's hierarchy,
#: bind-mounted over /sys/fs/cgroup from hostPath, has its root four levels above the namespace's
#: (kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope).
DAEMONSET_MOUNTINFO = """\
1532 1512 0:27 /../../../.. /sys/fs/cgroup ro,relatime master:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
"""
#: A container with a private cgroup namespace: the runtime's mount of its own cgroup shows as the
#: namespace's root ``/``; the host's, bind-mounted elsewhere, as above it.
PRIVATE_NAMESPACE_MOUNTINFO = """\
700 690 0:27 / /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw,nsdelegate
710 690 0:27 /../../../.. /host/sys/fs/cgroup\\040x ro,relatime master:9 - cgroup2 cgroup2 rw,nsdelegate
"""
#: A container in the host's cgroup namespace whose runtime bind-mounted only its own cgroup.
HOST_NAMESPACE_MOUNTINFO = """\
700 690 0:27 /kubepods.slice/kubepods-pod1.slice/cri-containerd-x.scope /sys/fs/cgroup ro - cgroup2 cgroup rw
710 690 0:27 / /host/sys/fs/cgroup ro,relatime - cgroup2 cgroup2 rw
"""


def test_cgroup2_mount_found_on_hybrid_and_unified_hosts():
    assert cgroup2_mount(HYBRID_MOUNTINFO) == Path("/sys/fs/cgroup/unified")
    assert cgroup2_mount(UNIFIED_MOUNTINFO) == Path("/sys/fs/cgroup")


def test_cgroup2_mount_in_the_daemonsets_private_cgroup_namespace_is_the_hosts():
    assert cgroup2_mount(DAEMONSET_MOUNTINFO) == Path("/sys/fs/cgroup")


@pytest.mark.parametrize("order", [1, -1], ids=["namespace-view-first", "host-first"])
def test_cgroup2_mount_prefers_the_one_reaching_above_the_namespace_and_unescapes(order):
    lines = PRIVATE_NAMESPACE_MOUNTINFO.splitlines()[::order]
    assert cgroup2_mount("\n".join(lines)) == Path("/host/sys/fs/cgroup x")


def test_cgroup2_mount_skips_a_mount_of_part_of_the_hierarchy():
    assert cgroup2_mount(HOST_NAMESPACE_MOUNTINFO) == Path("/host/sys/fs/cgroup")
    assert cgroup2_mount(HOST_NAMESPACE_MOUNTINFO.splitlines()[0]) is None


def test_no_cgroup2_mount_on_a_v1_only_host():
    assert cgroup2_mount(HYBRID_MOUNTINFO.replace("cgroup2 cgroup2", "cgroup cgroup")) is None
    assert cgroup2_mount("garbage line\n\n") is None


# -- the id -> path map, on a tree laid out like kubelet's ------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def container_dir(root: Path, uid: str, cid: str, qos: str = "besteffort") -> Path:
    path = (root / "kubepods.slice" / f"kubepods-{qos}.slice" / f"kubepods-{qos}-pod{uid.replace('-', '_')}.slice"
            / f"cri-containerd-{cid}.scope")
    path.mkdir(parents=True)
    return path


@pytest.fixture
def tree(tmp_path):
    (tmp_path / "system.slice" / "containerd.service").mkdir(parents=True)
    (tmp_path / "kubepods.slice" / "kubepods-burstable.slice").mkdir(parents=True)
    return tmp_path


def ino(path: Path) -> int:
    return os.stat(path).st_ino


def test_scan_indexes_pods_containers_and_runtime_subgroups(tree):
    first = container_dir(tree, UID, CID)
    (first / "container").mkdir()
    guaranteed = tree / "kubepods.slice" / f"kubepods-pod{STATIC_UID}.slice" / f"crio-{OTHER}.scope"
    guaranteed.mkdir(parents=True)
    cgroups = CgroupMap(tree)
    cgroups.scan()
    assert cgroups.lookup(ino(first)) == CgroupRef(UID, CID, "containerd")
    assert cgroups.lookup(ino(first / "container")) == CgroupRef(UID, CID, "containerd")
    assert cgroups.lookup(ino(first.parent)) == CgroupRef(UID)
    assert cgroups.lookup(ino(guaranteed)) == CgroupRef(STATIC_UID, OTHER, "cri-o")
    assert len(cgroups) == 5  # two pod directories, two containers, one runtime sub-group
    assert cgroups.counters["scans"] == 1


def test_kubelet_root_below_another_cgroup_is_found(tmp_path):
    nested = tmp_path / "kubelet.slice" / "kubelet-kubepods.slice" / f"kubelet-kubepods-pod{UID_}.slice"
    (nested / f"cri-containerd-{CID}.scope").mkdir(parents=True)
    cgroups = CgroupMap(tmp_path)
    cgroups.scan()
    assert cgroups.lookup(ino(nested / f"cri-containerd-{CID}.scope")) == CgroupRef(UID, CID, "containerd")


def test_miss_rescans_at_most_once_per_interval_and_remembers_host_cgroups(tree):
    clock = FakeClock()
    cgroups = CgroupMap(tree, rescan_interval_s=1.0, clock=clock)
    cgroups.scan()
    late = container_dir(tree, UID, CID)  # a container started after the scan
    assert cgroups.lookup(ino(late)) is None, "within the interval a miss must not walk the tree"
    assert cgroups.counters["scans"] == 1
    clock.now += 1.0
    assert cgroups.lookup(ino(late)) == CgroupRef(UID, CID, "containerd")
    assert cgroups.counters["scans"] == 2
    host = ino(tree / "system.slice" / "containerd.service")
    clock.now += 1.0
    assert cgroups.lookup(host) is None
    scans = cgroups.counters["scans"]
    clock.now += 10.0
    for _ in range(100):
        assert cgroups.lookup(host) is None
    assert cgroups.counters["scans"] == scans, "a cgroup known to be outside pods must not trigger rescans"


def test_rescan_pod_picks_up_new_containers_without_walking_the_tree(tree):
    first = container_dir(tree, UID, CID)
    cgroups = CgroupMap(tree, clock=FakeClock())
    cgroups.scan()
    second = first.parent / f"cri-containerd-{OTHER}.scope"
    second.mkdir()
    cgroups.rescan_pod(UID)
    assert cgroups.counters == {"scans": 1, "pod_rescans": 1, "handle_lookups": 0, "gone": 0}
    assert cgroups.lookup(ino(second)) == CgroupRef(UID, OTHER, "containerd")


def test_rescan_of_a_new_pod_searches_below_the_known_kubelet_roots(tree):
    cgroups = CgroupMap(tree, clock=FakeClock())
    cgroups.scan()
    late = container_dir(tree, UID, CID, qos="burstable")
    cgroups.rescan_pod(UID)
    assert cgroups.counters["scans"] == 1
    assert cgroups.lookup(ino(late)) == CgroupRef(UID, CID, "containerd")


def test_removed_cgroups_stay_known_until_their_pod_is_forgotten(tree):
    gone = container_dir(tree, UID, CID)
    kept = container_dir(tree, STATIC_UID, OTHER)
    cgroups = CgroupMap(tree, clock=FakeClock())
    cgroups.scan()
    gone_id, kept_id = ino(gone), ino(kept)
    gone.rmdir()
    assert cgroups.lookup(gone_id) == CgroupRef(UID, CID, "containerd"), "late events of a removed container"
    cgroups.forget_pods([UID])
    assert cgroups.lookup(kept_id) == CgroupRef(STATIC_UID, OTHER, "containerd")
    assert len(cgroups) == 2  # the kept pod's container and pod directories


class RecordingResolver:
    """Stands in for the file-handle resolver: answers from a dict, counts calls."""

    def __init__(self, paths: dict[int, str | None], error: OSError | None = None) -> None:
        self.paths = paths
        self.error = error
        self.calls = 0

    def path_of(self, cgroup_id: int) -> str | None:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.paths.get(cgroup_id)


def test_handle_resolution_answers_misses_once_per_id(tree):
    resolver = RecordingResolver({7: f"/kubepods/besteffort/pod{UID}/{CID}", 8: "/system.slice/x.service"})
    cgroups = CgroupMap(tree, resolver=resolver, clock=FakeClock())
    for _ in range(3):
        assert cgroups.lookup(7) == CgroupRef(UID, CID, None)
        assert cgroups.lookup(8) is None
    assert resolver.calls == 2
    assert cgroups.lookup(9) is None  # removed before anyone saw it
    assert cgroups.counters["gone"] == 1


def test_handle_resolution_refused_falls_back_to_scanning(tree):
    late = container_dir(tree, UID, CID)
    clock = FakeClock()
    cgroups = CgroupMap(tree, resolver=RecordingResolver({}, PermissionError(1, "Operation not permitted")),
                        clock=clock)
    assert cgroups.lookup(ino(late)) == CgroupRef(UID, CID, "containerd")
    assert cgroups.resolver is None
