"""The HTTP side of remote delivery: one pooled ``requests`` session and the bearer token.

The layer under ``delivery`` (queueing, batching, retries), which only needs a
callable that posts bytes and answers with a :class:`Reply` or raises :class:`SendError`.
"""

from __future__ import annotations

import logging
import os
import re
import ssl
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs

from tapio_core.sink import SinkError

log = logging.getLogger("tapio.delivery")


#: What is read of an endpoint's answer: enough for any error message, never a remote's whole flood.
MAX_REPLY_BYTES = 64 * 1024


def read_bounded(response: Any, limit: int) -> bytes:
    """At most ``limit`` bytes of a streamed response's body; the rest is never read."""
    body = b""
    for chunk in response.iter_content(chunk_size=16 * 1024):
        body += chunk
        if len(body) >= limit:
            return body[:limit]
    return body


class HttpSettings(Protocol):
    """What the transport reads of a remote sink's settings (``delivery.DeliverySettings`` has them)."""

    ca_bundle: str | None
    token_env: str | None
    token_file: str | None


@attrs.frozen
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


class SendError(Exception):
    """A request got no HTTP answer (retriable unless said otherwise); the message never holds the token."""

    def __init__(self, message: str, retriable: bool = True) -> None:
        super().__init__(message)
        self.retriable = retriable


class BearerToken:
    """A bearer token from an environment variable or a file; its value is never in repr, logs or errors.

    A variable is read once, at start-up: nothing outside the process can change its environment.
    A file is read again when it changes, so rotated (projected service-account) tokens are picked up.
    """

    def __init__(self, settings: HttpSettings) -> None:
        self._env, self._path = settings.token_env, settings.token_file
        self._value, self._stamp = "", None
        if self._env:
            self._value = _checked(os.environ.get(self._env, "").strip(),
                                   f"token_env: the environment variable {self._env}")
            if not self._value:
                raise SinkError(f"token_env: the environment variable {self._env} is not set or empty")
        self.header()  # fail at start-up, not at the first batch

    def __repr__(self) -> str:
        return f"BearerToken(env={self._env!r}, file={self._path!r})"

    def header(self) -> str:
        if self._env:
            return "Bearer " + self._value
        try:
            stat = os.stat(self._path)
            if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                text = Path(self._path).read_text(errors="replace")  # undecodable bytes fail the check below
                value = _checked(text.strip(), f"token_file: {self._path}")
                self._value, self._stamp = value, (stat.st_mtime_ns, stat.st_size)
        except OSError as exc:
            if self._stamp is None:
                raise SinkError(f"token_file: cannot read {self._path}: {exc.strerror or exc}") from None
        if not self._value:
            raise SinkError(f"token_file: {self._path} is empty")
        return "Bearer " + self._value


#: What an HTTP header value may hold (RFC 9110 field-value, without the obsolete non-ASCII octets).
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*")


def _checked(token: str, source: str) -> str:
    """``token`` if it can go in a header; else an error naming ``source``, never the value itself."""
    if not _HEADER_VALUE.fullmatch(token):
        raise SinkError(f"{source} holds a line break or another character not allowed in an HTTP header: "
                        "put the token alone on one line")
    return token


class HttpTransport:
    """POSTs with one pooled ``requests`` session: certificates verified, redirects not followed."""

    def __init__(self, url: str, settings: HttpSettings, user_agent: str) -> None:
        import requests  # a dependency of the remote sinks, not of tapio-core

        self._requests = requests
        self.url = url
        self.session = requests.Session()
        # No ~/.netrc credentials and no REQUESTS_CA_BUNDLE overriding ca_bundle; proxies still apply.
        self.session.trust_env = False
        self.session.proxies = requests.utils.get_environ_proxies(url)
        self.session.verify = settings.ca_bundle or True
        self.session.headers["User-Agent"] = user_agent
        self.token = BearerToken(settings) if settings.token_env or settings.token_file else None
        if self.token and urlsplit(url).scheme == "http":
            log.warning("the bearer token goes to %s unencrypted (http://)", url)

    def __call__(self, body: bytes, headers: Mapping[str, str], timeout: float) -> Reply:
        headers = dict(headers)
        try:
            if self.token:
                headers["Authorization"] = self.token.header()
            response = self.session.post(self.url, data=body, headers=headers, timeout=timeout,
                                         allow_redirects=False, stream=True)
            try:
                reply = Reply(response.status_code, response.headers, read_bounded(response, MAX_REPLY_BYTES))
            finally:
                response.close()
        except (SinkError, ValueError, self._requests.RequestException) as exc:
            error = self._send_error(exc, headers.get("Authorization"))
        else:
            return reply
        raise error  # outside the handler: no __context__ holding the original, which may quote a header

    def _send_error(self, exc: Exception, authorization: str | None) -> SendError:
        if isinstance(exc, SinkError):  # the token file is unreadable or empty just now (mid-rotation?)
            return SendError(str(exc))
        if isinstance(exc, ValueError):
            # requests' InvalidHeader, http.client's own checks: they quote the header, so the text is not kept;
            # the same request would be refused again.
            return SendError(f"invalid request ({type(exc).__name__}; details not shown: they may hold the "
                             "token)", retriable=False)
        reason = _scrub(_root_cause(exc), authorization)
        if isinstance(exc, self._requests.exceptions.SSLError) and _verification_failed(exc):
            return SendError(f"TLS: {reason}", retriable=False)
        # Other TLS errors (a handshake cut while the endpoint restarts) are retried, like refused connections.
        return SendError(f"{type(exc).__name__}: {reason}")

    def close(self) -> None:
        self.session.close()


def _root_cause(exc: BaseException) -> str:
    """The innermost reason ("Connection refused"), without the pool and URL details requests wraps around it."""
    *_, exc = _causes(exc)
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """``exc`` and the exceptions it wraps, outermost first."""
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def _verification_failed(exc: BaseException) -> bool:
    """The certificate is not vouched for by the CA bundle or names another host: retrying cannot help."""
    return any(isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e)
               for e in _causes(exc))


def _scrub(text: str, authorization: str | None) -> str:
    """``text`` without the Authorization value, raw or quoted, should some library have put it there."""
    if authorization:
        secret = authorization.removeprefix("Bearer ")
        for form in (authorization, secret, repr(secret)[1:-1]):
            if form:
                text = text.replace(form, "<token>")
    return text
