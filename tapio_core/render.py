"""How `tapio` shows things to people: rich tables and one-line occurrences.

Colour only on a terminal and never with ``NO_COLOR`` (rich's own detection);
every string that comes from the kernel or a file goes through :func:`clean`,
so a process name cannot drive the terminal.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tapio_core.health import pods
from tapio_core.occurrence import format_timestamp
from tapio_core.occurrence_reader import StoredOccurrence
from tapio_core.state import AgentStatus, format_duration

if TYPE_CHECKING:
    from tapio_core.doctor import Check
    from tapio_core.health import HealthReport
    from tapio_core.plugins import LoadedPlugins

SEVERITY_STYLE = {"debug": "dim", "info": "cyan", "warning": "yellow", "error": "red", "critical": "bold red"}
HEALTH_STYLE = {"healthy": "green", "unsupported": "dim", "degraded": "yellow", "critical": "bold red"}
CHECK_STYLE = {"ok": "green", "fail": "bold red", "warn": "yellow", "optional": "cyan"}
STATUS_STYLE = {"running": "green", "failed": "bold red", "unsupported": "dim"}
KNOWN_STATE_KEYS = frozenset(("agent", "updated_at", "config", "observers", "sinks"))
DIMENSION_NAMES = {"destinations": "destination", "devices": "device", "processes": "process", "pods": "pod"}
#: Facts shown on an occurrence's human line after who and where, when present.
HEADLINE_FACTS = ("exit_code", "signal", "latency_ns", "bytes", "cpu", "ipc", "stall_pct", "memory_usage_bytes")
#: Control characters (C0, DEL, C1) a process could put in its comm to drive the terminal.
CONTROL = {code: f"\\x{code:02x}" for code in (*range(0x20), *range(0x7F, 0xA0))}


class PipeConsole(Console):
    """A console that leaves a closed pipe to the command (rich's own answer is SystemExit(1))."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError


def console(stderr: bool = False) -> Console:
    """A rich console: colour on terminals only, never with NO_COLOR; wide lines when piped.

    No markup, highlighting or emoji codes: text from files is shown as it is.
    """
    stream = sys.stderr if stderr else sys.stdout
    piped = not stream.isatty() and "COLUMNS" not in os.environ
    return PipeConsole(file=stream, markup=False, highlight=False, emoji=False, soft_wrap=True,
                   width=200 if piped else None)


def clean(value: Any) -> str:
    """Text from the kernel or a file, safe to print: control characters become visible escapes."""
    return str(value).translate(CONTROL)


def number(value: Any, rate: bool = False) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-" if value is None else clean(value)
    return f"{value:.1f}" if rate else f"{value:,}" if isinstance(value, int) else f"{value:g}"


def occurrence_line(occ: StoredOccurrence) -> Text:
    """One human line: time, severity, type, then the facts a person looks at first."""
    data = occ.data
    parts = []
    if "pid" in data:
        parts.append(f"{data.get('comm', '?')}[{data['pid']}]")
    if "dst_ip" in data:
        parts.append(f"{data.get('src_ip')}:{data.get('src_port')} -> {data.get('dst_ip')}:{data.get('dst_port')}")
    if "dev_major" in data or "device" in data:
        parts.append(f"dev {data.get('device') or str(data.get('dev_major')) + ':' + str(data.get('dev_minor'))}")
    parts += [f"{key}={data[key]}" for key in HEADLINE_FACTS if key in data]
    parts += [f"pod {pod}" for pod in pods(occ)]
    if occ.error.get("code"):
        parts.append(str(occ.error["code"]))
    line = Text(format_timestamp(occ.timestamp) + "  ")
    line.append(f"{occ.severity:<8}", style=SEVERITY_STYLE[occ.severity])
    line.append("  ")
    line.append(clean(occ.type), style="bold")
    for part in parts:
        line.append("  " + clean(part))
    return line


def table(*columns: str, title: str | None = None, numeric: tuple[str, ...] = (), header: bool = True) -> Table:
    """A borderless table; on a narrow terminal cells fold onto more lines: nothing is cut off."""
    result = Table(title=title, title_justify="left", title_style="bold", box=None, header_style="bold",
                   show_header=header)
    for column in columns:
        result.add_column(column, justify="right" if column in numeric else "left", overflow="fold")
    return result


def print_status(agent: AgentStatus, out: Console) -> None:
    out.print(Text(clean(agent.summary), style="bold green" if agent.running else "bold red"))
    if agent.state is None:
        return
    info = agent.agent
    out.print(f"tapio {clean(info.get('version', '?'))} on {clean(info.get('node', '?'))}; state written "
              f"{format_duration(agent.age_s)} ago{'' if agent.running else ' (figures below are from then)'}")
    observers = table("observer", "status", "records", "/s", "anomalies", "/s ", "lost", "malformed", "counters",
                      title="Observers", numeric=("records", "/s", "anomalies", "/s ", "lost", "malformed"))
    reasons = []
    for name, entry in agent.observers.items():
        status = clean(entry.get("status", "?"))
        rates = [number(entry.get(key), rate=True) if agent.running else "-"
                 for key in ("records_per_s", "anomalies_per_s")]
        observers.add_row(clean(name), Text(status, style=STATUS_STYLE.get(status, "")), number(entry.get("records")),
                          rates[0], number(entry.get("anomalies")), rates[1], number(entry.get("lost")),
                          number(entry.get("malformed")), counters(entry))
        reason = clean(entry.get("reason") or "")
        if reason:
            reasons.append(reason if reason.startswith(f"{clean(name)}: ") else f"{clean(name)}: {reason}")
    out.print(observers)
    # Under the table, one line each: a reason (what this kernel lacks, why an observer failed) can be
    # long, and folded into a column it would squeeze every other column too.
    for reason in reasons:
        out.print(Text(reason), soft_wrap=True)
    sinks = table("sink", "delivered", "failed", "counters", title="Sinks", numeric=("delivered", "failed"))
    for name, entry in agent.sinks.items():
        sinks.add_row(clean(name), number(entry.get("delivered")), number(entry.get("failed")), counters(entry))
    out.print(sinks)
    if agent.state.get("config"):
        out.print(Text("config: " + clean(json.dumps(agent.state["config"], default=str)), style="dim"))
    for key, value in agent.state.items():  # what a newer agent reports (enrichment, ...), shown as it is
        if key not in KNOWN_STATE_KEYS and value not in (None, {}, []):
            out.print(Text(f"{clean(key)}: " + clean(json.dumps(value, default=str)), style="dim"))


def counters(entry: dict[str, Any]) -> str:
    values = entry.get("counters")
    if not isinstance(values, dict):
        return ""
    return " ".join(f"{clean(key)}={number(value)}" for key, value in values.items())


def print_health(report: HealthReport, observer: str | None, out: Console) -> None:
    window = format_duration(report.window.total_seconds())
    headline = Text("Node health: ", style="bold")
    headline.append(report.health, style=HEALTH_STYLE[report.health])
    headline.append(f"  (occurrences of the last {window}; {clean(report.agent.summary)})", style="")
    out.print(headline)
    if observer is None:
        verdicts = table("observer", "health", "reason")
        for item in report.observers.values():
            verdicts.add_row(clean(item.name), Text(item.health, style=HEALTH_STYLE[item.health]), clean(item.reason))
        out.print(verdicts)
        return
    item = report.observers[observer]
    line = Text(f"\n{clean(item.name)}: ", style="bold")
    line.append(item.health, style=HEALTH_STYLE[item.health])
    line.append(f" -- {clean(item.reason)}")
    out.print(line)
    if item.entry:
        facts = [f"status {clean(item.status)}", f"{number(item.entry.get('records'))} records",
                 f"{number(item.entry.get('anomalies'))} anomalies", f"{number(item.entry.get('lost'))} lost"]
        if counters(item.entry):
            facts.append(counters(item.entry))
        out.print(Text("agent: " + ", ".join(facts), style="dim"))
    if not item.worst:
        out.print("nothing behind it in the window")
    for dimension, rows in item.worst.items():
        worst = table(DIMENSION_NAMES[dimension], "count", "worst", "last seen", "types", title=f"Worst {dimension}",
                      numeric=("count",))
        for key, tally in rows:
            types = ", ".join(f"{clean(t)} x{n}" for t, n in tally.by_type.most_common(3))
            worst.add_row(clean(key), number(tally.count), Text(tally.worst, style=SEVERITY_STYLE[tally.worst]),
                          format_timestamp(tally.last_seen), types)
        out.print(worst)


def print_doctor(checks: list[Check], ok: bool, out: Console) -> None:
    rows = table("status", "check", "detail", header=False)
    group = None
    for check in checks:
        if check.group != group:
            group = check.group
            rows.add_row("", Text(clean(group), style="bold underline"), "")
        rows.add_row(Text(check.status, style=CHECK_STYLE[check.status]), clean(check.name), clean(check.detail))
        if check.fix:
            rows.add_row("", "", Text("-> " + clean(check.fix), style="bold" if check.status == "fail" else ""))
    out.print(rows)
    failed = sum(check.status == "fail" for check in checks)
    if ok:
        out.print(Text("Everything Tapio needs works on this node.", style="bold green"))
    else:
        out.print(Text(f"{failed} problem(s): fix them and run `tapio doctor` again.", style="bold red"))


def print_plugins(loaded: LoadedPlugins, out: Console) -> None:
    plugins = table("plugin", "distribution", "version", "provides", "hooks")
    for info in loaded.info():
        provides = ([f"observer {name}" for name in info.observers] + [f"sink {name}" for name in info.sinks]
                    + [f"enricher {name}" for name in info.enrichers])
        plugins.add_row(info.name, info.distribution or "-", info.version or "", "\n".join(provides),
                        "\n".join(info.hooks))
    for name, error in loaded.failed.items():
        plugins.add_row(name, Text("failed to load", style="bold red"), "", clean(error), "")
    out.print(plugins)
