"""Batched, retried delivery of occurrences to a remote endpoint, off the agent's thread.

A remote sink's ``tapio_sink_emit`` only puts occurrences on a bounded queue; one
sender thread per sink forms batches (bounded by count, bytes and age), posts
them through a transport, and retries connection errors and the statuses the
sink names (by default 429 and every 5xx) with exponential backoff and jitter
(a ``Retry-After`` is honoured). So a slow or dead endpoint never holds up the
ring buffers, nor any other sink.

Every occurrence handed to the sink (``emitted``) ends up counted once as:

- ``delivered``: the endpoint accepted it;
- ``failed``: it was sent and refused for good -- a status not retried, a redirect
  (never followed), a certificate the CA bundle does not vouch for, retries used up,
  rejected in an OTLP partial success, or still unanswered at the shutdown
  deadline;
- ``dropped``: it was never sent -- the queue was full (policy ``drop = "oldest"``,
  the default, evicts the longest-queued occurrence to make room, keeping the
  freshest picture of the node; ``"newest"`` refuses the incoming one), or the
  shutdown deadline passed first.

``retried`` counts requests sent again.
"""

from __future__ import annotations

import email.utils
import gzip
import logging
import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs

from tapio_core import __version__
from tapio_core.hookspecs import hookimpl
from tapio_core.http_transport import HttpTransport, Reply, SendError
from tapio_core.occurrence import Occurrence
from tapio_core.sink import RunningSink, SinkError

log = logging.getLogger("tapio.delivery")

COUNTS = ("emitted", "delivered", "failed", "dropped", "retried")
#: A server asking for a longer pause than this gets this long; the queue keeps filling meanwhile.
RETRY_AFTER_CAP_S = 300.0
#: Statuses sent again unless the sink names others: throttling and every server error.
RETRY_STATUSES = frozenset({429, *range(500, 600)})


