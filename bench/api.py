"""Latency of the partner API served by gunicorn, next to a view that returns a constant.

`GET /api/v1/credits/balance` is the simplest call a partner makes with an API
key: the key is looked up and checked, its scope too, both rate-limit windows
(the key's and the organization's) are counted in Redis, and the balance and
the lots are read from PostgreSQL. `GET /ping` answers a constant through the
same Django stack (middleware, URL routing) and the same server: the
difference between the two is what authentication, the rate limiter and the
reads cost, and the ping is what the server and the machine cost on their own.

Both run against the production settings under gunicorn, started here on a
free port with its own database and Redis database, at 1 and 32 concurrent
clients, in alternating windows (ping, balance, then balance, ping) so both
see the same drift of a shared machine.

The load generator is one process: asyncio, raw HTTP/1.1 over keep-alive
connections, one connection per client, each sending its next request when
the previous answer is complete (a closed loop). Raw sockets rather than an
HTTP client library: per request it costs tens of microseconds of CPU, so it
takes as little as possible from the server it shares the CPUs with; its own
CPU use is measured and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import math
import multiprocessing
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from bench import ledger
from bench.harness import _TICKS, _busy_ticks, _percentile_ms

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/gymbilling_bench_api"
# A Redis database nothing else uses (the app: 0 and 1, the tests: 14 and 15);
# flushed at the start of each run, so every rate-limit window starts empty.
REDIS_URL = "redis://127.0.0.1:6379/4"
HOST = "127.0.0.1"

CLIENTS = (1, 32)
ENDPOINTS = ("ping", "balance")
PATHS = {"ping": "/ping", "balance": "/api/v1/credits/balance"}

# Two processes for two CPUs: a request is mostly Python on the CPU, so more
# processes would only take turns (2 or 4 workers of 1, 2 or 4 threads
# measured within the noise of a shared machine). Four threads each, so a
# process can use the CPU while one of its requests waits on PostgreSQL or
# Redis. gthread, not sync: the sync worker closes the connection after every
# response, and the clients keep theirs alive.
WORKERS = 2
THREADS = 4
# Persistent database connections, one per gunicorn thread. Set through
# DATABASE_URL (django-environ reads `conn_max_age` from its query string):
# without it, Django opens a PostgreSQL connection, a new backend process,
# for every request.
CONN_MAX_AGE = 600

# High enough that no run reaches them, so no request is refused: the limiter
# still counts every request in Redis, which is the cost being measured.
REQUESTS_PER_MINUTE = 1_000_000_000
MICRO = 1_000_000
# A few lots of different kinds and expiries, as a real wallet has; the
# balance endpoint returns every lot.
LOTS = [
    (500 * MICRO, "subscription", True, 30),
    (200 * MICRO, "pack", True, 365),
    (25 * MICRO, "promotion", False, 14),
]

STARTUP_TIMEOUT_S = 60
STOP_TIMEOUT_S = 10
# How long after its window a client may still be busy before it is
# abandoned; a server that stalls shows as errors, not as a hung benchmark.
GRACE_S = 10


# --- the database and the server ---------------------------------------------------


def database_prepare(url: str) -> None:
    ledger.database_recreate(url)  # refuses a database without "bench" in its name
    # The seeding process never serves a request, but the app's modules read
    # REDIS_URL at import; the bench's own Redis database, never the tests'.
    os.environ["REDIS_URL"] = REDIS_URL
    ledger.django_setup(url)
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def redis_flush() -> None:
    import redis

    redis.Redis.from_url(REDIS_URL).flushdb()


@dataclass(frozen=True)
class Seed:
    api_key: str  # the full key, as a partner sends it
    available: int  # what the balance endpoint must answer
    lots: int


def seed() -> Seed:
    """One organization with credits in a few lots, and a billing:read key, through the services."""
    from django.utils import timezone

    from accounts.models import Organization, Scope
    from accounts.services import apikey_create
    from metering.selectors import organization_balance
    from metering.services import credits_grant

    org = Organization.objects.create(
        slug="bench-api", name="Bench API", requests_per_minute=REQUESTS_PER_MINUTE
    )
    now = timezone.now()
    for i, (amount, source, paid, days) in enumerate(LOTS):
        credits_grant(
            organization=org,
            amount=amount,
            source=source,
            paid=paid,
            resellable=False,
            key=f"bench-api-seed:{i}",
            expires_at=now + timedelta(days=days),
        )
    _, raw = apikey_create(
        organization=org,
        name="bench",
        scopes=[Scope.BILLING_READ],
        requests_per_minute=REQUESTS_PER_MINUTE,
    )
    return Seed(raw, organization_balance(organization=org).available, len(LOTS))


def balance_profile(seed_: Seed) -> list[str]:
    """The SQL statements one steady-state balance request runs, in the seeding process.

    Django's test client, so no server is involved; the second of two
    requests, as the first one also records when the key was last used.
    """
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    client = Client(SERVER_NAME=HOST, HTTP_AUTHORIZATION=f"Bearer {seed_.api_key}")
    client.get(PATHS["balance"])
    with CaptureQueriesContext(connection) as queries:
        response = client.get(PATHS["balance"])
    if response.status_code != 200:
        raise RuntimeError(f"balance answered {response.status_code}: {response.content[:300]!r}")
    return [ledger._classify(q["sql"], -1).describe().replace(" (0 rows)", "") for q in queries]


def _with_query(url: str, **params: Any) -> str:
    parts = urlsplit(url)
    extra = "&".join(f"{k}={v}" for k, v in params.items())
    return urlunsplit(parts._replace(query=f"{parts.query}&{extra}" if parts.query else extra))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class ServerConfig:
    workers: int
    threads: int
    conn_max_age: int
    reuse_port: bool = True

    @property
    def args(self) -> list[str]:
        return [
            "--worker-class",
            "gthread",
            "--workers",
            str(self.workers),
            "--threads",
            str(self.threads),
            # Longer than a client ever waits between two requests.
            "--keep-alive",
            "5",
            "--graceful-timeout",
            "5",
            # The default control socket is one path per user
            # (~/.gunicorn/gunicorn.ctl), which another gunicorn may hold.
            "--no-control-socket",
            # A listening socket per worker, the kernel spreading connections
            # over them. With the one shared socket, whichever worker wakes
            # first accepts: 29 of 32 keep-alive connections on one worker
            # was seen, leaving one CPU to the whole load.
            *(["--reuse-port"] if self.reuse_port else []),
        ]


class Server:
    """gunicorn serving the app, from start until stop (SIGTERM, then SIGKILL)."""

    def __init__(self, url: str, config: ServerConfig) -> None:
        self.port = _free_port()
        self.config = config
        self.command = [
            str(Path(sys.executable).parent / "gunicorn"),
            "gymbilling.wsgi:application",
            "--bind",
            f"{HOST}:{self.port}",
            *config.args,
        ]
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "gymbilling.settings.production",
            "DJANGO_SECRET_KEY": secrets.token_urlsafe(32),
            "DJANGO_ALLOWED_HOSTS": HOST,
            "SITE_URL": "http://127.0.0.1",
            "EMAIL_URL": "consolemail://",
            "DJANGO_SECURE_COOKIES": "false",
            # The clients speak plain HTTP to 127.0.0.1, with no TLS terminator between.
            "DJANGO_SECURE_SSL_REDIRECT": "false",
            "DATABASE_URL": _with_query(url, conn_max_age=config.conn_max_age),
            "REDIS_URL": REDIS_URL,
        }
        self.env.pop("DJANGO_DEBUG", None)
        # Its output, shown when it fails; closed by stop().
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        # Its own session, so stopping it can reach every worker by the group.
        self.proc = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.output()}")
            try:
                conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
                conn.request("GET", "/healthz")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
                conn.close()
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gunicorn did not answer /healthz:\n{self.output()}")
            time.sleep(0.1)

    def pids(self) -> set[int]:
        """The master and its workers."""
        if self.proc is None:
            return set()
        found = {self.proc.pid}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                except OSError:
                    continue
                # The parent pid is the 2nd field after the parenthesised name.
                if int(stat.rsplit(")", 1)[1].split()[1]) == self.proc.pid:
                    found.add(int(entry.name))
        return found

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            # Workers left behind by a master that was killed: its session's
            # process group holds them, and nothing else.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


# --- CPU accounting ------------------------------------------------------------------


def _runtime_ns(pid: int) -> int | None:
    """CPU time of every thread of a process (gunicorn's gthread workers are threaded).

    None when the process is gone.
    """
    total = 0
    try:
        for task in os.scandir(f"/proc/{pid}/task"):
            try:
                total += int(Path(f"{task.path}/schedstat").read_text().split()[0])
            except OSError:
                continue  # a thread that exited meanwhile
    except OSError:
        return None
    return total


def _redis_pids() -> set[int]:
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(f"/proc/{entry.name}/cmdline").read_bytes().startswith(b"redis-server"):
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def _backend_pids(dbname: str) -> set[int]:
    marker = f" {dbname} ".encode()
    found = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if marker in Path(f"/proc/{entry.name}/cmdline").read_bytes():
                    found.add(int(entry.name))
            except OSError:
                continue
    return found


def connections_per_worker(port: int, workers: set[int]) -> tuple[int, ...]:
    """Established connections each gunicorn worker holds on `port`, most first.

    A keep-alive connection stays with the worker that accepted it, so this
    is how the clients' load is shared between the processes. Empty when
    `ss` (iproute2) is not installed.
    """
    try:
        out = subprocess.run(
            ["ss", "-tnpH", "state", "established", f"( sport = :{port} )"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return ()
    counts = dict.fromkeys(workers, 0)
    for pid in re.findall(r"pid=(\d+)", out):
        if int(pid) in counts:
            counts[int(pid)] += 1
    return tuple(sorted(counts.values(), reverse=True))


@dataclass(frozen=True)
class _Sample:
    at: float
    busy: int
    used: dict[str, dict[int, int]]  # role -> pid -> CPU ns


def _sample(pids: dict[str, set[int]]) -> _Sample:
    return _Sample(
        time.perf_counter(),
        _busy_ticks(),
        {
            role: {pid: ns for pid in found if (ns := _runtime_ns(pid)) is not None}
            for role, found in pids.items()
        },
    )


def _cpus(first: _Sample, last: _Sample) -> dict[str, float]:
    """CPUs' worth used between two samples, per role, and by everything else."""
    seconds = last.at - first.at
    result = {}
    for role, used in last.used.items():
        # Per process, and only those alive at the end; one that started
        # meanwhile counts from zero.
        ns = sum(now - first.used.get(role, {}).get(pid, 0) for pid, now in used.items())
        result[role] = ns / 1e9 / seconds
    busy = (last.busy - first.busy) / _TICKS / seconds
    result["other"] = max(0.0, busy - sum(result.values()))
    return result


# --- the client ------------------------------------------------------------------------


class BadResponse(Exception):
    pass


def _check_ping(status: int, head: bytes, body: bytes, expect: Seed) -> None:
    if status != 200 or body != b"pong":
        raise BadResponse(f"/ping answered {status}: {body[:200]!r}")


def _check_balance(status: int, head: bytes, body: bytes, expect: Seed) -> None:
    if status != 200:
        raise BadResponse(f"balance answered {status}: {body[:300]!r}")
    # Proof that the rate limiter ran for this very request.
    if b"\r\nx-ratelimit-remaining-requests:" not in head.lower():
        raise BadResponse("balance answered without x-ratelimit-remaining-requests")
    data = json.loads(body)
    if data["available"] != expect.available or len(data["lots"]) != expect.lots:
        raise BadResponse(f"balance answered {body[:300]!r}, expected {expect}")


CHECKS = {"ping": _check_ping, "balance": _check_balance}


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bytes, bool]:
    """(status, head, body, server closes) of one HTTP/1.1 response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = None
    chunked = close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    if chunked:
        parts = []
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append((await reader.readexactly(size + 2))[:-2])
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass  # trailers
        body = b"".join(parts)
    elif length is not None:
        body = await reader.readexactly(length)
    else:
        body = await reader.read()  # until the server closes
        close = True
    return status, head, body, close


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)
    responses: int = 0
    errors: int = 0
    first_error: str = ""
    connects: int = 0

    def error(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message


async def _connection(
    port: int,
    request: bytes,
    check: Callable[..., None],
    expect: Seed,
    window: tuple[float, float],
    tally: _Tally,
) -> None:
    measure_from, stop_at = window
    reader = writer = None
    try:
        while time.perf_counter() < stop_at:
            if writer is None:
                try:
                    reader, writer = await asyncio.open_connection(HOST, port)
                except OSError as exc:
                    tally.error(f"connect: {exc!r}")
                    await asyncio.sleep(0.1)
                    continue
                tally.connects += 1
            started = time.perf_counter()
            try:
                writer.write(request)
                status, head, body, close = await _read_response(reader)
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                ValueError,  # not HTTP: a status line or length that does not parse
            ) as exc:
                # The connection's state is unknown after this: start a new one.
                tally.error(f"{type(exc).__name__}: {exc}")
                writer.close()
                writer = None
                continue
            ended = time.perf_counter()
            tally.responses += 1
            try:
                check(status, head, body, expect)
            except (BadResponse, ValueError, KeyError, TypeError) as exc:
                # Counted whenever it happens, warm-up included; its latency
                # is not: the figures are of requests that were served.
                tally.error(str(exc))
            else:
                if started >= measure_from and ended <= stop_at:
                    tally.latencies.append(ended - started)
            if close:
                writer.close()
                writer = None
    finally:
        if writer is not None:
            writer.close()


async def _load(
    port: int, endpoint: str, clients: int, expect: Seed, warmup_s: float, duration_s: float, report
) -> _Tally:
    auth = f"Authorization: Bearer {expect.api_key}\r\n" if endpoint == "balance" else ""
    request = (
        f"GET {PATHS[endpoint]} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Accept: application/json\r\n{auth}\r\n"
    ).encode()
    measure_from = time.perf_counter() + warmup_s
    stop_at = measure_from + duration_s
    report((measure_from, stop_at))
    tally = _Tally()
    tasks = [
        asyncio.create_task(
            _connection(port, request, CHECKS[endpoint], expect, (measure_from, stop_at), tally)
        )
        for _ in range(clients)
    ]
    done, pending = await asyncio.wait(tasks, timeout=warmup_s + duration_s + GRACE_S)
    for task in pending:
        task.cancel()
        tally.error("a request was still unanswered long after the window closed")
    for task in done:
        if task.exception() is not None:
            exc = task.exception()
            tally.error("".join(traceback.format_exception(exc, limit=3)))
    return tally


def _client(port, endpoint, clients, expect, warmup_s, duration_s, results, sampled) -> None:
    try:
        tally = asyncio.run(
            _load(
                port,
                endpoint,
                clients,
                expect,
                warmup_s,
                duration_s,
                lambda window: results.put(("window", window)),
            )
        )
        results.put(("done", tally))
        # Alive until the parent's last CPU sample, which would miss the
        # time of a process already gone.
        sampled.wait(GRACE_S)
    except BaseException:
        results.put(("failed", traceback.format_exc()))


@dataclass(frozen=True)
class Measurement:
    endpoint: str
    clients: int
    duration_s: float
    latencies: list[float] = field(repr=False)
    responses: int  # warm-up included
    errors: int
    first_error: str
    connects: int
    cpus: dict[str, float]  # CPUs' worth per role over the measured windows
    # Per window, the connections each worker held (connections_per_worker).
    spread: list[tuple[int, ...]] = field(default_factory=list)

    @property
    def completed(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.completed / self.duration_s

    @property
    def p50_ms(self) -> float:
        return _percentile_ms(self.latencies, 50)

    @property
    def p99_ms(self) -> float:
        return _percentile_ms(self.latencies, 99)

    def cpu_ms(self, *roles: str) -> float:
        """CPU time the roles spent per request served in the measured windows."""
        if not self.latencies:
            return float("nan")
        return sum(self.cpus[r] for r in roles) * self.duration_s * 1000 / self.completed


def run_window(
    server: Server,
    endpoint: str,
    clients: int,
    expect: Seed,
    *,
    warmup_s: float,
    duration_s: float,
    dbname: str,
) -> Measurement:
    """One window: a client process drives the server while this one samples the CPUs.

    The client is a process of its own so the sampling, which reads /proc,
    never delays its event loop.
    """
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    sampled = ctx.Event()
    proc = ctx.Process(
        target=_client,
        args=(server.port, endpoint, clients, expect, warmup_s, duration_s, results, sampled),
        daemon=True,
    )
    proc.start()
    try:
        kind, value = results.get(timeout=30)
        if kind != "window":
            raise RuntimeError(f"the load generator failed to start:\n{value}")
        measure_from, stop_at = value
        time.sleep(max(0.0, measure_from - time.perf_counter()))
        pids = {
            "client": {proc.pid},
            "gunicorn": server.pids(),
            # Persistent connections: the backends serving the workers'
            # threads exist once the warm-up has run.
            "postgres": _backend_pids(dbname),
            "redis": _redis_pids(),
        }
        first = _sample(pids)
        # While every connection is open; `ss` takes a few milliseconds of
        # CPU, which count as other work.
        spread = connections_per_worker(server.port, pids["gunicorn"] - {server.proc.pid})
        time.sleep(max(0.0, stop_at - time.perf_counter()))
        # A thread's first request of the window may have opened a backend.
        pids["postgres"] |= _backend_pids(dbname)
        last = _sample(pids)
        sampled.set()
        kind, value = results.get(timeout=GRACE_S + 10)
        if kind != "done":
            raise RuntimeError(f"the load generator failed:\n{value}")
        tally: _Tally = value
    finally:
        sampled.set()
        proc.join(5)
        if proc.is_alive():
            proc.kill()
    return Measurement(
        endpoint=endpoint,
        clients=clients,
        duration_s=last.at - first.at,
        latencies=tally.latencies,
        responses=tally.responses,
        errors=tally.errors,
        first_error=tally.first_error,
        connects=tally.connects,
        cpus=_cpus(first, last),
        spread=[spread],
    )


def combine(parts: list[Measurement]) -> Measurement:
    total = sum(p.duration_s for p in parts)
    return Measurement(
        endpoint=parts[0].endpoint,
        clients=parts[0].clients,
        duration_s=total,
        latencies=[lat for p in parts for lat in p.latencies],
        responses=sum(p.responses for p in parts),
        errors=sum(p.errors for p in parts),
        first_error=next((p.first_error for p in parts if p.first_error), ""),
        connects=sum(p.connects for p in parts),
        cpus={
            role: sum(p.cpus[role] * p.duration_s for p in parts) / total for role in parts[0].cpus
        },
        spread=[s for p in parts for s in p.spread],
    )


# --- the run --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    seed: Seed
    server: ServerConfig
    command: list[str]
    statements: list[str]
    rows: list[Measurement]  # per clients, ping then balance
    windows: int
    timings: dict[str, float]


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _measure_all(
    server: Server,
    seed_: Seed,
    warmup_s: float,
    duration_s: float,
    rounds: int,
    dbname: str,
    log: Callable[[str], None],
) -> list[Measurement]:
    rows: list[Measurement] = []
    order = list(ENDPOINTS)
    for clients in CLIENTS:
        parts: dict[str, list[Measurement]] = {name: [] for name in ENDPOINTS}
        for round_ in range(rounds):
            for endpoint in order if round_ % 2 == 0 else reversed(order):
                parts[endpoint].append(
                    run_window(
                        server,
                        endpoint,
                        clients,
                        seed_,
                        warmup_s=warmup_s,
                        duration_s=duration_s / rounds,
                        dbname=dbname,
                    )
                )
        for endpoint in ENDPOINTS:
            m = combine(parts[endpoint])
            rows.append(m)
            log(
                f"{endpoint:>7} x{clients:<2}: {m.rate:7.1f}/s p50 {m.p50_ms:6.2f} ms "
                f"p99 {m.p99_ms:6.2f} ms, errors {m.errors}, connections {m.connects}, "
                f"CPU ms/request server {m.cpu_ms('gunicorn', 'postgres', 'redis'):.2f} "
                f"client {m.cpu_ms('client'):.2f}, other CPUs {m.cpus['other']:.2f}, "
                f"connections per worker {_spread(m)}"
            )
            if m.first_error:
                log(f"first error:\n{m.first_error}")
    return rows


def measure(
    url: str,
    *,
    warmup_s: float,
    duration_s: float,
    rounds: int,
    config: ServerConfig,
    log: Callable[[str], None],
) -> Result:
    timings = {"load_before": os.getloadavg()[0]}
    started = time.perf_counter()
    dbname = urlsplit(url).path.lstrip("/")
    database_prepare(url)
    redis_flush()
    seed_ = seed()
    statements = balance_profile(seed_)
    redis_flush()  # the profile's requests counted too
    from django.db import connections

    # Nothing of this process may hold a connection the clients' fork inherits.
    connections.close_all()
    timings["setup"] = time.perf_counter() - started
    log(
        f"database {dbname} migrated and seeded in {timings['setup']:.1f} s; one balance "
        f"request runs {len(statements)} SQL statements"
    )

    # SIGTERM (as from `timeout`) must stop the server too: as an exception,
    # it unwinds through the `with` below.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        started = time.perf_counter()
        with Server(url, config) as server:
            log(
                f"gunicorn up on port {server.port} in {time.perf_counter() - started:.1f} s "
                f"({config.workers} workers x {config.threads} threads)"
            )
            rows = _measure_all(server, seed_, warmup_s, duration_s, rounds, dbname, log)
            if server.proc is not None and server.proc.poll() is not None:
                raise RuntimeError(f"gunicorn died during the run:\n{server.output()}")
            command = server.command
    finally:
        signal.signal(signal.SIGTERM, previous)
    timings["load_after"] = os.getloadavg()[0]
    return Result(
        seed=seed_,
        server=config,
        command=command,
        statements=statements,
        rows=rows,
        windows=rounds,
        timings=timings,
    )


# --- the report ---------------------------------------------------------------------------


def _fmt(value: float, digits: int = 1) -> str:
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def _spread(m: Measurement) -> str:
    """Connections per worker, window by window: "16 + 16, 17 + 15"."""
    return ", ".join(" + ".join(map(str, window)) for window in m.spread if window) or "unknown"


def _label(endpoint: str) -> str:
    return f"`GET {PATHS[endpoint]}`"


def table(rows: list[Measurement]) -> str:
    lines = [
        "| endpoint | clients | requests/s | p50 ms | p99 ms | errors "
        "| server CPU ms per request: gunicorn + PostgreSQL + Redis | client CPU ms per request "
        "| other CPU load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m in rows:
        server = " + ".join(_fmt(m.cpu_ms(role), 2) for role in ("gunicorn", "postgres", "redis"))
        lines.append(
            f"| {_label(m.endpoint)} | {m.clients} | {_fmt(m.rate)} | {_fmt(m.p50_ms, 2)} "
            f"| {_fmt(m.p99_ms, 2)} | {m.errors} | {server} | {_fmt(m.cpu_ms('client'), 3)} "
            f"| {m.cpus['other']:.2f} |"
        )
    return "\n".join(lines)


def added_table(rows: list[Measurement]) -> str:
    by = {(m.endpoint, m.clients): m for m in rows}
    lines = [
        "| clients | p50 ms added | p99 ms added | server CPU ms added per request |",
        "| ---: | ---: | ---: | ---: |",
    ]
    roles = ("gunicorn", "postgres", "redis")
    for clients in CLIENTS:
        ping, balance = by[("ping", clients)], by[("balance", clients)]
        lines.append(
            f"| {clients} | {_fmt(balance.p50_ms - ping.p50_ms, 2)} "
            f"| {_fmt(balance.p99_ms - ping.p99_ms, 2)} "
            f"| {_fmt(balance.cpu_ms(*roles) - ping.cpu_ms(*roles), 2)} |"
        )
    return "\n".join(lines)


def markdown(
    *,
    result: Result,
    machine_rows: list[tuple[str, str]],
    date: str,
    warmup_s: float,
    duration_s: float,
) -> str:
    cfg = result.server
    served = " ".join(["gunicorn", *result.command[1:2], "--bind 127.0.0.1:PORT", *cfg.args])
    errors = sum(m.errors for m in result.rows)
    responses = sum(m.responses for m in result.rows)
    reconnected = [m for m in result.rows if m.connects != m.clients * result.windows]
    kept_alive = (
        "every connection stayed open for its whole window (one per client and window)"
        if not reconnected
        else "**not all kept alive**: "
        + ", ".join(
            f"{m.endpoint} x{m.clients} opened {m.connects} for "
            f"{m.clients * result.windows} clients x windows"
            for m in reconnected
        )
    )
    out = [
        "## Partner API latency",
        "",
        "`GET /api/v1/credits/balance` with an API key (`Authorization: Bearer`, scope "
        "`billing:read`): authentication (the key looked up by its public id, its SHA-256 "
        "compared), the scope checked, the key's and the organization's request windows "
        "counted in Redis (one Lua script; the limits are set far above what the run sends, "
        "so nothing is refused but every request is counted), then the balance and the lots "
        "read. Next to it `GET /ping`, a Django view that returns a constant through the "
        "same middleware and server: the difference is what the API itself costs.",
        "",
        f"- Command: `make bench` (`bench/run.py`, section `api`); date: {date}.",
        "- Machine (gunicorn, PostgreSQL, Redis and the load generator all share its CPUs):",
        *(f"  - {name}: {value}" for name, value in machine_rows),
        f"  - 1-minute load average: {result.timings['load_before']:.2f} before the run, "
        f"{result.timings['load_after']:.2f} after it (anything else running lowers every "
        "figure)",
        f"- Server: `{served}`, with `DJANGO_SETTINGS_MODULE=gymbilling.settings.production`, "
        f"`DATABASE_URL` ending in `?conn_max_age={cfg.conn_max_age}` (persistent database "
        "connections, one per thread; without it Django opens a new PostgreSQL connection for "
        "every request) and a Redis database of its own (flushed at the start). "
        f"{cfg.workers} worker processes for {len(os.sched_getaffinity(0))} CPUs: a balance "
        "request is mostly Python on the CPU (compare its server CPU per request with its "
        "latency at 1 client below), so more processes than CPUs would only take turns; "
        f"{cfg.threads} threads each, so a process can still use the CPU while one of its "
        "requests waits on PostgreSQL or Redis; the gthread worker, because the sync worker "
        "closes the connection after every response and these clients keep theirs alive. "
        "Runs of this benchmark with 2 or 4 workers of 1, 2 or 4 threads differed by less "
        "than the run-to-run noise of this shared machine, so the shape rests on that "
        "reasoning, not on a measured optimum. "
        + (
            "`--reuse-port` gives each worker a listening socket of its own, so the kernel "
            "spreads the connections over the workers; with one shared socket, whichever "
            "worker wakes first accepts, and a keep-alive connection stays where it was "
            "accepted (29 of 32 connections on one worker was seen). "
            if cfg.reuse_port
            else "Without `--reuse-port`: all workers accept from one shared socket. "
        )
        + "`bench/run.py --only api --workers N "
        "--threads N` measures another shape, `--conn-max-age 0` the default of one database "
        "connection per request.",
        "- Own database `gymbilling_bench_api`, dropped, migrated and seeded through the real "
        f"services at the start of each run: one organization with {result.seed.lots} lots "
        "(`credits_grant`) and one API key (`apikey_create`).",
        "- Client: one process, asyncio with raw HTTP/1.1 over keep-alive TCP connections (no "
        "HTTP library: it keeps the load generator's own CPU use small), one connection per "
        "concurrent client, each sending its next request as soon as the previous response "
        "is complete (a closed loop). Latency: from writing the request to having read the "
        "whole response, as the client sees it. Every response is checked: status 200, and "
        "for `/ping` the body `pong`; for the balance, an `x-ratelimit-remaining-requests` "
        f"header and `available` = {result.seed.available:,} micro-credits with "
        f"{result.seed.lots} lots in the JSON body. Errors: responses that failed a check and "
        "requests that failed, warm-ups included.",
        f"- Each number of clients: ping and balance in {result.windows} alternating windows "
        "(ping, balance, then balance, ping), each a "
        f"{warmup_s:g} s warm-up then {duration_s / result.windows:g} s measured: "
        f"{duration_s:g} s measured per endpoint in all. A request counts when it starts and "
        "ends inside a measured window. At 32 clients the server is saturated, and a closed "
        "loop's mean latency is then clients ÷ requests/s: mostly time spent queued in "
        "gunicorn, so that p50 tells the capacity more than the cost of one request.",
        "- CPU ms per request: CPU time (the scheduler's runtime, from /proc) that the "
        "gunicorn processes, the PostgreSQL backends of the bench database, and Redis (the "
        "machine's one server, so anything else using it is included), then the load "
        "generator, spent per request served in the measured windows. Other CPU load: the "
        "CPUs' worth of time used meanwhile by everything else "
        f"({len(os.sched_getaffinity(0))} means the machine was fully taken by other work).",
        "",
        f"One balance request runs {len(result.statements)} SQL statements (counted with "
        "Django's test client, the second request of a key; the first also records when the "
        "key was last used, at most once a minute), and one Redis `EVAL` of the rate-limit script:",
        "",
        *(f"{i}. `{s}`" for i, s in enumerate(result.statements, 1)),
        "",
        "### Results",
        "",
        table(result.rows),
        "",
        "### What the balance endpoint adds to `/ping`",
        "",
        added_table(result.rows),
        "",
        f"Requests answered during the run, warm-ups included: {responses:,}; errors: "
        f"{errors}. Keep-alive: {kept_alive}. Connections each gunicorn worker held, "
        "window by window: "
        + "; ".join(
            f"{m.endpoint} x{m.clients}: {_spread(m)}" for m in result.rows if m.clients > 1
        )
        + ".",
    ]
    return "\n".join(out) + "\n"
