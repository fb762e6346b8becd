"""Real HTTP(S) servers on 127.0.0.1, each in its own thread, for the remote sink tests.

A :class:`Receiver` records every request and answers from a script of replies
(then 200). ``hold()`` makes it keep every request waiting until ``release()``:
a slow or hung endpoint without sleeping on a clock. A :class:`HandshakeCutter`
hangs up on every TLS handshake: an https endpoint in the middle of a restart.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections import deque
from pathlib import Path

import attrs


@attrs.frozen
class Received:
    path: str
    headers: dict[str, str]
    raw: bytes
    #: The body after undoing Content-Encoding: gzip.
    body: bytes
    #: time.monotonic() when the request arrived.
    at: float


class Polled:
    """A server whose state a test polls, instead of sleeping for a guessed time."""

    def wait_for(self, predicate, timeout: float = 15.0) -> bool:
        """Poll until ``predicate(self)`` is true; False at ``timeout`` (a bound for hung code, not a measure)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate(self):
                return True
            time.sleep(0.01)
        return bool(predicate(self))


class Receiver(Polled):
    """An HTTP server on 127.0.0.1 that records requests and answers from a script."""

    def __init__(self, port: int = 0, tls: ssl.SSLContext | None = None) -> None:
        self.received: list[Received] = []
        self._replies: deque[tuple[int, dict[str, str], bytes]] = deque()
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self._server.handle_error = lambda request, address: None  # a client that hung up is not news
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.port = self._server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    def __enter__(self) -> Receiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.release()
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()

    def reply(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        """Answer the next request not yet answered with this (FIFO); once the script is used up, 200."""
        with self._lock:
            self._replies.append((status, headers or {}, body))

    def hold(self) -> None:
        self._open.clear()

    def release(self) -> None:
        self._open.set()

    def _handler_class(self):
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the sinks' pooled sessions expect

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                body = gzip.decompress(raw) if self.headers.get("Content-Encoding") == "gzip" else raw
                with receiver._lock:
                    receiver.received.append(Received(self.path, dict(self.headers.items()), raw, body,
                                                      time.monotonic()))
                    status, headers, reply = receiver._replies.popleft() if receiver._replies else (200, {}, b"")
                receiver._open.wait()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        return Handler


class HandshakeCutter(Polled):
    """A TCP listener on 127.0.0.1 that reads each ClientHello and hangs up: TLS fails with an EOF, not a refusal."""

    def __init__(self) -> None:
        self.cut = 0
        self._socket = socket.create_server(("127.0.0.1", 0))
        self._socket.settimeout(0.05)  # to notice the end of the test
        self.port = self._socket.getsockname()[1]
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> HandshakeCutter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()
        self._thread.join()
        self._socket.close()  # the port is free again, for a Receiver to take

    def _serve(self) -> None:
        while not self._stopping.is_set():
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            with connection, contextlib.suppress(OSError):  # a client that hung up first is not news
                connection.settimeout(5.0)
                connection.recv(4096)
            self.cut += 1


def free_port() -> int:
    """A loopback port nothing listens on (for an endpoint that is down, then comes up)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@attrs.frozen
class TestCertificates:
    ca: Path
    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context


def make_certificates(directory: Path) -> TestCertificates:
    """A throwaway CA and a certificate it signed for 127.0.0.1 (with ``cryptography`` if installed, else openssl)."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        return _openssl_certificates(directory)
    return _cryptography_certificates(directory)


def _openssl_certificates(directory: Path) -> TestCertificates:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("the https tests need the openssl command (apt-get install openssl) or cryptography")
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"
                   "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
                   "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        [openssl, "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "1", "-subj", "/CN=tapio test CA",
         "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        [openssl, "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        [openssl, "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "1", "-extfile", ext],
    ):
        subprocess.run([str(part) for part in command], check=True, capture_output=True)
    return TestCertificates(ca, cert, key)


def _cryptography_certificates(directory: Path) -> TestCertificates:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def build(subject, issuer, public_key, signing_key, extensions):
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signing_key, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tapio test CA")])
    ca_cert = build(ca_name, ca_name, ca_key.public_key(), ca_key, [
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                       encipher_only=False, decipher_only=False), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False),
    ])
    server_cert = build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]), ca_name,
                        key.public_key(), ca_key, [
        (x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ])
    paths = TestCertificates(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    paths.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    return paths
