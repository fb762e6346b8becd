"""``tapio``: what the agent on this node sees -- status, watch, recent, health, doctor, plugins -- and replay.

Every command but replay and doctor only reads the files the agent writes
(``state.json`` and ``occurrences/``); none needs the agent's process. Human
output is coloured with rich when it goes to a terminal (never when piped or
with ``NO_COLOR``); every command has ``--json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from tapio_core import render
from tapio_core.config import ConfigError, config_options, load_settings
from tapio_core.health import Thresholds, assess, type_prefix
from tapio_core.occurrence import SEVERITIES, KernelClock, format_timestamp
from tapio_core.occurrence_reader import OccurrenceFollower, newest, read_since, without_cycle_collection
from tapio_core.plugins import PluginError, load_plugins, parse_plugin_list
from tapio_core.render import console, occurrence_line, print_doctor, print_health, print_status
from tapio_core.state import StateError, agent_status, format_duration
from tapio_core.store import occurrences_dir

DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
#: Nothing older is stored (retention bounds the store far below); longer would overflow a datetime.
MAX_DURATION = timedelta(days=3650)
#: `tapio watch --network` etc.: the occurrence type prefix of each observer.
CATEGORIES = {name: type_prefix(name) for name in ("network", "container", "storage", "pmc")}
HEALTH_EXIT = {"healthy": 0, "degraded": 1, "critical": 2}
#: `tapio status` exits with this when no agent is running (as LSB init scripts' status does).
EXIT_NOT_RUNNING = 3


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = DURATION.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration like 30s, 5m, 2h or 1d", param, ctx)
        amount, unit = int(match.group(1)), UNITS[match.group(2)]
        if amount > MAX_DURATION / timedelta(**{unit: 1}):
            self.fail(f"{value!r} is longer than {MAX_DURATION.days} days", param, ctx)
        return timedelta(**{unit: amount})


data_dir_option = click.option(
    "--data-dir", type=click.Path(path_type=Path), envvar="TAPIO_DATA_DIR", default=".tapio", show_default=True,
    help="The agent's data directory (also TAPIO_DATA_DIR).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def severity_option(help_text: str):
    return click.option("--severity", type=click.Choice(SEVERITIES), help=help_text)


class TapioGroup(click.Group):
    """Every command stops quietly when the reader of its output goes away (`tapio watch --json | head -1`)."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # Point stdout at /dev/null, or Python complains at exit while flushing it.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return None


