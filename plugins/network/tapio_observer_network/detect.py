"""Turning network records into anomalies.

The kernel already judged every record: a failed connect or a reset (rate
limited), or a window or baseline that crossed its threshold. Detection here
is classification: pick the rows of each kind (vectorised), check them against
the thresholds in force -- the same ones the kernel used, unless a replay runs
under stricter settings -- and only then build Python objects for them.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import MutableMapping
from typing import Any

import numpy as np

from tapio_core import Anomaly, c_string, with_suppressed
from tapio_core.bpf import kernel_symbol, tracepoint_symbols
from tapio_observer_network.records import (
    FAMILIES,
    KIND_CONNECT_FAILED,
    KIND_CONNECT_REFUSED,
    KIND_CONNECT_TIMEOUT,
    KIND_CONNECTION_RESET,
    KIND_LISTEN_OVERFLOW,
    KIND_PACKET_DROP,
    KIND_RETRANSMIT_SPIKE,
    KIND_RST_STORM,
    KIND_RST_STORM_END,
    KIND_RTT_DEGRADATION,
    NETWORK_RECORD,
    PROTOCOLS,
    SCOPE_DESTINATION,
    SCOPE_NODE,
    SCOPES,
    TCP_FLAGS,
    TCP_STATES,
)
from tapio_observer_network.settings import NetworkSettings, rtt_factor_x16

PREFIX = "kernel.network."
#: kind -> (type, outcome); the error code and message come from the record (``connect_error``).
CONNECT_FAILURES = {
    KIND_CONNECT_REFUSED: (PREFIX + "connection_refused", "failure"),
    KIND_CONNECT_TIMEOUT: (PREFIX + "connection_timeout", "timeout"),
    KIND_CONNECT_FAILED: (PREFIX + "connection_unreachable", "failure"),
}
#: ``sk_error`` of a record whose kernel's BTF did not say where the socket's error is.
ERROR_UNKNOWN = -1
CONNECTION_RESET = PREFIX + "connection_reset"
RETRANSMIT_SPIKE = PREFIX + "retransmit_spike"
RTT_DEGRADATION = PREFIX + "rtt_degradation"
RST_STORM = PREFIX + "rst_storm"
PACKET_DROP = PREFIX + "packet_drop"
LISTEN_OVERFLOW = PREFIX + "listen_overflow"

Counters = MutableMapping[str, int]


def format_ip(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


def destination(ip: str, port: int, family: int) -> str:
    return f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}"




def drop_reasons() -> dict[int, str]:
    """This kernel's drop reasons by number, as kfree_skb prints them (empty before Linux 5.17)."""
    return tracepoint_symbols("skb:kfree_skb", "reason")


def _reason(number: int, names: dict[int, str]) -> str:
    return names.get(number, f"reason {number}")


def _tcp_flags(bits: int) -> str:
    return "|".join(name for bit, name in enumerate(TCP_FLAGS) if bits & (1 << bit))


def _state(code: int) -> str:
    return TCP_STATES.get(code, str(code))


def _fingerprints(rows: np.ndarray) -> list[bytes]:
    """Each row's raw bytes: names the record uniquely, so the occurrence id needs no JSON."""
    raw, size = rows.tobytes(), rows.dtype.itemsize
    return [raw[i : i + size] for i in range(0, len(raw), size)]


def _owner(task: Any, known: int) -> dict[str, Any]:
    pid, tid, cgroup, comm = task
    return {"pid": pid, "tid": tid, "comm": c_string(comm), "cgroup_id": cgroup, "owner_known": bool(known)}


def _with_netns(data: dict[str, Any], netns: int) -> dict[str, Any]:
    """``netns`` (the socket's network namespace inode) is present only when the kernel said it."""
    if netns:
        data["netns"] = netns
    return data


