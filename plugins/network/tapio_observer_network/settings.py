"""The ``[network]`` settings table (documented in the plugin's README) and its kernel form."""

from __future__ import annotations

import re
from typing import Any

import attrs
from attrs import validators as v

from tapio_core.bpf import ObserverLoadError, write_struct
from tapio_core.config import list_of, rate_per_s, token_bucket_ns, whole_count

#: The kernel counts a window in 8 slots (WINDOW_SLOTS in network.bpf.c).
WINDOW_SLOTS = 8
NS_PER_S = 1_000_000_000


#: Counts are typed ``Any`` for cattrs (see tapio_core.config.whole_number).
WholeNumber = Any


#: Drop reasons that are the kernel's routine, not a fault: frees without a reason, packets for a closed
#: port (a refused connect is already its own occurrence), queues purged as their socket closes, and
#: TCP discarding what it already has or never asked for (duplicates, old ACKs, PAWS).
ROUTINE_DROPS = ("NOT_SPECIFIED", "NO_SOCKET", "SOCKET_CLOSE", "QUEUE_PURGE", "TCP_CLOSE", "TCP_OLD_DATA",
                 "TCP_OLD_SEQUENCE", "TCP_OLD_ACK", "TCP_TOO_OLD_ACK", "TCP_OFOMERGE", "TCP_OFO_DROP",
                 "TCP_RFC7323_PAWS", "TCP_RFC7323_PAWS_ACK", "TCP_RFC7323_TW_PAWS", "TCP_INVALID_SEQUENCE",
                 "TCP_INVALID_END_SEQUENCE", "TCP_RESET")
#: The kernel's drop-reason filter covers reasons 0 .. 255 (a bitmap of 4 words).
DROP_REASON_WORDS = 4


def drop_reason_name(value: Any) -> str:
    """A drop reason as the kernel's tracepoint prints it: NETFILTER_DROP (SKB_DROP_REASON_ prefix optional)."""
    name = str(value).strip().upper().removeprefix("SKB_DROP_REASON_")
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", name):
        raise ValueError("drop reason names such as NETFILTER_DROP")
    return name


def _seconds(default: float, low: float = 0.0, high: float = 86_400.0) -> Any:
    return attrs.field(default=default, converter=float, validator=[v.ge(low), v.le(high)])


@attrs.frozen
class NetworkSettings:
    #: Retransmits toward one destination (ip:port) within the window that make a spike.
    retransmit_threshold: WholeNumber = whole_count(10)
    retransmit_window_s: float = _seconds(1.0, low=0.01, high=3600.0)
    #: After a spike's occurrence, another for the same destination only once this has passed.
    retransmit_cooldown_s: float = _seconds(30.0)
    #: Smoothed RTT at least this many times the destination's baseline is degraded...
    rtt_factor: float = attrs.field(default=4.0, converter=float, validator=[v.gt(1.0), v.le(1000.0)])
    #: ... and at least this high, so a fast path getting a little slower is not.
    rtt_floor_ms: float = _seconds(20.0, high=3_600_000.0)
    #: RTT samples a destination's baseline needs before it is trusted.
    rtt_min_samples: WholeNumber = whole_count(8)
    #: The baseline learns at most one sample per destination per interval.
    rtt_learn_interval_s: float = _seconds(1.0, high=3600.0)
    #: A destination still degraded is reported again after this long; a new degradation within it
    #: is counted as suppressed.
    rtt_cooldown_s: float = _seconds(60.0)
    #: RSTs received from one destination (ip:port) within the window that make a storm...
    rst_storm_threshold: WholeNumber = whole_count(20)
    #: ... and from anywhere on the node.
    rst_storm_node_threshold: WholeNumber = whole_count(200)
    rst_storm_window_s: float = _seconds(1.0, low=0.01, high=3600.0)
    rst_storm_cooldown_s: float = _seconds(10.0)
    #: A connect the application ends itself while the peer has not answered (no kernel error) is a
    #: connection_timeout once it waited this long or its SYN was retransmitted; sooner, it is a
    #: cancelled attempt (a happy-eyeballs loser, a close() while connecting): counted, not reported.
    abandoned_connect_min_s: float = _seconds(1.0, high=3600.0)
    #: connection_refused / _timeout / _reset occurrences per destination and second, on average...
    connection_rate_per_s: float = rate_per_s(1.0)
    #: ... and at once, after a quiet spell: ten are read at a glance; what follows is in their counts.
    connection_burst: WholeNumber = whole_count(10)
    #: tuple[str, ...]: packet drops (Linux 5.17+) whose kernel reason is one of these are not reported.
    drop_ignore_reasons: Any = attrs.field(default=ROUTINE_DROPS,
                                           converter=list_of("drop_ignore_reasons", drop_reason_name))
    #: packet_drop occurrences per reason, namespace and destination and second, on average...
    drop_rate_per_s: float = rate_per_s(0.2)
    #: ... and at once: what follows is counted in the next one's suppressed.
    drop_burst: WholeNumber = whole_count(3)
    #: A listener still dropping connections is reported again, with the drops since, after this long.
    listen_overflow_cooldown_s: float = _seconds(60.0)


