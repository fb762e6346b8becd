"""Tapio network observer: failed connects, resets, retransmit spikes, RTT degradation, RST storms, packet drops
with the kernel's reason and listen-queue overflows."""

from __future__ import annotations

import logging
from pathlib import Path

from tapio_core import (
    BpfCounter,
    BtfField,
    ObserverSpec,
    OptionalTracepoint,
    RawTracepointArg,
    TracepointField,
    hookimpl,
)
from tapio_core.perf import online_cpus, start_clock
from tapio_observer_network.detect import drop_reasons, network_anomalies, storms_open_at_stop
from tapio_observer_network.records import NETWORK_RECORD
from tapio_observer_network.settings import NetworkSettings, write_kernel_settings

log = logging.getLogger("tapio.network")
#: How often network_tick ends the destination storms that calmed down.
STORM_CLOCK_NS = 1_000_000_000

#: Features named by several declarations below (any one missing turns the feature off).
RTT = "RTT degradation"
OWNERS_FROM_READS = "owners of accepted and older sockets learned from their reads"
OWNERS_FROM_SENDS = "owners of accepted and older sockets learned from their sends"
FAMILY = "address families of resets, retransmits and RTT samples"
FAILED_RETRANSMITS = "failed retransmit attempts told apart in retransmit spikes"
PACKET_DROPS = "packet drops with the kernel's reason, and failed connects told why (Linux 5.17+)"
DROP_NETNS = "packet drops told apart by network namespace"
LISTEN_OVERFLOWS = "listen-queue overflows"

