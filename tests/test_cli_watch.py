"""`tapio watch`: new occurrence files followed with inotify, filtered, printed as they arrive.

The watcher runs as a real subprocess (as an operator runs it); files are
written by the real writer (OccurrenceWriter: temporary file, then rename),
or crafted in place where a test says so.
"""

from __future__ import annotations

import json
import os
import queue
import select
import shutil
import signal
import subprocess
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kernel_helpers import TAPIO, scaled, tool_env

from tapio_core.occurrence import Occurrence, occurrence_id
from tapio_core.occurrence_reader import IN_Q_OVERFLOW, OccurrenceFollower
from tapio_core.store import OccurrenceWriter, occurrences_dir

READY = "tapio: watching "
#: Bounds on waiting for something that should happen within milliseconds (scaled: the CLI kernel tests
#: start a watch in an emulated guest, where Python alone takes seconds to start).
WAIT_S = scaled(10.0)
#: How long to wait for something that must not happen.
QUIET_S = 0.5


def occ(type_="kernel.network.connection_refused", severity="warning", **data) -> Occurrence:
    when = datetime.now(UTC)
    return Occurrence(id=occurrence_id(time.time_ns(), json.dumps([type_, data]).encode()), timestamp=when,
                      type=type_, severity=severity, outcome="failure", data=data)


class Watch:
    """`tapio watch` as a subprocess: its stdout lines in a queue, its stderr collected."""

    def __init__(self, data_dir: Path, *args: str) -> None:
        self.process = subprocess.Popen(
            [str(TAPIO), "watch", "--data-dir", str(data_dir), *args], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=tool_env(), start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr: list[str] = []
        self._ready = threading.Event()
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def _read_stderr(self) -> None:
        for line in self.process.stderr:
            self.stderr.append(line.rstrip("\n"))
            if line.startswith(READY):
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> None:
        assert self._ready.wait(WAIT_S), "tapio watch never said it was watching"
        assert self.process.poll() is None, "\n".join(self.stderr)

    def next_line(self, timeout: float = WAIT_S) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from tapio watch within {timeout} s; stderr: {self.stderr}") from None

    def no_line(self) -> None:
        with pytest.raises(queue.Empty):
            self.lines.get(timeout=QUIET_S)

    def wait(self) -> int:
        """The exit code, once the process has ended and all it printed has been read."""
        try:
            code = self.process.wait(WAIT_S)
        finally:
            self.stop()
        for reader in self._readers:
            reader.join(WAIT_S)
        return code

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def watches():
    started: list[Watch] = []

    def start(data_dir: Path, *args: str) -> Watch:
        watch = Watch(data_dir, *args)
        started.append(watch)
        watch.wait_ready()
        return watch

    yield start
    for watch in started:
        watch.stop()


def pids(lines: list[str]) -> list[int]:
    return [json.loads(line)["data"]["pid"] for line in lines]


def test_new_files_are_printed_as_json_lines_as_they_arrive_and_old_ones_are_not(tmp_path, watches):
    writer = OccurrenceWriter(tmp_path)
    writer.write([occ(pid=1)])  # there before the watch: not new
    watch = watches(tmp_path, "--json")
    writer.write([occ(pid=2), occ(pid=3)])
    assert pids([watch.next_line(), watch.next_line()]) == [2, 3]
    writer.write([occ(pid=4)])
    line = watch.next_line()
    assert pids([line]) == [4]
    assert Occurrence.from_json(line).data["pid"] == 4  # the full occurrence, as the agent wrote it
    watch.no_line()


def test_observer_flags_type_and_severity_filter(tmp_path, watches):
    writer = OccurrenceWriter(tmp_path)
    watch = watches(tmp_path, "--json", "--network", "--storage", "--severity", "error")
    writer.write([occ(severity="warning", pid=1), occ(severity="error", pid=2),
                  occ("kernel.container.oom_kill", severity="critical", pid=3),
                  occ("kernel.storage.io_error", severity="critical", pid=4),
                  occ("kernel.node.ipc_drop", severity="error", pid=5)])
    assert pids([watch.next_line(), watch.next_line()]) == [2, 4]
    watch.no_line()
    pmc = watches(tmp_path, "--json", "--pmc", "--type", "kernel.container.")
    writer.write([occ("kernel.node.ipc_drop", pid=6), occ("kernel.container.exit", pid=7), occ(pid=8)])
    assert pids([pmc.next_line(), pmc.next_line()]) == [6, 7]
    pmc.no_line()


def test_count_and_for_end_the_watch_by_themselves(tmp_path, watches):
    writer = OccurrenceWriter(tmp_path)
    watch = watches(tmp_path, "--json", "--count", "2")
    writer.write([occ(pid=1), occ(pid=2), occ(pid=3)])
    assert watch.wait() == 0
    assert pids([watch.next_line(), watch.next_line()]) == [1, 2]
    assert watch.lines.empty()
    quiet = watches(tmp_path, "--json", "--for", "1s")
    assert quiet.wait() == 0
    assert quiet.lines.empty()


def test_the_occurrences_directory_may_appear_after_the_watch_starts(tmp_path, watches):
    watch = watches(tmp_path, "--json")
    assert not occurrences_dir(tmp_path).exists()
    OccurrenceWriter(tmp_path).write([occ(pid=1)])  # the first file sink to start creates it
    assert pids([watch.next_line()]) == [1]


def test_files_written_in_place_are_read_and_bad_ones_skipped_with_a_warning(tmp_path, watches):
    directory = occurrences_dir(tmp_path)
    directory.mkdir(parents=True)
    watch = watches(tmp_path, "--json")
    (directory / ".tmp-not-yet.jsonl").write_text(occ(pid=99).to_json() + "\n")
    (directory / "00000000000000000001-1-000001.jsonl").write_bytes(b"\x00\xff binary\n")
    (directory / "00000000000000000002-1-000001.jsonl").write_text(occ(pid=1).to_json() + "\n")
    assert pids([watch.next_line()]) == [1]
    watch.no_line()
    assert any("skipping 00000000000000000001-1-000001.jsonl line 1: not UTF-8 text" in line
               for line in watch.stderr)


def test_human_lines_are_readable_and_plain_when_piped(tmp_path, watches):
    watch = watches(tmp_path, "--network")
    OccurrenceWriter(tmp_path).write([occ(pid=7, comm="curl\x1b[31m", src_ip="127.0.0.1", src_port=5,
                                          dst_ip="127.0.0.1", dst_port=1)])
    line = watch.next_line()
    assert line.endswith("  warning   kernel.network.connection_refused  curl\\x1b[31m[7]  "
                         "127.0.0.1:5 -> 127.0.0.1:1")
    assert "\x1b" not in line


def test_ctrl_c_stops_quietly(tmp_path, watches):
    watch = watches(tmp_path, "--json")
    watch.process.send_signal(signal.SIGINT)
    assert watch.wait() == 0
    assert not [line for line in watch.stderr if "Traceback" in line or "Aborted" in line]


def test_a_reader_that_goes_away_ends_the_watch_without_a_traceback(tmp_path):
    """Like `tapio watch --json | head -1`: the next write meets a closed pipe."""
    writer = OccurrenceWriter(tmp_path)
    read_end, write_end = os.pipe()
    process = subprocess.Popen([str(TAPIO), "watch", "--data-dir", str(tmp_path), "--json"],
                               stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.PIPE, text=True,
                               env=tool_env(), start_new_session=True)
    os.close(write_end)
    try:
        assert process.stderr.readline().startswith(READY)
        writer.write([occ(pid=1)])
        ready, _, _ = select.select([read_end], [], [], WAIT_S)
        assert ready and json.loads(os.read(read_end, 65536).splitlines()[0])["data"]["pid"] == 1
        os.close(read_end)
        read_end = None
        deadline = time.monotonic() + WAIT_S
        while process.poll() is None and time.monotonic() < deadline:
            writer.write([occ(pid=2)])
            time.sleep(0.05)
        assert process.wait(WAIT_S) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if read_end is not None:
            os.close(read_end)
        if process.poll() is None:
            process.kill()
            process.wait()


def test_a_data_dir_removed_under_the_watch_ends_it_with_one_error_line(tmp_path, watches):
    data_dir = tmp_path / "data"
    OccurrenceWriter(data_dir).write([occ(pid=1)])
    watch = watches(data_dir, "--json")
    shutil.rmtree(data_dir)
    assert watch.wait() == 1
    assert watch.stderr[-1] == f"Error: {data_dir}: the data directory went away"


def test_watching_a_data_dir_that_does_not_exist_is_one_error_line(tmp_path):
    done = subprocess.run([str(TAPIO), "watch", "--data-dir", str(tmp_path / "none")], capture_output=True,
                          text=True, timeout=30, env=tool_env())
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"Error: cannot watch {tmp_path / 'none'}: No such file or directory (start `tapio-agent --sink file "
        f"--data-dir {tmp_path / 'none'}` first, or give --data-dir)"]


