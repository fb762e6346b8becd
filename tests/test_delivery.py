"""tapio_core.delivery against real HTTP servers on loopback: batching, gzip, retries, drops, shutdown, TLS, tokens."""

from __future__ import annotations

import email.utils
import gzip
import logging
import time
from datetime import UTC, datetime

import pytest
from http_servers import HandshakeCutter, Receiver, free_port, make_certificates

from tapio_core.config import ConfigError, build_settings
from tapio_core.delivery import Delivery, DeliverySettings, parse_retry_after
from tapio_core.http_transport import BearerToken, HttpTransport
from tapio_core.occurrence import Occurrence
from tapio_core.sink import SinkError

FAST_RETRIES = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05}


def occurrence(n: int) -> Occurrence:
    return Occurrence(id=f"occ-{n:05d}", timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
                      type="kernel.test.thing", severity="warning", outcome="failure", data={"n": n})


def occurrences(count: int, start: int = 0) -> list[Occurrence]:
    return [occurrence(n) for n in range(start, start + count)]


class Ids:
    """A body is the occurrence ids, one per line: easy to check what arrived."""

    content_type = "text/plain"

    def encode(self, occurrence):
        item = occurrence.id.encode()
        return item, len(item) + 1

    def body(self, items):
        return b"\n".join(items)

    def rejected(self, reply, sent):
        return 0, ""


def start(url: str, path: str = "/ingest", **settings) -> Delivery:
    config = DeliverySettings(endpoint=url + path, **settings)
    return Delivery("test", config, Ids(), HttpTransport(config.endpoint, config, user_agent="tapio-test"))


def ids(receiver: Receiver) -> list[str]:
    return [line for request in receiver.received for line in request.body.decode().split("\n")]


def batches(receiver: Receiver) -> list[int]:
    return [len(request.body.split(b"\n")) for request in receiver.received]


def settled(delivery: Delivery) -> int:
    counts = delivery.counts
    return counts["delivered"] + counts["failed"] + counts["dropped"]


def test_a_full_batch_goes_at_once_and_close_flushes_the_rest():
    with Receiver() as receiver:
        delivery = start(receiver.url, batch_max_count=3, batch_max_age_s=3600)
        delivery.put(occurrences(7))
        assert receiver.wait_for(lambda r: len(r.received) == 2)
        delivery.close()
    assert batches(receiver) == [3, 3, 1]
    assert ids(receiver) == [o.id for o in occurrences(7)]
    assert receiver.received[0].path == "/ingest"
    assert receiver.received[0].headers["Content-Type"] == "text/plain"
    assert receiver.received[0].headers["User-Agent"] == "tapio-test"
    assert delivery.counts == {"emitted": 7, "delivered": 7, "failed": 0, "dropped": 0, "retried": 0}


def test_a_partial_batch_goes_once_its_oldest_occurrence_is_old_enough():
    with Receiver() as receiver:
        delivery = start(receiver.url, batch_max_count=1000, batch_max_age_s=0.2)
        delivery.put(occurrences(2))
        delivery.put(occurrences(1, start=2))
        assert receiver.wait_for(lambda r: len(ids(r)) == 3)  # no close(): the age alone sent them
        delivery.close()
    assert batches(receiver) == [3]


def test_bodies_never_exceed_the_byte_bound():
    with Receiver() as receiver:
        # Each id is 9 bytes plus a separator: at most 3 fit in 32 bytes.
        delivery = start(receiver.url, batch_max_count=100, batch_max_bytes=32)
        delivery.put(occurrences(10))
        delivery.close()
    assert all(len(request.raw) <= 32 for request in receiver.received)
    assert batches(receiver) == [3, 3, 3, 1]
    assert ids(receiver) == [o.id for o in occurrences(10)]


def test_gzip_bodies_are_marked_and_decompress_to_the_batch():
    with Receiver() as receiver:
        delivery = start(receiver.url, gzip=True)
        delivery.put(occurrences(50))
        delivery.close()
    [request] = receiver.received
    assert request.headers["Content-Encoding"] == "gzip"
    assert gzip.decompress(request.raw) == b"\n".join(o.id.encode() for o in occurrences(50))
    assert len(request.raw) < len(request.body)


def test_without_gzip_the_body_is_plain():
    with Receiver() as receiver:
        delivery = start(receiver.url, gzip=False)
        delivery.put(occurrences(2))
        delivery.close()
    [request] = receiver.received
    assert "Content-Encoding" not in request.headers
    assert request.raw == b"occ-00000\nocc-00001"


