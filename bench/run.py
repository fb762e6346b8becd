"""``make bench``: run every ``bench/bench_*.py`` and print its figures.

Each module exposes ``run()``, which returns ``{name: value}`` (printed here) and/or
prints figures itself with ``common.report``. Stdout carries only ``name: value``
lines; progress and errors go to stderr. A failing module does not stop the others;
the exit status is 1 if any failed.

    .venv/bin/python bench/run.py            # all of them
    .venv/bin/python bench/run.py ingest     # only bench_ingest.py
"""

from __future__ import annotations

import importlib
import sys
import time
import traceback
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from common import BenchError, note, report  # noqa: E402


def discover(selected: list[str]) -> list[str]:
    names = sorted(path.stem for path in BENCH_DIR.glob("bench_*.py"))
    if not selected:
        return names
    wanted = {name if name.startswith("bench_") else f"bench_{name}" for name in selected}
    unknown = sorted(wanted - set(names))
    if unknown:
        raise SystemExit(f"bench: no such benchmark: {', '.join(unknown)} (have: {', '.join(names)})")
    return [name for name in names if name in wanted]


def main(argv: list[str]) -> int:
    from tapio_core.bpf import use_kernel_headers

    use_kernel_headers()  # the benchmarks' own BPF programs compile against the agent's headers
    failed = []
    for name in discover(argv):
        note(f"bench: {name} ...")
        start = time.monotonic()
        try:
            figures = importlib.import_module(name).run()
            for figure, value in (figures or {}).items():
                report(figure, value)
        except BenchError as exc:
            note(f"bench: {name}: error: {exc}")
            failed.append(name)
        except Exception:
            traceback.print_exc()
            failed.append(name)
        note(f"bench: {name} took {time.monotonic() - start:.1f} s")
    if failed:
        note(f"bench: failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
