"""The occurrence model: FALSE Protocol 1.0 fields, lossless JSON round-trip, clear errors."""

import json
from datetime import UTC, datetime

import pytest
from ulid import ULID

from tapio_core.occurrence import (
    Context,
    Entity,
    Error,
    KernelClock,
    Occurrence,
    format_timestamp,
    occurrence_id,
)


def make(**changes):
    fields = dict(
        id=occurrence_id(1_764_040_294_123_456_789, b"x"),
        timestamp=datetime(2026, 11, 25, 3, 11, 34, 123000, tzinfo=UTC),
        type="kernel.network.connection_refused",
        severity="warning",
        outcome="failure",
        data={"pid": 42, "comm": "curl", "dst_ip": "::1", "nested": {"a": [1, 2.5, None, True]}},
    )
    fields.update(changes)
    return Occurrence(**fields)


def test_json_has_protocol_fields_in_order():
    raw = json.loads(make().to_json())
    assert list(raw) == ["id", "timestamp", "source", "type", "protocol_version", "severity", "outcome", "data"]
    assert raw["source"] == "tapio"
    assert raw["protocol_version"] == "1.0"
    assert raw["timestamp"] == "2026-11-25T03:11:34.123Z"


@pytest.mark.parametrize("extra", [
    {},
    {"error": Error(code="ECONNREFUSED", message="refused")},
    {"context": Context(node="node-1", namespace="shop", entities=[Entity(kind="pod", id="uid-1", name="shop/web-0")])},
    {"context": Context(node="node-1")},
])
def test_round_trip_json_object_json_is_lossless(extra):
    text = make(**extra).to_json()
    again = Occurrence.from_json(text)
    assert again == make(**extra)
    assert again.to_json() == text


def test_absent_error_and_context_are_left_out_not_null():
    raw = make(context=Context(node="n")).to_dict()
    assert "error" not in raw
    assert raw["context"] == {"node": "n", "entities": []}


@pytest.mark.parametrize("text, message", [
    ("{", "not JSON"),
    ("[]", "not an occurrence"),
    ('{"id": "x"}', "required field missing"),
])
def test_bad_input_is_a_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        Occurrence.from_json(text)


def test_invalid_severity_and_data_are_rejected():
    raw = make().to_dict()
    with pytest.raises(ValueError, match="severity"):
        Occurrence.from_dict(dict(raw, severity="loud"))
    with pytest.raises(ValueError, match="data must be an object"):
        Occurrence.from_dict(dict(raw, data=[1]))
    with pytest.raises(ValueError, match="time zone"):
        Occurrence.from_dict(dict(raw, timestamp="2026-11-25T03:11:34.123"))


def test_timestamp_keeps_milliseconds_and_is_utc():
    assert format_timestamp(datetime(2026, 1, 2, 3, 4, 5, 999999, tzinfo=UTC)) == "2026-01-02T03:04:05.999Z"


def test_ids_are_ulids_carrying_the_event_time_and_stable_for_the_same_facts():
    wall_ns = 1_764_040_294_123_456_789
    first = occurrence_id(wall_ns, b"same facts")
    assert ULID.from_str(first).milliseconds == wall_ns // 1_000_000
    assert occurrence_id(wall_ns, b"same facts") == first
    assert occurrence_id(wall_ns, b"other facts") != first


@pytest.mark.parametrize("wall_ns", [0, 1_764_040_294_123_456_789, (2**48 - 1) * 1_000_000])
def test_ids_match_a_reference_ulid_implementation(wall_ns):
    import hashlib

    for fingerprint in (b"", b"a", bytes(range(256))):
        expected = ULID.from_bytes((wall_ns // 1_000_000).to_bytes(6, "big")
                                   + hashlib.blake2b(fingerprint, digest_size=10).digest())
        assert occurrence_id(wall_ns, fingerprint) == str(expected)


def test_kernel_clock_maps_monotonic_to_wall_time():
    import time

    clock = KernelClock()
    mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert abs(clock.wall_ns(mono) - time.time_ns()) < 50_000_000
    assert KernelClock(offset_ns=10).wall_ns(5) == 15


def test_the_kernel_clock_adopts_a_step_of_the_wall_clock_but_not_jitter(monkeypatch):
    clock = KernelClock(offset_ns=1_000_000_000_000)
    monkeypatch.setattr(KernelClock, "measure_offset", staticmethod(lambda: 1_000_000_000_000 - 20_000))
    assert (clock.follow(), clock.wall_ns(5)) == (0, 1_000_000_000_005)
    monkeypatch.setattr(KernelClock, "measure_offset", staticmethod(lambda: 1_000_000_000_000 - 2_000_000_000))
    assert (clock.follow(), clock.wall_ns(5)) == (-2_000_000_000, 998_000_000_005)