@pytest.mark.parametrize("status", [500, 502, 503, 429])
def test_5xx_and_429_are_retried_until_accepted(status):
    with Receiver() as receiver:
        receiver.reply(status)
        receiver.reply(status)
        delivery = start(receiver.url, **FAST_RETRIES)
        delivery.put(occurrences(4))
        delivery.close()
    assert len(receiver.received) == 3
    assert len({request.raw for request in receiver.received}) == 1  # the same batch each time
    assert delivery.counts == {"emitted": 4, "delivered": 4, "failed": 0, "dropped": 0, "retried": 2}


def test_retry_after_is_honoured_over_a_shorter_backoff():
    with Receiver() as receiver:
        receiver.reply(429, {"Retry-After": "1"})
        receiver.reply(503, {"Retry-After": "1"})
        delivery = start(receiver.url, **FAST_RETRIES)
        delivery.put(occurrences(1))
        delivery.close()
    first, second, third = (request.at for request in receiver.received)
    # Lower bounds only: the server asked for a second each time; the backoff alone would be <= 50 ms.
    assert second - first >= 1.0
    assert third - second >= 1.0
    assert delivery.counts["delivered"] == 1
    assert delivery.counts["retried"] == 2


def test_retry_after_values():
    assert parse_retry_after("7") == 7.0
    assert parse_retry_after("0") == 0.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("100000") == 300.0  # capped
    in_a_minute = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= parse_retry_after(in_a_minute) <= 60
    assert parse_retry_after(email.utils.formatdate(time.time() - 60, usegmt=True)) == 0.0
    for unusable in ("nan", "NaN", "inf", "-inf", "1e999", "-1"):
        assert parse_retry_after(unusable) is None, unusable


@pytest.mark.parametrize("value", ["nan", "inf", "-5"])
def test_an_unusable_retry_after_falls_back_to_the_backoff(value):
    with Receiver() as receiver:
        receiver.reply(429, {"Retry-After": value})
        delivery = start(receiver.url, **FAST_RETRIES)
        delivery.put(occurrences(2))
        delivery.close()
    assert len(receiver.received) == 2
    assert delivery.counts == {"emitted": 2, "delivered": 2, "failed": 0, "dropped": 0, "retried": 1}


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
def test_other_4xx_fail_at_once_without_retry(status, caplog):
    with Receiver() as receiver:
        receiver.reply(status)
        delivery = start(receiver.url, **FAST_RETRIES)
        delivery.put(occurrences(5))
        delivery.close()
    assert len(receiver.received) == 1
    assert delivery.counts == {"emitted": 5, "delivered": 0, "failed": 5, "dropped": 0, "retried": 0}
    assert f"HTTP {status} (not retried)" in caplog.text


def test_redirects_are_not_followed():
    with Receiver() as elsewhere, Receiver() as receiver:
        receiver.reply(307, {"Location": elsewhere.url + "/ingest"})
        delivery = start(receiver.url, **FAST_RETRIES)
        delivery.put(occurrences(2))
        delivery.close()
    assert elsewhere.received == []
    assert len(receiver.received) == 1
    assert delivery.counts["failed"] == 2


def test_retries_are_bounded():
    with Receiver() as receiver:
        for _ in range(5):
            receiver.reply(500)
        delivery = start(receiver.url, max_retries=2, **FAST_RETRIES)
        delivery.put(occurrences(3))
        delivery.close()
    assert len(receiver.received) == 3
    assert delivery.counts == {"emitted": 3, "delivered": 0, "failed": 3, "dropped": 0, "retried": 2}


def test_endpoint_down_then_up_loses_nothing_but_the_counted_drops():
    port = free_port()
    delivery = start(f"http://127.0.0.1:{port}", batch_max_count=10, batch_max_age_s=0.01, queue_size=50,
                     max_retries=1000, **FAST_RETRIES)
    emitted = occurrences(300)
    for first in range(0, 300, 10):
        delivery.put(emitted[first:first + 10])
    deadline = time.monotonic() + 10
    while delivery.counts["retried"] < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert delivery.counts["retried"] >= 3  # the sender is retrying against the dead port
    with Receiver(port=port) as receiver:
        assert receiver.wait_for(lambda r: len(ids(r)) == delivery.counts["emitted"] - delivery.counts["dropped"])
        delivery.close()
    received = ids(receiver)
    counts = delivery.counts
    assert counts["failed"] == 0
    assert counts["dropped"] > 0
    assert counts["delivered"] + counts["dropped"] == counts["emitted"] == 300
    assert len(received) == len(set(received)) == counts["delivered"]
    # Drop-oldest: the newest queue-full of occurrences all made it.
    assert {o.id for o in emitted[-50:]} <= set(received)