def rtt_factor_x16(factor: float) -> int:
    """The factor as the kernel compares it: sixteenths, so srtt * 16 >= factor_x16 * baseline."""
    return round(factor * 16)


def ignored_drops_bitmap(names: tuple[str, ...], reasons: dict[int, str]) -> list[int]:
    """The kernel's filter: bit N of word N // 64 set when reason N (by this kernel's numbering) is ignored."""
    words = [0] * DROP_REASON_WORDS
    ignored = set(names)
    for number, name in reasons.items():
        if name in ignored and number < 64 * DROP_REASON_WORDS:
            words[number // 64] |= 1 << (number % 64)
    return words


def kernel_settings(settings: NetworkSettings, storm_clock: bool = False,
                    drop_reasons: dict[int, str] | None = None) -> dict[str, Any]:
    """``struct network_settings`` field by field, in the kernel's units. ``storm_clock``: network_tick runs
    (the agent started its clock), so destination storms stay open until it ends them; ``drop_reasons``:
    this kernel's drop reasons by number (read from it at start), which ``drop_ignore_reasons`` names."""

    def ns(seconds: float) -> int:
        return round(seconds * NS_PER_S)

    cost_ns, burst_ns = token_bucket_ns(settings.connection_rate_per_s, settings.connection_burst)
    drop_cost_ns, drop_burst_ns = token_bucket_ns(settings.drop_rate_per_s, settings.drop_burst)
    return {
        "configured": 1,
        "connection_cost_ns": cost_ns,
        "connection_burst_ns": burst_ns,
        "retransmit_slot_ns": max(1, ns(settings.retransmit_window_s) // WINDOW_SLOTS),
        "retransmit_cooldown_ns": ns(settings.retransmit_cooldown_s),
        "rst_slot_ns": max(1, ns(settings.rst_storm_window_s) // WINDOW_SLOTS),
        "rst_cooldown_ns": ns(settings.rst_storm_cooldown_s),
        "rtt_learn_interval_ns": ns(settings.rtt_learn_interval_s),
        "rtt_cooldown_ns": ns(settings.rtt_cooldown_s),
        "abandoned_min_ns": ns(settings.abandoned_connect_min_s),
        "retransmit_threshold": settings.retransmit_threshold,
        "retransmit_window_ms": round(settings.retransmit_window_s * 1000),
        "rst_threshold": settings.rst_storm_threshold,
        "rst_node_threshold": settings.rst_storm_node_threshold,
        "rst_window_ms": round(settings.rst_storm_window_s * 1000),
        "rtt_factor_x16": rtt_factor_x16(settings.rtt_factor),
        "rtt_floor_us": round(settings.rtt_floor_ms * 1000),
        "rtt_min_samples": settings.rtt_min_samples,
        "storm_clock": int(storm_clock),
        "reserved": 0,
        "drop_cost_ns": drop_cost_ns,
        "drop_burst_ns": drop_burst_ns,
        "listen_cooldown_ns": ns(settings.listen_overflow_cooldown_s),
        "ignored_drops": ignored_drops_bitmap(settings.drop_ignore_reasons, drop_reasons or {}),
    }


def write_kernel_settings(bpf: Any, settings: NetworkSettings, storm_clock: bool = False,
                          drop_reasons: dict[int, str] | None = None) -> None:
    """Fill the ``network_settings`` map; the BPF side judges nothing until this is done."""
    try:
        table = bpf["network_settings"]
    except KeyError:  # e.g. an --ebpf-dir source from before settings lived in the kernel
        raise ObserverLoadError("network: the BPF program has no network_settings map") from None
    values = kernel_settings(settings, storm_clock, drop_reasons)
    fields = {name for name, *_ in table.Leaf()._fields_}
    if fields != set(values):
        raise ObserverLoadError(
            "network: struct network_settings in the BPF source does not match settings.py "
            f"(only in C: {sorted(fields - set(values))}, only in Python: {sorted(set(values) - fields)})"
        )
    write_struct(table, values)