def _endpoint(_instance: Any, attribute: attrs.Attribute, value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{attribute.name} must be an http:// or https:// URL, got {value!r}")
    if parts.username or parts.password:
        raise ValueError(f"{attribute.name} must not carry credentials: use token_env or token_file")


def _readable_file(_instance: Any, attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and not os.access(value, os.R_OK):
        raise ValueError(f"{attribute.name} must be a readable file, got {value!r}")


_positive, _not_negative = attrs.validators.gt(0), attrs.validators.ge(0)


@attrs.define(kw_only=True)
class DeliverySettings:
    """Settings every remote sink shares; a sink's ``config_type`` subclasses it."""

    endpoint: str = attrs.field(validator=_endpoint)
    #: PEM file of the CAs that may sign the endpoint's certificate (default: the system's).
    ca_bundle: str | None = attrs.field(default=None, validator=_readable_file)
    #: Name of an environment variable, or a file, holding a bearer token (at most one).
    token_env: str | None = None
    token_file: str | None = attrs.field(default=None, validator=_readable_file)
    gzip: bool = False
    batch_max_count: int = attrs.field(default=500, validator=_positive)
    batch_max_bytes: int = attrs.field(default=1_000_000, validator=_positive)
    batch_max_age_s: float = attrs.field(default=1.0, validator=_positive)
    queue_size: int = attrs.field(default=10_000, validator=_positive)
    drop: str = attrs.field(default="oldest", validator=attrs.validators.in_(("oldest", "newest")))
    timeout_s: float = attrs.field(default=10.0, validator=_positive)
    max_retries: int = attrs.field(default=8, validator=_not_negative)
    backoff_initial_s: float = attrs.field(default=0.5, validator=_positive)
    backoff_max_s: float = attrs.field(default=30.0, validator=_positive)
    shutdown_timeout_s: float = attrs.field(default=5.0, validator=_not_negative)

    def __attrs_post_init__(self) -> None:
        if self.token_env and self.token_file:
            raise ValueError("token_env and token_file: must set one of them, not both")


#: Posts a body with these headers, ``timeout`` seconds at most; raises SendError when no answer comes.
Transport = Callable[[bytes, Mapping[str, str], float], Reply]


class Encoder(Protocol):
    """How one sink turns occurrences into request bodies."""

    content_type: str

    def encode(self, occurrence: Occurrence) -> tuple[Any, int]:
        """One occurrence as an item of a batch, and its size in the body."""

    def body(self, items: Sequence[Any]) -> bytes:
        """The request body for these items (before gzip)."""

    def rejected(self, reply: Reply, sent: int) -> tuple[int, str]:
        """How many of ``sent`` items a 2xx reply still refused, and why (OTLP partial success)."""


class Delivery:
    """One sink's queue, sender thread and counts."""

    def __init__(self, name: str, settings: DeliverySettings, encoder: Encoder, transport: Transport,
                 counts: dict[str, int] | None = None, *, retry_statuses: Container[int] = RETRY_STATUSES) -> None:
        self.name = name
        self.settings = settings
        self.encoder = encoder
        self.transport = transport
        self.retry_statuses = retry_statuses
        self.counts = {} if counts is None else counts
        self.counts.update(dict.fromkeys(COUNTS, 0))
        self._queue: deque[tuple[float, Occurrence]] = deque()
        self._cond = threading.Condition()
        self._closing = threading.Event()
        self._deadline = math.inf
        self._in_flight = 0
        self._abandoned = False
        self._last_drop_log = -math.inf
        self._thread = threading.Thread(target=self._run, name=f"tapio-sink-{name}", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"Delivery({self.name!r}, {self.counts})"

    def depth(self) -> int:
        """Occurrences queued or in the batch being sent."""
        return len(self._queue) + self._in_flight

    # --- the agent's thread ----------------------------------------------------

    def put(self, occurrences: Sequence[Occurrence]) -> None:
        """Queue occurrences for sending; never waits for the network."""
        now = time.monotonic()
        with self._cond:
            was_empty = not self._queue
            self.counts["emitted"] += len(occurrences)
            if self._closing.is_set():  # no sender left to take them
                self.counts["dropped"] += len(occurrences)
                return
            dropped = max(len(self._queue) + len(occurrences) - self.settings.queue_size, 0)
            if self.settings.drop == "newest":
                occurrences = occurrences[: len(occurrences) - dropped]
            self._queue.extend((now, o) for o in occurrences)
            for _ in range(len(self._queue) - self.settings.queue_size):  # drop = "oldest"
                self._queue.popleft()
            if dropped:
                self.counts["dropped"] += dropped
                if now - self._last_drop_log >= 60:
                    self._last_drop_log = now
                    log.warning("sink %s: queue full (%d); dropping the %s occurrences (%d dropped so far)",
                                self.name, self.settings.queue_size, self.settings.drop, self.counts["dropped"])
            if was_empty or len(self._queue) >= self.settings.batch_max_count:
                self._cond.notify()

    def close(self) -> None:
        """Send what can be sent within ``shutdown_timeout_s``; count the rest as dropped or failed."""
        with self._cond:
            self._deadline = time.monotonic() + self.settings.shutdown_timeout_s
            self._closing.set()
            self._cond.notify()
        # Requests are cut off at the deadline; the extra second is for the thread to settle its counts.
        self._thread.join(self.settings.shutdown_timeout_s + 1.0)
        with self._cond:
            if self._queue:
                log.warning("sink %s: %d occurrence(s) dropped: not sent by the shutdown deadline",
                            self.name, len(self._queue))
                self.counts["dropped"] += len(self._queue)
                self._queue.clear()
            if self._thread.is_alive():  # stuck in a request past the deadline
                self.counts["failed"] += self._in_flight
                self._in_flight = 0
                self._abandoned = True
        getattr(self.transport, "close", lambda: None)()

    # --- the sender thread ---------------------------------------------------------

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                self._send(batch)
            except Exception:  # a bug in an encoder must not stop delivery for good
                log.exception("sink %s: cannot send a batch", self.name)
                self._settle(failed=self._in_flight)

    def _next_batch(self) -> list[Occurrence] | None:
        """Wait until a batch is due (full, old enough, or shutting down); None once there is nothing left."""
        with self._cond:
            while True:
                closing = self._closing.is_set()
                if closing and time.monotonic() >= self._deadline:
                    return None  # close() counts what is left
                if not self._queue:
                    if closing:
                        return None
                    self._cond.wait()
                    continue
                wait = self._queue[0][0] + self.settings.batch_max_age_s - time.monotonic()
                if closing or wait <= 0 or len(self._queue) >= self.settings.batch_max_count:
                    break
                self._cond.wait(wait)
            count = min(len(self._queue), self.settings.batch_max_count)
            self._in_flight = count
            return [self._queue.popleft()[1] for _ in range(count)]

    def _send(self, occurrences: list[Occurrence]) -> None:
        """Encode, cut into bodies no bigger than ``batch_max_bytes``, and post each."""
        chunk: list[Any] = []
        size = 0
        for occurrence in occurrences:
            try:
                item, item_size = self.encoder.encode(occurrence)
            except Exception as exc:
                log.error("sink %s: cannot encode occurrence %s: %s", self.name, occurrence.id, exc)
                self._settle(failed=1)
                continue
            if chunk and size + item_size > self.settings.batch_max_bytes:
                self._post(chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += item_size
        if chunk:
            self._post(chunk)

    def _post(self, items: list[Any]) -> None:
        body = self.encoder.body(items)
        headers = {"Content-Type": self.encoder.content_type}
        if self.settings.gzip:
            body = gzip.compress(body, compresslevel=6)
            headers["Content-Encoding"] = "gzip"
        for attempt in range(self.settings.max_retries + 1):
            timeout = min(self.settings.timeout_s, self._deadline - time.monotonic())
            if timeout <= 0:
                return self._give_up(items, "the shutdown deadline passed")
            retry_after = None
            try:
                reply = self.transport(body, headers, timeout)
            except SendError as exc:
                if not exc.retriable:
                    return self._give_up(items, str(exc))
                problem = str(exc)
            else:
                if 200 <= reply.status < 300:
                    rejected, why = self.encoder.rejected(reply, len(items))
                    if rejected:
                        log.warning("sink %s: endpoint rejected %d of %d occurrences: %s",
                                    self.name, rejected, len(items), why)
                    return self._settle(delivered=len(items) - rejected, failed=rejected)
                if 300 <= reply.status < 400:
                    return self._give_up(items, f"HTTP {reply.status} redirect, not followed: "
                                                "set the endpoint to the final URL")
                if reply.status not in self.retry_statuses:
                    return self._give_up(items, f"HTTP {reply.status} (not retried)")
                problem = f"HTTP {reply.status}"
                retry_after = parse_retry_after(reply.headers.get("Retry-After"))
            if attempt == self.settings.max_retries:
                return self._give_up(items, f"{problem}; gave up after {attempt} retries")
            delay = retry_after if retry_after is not None else self._backoff(attempt)
            log.log(logging.DEBUG if attempt else logging.WARNING,  # once per batch, not once per retry
                    "sink %s: %s; retrying in %.2f s", self.name, problem, delay)
            if not self._pause(delay):
                return self._give_up(items, f"{problem}; the shutdown deadline came before the next retry")
            with self._cond:
                self.counts["retried"] += 1

    def _backoff(self, attempt: int) -> float:
        """Exponential, capped, with jitter so many nodes do not retry in step."""
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_initial_s * 2**attempt)
        return random.uniform(ceiling / 2, ceiling)

    def _pause(self, delay: float) -> bool:
        """Sleep ``delay`` seconds; False when that would go past the shutdown deadline."""
        end = time.monotonic() + delay
        self._closing.wait(delay)  # returns early once close() has set the deadline
        if end > self._deadline:
            return False
        time.sleep(max(end - time.monotonic(), 0))
        return True

    def _give_up(self, items: list[Any], why: str) -> None:
        log.error("sink %s: %d occurrence(s) not delivered: %s", self.name, len(items), why)
        self._settle(failed=len(items))

    def _settle(self, delivered: int = 0, failed: int = 0) -> None:
        with self._cond:
            if self._abandoned:
                return  # close() already counted them
            self.counts["delivered"] += delivered
            self.counts["failed"] += failed
            self._in_flight -= delivered + failed


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), capped; None when absent or unreadable.

    "nan", "inf" or a negative number is unreadable too: the normal backoff applies, not a sleep that fails.
    """
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = max(email.utils.parsedate_to_datetime(value).timestamp() - time.time(), 0.0)  # a past date
        except (TypeError, ValueError):
            return None
    if not (math.isfinite(seconds) and seconds >= 0):
        return None
    return min(seconds, RETRY_AFTER_CAP_S)


def start_delivery(sink: RunningSink, url: str, encoder: Encoder, *,
                   retry_statuses: Container[int] = RETRY_STATUSES) -> Delivery:
    """What a remote sink's ``tapio_sink_open`` does; raises SinkError naming a setting that cannot work.

    The counts go in ``sink.counters``, which `tapio status` shows; ``retry_statuses`` are the
    HTTP statuses worth sending a batch again for (a protocol may narrow them, as OTLP does).
    """
    try:
        transport = HttpTransport(url, sink.config, user_agent=f"tapio/{__version__}")
    except SinkError as exc:
        raise SinkError(f"config [{sink.name}]: {exc}") from None
    delivery = sink.state["delivery"] = Delivery(sink.name, sink.config, encoder, transport, sink.counters,
                                                 retry_statuses=retry_statuses)
    sink.queue_depth = delivery.depth
    return delivery


class QueuedSinkHooks:
    """``tapio_sink_emit`` and ``tapio_sink_close`` of every sink opened with :func:`start_delivery`.

    A remote sink plugin registers an instance next to its own module's hooks
    (``tapio_register_sinks``, ``tapio_sink_open``), e.g. by exposing
    ``tapio_sink_emit = QUEUED.tapio_sink_emit`` -- emit only queues, close
    flushes within the sink's deadline.
    """

    @hookimpl
    def tapio_sink_emit(self, sink: RunningSink, occurrences: Sequence[Occurrence]) -> None:
        sink.state["delivery"].put(occurrences)

    @hookimpl
    def tapio_sink_close(self, sink: RunningSink) -> None:
        sink.state["delivery"].close()


QUEUED = QueuedSinkHooks()