def test_drop_newest_keeps_the_queue_and_refuses_what_comes_in():
    with Receiver() as receiver:
        receiver.hold()
        delivery = start(receiver.url, batch_max_count=5, queue_size=10, drop="newest", timeout_s=30)
        delivery.put(occurrences(5))  # taken by the sender, which now waits on the held endpoint
        assert receiver.wait_for(lambda r: len(r.received) == 1)
        for first in range(5, 40, 5):
            delivery.put(occurrences(5, start=first))  # returns at once although the endpoint hangs
        assert delivery.counts["dropped"] == 25
        assert delivery.depth() == 15  # 5 in the held request, 10 queued (what /metrics and status show)
        receiver.release()
        delivery.close()
    assert ids(receiver) == [o.id for o in occurrences(15)]
    assert delivery.counts == {"emitted": 40, "delivered": 15, "failed": 0, "dropped": 25, "retried": 0}


def test_shutdown_stops_at_its_deadline_and_counts_everything():
    with Receiver() as receiver:
        receiver.hold()
        delivery = start(receiver.url, batch_max_count=5, timeout_s=60, shutdown_timeout_s=0.3)
        delivery.put(occurrences(5))
        assert receiver.wait_for(lambda r: len(r.received) == 1)
        delivery.put(occurrences(12, start=5))
        delivery.close()  # the held request cannot finish: it is failed, the queued ones dropped
        counts = dict(delivery.counts)
    assert counts == {"emitted": 17, "delivered": 0, "failed": 5, "dropped": 12, "retried": 0}


def test_shutdown_does_not_wait_out_a_long_backoff():
    with Receiver() as receiver:
        receiver.reply(503, {"Retry-After": "120"})
        delivery = start(receiver.url, shutdown_timeout_s=0.2)
        delivery.put(occurrences(3))
        assert receiver.wait_for(lambda r: len(r.received) == 1)
        delivery.close()
    assert delivery.counts == {"emitted": 3, "delivered": 0, "failed": 3, "dropped": 0, "retried": 0}
    assert settled(delivery) == delivery.counts["emitted"]


def test_https_with_the_ca_bundle(tmp_path):
    certificates = make_certificates(tmp_path)
    with Receiver(tls=certificates.server_context()) as receiver:
        delivery = start(receiver.url, ca_bundle=str(certificates.ca))
        delivery.put(occurrences(3))
        delivery.close()
    assert ids(receiver) == [o.id for o in occurrences(3)]
    assert delivery.counts["delivered"] == 3


def test_https_refuses_a_certificate_no_trusted_ca_signed(tmp_path, caplog):
    certificates = make_certificates(tmp_path)
    with Receiver(tls=certificates.server_context()) as receiver:
        delivery = start(receiver.url, **FAST_RETRIES)  # the system CAs do not know the test CA
        delivery.put(occurrences(3))
        delivery.close()
    assert receiver.received == []
    assert delivery.counts == {"emitted": 3, "delivered": 0, "failed": 3, "dropped": 0, "retried": 0}
    assert "certificate verify failed" in caplog.text


def test_https_refuses_a_certificate_for_another_host(tmp_path, caplog):
    certificates = make_certificates(tmp_path)  # for 127.0.0.1 only
    with Receiver(tls=certificates.server_context()) as receiver:
        delivery = start(f"https://localhost:{receiver.port}", ca_bundle=str(certificates.ca), **FAST_RETRIES)
        delivery.put(occurrences(3))
        delivery.close()
    assert receiver.received == []
    assert delivery.counts == {"emitted": 3, "delivered": 0, "failed": 3, "dropped": 0, "retried": 0}
    assert "Hostname mismatch" in caplog.text


