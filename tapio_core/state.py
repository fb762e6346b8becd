"""The agent's state file, ``<data-dir>/state.json``: what `tapio status` and `tapio health` read.

The agent rewrites it every few seconds, atomically (temporary file + rename),
so the CLI never needs the agent's process and never sees half a file. A state
older than a few intervals means no agent is running.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
STATE_INTERVAL_S = 2.0
#: A state this old means the agent stopped (or hangs).
STALE_AFTER_S = 4 * STATE_INTERVAL_S


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
            json.dump(state, handle, indent=1, default=str)
        os.replace(tmp, state_path(directory))
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_state(data_dir: Path) -> dict[str, Any] | None:
    """The last state the agent wrote, or None when there is none."""
    path = state_path(data_dir)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        state = json.loads(text)
    except json.JSONDecodeError as exc:
        raise StateError(f"{path} is not valid JSON ({exc}); the agent rewrites it every few seconds") from None
    if not isinstance(state, dict) or not isinstance(state.get("updated_at"), int | float):
        raise StateError(f"{path} is not a Tapio agent state")
    return state


def is_stale(state: dict[str, Any], now: float | None = None) -> bool:
    return (now if now is not None else time.time()) - state["updated_at"] > STALE_AFTER_S
