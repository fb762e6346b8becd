"""Reading occurrence files for the CLI: safe with any input, quick with a full store.

Safe: files are opened without following symbolic links, only regular files are
read, lines are bounded, and an unreadable file or line -- binary, partial, too
long, nested too deep, not an occurrence -- is skipped with a warning (the first
few one by one, then a count), never a traceback.

Quick: files are listed with their modification times and read newest first.
A file is renamed into place after its last occurrence happened, so nothing in
it is newer than its mtime: a window skips older files unopened, and the newest
N stop as soon as no older file can hold a newer occurrence. Lines get a JSON
parse and a check of the few fields the CLI uses, not a full model build.

:class:`OccurrenceFollower` follows new files with inotify (no polling).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import gc
import json
import logging
import os
import select
import stat
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

from tapio_core.occurrence import SEVERITIES, parse_timestamp
from tapio_core.state import describe_os_error
from tapio_core.store import SUFFIX, occurrences_dir

log = logging.getLogger("tapio.reader")

#: An occurrence is well under a kilobyte; a line past this is not one.
MAX_LINE_BYTES = 1024 * 1024
#: How far an occurrence's timestamp may run past its file's mtime: the agent maps
#: kernel time to wall time with an offset measured once, so a clock step can skew it.
MTIME_SLACK_NS = 5_000_000_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: Problems warned about one by one; past this only a count is given at the end.
WARN_LIMIT = 10


class StoredOccurrence(NamedTuple):
    """One occurrence as the CLI needs it: a few checked fields, the parsed JSON and the line it came from."""

    timestamp: datetime
    #: The same instant as integer nanoseconds: what sorting and windows compare (quicker than datetimes).
    ns: int
    id: str
    type: str
    severity: str
    #: The parsed JSON; None where only the line was kept (see :func:`newest`).
    raw: dict[str, Any] | None
    line: str

    @property
    def data(self) -> dict[str, Any]:
        return self.raw.get("data") or {}

    @property
    def context(self) -> dict[str, Any]:
        return self.raw.get("context") or {}

    @property
    def error(self) -> dict[str, Any]:
        error = self.raw.get("error")
        return error if isinstance(error, dict) else {}

    def to_json(self) -> str:
        """The line as the agent wrote it: JSON that passed the checks above, on one line."""
        return self.line


def parse_line(line: bytes | str) -> StoredOccurrence:
    """One JSON line as an occurrence; raises ValueError saying what is wrong with it."""
    try:
        text = (line.decode("utf-8") if isinstance(line, bytes) else line).strip()
        raw = json.loads(text)
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"not an occurrence: a JSON {type(raw).__name__}, not an object")
    id_, timestamp, type_, severity = raw.get("id"), raw.get("timestamp"), raw.get("type"), raw.get("severity")
    if not (isinstance(id_, str) and isinstance(timestamp, str) and isinstance(type_, str)):
        raise ValueError("not an occurrence: id, timestamp and type must be strings")
    if severity not in SEVERITIES:
        raise ValueError(f"not an occurrence: severity {severity!r} is not one of {', '.join(SEVERITIES)}")
    if not isinstance(raw.get("data", {}), dict) or not isinstance(raw.get("context") or {}, dict):
        raise ValueError("not an occurrence: data and context must be objects")
    try:
        when = parse_timestamp(timestamp)
    except ValueError:
        raise ValueError(f"not an occurrence: bad timestamp {timestamp[:40]!r}") from None
    return StoredOccurrence(when, to_ns(when), id_, type_, severity, raw, text)


class SkipLog:
    """Warns about what was skipped: the first few one by one, then how many more."""

    def __init__(self, limit: int = WARN_LIMIT) -> None:
        self.limit = limit
        self.count = 0

    def skip(self, where: str, reason: str) -> None:
        self.count += 1
        if self.count <= self.limit:
            log.warning("skipping %s: %s", where, reason)

    def close(self) -> None:
        if self.count > self.limit:
            log.warning("skipped %d more unreadable file(s) or line(s) without a warning each",
                        self.count - self.limit)
        self.count = 0


class StoredFile(NamedTuple):
    mtime_ns: int
    name: str


def is_occurrence_file(name: str) -> bool:
    return name.endswith(SUFFIX) and not name.startswith(".")  # dot files are the writer's temporaries


def list_files(directory: Path, skips: SkipLog, since_ns: int | None = None) -> list[StoredFile]:
    """The occurrence files in ``directory``, newest first; those older than ``since_ns`` are left out."""
    files = []
    try:
        entries = os.scandir(directory)
    except FileNotFoundError:
        return []
    except OSError as exc:
        skips.skip(str(directory), describe_os_error(exc))
        return []
    with entries:
        for entry in entries:
            if not is_occurrence_file(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # removed by retention since the listing
            if stat.S_ISLNK(info.st_mode):
                skips.skip(entry.name, "a symbolic link, which is not followed")
            elif not stat.S_ISREG(info.st_mode):
                skips.skip(entry.name, "not a regular file")
            elif since_ns is None or info.st_mtime_ns >= since_ns:
                files.append(StoredFile(info.st_mtime_ns, entry.name))
    files.sort(reverse=True)
    return files


def read_file(directory: Path, name: str, skips: SkipLog) -> Iterator[StoredOccurrence]:
    """The occurrences in one file, in file order; what cannot be used is skipped with a warning."""
    try:
        fd = os.open(directory / name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # removed by retention since the listing
    except OSError as exc:
        skips.skip(name, describe_os_error(exc))
        return
    with os.fdopen(fd, "rb", buffering=64 * 1024) as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            skips.skip(name, "not a regular file")
            return
        number = 0
        try:
            while line := handle.readline(MAX_LINE_BYTES + 1):
                number += 1
                if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
                    skips.skip(f"{name} line {number}", f"longer than {MAX_LINE_BYTES} bytes")
                    while (rest := handle.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                        pass
                    continue
                if line.isspace():
                    continue
                try:
                    occurrence = parse_line(line)
                except ValueError as exc:
                    skips.skip(f"{name} line {number}", str(exc))
                    continue
                yield occurrence
        except OSError as exc:
            skips.skip(f"{name} after line {number}", describe_os_error(exc))


def to_ns(when: datetime) -> int:
    """Nanoseconds since the epoch, exactly (no float on the way)."""
    since_epoch = when - EPOCH
    return ((since_epoch.days * 86_400 + since_epoch.seconds) * 1_000_000 + since_epoch.microseconds) * 1000


def read_since(data_dir: Path, since: datetime) -> Iterator[StoredOccurrence]:
    """Every occurrence at or after ``since``, newest file first; files written before it are not opened."""
    directory = occurrences_dir(data_dir)
    skips = SkipLog()
    since_ns = to_ns(since)
    try:
        for file in list_files(directory, skips, since_ns):
            for occurrence in read_file(directory, file.name, skips):
                if occurrence.ns >= since_ns:
                    yield occurrence
    finally:
        skips.close()


@contextlib.contextmanager
def without_cycle_collection() -> Iterator[None]:
    """Pause Python's cycle collector while reading many occurrences.

    Parsed JSON holds no reference cycles, but every dict is a container the
    collector would rescan again and again as they pile up: with 100,000 kept
    that doubled the time of `tapio recent`.
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def newest(
    data_dir: Path,
    limit: int,
    since: datetime,
    accept: Callable[[StoredOccurrence], bool] = lambda occ: True,
    parsed: bool = True,
) -> list[StoredOccurrence]:
    """The ``limit`` newest accepted occurrences at or after ``since``, oldest first.

    Reads newest files first and stops at the first file whose mtime shows it
    cannot hold anything newer than the ``limit`` kept so far. Only the lines
    are kept while reading (a parsed occurrence takes ten times the memory);
    the result is parsed again unless ``parsed`` is false, when only
    :meth:`StoredOccurrence.to_json` and the checked fields are of use.
    """
    directory = occurrences_dir(data_dir)
    skips = SkipLog()
    found: list[StoredOccurrence] = []
    floor_ns = None  # once `limit` are kept: the oldest of them
    since_ns = to_ns(since)
    try:
        for file in list_files(directory, skips, since_ns):
            if floor_ns is not None and file.mtime_ns + MTIME_SLACK_NS < floor_ns:
                break
            found += (occ._replace(raw=None) for occ in read_file(directory, file.name, skips)
                      if occ.ns >= since_ns and accept(occ))
            if len(found) >= 2 * limit:  # cut back to the newest `limit`: bounded memory, and a floor to stop at
                found = _newest_first(found)[:limit]
                floor_ns = found[-1].ns
    finally:
        skips.close()
    result = _newest_first(found)[:limit][::-1]
    return [parse_line(occ.line) for occ in result] if parsed else result