def test_an_https_endpoint_cutting_handshakes_while_it_restarts_is_retried(tmp_path):
    certificates = make_certificates(tmp_path)
    with HandshakeCutter() as restarting:
        delivery = start(f"https://127.0.0.1:{restarting.port}", ca_bundle=str(certificates.ca), max_retries=1000,
                         **FAST_RETRIES)
        delivery.put(occurrences(3))
        assert restarting.wait_for(lambda c: c.cut >= 2)  # TLS errors, yet the sender keeps trying
    with Receiver(port=restarting.port, tls=certificates.server_context()) as receiver:
        assert receiver.wait_for(lambda r: len(ids(r)) == 3)
        delivery.close()
    assert ids(receiver) == [o.id for o in occurrences(3)]
    assert (delivery.counts["delivered"], delivery.counts["failed"]) == (3, 0)
    assert delivery.counts["retried"] >= 2


def test_an_http_endpoint_stays_http_and_an_https_one_stays_https(tmp_path):
    certificates = make_certificates(tmp_path)
    with Receiver(tls=certificates.server_context()) as receiver:
        plain = start(receiver.url.replace("https://", "http://"), max_retries=0)
        plain.put(occurrences(1))
        plain.close()
    assert receiver.received == []  # a TLS server does not answer plain HTTP: no silent switch either way
    assert plain.counts["failed"] == 1


SECRET = "s3cr3t-t0ken-value-9f8e7d"


def test_the_token_is_sent_but_never_logged_or_shown(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)  # every logger, urllib3 included
    monkeypatch.setenv("TAPIO_TEST_TOKEN", SECRET)
    certificates = make_certificates(tmp_path)
    shown = []
    with Receiver() as receiver, Receiver(tls=certificates.server_context()) as tls_receiver:
        for status in (200, 401, 403, 500, 500):
            receiver.reply(status)
        for url, extra in ((receiver.url, {}), (receiver.url, {}), (receiver.url, {"max_retries": 1}),
                           (f"http://127.0.0.1:{free_port()}", {"max_retries": 1}), (tls_receiver.url, {})):
            delivery = start(url, token_env="TAPIO_TEST_TOKEN", **FAST_RETRIES, **extra)
            delivery.put(occurrences(2))
            delivery.close()
            shown += [repr(delivery), repr(delivery.transport), repr(delivery.transport.token),
                      repr(delivery.settings), str(delivery.settings)]
    assert receiver.received[0].headers["Authorization"] == f"Bearer {SECRET}"
    assert "401" in caplog.text and "Connection refused" in caplog.text and "certificate" in caplog.text
    assert SECRET not in caplog.text
    assert not [text for text in shown if SECRET in text]