def test_a_watch_that_loses_inotify_events_rescans_and_reads_each_file_once(tmp_path):
    writer = OccurrenceWriter(tmp_path)
    with OccurrenceFollower(tmp_path) as follower:
        writer.write([occ(pid=1)])
        writer.write([occ(pid=2)])
        real_wait = follower._inotify.wait
        # The kernel's queue overflowed: the real events are there, plus an overflow marker.
        follower._inotify.wait = lambda timeout: [*real_wait(timeout), (-1, IN_Q_OVERFLOW, "")]
        seen = [o.data["pid"] for o in follower.follow(deadline=time.monotonic() + 1)]
    assert seen == [1, 2]


def test_an_idle_watch_sleeps_in_the_kernel(tmp_path, watches):
    """No polling: while nothing happens the watcher does not run at all."""
    watch = watches(tmp_path, "--json")
    before = Path(f"/proc/{watch.process.pid}/status").read_text()
    time.sleep(1.0)
    after = Path(f"/proc/{watch.process.pid}/status").read_text()
    switches = lambda status: int(next(line.split()[1] for line in status.splitlines()
                                       if line.startswith("voluntary_ctxt_switches")))
    assert switches(after) - switches(before) <= 2  # a poller would wake many times a second
    assert os.path.exists(f"/proc/{watch.process.pid}")
