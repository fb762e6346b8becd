"""``tapio``: read what the agent wrote, and replay recordings. Never needs the agent's process."""

from __future__ import annotations

import json
import logging
import re
import sys
from collections import deque
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click

from tapio_core.config import ConfigError, config_options, load_settings
from tapio_core.occurrence import KernelClock, format_timestamp
from tapio_core.plugins import PluginError, load_plugins, parse_plugin_list
from tapio_core.store import read_occurrences

DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value, param, ctx) -> timedelta:
        if isinstance(value, timedelta):
            return value
        match = DURATION.match(str(value))
        if not match:
            self.fail(f"{value!r} is not a duration like 30s, 5m, 2h or 1d", param, ctx)
        return timedelta(**{UNITS[match.group(2)]: int(match.group(1))})


data_dir_option = click.option(
    "--data-dir", type=click.Path(path_type=Path), envvar="TAPIO_DATA_DIR", default=".tapio", show_default=True,
    help="The agent's data directory (also TAPIO_DATA_DIR).",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Read the occurrences a Tapio agent wrote on this node."""
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="tapio: %(levelname)s: %(message)s")


@cli.command()
@data_dir_option
@click.option("--since", type=Duration(), default="5m", show_default=True, help="How far back: 30s, 5m, 2h, 1d.")
@click.option("-n", "limit", type=click.IntRange(min=1), default=20, show_default=True,
              help="At most this many, newest.")
@click.option("--type", "type_prefix", help="Only types starting with this, e.g. kernel.network.")
@click.option("--json", "as_json", is_flag=True, help="One occurrence JSON per line.")
def recent(data_dir: Path, since: timedelta, limit: int, type_prefix: str | None, as_json: bool) -> None:
    """Show the latest occurrences, oldest first."""
    cutoff = datetime.now(UTC) - since
    latest: deque = deque(maxlen=limit)
    for occurrence in read_occurrences(data_dir, since=cutoff):
        if type_prefix is None or occurrence.type.startswith(type_prefix):
            latest.append(occurrence)
    ordered = sorted(latest, key=lambda occ: (occ.timestamp, occ.id))
    if as_json:
        for occurrence in ordered:
            click.echo(occurrence.to_json())
        return
    if not ordered:
        click.echo(f"no occurrences since {format_timestamp(cutoff)} under {data_dir}", err=True)
        return
    for occurrence in ordered:
        click.echo(describe(occurrence))


def describe(occurrence) -> str:
    """One human line: time, severity, type, then the facts a person looks at first."""
    data = occurrence.data
    who = f"{data.get('comm', '?')}[{data.get('pid', '?')}]" if "pid" in data else ""
    where = ""
    if "dst_ip" in data:
        where = f"{data.get('src_ip')}:{data.get('src_port')} -> {data.get('dst_ip')}:{data.get('dst_port')}"
    parts = [format_timestamp(occurrence.timestamp), f"{occurrence.severity:<8}", occurrence.type, who, where]
    return "  ".join(part for part in parts if part)


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
    except RecordingError as exc:
        raise click.ClickException(str(exc)) from None
    finally:
        pipeline.close()


@cli.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plugins_command(as_json: bool) -> None:
    """List installed plugins: distribution, version, hooks, observers and sinks."""
    try:
        loaded = load_plugins()
    except PluginError as exc:
        raise click.ClickException(str(exc)) from None
    print_plugins(loaded, as_json)


def print_plugins(loaded, as_json: bool = False) -> None:
    """What `tapio plugins` and `tapio-agent --list-plugins` print."""
    infos = loaded.info()
    if as_json:
        click.echo(json.dumps([
            {"name": i.name, "distribution": i.distribution, "version": i.version, "hooks": i.hooks,
             "observers": i.observers, "sinks": i.sinks} for i in infos
        ] + [{"name": n, "error": e} for n, e in loaded.failed.items()], indent=2))
        return
    for info in infos:
        click.echo(f"{info.name}  {info.distribution or '-'} {info.version or ''}")
        if info.observers:
            click.echo(f"    observers: {', '.join(info.observers)}")
        if info.sinks:
            click.echo(f"    sinks: {', '.join(info.sinks)}")
        click.echo(f"    hooks: {', '.join(info.hooks)}")
    for name, error in loaded.failed.items():
        click.echo(f"{name}  FAILED TO LOAD: {error}")
