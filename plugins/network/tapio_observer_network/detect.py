"""Turning connect-failure records into anomalies.

The kernel already sends one record per failed connect and nothing for
successful ones, so detection here is classification: pick the rows of each
kind (vectorised) and only then build Python objects for them.
"""

from __future__ import annotations

import socket

import numpy as np

from tapio_core import Anomaly
from tapio_observer_network.records import (
    FAMILIES,
    KIND_CONNECT_REFUSED,
    KIND_CONNECT_TIMEOUT,
    PROTOCOLS,
    TCP_STATES,
)

CONNECT_FAILURES = {
    KIND_CONNECT_REFUSED: (
        "kernel.network.connection_refused", "failure", "ECONNREFUSED",
        "connection refused: peer answered SYN with RST",
    ),
    KIND_CONNECT_TIMEOUT: (
        "kernel.network.connection_timeout", "timeout", "ETIMEDOUT",
        "connection attempt ended in SYN_SENT without a reply",
    ),
}


def format_ip(family: int, raw: bytes) -> str:
    if family == socket.AF_INET:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw[:16])


def connect_failures(events: np.ndarray) -> list[Anomaly]:
    """One anomaly per failed-connect record; other kinds are not this detector's."""
    anomalies: list[Anomaly] = []
    for kind, (type_, outcome, code, message) in CONNECT_FAILURES.items():
        rows = events[events["kind"] == kind]
        if rows.size == 0:
            continue
        task = rows["task"]
        columns = zip(
            rows["timestamp_ns"].tolist(), rows["syn_sent_ns"].tolist(), rows["sock_cookie"].tolist(),
            task["pid"].tolist(), task["tid"].tolist(), task["cgroup_id"].tolist(), task["comm"].tolist(),
            rows["family"].tolist(), rows["protocol"].tolist(), rows["src_port"].tolist(), rows["dst_port"].tolist(),
            rows["old_state"].tolist(), rows["new_state"].tolist(), rows["syn_retransmits"].tolist(),
            rows["src_addr"].tolist(), rows["dst_addr"].tolist(),
            strict=True,
        )
        for (ts, syn_sent, cookie, pid, tid, cgroup, comm, family, proto, sport, dport, old, new, syn_rtx,
             src, dst) in columns:
            anomalies.append(Anomaly(
                type=type_, timestamp_ns=ts, severity="warning", outcome=outcome,
                error_code=code, error_message=message,
                data={
                    "pid": pid, "tid": tid, "comm": comm.split(b"\0", 1)[0].decode("utf-8", "replace"),
                    "cgroup_id": cgroup,
                    "src_ip": format_ip(family, src), "dst_ip": format_ip(family, dst),
                    "src_port": sport, "dst_port": dport,
                    "family": FAMILIES.get(family, str(family)), "protocol": PROTOCOLS.get(proto, str(proto)),
                    "old_state": TCP_STATES.get(old, str(old)), "new_state": TCP_STATES.get(new, str(new)),
                    "sock_cookie": cookie, "syn_retransmits": syn_rtx,
                    "connect_duration_ns": ts - syn_sent,
                },
            ))
    anomalies.sort(key=lambda anomaly: anomaly.timestamp_ns)
    return anomalies
