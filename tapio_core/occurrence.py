"""The occurrence: one anomaly as Tapio emits it (FALSE Protocol 1.0).

Tapio fills facts (``data``, ``error``, ``context``), never reasoning fields.
``to_json``/``from_json`` round-trip losslessly.
"""

from __future__ import annotations

import hashlib
import json
import time
from datetime import UTC, datetime
from typing import Any

import attrs
import cattrs
from cattrs.gen import make_dict_unstructure_fn, override

PROTOCOL_VERSION = "1.0"
SEVERITIES = ("debug", "info", "warning", "error", "critical")
OUTCOMES = ("success", "failure", "timeout", "in_progress", "unknown")


@attrs.define
class Error:
    code: str
    message: str


@attrs.define
class Entity:
    kind: str
    id: str
    name: str


@attrs.define
class Context:
    node: str | None = None
    namespace: str | None = None
    entities: list[Entity] = attrs.field(factory=list)


@attrs.define(kw_only=True)
class Occurrence:
    id: str
    timestamp: datetime
    source: str = "tapio"
    type: str
    protocol_version: str = PROTOCOL_VERSION
    severity: str = attrs.field(validator=attrs.validators.in_(SEVERITIES))
    outcome: str = attrs.field(validator=attrs.validators.in_(OUTCOMES))
    error: Error | None = None
    context: Context | None = None
    data: dict[str, Any] = attrs.field(factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return converter.unstructure(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_dict(cls, raw: Any) -> Occurrence:
        """Build from parsed JSON; raises ValueError naming what is wrong."""
        try:
            return converter.structure(raw, cls)
        except (cattrs.BaseValidationError, ValueError, TypeError, KeyError) as exc:
            messages = (
                cattrs.transform_error(exc, format_exception=_describe_error)
                if isinstance(exc, cattrs.BaseValidationError)
                else [str(exc)]
            )
            raise ValueError("not an occurrence: " + "; ".join(messages)) from None

    @classmethod
    def from_json(cls, text: str | bytes) -> Occurrence:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not JSON: {exc}") from None
        return cls.from_dict(raw)


def _describe_error(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, ValueError) and exc.args:
        return str(exc.args[0])  # attrs validators put the readable message first
    return cattrs.v.format_exception(exc, type_)


def format_timestamp(value: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, e.g. ``2026-11-25T03:11:34.123Z``."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def parse_timestamp(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no time zone")
    return parsed.astimezone(UTC)


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter()
    conv.register_unstructure_hook(datetime, format_timestamp)
    conv.register_structure_hook(datetime, lambda value, _: parse_timestamp(value))
    conv.register_structure_hook_func(lambda cls: cls == dict[str, Any], lambda value, _: _require_dict(value))
    omit_none = override(omit_if_default=True)
    # Context first: Occurrence's generated function captures Context's hook.
    conv.register_unstructure_hook(
        Context, make_dict_unstructure_fn(Context, conv, node=omit_none, namespace=omit_none)
    )
    # Absent error/context are left out, keeping the protocol's key order for the rest.
    unstructure_occurrence = make_dict_unstructure_fn(Occurrence, conv)

    def unstructure(occurrence: Occurrence) -> dict[str, Any]:
        raw = unstructure_occurrence(occurrence)
        for optional in ("error", "context"):
            if raw[optional] is None:
                del raw[optional]
        return raw

    conv.register_unstructure_hook(Occurrence, unstructure)
    return conv


def _require_dict(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"data must be an object, got {type(value).__name__}")
    return value


converter = _make_converter()


class KernelClock:
    """Turns the kernel's monotonic nanoseconds into wall-clock time.

    BPF stamps events with ``bpf_ktime_get_ns`` (CLOCK_MONOTONIC); the offset to
    CLOCK_REALTIME is measured at start, re-measured by the agent every second
    (:meth:`follow`: the wall clock steps when NTP steps it, someone sets it, or
    a VM resumes) and can be pinned (replay reuses the ones the agent recorded,
    so replayed occurrences carry the same timestamps).
    """

    #: A change of the offset beyond this is a step of the wall clock, not the measurement's jitter
    #: (microseconds; NTP's slewing moves both clocks alike and leaves the offset be).
    STEP_NS = 1_000_000

    def __init__(self, offset_ns: int | None = None) -> None:
        self.offset_ns = self.measure_offset() if offset_ns is None else offset_ns

    def follow(self) -> int:
        """Re-measure the offset and adopt it if the wall clock stepped; the step in ns, 0 if none."""
        step = self.measure_offset() - self.offset_ns
        if abs(step) < self.STEP_NS:
            return 0
        self.offset_ns += step
        return step

    @staticmethod
    def measure_offset() -> int:
        # Bracket the realtime read with two monotonic reads to halve the error.
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        wall = time.clock_gettime_ns(time.CLOCK_REALTIME)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        return wall - (before + after) // 2

    def wall_ns(self, monotonic_ns: int) -> int:
        return monotonic_ns + self.offset_ns


_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CROCKFORD_PAIRS = [a + b for a in _CROCKFORD for b in _CROCKFORD]


def occurrence_id(wall_ns: int, fingerprint: bytes) -> str:
    """A ULID whose time is the event's and whose random part derives from it.

    Deriving the 80 "random" bits from the anomaly's own facts makes the id
    stable: a replay of the same records yields the same ids, so downstream
    consumers can de-duplicate. Encoded here, two Crockford digits per step,
    because this runs once per anomaly and a general ULID object costs about
    twice as much (tests check the result against python-ulid).
    """
    value = (wall_ns // 1_000_000) << 80 | int.from_bytes(hashlib.blake2b(fingerprint, digest_size=10).digest())
    pairs = _CROCKFORD_PAIRS
    # 26 digits: the top one holds 3 bits, twelve pairs of 10 bits, then the last 5.
    return (
        _CROCKFORD[value >> 125]
        + "".join([pairs[(value >> shift) & 1023] for shift in range(115, 4, -10)])
        + _CROCKFORD[value & 31]
    )
