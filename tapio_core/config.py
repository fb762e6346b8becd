"""Settings: a TOML file (``--config``) overlaid with ``--set section.key=value`` flags.

Each observer and sink reads the table named after it (``[network]``,
``[file]``); the agent reads ``[agent]``. A plugin declares its settings as an
attrs class with defaults and validators (``ObserverSpec.config_type``,
``SinkSpec.config_type``); anything the class does not know, or a value it
rejects, stops start-up with one line naming the key.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import cattrs


def whole_number(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    """An attrs validator: cattrs would int() a 2.5 down to 2 without a word, so counts are typed ``Any``
    and insist here."""
    if type(value) is not int:
        raise ValueError(f"'{attribute.name}' must be a whole number: {value!r}")


def rate_per_s(default: float) -> Any:
    """A rate limit's average: records per key and second (0.001 .. 1,000,000)."""
    return attrs.field(default=default, converter=float,
                       validator=[attrs.validators.ge(0.001), attrs.validators.le(1_000_000.0)])


def token_bucket_ns(rate_per_s: float, burst: int) -> tuple[int, int]:
    """A rate limit as ``tapio_limit_allows`` (ebpf/tapio_prelude.bpf.c) takes it: the price of one record
    and the bucket's size, in nanoseconds of credit."""
    cost_ns = round(1e9 / rate_per_s)
    return cost_ns, cost_ns * burst


def list_of(key: str, item: Callable[[Any], Any], limit: int | None = None) -> Callable[[Any], tuple]:
    """A converter from a TOML array, rejecting a bare value (a string would pass as its letters)."""

    def convert(value: Any) -> tuple:
        if not isinstance(value, list | tuple):
            raise ValueError(f"'{key}' must be a list, e.g. {key} = [...]: {value!r}")
        if limit is not None and len(value) > limit:
            raise ValueError(f"'{key}' must hold at most {limit} entries: {len(value)}")
        converted = []
        for entry in value:
            try:
                converted.append(item(entry))
            except ValueError as exc:
                raise ValueError(f"'{key}' must hold {exc}: {entry!r}") from None
        return tuple(dict.fromkeys(converted))

    return convert


def whole_count(default: int) -> Any:
    """A whole count of 1 .. 1,000,000: a threshold, a rate limit's burst."""
    return attrs.field(default=default,
                       validator=[whole_number, attrs.validators.ge(1), attrs.validators.le(1_000_000)])


class ConfigError(Exception):
    """An invalid setting; the message is one line naming the key."""


def load_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None


def apply_overrides(config: dict[str, Any], assignments: list[str]) -> dict[str, Any]:
    """``["network.rst_threshold=50"]`` -> config with that key set; values are read as TOML values."""
    merged = {section: dict(values) if isinstance(values, dict) else values for section, values in config.items()}
    for assignment in assignments:
        key, sep, text = assignment.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise ConfigError(f"--set {assignment!r}: expected SECTION.KEY=VALUE, e.g. network.rst_threshold=50")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()  # a bare word is a string: --set file.mode=fast
        table = merged.setdefault(section, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {assignment!r}: {section} is not a table in the config file")
        table[name.strip()] = value
    return merged


_converter = cattrs.Converter(forbid_extra_keys=True)


def build_settings(config_type: type | None, section: str, raw: dict[str, Any]) -> Any:
    """The plugin's settings object for table ``section`` (its defaults when the table is absent)."""
    table = raw.get(section, {})
    if config_type is None:
        if table:
            raise ConfigError(f"config [{section}]: this plugin takes no settings (got {', '.join(table)})")
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"config {section}: expected a table [{section}]")
    try:
        return _converter.structure(table, config_type)
    except cattrs.BaseValidationError as exc:
        raise ConfigError(f"config [{section}]: {_first_problem(exc, config_type)}") from None


#: The key every observer's table takes besides its own settings: its ring buffer's size in pages.
RING_PAGES_KEY = "ring_pages"
DEFAULT_RING_PAGES = 64
#: 64 MiB of locked kernel memory per observer at most.
MAX_RING_PAGES = 16384


def split_ring_pages(section: str, raw: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """(the observer's ring size in pages, the settings without it): the core's key, not the plugin's."""
    table = raw.get(section)
    if not isinstance(table, dict) or RING_PAGES_KEY not in table:
        return DEFAULT_RING_PAGES, raw
    pages = table[RING_PAGES_KEY]
    if isinstance(pages, bool) or not isinstance(pages, int) or not 1 <= pages <= MAX_RING_PAGES \
            or pages & (pages - 1):
        raise ConfigError(f"config [{section}]: '{RING_PAGES_KEY}' must be a power of two from 1 to "
                          f"{MAX_RING_PAGES} (pages of the ring buffer): {pages!r}")
    return pages, {**raw, section: {k: v for k, v in table.items() if k != RING_PAGES_KEY}}


def _first_problem(exc: cattrs.BaseValidationError, config_type: type) -> str:
    for leaf in _leaf_errors(exc):
        if isinstance(leaf, cattrs.ForbiddenExtraKeysError):
            rejected_by = leaf.cl if attrs.has(leaf.cl) else config_type  # a nested table's own class
            known = ", ".join(sorted(field.name for field in attrs.fields(rejected_by)))
            return f"unknown key {', '.join(sorted(leaf.extra_fields))} (known: {known})"
    first = cattrs.transform_error(exc, format_exception=_describe)[0]
    message, found, path = first.rpartition(" @ $.")
    if found:
        return f"{path}: {message}"
    return first.removesuffix(" @ $")  # attrs validators already name the key


def _describe(exc: BaseException, type_: Any) -> str:
    # attrs validators put a readable sentence first; the rest gets cattrs' wording.
    if isinstance(exc, ValueError) and exc.args and isinstance(exc.args[0], str) and "must" in exc.args[0]:
        return exc.args[0]
    return cattrs.v.format_exception(exc, type_)


def _leaf_errors(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup) and not isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return [leaf for inner in exc.exceptions for leaf in _leaf_errors(inner)]
    return [exc]


def config_options(command: Any) -> Any:
    """``--config FILE`` and ``--set SECTION.KEY=VALUE``, shared by the agent and replay."""
    import click

    command = click.option(
        "--set", "assignments", multiple=True, metavar="SECTION.KEY=VALUE",
        help="Override one setting of the config file, e.g. --set network.rst_threshold=50; repeatable.",
    )(command)
    return click.option(
        "--config", "config_path", type=click.Path(path_type=Path, dir_okay=False), envvar="TAPIO_CONFIG",
        help="TOML settings file: a table per observer or sink, named after it (see docs/configuration.md).",
    )(command)


def load_settings(config_path: Path | None, assignments: list[str] | tuple[str, ...]) -> dict[str, Any]:
    return apply_overrides(load_config_file(config_path), list(assignments))
