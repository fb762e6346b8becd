"""Throwaway plugins the tests register next to real ones, or install where the agent finds them."""

import os
from pathlib import Path

from tapio_core import SinkSpec, hookimpl


class Collect:
    """A sink named ``collect`` that keeps every occurrence it is given, in order."""

    def __init__(self) -> None:
        self.received = []

    @hookimpl
    def tapio_register_sinks(self, register):
        register(SinkSpec(name="collect"))

    @hookimpl
    def tapio_sink_emit(self, sink, occurrences):
        self.received.extend(occurrences)


def install_on_path(site: Path, entry_point: str, module: str, source: str, files: dict[str, str]) -> str:
    """A real distribution in ``site``: the module, its files, and a ``.dist-info`` with a ``tapio``
    entry point, as pip would leave it. Returns the PYTHONPATH that makes a subprocess find it."""
    site.mkdir()
    (site / f"{module}.py").write_text(source)
    for name, text in files.items():
        (site / name).write_text(text)
    distribution = module.replace("_", "-")
    dist_info = site / f"{module}-0.0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.0.1\n")
    (dist_info / "entry_points.txt").write_text(f"[tapio]\n{entry_point} = {module}\n")
    return os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
