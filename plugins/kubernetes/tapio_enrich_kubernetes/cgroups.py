"""Which pod and container a cgroup belongs to, from its path or its id.

Kubelet names a pod's cgroup after the pod UID and the container runtime names
the container's cgroup after the container id; the layouts differ by cgroup
driver and runtime but carry the same two facts:

- cgroupfs driver: ``/kubepods/burstable/pod<uid>/<id>`` (containerd, docker),
  ``.../pod<uid>/crio-<id>`` (CRI-O);
- systemd driver: ``/kubepods.slice/kubepods-burstable.slice/
  kubepods-burstable-pod<uid with _>.slice/cri-containerd-<id>.scope``
  (``docker-<id>.scope``, ``crio-<id>.scope``).

The same names appear in cgroup v1 hierarchies and in the v2 (unified) one.
Occurrences carry the v2 cgroup id (``bpf_get_current_cgroup_id``: the inode
of the cgroup directory); :class:`CgroupMap` turns ids into these facts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import attrs

log = logging.getLogger("tapio.kubernetes")

_UID = r"[0-9a-f]{8}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{4}[-_]?[0-9a-f]{12}"
#: ``pod<uid>`` (cgroupfs) or ``kubepods[-qos]-pod<uid>.slice`` (systemd); static pods have dashless UIDs.
_POD_SEGMENT = re.compile(rf"^(?:.*kubepods.*-)?pod(?P<uid>{_UID})(?:\.slice)?$")
#: A container's own directory, by runtime prefix; ``crio-conmon-`` is CRI-O's monitor, not the container.
_CONTAINER_SEGMENT = re.compile(
    r"^(?P<prefix>cri-containerd-|docker-|crio-conmon-|crio-|libpod-|containerd-)?"
    r"(?P<id>[0-9a-f]{64})(?:\.scope)?$"
)
_RUNTIMES = {
    "cri-containerd-": "containerd", "containerd-": "containerd", "docker-": "docker",
    "crio-": "cri-o", "crio-conmon-": "cri-o", "libpod-": "podman", None: None,
}


@attrs.frozen
class CgroupRef:
    """What a cgroup path says: the pod UID and, below the pod level, the container id."""

    pod_uid: str
    container_id: str | None = None
    runtime: str | None = None


def parse_cgroup_path(path: str) -> CgroupRef | None:
    """The pod (and container) a cgroup path belongs to, or None for a cgroup outside any pod.

    ``path`` may be absolute (``/sys/fs/cgroup/...``), relative to a hierarchy's
    root, or a ``/proc/PID/cgroup`` entry's path. Directories below the
    container's (a runtime's ``container`` sub-group, a process's own) still
    belong to that container.
    """
    segments = [s for s in path.split("/") if s]
    seen_kubepods = False
    for index, segment in enumerate(segments):
        if "kubepods" in segment:
            seen_kubepods = True
        match = _POD_SEGMENT.match(segment) if seen_kubepods else None
        if match is None:
            continue
        uid = match["uid"].replace("_", "-")
        following = segments[index + 1] if index + 1 < len(segments) else ""
        container = _CONTAINER_SEGMENT.match(following)
        if container is None:
            return CgroupRef(uid)
        prefix = container["prefix"]
        if prefix == "crio-conmon-":
            return CgroupRef(uid, None, "cri-o")  # conmon is charged to the pod, it is no container
        return CgroupRef(uid, container["id"], _RUNTIMES[prefix])
    return None


def cgroup2_mount(mountinfo: str) -> Path | None:
    """Where the whole v2 (unified) hierarchy is mounted, from ``/proc/self/mountinfo`` text.

    The root field is the mount's root relative to our cgroup namespace's. On
    the host, and in a container sharing the host's namespace, the whole
    hierarchy shows as ``/``. In a container with a private cgroup namespace
    (the default on cgroup v2) its own cgroup shows as ``/`` and the host's
    hierarchy, bind-mounted in (the DaemonSet's hostPath), as ``/../..`` -- one
    ``..`` per level the namespace sits below it. So the mount reaching highest
    wins; one whose root names a directory (``/kubepods.slice/...``) is part of
    the hierarchy only, its paths would not name the pods, and is skipped.
    """
    best: tuple[int, Path] | None = None
    for line in mountinfo.splitlines():
        fields, sep, fs = line.partition(" - ")
        parts = fields.split()
        if not sep or len(parts) < 5 or fs.split(" ", 1)[0] != "cgroup2":
            continue
        segments = [s for s in _unescape_mountinfo(parts[3]).split("/") if s]
        if any(segment != ".." for segment in segments):
            continue
        if best is None or len(segments) > best[0]:
            best = (len(segments), Path(_unescape_mountinfo(parts[4])))
    return best[1] if best is not None else None


def _unescape_mountinfo(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), field)


def find_cgroup2_root() -> Path | None:
    try:
        with open("/proc/self/mountinfo") as handle:
            return cgroup2_mount(handle.read())
    except OSError:
        return None


class HandleResolver:
    """A v2 cgroup id -> its current path in O(1), through ``open_by_handle_at``.

    A cgroup's file handle is its kernfs id (type ``FILEID_KERNFS``), which is
    the id BPF reports, so no directory walk is needed. Needs
    CAP_DAC_READ_SEARCH; :meth:`open` returns None where the kernel or the
    capabilities do not allow it, and the caller falls back to scanning.
    """

    FILEID_KERNFS = 0xFE
    _FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

    def __init__(self, root: Path, mount_fd: int, open_by_handle_at: Callable) -> None:
        self.root = root
        self._mount_fd = mount_fd
        self._open_by_handle_at = open_by_handle_at

    @classmethod
    def open(cls, root: Path) -> HandleResolver | None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            function = libc.open_by_handle_at
            function.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int)
            mount_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except (OSError, AttributeError) as exc:
            log.info("cgroup ids cannot be resolved through file handles (%s); scanning instead", exc)
            return None
        resolver = cls(root, mount_fd, function)
        try:
            resolver.path_of(os.stat(root).st_ino)
        except OSError as exc:
            os.close(mount_fd)
            log.info("cgroup ids cannot be resolved through file handles (%s); scanning instead", exc)
            return None
        return resolver

    def path_of(self, cgroup_id: int) -> str | None:
        """The cgroup's path under the mount, or None when it no longer exists; OSError when not permitted."""
        handle = ctypes.create_string_buffer(
            (8).to_bytes(4, "little") + self.FILEID_KERNFS.to_bytes(4, "little") + cgroup_id.to_bytes(8, "little")
        )
        fd = self._open_by_handle_at(self._mount_fd, handle.raw, self._FLAGS)
        if fd < 0:
            code = ctypes.get_errno()
            if code in (errno.ESTALE, errno.ENOENT):
                return None
            raise OSError(code, os.strerror(code))
        try:
            return os.readlink(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)

    def close(self) -> None:
        os.close(self._mount_fd)


#: Directory depth searched for kubelet's cgroup roots (``/kubepods``, ``/kubelet.slice/kubelet-kubepods.slice``).
_MAX_SEARCH_DEPTH = 4
#: A pod's directory below a kubepods root: at most the QoS level in between.
_MAX_POD_DEPTH = 2
_NEGATIVE_LIMIT = 65536


class CgroupMap:
    """v2 cgroup id -> :class:`CgroupRef`, kept current without walking the tree per event.

    The kubepods subtrees are scanned once at start and a pod's directory
    again when the watch reports new containers in it, so a container that
    dies before its first occurrence still has its id known. An id not seen
    yet is resolved on the spot through its file handle (microseconds), or,
    where that is not permitted, by rescanning the kubepods subtrees at most
    once per ``rescan_interval_s``. Ids are never reused while the machine is
    up, so answers (also "not a pod") are kept until :meth:`forget_pods`.
    """

    def __init__(
        self,
        root: Path,
        resolver: HandleResolver | None = None,
        rescan_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = root
        self.resolver = resolver
        self.rescan_interval_s = rescan_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._refs: dict[int, CgroupRef] = {}
        self._not_pods: dict[int, None] = {}  # insertion-ordered, bounded
        self._pod_dirs: dict[str, set[str]] = {}
        self._kube_roots: list[str] = []
        self._last_rescan = -float("inf")
        self.counters = {"scans": 0, "pod_rescans": 0, "handle_lookups": 0, "gone": 0}

    # -- scanning -------------------------------------------------------------------------

    def scan(self) -> None:
        """Find kubelet's cgroup roots and index every pod and container cgroup under them."""
        roots = sorted(self._find_kube_roots(str(self.root), 0))
        refs: dict[int, CgroupRef] = {}
        pod_dirs: dict[str, set[str]] = {}
        for root in roots:
            self._scan_pods(root, 0, refs, pod_dirs)
        with self._lock:
            self._kube_roots = roots
            self._merge(refs, pod_dirs)
            self._last_rescan = self._clock()
            self.counters["scans"] += 1

    def rescan_pod(self, pod_uid: str) -> None:
        """Index a pod's containers again (its directory found by a subtree scan when it is new)."""
        with self._lock:
            dirs = set(self._pod_dirs.get(pod_uid, ()))
            roots = list(self._kube_roots)
        if not dirs:
            if not roots:
                self.scan()
                return
            refs: dict[int, CgroupRef] = {}
            pod_dirs: dict[str, set[str]] = {}
            for root in roots:
                self._scan_pods(root, 0, refs, pod_dirs)
            with self._lock:
                self._merge(refs, pod_dirs)
                self.counters["pod_rescans"] += 1
            return
        refs = {}
        for directory in dirs:
            ref = parse_cgroup_path(directory)
            if ref is not None:
                self._scan_containers(directory, ref.pod_uid, refs)
        with self._lock:
            self._merge(refs, {})
            self.counters["pod_rescans"] += 1

    def _find_kube_roots(self, directory: str, depth: int) -> Iterable[str]:
        for entry in _subdirs(directory):
            if "kubepods" in entry.name:
                yield entry.path
            elif depth + 1 < _MAX_SEARCH_DEPTH:
                yield from self._find_kube_roots(entry.path, depth + 1)

    def _scan_pods(self, directory: str, depth: int, refs: dict, pod_dirs: dict) -> None:
        for entry in _subdirs(directory):
            ref = parse_cgroup_path(entry.path)
            if ref is not None:
                pod_dirs.setdefault(ref.pod_uid, set()).add(entry.path)
                _record(entry, ref, refs)
                self._scan_containers(entry.path, ref.pod_uid, refs)
            elif depth + 1 < _MAX_POD_DEPTH:
                self._scan_pods(entry.path, depth + 1, refs, pod_dirs)

    @staticmethod
    def _scan_containers(pod_dir: str, pod_uid: str, refs: dict) -> None:
        for entry in _subdirs(pod_dir):
            ref = parse_cgroup_path(entry.path)
            if ref is None or ref.pod_uid != pod_uid:
                continue
            _record(entry, ref, refs)
            # A runtime's own sub-groups (crun's ``container``) belong to the same container.
            for child in _subdirs(entry.path):
                _record(child, ref, refs)

    def _merge(self, refs: dict[int, CgroupRef], pod_dirs: dict[str, set[str]]) -> None:
        self._refs.update(refs)
        for cgroup_id in refs:
            self._not_pods.pop(cgroup_id, None)
        for uid, dirs in pod_dirs.items():
            self._pod_dirs.setdefault(uid, set()).update(dirs)

    # -- lookups --------------------------------------------------------------------------

    def lookup(self, cgroup_id: int) -> CgroupRef | None:
        """The pod/container of a v2 cgroup id; None for a cgroup outside pods or one gone unseen."""
        with self._lock:
            ref = self._refs.get(cgroup_id)
            if ref is not None or cgroup_id in self._not_pods:
                return ref
        if self.resolver is not None:
            return self._resolve_by_handle(cgroup_id)
        return self._resolve_by_rescan(cgroup_id)

    def _resolve_by_handle(self, cgroup_id: int) -> CgroupRef | None:
        self.counters["handle_lookups"] += 1
        try:
            path = self.resolver.path_of(cgroup_id)
        except OSError as exc:
            log.warning("resolving cgroup ids through file handles stopped working (%s); scanning instead", exc)
            self.resolver = None
            return self._resolve_by_rescan(cgroup_id)
        if path is None:
            self.counters["gone"] += 1  # removed before we saw it: cannot tell whose it was
            return None
        ref = parse_cgroup_path(path)
        with self._lock:
            if ref is None:
                self._remember_not_pod(cgroup_id)
            else:
                self._refs[cgroup_id] = ref
        return ref

    def _resolve_by_rescan(self, cgroup_id: int) -> CgroupRef | None:
        if self._clock() - self._last_rescan < self.rescan_interval_s:
            return None  # rate limited; the next miss after the interval rescans
        self.scan()
        with self._lock:
            ref = self._refs.get(cgroup_id)
            if ref is None:
                self._remember_not_pod(cgroup_id)
            return ref

    def _remember_not_pod(self, cgroup_id: int) -> None:
        self._not_pods[cgroup_id] = None
        if len(self._not_pods) > _NEGATIVE_LIMIT:
            del self._not_pods[next(iter(self._not_pods))]

    def forget_pods(self, pod_uids: Iterable[str]) -> None:
        """Drop the ids of pods that ended past their grace period."""
        gone = set(pod_uids)
        if not gone:
            return
        with self._lock:
            self._refs = {cid: ref for cid, ref in self._refs.items() if ref.pod_uid not in gone}
            for uid in gone:
                self._pod_dirs.pop(uid, None)

    def __len__(self) -> int:
        return len(self._refs)


def _subdirs(directory: str) -> list[os.DirEntry]:
    try:
        with os.scandir(directory) as entries:
            return [entry for entry in entries if entry.is_dir(follow_symlinks=False)]
    except OSError:
        return []  # removed while we walked: its containers are gone too


def _record(entry: os.DirEntry, ref: CgroupRef, refs: dict[int, CgroupRef]) -> None:
    with contextlib.suppress(OSError):  # removed while we walked
        refs[entry.inode()] = ref
