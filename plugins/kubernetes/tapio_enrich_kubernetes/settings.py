"""Settings, read from the environment (enrichment plugins get no config table yet)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import attrs


class SettingsError(Exception):
    """A bad environment variable; the message is one line naming it."""


def _positive(instance, attribute, value) -> None:
    if not value > 0:
        raise SettingsError(f"{attribute.metadata['env']} must be a positive number, got {value!r}")


@attrs.frozen
class KubernetesSettings:
    """What the plugin reads; each field's ``env`` metadata names its variable."""

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
    def from_env(cls, env: Mapping[str, str] | None = None) -> KubernetesSettings:
        """Enabled when ``NODE_NAME`` is set (the Downward API) unless ``TAPIO_K8S_ENABLED=0``;
        ``TAPIO_K8S_ENABLED=1`` enables it without, naming the node after the host."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        for field in attrs.fields(cls):
            text = env.get(field.metadata["env"], "").strip()
            if text:
                values[field.name] = _convert(field, text)
        node = values.get("node_name")
        enabled = values.pop("enabled", node is not None)
        if enabled and node is None:
            values["node_name"] = os.uname().nodename
        return cls(enabled=enabled, **values)


_BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


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
    if "Path" in str(field.type):
        return Path(text)
    return text