def _newest_first(occurrences: list[StoredOccurrence]) -> list[StoredOccurrence]:
    return sorted(occurrences, key=lambda occ: (occ.ns, occ.id), reverse=True)


# -- following new files ---------------------------------------------------------------------------

IN_CLOSE_WRITE, IN_MOVED_TO, IN_CREATE = 0x8, 0x80, 0x100
IN_DELETE_SELF, IN_MOVE_SELF, IN_Q_OVERFLOW, IN_IGNORED = 0x400, 0x800, 0x4000, 0x8000
IN_ONLYDIR = 0x01000000
_EVENT = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name


class Inotify:
    """A minimal inotify(7) handle through libc: watches, and a blocking wait for events."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise self._error()
        self._poll = select.poll()
        self._poll.register(self.fd, select.POLLIN)

    def _error(self, path: Path | None = None) -> OSError:
        code = ctypes.get_errno()
        return OSError(code, os.strerror(code), None if path is None else str(path))  # the errno's subclass

    def add(self, path: Path, mask: int) -> int:
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(path), ctypes.c_uint32(mask))
        if wd < 0:
            raise self._error(path)
        return wd

    def wait(self, timeout_s: float | None) -> list[tuple[int, int, str]]:
        """(watch, mask, name) of the events that came, after waiting up to ``timeout_s`` (None: forever)."""
        try:
            ready = self._poll.poll(None if timeout_s is None else max(0, int(timeout_s * 1000)))
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for old interpreters
            ready = []
        if not ready:
            return []
        events = []
        while True:
            try:
                buffer = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return events
            offset = 0
            while offset < len(buffer):
                wd, mask, _cookie, length = _EVENT.unpack_from(buffer, offset)
                offset += _EVENT.size
                name = os.fsdecode(buffer[offset:offset + length].rstrip(b"\0"))
                offset += length
                events.append((wd, mask, name))

    def close(self) -> None:
        os.close(self.fd)


class OccurrenceFollower:
    """New occurrence files under a data directory as they are renamed into place.

    Files present when it starts are not new. The occurrences directory may
    appear (or be re-created) later; after an inotify queue overflow the
    directory is rescanned so nothing is missed.
    """

    #: Names remembered to read each file once; well above the store's file bound.
    SEEN_LIMIT = 50_000

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.directory = occurrences_dir(data_dir)
        self.skips = SkipLog(limit=1_000_000)  # a watcher runs for long: warn about every problem
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._inotify = Inotify()
        self._started_ns = time.time_ns()
        try:
            self._parent = self._inotify.add(self.data_dir, IN_CREATE | IN_MOVED_TO | IN_DELETE_SELF
                                             | IN_MOVE_SELF | IN_ONLYDIR)
            self._watch = self._add_directory_watch()
        except OSError:
            self._inotify.close()
            raise
        for file in list_files(self.directory, self.skips):
            self._remember(file.name)

    def _add_directory_watch(self) -> int | None:
        try:
            return self._inotify.add(self.directory, IN_MOVED_TO | IN_CLOSE_WRITE | IN_ONLYDIR)
        except FileNotFoundError:
            return None  # not yet: the first file sink to start creates it

    def _remember(self, name: str) -> bool:
        """True the first time a name is seen."""
        if name in self._seen:
            return False
        self._seen[name] = None
        if len(self._seen) > self.SEEN_LIMIT:
            self._seen.popitem(last=False)
        return True

    def __enter__(self) -> OccurrenceFollower:
        return self

    def __exit__(self, *_: object) -> None:
        self._inotify.close()

    def follow(self, deadline: float | None = None) -> Iterator[StoredOccurrence]:
        """Occurrences of each new file, as it arrives; returns at ``deadline`` (time.monotonic()).

        Raises FileNotFoundError when the data directory itself goes away.
        """
        while deadline is None or time.monotonic() < deadline:
            new, rescan = [], False
            timeout = None if deadline is None else deadline - time.monotonic()
            for wd, mask, name in self._inotify.wait(timeout):
                if mask & IN_Q_OVERFLOW:
                    rescan = True
                elif wd == self._parent:
                    if mask & (IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED):
                        raise FileNotFoundError(errno.ENOENT, "the data directory went away", str(self.data_dir))
                    if name == self.directory.name:
                        self._watch, rescan = self._add_directory_watch(), True
                elif wd == self._watch:
                    if mask & IN_IGNORED:
                        self._watch = None  # removed; the parent's watch sees it come back
                    elif is_occurrence_file(name):
                        new.append(name)
            if rescan:
                new += [file.name for file in reversed(list_files(self.directory, self.skips, self._started_ns))]
            for name in new:
                if self._remember(name):
                    yield from read_file(self.directory, name, self.skips)