def connect_error(kind: int, sk_error: int, rst_received: int, syn_retransmits: int) -> tuple[str, str, dict]:
    """Error code, message and the ``data`` facts that tell how a failed connect ended."""
    if kind == KIND_CONNECT_REFUSED:
        if rst_received or sk_error == ERROR_UNKNOWN:
            return "ECONNREFUSED", "connection refused: peer answered SYN with RST", {}
        return "ECONNREFUSED", "connection refused: ICMP port unreachable", {}
    if kind == KIND_CONNECT_FAILED:
        code = errno.errorcode.get(sk_error, f"E{sk_error}")
        return code, f"connection attempt failed: {os.strerror(sk_error)}", {}
    if sk_error == 0:
        return "ETIMEDOUT", "connection attempt abandoned by the application without a reply", {
            "ended_by": "application"}
    if sk_error == ERROR_UNKNOWN:
        return "ETIMEDOUT", "connection attempt ended in SYN_SENT without a reply", {}
    return "ETIMEDOUT", f"SYN unanswered: the kernel gave up after {syn_retransmits} retransmit(s)", {
        "ended_by": "kernel"}


def connect_failures(events: np.ndarray, reasons: dict[int, str] | None = None) -> list[Anomaly]:
    """One anomaly per failed-connect record, in kernel time order; other kinds are not this function's.
    A connect whose SYN or SYN-ACK the kernel dropped says why (``drop_reason``, where, how many)."""
    reasons = reasons or {}
    anomalies: list[Anomaly] = []
    for kind, (type_, outcome) in CONNECT_FAILURES.items():
        rows = events[events["kind"] == kind]
        if rows.size == 0:
            continue
        task = rows["task"]
        columns = zip(
            rows["timestamp_ns"].tolist(), rows["syn_sent_ns"].tolist(), rows["sock_cookie"].tolist(),
            task["pid"].tolist(), task["tid"].tolist(), task["cgroup_id"].tolist(), task["comm"].tolist(),
            rows["family"].tolist(), rows["protocol"].tolist(), rows["src_port"].tolist(), rows["dst_port"].tolist(),
            rows["old_state"].tolist(), rows["new_state"].tolist(), rows["syn_retransmits"].tolist(),
            rows["src_addr"].tolist(), rows["dst_addr"].tolist(), rows["netns"].tolist(), rows["suppressed"].tolist(),
            rows["sk_error"].tolist(), rows["rst_received"].tolist(), rows["owner_known"].tolist(),
            rows["drop_reason"].tolist(), rows["drop_location"].tolist(), rows["count"].tolist(),
            _fingerprints(rows), strict=True,
        )
        for (ts, syn_sent, cookie, pid, tid, cgroup, comm, family, proto, sport, dport, old, new, syn_rtx,
             src, dst, netns, suppressed, sk_error, rst, known, reason, location, dropped, fingerprint) in columns:
            code, message, how = connect_error(kind, sk_error, rst, syn_rtx)
            if reason:
                how.update(drop_reason=_reason(reason, reasons), drop_location=kernel_symbol(location),
                           dropped_packets=dropped)
            anomalies.append(Anomaly(
                type=type_, timestamp_ns=ts, severity="warning", outcome=outcome,
                error_code=code, error_message=message, fingerprint=fingerprint,
                data=with_suppressed(_with_netns({
                    **_owner((pid, tid, cgroup, comm), known),
                    "src_ip": format_ip(family, src), "dst_ip": format_ip(family, dst),
                    "src_port": sport, "dst_port": dport,
                    "family": FAMILIES.get(family, str(family)), "protocol": PROTOCOLS.get(proto, str(proto)),
                    "old_state": _state(old), "new_state": _state(new),
                    "sock_cookie": cookie, "syn_retransmits": syn_rtx,
                    "connect_duration_ns": ts - syn_sent if syn_sent else None,  # None: the kernel did not say
                    **how,
                }, netns), suppressed),
            ))
    anomalies.sort(key=lambda anomaly: anomaly.timestamp_ns)
    return anomalies


def _socket_facts(row: np.void) -> dict[str, Any]:
    """Owner and endpoints of the socket a per-socket record is about."""
    family = int(row["family"])
    src_ip, dst_ip = format_ip(family, row["src_addr"].tobytes()), format_ip(family, row["dst_addr"].tobytes())
    return _with_netns({
        **_owner(row["task"].tolist(), int(row["owner_known"])),
        "src_ip": src_ip, "src_port": int(row["src_port"]), "dst_ip": dst_ip, "dst_port": int(row["dst_port"]),
        "family": FAMILIES.get(family, str(family)), "protocol": PROTOCOLS.get(int(row["protocol"]), "tcp"),
        "sock_cookie": int(row["sock_cookie"]),
    }, int(row["netns"]))