def test_a_token_file_is_read_again_when_it_is_rotated(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    with Receiver() as receiver:
        delivery = start(receiver.url, token_file=str(token_file), batch_max_count=1)
        delivery.put(occurrences(1))
        assert receiver.wait_for(lambda r: len(r.received) == 1)
        token_file.write_text("second-token-longer\n")
        delivery.put(occurrences(1, start=1))
        delivery.close()
    assert [r.headers["Authorization"] for r in receiver.received] == ["Bearer first-token",
                                                                        "Bearer second-token-longer"]


def test_the_token_read_at_start_up_is_kept_if_the_variable_is_emptied(monkeypatch):
    monkeypatch.setenv("TAPIO_TEST_TOKEN", SECRET)
    with Receiver() as receiver:
        delivery = start(receiver.url, token_env="TAPIO_TEST_TOKEN")
        monkeypatch.setenv("TAPIO_TEST_TOKEN", "")
        delivery.put(occurrences(1))
        delivery.close()
    assert receiver.received[0].headers["Authorization"] == f"Bearer {SECRET}"


@pytest.mark.parametrize("token", [f"{SECRET}\nsecond-line", f"{SECRET}\r\nX-Injected: 1", f"{SECRET}\x7f",
                                   f"{SECRET}\u00e9"], ids=["two lines", "CRLF", "DEL", "not ASCII"])
def test_a_token_no_header_can_hold_stops_start_up_without_showing_it(tmp_path, monkeypatch, token):
    monkeypatch.setenv("TAPIO_TEST_TOKEN", token)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    for setting, source in (({"token_env": "TAPIO_TEST_TOKEN"}, "token_env: the environment variable TAPIO_TEST_TOKEN"),
                            ({"token_file": str(token_file)}, f"token_file: {token_file}")):
        with pytest.raises(SinkError) as caught:
            BearerToken(DeliverySettings(endpoint="https://example.invalid/", **setting))
        message = str(caught.value)
        assert message.startswith(f"{source} holds a line break or another character not allowed in an HTTP header")
        assert SECRET not in message and "\n" not in message


def test_a_token_file_rotated_to_two_lines_is_not_sent_nor_shown(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "token"
    token_file.write_text("first-token\n")
    with Receiver() as receiver:
        delivery = start(receiver.url, token_file=str(token_file), batch_max_count=1, max_retries=1000,
                         **FAST_RETRIES)
        delivery.put(occurrences(1))
        assert receiver.wait_for(lambda r: len(r.received) == 1)
        token_file.write_text(f"{SECRET}\nsecond-line\n")
        delivery.put(occurrences(1, start=1))
        assert receiver.wait_for(lambda r: delivery.counts["retried"] >= 2)  # held back, and tried again
        token_file.write_text("third-token-fixed\n")
        delivery.close()
    assert [r.headers["Authorization"] for r in receiver.received] == ["Bearer first-token", "Bearer third-token-fixed"]
    assert "holds a line break" in caplog.text
    assert SECRET not in caplog.text
    assert delivery.counts["delivered"] == 2


def test_a_header_requests_refuses_fails_at_once_and_its_value_is_never_shown(monkeypatch, caplog):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("TAPIO_TEST_TOKEN", "start-up-token")
    with Receiver() as receiver:
        delivery = start(receiver.url, token_env="TAPIO_TEST_TOKEN", **FAST_RETRIES)
        # Past the start-up check by some other route: the transport must still keep it out of every message.
        monkeypatch.setattr(delivery.transport.token, "header", lambda: f"Bearer {SECRET}\r\nX-Injected: 1")
        delivery.put(occurrences(2))
        delivery.close()
    assert receiver.received == []
    assert delivery.counts == {"emitted": 2, "delivered": 0, "failed": 2, "dropped": 0, "retried": 0}
    assert "InvalidHeader" in caplog.text
    assert SECRET not in caplog.text


def test_a_missing_token_stops_start_up_naming_the_setting(tmp_path, monkeypatch):
    monkeypatch.delenv("TAPIO_NO_SUCH_TOKEN", raising=False)
    config = DeliverySettings(endpoint="https://example.invalid/", token_env="TAPIO_NO_SUCH_TOKEN")
    with pytest.raises(SinkError, match=r"^token_env: the environment variable TAPIO_NO_SUCH_TOKEN is not set"):
        BearerToken(config)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SinkError, match=r"^token_file: .* is empty$"):
        BearerToken(DeliverySettings(endpoint="https://example.invalid/", token_file=str(empty)))


@pytest.mark.parametrize(("table", "message"), [
    ({}, "config [http]: endpoint: required field missing"),
    ({"endpoint": "ftp://hub/"}, "config [http]: endpoint must be an http:// or https:// URL, got 'ftp://hub/'"),
    ({"endpoint": "hub:8080"}, "config [http]: endpoint must be an http:// or https:// URL, got 'hub:8080'"),
    ({"endpoint": "https://user:pw@hub/"},
     "config [http]: endpoint must not carry credentials: use token_env or token_file"),
    ({"endpoint": "https://hub/", "ca_bundle": "/no/such.pem"},
     "config [http]: ca_bundle must be a readable file, got '/no/such.pem'"),
    ({"endpoint": "https://hub/", "batch_max_count": 0}, "config [http]: 'batch_max_count' must be > 0: 0"),
    ({"endpoint": "https://hub/", "drop": "random"}, "config [http]: 'drop' must be in ('oldest', 'newest')"),
    ({"endpoint": "https://hub/", "token_env": "A", "token_file": "/etc/hostname"},
     "config [http]: token_env and token_file: must set one of them, not both"),
    ({"endpoint": "https://hub/", "retries": 3}, "config [http]: unknown key retries"),
])
def test_invalid_settings_stop_start_up_with_one_line_naming_the_key(table, message):
    with pytest.raises(ConfigError) as caught:
        build_settings(DeliverySettings, "http", {"http": table})
    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_an_endpoints_answer_is_read_only_up_to_a_bound():
    """A remote that answers with a flood costs the agent at most MAX_REPLY_BYTES of it."""
    from tapio_core.http_transport import MAX_REPLY_BYTES

    with Receiver() as receiver:
        receiver.reply(503, {}, b"x" * (8 * MAX_REPLY_BYTES))
        transport = HttpTransport(receiver.url, DeliverySettings(endpoint=receiver.url), user_agent="tapio-test")
        reply = transport(b"{}", {"Content-Type": "application/json"}, timeout=10)
    assert (reply.status, len(reply.body)) == (503, MAX_REPLY_BYTES)
