"""Tapio network observer: failed connects, resets, retransmit spikes, RTT degradation and RST storms."""

from __future__ import annotations

from pathlib import Path

from tapio_core import BpfCounter, BtfField, ObserverSpec, TracepointField, hookimpl
from tapio_observer_network.detect import network_anomalies
from tapio_observer_network.records import NETWORK_RECORD
from tapio_observer_network.settings import NetworkSettings, write_kernel_settings

OBSERVER = ObserverSpec(
    name="network",
    bpf_source=Path(__file__).with_name("network.bpf.c"),
    record_dtype=NETWORK_RECORD,
    tracepoints=(
        "sock:inet_sock_set_state", "sock:sock_send_length", "sock:sock_recv_length",
        "tcp:tcp_receive_reset", "tcp:tcp_retransmit_skb", "tcp:tcp_probe",
    ),
    btf_fields=(
        BtfField("TAPIO_SKC_COOKIE_OFFSET", "sock", "__sk_common.skc_cookie",
                 feature="socket cookie of timed-out connects and retransmit spikes"),
        BtfField("TAPIO_SKC_STATE_OFFSET", "sock", "__sk_common.skc_state",
                 feature="telling resets of connects older than the agent from connection resets"),
        BtfField("TAPIO_TCP_TOTAL_RETRANS_OFFSET", "tcp_sock", "total_retrans",
                 feature="segments retransmitted in retransmit spikes"),
        BtfField("TAPIO_TCP_SND_CWND_OFFSET", "tcp_sock", "snd_cwnd",
                 feature="congestion window in retransmit spikes"),
        BtfField("TAPIO_SKC_NET_OFFSET", "sock", "__sk_common.skc_net.net",
                 feature="destinations told apart by network namespace, and data.netns"),
        BtfField("TAPIO_NET_NS_INUM_OFFSET", "net", "ns.inum",
                 feature="destinations told apart by network namespace, and data.netns"),
        BtfField("TAPIO_SK_ERR_OFFSET", "sock", "sk_err",
                 feature="failed connects told apart by the kernel's error (unreachable, abandoned, timed out)"),
        BtfField("TAPIO_ICSK_RETRANSMITS_OFFSET", "inet_connection_sock", "icsk_retransmits",
                 feature="SYN retransmits of failed connects whose owner was forgotten"),
        BtfField("TAPIO_TCP_RETRANS_STAMP_OFFSET", "tcp_sock", "retrans_stamp",
                 feature="failed connects' durations without a clock read on every connect"),
        BtfField("TAPIO_SK_RTX_QUEUE_OFFSET", "sock", "tcp_rtx_queue",
                 feature="refused connects' durations to the nanosecond (else the millisecond)"),
        BtfField("TAPIO_SKB_RBNODE_OFFSET", "sk_buff", "rbnode",
                 feature="refused connects' durations to the nanosecond (else the millisecond)"),
        BtfField("TAPIO_SKB_MSTAMP_OFFSET", "sk_buff", "skb_mstamp_ns",
                 feature="refused connects' durations to the nanosecond (else the millisecond)"),
    ),
    tracepoint_fields=(TracepointField("TAPIO_RETRANSMIT_HAS_ERR", "tcp:tcp_retransmit_skb", "err",
                                       feature="failed retransmit attempts told apart in retransmit spikes"),),
    description="TCP connects refused, unreachable or timed out, resets, retransmit spikes, RTT degradation,"
                " RST storms",
    bpf_counters=(BpfCounter("suppressed", "network_counts", 0), BpfCounter("untracked", "network_counts", 1),
                  BpfCounter("abandoned_connects", "network_counts", 2)),
    config_type=NetworkSettings,
)


@hookimpl
def tapio_register_observers(register):
    register(OBSERVER)


@hookimpl
def tapio_observer_started(observer):
    write_kernel_settings(observer.bpf, observer.config)


@hookimpl
def tapio_detect_anomalies(observer, events):
    return network_anomalies(events, observer.config, observer.counters)
