"""`tapio health`: each observer healthy, degraded or critical, from recent occurrences and the agent's state.

The rules, in order (the first that applies wins):

- the agent reports the observer ``failed``: critical, with the agent's reason;
- ``unsupported``: shown as unsupported -- a fact about the node, not a fault;
- any ``critical`` occurrence in the window, or at least ``critical_at``
  occurrences of severity warning or worse: critical;
- any ``error`` occurrence, or at least ``degraded_at`` of warning or worse: degraded;
- otherwise healthy.

Occurrences belong to the observer whose type prefix they carry
(``kernel.network.`` -> network). Drilled into one observer, the report lists
what is behind its occurrences: destinations, devices, processes and pods,
worst first.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import Any

import attrs

from tapio_core.occurrence import SEVERITIES, format_timestamp
from tapio_core.occurrence_reader import StoredOccurrence
from tapio_core.state import AgentStatus, format_duration

HEALTHY, DEGRADED, CRITICAL, UNSUPPORTED = "healthy", "degraded", "critical", "unsupported"
#: How bad each verdict is; unsupported is not unhealthy.
RANK = {HEALTHY: 0, UNSUPPORTED: 0, DEGRADED: 1, CRITICAL: 2}
SEVERITY_RANK = {severity: rank for rank, severity in enumerate(SEVERITIES)}
NOTABLE = ("warning", "error", "critical")
#: Observers whose occurrence types are not ``kernel.<observer name>.``.
TYPE_PREFIXES = {"pmc": "kernel.node."}
#: Keys built from occurrence data are cut here: a hostile value cannot flood the report.
MAX_KEY_CHARS = 200


@attrs.frozen
class Thresholds:
    """Counts of warning-or-worse occurrences in the window that make an observer degraded or critical."""

    degraded_at: int = 1
    critical_at: int = 100


@attrs.define
class Tally:
    """Counts over a group of occurrences."""

    count: int = 0
    by_severity: Counter = attrs.field(factory=Counter)
    by_type: Counter = attrs.field(factory=Counter)
    worst: str | None = None
    last_seen: datetime | None = None

    def add(self, type_: str, severity: str, count: int = 1) -> None:
        self.count += count
        self.by_severity[severity] += count
        self.by_type[type_] += count
        if self.worst is None or SEVERITY_RANK[severity] > SEVERITY_RANK[self.worst]:
            self.worst = severity

    def seen_at(self, when: datetime) -> None:
        if self.last_seen is None or when > self.last_seen:
            self.last_seen = when

    @property
    def notable(self) -> int:
        return sum(self.by_severity[severity] for severity in NOTABLE)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "worst_severity": self.worst,
                "by_severity": {s: self.by_severity[s] for s in reversed(SEVERITIES) if self.by_severity[s]},
                "by_type": dict(self.by_type.most_common()),
                "last_seen": format_timestamp(self.last_seen) if self.last_seen else None}


class Tallies:
    """Tallies by key, counted cheaply per occurrence; :class:`Tally` objects are built at the end, for the worst.

    100,000 occurrences from as many processes go through here: a dict update
    per occurrence and a Tally only for the rows shown keep that quick.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, str], int] = {}
        self._summary: dict[str, list] = {}  # key -> [worst severity rank, count, newest ns, its occurrence]

    def add(self, key: str, occurrence: StoredOccurrence) -> None:
        counted = (key, occurrence.type, occurrence.severity)
        self._counts[counted] = self._counts.get(counted, 0) + 1
        rank, ns = SEVERITY_RANK[occurrence.severity], occurrence.ns
        summary = self._summary.get(key)
        if summary is None:
            self._summary[key] = [rank, 1, ns, occurrence.timestamp]
            return
        summary[1] += 1
        if rank > summary[0]:
            summary[0] = rank
        if ns > summary[2]:
            summary[2], summary[3] = ns, occurrence.timestamp

    def build(self, top: int | None = None) -> dict[str, Tally]:
        """Tallies of every key, or of the ``top`` worst (worst severity, then count, then recency) in that order."""
        keys = list(self._summary)
        if top is not None:
            keys = heapq.nlargest(top, keys, key=lambda key: self._summary[key][:3])
        tallies = {key: Tally() for key in keys}
        for (key, type_, severity), count in self._counts.items():
            tally = tallies.get(key)
            if tally is not None:
                tally.add(type_, severity, count)
        for key, tally in tallies.items():
            tally.seen_at(self._summary[key][3])
        return tallies


