"""Write the README's support table from what the portability scenario measured on each kernel.

    python kernels/support.py OUT README.md

``OUT`` is where ``make test`` / ``make test-kernels`` left each kernel's results
(``OUT/<kernel>/tests/support.json``, written by tests/test_portability_kernel.py, and pytest's
``OUT/<kernel>/junit.xml``, whose counts and time make the table's first row; ``host`` is this
machine's kernel). The table between the README's ``support-table`` markers is replaced; nothing
else is touched. A kernel whose scenario did not finish shows what it did measure, and a type it
did not see is marked as not detected: the table says what was measured, not what was hoped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from matrix import junit_counts

START, END = "<!-- support-table:start -->", "<!-- support-table:end -->"
TYPES = {
    "network": ("connection_refused", "connection_timeout", "connection_unreachable", "connection_reset",
                "retransmit_spike", "rtt_degradation", "rst_storm", "packet_drop", "listen_overflow"),
    "container": ("oom_kill", "abnormal_exit"),
    "storage": ("io_error", "latency_spike"),
    "pmc": (),
}


def load(out: Path) -> list[tuple[str, dict]]:
    """(column title, measurements) per kernel, guests by version, then this machine's kernel."""
    found = []
    for path in sorted(out.glob("*/tests/support.json")):
        name = path.parent.parent.name
        measured = json.loads(path.read_text())
        measured["tests"] = junit_counts(path.parent.parent / "junit.xml")
        title = f"{measured['kernel']} (this host)" if name == "host" else f"{name} ({measured['kernel']})"
        found.append((name, title, measured))
    found.sort(key=lambda item: (item[0] == "host", [int(p) if p.isdigit() else 0 for p in item[0].split(".")]))
    return [(title, measured) for _, title, measured in found]


def tests_cell(counts: dict) -> str:
    if not counts:
        return "not counted"
    said = [f"{counts[key]} {key}" for key in ("passed", "failures", "errors", "skipped") if counts.get(key)]
    bad = counts.get("failures") or counts.get("errors") or counts.get("skipped")
    return ("**" + ", ".join(said) + "**" if bad else ", ".join(said)) + f" in {counts.get('time', 0):.0f} s"


def table(columns: list[tuple[str, dict]]) -> str:
    header = "| observer | feature | " + " | ".join(title for title, _ in columns) + " |"
    lines = [header, "|" + "---|" * (len(columns) + 2),
             "| tests | run on this kernel | " + " | ".join(tests_cell(measured.get("tests") or {})
                                                         for _, measured in columns) + " |"]
    notes = []
    for observer, types in TYPES.items():
        statuses = []
        for _, measured in columns:
            entry = measured.get("observers", {}).get(observer)
            status = entry["status"] if entry else "not measured"
            if status == "unsupported":
                status = "unsupported (no hardware PMU)" if "PMU" in (entry.get("reason") or "") else status
            statuses.append(status)
        lines.append(f"| {observer} | starts | " + " | ".join(statuses) + " |")
        for type_ in types:
            cells = [{1: "detected once", "off": "off (see below)"}.get(measured.get("detected", {}).get(type_),
                                                                         "**not detected**")
                     for _, measured in columns]
            lines.append(f"| | `{type_}` | " + " | ".join(cells) + " |")
        features = sorted({feature for _, measured in columns
                           for feature in ((measured.get("observers", {}).get(observer) or {}).get("disabled") or {})})
        for feature in features:
            cells = []
            for title, measured in columns:
                disabled = (measured.get("observers", {}).get(observer) or {}).get("disabled") or {}
                if feature in disabled:
                    cells.append("off")
                    notes.append(f"- {observer} on {title}: {feature} is off: {disabled[feature]}.")
                else:
                    cells.append("on")
            lines.append(f"| | {feature} | " + " | ".join(cells) + " |")
    lines.append("| doctor | says what the agent does | " + " | ".join(
        "yes" if measured.get("doctor_matches_agent") else "**no**" for _, measured in columns) + " |")
    return "\n".join(lines + (["", *notes] if notes else []))


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out, readme = Path(argv[0]), Path(argv[1])
    columns = load(out)
    if not columns:
        print(f"support: no kernel's results under {out}; the README is left as it is", file=sys.stderr)
        return 1
    text = readme.read_text()
    if START not in text or END not in text:
        print(f"support: {readme} has no {START} ... {END} markers", file=sys.stderr)
        return 1
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1]
    updated = f"{before}{START}\n{table(columns)}\n{END}{after}"
    if updated != text:
        readme.write_text(updated)
        print(f"support: {readme}'s support table rewritten from {', '.join(title for title, _ in columns)}")
    else:
        print(f"support: {readme}'s support table already says what {len(columns)} kernel(s) measured")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
