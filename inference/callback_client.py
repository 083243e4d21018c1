"""The client of customers' webhook receivers: which URLs we accept, and one POST to one.

A callback URL is chosen by the customer and called from inside our network,
so it is a server-side request forgery risk. Three lines of defence:

1. At submit, `callback_url_validate` refuses anything but an https URL of a
   public host name or public IP literal: no credentials in the URL, no
   private, loopback, link-local, site-local, shared or reserved addresses,
   however they are spelled (`127.1`, `0x7f000001`, `[::ffff:10.0.0.1]`, `[64:ff9b::a00:1]`).
2. At delivery, the host name is resolved and every address must be public
   too (a public name may point inside), and the connection goes to the
   address that was checked, not to a second lookup that DNS rebinding could
   answer differently. TLS still verifies the certificate for the host name.
3. Redirects are never followed (a 3xx is a failed attempt, as at Stripe),
   the whole attempt has a deadline, and at most a little of the answer is read.
   The deadline is a hard one (`_Watchdog`): a receiver that trickles its TLS
   handshake, status line or headers a byte at a time is cut off at it, so no
   receiver can hold a worker's thread longer than the attempt's timeout.

Loopback (127.0.0.0/8, ::1, `localhost`), over http or https, is allowed only
when settings.DEBUG or INFERENCE_CALLBACK_ALLOW_HTTP_LOOPBACK is on: for
development and the tests' local receivers.
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

from django.conf import settings

from accounts.errors import ApplicationError

logger = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
# Enough for a status line and headers; the body of the answer is ignored.
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "GymBilling-Webhooks/1.0"

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def loopback_allowed() -> bool:
    return bool(settings.DEBUG or settings.INFERENCE_CALLBACK_ALLOW_HTTP_LOOPBACK)


def address_allowed(address: IPAddress) -> bool:
    """A public address; loopback too when loopback_allowed()."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return loopback_allowed()
    # Not reserved either: Python counts IPv6 addresses that embed an IPv4 one
    # as global (NAT64's 64:ff9b::/96, SIIT's ::ffff:0:0:0/96, the old
    # IPv4-compatible ::/96, all in the reserved ::/8), and a NAT64 gateway or
    # translator sends them on to that IPv4 address, a private one included.
    # Public unicast (2000::/3) is never reserved. Nor site-local: fec0::/10
    # was deprecated (RFC 3879) but networks that still route it route it
    # inside, and Python (3.11 here) counts it global and not reserved.
    return (
        address.is_global
        and not address.is_multicast
        and not address.is_reserved
        and not (isinstance(address, ipaddress.IPv6Address) and address.is_site_local)
    )


