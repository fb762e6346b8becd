"""Tapio network observer: TCP connects refused or timed out, from the real kernel."""

from __future__ import annotations

from pathlib import Path

from tapio_core import BtfField, ObserverSpec, hookimpl
from tapio_observer_network.detect import connect_failures
from tapio_observer_network.records import NETWORK_RECORD

OBSERVER = ObserverSpec(
    name="network",
    bpf_source=Path(__file__).with_name("network.bpf.c"),
    record_dtype=NETWORK_RECORD,
    tracepoints=("sock:inet_sock_set_state", "tcp:tcp_receive_reset", "tcp:tcp_retransmit_skb"),
    btf_fields=(
        BtfField("TAPIO_SKC_COOKIE_OFFSET", "sock", "__sk_common.skc_cookie",
                 feature="socket cookie of timed-out connects"),
    ),
    description="TCP connections refused or timed out",
)


@hookimpl
def tapio_register_observers(register):
    register(OBSERVER)


@hookimpl
def tapio_detect_anomalies(observer, events):
    return connect_failures(events)