def _clip(value: Any) -> str:
    text = str(value)
    return text if len(text) <= MAX_KEY_CHARS else text[:MAX_KEY_CHARS] + "…"


def destinations(occurrence: StoredOccurrence) -> Iterable[str]:
    data = occurrence.data
    ip, port = data.get("dst_ip"), data.get("dst_port")
    if ip is None:
        return ()
    ip = str(ip)
    return (_clip(ip if port is None else f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"),)


def devices(occurrence: StoredOccurrence) -> Iterable[str]:
    data = occurrence.data
    if data.get("device") is not None:
        return (_clip(data["device"]),)
    if data.get("dev_major") is not None:
        return (_clip(f"{data['dev_major']}:{data.get('dev_minor', '?')}"),)
    return ()


def processes(occurrence: StoredOccurrence) -> Iterable[str]:
    data = occurrence.data
    pid = data.get("pid")
    return () if pid is None else (_clip(f"{data.get('comm', '?')}[{pid}]"),)


def pods(occurrence: StoredOccurrence) -> Iterable[str]:
    context = occurrence.context
    entities = context.get("entities")
    if not isinstance(entities, list):
        return ()
    namespace = context.get("namespace")
    found = []
    for entity in entities:
        if isinstance(entity, dict) and entity.get("kind") == "pod":
            name = entity.get("name") or entity.get("id") or "?"
            found.append(_clip(f"{namespace}/{name}" if namespace else name))
    return found


#: What a drilled-into observer's occurrences are broken down by.
DIMENSIONS: dict[str, Callable[[StoredOccurrence], Iterable[str]]] = {
    "destinations": destinations, "devices": devices, "processes": processes, "pods": pods,
}


def type_prefix(observer: str, entry: dict[str, Any] | None = None) -> str:
    """The occurrence type prefix of an observer: what its state declares, a known exception, or kernel.<name>."""
    declared = (entry or {}).get("type_prefix")
    if isinstance(declared, str) and declared:
        return declared
    return TYPE_PREFIXES.get(observer, f"kernel.{observer}.")


class TypeRouter:
    """Which observer an occurrence type belongs to."""

    def __init__(self, observers: dict[str, dict[str, Any]]) -> None:
        names = set(observers) | set(TYPE_PREFIXES)
        prefixes = [(type_prefix(name, observers.get(name)), name) for name in names]
        self._prefixes = sorted(prefixes, key=lambda item: -len(item[0]))  # the most specific first
        self._cache: dict[str, str] = {}

    def observer_of(self, type_: str) -> str:
        found = self._cache.get(type_)
        if found is None:
            found = next((name for prefix, name in self._prefixes if type_.startswith(prefix)), None)
            if found is None:  # an observer the state does not list: name it after the type
                parts = type_.split(".")
                found = parts[1] if parts[0] == "kernel" and len(parts) > 2 else parts[0]
            self._cache[type_] = found = _clip(found)
        return found


@attrs.define
class ObserverHealth:
    name: str
    health: str = HEALTHY
    reason: str = ""
    #: What the agent's state says: running, unsupported, failed, stopped; None when it does not list it.
    status: str | None = None
    entry: dict[str, Any] = attrs.field(factory=dict)
    tally: Tally = attrs.field(factory=Tally)
    #: Filled when drilled into: per dimension, (key, tally) worst first.
    worst: dict[str, list[tuple[str, Tally]]] = attrs.field(factory=dict)

    def judge(self, thresholds: Thresholds, window: str) -> None:
        state_reason = str(self.entry.get("reason") or "")
        tally, severities = self.tally, self.tally.by_severity
        if self.status == "failed":
            self.health, self.reason = CRITICAL, f"the observer failed: {state_reason or 'no reason given'}"
            return
        if self.status == "unsupported":
            self.health, self.reason = UNSUPPORTED, f"not supported on this node: {state_reason or 'no reason given'}"
            return
        if severities["critical"] or tally.notable >= thresholds.critical_at:
            self.health = CRITICAL
        elif severities["error"] or tally.notable >= thresholds.degraded_at:
            self.health = DEGRADED
        else:
            self.health = HEALTHY
        if not tally.count:
            self.reason = f"no anomalies in the last {window}"
        else:
            counts = ", ".join(f"{severities[s]} {s}" for s in reversed(SEVERITIES) if severities[s])
            common, times = tally.by_type.most_common(1)[0]
            self.reason = f"{tally.count} occurrence(s) in the last {window} ({counts}); most: {common} x{times}"
            if not tally.notable:
                self.reason += "; none warning or worse"
        lost_per_s = self.entry.get("lost_per_s") or 0
        if isinstance(lost_per_s, (int, float)) and lost_per_s > 0:  # anomalies went unseen just now
            self.health = CRITICAL if self.health == CRITICAL else DEGRADED
            self.reason += f"; the ring buffer is losing records ({lost_per_s:g}/s): anomalies are going unseen"
        if state_reason:  # what a running observer cannot see (a missing counter, a BTF member) is said too
            self.reason += f"; {state_reason}"

    def to_dict(self) -> dict[str, Any]:
        result = {"name": self.name, "health": self.health, "reason": self.reason, "status": self.status,
                  "occurrences": self.tally.to_dict()}
        for key in ("records_per_s", "anomalies_per_s", "lost", "lost_per_s", "malformed"):
            if key in self.entry:
                result[key] = self.entry[key]
        if self.worst:
            result["worst"] = {dimension: [dict(tally.to_dict(), key=key) for key, tally in rows]
                               for dimension, rows in self.worst.items()}
        return result


@attrs.define
class HealthReport:
    window: timedelta
    agent: AgentStatus
    observers: dict[str, ObserverHealth]

    @property
    def health(self) -> str:
        """The worst verdict; a node no agent watches is at least degraded."""
        worst = max((RANK[o.health] for o in self.observers.values()), default=0)
        if not self.agent.running:
            worst = max(worst, RANK[DEGRADED])
        return [HEALTHY, DEGRADED, CRITICAL][worst]

    def to_dict(self) -> dict[str, Any]:
        return {"health": self.health, "window_s": int(self.window.total_seconds()),
                "agent": {"running": self.agent.running, "summary": self.agent.summary},
                "observers": [o.to_dict() for o in self.observers.values()]}


def assess(
    agent: AgentStatus,
    occurrences: Iterable[StoredOccurrence],
    window: timedelta,
    thresholds: Thresholds = Thresholds(),
    drill: str | None = None,
    top: int = 5,
) -> HealthReport:
    """Judge every observer the state lists or the occurrences name; break ``drill`` down by DIMENSIONS."""
    states = agent.observers
    observers = {name: ObserverHealth(name, status=_status(entry), entry=entry) for name, entry in states.items()}
    router = TypeRouter(states)
    by_observer = Tallies()
    breakdown = {dimension: Tallies() for dimension in DIMENSIONS}
    keys_of = [(breakdown[dimension], extract) for dimension, extract in DIMENSIONS.items()]
    for occurrence in occurrences:
        name = router.observer_of(occurrence.type)
        by_observer.add(name, occurrence)
        if name == drill:
            for tallies, extract in keys_of:
                for key in extract(occurrence):
                    tallies.add(key, occurrence)
    for name, tally in by_observer.build().items():
        observers.setdefault(name, ObserverHealth(name)).tally = tally
    window_text = format_duration(window.total_seconds())
    for observer in observers.values():
        observer.judge(thresholds, window_text)
    if drill is not None and drill in observers:
        observers[drill].worst = {dimension: list(rows.items()) for dimension, tallies in breakdown.items()
                                  if (rows := tallies.build(top))}
    return HealthReport(window, agent, dict(sorted(observers.items())))


def _status(entry: dict[str, Any]) -> str | None:
    status = entry.get("status")
    return status if isinstance(status, str) else None
