"""A third-party sink, installed for real into a fresh virtual environment, receives occurrences from `tapio replay`.

Nothing is installed editable and nothing of Tapio is patched: the example
distribution under examples/ goes in next to tapio-core and the network
observer, and Tapio finds it through its ``tapio`` entry point alone.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from network_records import pack_network_record

from tapio_core.recording import RecordWriter
from tapio_observer_network.records import KIND_CONNECT_REFUSED, KIND_CONNECT_TIMEOUT

REPO = Path(__file__).resolve().parent.parent
#: What each distribution needs to build, copied out so the build leaves nothing in the work tree.
SOURCES = {
    "tapio-core": ["pyproject.toml", "README.md", "tapio_core", "ebpf"],
    "tapio-observer-network": ["plugins/network"],
    "tapio-sink-example": ["examples/sink-example"],
}


def copy_source(name: str, target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for item in SOURCES[name]:
        source = REPO / item
        destination = target / name if len(SOURCES[name]) == 1 else target / name / item
        if source.is_dir():
            shutil.copytree(source, destination, ignore=ignore)
        else:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)
    return target / name


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("third-party")
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    sources = [copy_source(name, root / "src") for name in SOURCES]
    result = subprocess.run(
        [env_dir / "bin" / "python", "-m", "pip", "install", "--disable-pip-version-check", "-q",
         *[str(path) for path in sources]],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return env_dir


def test_the_example_sink_is_found_and_receives_the_occurrences(fresh_venv, tmp_path):
    recording = tmp_path / "network.rec"
    first = pack_network_record(KIND_CONNECT_REFUSED, ts=1_000)
    second = pack_network_record(KIND_CONNECT_TIMEOUT, ts=2_000)
    third = pack_network_record(KIND_CONNECT_REFUSED, ts=3_000)
    writer = RecordWriter(recording, 1_700_000_000_000_000_000)
    writer.write_batch("network", len(first), 1, first + second)  # records exactly as the kernel packs them
    writer.write_batch("network", len(third), 2, third)
    writer.close()
    received = tmp_path / "received.txt"
    bin_dir = fresh_venv / "bin"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "TAPIO_LOAD_PLUGINS")}

    run = {"capture_output": True, "text": True, "env": env, "timeout": 60, "cwd": tmp_path}  # not the checkout

    listing = subprocess.run([bin_dir / "tapio", "plugins"], **run)
    assert listing.returncode == 0, listing.stderr
    assert "tapio-sink-example" in listing.stdout

    result = subprocess.run(
        [bin_dir / "tapio", "replay", recording, "--sink", "example", "--set", f"example.path={received}"], **run,
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split(" ") for line in received.read_text().splitlines()]
    assert [(severity, kind) for _, severity, kind, _ in lines] == [
        ("warning", "kernel.network.connection_refused"),
        ("warning", "kernel.network.connection_timeout"),
        ("warning", "kernel.network.connection_refused"),
    ]
    assert all(timestamp.startswith("2023-11-14T22:13:20") for timestamp, *_ in lines)
    assert len({occurrence_id for *_, occurrence_id in lines}) == 3

    # Its settings are validated by Tapio like a built-in sink's.
    refused = subprocess.run(
        [bin_dir / "tapio", "replay", recording, "--sink", "example", "--set", "example.min_severity=loud"], **run,
    )
    assert refused.returncode != 0
    assert "config [example]: 'min_severity' must be in" in refused.stderr


def test_the_venv_is_really_separate(fresh_venv, tmp_path):
    """Guards the test above: the fresh venv must not see this checkout or its editable installs."""
    probe = subprocess.run(
        [fresh_venv / "bin" / "python", "-c", "import tapio_core, tapio_sink_example; "
                                              "print(tapio_core.__file__); print(tapio_sink_example.__file__)"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert probe.returncode == 0, probe.stderr
    assert all(str(fresh_venv) in line for line in probe.stdout.splitlines()), probe.stdout
    assert sys.prefix != str(fresh_venv)
