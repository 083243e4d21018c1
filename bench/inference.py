"""What the gateway adds to an inference: POST /v1/chat/completions next to Triton and Celery.

One run, on its own database and Redis database, with a development Triton
server (`TritonDevServer`), a real Celery worker subprocess and gunicorn:

1. the floor: the round trip of a cheap Celery task answered through Redis
   (`accounts.tasks.idempotency_purge_task`, one DELETE on an empty table);
2. direct Triton: `inference.triton.pool_for([grpc]).generate(...)`;
3. the whole path: POST /v1/chat/completions through gunicorn, the API
   submitting a job (hold, rate limits), the worker calling Triton and
   settling it, the answer relayed back through Redis;
4. streaming: time to the first content chunk of the same request.

Every response is checked (200 and `usage`), and at the end every request
must be billed: one UsageRecord per successful request, as many output tokens
billed as the clients were told, and the ledger reconciles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from bench import api
from bench.harness import _percentile_ms

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/gymbilling_bench_inf"
# A Redis database nothing else uses (the app: 0 and 1, the API bench: 4, the
# tests: 14 and 15); broker, results, rate limits and the relay all in it,
# flushed at the start of each run.
REDIS_URL = "redis://127.0.0.1:6379/8"
HOST = api.HOST
MODEL = "gym-tiny"
MAX_TOKENS = 16
MESSAGES = [{"role": "user", "content": "Write one sentence about a gym."}]
QUEUES = "celery,inference.priority,inference.standard,inference.batch"
FLOOR_TASK = "accounts.tasks.idempotency_purge_task"

CALLS = 200  # floor and direct Triton, each
WARMUP_CALLS = 20
CLIENTS = (1, 16, 64)
STARTUP_TIMEOUT_S = 60
MICRO = 1_000_000
BIG = 1_000_000_000

# Targets from the issue.
TARGET_ADDED_P50_MS = 3.0
TARGET_RATE_16 = 150.0


# --- setup ------------------------------------------------------------------------------


def _environment(url: str) -> None:
    """This process and every child (worker, gunicorn) on the bench database and Redis."""
    os.environ["REDIS_URL"] = REDIS_URL
    os.environ["CELERY_BROKER_URL"] = REDIS_URL
    os.environ["CELERY_RESULT_BACKEND"] = REDIS_URL
    os.environ["DATABASE_URL"] = url


@dataclass(frozen=True)
class Seed:
    api_key: str
    prompt: str  # what the chat template renders for MESSAGES


def seed(grpc_url: str) -> Seed:
    """The catalog as demo_seed makes it, and one organization with limits nothing reaches."""
    from django.utils import timezone

    from accounts.models import Organization, Scope
    from accounts.services import apikey_create
    from inference.apis import render_chat
    from inference.models import CatalogModel, Precision, ServerPool
    from metering.services import credits_grant, price_book_publish

    price_book_publish(
        prices=[
            {
                "model_name": MODEL,
                "input_rate": "0.5",
                "cached_input_rate": "0.25",
                "output_rate": "1.5",
                "minimum_charge": 10,
            }
        ],
        notes="bench prices",
    )
    pool = ServerPool.objects.create(name="bench-dev-cpu", grpc_urls=[grpc_url])
    model = CatalogModel.objects.create(
        name=MODEL,
        pool=pool,
        triton_model="ensemble",
        precision=Precision.FP16,
        kv_cache_dtype="fp16",
        gpu_type="cpu",
        gpu_hour_cost=0,
        context_limit=4096,
        max_output_tokens=1024,
        access_tier="basic",
    )
    org = Organization.objects.create(
        slug="bench-inf",
        name="Bench inference",
        requests_per_minute=BIG,
        tokens_per_minute=BIG,
        concurrent_jobs=1_000,
    )
    credits_grant(
        organization=org,
        amount=BIG * MICRO,
        source="subscription",
        paid=True,
        resellable=False,
        key="bench-inf-seed",
        expires_at=timezone.now() + timedelta(days=30),
    )
    _, raw = apikey_create(
        organization=org, name="bench", scopes=[Scope.INFERENCE], requests_per_minute=BIG
    )
    return Seed(raw, render_chat(model, MESSAGES))


class Worker:
    """`celery -A gymbilling worker` on the bench database and Redis, as tests/conftest.py starts it."""

    def __init__(self) -> None:
        self.node = f"bench-{uuid.uuid4().hex[:8]}"
        self.command = [
            sys.executable, "-m", "celery", "-A", "gymbilling", "worker",
            "--pool=prefork", "--concurrency=2", "--loglevel=WARNING",
            "-n", f"{self.node}@%h", "-Q", QUEUES,
        ]  # fmt: skip
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {**os.environ, "DJANGO_SETTINGS_MODULE": "gymbilling.settings.test"}
        self.proc = subprocess.Popen(
            self.command,
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        from gymbilling.celery import app

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"celery worker exited early:\n{self.output()}")
            if app.control.ping(destination=[f"{self.node}@{os.uname().nodename}"], timeout=1):
                return
        raise RuntimeError(f"celery worker did not answer a ping:\n{self.output()}")

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.log.close()


# --- the measurements ---------------------------------------------------------------------


@dataclass
class Row:
    name: str
    clients: int
    latencies: list[float] = field(default_factory=list)
    duration_s: float = 0.0
    ok: int = 0  # successful requests, warm-up included
    errors: int = 0
    first_error: str = ""
    output_tokens: int = 0  # what the clients were told, warm-up included

    @property
    def p50_ms(self) -> float:
        return _percentile_ms(self.latencies, 50)

    @property
    def p99_ms(self) -> float:
        return _percentile_ms(self.latencies, 99)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.duration_s if self.duration_s else math.nan

    def error(self, message: str) -> None:
        self.errors += 1
        self.first_error = self.first_error or message


def _timed_calls(name: str, call: Callable[[int], None]) -> Row:
    row = Row(name, 1)
    for i in range(WARMUP_CALLS):
        call(i)
    started = time.perf_counter()
    for i in range(CALLS):
        t0 = time.perf_counter()
        try:
            call(WARMUP_CALLS + i)
        except Exception as exc:
            row.error(f"{type(exc).__name__}: {exc}")
            continue
        row.latencies.append(time.perf_counter() - t0)
    row.duration_s = time.perf_counter() - started
    row.ok = len(row.latencies)
    return row


def floor() -> Row:
    from accounts.tasks import idempotency_purge_task

    return _timed_calls("floor", lambda _i: idempotency_purge_task.apply_async().get(timeout=10))


def direct(grpc_url: str, prompt: str) -> Row:
    from inference.triton import GenerationRequest, pool_for

    pool = pool_for([grpc_url])

    def call(i: int) -> None:
        result = pool.generate(GenerationRequest(prompt=prompt, max_tokens=MAX_TOKENS, seed=i))
        if result.input_tokens <= 0:
            raise RuntimeError(f"no input tokens counted: {result}")

    return _timed_calls("triton", call)


def _request(port: int, key: str, seed_: int, stream: bool) -> bytes:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "seed": seed_}
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    data = json.dumps(body).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
        f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    ).encode() + data


def _usage_tokens(usage: dict) -> int:
    """The completion tokens of a `usage` object; 0 is a valid count (the engine may stop at once)."""
    if not isinstance(usage, dict) or not all(
        isinstance(usage.get(k), int) for k in ("prompt_tokens", "completion_tokens")
    ):
        raise ValueError(f"usage missing: {usage!r}")
    return usage["completion_tokens"]


async def _stream_response(reader: asyncio.StreamReader) -> tuple[int, float | None, int | None]:
    """(status, time of the first content chunk, completion tokens) of one SSE response."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    if b"chunked" not in head.lower():
        raise ValueError(f"not chunked: {head[:200]!r}")
    first = None
    tokens = None
    buffer = b""
    while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
        buffer += (await reader.readexactly(size + 2))[:-2]
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            data = event.removeprefix(b"data: ")
            if data == b"[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise ValueError(f"stream error: {chunk}")
            if chunk.get("usage"):
                tokens = _usage_tokens(chunk["usage"])
            for choice in chunk.get("choices", []):
                if first is None and choice["delta"].get("content"):
                    first = time.perf_counter()
    await reader.readuntil(b"\r\n")
    return status, first, tokens


