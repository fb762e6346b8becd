"""`tapio health` and `tapio recent` against crafted data dirs: verdicts, reasons, drill-downs, hostile files.

The store is written with the real writer (OccurrenceWriter) unless a test crafts
bytes on purpose; file mtimes are set where a test needs old files.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from tapio_core import occurrence_reader
from tapio_core.cli import cli
from tapio_core.health import Thresholds, TypeRouter, assess
from tapio_core.occurrence import Context, Entity, Error, Occurrence, occurrence_id
from tapio_core.occurrence_reader import MAX_LINE_BYTES, newest, parse_line, read_since
from tapio_core.state import agent_status, write_state
from tapio_core.store import OccurrenceWriter, occurrences_dir

NOW = datetime.now(UTC).replace(microsecond=0)


def occ(type_="kernel.network.connection_refused", severity="warning", age=timedelta(seconds=1), pod=None,
        **data) -> Occurrence:
    when = NOW - age
    context = Context(namespace="shop", entities=[Entity(kind="pod", id="uid-" + pod, name=pod)]) if pod else None
    return Occurrence(id=occurrence_id(int(when.timestamp() * 1e9), json.dumps([type_, data, str(age)]).encode()),
                      timestamp=when, type=type_, severity=severity, outcome="failure",
                      error=Error(code="ECONNREFUSED", message="refused"), context=context, data=data)


def running_state(**observers) -> dict:
    entries = {"network": {"status": "running", "reason": "", "records": 10, "anomalies": 2, "lost": 0}}
    entries.update(observers)
    return {"agent": {"version": "0.1.0", "pid": 7, "running": True, "started_at": time.time() - 60},
            "updated_at": time.time(), "config": {}, "observers": entries, "sinks": {}}


def health(data_dir, *args):
    result = CliRunner().invoke(cli, ["health", "--data-dir", str(data_dir), *args])
    return result


def health_json(data_dir, *args) -> tuple[int, dict]:
    result = health(data_dir, "--json", *args)
    return result.exit_code, json.loads(result.stdout)


def verdicts(report: dict) -> dict[str, str]:
    return {o["name"]: o["health"] for o in report["observers"]}


# -- verdicts --------------------------------------------------------------------------------------


def test_a_quiet_node_with_a_running_agent_is_healthy(tmp_path):
    write_state(tmp_path, running_state())
    code, report = health_json(tmp_path)
    assert code == 0
    assert report["health"] == "healthy"
    assert report["observers"][0]["reason"] == "no anomalies in the last 15m"
    assert "network   healthy  no anomalies in the last 15m" in health(tmp_path).output


def test_warnings_degrade_and_many_or_critical_ones_make_it_critical(tmp_path):
    write_state(tmp_path, running_state())
    writer = OccurrenceWriter(tmp_path)
    writer.write([occ(pid=1, comm="curl", dst_ip="10.0.0.1", dst_port=80)])
    code, report = health_json(tmp_path)
    assert (code, verdicts(report)) == (1, {"network": "degraded"})
    assert report["observers"][0]["reason"] == (
        "1 occurrence(s) in the last 15m (1 warning); most: kernel.network.connection_refused x1")
    writer.write([occ(pid=1, dst_port=81), occ(pid=1, dst_port=82)])
    code, report = health_json(tmp_path, "--critical-at", "3")
    assert (code, report["health"]) == (2, "critical")
    code, report = health_json(tmp_path, "--degraded-at", "4")
    assert (code, report["health"]) == (0, "healthy")  # below the bar, but still counted
    assert report["observers"][0]["occurrences"]["count"] == 3
    writer.write([occ("kernel.network.connection_timeout", severity="critical")])
    code, report = health_json(tmp_path, "--degraded-at", "100")
    assert (code, report["health"]) == (2, "critical")


def test_an_error_degrades_and_info_alone_does_not(tmp_path):
    write_state(tmp_path, running_state())
    OccurrenceWriter(tmp_path).write([occ(severity="info"), occ(severity="debug")])
    code, report = health_json(tmp_path)
    assert (code, report["health"]) == (0, "healthy")
    assert report["observers"][0]["reason"].endswith("; none warning or worse")
    OccurrenceWriter(tmp_path).write([occ(severity="error")])
    assert health_json(tmp_path, "--degraded-at", "50")[1]["health"] == "degraded"


def test_agent_state_failed_is_critical_and_unsupported_is_not_unhealthy(tmp_path):
    write_state(tmp_path, running_state(
        pmc={"status": "unsupported", "reason": "pmc: unsupported: no hardware PMU"},
        storage={"status": "failed", "reason": "storage: tracepoint(s) missing on this kernel: raw:x"}))
    code, report = health_json(tmp_path)
    assert code == 2
    by_name = {o["name"]: o for o in report["observers"]}
    assert by_name["pmc"]["health"] == "unsupported"
    assert by_name["pmc"]["reason"] == "not supported on this node: pmc: unsupported: no hardware PMU"
    assert by_name["storage"]["health"] == "critical"
    assert by_name["storage"]["reason"] == "the observer failed: storage: tracepoint(s) missing on this kernel: raw:x"
    code, report = health_json(tmp_path, "pmc")
    assert code == 0  # unsupported is a fact about the node, not a fault


def test_what_a_running_observer_runs_without_is_in_its_reason(tmp_path):
    reason = "degraded: missing stall_cycles (no backend-stall counter); cpu_stall and memory_pressure unseen"
    write_state(tmp_path, running_state(pmc={"status": "running", "reason": reason, "type_prefix": "kernel.node."}))
    OccurrenceWriter(tmp_path).write([occ("kernel.node.ipc_degradation", severity="warning")])
    code, report = health_json(tmp_path, "pmc")
    [pmc] = [o for o in report["observers"] if o["name"] == "pmc"]
    assert (code, pmc["health"]) == (1, "degraded")
    assert pmc["reason"].startswith("1 occurrence(s) in the last 15m (1 warning)")
    assert pmc["reason"].endswith("; " + reason)


def test_records_lost_just_now_degrade_an_observer_and_lost_long_ago_do_not(tmp_path):
    write_state(tmp_path, running_state(
        network={"status": "running", "reason": "", "lost": 120, "lost_per_s": 0},
        storage={"status": "running", "reason": "", "lost": 50, "lost_per_s": 25.0}))
    code, report = health_json(tmp_path)
    by_name = {o["name"]: o for o in report["observers"]}
    assert (code, by_name["network"]["health"], by_name["storage"]["health"]) == (1, "healthy", "degraded")
    assert by_name["storage"]["reason"] == (
        "no anomalies in the last 15m; the ring buffer is losing records (25/s): anomalies are going unseen")
    assert by_name["storage"]["lost_per_s"] == 25.0


def test_without_a_running_agent_the_node_is_at_least_degraded(tmp_path):
    code, report = health_json(tmp_path)
    assert (code, report["health"], report["agent"]["running"]) == (1, "degraded", False)
    assert report["agent"]["summary"].startswith("no agent is running")
    stale = running_state()
    stale["updated_at"] = time.time() - 3600
    write_state(tmp_path, stale)
    result = health(tmp_path)
    assert result.exit_code == 1
    assert "no agent is running: the agent (pid 7) last wrote its state 1h ago" in result.output


def test_the_window_leaves_out_older_occurrences_and_does_not_open_older_files(tmp_path, monkeypatch):
    write_state(tmp_path, running_state())
    writer = OccurrenceWriter(tmp_path)
    old = writer.write([occ(age=timedelta(hours=2), pid=1)])
    hour_ago = time.time() - 7000
    os.utime(old, (hour_ago, hour_ago))
    writer.write([occ(age=timedelta(minutes=20), pid=2)])  # file new, occurrence outside 15m
    opened = []
    real_read = occurrence_reader.read_file
    monkeypatch.setattr(occurrence_reader, "read_file",
                        lambda directory, name, skips: opened.append(name) or real_read(directory, name, skips))
    code, report = health_json(tmp_path)
    assert (code, report["health"]) == (0, "healthy")
    assert old.name not in opened and len(opened) == 1
    assert health_json(tmp_path, "--since", "3h")[1]["observers"][0]["occurrences"]["count"] == 2


def test_occurrences_go_to_the_observer_of_their_type_prefix():
    router = TypeRouter({"network": {}, "gpu": {"type_prefix": "kernel.accel."}})
    assert router.observer_of("kernel.network.connection_refused") == "network"
    assert router.observer_of("kernel.node.ipc_drop") == "pmc"
    assert router.observer_of("kernel.accel.hang") == "gpu"  # declared in the state
    assert router.observer_of("kernel.storage.io_error") == "storage"
    assert router.observer_of("custom") == "custom"


# -- drilling into one observer -------------------------------------------------------------------


def test_drill_down_lists_the_worst_destinations_processes_devices_and_pods(tmp_path):
    write_state(tmp_path, running_state())
    writer = OccurrenceWriter(tmp_path)
    writer.write([occ(pid=10, comm="curl", dst_ip="10.0.0.1", dst_port=443, pod="web-1") for _ in range(3)])
    writer.write([occ(pid=11, comm="wget", dst_ip="::1", dst_port=80, severity="error", pod="api-1")])
    writer.write([occ("kernel.storage.io_error", severity="error", pid=12, comm="dd", dev_major=7, dev_minor=3),
                  occ("kernel.storage.latency_spike", device="loop3", pid=12, comm="dd")])
    code, report = health_json(tmp_path, "network")
    assert code == 1
    network = next(o for o in report["observers"] if o["name"] == "network")
    worst = network["worst"]
    # An error outranks three warnings: severity first, then count.
    assert [(row["key"], row["count"], row["worst_severity"]) for row in worst["destinations"]] == [
        ("[::1]:80", 1, "error"), ("10.0.0.1:443", 3, "warning")]
    assert [row["key"] for row in worst["processes"]] == ["wget[11]", "curl[10]"]
    assert [row["key"] for row in worst["pods"]] == ["shop/api-1", "shop/web-1"]
    assert "devices" not in worst
    storage = next(o for o in health_json(tmp_path, "storage")[1]["observers"] if o["name"] == "storage")
    assert [row["key"] for row in storage["worst"]["devices"]] == ["7:3", "loop3"]
    out = health(tmp_path, "network").output
    assert "network: degraded -- 4 occurrence(s) in the last 15m (1 error, 3 warning)" in out
    assert "Worst destinations" in out and "Worst pods" in out
    assert re.search(r"\n 10\.0\.0\.1:443 +3  warning  ", out)
    assert "agent: status running, 10 records, 2 anomalies, 0 lost" in out


def test_drill_down_top_bounds_each_list(tmp_path):
    write_state(tmp_path, running_state())
    OccurrenceWriter(tmp_path).write([occ(pid=p, dst_ip="10.0.0.1", dst_port=p) for p in range(20)])
    network = health_json(tmp_path, "network", "--top", "3")[1]["observers"][0]
    assert len(network["worst"]["destinations"]) == 3


def test_an_unknown_observer_is_a_usage_error_naming_the_known_ones(tmp_path):
    write_state(tmp_path, running_state())
    result = health(tmp_path, "netwrok")
    assert result.exit_code == 2
    assert "no observer 'netwrok' in the agent's state or in the last 15m of occurrences (known: network)" in \
        result.output


def test_hostile_values_in_occurrences_cannot_drive_the_terminal_or_flood_the_report(tmp_path):
    write_state(tmp_path, running_state())
    OccurrenceWriter(tmp_path).write([occ(pid=1, comm="\x1b[2J\x1b]0;owned\x07", dst_ip="x" * 10_000, dst_port=1)])
    out = health(tmp_path, "network").output
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b[2J" in out
    network = health_json(tmp_path, "network")[1]["observers"][0]
    assert len(network["worst"]["destinations"][0]["key"]) < 300


# -- reading: safe and quick -----------------------------------------------------------------------


def crafted(tmp_path, name: str, content: bytes):
    directory = occurrences_dir(tmp_path)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / name).write_bytes(content)
    return directory / name


@pytest.mark.parametrize(("content", "reason"), [
    (b"\xff\xfe\x00\x01 binary\n", "not UTF-8 text"),
    (b'{"id": "x", "timestamp": \n', "not JSON"),
    (b"[" * 50_000 + b"]" * 50_000 + b"\n", "JSON nested too deeply"),
    (b"x" * (MAX_LINE_BYTES + 10) + b"\n", f"longer than {MAX_LINE_BYTES} bytes"),
    (b'{"id": "x", "timestamp": "2026-01-01T00:00:00Z", "type": "t", "severity": "loud"}\n', "severity 'loud'"),
    (b'{"id": "x", "timestamp": "noon", "type": "t", "severity": "info"}\n', "bad timestamp"),
    (b'{"id": 1, "timestamp": "2026-01-01T00:00:00Z", "type": "t", "severity": "info"}\n', "must be strings"),
    (b'{"id": "x", "timestamp": "2026-01-01T00:00:00Z", "type": "t", "severity": "info", "data": []}\n',
     "data and context must be objects"),
    (b'{"id": "x", "timestamp": "2026-01-01T00:00:00", "type": "t", "severity": "info"}\n', "bad timestamp"),
])
def test_each_kind_of_bad_line_is_skipped_with_its_reason_and_the_rest_is_read(tmp_path, caplog, content, reason):
    good = occ(pid=5).to_json().encode() + b"\n"
    crafted(tmp_path, "00000000000000000001-1-000001.jsonl", content + good)
    found = newest(tmp_path, 10, NOW - timedelta(hours=1))
    assert [o.data["pid"] for o in found] == [5]
    assert "skipping 00000000000000000001-1-000001.jsonl line 1: " in caplog.text
    assert reason in caplog.text


def test_symlinks_fifos_directories_and_temporaries_are_not_read(tmp_path, caplog):
    outside = tmp_path / "outside.jsonl"
    outside.write_text(occ(pid=666).to_json() + "\n")
    directory = occurrences_dir(tmp_path)
    directory.mkdir(parents=True)
    (directory / "00000000000000000001-1-000001.jsonl").symlink_to(outside)
    os.mkfifo(directory / "00000000000000000002-1-000001.jsonl")
    (directory / "00000000000000000003-1-000001.jsonl").mkdir()
    (directory / ".tmp-half.jsonl").write_text(occ(pid=777).to_json())
    OccurrenceWriter(tmp_path).write([occ(pid=1)])
    result = CliRunner().invoke(cli, ["recent", "--data-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0
    assert [json.loads(line)["data"]["pid"] for line in result.stdout.splitlines()] == [1]
    assert "a symbolic link, which is not followed" in caplog.text
    assert caplog.text.count("not a regular file") == 2


def test_a_huge_file_without_newlines_is_skipped_in_bounded_steps(tmp_path, caplog):
    crafted(tmp_path, "00000000000000000001-1-000001.jsonl", b"{" * (64 * 1024 * 1024) + b"\n"
            + occ(pid=3).to_json().encode() + b"\n")
    found = newest(tmp_path, 10, NOW - timedelta(hours=1))
    assert [o.data["pid"] for o in found] == [3]  # the line after the huge one is still read
    assert caplog.text.count("skipping") == 1
    assert f"line 1: longer than {MAX_LINE_BYTES} bytes" in caplog.text


def test_warnings_stop_one_by_one_after_a_few_and_end_with_a_count(tmp_path, caplog):
    crafted(tmp_path, "00000000000000000001-1-000001.jsonl", b"garbage\n" * 500)
    assert newest(tmp_path, 10, NOW - timedelta(hours=1)) == []
    assert caplog.text.count("skipping") == occurrence_reader.WARN_LIMIT
    assert f"skipped {500 - occurrence_reader.WARN_LIMIT} more" in caplog.text


def test_unreadable_files_are_skipped(tmp_path, caplog):
    path = crafted(tmp_path, "00000000000000000001-1-000001.jsonl", occ(pid=1).to_json().encode() + b"\n")
    OccurrenceWriter(tmp_path).write([occ(pid=2)])
    real_open = os.open

    def refuse(file, flags, *args, **kwargs):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(file, flags, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:  # root reads any file: make one refuse
        patch.setattr(occurrence_reader.os, "open", refuse)
        found = newest(tmp_path, 10, NOW - timedelta(hours=1))
    assert [o.data["pid"] for o in found] == [2]
    assert "permission denied (the agent's files are private: run as root)" in caplog.text


def test_newest_stops_at_the_first_file_that_cannot_hold_anything_newer(tmp_path, monkeypatch):
    writer = OccurrenceWriter(tmp_path)
    paths = []
    for index in range(100):  # 100 files of 10 occurrences a second apart, oldest first
        when = NOW.timestamp() - 1000 + index * 10  # the occurrences' own clock: NOW, not the time the test ran
        paths.append(writer.write([occ(age=timedelta(seconds=1000 - index * 10 - k), pid=index * 10 + k)
                                   for k in range(10)]))
        os.utime(paths[-1], (when, when))
    opened = []
    real_read = occurrence_reader.read_file
    monkeypatch.setattr(occurrence_reader, "read_file",
                        lambda directory, name, skips: opened.append(name) or real_read(directory, name, skips))
    found = newest(tmp_path, 15, NOW - timedelta(hours=1))
    assert [o.data["pid"] for o in found] == list(range(985, 1000))
    assert len(opened) <= 3  # two files hold the 15; the slack may let one more in


def test_newest_is_exact_when_a_newer_file_holds_older_occurrences(tmp_path):
    """Observers' batches interleave: file order is only roughly time order."""
    writer = OccurrenceWriter(tmp_path)
    late = writer.write([occ(age=timedelta(seconds=3), pid=1)])
    early = writer.write([occ(age=timedelta(seconds=30), pid=2)])  # written later, happened earlier
    now = time.time()
    os.utime(late, (now - 2, now - 2))
    os.utime(early, (now - 1, now - 1))
    assert [o.data["pid"] for o in newest(tmp_path, 1, NOW - timedelta(hours=1))] == [1]
    assert [o.data["pid"] for o in newest(tmp_path, 2, NOW - timedelta(hours=1))] == [2, 1]


