"""One callback attempt ends at its deadline, however slowly its receiver answers.

The receivers here are real servers on 127.0.0.1 (loopback is allowed by the
test settings) that accept the connection and then send their answer, or
their TLS handshake, one byte at a time: each byte comes well within a
socket timeout, which http.client's reads of the status line and headers
start afresh for each, so only a deadline on the whole attempt ends them. The attempt
runs on a thread of the test's, waited on for ten times its deadline: a
build without the hard deadline fails the test then instead of hanging, and
the receiver's teardown lets that thread go.

The https receiver's certificate is signed by a CA made here, which the
client trusts through SSL_CERT_FILE (OpenSSL's own variable, read when the
client builds its TLS context): the certificate is verified as in production.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import socket
import ssl
import threading
import time
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from django.utils import timezone

from inference.models import CallbackStatus, JobCallback
from inference.services.callbacks import job_callback_deliver
from tests.helpers import on_own_connection, pending_callback

# A delivery refuses to run inside a transaction (it makes an HTTP call).
pytestmark = pytest.mark.django_db(transaction=True)

DEADLINE_S = 1.0
BYTE_EVERY_S = 0.3
# The first wait after a failed attempt (the test settings keep the default schedule).
FIRST_RETRY = timedelta(seconds=10)

# An answer that never ends: a status line, then a header line longer than anyone sends
# (http.client reads up to 64 KiB of one): at 0.3 s a byte, hours of it.
HTTP_ANSWER = b"HTTP/1.1 200 OK\r\nX-Trickle: " + b"a" * 60_000
# A TLS record header (handshake, TLS 1.2, 16384 bytes long), then its body: the client
# waits for the whole record before it can tell it is not a ServerHello it can use.
TLS_ANSWER = b"\x16\x03\x03\x40\x00" + b"\x00" * 16_384


UNUSED_KEY_USES = dict.fromkeys(
    ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
     "encipher_only", "decipher_only"),
    False,
)  # fmt: skip


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=ca, crl_sign=ca, **UNUSED_KEY_USES),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture
def tls_server_context(tmp_path, monkeypatch) -> ssl.SSLContext:
    """A server context for 127.0.0.1 whose CA the callback client trusts (only it)."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Gym test CA", ca_key, "Gym test CA", ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate("127.0.0.1", key, "Gym test CA", ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (tmp_path / "ca.pem").write_bytes(ca.public_bytes(pem))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    (tmp_path / "leaf.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "ca.pem"))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "leaf.pem", tmp_path / "leaf.key")
    return context


class TricklingReceiver:
    """Accepts connections on 127.0.0.1 (with `tls`, completes a TLS handshake on each),
    reads what the client sends first, then sends `answer` one byte every BYTE_EVERY_S
    until closed."""

    def __init__(self, answer: bytes, tls: ssl.SSLContext | None = None):
        self.answer = answer
        self.tls = tls
        self.stop = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.connections.append(conn)
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket) -> None:
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
                self.connections.append(conn)
            conn.recv(65536)  # the request, or the TLS ClientHello
            for byte in self.answer:
                if self.stop.wait(BYTE_EVERY_S):
                    return
                conn.sendall(bytes([byte]))
        except OSError:
            return  # the client hung up

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def trickling_receiver():
    made: list[TricklingReceiver] = []

    def _make(answer: bytes, tls: ssl.SSLContext | None = None) -> TricklingReceiver:
        made.append(TricklingReceiver(answer, tls))
        return made[-1]

    yield _make
    for receiver in made:
        receiver.close()


def attempt_to(url: str) -> JobCallback:
    """Make the attempt of a due callback to `url`, with a deadline of DEADLINE_S; assert it
    ended well within ten times that (a generous bound, not a measurement: the receivers
    would go on for hours); return the callback as the attempt left it."""
    callback = pending_callback(name="deadline", url=url)
    now = timezone.now()
    results: list = []
    errors: list = []
    attempt = threading.Thread(
        target=on_own_connection,
        args=(lambda: results.append(job_callback_deliver(callback_id=callback.pk, now=now)),
              errors),
    )  # fmt: skip
    started = time.monotonic()
    attempt.start()
    attempt.join(10 * DEADLINE_S)
    assert not attempt.is_alive(), (
        f"the attempt was still waiting on the receiver after {10 * DEADLINE_S:g} s"
    )
    assert time.monotonic() - started < 10 * DEADLINE_S
    assert errors == []
    assert results[0] is not None  # the attempt was made
    callback.refresh_from_db()
    assert callback.last_attempt_at == now
    return callback


def assert_failed_as_a_timeout(callback: JobCallback) -> None:
    """Recorded as a timeout is, and retried after the first wait."""
    assert (callback.status, callback.attempts) == (CallbackStatus.PENDING, 1)
    assert callback.last_status_code is None
    assert callback.last_error == f"no answer within {DEADLINE_S:g} s"
    assert callback.delivered_at is None
    assert callback.next_attempt_at == callback.last_attempt_at + FIRST_RETRY


@pytest.fixture
def one_second_attempts(settings):
    settings.INFERENCE_CALLBACK_TIMEOUT_SECONDS = DEADLINE_S


def test_a_receiver_that_trickles_its_status_line_is_cut_off_at_the_deadline(
    trickling_receiver, one_second_attempts
):
    # given a receiver that sends its status line and headers a byte every 0.3 s
    receiver = trickling_receiver(HTTP_ANSWER)

    # when a callback's attempt of 1 s is made to it
    callback = attempt_to(f"http://127.0.0.1:{receiver.port}/hooks")

    # then it ended at its deadline, failed as a timeout, and is retried later
    assert_failed_as_a_timeout(callback)


def test_an_https_receiver_that_trickles_its_status_line_is_cut_off_at_the_deadline(
    trickling_receiver, tls_server_context, one_second_attempts
):
    # given a receiver with a certificate the client trusts, which completes the TLS
    # handshake at once and then sends its status line a byte every 0.3 s
    receiver = trickling_receiver(HTTP_ANSWER, tls=tls_server_context)

    # when
    callback = attempt_to(f"https://127.0.0.1:{receiver.port}/hooks")

    # then
    assert_failed_as_a_timeout(callback)


def test_a_receiver_that_trickles_its_tls_handshake_is_cut_off_at_the_deadline(
    trickling_receiver, one_second_attempts
):
    # given a receiver that answers the ClientHello a byte every 0.3 s
    # (CPython's do_handshake already takes the socket timeout as the whole handshake's,
    # so this held before the watchdog as well: it keeps the handshake inside the
    # attempt's deadline whichever of the two ends it)
    receiver = trickling_receiver(TLS_ANSWER)

    # when
    callback = attempt_to(f"https://127.0.0.1:{receiver.port}/hooks")

    # then
    assert_failed_as_a_timeout(callback)