async def _client(port: int, key: str, row: Row, window: tuple[float, float], stream: bool, n):
    measure_from, stop_at = window
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while time.perf_counter() < stop_at:
            request = _request(port, key, next(n), stream)
            started = time.perf_counter()
            writer.write(request)
            try:
                if stream:
                    status, first, tokens = await _stream_response(reader)
                    ended = first
                    if status != 200 or tokens is None:
                        raise ValueError(f"status {status}, usage {tokens}")
                else:
                    status, _, body, close = await api._read_response(reader)
                    ended = time.perf_counter()
                    if status != 200:
                        raise ValueError(f"status {status}: {body[:300]!r}")
                    tokens = _usage_tokens(json.loads(body).get("usage"))
                    if close:
                        raise ValueError("the server closed the connection")
            except (OSError, ValueError, KeyError, asyncio.IncompleteReadError) as exc:
                row.error(f"{type(exc).__name__}: {exc}")
                writer.close()
                reader, writer = await asyncio.open_connection(HOST, port)
                continue
            row.ok += 1
            row.output_tokens += tokens
            # A streamed answer with no content (the engine stopped at once)
            # has no first token: served and billed, but without a latency.
            if ended is not None and started >= measure_from and time.perf_counter() <= stop_at:
                row.latencies.append(ended - started)
    finally:
        writer.close()


