"""The HTTP side of remote delivery: one pooled ``requests`` session and the bearer token.

Kept apart from ``delivery`` (queueing, batching, retries), which only needs a
callable that posts bytes and answers with a :class:`~tapio_core.delivery.Reply`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlsplit

from tapio_core.delivery import DeliverySettings, Reply, SendError
from tapio_core.sink import SinkError

log = logging.getLogger("tapio.delivery")


class BearerToken:
    """A bearer token from an environment variable or a file; its value is never in repr, logs or errors.

    A file is read again when it changes, so rotated (projected service-account) tokens are picked up.
    """

    def __init__(self, settings: DeliverySettings) -> None:
        self._env, self._path = settings.token_env, settings.token_file
        self._value, self._stamp = "", None
        if self._env and not os.environ.get(self._env):
            raise SinkError(f"token_env: the environment variable {self._env} is not set or empty")
        self.header()  # fail at start-up, not at the first batch

    def __repr__(self) -> str:
        return f"BearerToken(env={self._env!r}, file={self._path!r})"

    def header(self) -> str:
        if self._env:
            return "Bearer " + os.environ.get(self._env, "").strip()
        try:
            stat = os.stat(self._path)
            if (stat.st_mtime_ns, stat.st_size) != self._stamp:
                self._value, self._stamp = Path(self._path).read_text().strip(), (stat.st_mtime_ns, stat.st_size)
        except OSError as exc:
            if self._stamp is None:
                raise SinkError(f"token_file: cannot read {self._path}: {exc.strerror or exc}") from None
        if not self._value:
            raise SinkError(f"token_file: {self._path} is empty")
        return "Bearer " + self._value


class HttpTransport:
    """POSTs with one pooled ``requests`` session: certificates verified, redirects not followed."""

    def __init__(self, url: str, settings: DeliverySettings, user_agent: str) -> None:
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
                                         allow_redirects=False)
        except SinkError as exc:
            raise SendError(str(exc)) from None
        except self._requests.exceptions.SSLError as exc:
            raise SendError(f"TLS: {_root_cause(exc)}", retriable=False) from None
        except self._requests.RequestException as exc:
            raise SendError(f"{type(exc).__name__}: {_root_cause(exc)}") from None
        return Reply(response.status_code, response.headers, response.content)

    def close(self) -> None:
        self.session.close()


def _root_cause(exc: BaseException) -> str:
    """The innermost reason ("Connection refused"), without the pool and URL details requests wraps around it."""
    while exc.__cause__ or exc.__context__:
        exc = exc.__cause__ or exc.__context__
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
