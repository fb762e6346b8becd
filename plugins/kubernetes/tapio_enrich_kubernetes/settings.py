"""Settings: the ``[kubernetes]`` table (``--set kubernetes.KEY=VALUE``), each key falling back to its
environment variable, then to its default."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs


class SettingsError(Exception):
    """A bad environment variable; the message is one line naming it."""


def _positive(instance, attribute, value) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise SettingsError(f"{attribute.metadata['env']} must be a positive number, got {value!r}")


@attrs.frozen
class KubernetesSettings:
    """What the plugin runs with; each field's ``env`` metadata names its variable."""

    enabled: bool = attrs.field(default=False, metadata={"env": "TAPIO_K8S_ENABLED"})
    node_name: str | None = attrs.field(default=None, metadata={"env": "NODE_NAME"})
    kubeconfig: Path | None = attrs.field(default=None, metadata={"env": "KUBECONFIG"})
    cgroup_root: Path | None = attrs.field(default=None, metadata={"env": "TAPIO_K8S_CGROUP_ROOT"})
    ended_pod_grace_s: float = attrs.field(
        default=300.0, validator=_positive, metadata={"env": "TAPIO_K8S_ENDED_POD_GRACE_S"})
    watch_timeout_s: int = attrs.field(default=300, validator=_positive, metadata={"env": "TAPIO_K8S_WATCH_TIMEOUT_S"})
    request_timeout_s: float = attrs.field(
        default=10.0, validator=_positive, metadata={"env": "TAPIO_K8S_REQUEST_TIMEOUT_S"})
    backoff_initial_s: float = attrs.field(
        default=0.5, validator=_positive, metadata={"env": "TAPIO_K8S_BACKOFF_INITIAL_S"})
    backoff_max_s: float = attrs.field(default=30.0, validator=_positive, metadata={"env": "TAPIO_K8S_BACKOFF_MAX_S"})
    rescan_interval_s: float = attrs.field(
        default=1.0, validator=_positive, metadata={"env": "TAPIO_K8S_RESCAN_INTERVAL_S"})

    @classmethod
    def from_config(cls, table: KubernetesTable | None = None,
                    env: Mapping[str, str] | None = None) -> KubernetesSettings:
        """The table's keys where given, else their environment variables, else the defaults.

        On when ``enabled`` says so; without it, when a node name is known (``NODE_NAME``
        from the Downward API, or ``node_name``). Enabled without a node name, the node is
        named after the host.
        """
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for field in attrs.fields(cls):
            given = getattr(table, field.name, None)
            if given is not None:
                values[field.name] = Path(given) if _is_path(field) else int(given) if field.type == "int" else given
                continue
            text = env.get(field.metadata["env"], "").strip()
            if text:
                values[field.name] = _convert(field, text)
        node = values.get("node_name")
        enabled = values.pop("enabled", node is not None)
        if enabled and node is None:
            values["node_name"] = os.uname().nodename
        return cls(enabled=enabled, **values)



# -- the [kubernetes] table ------------------------------------------------------------------------
# Values are typed Any so cattrs hands them over as written; the validators insist on the type,
# in a line naming the key and the value (cattrs would say "invalid value for type", or make 2.5 a 2).


def _check(kind: str) -> Any:
    def check(_instance: Any, attribute: attrs.Attribute, value: Any) -> None:
        if value is None:
            return  # not in the table: the environment variable, else the default
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if kind == "bool" and not isinstance(value, bool):
            problem = "true or false"
        elif kind in ("text", "path") and not (isinstance(value, str) and value.strip()):
            problem = "a path" if kind == "path" else "a non-empty string"
        elif kind == "seconds" and not (number and value > 0):
            problem = "a positive number of seconds"
        elif kind == "whole_seconds" and not (number and value > 0 and float(value).is_integer()):
            problem = "a positive whole number of seconds"
        else:
            return
        raise ValueError(f"'{attribute.name}' must be {problem}, got {value!r}")

    return check


_BOOL, _TEXT, _PATH, _SECONDS, _WHOLE_SECONDS = map(_check, ("bool", "text", "path", "seconds", "whole_seconds"))


@attrs.frozen(kw_only=True)
class KubernetesTable:
    """The ``[kubernetes]`` table; a key left out falls back to the variable named in README.md."""

    enabled: Any = attrs.field(default=None, validator=_BOOL)
    node_name: Any = attrs.field(default=None, validator=_TEXT)
    kubeconfig: Any = attrs.field(default=None, validator=_PATH)
    cgroup_root: Any = attrs.field(default=None, validator=_PATH)
    ended_pod_grace_s: Any = attrs.field(default=None, validator=_SECONDS)
    watch_timeout_s: Any = attrs.field(default=None, validator=_WHOLE_SECONDS)
    request_timeout_s: Any = attrs.field(default=None, validator=_SECONDS)
    backoff_initial_s: Any = attrs.field(default=None, validator=_SECONDS)
    backoff_max_s: Any = attrs.field(default=None, validator=_SECONDS)
    rescan_interval_s: Any = attrs.field(default=None, validator=_SECONDS)


# -- environment variables ---------------------------------------------------------------------------

_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _is_path(field: attrs.Attribute) -> bool:
    return "Path" in str(field.type)


def _convert(field: attrs.Attribute, text: str) -> object:
    name = field.metadata["env"]
    if field.type in ("bool", bool):
        if text.lower() not in _BOOLEANS:
            raise SettingsError(f"{name} must be 1 or 0 (true/false), got {text!r}")
        return _BOOLEANS[text.lower()]
    if field.type in ("int", "float", int, float):
        convert = int if field.type in ("int", int) else float
        try:
            return convert(text)
        except ValueError:
            kind = "a whole number" if convert is int else "a number"
            raise SettingsError(f"{name} must be {kind} of seconds, got {text!r}") from None
    if _is_path(field):
        return Path(text)
    return text
