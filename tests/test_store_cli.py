"""Occurrence files and the `tapio` CLI: atomic private files, retention, recent, corrupt input."""

import json
import os
import stat
from datetime import UTC, datetime, timedelta

import pytest
from click.testing import CliRunner

from tapio_core.cli import cli
from tapio_core.occurrence import Occurrence, occurrence_id
from tapio_core.occurrence_reader import EPOCH, read_since
from tapio_core.store import OccurrenceWriter, occurrences_dir


def occurrence(age=timedelta(0), type_="kernel.network.connection_refused", pid=1):
    when = datetime.now(UTC).replace(microsecond=0) - age
    return Occurrence(id=occurrence_id(int(when.timestamp() * 1e9), f"{type_}{pid}{age}".encode()), timestamp=when,
                      type=type_, severity="warning", outcome="failure",
                      data={"pid": pid, "comm": "curl", "src_ip": "127.0.0.1", "src_port": 5, "dst_ip": "127.0.0.1",
                            "dst_port": 1})


def test_tapio_sink_emit_file_writes_private_whole_files(tmp_path):
    writer = OccurrenceWriter(tmp_path)
    path = writer.write([occurrence(), occurrence(pid=2)])
    assert stat.S_IMODE(os.stat(occurrences_dir(tmp_path)).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [json.loads(line)["data"]["pid"] for line in path.read_text().splitlines()] == [1, 2]
    assert not [p for p in occurrences_dir(tmp_path).iterdir() if p.name.startswith(".tmp")]


def test_the_file_sink_refuses_a_planted_link_or_a_directory_not_its_own(tmp_path):
    """As root the agent would write wherever a planted link points: it names the problem and writes nothing."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "linked").mkdir()
    occurrences_dir(tmp_path / "linked").symlink_to(elsewhere)
    result = CliRunner().invoke(cli, ["replay", "/dev/null", "--sink", "file", "--data-dir", str(tmp_path / "linked")])
    assert "is not a directory (a symbolic link?)" in result.output and result.exit_code != 0
    assert list(elsewhere.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_the_file_sink_refuses_a_directory_of_another_user(tmp_path):
    foreign = tmp_path / "foreign"
    occurrences_dir(foreign).mkdir(parents=True)
    os.chown(occurrences_dir(foreign), 4242, 4242)
    try:
        OccurrenceWriter(foreign)
    except OSError as exc:
        assert f"belongs to uid 4242, not to this agent's {os.geteuid()}" in str(exc)
    else:
        raise AssertionError("a directory of another user was written into")


def test_retention_bounds_files_and_bytes(tmp_path):
    writer = OccurrenceWriter(tmp_path, max_files=3)
    for pid in range(10):
        writer.write([occurrence(pid=pid)])
    assert sorted(o.data["pid"] for o in read_since(tmp_path, EPOCH)) == [7, 8, 9]
    size = len(occurrence().to_json()) + 1
    writer = OccurrenceWriter(tmp_path, max_files=100, max_bytes=2 * size + 10)
    writer.write([occurrence(pid=10)])
    assert len(list(occurrences_dir(tmp_path).iterdir())) == 2


def test_retention_counts_files_left_by_an_earlier_run(tmp_path):
    OccurrenceWriter(tmp_path).write([occurrence(pid=1)])
    OccurrenceWriter(tmp_path, max_files=1).write([occurrence(pid=2)])
    assert [o.data["pid"] for o in read_since(tmp_path, EPOCH)] == [2]


def test_recent_human_and_json(tmp_path):
    OccurrenceWriter(tmp_path).write([occurrence(timedelta(minutes=10), pid=1), occurrence(pid=2)])
    runner = CliRunner()
    result = runner.invoke(cli, ["recent", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "kernel.network.connection_refused  curl[2]  127.0.0.1:5 -> 127.0.0.1:1" in result.output
    assert "curl[1]" not in result.output  # older than the default 5m
    result = runner.invoke(cli, ["recent", "--data-dir", str(tmp_path), "--since", "1h", "--json"])
    assert [json.loads(line)["data"]["pid"] for line in result.output.splitlines()] == [1, 2]


def test_recent_limit_and_type_filter(tmp_path):
    writer = OccurrenceWriter(tmp_path)
    writer.write([occurrence(timedelta(seconds=s), pid=s) for s in (30, 20, 10)])
    writer.write([occurrence(type_="kernel.container.oom_kill", pid=99)])
    runner = CliRunner()
    result = runner.invoke(cli, ["recent", "--data-dir", str(tmp_path), "-n", "2", "--json",
                                 "--type", "kernel.network."])
    assert [json.loads(line)["data"]["pid"] for line in result.output.splitlines()] == [20, 10]


def test_recent_reads_tapio_data_dir_from_the_environment(tmp_path):
    OccurrenceWriter(tmp_path).write([occurrence(pid=3)])
    result = CliRunner().invoke(cli, ["recent", "--json"], env={"TAPIO_DATA_DIR": str(tmp_path)})
    assert json.loads(result.output)["data"]["pid"] == 3


def test_recent_skips_corrupted_files_and_lines_with_a_warning(tmp_path, caplog):
    OccurrenceWriter(tmp_path).write([occurrence(pid=1)])
    directory = occurrences_dir(tmp_path)
    (directory / "00000000000000000001-1-000001.jsonl").write_bytes(b"\xff\xfe not text")
    good = occurrence(pid=2).to_json()
    (directory / "00000000000000000002-1-000001.jsonl").write_text(f'{{"half": \n{good}\n["x"]\n')
    result = CliRunner().invoke(cli, ["recent", "--data-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0
    lines = [line for line in result.stdout.splitlines()]
    assert sorted(json.loads(line)["data"]["pid"] for line in lines) == [1, 2]
    assert "skipping" in caplog.text  # on stderr outside pytest, which captures logging itself
    assert "line 1" in caplog.text and "line 3" in caplog.text


def test_recent_on_missing_data_dir_says_so(tmp_path):
    result = CliRunner().invoke(cli, ["recent", "--data-dir", str(tmp_path / "none")])
    assert result.exit_code == 0
    assert "no occurrences" in result.stderr


def test_recent_rejects_a_bad_duration(tmp_path):
    result = CliRunner().invoke(cli, ["recent", "--since", "5 parsecs", "--data-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "is not a duration like 30s, 5m, 2h or 1d" in result.output
