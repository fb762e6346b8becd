"""`tapio status` against crafted data dirs: running, stale, stopped, absent, corrupt and hostile state files."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from tapio_core.cli import EXIT_NOT_RUNNING, cli
from tapio_core.state import STALE_AFTER_S, agent_status, format_duration, process_identity, write_state

SGR = re.compile(r"\x1b\[([0-9;]*)m")


def state(updated_at: float | None = None, running: bool = True, **overrides) -> dict:
    now = time.time()
    result = {
        "agent": {"version": "0.1.0", "pid": 4242, "running": running, "started_at": now - 125, "node": "node-a"},
        "updated_at": now if updated_at is None else updated_at,
        "config": {"network": {"rst_storm_threshold": 50}},
        "observers": {
            "network": {"status": "running", "reason": "", "plugin": "network", "records": 1234, "anomalies": 7,
                        "lost": 3, "malformed": 0, "records_per_s": 12.5, "anomalies_per_s": 0.25,
                        "counters": {"suppressed": 2, "unmatched": 1}},
            "pmc": {"status": "unsupported", "reason": "pmc: unsupported: no hardware PMU", "plugin": "pmc",
                    "records": 0, "anomalies": 0, "lost": 0, "malformed": 0, "records_per_s": 0,
                    "anomalies_per_s": 0, "counters": {}},
            "storage": {"status": "failed", "reason": "storage: tracepoint(s) missing on this kernel: raw:nope",
                        "plugin": "storage", "records": 0, "anomalies": 0, "lost": 0, "malformed": 0,
                        "records_per_s": 0, "anomalies_per_s": 0, "counters": {}},
        },
        "sinks": {"file": {"plugin": "file", "delivered": 7, "failed": 1, "counters": {"dropped": 4, "retried": 2}}},
    }
    result.update(overrides)
    return result


def status(data_dir, *args, env=None):
    return CliRunner(env=env).invoke(cli, ["status", "--data-dir", str(data_dir), *args])


def test_a_running_agent_shows_observers_sinks_counts_and_rates(tmp_path):
    write_state(tmp_path, state())
    result = status(tmp_path)
    assert result.exit_code == 0, result.output
    out = result.output
    assert out.splitlines()[0] == "agent running (pid 4242, up 2m 5s)"
    assert "tapio 0.1.0 on node-a; state written 0s ago" in out
    network = next(line for line in out.splitlines() if line.lstrip().startswith("network"))
    assert network.split()[:8] == ["network", "running", "1,234", "12.5", "7", "0.2", "3", "0"]
    assert "suppressed=2 unmatched=1" in network
    assert re.search(r"\n *pmc +unsupported +", out) and re.search(r"\n *storage +failed +", out)
    # reasons go under the table, whole, one line each
    assert "\npmc: unsupported: no hardware PMU\n" in out
    assert "\nstorage: tracepoint(s) missing on this kernel: raw:nope\n" in out
    assert re.search(r"file\s+7\s+1\s+dropped=4 retried=2", out)
    assert '"rst_storm_threshold": 50' in out


def test_a_long_reason_is_one_whole_line_under_the_table_and_squeezes_no_column(tmp_path):
    written = state()
    long = "disabled: " + "; ".join(f"feature number {i} (the kernel has no tracepoint sock:thing_{i})"
                                    for i in range(6))
    written["observers"]["network"]["reason"] = long
    write_state(tmp_path, written)
    out = status(tmp_path).output
    network = next(line for line in out.splitlines() if line.lstrip().startswith("network"))
    assert network.split()[:8] == ["network", "running", "1,234", "12.5", "7", "0.2", "3", "0"]
    assert f"\nnetwork: {long}\n" in out


def test_json_carries_the_whole_state(tmp_path):
    written = state()
    write_state(tmp_path, written)
    result = status(tmp_path, "--json")
    assert result.exit_code == 0
    printed = json.loads(result.output)
    assert printed["running"] is True
    assert printed["state"] == json.loads(json.dumps(written))
    assert printed["data_dir"] == str(tmp_path)
    assert 0 <= printed["age_s"] < STALE_AFTER_S


def test_a_state_older_than_a_few_intervals_means_no_agent_is_running(tmp_path):
    write_state(tmp_path, state(updated_at=time.time() - 600))
    result = status(tmp_path)
    assert result.exit_code == EXIT_NOT_RUNNING
    first = result.output.splitlines()[0]
    assert first.startswith("no agent is running: the agent (pid 4242) last wrote its state 10m ago")
    assert "it stopped or hangs" in first
    assert "figures below are from then" in result.output
    network = next(line for line in result.output.splitlines() if line.lstrip().startswith("network"))
    assert network.split()[3] == "-"  # a rate from ten minutes ago is not a rate now
    assert json.loads(status(tmp_path, "--json").output)["running"] is False


def test_a_state_just_inside_the_bound_is_a_running_agent(tmp_path):
    write_state(tmp_path, state(updated_at=time.time() - STALE_AFTER_S / 2))
    assert status(tmp_path).exit_code == 0


def test_an_agent_that_stopped_cleanly_is_not_running(tmp_path):
    write_state(tmp_path, state(running=False))
    result = status(tmp_path)
    assert result.exit_code == EXIT_NOT_RUNNING
    assert result.output.startswith("no agent is running: the agent (pid 4242) stopped 0s ago")


def agent_entry(pid: int, **identity) -> dict:
    return {"version": "0.1.0", "pid": pid, "running": True, "started_at": time.time() - 5, "node": "n", **identity}


def test_an_agent_killed_without_stopping_is_not_running_though_its_state_is_fresh(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: its pid is free now
    write_state(tmp_path, state(agent=agent_entry(child.pid, **process_identity())))
    result = status(tmp_path)
    assert result.exit_code == EXIT_NOT_RUNNING
    assert result.output.startswith(f"no agent is running: the agent (pid {child.pid}) is gone without stopping")


def test_a_pid_taken_by_another_process_is_not_the_agent(tmp_path):
    identity = process_identity()
    write_state(tmp_path, state(agent=agent_entry(os.getpid(), pid_ns=identity["pid_ns"],
                                                  start_ticks=identity["start_ticks"] + 1)))
    assert status(tmp_path).exit_code == EXIT_NOT_RUNNING


def test_a_live_agent_or_one_in_another_pid_namespace_is_judged_by_its_states_age(tmp_path):
    write_state(tmp_path, state(agent=agent_entry(os.getpid(), **process_identity())))  # this very process
    assert status(tmp_path).exit_code == 0
    write_state(tmp_path, state(agent=agent_entry(999_999_999, pid_ns=1, start_ticks=1)))  # not our namespace
    assert status(tmp_path).exit_code == 0
    write_state(tmp_path, state(agent=agent_entry(999_999_999)))  # an older agent wrote no identity
    assert status(tmp_path).exit_code == 0


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_no_state_at_all_says_so_plainly(tmp_path, where):
    data_dir = tmp_path / "data"
    if where == "empty":
        data_dir.mkdir()
    result = status(data_dir)
    assert result.exit_code == EXIT_NOT_RUNNING
    assert result.output.strip() == (f"no agent is running: there is no {data_dir}/state.json "
                                     f"(start one with `tapio-agent --data-dir {data_dir}`)")
    assert json.loads(status(data_dir, "--json").output) == {
        "running": False, "summary": result.output.strip(), "age_s": None, "data_dir": str(data_dir), "state": None}


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe\x00binary", "is not text"),
    (b'{"agent": {"pid": 1', "is not valid JSON"),
    (b"[1, 2, 3]", "is not a Tapio agent state"),
    (b'{"updated_at": "yesterday"}', "is not a Tapio agent state"),
    (b'{"updated_at": NaN}', "is not a Tapio agent state"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    (b" " * (17 * 1024 * 1024), "over 16 MiB"),
])
def test_an_unusable_state_file_is_one_error_line(tmp_path, content, message):
    (tmp_path / "state.json").write_bytes(content)
    result = status(tmp_path)
    assert result.exit_code == 1
    assert message in result.output
    assert result.output.startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_a_symlinked_state_file_is_not_followed(tmp_path):
    outside = tmp_path / "outside.json"
    write_state(tmp_path / "elsewhere", state())
    os.rename(tmp_path / "elsewhere" / "state.json", outside)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "state.json").symlink_to(outside)
    result = status(data_dir)
    assert result.exit_code == 1
    assert "symbolic link" in result.output


def test_a_directory_or_fifo_where_the_state_should_be(tmp_path):
    (tmp_path / "state.json").mkdir()
    assert status(tmp_path).exit_code == 1
    fifo_dir = tmp_path / "fifo"
    fifo_dir.mkdir()
    os.mkfifo(fifo_dir / "state.json")  # opening must not block, reading must not hang
    result = status(fifo_dir)
    assert result.exit_code == 1
    assert "not a regular file" in result.output


def test_entries_of_unexpected_shape_are_shown_or_left_out_never_a_traceback(tmp_path):
    odd = state(observers={
        "network": {"status": "running", "records": "many", "records_per_s": None, "counters": ["x"],
                    "reason": "evil \x1b]0;pwned\x07 title [bold]markup[/]"},
        "ghost": "not an object",
    }, sinks=["not", "a", "mapping"], agent="nope")
    write_state(tmp_path, odd)
    result = status(tmp_path)
    assert result.exit_code == 0, result.output
    assert "ghost" not in result.output
    assert "\x1b" not in result.output and "\x07" not in result.output
    assert "evil \\x1b]0;pwned\\x07 title [bold]markup[/]" in result.output
    assert re.search(r"network\s+running\s+many", result.output)


def test_what_a_newer_agent_adds_to_its_state_is_shown_as_it_is(tmp_path):
    write_state(tmp_path, state(enrichment={"kubernetes": {"status": "synced", "pods": 42}}))
    result = status(tmp_path)
    assert result.exit_code == 0
    assert 'enrichment: {"kubernetes": {"status": "synced", "pods": 42}}' in result.output


def colours(text: str) -> set[int]:
    """SGR colour parameters (foreground/background) in text."""
    found = set()
    for params in SGR.findall(text):
        found |= {int(p) for p in params.split(";") if p and (30 <= int(p) <= 49 or 90 <= int(p) <= 107)}
    return found


def test_colour_only_on_a_terminal_and_never_with_no_color(tmp_path):
    write_state(tmp_path, state())
    assert "\x1b[" not in status(tmp_path).output  # piped: plain text
    forced = status(tmp_path, env={"FORCE_COLOR": "1", "NO_COLOR": None})
    assert colours(forced.output)
    assert not colours(status(tmp_path, env={"FORCE_COLOR": "1", "NO_COLOR": "1"}).output)


def test_format_duration():
    assert [format_duration(s) for s in (0, 59, 60, 61, 3600, 3725, 86400, 90000, -5)] == [
        "0s", "59s", "1m", "1m 1s", "1h", "1h 2m", "1d", "1d 1h", "0s"]


def test_agent_status_judges_freshness_at_a_given_time(tmp_path):
    write_state(tmp_path, state(updated_at=1000.0))
    assert agent_status(tmp_path, now=1000.0 + STALE_AFTER_S).running
    assert not agent_status(tmp_path, now=1000.0 + STALE_AFTER_S + 0.5).running


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a root-private data dir and drop privileges")
def test_as_another_user_the_private_files_say_run_as_root(tmp_path):
    """The agent's files are 0600 in 0700 directories: a non-root operator gets one clear line."""
    from tapio_core.store import OccurrenceWriter

    data_dir = tmp_path / "data"
    write_state(data_dir, state())
    os.chmod(data_dir, 0o700)
    OccurrenceWriter(data_dir).write([])
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
              "--bounding-set=-all"]
    tapio = str(Path(sys.executable).with_name("tapio"))
    env = {"PATH": "/usr/bin:/bin", "HOME": "/"}
    done = subprocess.run([*nobody, tapio, "status", "--data-dir", str(data_dir)], capture_output=True, text=True,
                          timeout=60, cwd="/", env=env)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"Error: cannot read {data_dir}/state.json: permission denied "
                                   "(the agent's files are private: run as root)")
    done = subprocess.run([*nobody, tapio, "recent", "--data-dir", str(data_dir)], capture_output=True, text=True,
                          timeout=60, cwd="/", env=env)
    assert done.returncode == 0
    assert f"skipping {data_dir}/occurrences: permission denied (the agent's files are private: run as root)" \
        in done.stderr
    assert "it has no occurrences/" not in done.stderr  # it has; it cannot be read
    assert "Traceback" not in done.stderr
