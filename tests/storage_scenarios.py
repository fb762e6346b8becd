"""Making block devices fail and stall on purpose, for the storage observer's kernel tests.

Recipes (see /work/shared/kernel-scenarios.md), each undone on the way out:

- I/O error: a loop device whose backing file lives on a tmpfs that is full (:func:`tmpfs`,
  :func:`sparse_file`, :func:`loop_device`, :func:`fill`); a :func:`direct_write` to a sparse part
  of it fails. The loop drivers of 6.12 and 6.18 hand the backing file's ENOSPC on
  (BLK_STS_NOSPC); those of 5.10 and 6.1 turn every failed backing write into EIO (BLK_STS_IOERR).
- Latency spike: :func:`stacked_loops` puts a loop (upper) on a file in an ext4 that sits on
  another loop (lower); while :func:`frozen` holds the ext4, a direct write to the upper loop
  device cannot complete.

Waits take timeouts already ``scaled()`` by the caller (long in an emulated guest).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from kernel_helpers import scaled

from tapio_enrich_kubernetes.cgroups import find_cgroup2_root

# -- kernel objects the tests make -------------------------------------------------------------------


def sh(*command: str, timeout: float = scaled(30.0)) -> str:
    done = subprocess.run(list(command), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout.strip()


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    sh("mount", "-t", "tmpfs", "-o", f"size={size}", "tapio-test", str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)
        where.rmdir()


def sparse_file(path: Path, size: int) -> Path:
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[str]:
    device = sh("losetup", "--find", "--show", str(backing))
    try:
        yield device
    finally:
        end_writers()  # a writer still holding the device would keep it, and its backing mount, busy
        subprocess.run(["losetup", "-d", device], capture_output=True)


@contextlib.contextmanager
def mounted(device: str, where: Path) -> Iterator[Path]:
    where.mkdir()
    sh("mount", device, str(where))
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], capture_output=True)
        where.rmdir()


@contextlib.contextmanager
def frozen(mountpoint: Path) -> Iterator[None]:
    sh("fsfreeze", "-f", str(mountpoint))
    try:
        yield
    finally:
        sh("fsfreeze", "-u", str(mountpoint))


@contextlib.contextmanager
def stacked_loops(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """(ext4 mount point, upper loop device): upper's backing file lives in the ext4 on the lower loop."""
    with tmpfs(tmp_path / "stack", "200M") as stack, loop_device(sparse_file(stack / "lower", 100 << 20)) as lower:
        sh("mkfs.ext4", "-q", lower)
        with mounted(lower, stack / "ext4") as ext4, loop_device(sparse_file(ext4 / "upper", 32 << 20)) as upper:
            yield ext4, upper


@contextlib.contextmanager
def cgroup2_child() -> Iterator[Path]:
    """A fresh cgroup v2 directory (hybrid hosts mount v2 at /sys/fs/cgroup/unified, pure v2 ones at
    /sys/fs/cgroup); removed once its processes have exited."""
    root = find_cgroup2_root()
    assert root is not None, "no cgroup2 mount in /proc/self/mountinfo"
    path = root / f"tapio-test-{secrets.token_hex(4)}"
    path.mkdir()
    try:
        yield path
    finally:
        deadline = time.monotonic() + scaled(5.0)
        while True:
            try:
                path.rmdir()
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


def fill(directory: Path) -> None:
    """Write a file until its file system is full."""
    with open(directory / "filler", "wb") as handle:
        chunk = b"\xa5" * (1 << 20)
        with contextlib.suppress(OSError):
            while True:
                handle.write(chunk)
                handle.flush()


def failing_writes(device: str, count: int, first_block: int = 4096) -> int:
    """``count`` direct 4 KiB writes from this process to distinct blocks of ``device`` (a loop device on a
    full tmpfs: each is one block request that fails); returns how many failed."""
    failed = 0
    buffer = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
    fd = os.open(device, os.O_WRONLY | os.O_DIRECT)
    try:
        for block in range(first_block, first_block + count):
            try:
                os.pwritev(fd, [buffer], block * 4096)
            except OSError:
                failed += 1
    finally:
        os.close(fd)
        buffer.close()
    return failed


def numbers(device: str) -> tuple[int, int]:
    rdev = os.stat(device).st_rdev
    return os.major(rdev), os.minor(rdev)


_writers: list[subprocess.Popen] = []


def direct_write(device: str, *, count: int = 1, seek: int = 0, bs: str = "4k", sync: bool = False,
                 cgroup: Path | None = None) -> subprocess.Popen:
    """dd writing zeros to ``device`` with O_DIRECT (or O_SYNC), as its own process, optionally in ``cgroup``."""
    command = ["dd", "if=/dev/zero", f"of={device}", f"bs={bs}", f"count={count}", f"seek={seek}",
               "oflag=sync" if sync else "oflag=direct"]
    if cgroup is not None:  # the shell joins the cgroup and becomes dd: same pid, comm "dd"
        command = ["sh", "-c", f'echo $$ > {cgroup}/cgroup.procs && exec "$@"', "sh", *command]
    writer = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _writers.append(writer)
    return writer


def end_writers() -> None:
    """Kill and reap every writer still running (a test that failed half-way leaves some)."""
    while _writers:
        writer = _writers.pop()
        if writer.poll() is None:
            writer.kill()
        writer.communicate(timeout=scaled(30.0))


def finished(process: subprocess.Popen, timeout: float = scaled(30.0)) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=timeout)
    return process.returncode, stderr


def wait_writes_in_flight(device: str, writes: int, timeout: float = scaled(10.0)) -> None:
    """Until the block layer counts ``writes`` write requests in flight on ``device``."""
    inflight = Path("/sys/block") / Path(device).name / "inflight"
    deadline = time.monotonic() + timeout
    while int(inflight.read_text().split()[1]) < writes:
        if time.monotonic() > deadline:
            raise AssertionError(f"{device}: {writes} writes never in flight ({inflight.read_text().strip()})")
        time.sleep(0.02)


def on_device(type_: str, device: str):
    name = Path(device).name
    return lambda occ: occ["type"] == type_ and occ["data"].get("device") == name
