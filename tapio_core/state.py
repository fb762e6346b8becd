"""The agent's state file, ``<data-dir>/state.json``: what `tapio status` and `tapio health` read.

The agent rewrites it every few seconds, atomically (temporary file + rename),
so the CLI never needs the agent's process and never sees half a file. A state
older than a few intervals means no agent is running.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import tempfile
import time
from pathlib import Path
from typing import Any

import attrs

STATE_FILE = "state.json"
STATE_INTERVAL_S = 2.0
#: A state this old means the agent stopped (or hangs).
STALE_AFTER_S = 4 * STATE_INTERVAL_S
#: A real state is a few kilobytes; anything far bigger is not the agent's.
MAX_STATE_BYTES = 16 * 1024 * 1024


class StateError(Exception):
    """The state file exists but cannot be used; the message says why."""


def state_path(data_dir: Path) -> Path:
    return Path(data_dir) / STATE_FILE


def write_state(data_dir: Path, state: dict[str, Any]) -> None:
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".state-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as handle:
            # Compact: written every few seconds for the agent's life, and json's C encoder serves no indent.
            handle.write(json.dumps(state, separators=(",", ":"), default=str))
        os.replace(tmp, state_path(directory))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(data_dir: Path) -> dict[str, Any] | None:
    """The last state the agent wrote, or None when there is none.

    The file is opened without following a symbolic link and read up to a bound,
    so a planted or runaway file gives a StateError, never a hang or a traceback.
    """
    path = state_path(data_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {describe_os_error(exc)}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise StateError(f"{path} is not a regular file")
        try:
            raw = handle.read(MAX_STATE_BYTES + 1)
        except OSError as exc:
            raise StateError(f"cannot read {path}: {describe_os_error(exc)}") from None
    if len(raw) > MAX_STATE_BYTES:
        raise StateError(f"{path} is over {MAX_STATE_BYTES // 2**20} MiB: not a Tapio agent state")
    try:
        state = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise StateError(f"{path} is not text: not a Tapio agent state") from None
    except RecursionError:
        raise StateError(f"{path} is nested too deeply: not a Tapio agent state") from None
    except ValueError as exc:
        raise StateError(f"{path} is not valid JSON ({exc}); the agent rewrites it every few seconds") from None
    updated = state.get("updated_at") if isinstance(state, dict) else None
    if not isinstance(updated, int | float) or isinstance(updated, bool) or not math.isfinite(updated):
        raise StateError(f"{path} is not a Tapio agent state")
    return state


def describe_os_error(exc: OSError) -> str:
    """Why an agent file could not be opened, with what to do when that is the usual reason."""
    if isinstance(exc, PermissionError):
        return "permission denied (the agent's files are private: run as root)"
    if exc.errno == errno.ELOOP:
        return "a symbolic link, which is not followed"
    return exc.strerror or str(exc)


def is_stale(state: dict[str, Any], now: float | None = None) -> bool:
    return (now if now is not None else time.time()) - state["updated_at"] > STALE_AFTER_S


@attrs.frozen
class AgentStatus:
    """Whether an agent is running, judged from its state file alone, and one line saying so."""

    state: dict[str, Any] | None
    running: bool
    summary: str
    #: Seconds since the agent last wrote its state (None without a state).
    age_s: float | None = None

    @property
    def observers(self) -> dict[str, dict[str, Any]]:
        return _entries(self.state, "observers")

    @property
    def sinks(self) -> dict[str, dict[str, Any]]:
        return _entries(self.state, "sinks")

    @property
    def agent(self) -> dict[str, Any]:
        agent = (self.state or {}).get("agent")
        return agent if isinstance(agent, dict) else {}


def _stat_after_name(pid: int | str) -> list[str]:
    """``/proc/PID/stat`` from its third field on (state, ppid, ...): the name before may hold spaces.
    Index 19 is the start time in clock ticks (field 22)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def process_identity() -> dict[str, int]:
    """What tells this process apart from any other that later gets its pid: its pid namespace and the
    clock tick it started at."""
    try:
        return {"pid_ns": os.stat("/proc/self/ns/pid").st_ino, "start_ticks": int(_stat_after_name("self")[19])}
    except (OSError, ValueError, IndexError):
        return {}


def process_gone(agent: dict[str, Any]) -> bool:
    """Whether the agent a state names is certainly not running: seen from its own pid namespace, its pid is
    free or another process's. From elsewhere (another namespace) nothing is certain: False."""
    pid, pid_ns, start_ticks = agent.get("pid"), agent.get("pid_ns"), agent.get("start_ticks")
    if not isinstance(pid, int) or not isinstance(pid_ns, int) or not isinstance(start_ticks, int):
        return False
    try:
        if os.stat("/proc/self/ns/pid").st_ino != pid_ns:
            return False
        fields = _stat_after_name(pid)
    except FileNotFoundError:
        return True  # no such process in the agent's own namespace
    except OSError:
        return False
    return len(fields) < 20 or fields[19] != str(start_ticks) or fields[0] == "Z"


def agent_status(data_dir: Path, now: float | None = None) -> AgentStatus:
    """Read the state and decide whether an agent is running; raises StateError for an unusable file."""
    state = read_state(data_dir)
    if state is None:
        return AgentStatus(None, False, f"no agent is running: there is no {state_path(data_dir)} "
                                        f"(start one with `tapio-agent --data-dir {data_dir}`)")
    now = time.time() if now is None else now
    age = now - state["updated_at"]
    status = AgentStatus(state, False, "", age)
    pid = status.agent.get("pid", "?")
    if status.agent.get("running") is False:
        summary = f"no agent is running: the agent (pid {pid}) stopped {format_duration(age)} ago"
    elif process_gone(status.agent):
        summary = (f"no agent is running: the agent (pid {pid}) is gone without stopping (killed or crashed) "
                   f"{format_duration(age)} after its last state")
    elif age > STALE_AFTER_S:
        summary = (f"no agent is running: the agent (pid {pid}) last wrote its state {format_duration(age)} ago "
                   f"(it rewrites it every {STATE_INTERVAL_S:g} s): it stopped or hangs")
    else:
        started = status.agent.get("started_at")
        up = f", up {format_duration(now - started)}" if isinstance(started, int | float) else ""
        return attrs.evolve(status, running=True, summary=f"agent running (pid {pid}{up})")
    return attrs.evolve(status, summary=summary)


def _entries(state: dict[str, Any] | None, key: str) -> dict[str, dict[str, Any]]:
    """Named entries of the state that are objects; anything else (another version's shape) is left out."""
    entries = (state or {}).get(key)
    if not isinstance(entries, dict):
        return {}
    return {str(name): entry for name, entry in entries.items() if isinstance(entry, dict)}


def format_duration(seconds: float) -> str:
    """``3s``, ``4m 12s``, ``2h 5m``, ``3d 4h``: how long ago, for people."""
    seconds = max(0, int(seconds))
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60), ("m", 60, "s", 1)):
        if seconds >= size:
            rest = seconds % size // smaller_size
            return f"{seconds // size}{unit}" + (f" {rest}{smaller}" if rest else "")
    return f"{seconds}s"