def connection_resets(rows: np.ndarray) -> list[Anomaly]:
    anomalies = []
    for row, fingerprint in zip(rows, _fingerprints(rows), strict=True):
        data = _socket_facts(row)
        data.update(old_state=_state(int(row["old_state"])), new_state=_state(int(row["new_state"])))
        anomalies.append(Anomaly(
            type=CONNECTION_RESET, timestamp_ns=int(row["timestamp_ns"]), severity="warning", outcome="failure",
            error_code="ECONNRESET", error_message=f"connection reset by peer in {data['old_state']}",
            data=with_suppressed(data, int(row["suppressed"])), fingerprint=fingerprint,
        ))
    return anomalies


def retransmit_spikes(rows: np.ndarray) -> list[Anomaly]:
    anomalies = []
    for row, fingerprint in zip(rows, _fingerprints(rows), strict=True):
        data = _socket_facts(row)
        data.update(
            destination=destination(data["dst_ip"], data["dst_port"], int(row["family"])),
            retransmits=int(row["count"]), window_ms=int(row["window_ms"]),
            segments_retransmitted=int(row["total_retrans"]), snd_cwnd=int(row["snd_cwnd"]),
            state=_state(int(row["old_state"])),
        )
        if row["failed_known"]:  # kernels whose tcp_retransmit_skb has no err cannot tell
            data["failed_retransmits"] = int(row["failed"])
        anomalies.append(Anomaly(
            type=RETRANSMIT_SPIKE, timestamp_ns=int(row["timestamp_ns"]), severity="warning", outcome="failure",
            data=with_suppressed(data, int(row["suppressed"])), fingerprint=fingerprint,
        ))
    return anomalies


def rtt_degradations(rows: np.ndarray) -> list[Anomaly]:
    anomalies = []
    for row, fingerprint in zip(rows, _fingerprints(rows), strict=True):
        data = _socket_facts(row)
        data.update(
            destination=data["dst_ip"], baseline_ms=int(row["baseline_srtt_us"]) / 1000,
            current_ms=int(row["srtt_us"]) / 1000, samples=int(row["samples"]), snd_cwnd=int(row["snd_cwnd"]),
        )
        anomalies.append(Anomaly(
            type=RTT_DEGRADATION, timestamp_ns=int(row["timestamp_ns"]), severity="warning", outcome="success",
            data=with_suppressed(data, int(row["suppressed"])), fingerprint=fingerprint,
        ))
    return anomalies


