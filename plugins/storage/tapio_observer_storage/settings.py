"""The ``[storage]`` settings: latency thresholds, with per-device overrides by glob.

The kernel screens every completion against one warning threshold per device
(in BPF map ``devices``); a device userspace has not matched yet is screened
against the lowest warning any rule could give it (``screen_ns``), so nothing
that some rule would report is dropped before userspace has matched the
device's name. Userspace then judges each record with the exact thresholds.
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

import attrs
from attrs import validators as v

from tapio_core.config import rate_per_s, token_bucket_ns, whole_count

NS_PER_MS = 1_000_000


def _ns(ms: float) -> int:
    return round(ms * NS_PER_MS)


def _glob(instance: object, attribute: attrs.Attribute, value: str) -> None:
    if not value.strip():
        raise ValueError(f"'{attribute.name}' must be a device name or glob such as 'nvme*', not empty")


_positive_ms = v.and_(v.instance_of(float), v.gt(0.0))


@attrs.frozen
class DeviceRule:
    """Thresholds for the devices whose kernel name (``nvme0n1``, ``loop3``) matches ``match``."""

    match: str = attrs.field(validator=_glob)
    warning_ms: float | None = attrs.field(default=None, validator=v.optional(_positive_ms))
    critical_ms: float | None = attrs.field(default=None, validator=v.optional(_positive_ms))


@attrs.frozen
class Thresholds:
    """What one device is judged against; ``rule`` is the glob that chose them (None: the defaults)."""

    warning_ns: int
    critical_ns: int
    rule: str | None = None


@attrs.frozen
class StorageSettings:
    """Latency thresholds: ``warning_ms``/``critical_ms`` for every device, unless a rule in ``devices``
    (first match wins) sets its own; a rule leaving one out keeps the default for it."""

    warning_ms: float = attrs.field(default=100.0, validator=_positive_ms)
    critical_ms: float = attrs.field(default=1000.0, validator=_positive_ms)
    devices: tuple[DeviceRule, ...] = ()
    #: io_error and latency_spike records per device, each kind, and second, on average (the kernel
    #: holds back the rest and counts them: ``suppressed`` in the next occurrence and in tapio status)...
    record_rate_per_s: float = rate_per_s(10.0)
    #: ... and at once, after a quiet spell.
    record_burst: Any = whole_count(100)

    def __attrs_post_init__(self) -> None:
        if self.critical_ms < self.warning_ms:
            raise ValueError(f"critical_ms must be >= warning_ms, got {self.critical_ms} < {self.warning_ms}")
        for index, rule in enumerate(self.devices):
            warning = rule.warning_ms if rule.warning_ms is not None else self.warning_ms
            critical = rule.critical_ms if rule.critical_ms is not None else self.critical_ms
            if critical < warning:
                raise ValueError(f"devices[{index}] ({rule.match!r}): critical_ms must be >= warning_ms, "
                                 f"got {critical} < {warning}")

    def thresholds(self, device: str) -> Thresholds:
        for rule in self.devices:
            if fnmatchcase(device, rule.match):
                return Thresholds(
                    _ns(rule.warning_ms if rule.warning_ms is not None else self.warning_ms),
                    _ns(rule.critical_ms if rule.critical_ms is not None else self.critical_ms),
                    rule.match,
                )
        return Thresholds(_ns(self.warning_ms), _ns(self.critical_ms))

    def screen_ns(self) -> int:
        """The lowest warning threshold any device could have: the kernel's screen for unknown devices."""
        warnings = [self.warning_ms] + [r.warning_ms for r in self.devices if r.warning_ms is not None]
        return _ns(min(warnings))

    def record_cost_ns(self) -> int:
        """The kernel's token-bucket price of one record."""
        return token_bucket_ns(self.record_rate_per_s, self.record_burst)[0]

    def record_burst_ns(self) -> int:
        return token_bucket_ns(self.record_rate_per_s, self.record_burst)[1]
