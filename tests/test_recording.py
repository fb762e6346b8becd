"""Record files and `tapio replay`: the same records give the same occurrences, without BPF or root."""

import json
import os

import pytest
from click.testing import CliRunner
from network_records import pack_network_record

from tapio_core.cli import cli
from tapio_core.recording import RecordedBatch, RecordingError, RecordWriter, read_recording
from tapio_observer_network.records import KIND_CONNECT_REFUSED, KIND_CONNECT_TIMEOUT, NETWORK_RECORD

SIZE = NETWORK_RECORD.itemsize


def write(path, batches, offset=1_700_000_000_000_000_000):
    writer = RecordWriter(path, offset)
    for observer, records in batches:
        writer.write_batch(observer, SIZE, 123, records)
    writer.close()


def test_write_and_read_back(tmp_path):
    path = tmp_path / "rec"
    one = pack_network_record(KIND_CONNECT_REFUSED)
    write(path, [("network", one), ("network", one * 3)])
    items = list(read_recording(path))
    assert items[0] == 1_700_000_000_000_000_000
    assert items[1:] == [RecordedBatch("network", SIZE, 123, one), RecordedBatch("network", SIZE, 123, one * 3)]


def test_a_file_cut_short_replays_its_whole_frames(tmp_path):
    path = tmp_path / "rec"
    one = pack_network_record(KIND_CONNECT_REFUSED)
    write(path, [("network", one), ("network", one * 2)])
    data = path.read_bytes()
    path.write_bytes(data[:-5])
    assert [i.records for i in read_recording(path) if isinstance(i, RecordedBatch)] == [one]


@pytest.mark.parametrize("content, message", [(b"", "too short"), (b"NOTTAPIO\x01\x00", "bad magic"),
                                             (b"TAPIOREC\x09\x00", "version 9")])
def test_not_a_recording(tmp_path, content, message):
    path = tmp_path / "rec"
    path.write_bytes(content)
    with pytest.raises(RecordingError, match=message):
        list(read_recording(path))


def test_replay_runs_the_real_network_plugin_and_is_deterministic(tmp_path):
    path = tmp_path / "rec"
    write(path, [("network", pack_network_record(KIND_CONNECT_REFUSED, ts=10_000_000)
                  + pack_network_record(KIND_CONNECT_TIMEOUT, ts=20_000_000, pid=7))])
    runner = CliRunner()
    first = runner.invoke(cli, ["replay", str(path), "--plugins", "network,stdout"])
    assert first.exit_code == 0, first.output
    lines = [json.loads(line) for line in first.stdout.splitlines()]
    assert [(o["type"], o["timestamp"], o["data"]["pid"]) for o in lines] == [
        ("kernel.network.connection_refused", "2023-11-14T22:13:20.010Z", 4242),
        ("kernel.network.connection_timeout", "2023-11-14T22:13:20.020Z", 7),
    ]
    again = runner.invoke(cli, ["replay", str(path), "--plugins", "network,stdout"])
    assert again.stdout == first.stdout


def test_replay_into_the_file_sink(tmp_path):
    path = tmp_path / "rec"
    write(path, [("network", pack_network_record(KIND_CONNECT_REFUSED))])
    result = CliRunner().invoke(cli, ["replay", str(path), "--sink", "file", "--data-dir", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "d" / "occurrences").glob("*.jsonl"))) == 1


def test_replay_names_an_observer_no_plugin_provides(tmp_path):
    path = tmp_path / "rec"
    write(path, [("martian", pack_network_record(KIND_CONNECT_REFUSED))])
    result = CliRunner().invoke(cli, ["replay", str(path)])
    assert result.exit_code == 1
    assert "observer 'martian', which no loaded plugin provides" in result.output


def test_replay_rejects_a_layout_change(tmp_path):
    path = tmp_path / "rec"
    writer = RecordWriter(path, 0)
    writer.write_batch("network", SIZE + 8, 0, b"\0" * (SIZE + 8))
    writer.close()
    result = CliRunner().invoke(cli, ["replay", str(path)])
    assert result.exit_code == 1
    assert f"{SIZE + 8} bytes in the recording but {SIZE}" in result.output


def test_a_step_of_the_wall_clock_is_followed_by_the_agent_and_by_its_replay(tmp_path, monkeypatch, caplog):
    """The agent re-measures the monotonic-to-wall offset each housekeeping second; a step moves the
    occurrences after it, and the recording carries the step so a replay moves them the same way."""
    from tapio_core.agent import Agent
    from tapio_core.occurrence import KernelClock
    from tapio_core.pipeline import Pipeline
    from tapio_core.plugins import load_plugins
    from tapio_core.sink import SinkOptions

    start = 1_700_000_000_000_000_000
    path = tmp_path / "rec"
    plugins = load_plugins({"network", "stdout"})
    clock = KernelClock(offset_ns=start)
    pipeline = Pipeline.build(plugins, ["stdout"], SinkOptions(data_dir=tmp_path), {}, clock)
    recorder = RecordWriter(path, clock.offset_ns)
    agent = Agent(plugins, pipeline, recorder)
    recorder.write_batch("network", SIZE, 1, pack_network_record(KIND_CONNECT_REFUSED, ts=10_000_000))
    monkeypatch.setattr(KernelClock, "measure_offset", staticmethod(lambda: start + 500_000))  # jitter
    agent.housekeeping()
    assert clock.offset_ns == start
    monkeypatch.setattr(KernelClock, "measure_offset", staticmethod(lambda: start + 3_600_000_000_000))
    agent.housekeeping()  # the wall clock was set an hour ahead
    assert clock.offset_ns == start + 3_600_000_000_000
    assert [r.getMessage() for r in caplog.records if "stepped" in r.getMessage()] == [
        "the wall clock stepped by +3600.000 s: occurrences from now on carry the new time"]
    recorder.write_batch("network", SIZE, 2, pack_network_record(KIND_CONNECT_REFUSED, ts=20_000_000, pid=7))
    recorder.close()
    pipeline.close()
    result = CliRunner().invoke(cli, ["replay", str(path), "--plugins", "network,stdout"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["timestamp"] for line in result.stdout.splitlines()] == [
        "2023-11-14T22:13:20.010Z", "2023-11-14T23:13:20.020Z"]


# -- where a recording may be written -------------------------------------------------------------


def test_a_recording_is_written_private_and_replaces_a_file_of_ours(tmp_path):
    path = tmp_path / "old.rec"
    path.write_bytes(b"x" * 10_000)
    path.chmod(0o644)
    RecordWriter(path, 0).close()
    assert path.stat().st_mode & 0o777 == 0o600
    assert list(read_recording(path)) == [0]  # truncated: a fresh recording, its clock and nothing else


def test_a_planted_symbolic_link_is_not_written_through(tmp_path):
    victim = tmp_path / "shadow"
    victim.write_text("precious")
    (tmp_path / "agent.rec").symlink_to(victim)
    with pytest.raises(OSError, match="symbolic link: refusing to write through it"):
        RecordWriter(tmp_path / "agent.rec", 0)
    assert victim.read_text() == "precious"


def test_a_fifo_or_another_users_file_is_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError, match="not a regular file"):
        RecordWriter(fifo, 0)
    theirs = tmp_path / "theirs.rec"
    theirs.write_text("someone else's")
    os.chown(theirs, 12345, 12345)
    with pytest.raises(OSError, match="belongs to uid 12345"):
        RecordWriter(theirs, 0)
    assert theirs.read_text() == "someone else's"