def http_window(
    port: int, key: str, clients: int, warmup_s: float, duration_s: float, stream: bool = False
) -> Row:
    row = Row("stream" if stream else "http", clients, duration_s=duration_s)
    counter = iter(range(10**9))

    async def run() -> None:
        measure_from = time.perf_counter() + warmup_s
        window = (measure_from, measure_from + duration_s)
        tasks = [
            asyncio.create_task(_client(port, key, row, window, stream, counter))
            for _ in range(clients)
        ]
        done, pending = await asyncio.wait(tasks, timeout=warmup_s + duration_s + 30)
        for task in pending:
            task.cancel()
            row.error("a request was still unanswered 30 s after the window closed")
        for task in done:
            if task.exception() is not None:
                row.error(repr(task.exception()))

    asyncio.run(run())
    return row


# --- the run ---------------------------------------------------------------------------


@dataclass
class Result:
    floor: Row
    triton: Row
    http: list[Row]
    stream: Row | None
    billing: dict[str, object]
    timings: dict[str, float]


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _log_row(log, row: Row) -> None:
    log(
        f"{row.name:>6} x{row.clients:<2}: {len(row.latencies)} measured, "
        f"{row.rate:7.1f}/s p50 {row.p50_ms:7.2f} ms p99 {row.p99_ms:7.2f} ms, "
        f"errors {row.errors}" + (f" (first: {row.first_error[:300]})" if row.first_error else "")
    )


def billing_check(rows: list[Row]) -> dict[str, object]:
    from django.db.models import Sum

    from metering.models import UsageRecord
    from metering.reconcile import ledger_reconcile

    ok = sum(r.ok for r in rows)
    told = sum(r.output_tokens for r in rows)
    records = UsageRecord.objects.count()
    billed = UsageRecord.objects.aggregate(t=Sum("output_tokens"))["t"] or 0
    report = ledger_reconcile()
    empty = UsageRecord.objects.filter(output_tokens=0).count()
    no_input = UsageRecord.objects.filter(input_tokens=0).count()
    return {
        "usage records with 0 output tokens (the engine stopped at once)": empty,
        "usage records with 0 input tokens": no_input,
        "successful requests": ok,
        "usage records": records,
        "output tokens reported to clients": told,
        "output tokens billed": billed,
        "ledger reconcile": "ok" if report.ok else f"violations: {report.violations}",
        "all billed": records == ok and billed == told and report.ok,
    }