def _ip_literal(host: str) -> IPAddress | None:
    """The address a host names literally, in any spelling a resolver would accept."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    # inet_aton's legacy forms (127.1, 0x7f.1, 2130706433, 0177.0.0.1) are what
    # getaddrinfo, and so the HTTP client, would connect to.
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _refuse(message: str) -> ApplicationError:
    return ApplicationError(
        code="invalid_callback_url", message=message, param="callback_url", refuses_input=True
    )


def callback_url_validate(url: str) -> str:
    """`url` if we may POST a job's webhook to it; else 400 `invalid_callback_url`."""
    if len(url) > MAX_URL_LENGTH:
        raise _refuse(f"callback_url may be at most {MAX_URL_LENGTH} characters.")
    if not url.isascii() or not url.isprintable() or any(c.isspace() for c in url):
        raise _refuse(
            "callback_url must be ASCII without spaces or control characters "
            "(percent-encode the rest, and write host names in punycode)."
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _refuse("callback_url is not a valid URL.") from None
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise _refuse("callback_url must be an absolute https:// URL.")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise _refuse(
            "callback_url must not carry credentials; verify our Gym-Signature header instead."
        )
    if parts.fragment or url.endswith("#"):
        raise _refuse("callback_url must not have a #fragment.")
    if port == 0:
        raise _refuse("callback_url has an invalid port.")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _refuse("callback_url has no host.")
    address = _ip_literal(host)
    loopback = host == "localhost" or (address is not None and address.is_loopback)
    if loopback:
        if not loopback_allowed():
            raise _refuse("callback_url must be a public address, not loopback.")
    elif parts.scheme != "https":
        raise _refuse("callback_url must use https.")
    elif address is not None:
        if not address_allowed(address):
            raise _refuse(
                f"callback_url must be a public address; {address} is private, "
                "link-local, site-local or reserved."
            )
    else:
        labels = host.split(".")
        if (
            len(labels) < 2
            or not all(_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()
            or host.endswith(".localhost")
        ):
            raise _refuse("callback_url must name a public host (a fully qualified domain name).")
    return url


# --- delivery ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What one attempt got: a status code, or the error that kept it from one."""

    status_code: int | None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class _Watchdog:
    """Cuts the attempt's connection at its deadline, whatever the attempt is waiting on.

    A socket's timeout bounds each read, not their sum: a receiver that sends
    its status line and headers a byte every few seconds starts it afresh with
    every byte (http.client reads them with no deadline of its own), and would
    hold the worker's thread for as long as it likes; the sweep queues the next
    attempt when the lease ends, which it holds too. (The TLS handshake takes
    the timeout as its whole, but from its own start, not the attempt's.) The
    callback tasks share their workers, so a few such receivers would stop
    every tenant's callbacks. At the deadline this shuts the socket down both
    ways: whatever read or write waits on it returns at once, and the attempt
    fails as a timeout (`expired`).

    One timer thread per attempt, as `_resolve`'s lookup: a shared one would be
    one more thing a slow receiver could hold up.
    """

    def __init__(self, deadline: float):
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.expired = False
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self._expire)
        self._timer.name = "callback-deadline"
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        """Cut `sock` at the deadline (at once if it has passed): the attempt's socket now."""
        with self._lock:
            self._sock = sock
            if self.expired:
                self._cut(sock)

    def stop(self) -> None:
        """The attempt is over: cut nothing. Before the socket is closed, so that the
        timer never shuts down a descriptor the process has since given to another."""
        self._timer.cancel()
        with self._lock:
            self._sock = None

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            if self._sock is not None:
                self._cut(self._sock)

    @staticmethod
    def _cut(sock: socket.socket) -> None:
        # Not connected yet, or already closed (a closed socket has no descriptor): nothing
        # to cut. The plain socket's shutdown, on an SSLSocket too: SSLSocket.shutdown
        # would also drop its TLS state under the thread that is using it.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the address that was vetted, whatever DNS says a moment later."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float, watchdog: _Watchdog):
        super().__init__(host, port, timeout=timeout)
        self._address = address
        self._watchdog = watchdog

    def connect(self) -> None:
        # The connect itself is one wait, which the timeout bounds.
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self._watchdog.watch(self.sock)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    default_port = 443

    def connect(self) -> None:
        super().connect()
        context = ssl.create_default_context()
        # The certificate is checked against the host name the customer gave.
        # The handshake waits until the watchdog watches the TLS socket: the
        # plain one gives its descriptor up to it, and cutting that would not
        # end a handshake still under way at the attempt's deadline.
        self.sock = context.wrap_socket(
            self.sock, server_hostname=self.host, do_handshake_on_connect=False
        )
        self._watchdog.watch(self.sock)
        self.sock.do_handshake()


class ResolveTimeout(OSError):
    """The host name did not resolve before the attempt's deadline."""


def _resolve(host: str, port: int, deadline: float) -> list:
    """getaddrinfo, waited on only until `deadline`.

    getaddrinfo has no timeout of its own (the system resolver's is 5 s per
    server and try), so it runs on a thread of its own, which is dropped if
    it is too slow and ends by itself when the resolver gives up. Not a
    shared pool: a customer's names that never resolve would fill it, and
    every other customer's lookups would wait in its queue and fail.
    """
    done: list = []

    def lookup() -> None:
        try:
            done.append(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
        except OSError as exc:
            done.append(exc)

    thread = threading.Thread(target=lookup, name="callback-dns", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not done:
        raise ResolveTimeout(f"{host} did not resolve in time")
    if isinstance(done[0], OSError):
        raise done[0]
    return done[0]


def _vetted_address(host: str, port: int, deadline: float) -> str:
    """The first address of `host`, provided every one it resolves to is allowed."""
    literal = _ip_literal(host)
    if literal is not None:
        candidates = [literal]
    else:
        infos = _resolve(host, port, deadline)
        candidates = [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]
    if not candidates:
        raise OSError(f"{host} has no address")
    for address in candidates:
        if not address_allowed(address):
            raise PermissionError(f"{host} resolves to {address}, which is not a public address")
    return str(candidates[0])


def _drain(response: http.client.HTTPResponse, sock: socket.socket, deadline: float) -> None:
    """Read a little of the answer's body, within the deadline; only its status counts."""
    read = 0
    try:
        while read < MAX_RESPONSE_BYTES and not response.isclosed():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or sock.fileno() == -1:
                return  # a receiver trickling its body is cut off
            sock.settimeout(remaining)
            chunk = response.read(min(8192, MAX_RESPONSE_BYTES - read))
            if not chunk:
                return
            read += len(chunk)
    except (OSError, http.client.HTTPException):
        return


def callback_post(*, url: str, body: bytes, headers: dict[str, str], timeout: float) -> Answer:
    """POST `body` to `url` once, within `timeout` seconds in all. Never raises."""
    deadline = time.monotonic() + timeout
    connection = None
    watchdog = None
    timed_out = Answer(status_code=None, error=f"no answer within {timeout:g} s")
    try:
        callback_url_validate(url)  # the rules may have tightened since the job was submitted
        parts = urlsplit(url)
        host = (parts.hostname or "").rstrip(".")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        address = _vetted_address(host, port, deadline)
        cls = _PinnedHTTPSConnection if parts.scheme == "https" else _PinnedHTTPConnection
        watchdog = _Watchdog(deadline)
        # What is left of the deadline once the name is resolved: each wait's bound;
        # the watchdog bounds their sum.
        connection = cls(
            host,
            port,
            address=address,
            timeout=max(0.001, deadline - time.monotonic()),
            watchdog=watchdog,
        )
        path = parts.path or "/"
        if parts.query:
            path += "?" + parts.query
        connection.request(
            "POST",
            path,
            body=body,
            headers={
                "Content-Type": "application/json",
                "User-Agent": USER_AGENT,
                "Content-Length": str(len(body)),
                **headers,
            },
        )
        # Kept: the connection lets go of its socket once the answer says it will close.
        sock = connection.sock
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        response = connection.getresponse()
        _drain(response, sock, deadline)
        return Answer(status_code=response.status)
    except ApplicationError as exc:
        return Answer(status_code=None, error=f"refused: {exc.message}")
    except PermissionError as exc:
        return Answer(status_code=None, error=f"refused: {exc}")
    except ResolveTimeout as exc:
        return Answer(status_code=None, error=f"{exc} (within {timeout:g} s)")
    except TimeoutError:
        return timed_out
    except (OSError, http.client.HTTPException) as exc:
        if watchdog is not None and watchdog.expired:
            return timed_out  # cut at the deadline: what the cut broke is no error of its own
        return Answer(status_code=None, error=f"{type(exc).__name__}: {exc}"[:500])
    except Exception as exc:  # a bug here must not leave the callback claimed until its lease ends
        if watchdog is not None and watchdog.expired:
            return timed_out
        logger.exception("callback POST to %s failed unexpectedly", url)
        return Answer(status_code=None, error=f"internal error: {type(exc).__name__}"[:500])
    finally:
        if watchdog is not None:
            watchdog.stop()
        if connection is not None:
            connection.close()