OBSERVER = ObserverSpec(
    name="network",
    bpf_source=Path(__file__).with_name("network.bpf.c"),
    record_dtype=NETWORK_RECORD,
    tracepoints=("sock:inet_sock_set_state", "tcp:tcp_receive_reset", "tcp:tcp_retransmit_skb", "raw:tcp_probe"),
    optional_tracepoints=(
        # tcp_recvmsg calls it whenever it copies data, on every kernel.
        OptionalTracepoint("TAPIO_OWNER_FROM_READS", "raw:tcp_rcv_space_adjust", feature=OWNERS_FROM_READS),
        # Linux 6.3 and later: older kernels have no tracepoint on the send path in the sender's context.
        OptionalTracepoint("TAPIO_OWNER_FROM_SENDS", "sock:sock_send_length", feature=OWNERS_FROM_SENDS),
        OptionalTracepoint("TAPIO_KFREE_SKB", "raw:kfree_skb", feature=PACKET_DROPS),
    ),
    raw_tracepoint_args=(
        RawTracepointArg("TAPIO_PROBE_SOCK", "tcp_probe", 0, "struct sock *", feature=RTT),
        RawTracepointArg("TAPIO_RCV_SPACE_SOCK", "tcp_rcv_space_adjust", 0, "struct sock *",
                         feature=OWNERS_FROM_READS),
        # Linux 5.17 added the reason; before it, a drop says only where it happened.
        RawTracepointArg("TAPIO_KFREE_SKB_REASON", "kfree_skb", 2, "enum skb_drop_reason", feature=PACKET_DROPS),
    ),
    btf_fields=(
        BtfField("TAPIO_SKC_FAMILY_OFFSET", "sock", "__sk_common.skc_family", feature=FAMILY),
        BtfField("TAPIO_SKC_COOKIE_OFFSET", "sock", "__sk_common.skc_cookie",
                 feature="socket cookie of timed-out connects, retransmit spikes and RTT degradations"),
        BtfField("TAPIO_SKC_STATE_OFFSET", "sock", "__sk_common.skc_state",
                 feature="telling resets of connects older than the agent from connection resets"),
        BtfField("TAPIO_TCP_TOTAL_RETRANS_OFFSET", "tcp_sock", "total_retrans",
                 feature="segments retransmitted in retransmit spikes"),
        BtfField("TAPIO_TCP_SND_CWND_OFFSET", "tcp_sock", "snd_cwnd",
                 feature="congestion window in retransmit spikes and RTT degradations"),
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
        # Only a reader holding the socket's lock is its owner (softirq readers are not).
        BtfField("TAPIO_SK_LOCK_OWNED_OFFSET", "sock", "sk_lock.owned", feature=OWNERS_FROM_READS),
        # What the tcp_probe event would have copied from the socket.
        BtfField("TAPIO_TCP_SRTT_OFFSET", "tcp_sock", "srtt_us", feature=RTT),
        BtfField("TAPIO_TCP_SND_UNA_OFFSET", "tcp_sock", "snd_una", feature=RTT),
        BtfField("TAPIO_TCP_SND_NXT_OFFSET", "tcp_sock", "snd_nxt", feature=RTT),
        BtfField("TAPIO_SKC_DADDR_OFFSET", "sock", "__sk_common.skc_daddr", feature=RTT),
        BtfField("TAPIO_SKC_RCV_SADDR_OFFSET", "sock", "__sk_common.skc_rcv_saddr", feature=RTT),
        BtfField("TAPIO_SKC_V6_DADDR_OFFSET", "sock", "__sk_common.skc_v6_daddr", feature=RTT),
        BtfField("TAPIO_SKC_V6_RCV_SADDR_OFFSET", "sock", "__sk_common.skc_v6_rcv_saddr", feature=RTT),
        BtfField("TAPIO_SKC_DPORT_OFFSET", "sock", "__sk_common.skc_dport", feature=RTT),
        BtfField("TAPIO_SKC_NUM_OFFSET", "sock", "__sk_common.skc_num", feature=RTT),
        # A dropped packet's headers, read as the kernel left them.
        BtfField("TAPIO_SKB_HEAD_OFFSET", "sk_buff", "head", feature=PACKET_DROPS),
        BtfField("TAPIO_SKB_NETWORK_HEADER_OFFSET", "sk_buff", "network_header", feature=PACKET_DROPS),
        BtfField("TAPIO_SKB_PROTOCOL_OFFSET", "sk_buff", "protocol", feature=PACKET_DROPS),
        BtfField("TAPIO_SKB_DEV_OFFSET", "sk_buff", "dev", feature=DROP_NETNS),
        BtfField("TAPIO_DEV_NET_OFFSET", "net_device", "nd_net.net", feature=DROP_NETNS),
        BtfField("TAPIO_SKB_SK_OFFSET", "sk_buff", "sk", feature=DROP_NETNS),
        # The kernel counts every connection a listener drops in sock.sk_drops (tcp_listendrop).
        BtfField("TAPIO_SK_DROPS_OFFSET", "sock", "sk_drops", feature=LISTEN_OVERFLOWS),
        BtfField("TAPIO_SK_ACK_BACKLOG_OFFSET", "sock", "sk_ack_backlog", feature=LISTEN_OVERFLOWS),
        BtfField("TAPIO_SK_MAX_ACK_BACKLOG_OFFSET", "sock", "sk_max_ack_backlog", feature=LISTEN_OVERFLOWS),
    ),
    tracepoint_fields=(TracepointField("TAPIO_RETRANSMIT_HAS_ERR", "tcp:tcp_retransmit_skb", "err",
                                       feature=FAILED_RETRANSMITS),),
    required_features=(FAMILY,),
    description="TCP connects refused, unreachable or timed out, resets, retransmit spikes, RTT degradation,"
                " RST storms, packet drops with the kernel's reason, listen-queue overflows",
    bpf_counters=(BpfCounter("suppressed", "network_counts", 0), BpfCounter("untracked", "network_counts", 1),
                  BpfCounter("abandoned_connects", "network_counts", 2)),
    config_type=NetworkSettings,
    perf_event_programs=("network_tick",),  # on the storm clock, started in tapio_observer_started
)


@hookimpl
def tapio_register_observers(register):
    register(OBSERVER)


@hookimpl
def tapio_observer_started(observer):
    reasons = observer.state["drop_reasons"] = drop_reasons()
    write_kernel_settings(observer.bpf, observer.config, drop_reasons=reasons)
    try:
        start_clock(observer.bpf, "network_tick", online_cpus()[:1], STORM_CLOCK_NS)
    except (OSError, KeyError) as exc:  # e.g. perf_event_open refused by a seccomp profile
        observer.status_reason = (f"RST storms fold nothing and end on their next RST, listen-queue overflows are "
                                  f"not watched (no clock: {exc})")
        log.warning("network: %s", observer.status_reason)
        return
    write_kernel_settings(observer.bpf, observer.config, storm_clock=True, drop_reasons=reasons)


@hookimpl
def tapio_detect_anomalies(observer, events):
    if "drop_reasons" not in observer.state:  # a replay: this machine's names (the recording holds numbers)
        observer.state["drop_reasons"] = drop_reasons()
    return network_anomalies(events, observer.config, observer.counters, observer.state["drop_reasons"])


@hookimpl
def tapio_observer_stopping(observer):
    if observer.bpf is None:  # a replay: the kernel's maps are not there
        return None
    return storms_open_at_stop(observer.bpf)