def measure(url: str, *, warmup_s: float, duration_s: float, log: Callable[[str], None]) -> Result:
    from inference.engine.server import TritonDevServer

    timings = {"load_before": os.getloadavg()[0]}
    started = time.perf_counter()
    _environment(url)
    api.REDIS_URL = REDIS_URL  # what api.database_prepare sets and api.Server passes on
    api.database_prepare(url)
    api.redis_flush()
    previous = signal.signal(signal.SIGTERM, _terminate)
    triton = TritonDevServer()
    worker = Worker()
    server = api.Server(url, api.ServerConfig(api.WORKERS, api.THREADS, api.CONN_MAX_AGE))
    try:
        triton.start()
        log(f"tritonserver ready (grpc {triton.grpc_url}) in {triton.ready_seconds:.1f} s")
        seed_ = seed(triton.grpc_url)
        from django.db import connections

        connections.close_all()
        timings["setup"] = time.perf_counter() - started
        worker.start()
        log(f"celery worker up; setup {time.perf_counter() - started:.1f} s")
        server.start()
        log(f"gunicorn up on port {server.port}")

        floor_row = floor()
        _log_row(log, floor_row)
        triton_row = direct(triton.grpc_url, seed_.prompt)
        _log_row(log, triton_row)
        http_rows = []
        for clients in CLIENTS:
            row = http_window(server.port, seed_.api_key, clients, warmup_s, duration_s)
            _log_row(log, row)
            http_rows.append(row)
        stream_row = http_window(server.port, seed_.api_key, 1, warmup_s, duration_s, stream=True)
        _log_row(log, stream_row)
        for proc, name in ((server.proc, "gunicorn"), (worker.proc, "celery worker")):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} died during the run")
        billing = billing_check([*http_rows, stream_row])
        log(f"billing: {billing}")
    finally:
        from inference.triton import close_pools

        close_pools()
        server.stop()
        worker.stop()
        triton.stop()
        signal.signal(signal.SIGTERM, previous)
    timings["load_after"] = os.getloadavg()[0]
    timings["total"] = time.perf_counter() - started
    return Result(floor_row, triton_row, http_rows, stream_row, billing, timings)


