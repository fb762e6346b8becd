"""The occurrence files under ``<data-dir>/occurrences/``: how they are written.

Each batch becomes one JSON-lines file, written to a temporary name and renamed
into place, so a reader sees a whole file or none. Files are private (0600 in a
0700 directory) and the oldest are removed past a count or size bound, so a busy
node cannot fill its disk. ``occurrence_reader`` reads them back.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from tapio_core.occurrence import Occurrence

SUFFIX = ".jsonl"
DEFAULT_MAX_FILES = 10_000
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


def occurrences_dir(data_dir: Path) -> Path:
    return Path(data_dir) / "occurrences"


def private_directory(path: Path) -> None:
    """Create ``path`` 0700, or check that the one there is a real directory of this user's: never a
    symbolic link someone planted to make the agent, as root, write elsewhere."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise OSError(errno.ENOTDIR, f"{path} is not a directory (a symbolic link?): refusing to write there")
    refuse_foreign(info, str(path))
    os.chmod(path, 0o700)


def refuse_foreign(info: os.stat_result, what: str) -> None:
    """Another user's file or directory is not the agent's to write: OSError naming ``what`` and its owner."""
    if info.st_uid != os.geteuid():
        raise OSError(errno.EPERM, f"{what} belongs to uid {info.st_uid}, not to this agent's {os.geteuid()}")


def open_private(path: Path) -> BinaryIO:
    """``path`` for writing, 0600, refusing what a root agent must not write through: a symbolic link
    (someone may have planted it, e.g. in /tmp, to make the agent truncate another file) or anything but a
    regular file (a FIFO, a device). Raises OSError naming why."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "it is a symbolic link: refusing to write through it") from None
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads
            raise OSError(errno.EINVAL, "not a regular file") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        refuse_foreign(info, "it")
        os.ftruncate(fd, 0)
        os.set_blocking(fd, True)
        os.fchmod(fd, 0o600)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


class OccurrenceWriter:
    """Writes occurrence batches atomically and enforces retention."""

    def __init__(self, data_dir: Path, max_files: int = DEFAULT_MAX_FILES, max_bytes: int = DEFAULT_MAX_BYTES):
        self.directory = occurrences_dir(data_dir)
        private_directory(self.directory)
        self.max_files = max_files
        self.max_bytes = max_bytes
        self._sequence = 0
        # (name, size) oldest first; names, not Paths: up to max_files of them live as long as the agent.
        self._files: deque[tuple[str, int]] = deque(sorted(
            (p.name, p.stat().st_size) for p in self.directory.glob("*" + SUFFIX)))
        self._total_bytes = sum(size for _, size in self._files)

    def write(self, occurrences: Sequence[Occurrence]) -> Path:
        body = "".join(occ.to_json() + "\n" for occ in occurrences).encode()
        # Names sort by time, so retention and readers can go oldest-first by name.
        self._sequence += 1
        name = f"{time.time_ns():020d}-{os.getpid()}-{self._sequence:06d}{SUFFIX}"
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=SUFFIX)
        try:
            with os.fdopen(fd, "wb") as handle:  # mkstemp creates the file 0600
                handle.write(body)
            final = self.directory / name
            os.replace(tmp, final)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._files.append((name, len(body)))
        self._total_bytes += len(body)
        self._enforce_retention()
        return final

    def _enforce_retention(self) -> None:
        while self._files and (len(self._files) > self.max_files or self._total_bytes > self.max_bytes):
            name, size = self._files.popleft()
            (self.directory / name).unlink(missing_ok=True)
            self._total_bytes -= size