def test_a_missing_or_empty_store_reads_as_nothing(tmp_path):
    assert newest(tmp_path / "none", 5, NOW - timedelta(hours=1)) == []
    assert list(read_since(tmp_path, NOW - timedelta(hours=1))) == []
    occurrences_dir(tmp_path).mkdir(parents=True)
    assert newest(tmp_path, 5, NOW - timedelta(hours=1)) == []


def test_recent_severity_filter_and_repeatable_type(tmp_path):
    OccurrenceWriter(tmp_path).write([occ(severity="info", pid=1), occ(severity="error", pid=2),
                                      occ("kernel.container.oom_kill", severity="critical", pid=3),
                                      occ("kernel.storage.io_error", severity="error", pid=4)])
    result = CliRunner().invoke(cli, ["recent", "--data-dir", str(tmp_path), "--json", "--severity", "error",
                                      "--type", "kernel.network.", "--type", "kernel.container."])
    assert sorted(json.loads(line)["data"]["pid"] for line in result.stdout.splitlines()) == [2, 3]


def test_the_light_parse_agrees_with_the_model_on_what_the_agent_writes():
    written = occ(pid=3, comm="curl", pod="web-1", dst_ip="::1", dst_port=1)
    parsed = parse_line(written.to_json().encode())
    assert (parsed.timestamp, parsed.id, parsed.type, parsed.severity) == (
        written.timestamp, written.id, written.type, written.severity)
    assert Occurrence.from_json(parsed.to_json()) == written