# --- the report ------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def markdown(*, result: Result, machine_rows, date: str, warmup_s: float, duration_s: float) -> str:
    fl, tr = result.floor, result.triton
    lines = [
        "| path | clients | measured | requests/s | p50 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {
        "floor": f"Celery floor: `{FLOOR_TASK}.apply_async().get()`",
        "triton": "direct Triton: `pool_for([grpc]).generate()`",
        "http": "`POST /v1/chat/completions` through gunicorn",
        "stream": "same, `stream: true`: time to first content chunk",
    }
    rows = [fl, tr, *result.http, *([result.stream] if result.stream else [])]
    for r in rows:
        lines.append(
            f"| {labels[r.name]} | {r.clients} | {len(r.latencies)} | {_fmt(r.rate, 1)} "
            f"| {_fmt(r.p50_ms)} | {_fmt(r.p99_ms)} | {r.errors} |"
        )
    added = [
        "| clients | p50 ms added over direct Triton | p99 ms added over direct Triton "
        "| p50 added minus the Celery floor p50 |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for r in result.http:
        a50 = r.p50_ms - tr.p50_ms
        added.append(
            f"| {r.clients} | {_fmt(a50)} | {_fmt(r.p99_ms - tr.p99_ms)} "
            f"| {_fmt(a50 - fl.p50_ms)} |"
        )
    one = next(r for r in result.http if r.clients == 1)
    sixteen = next(r for r in result.http if r.clients == 16)
    over_floor = one.p50_ms - tr.p50_ms - fl.p50_ms
    billed = bool(result.billing["all billed"])
    errors_16 = sixteen.errors == 0
    out = [
        "## Inference path overhead",
        "",
        f"`POST /v1/chat/completions` (`{MODEL}`, non-streaming, `max_tokens` {MAX_TOKENS}, "
        "one short user message, a different `seed` per request) through gunicorn, the API "
        "submitting a job (hold placed, token and concurrency limits counted in Redis), a "
        "Celery worker calling Triton and settling the job, the result relayed back through "
        "Redis; next to the same prompt sent straight to Triton, and next to the round trip "
        "of a Celery task that does almost nothing (the floor any Celery hop costs).",
        "",
        f"- Command: `make bench` (`bench/run.py`, section `inference`); date: {date}.",
        "- Machine (Triton, the worker, gunicorn, PostgreSQL, Redis and the clients all share "
        "its CPUs):",
        *(f"  - {name}: {value}" for name, value in machine_rows),
        f"  - 1-minute load average: {result.timings['load_before']:.2f} before the run, "
        f"{result.timings['load_after']:.2f} after it",
        "- Engine: the development Triton server (`inference.engine.server.TritonDevServer`, "
        "the `ensemble` model on CPU), started for the run.",
        "- Worker: `celery -A gymbilling worker -Q "
        f"{QUEUES} --concurrency 2 --pool prefork`, settings `gymbilling.settings.test`.",
        f"- Server: gunicorn as in the API benchmark ({api.WORKERS} workers x {api.THREADS} "
        "threads, gthread, production settings, persistent database connections).",
        f"- Own database `{urlsplit(DEFAULT_URL).path.lstrip('/')}` (dropped, migrated and "
        "seeded through the services: a price book, the catalog as `demo_seed` makes it, one "
        "organization with limits nothing reaches and one inference key) and Redis database "
        f"`{REDIS_URL.rsplit('/', 1)[1]}` (broker, results, limits and relay; flushed).",
        f"- Floor: `{FLOOR_TASK}` (one DELETE on an empty table) sent with `apply_async()` "
        f"and waited on with `.get()`; direct Triton: `{CALLS}` sequential calls. Both after "
        f"{WARMUP_CALLS} warm-up calls.",
        f"- HTTP: closed loop, raw HTTP/1.1 keep-alive connections, one per client; "
        f"{warmup_s:g} s warm-up then {duration_s:g} s measured per row. Every response "
        "checked: status 200 and a `usage` object with integer token counts (streamed: the "
        "final usage chunk; 0 completion tokens is valid). Streaming latency is to the first chunk with content; a streamed answer "
        "with no content (the engine stopped at once) counts as served but has no latency.",
        "",
        "### Results",
        "",
        *lines,
        "",
        "### What the gateway adds to direct Triton",
        "",
        *added,
        "",
        "### Billing",
        "",
        *(f"- {k}: {v}" for k, v in result.billing.items()),
        "",
        "### Targets",
        "",
        f"- Added latency at p50, 1 client, at most {TARGET_ADDED_P50_MS:g} ms above the "
        f"Celery floor: {_fmt(over_floor)} ms above it — {_met(over_floor <= TARGET_ADDED_P50_MS)}.",
        f"- At least {TARGET_RATE_16:g} requests/s end to end at 16 clients with every token "
        f"billed: {_fmt(sixteen.rate, 1)} requests/s, "
        f"{'every token billed' if billed else 'billing check failed'} — "
        f"{_met(sixteen.rate >= TARGET_RATE_16 and billed and errors_16)}.",
    ]
    return "\n".join(out) + "\n"