@click.group(cls=TapioGroup, context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """See what the Tapio agent on this node sees. Reads its data directory; never needs its process."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="tapio: %(levelname)s: %(message)s")


# -- shared ------------------------------------------------------------------------------------------


def type_filter(prefixes: list[str], severity: str | None):
    """A predicate on occurrences: any of the type prefixes (none: all), at least ``severity``."""
    prefixes_tuple = tuple(prefixes)
    minimum = SEVERITIES.index(severity) if severity else 0
    allowed = frozenset(SEVERITIES[minimum:])
    return lambda occ: occ.severity in allowed and (not prefixes_tuple or occ.type.startswith(prefixes_tuple))


def missing(path: Path) -> bool:
    """True only when the path surely does not exist (not when it cannot be looked at)."""
    try:
        path.lstat()
    except FileNotFoundError:
        return True
    except OSError:
        pass
    return False


def read_agent_status(data_dir: Path):
    try:
        return agent_status(data_dir)
    except StateError as exc:
        raise click.ClickException(str(exc)) from None


# -- status ------------------------------------------------------------------------------------------


@cli.command()
@data_dir_option
@json_option
def status(data_dir: Path, as_json: bool) -> None:
    """The agent, its observers and sinks: state, counts and rates.

    Exits 0 when an agent is running, 3 when none is (no state, or a state
    older than a few of its 2 s intervals).
    """
    agent = read_agent_status(data_dir)
    if as_json:
        click.echo(json.dumps({"running": agent.running, "summary": agent.summary, "age_s": agent.age_s,
                               "data_dir": str(data_dir), "state": agent.state}, indent=2, default=str))
    else:
        print_status(agent, console())
    sys.exit(0 if agent.running else EXIT_NOT_RUNNING)


# -- recent and watch --------------------------------------------------------------------------------


@cli.command()
@data_dir_option
@click.option("--since", type=Duration(), default="5m", show_default=True, help="How far back: 30s, 5m, 2h, 1d.")
@click.option("-n", "limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="At most this many, newest.")
@click.option("--type", "type_prefixes", multiple=True, metavar="PREFIX",
              help="Only types starting with this, e.g. kernel.network. (repeatable).")
@severity_option("Only this severity or worse.")
@click.option("--json", "as_json", is_flag=True, help="One occurrence JSON per line.")
def recent(data_dir: Path, since: timedelta, limit: int, type_prefixes: tuple[str, ...], severity: str | None,
           as_json: bool) -> None:
    """Show the latest occurrences, oldest first."""
    cutoff = datetime.now(UTC) - since
    with without_cycle_collection():
        found = newest(data_dir, limit, cutoff, type_filter(list(type_prefixes), severity), parsed=not as_json)
    if not found:
        hint = " (it has no occurrences/: see tapio-agent --sink file)" if missing(occurrences_dir(data_dir)) else ""
        click.echo(f"no occurrences since {format_timestamp(cutoff)} under {data_dir}{hint}", err=True)
        return
    if as_json:
        sys.stdout.writelines(occurrence.to_json() + "\n" for occurrence in found)
        sys.stdout.flush()
        return
    out = console()
    for occurrence in found:
        out.print(occurrence_line(occurrence), soft_wrap=True)


@cli.command()
@data_dir_option
@click.option("--network", is_flag=True, help="Network occurrences (kernel.network.*).")
@click.option("--container", is_flag=True, help="Container occurrences (kernel.container.*).")
@click.option("--storage", is_flag=True, help="Storage occurrences (kernel.storage.*).")
@click.option("--pmc", is_flag=True, help="CPU counter occurrences (kernel.node.*).")
@click.option("--type", "type_prefixes", multiple=True, metavar="PREFIX",
              help="Types starting with this (repeatable); adds to the flags above.")
@severity_option("Only this severity or worse.")
@click.option("--count", type=click.IntRange(min=1), help="Exit after this many occurrences.")
@click.option("--for", "duration", type=Duration(), help="Exit after this long: 30s, 5m, ...")
@click.option("--json", "as_json", is_flag=True, help="One occurrence JSON per line, flushed as it comes.")
def watch(data_dir: Path, network: bool, container: bool, storage: bool, pmc: bool, type_prefixes: tuple[str, ...],
          severity: str | None, count: int | None, duration: timedelta | None, as_json: bool) -> None:
    """Follow new occurrences as the agent writes them (inotify: no polling). Ctrl-C stops."""
    chosen = [CATEGORIES[name] for name, on in
              (("network", network), ("container", container), ("storage", storage), ("pmc", pmc)) if on]
    accept = type_filter(chosen + list(type_prefixes), severity)
    deadline = time.monotonic() + duration.total_seconds() if duration else None
    try:
        follower = OccurrenceFollower(data_dir)
    except OSError as exc:
        raise click.ClickException(
            f"cannot watch {data_dir}: {exc.strerror or exc} (start `tapio-agent --sink file --data-dir {data_dir}` "
            "first, or give --data-dir)") from None
    out = None if as_json else console()
    shown = 0
    try:
        with follower:
            # Said inside the try: a Ctrl-C right after the reader saw it still ends the watch quietly.
            click.echo(f"tapio: watching {follower.directory} for new occurrences (Ctrl-C stops)", err=True)
            for occurrence in follower.follow(deadline):
                if not accept(occurrence):
                    continue
                if out is None:
                    sys.stdout.write(occurrence.to_json() + "\n")
                    sys.stdout.flush()
                else:
                    out.print(occurrence_line(occurrence), soft_wrap=True)
                shown += 1
                if count is not None and shown >= count:
                    return
    except KeyboardInterrupt:
        return
    except FileNotFoundError as exc:
        raise click.ClickException(f"{exc.filename}: {exc.strerror}") from None


# -- health ------------------------------------------------------------------------------------------


@cli.command()
@click.argument("observer", required=False)
@data_dir_option
@click.option("--since", type=Duration(), default="15m", show_default=True,
              help="The window of occurrences judged: 30s, 5m, 2h, 1d.")
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True,
              help="Rows per breakdown when drilled into one observer.")
@click.option("--degraded-at", type=click.IntRange(min=1), default=1, show_default=True,
              help="Warning-or-worse occurrences in the window that make an observer degraded.")
@click.option("--critical-at", type=click.IntRange(min=1), default=100, show_default=True,
              help="Warning-or-worse occurrences in the window that make an observer critical.")
@json_option
def health(observer: str | None, data_dir: Path, since: timedelta, top: int, degraded_at: int, critical_at: int,
           as_json: bool) -> None:
    """Each observer healthy, degraded or critical, with the reason; OBSERVER: what is behind it.

    Judged from the occurrences in the window and the agent's state (a failed
    observer is critical; an unsupported one is shown as such, not as unhealthy).
    Exits 0 healthy, 1 degraded, 2 critical (a node no agent watches is at least degraded).
    """
    agent = read_agent_status(data_dir)
    with without_cycle_collection():
        occurrences = read_since(data_dir, datetime.now(UTC) - since)
        report = assess(agent, occurrences, since, Thresholds(degraded_at, critical_at), drill=observer, top=top)
    if observer is not None and observer not in report.observers:
        known = ", ".join(report.observers) or "none"
        raise click.UsageError(f"no observer {observer!r} in the agent's state or in the last "
                               f"{format_duration(since.total_seconds())} of occurrences (known: {known})")
    verdict = report.observers[observer].health if observer else report.health
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print_health(report, observer, console())
    sys.exit(HEALTH_EXIT.get(verdict, 0))


# -- doctor and plugins ------------------------------------------------------------------------------


@cli.command()
@click.option("--plugins", "plugin_list", envvar="TAPIO_LOAD_PLUGINS", metavar="NAMES",
              help="Check only these plugins' observers (as tapio-agent --plugins).")
@json_option
def doctor(plugin_list: str | None, as_json: bool) -> None:
    """Check this node for what Tapio needs; say what works, what does not and what to do.

    Exits 0 only when everything needed works (a missing hardware PMU, needed
    only by the pmc observer, does not count).
    """
    from tapio_core.doctor import needed_ok, run_checks

    try:
        plugins, plugin_error = load_plugins(parse_plugin_list(plugin_list)), None
    except PluginError as exc:
        plugins, plugin_error = None, str(exc)
    checks = run_checks(plugins, plugin_error)
    ok = needed_ok(checks)
    if as_json:
        click.echo(json.dumps({"ok": ok, "checks": [check.to_dict() for check in checks]}, indent=2))
    else:
        print_doctor(checks, ok, console())
    sys.exit(0 if ok else 1)


@cli.command("plugins")
@json_option
def plugins_command(as_json: bool) -> None:
    """List installed plugins: distribution, version, hooks, observers and sinks."""
    try:
        loaded = load_plugins()
    except PluginError as exc:
        raise click.ClickException(str(exc)) from None
    print_plugins(loaded, as_json)


def print_plugins(loaded, as_json: bool = False) -> None:
    """What `tapio plugins` and `tapio-agent --list-plugins` print."""
    if not as_json:
        render.print_plugins(loaded, console())
        return
    click.echo(json.dumps([
        {"name": i.name, "distribution": i.distribution, "version": i.version, "hooks": i.hooks,
         "observers": i.observers, "sinks": i.sinks, "enrichers": i.enrichers} for i in loaded.info()
    ] + [{"name": n, "error": e} for n, e in loaded.failed.items()], indent=2))


# -- replay ------------------------------------------------------------------------------------------


@cli.command()
@click.argument("recording", type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--sink", "sinks", multiple=True, metavar="NAME",
              help="Where occurrences go; repeatable. Default: stdout.")
@click.option("--plugins", "plugin_list", envvar="TAPIO_LOAD_PLUGINS", metavar="NAMES", help="Plugins to load.")
@data_dir_option
@config_options
def replay(recording: Path, sinks: tuple[str, ...], plugin_list: str | None, data_dir: Path,
           config_path: Path | None, assignments: tuple[str, ...]) -> None:
    """Run a file written by `tapio-agent --record` through parse, detect, enrich and emit.

    Needs no root and no BPF; the same records give the same occurrences.
    """
    from tapio_core.pipeline import Pipeline
    from tapio_core.recording import RecordedBatch, RecordingError, read_recording
    from tapio_core.sink import SinkError, SinkOptions

    try:
        plugins = load_plugins(parse_plugin_list(plugin_list))
        pipeline = Pipeline.build(plugins, sinks or ("stdout",), SinkOptions(data_dir=data_dir),
                                  load_settings(config_path, assignments), KernelClock(offset_ns=0))
    except (PluginError, SinkError, ConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        for item in read_recording(recording):
            if not isinstance(item, RecordedBatch):
                pipeline.clock.offset_ns = item
                continue
            observer = pipeline.observers.get(item.observer)
            if observer is None:
                raise click.ClickException(
                    f"the recording has records of observer {item.observer!r}, which no loaded plugin provides"
                )
            if item.record_size != observer.spec.record_dtype.itemsize:
                raise click.ClickException(
                    f"observer {item.observer!r} records are {item.record_size} bytes in the recording but "
                    f"{observer.spec.record_dtype.itemsize} in the installed plugin (a different version?)"
                )
            pipeline.ingest(item.observer, item.records)
        for name in pipeline.observers:
            pipeline.finish(name)
    except RecordingError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        pipeline.close()