def rst_storms(rows: np.ndarray) -> list[Anomaly]:
    """A storm's start, and (where the kernel's clock ends it) its end with what it folded.

    ``refused`` and ``reset`` are the destination's connection failures counted into the storm instead
    of being sent; ``suppressed`` is everything the occurrence stands for that was not sent on its own
    (those, and RSTs held back before it within the cool-down).
    """
    anomalies = []
    for row, fingerprint in zip(rows, _fingerprints(rows), strict=True):
        scope, ended = int(row["scope"]), int(row["kind"]) == KIND_RST_STORM_END
        refused, reset = int(row["refused"]), int(row["reset"])
        data: dict[str, Any] = {"scope": SCOPES.get(scope, str(scope)), "rsts": int(row["count"]),
                                "window_ms": int(row["window_ms"])}
        if scope != SCOPE_NODE:
            family = int(row["family"])
            ip, port = format_ip(family, row["dst_addr"].tobytes()), int(row["dst_port"])
            data.update(destination=destination(ip, port, family), dst_ip=ip, dst_port=port,
                        family=FAMILIES.get(family, str(family)), refused=refused, reset=reset)
            _with_netns(data, int(row["netns"]))
        outcome = "failure"
        if ended:
            data.update(episode="ended", duration_ms=(int(row["timestamp_ns"]) - int(row["started_ns"])) // 1_000_000)
        elif row["episode_open"]:
            data["episode"] = "started"
            outcome = "in_progress"
        anomalies.append(Anomaly(
            type=RST_STORM, timestamp_ns=int(row["timestamp_ns"]), severity="warning", outcome=outcome,
            data=with_suppressed(data, int(row["suppressed"]) + refused + reset), fingerprint=fingerprint,
        ))
    return anomalies


def packet_drops(rows: np.ndarray, reasons: dict[int, str]) -> list[Anomaly]:
    """A packet the kernel dropped for a reason that is not routine; ``suppressed`` counts the drops of
    the same reason, namespace and destination held back before it."""
    anomalies = []
    for row, fingerprint in zip(rows, _fingerprints(rows), strict=True):
        family, proto = int(row["family"]), int(row["protocol"])
        reason = _reason(int(row["drop_reason"]), reasons)
        dst_ip, dst_port = format_ip(family, row["dst_addr"].tobytes()), int(row["dst_port"])
        data: dict[str, Any] = {
            "drop_reason": reason, "drop_location": kernel_symbol(int(row["drop_location"])),
            "src_ip": format_ip(family, row["src_addr"].tobytes()), "dst_ip": dst_ip,
            "family": FAMILIES.get(family, str(family)), "protocol": PROTOCOLS.get(proto, str(proto)),
        }
        if proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
            data.update(src_port=int(row["src_port"]), dst_port=dst_port,
                        destination=destination(dst_ip, dst_port, family))
        if proto == socket.IPPROTO_TCP:
            data["tcp_flags"] = _tcp_flags(int(row["tcp_flags"]))
        anomalies.append(Anomaly(
            type=PACKET_DROP, timestamp_ns=int(row["timestamp_ns"]), severity="warning", outcome="failure",
            error_code=reason, error_message=f"the kernel dropped a packet: {reason} at {data['drop_location']}",
            data=with_suppressed(_with_netns(data, int(row["netns"])), int(row["suppressed"])),
            fingerprint=fingerprint,
        ))
    return anomalies


def listen_overflows(rows: np.ndarray) -> list[Anomaly]:
    """A listener that dropped connections (its accept queue, or its SYN queue, was full) since its last
    occurrence: how many, its limit and how full it is, and who listens."""
    anomalies = []
    for row, fingerprint in zip(rows, _fingerprints(rows), strict=True):
        family, port = int(row["family"]), int(row["src_port"])
        ip = format_ip(family, row["src_addr"].tobytes())
        dropped, backlog = int(row["count"]), int(row["backlog"])
        data = _with_netns({
            **_owner(row["task"].tolist(), int(row["owner_known"])),
            "listen_ip": ip, "listen_port": port, "listener": destination(ip, port, family),
            "family": FAMILIES.get(family, str(family)), "protocol": "tcp", "sock_cookie": int(row["sock_cookie"]),
            "dropped_connections": dropped, "backlog": backlog, "accept_queue": int(row["queue_len"]),
        }, int(row["netns"]))
        anomalies.append(Anomaly(
            type=LISTEN_OVERFLOW, timestamp_ns=int(row["timestamp_ns"]), severity="warning", outcome="failure",
            error_code="LISTEN_OVERFLOW",
            error_message=f"listener {data['listener']} dropped {dropped} connection(s): its accept queue "
                          f"(limit {backlog}) was full",
            data=data, fingerprint=fingerprint,
        ))
    return anomalies


def over_threshold(kind: int, rows: np.ndarray, settings: NetworkSettings) -> np.ndarray:
    """Mask of the rows that meet the thresholds in force (the kernel's own, or a replay's stricter ones)."""
    if kind == KIND_RETRANSMIT_SPIKE:
        return rows["count"] >= settings.retransmit_threshold
    if kind == KIND_RST_STORM_END:
        return np.ones(rows.shape, dtype=bool)  # its start met the thresholds
    if kind == KIND_RST_STORM:
        node = rows["scope"] == SCOPE_NODE
        return rows["count"] >= np.where(node, settings.rst_storm_node_threshold, settings.rst_storm_threshold)
    if kind == KIND_RTT_DEGRADATION:
        srtt = rows["srtt_us"].astype(np.uint64)
        return (
            (rows["samples"] >= settings.rtt_min_samples)
            & (srtt >= round(settings.rtt_floor_ms * 1000))
            & (srtt * 16 >= rows["baseline_srtt_us"].astype(np.uint64) * rtt_factor_x16(settings.rtt_factor))
        )
    return np.ones(rows.shape, dtype=bool)


#: Kinds that carry thresholds or a socket owner; connect failures are built apart, in bulk, and packet drops
#: apart too (they need this kernel's reason names).
AGGREGATES = {
    KIND_CONNECTION_RESET: connection_resets,
    KIND_RETRANSMIT_SPIKE: retransmit_spikes,
    KIND_RTT_DEGRADATION: rtt_degradations,
    KIND_RST_STORM: rst_storms,
    KIND_RST_STORM_END: rst_storms,
    KIND_LISTEN_OVERFLOW: listen_overflows,
}


def network_anomalies(events: np.ndarray, settings: NetworkSettings, counters: Counters,
                      reasons: dict[int, str] | None = None) -> list[Anomaly]:
    """Every anomaly in a batch, in kernel time order; unknown kinds are ignored. ``reasons``: the
    kernel's drop reasons by number (``drop_reasons()``).

    ``counters`` gets ``suppressed_reported`` (events the kernel held back, as records carried them
    here) and ``below_threshold`` (records the thresholds in force reject: only in a stricter replay).
    """
    reasons = reasons or {}
    anomalies = connect_failures(events, reasons)
    drops = events[events["kind"] == KIND_PACKET_DROP]
    if drops.size:
        names = {reasons.get(n) for n in np.unique(drops["drop_reason"]).tolist()}
        if names & set(settings.drop_ignore_reasons):  # a replay under a longer ignore list
            keep = np.array([reasons.get(int(n)) not in settings.drop_ignore_reasons for n in drops["drop_reason"]])
            counters["below_threshold"] = counters.get("below_threshold", 0) + int((~keep).sum())
            drops = drops[keep]
        anomalies.extend(packet_drops(drops, reasons))
    for kind, build in AGGREGATES.items():
        rows = events[events["kind"] == kind]
        if rows.size == 0:
            continue
        keep = over_threshold(kind, rows, settings)
        if not keep.all():
            counters["below_threshold"] = counters.get("below_threshold", 0) + int((~keep).sum())
            rows = rows[keep]
        anomalies.extend(build(rows))
    suppressed = sum(int(events[field].sum(dtype=np.uint64)) for field in ("suppressed", "refused", "reset"))
    if suppressed:
        counters["suppressed_reported"] = counters.get("suppressed_reported", 0) + suppressed
    anomalies.sort(key=lambda anomaly: anomaly.timestamp_ns)
    return anomalies


#: open_storms' slot state of a storm the clock is to end (STORM_READY in network.bpf.c).
STORM_READY = 2


def storms_open_at_stop(bpf: Any) -> list[Anomaly]:
    """The destination storms the kernel's clock had not ended when the agent stopped, with what they folded.

    Called once the programs are detached, so the counts read from the maps are final. Their outcome is
    ``in_progress``: the storm had not calmed down. (Read from the maps, they are not in a recording.)
    """
    slots, windows = bpf["open_storms"], bpf["windows"]
    rows = []
    for index in range(slots.max_entries):
        slot = slots.get(index)
        if slot is None or slot.state != STORM_READY:
            continue
        key = slot.key
        state = windows.get(windows.Key.from_buffer_copy(bytes(key)))
        if state is None or not state.active or not state.ticked:
            continue
        row = np.zeros(1, dtype=NETWORK_RECORD)[0]
        row["timestamp_ns"] = time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # bpf_ktime_get_ns's clock
        row["kind"], row["scope"], row["protocol"] = KIND_RST_STORM_END, SCOPE_DESTINATION, socket.IPPROTO_TCP
        row["family"], row["dst_port"], row["netns"] = key.family, key.port, key.netns
        row["dst_addr"] = bytes(key.addr)
        row["started_ns"], row["count"] = state.last_record_ns, state.suppressed
        row["refused"], row["reset"] = state.folded_refused, state.folded_reset
        rows.append(row)
    anomalies = rst_storms(np.array(rows, dtype=NETWORK_RECORD)) if rows else []
    for anomaly in anomalies:
        anomaly.data["episode"], anomaly.outcome = "open_at_stop", "in_progress"
    return anomalies
