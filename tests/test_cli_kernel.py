"""The `tapio` commands against what the real agent writes on the real kernel.

The agent runs as a subprocess with the file sink; a process of ours makes a
connect to a closed 127.0.0.1 port, which the kernel refuses. Other processes
on the node may fail connects while a test runs, so every check on
occurrences is made on the test's own port and connector.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
from kernel_helpers import TAPIO, closed_tcp_port, run_connects, running_agent, scaled, tool_env
from plugin_helpers import install_on_path
from test_cli_watch import Watch

pytestmark = pytest.mark.kernel

REFUSED = "kernel.network.connection_refused"
#: The agent rewrites its state every 2 s.
STATE_WAIT_S = scaled(10.0)


def tapio(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([str(TAPIO), *map(str, args)], capture_output=True, text=True, timeout=scaled(60),
                          env=tool_env())


def status_json(data_dir: Path) -> tuple[int, dict]:
    done = tapio("status", "--data-dir", data_dir, "--json")
    return done.returncode, json.loads(done.stdout)


def wait_for_status(data_dir: Path, predicate, what: str) -> dict:
    deadline = time.monotonic() + STATE_WAIT_S
    while True:
        code, report = status_json(data_dir)
        if code == 0 and predicate(report["state"]):
            return report
        if time.monotonic() > deadline:
            raise AssertionError(f"the agent's state never showed {what}: {json.dumps(report)[:2000]}")
        time.sleep(0.3)


def test_status_watch_recent_and_health_see_a_refused_connect(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    port = closed_tcp_port("127.0.0.1")
    ours = lambda occ: occ["type"] == REFUSED and occ["data"].get("dst_port") == port
    watch = Watch(data_dir, "--json", "--network")  # before the agent: it creates occurrences/ itself
    try:
        watch.wait_ready()
        with running_agent(data_dir, plugins="network,file", sinks=("file",)) as agent:
            code, report = status_json(data_dir)
            assert (code, report["running"]) == (0, True)
            assert report["state"]["observers"]["network"]["status"] == "running"
            assert report["state"]["agent"]["pid"] == agent.pid
            connector = run_connects("127.0.0.1", port)
            assert connector["attempts"][0]["errno"] == "ECONNREFUSED"
            deadline = time.monotonic() + STATE_WAIT_S
            while not ours(watched := json.loads(watch.next_line(max(0.1, deadline - time.monotonic())))):
                pass
            assert (watched["data"]["pid"], watched["data"]["comm"]) == (connector["pid"], connector["comm"])
            assert watched["error"]["code"] == "ECONNREFUSED"

            state = wait_for_status(data_dir, lambda s: s["observers"]["network"]["anomalies"] >= 1
                                    and s["sinks"]["file"]["delivered"] >= 1, "the anomaly delivered")["state"]
            assert state["observers"]["network"]["records"] >= 1
            human = tapio("status", "--data-dir", data_dir)
            assert human.returncode == 0
            assert human.stdout.startswith(f"agent running (pid {agent.pid}, up ")
            assert re.search(r"\n network +running +[0-9,]+ ", human.stdout)

            recent = tapio("recent", "--data-dir", data_dir, "--json", "-n", "100000")
            printed = [json.loads(line) for line in recent.stdout.splitlines()]
            assert [occ["id"] for occ in printed if ours(occ)] == [watched["id"]]
            human = tapio("recent", "--data-dir", data_dir, "--type", "kernel.network.", "-n", "100000").stdout
            sport = connector["attempts"][0]["src_port"]
            assert (f"  warning   {REFUSED}  {connector['comm']}[{connector['pid']}]  127.0.0.1:{sport} -> "
                    f"127.0.0.1:{port}  ECONNREFUSED") in human

            health = tapio("health", "--data-dir", data_dir, "--json", "--critical-at", "1000000")
            verdict = json.loads(health.stdout)
            network = next(o for o in verdict["observers"] if o["name"] == "network")
            assert (health.returncode, verdict["health"], network["health"]) == (1, "degraded", "degraded")
            assert network["status"] == "running"
            assert network["occurrences"]["by_type"][REFUSED] >= 1

            drill = json.loads(tapio("health", "network", "--data-dir", data_dir, "--json", "--top", "100000",
                                     "--critical-at", "1000000").stdout)
            worst = next(o for o in drill["observers"] if o["name"] == "network")["worst"]
            destination = [row for row in worst["destinations"] if row["key"] == f"127.0.0.1:{port}"]
            assert [(row["count"], row["worst_severity"]) for row in destination] == [(1, "warning")]
            process = f"{connector['comm']}[{connector['pid']}]"
            assert [row["count"] for row in worst["processes"] if row["key"] == process] == [1]
            human = tapio("health", "network", "--data-dir", data_dir, "--top", "100000").stdout
            assert "Worst destinations" in human and f"127.0.0.1:{port}" in human and process in human
            assert agent.stop() == 0
        code, report = status_json(data_dir)
        assert (code, report["running"]) == (3, False)
        assert report["summary"].startswith(f"no agent is running: the agent (pid {agent.pid}) stopped ")
        assert report["state"]["observers"]["network"]["status"] == "stopped"
    finally:
        watch.stop()
    assert not [line for line in watch.stderr if "Traceback" in line]


PROBE_PLUGIN = '''
"""Two throwaway observers: one this machine "lacks the hardware" for, one whose tracepoint does not exist."""
from pathlib import Path

from tapio_core import ObserverSpec, hookimpl, record_dtype
from tapio_core.bpf import ObserverUnsupported

RECORD = record_dtype([("timestamp_ns", "<u8")])
SOURCE = Path(__file__).with_name("cliprobe.bpf.c")


@hookimpl
def tapio_register_observers(register):
    register(ObserverSpec(name="nopmu", bpf_source=SOURCE, record_dtype=RECORD,
                          tracepoints=("syscalls:sys_enter_getppid",)))
    register(ObserverSpec(name="notp", bpf_source=SOURCE, record_dtype=RECORD,
                          tracepoints=("sock:no_such_tracepoint_for_tapio",)))


@hookimpl
def tapio_observer_started(observer):
    if observer.name == "nopmu":
        raise ObserverUnsupported("nopmu: unsupported: no hardware PMU on this machine (test probe)")


@hookimpl
def tapio_detect_anomalies(observer, events):
    return []
'''


def test_status_and_health_show_unsupported_and_failed_observers_as_the_agent_reports_them(tmp_path):
    pythonpath = install_on_path(tmp_path / "site", "cliprobe", "tapio_cli_probe", PROBE_PLUGIN, {
        "cliprobe.bpf.c": "TRACEPOINT_PROBE(syscalls, sys_enter_getppid) { return 0; }\n"})
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with running_agent(data_dir, plugins="network,cliprobe,file", sinks=("file",),
                       env={"PYTHONPATH": pythonpath}):
        code, report = status_json(data_dir)
        assert code == 0
        observers = report["state"]["observers"]
        assert {name: o["status"] for name, o in observers.items()} == {
            "network": "running", "nopmu": "unsupported", "notp": "failed"}
        human = tapio("status", "--data-dir", data_dir).stdout
        assert "nopmu: unsupported: no hardware PMU on this machine (test probe)" in human
        assert ("notp: cannot run on this kernel: the kernel has no tracepoint sock:no_such_tracepoint_for_tapio"
                in human)

        health = tapio("health", "--data-dir", data_dir, "--json", "--since", "1s")
        verdicts = {o["name"]: (o["health"], o["reason"]) for o in json.loads(health.stdout)["observers"]}
        assert health.returncode == 2
        assert verdicts["notp"] == ("critical", "the observer failed: notp: cannot run on this kernel: the kernel "
                                                "has no tracepoint sock:no_such_tracepoint_for_tapio")
        assert verdicts["nopmu"] == ("unsupported", "not supported on this node: nopmu: unsupported: no hardware "
                                                    "PMU on this machine (test probe)")
        only = tapio("health", "nopmu", "--data-dir", data_dir)
        assert only.returncode == 0  # unsupported is not unhealthy
        assert "nopmu: unsupported -- not supported on this node" in only.stdout