def test_assess_counts_every_occurrence_once(tmp_path):
    write_state(tmp_path, running_state())
    stream = [parse_line(occ(pid=p % 3, dst_ip="10.0.0.1", dst_port=p % 2).to_json().encode()) for p in range(30)]
    report = assess(agent_status(tmp_path), stream, timedelta(minutes=15), Thresholds(), drill="network")
    network = report.observers["network"]
    assert network.tally.count == 30
    assert sum(t.count for _, t in network.worst["destinations"]) == 30
    assert sum(t.count for _, t in network.worst["processes"]) == 30


@pytest.mark.parametrize("output", ["--json", "--human"])
def test_recent_stops_quietly_when_its_reader_goes_away(tmp_path, output):
    OccurrenceWriter(tmp_path).write([occ(pid=p, comm="curl", dst_ip="10.0.0.1", dst_port=p) for p in range(2000)])
    tapio = str(Path(sys.executable).with_name("tapio"))
    args = [tapio, "recent", "--data-dir", str(tmp_path), "-n", "2000", *([output] if output == "--json" else [])]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = process.stdout.readline()
    process.stdout.close()  # like `| head -1`: 2000 lines do not fit in the pipe
    assert process.wait(30) == 0
    assert b"Traceback" not in process.stderr.read()
    assert b"curl" in first


def test_recent_says_when_the_data_dir_has_no_occurrences_at_all(tmp_path):
    result = CliRunner().invoke(cli, ["recent", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0
    assert result.stderr.strip().endswith(f"under {tmp_path} (it has no occurrences/: see tapio-agent --sink file)")
    occurrences_dir(tmp_path).mkdir()
    assert CliRunner().invoke(cli, ["recent", "--data-dir", str(tmp_path)]).stderr.strip().endswith(f"under {tmp_path}")
