"""What the gateway adds to an inference: POST /v1/chat/completions next to Triton and Celery.

One run, on its own database and Redis database, with a development Triton
server (`TritonDevServer`), a real Celery worker subprocess and gunicorn:

1. the floor: the round trip of a no-op Celery task answered through Redis
   (Celery's built-in `celery.accumulate`, which returns its arguments), as
   the issue defines it;
2. direct Triton: `inference.triton.pool_for([grpc]).generate(...)`, the
   client the worker uses, at 1 client and, from as many threads as clients,
   at each concurrency the path is measured at, streamed (time to the first
   response) and not;
3. the whole path: POST /v1/chat/completions through gunicorn, the API
   submitting a job (hold, rate limits), the worker calling Triton and
   settling it, the answer relayed back through Redis;
4. streaming: time to the first content chunk of the same request, at each
   concurrency;
5. the 1-client target again, interleaved: one floor call, one direct call
   and one request through the whole path per round, in random order, so
   that all three meet the machine at the same speed (on this shared 2-CPU
   machine the speed moves by half within minutes, and 1-3 above are
   measured minutes apart); and in the same rounds the two parts of the
   path that the floor has no counterpart for and that no gateway code can
   shorten: the ledger's two transactions alone (a hold placed, then
   captured, through the metering services, committed as the path commits
   them: the hold without waiting for its WAL flush, the capture durably) and a bare HTTP round trip to the same gunicorn (`GET /ping`).

Every response is checked (200 and `usage`), and at the end every request
must be billed: one UsageRecord per successful request, as many output tokens
billed as the clients were told, and the ledger reconciles.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

from bench import api, harness
from bench.harness import _percentile_ms

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/gymbilling_bench_inf"
# A Redis database nothing else uses (the app: 0 and 1, the API bench: 4, the
# tests: 14 and 15); broker, results, rate limits and the relay all in it,
# flushed at the start of each run.
REDIS_URL = os.environ.get("BENCH_INF_REDIS_URL", "redis://127.0.0.1:6379/8")
HOST = api.HOST
MODEL = "gym-tiny"
MAX_TOKENS = 16
MESSAGES = [{"role": "user", "content": "Write one sentence about a gym."}]
QUEUES = "celery,inference.priority,inference.standard,inference.batch"
# Celery's own no-op (registered by every app, consumed from the default queue):
# until 2026-12-02 the floor was accounts.tasks.idempotency_purge_task, one
# DELETE on an empty table, which put a database round trip into the floor.
FLOOR_TASK = "celery.accumulate"

CALLS = 200  # floor and direct Triton, each
WARMUP_CALLS = 20
INTERLEAVED_ROUNDS = 300
CLIENTS = (1, 16, 64)
# The row with as many organizations as clients: every other row bills one
# organization, whose wallet every request locks (the ledger's hot wallet).
SPREAD_ORGS = 16
STARTUP_TIMEOUT_S = 60
MICRO = 1_000_000
BIG = 1_000_000_000

# Targets from the issue.
TARGET_ADDED_P50_MS = 3.0
TARGET_RATE_16 = 150.0


# --- setup ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Config:
    """The shape of the worker and of gunicorn (bench/run.py --inf-* flags)."""

    pool: str = "threads"
    concurrency: int = 16
    server_workers: int = api.WORKERS
    server_threads: int = api.THREADS


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
    # One key per organization of SPREAD_ORGS more, for the row whose clients
    # each bill their own organization.
    spread_keys: tuple[str, ...] = ()
    # The organization the interleaved rounds' bare ledger calls settle on
    # (its own wallet: no job, no usage record, nothing the billing check counts).
    ledger_org_id: int = 0


def seed(grpc_url: str) -> Seed:
    """The catalog as demo_seed makes it, and organizations with limits nothing reaches.

    One organization for every row but one; SPREAD_ORGS more, one per client,
    for the row that spreads the load.
    """
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
        max_input_tokens=2048,
        max_output_tokens=1024,
        tokenizer_file="inference/engine/tokenizer.json",
        access_tier="basic",
    )

    def funded(suffix: str) -> Organization:
        """An organization with limits nothing reaches and credits nothing exhausts."""
        org = Organization.objects.create(
            slug=f"bench-inf{suffix}",
            name=f"Bench inference{suffix}",
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
            key=f"bench-inf-seed{suffix}",
            expires_at=timezone.now() + timedelta(days=30),
        )
        return org

    keys = []
    for n in range(1 + SPREAD_ORGS):
        _, raw = apikey_create(
            organization=funded(f"-{n}" if n else ""),
            name="bench",
            scopes=[Scope.INFERENCE],
            requests_per_minute=BIG,
        )
        keys.append(raw)
    # Its own wallet for the interleaved rounds' bare ledger calls.
    ledger_org = funded("-ledger")
    return Seed(keys[0], render_chat(model, MESSAGES), tuple(keys[1:]), ledger_org.pk)


class Worker:
    """`celery -A gymbilling worker` on the bench database and Redis."""

    def __init__(self, url: str, pool: str = "prefork", concurrency: int = 2) -> None:
        self.node = f"bench-{uuid.uuid4().hex[:8]}"
        self.url = url
        self.command = [
            sys.executable, "-m", "celery", "-A", "gymbilling", "worker",
            f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=WARNING",
            "-n", f"{self.node}@%h", "-Q", QUEUES,
        ]  # fmt: skip
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "gymbilling.settings.test",
            # Persistent database connections, as gunicorn gets them (see
            # gymbilling/celery.py). With CONN_MAX_AGE 0, Django's default, a
            # worker opens a PostgreSQL connection for every task, and the new
            # backend's empty catalog caches and unprepared statements cost
            # about 8 ms per job here.
            "DATABASE_URL": api._with_query(self.url, conn_max_age=api.CONN_MAX_AGE),
        }
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
    # Per measured non-streamed request: wall-clock send and receive times and
    # the job id (X-Gym-Job-Id), for the stage breakdown (job_stages).
    jobs: list[tuple[float, float, str]] = field(default_factory=list)
    # CPU ms per measured request, per part of the path (CpuMeter), and the
    # CPUs' worth everything else on the machine used meanwhile.
    cpu_ms: dict[str, float] = field(default_factory=dict)
    other_cpus: float = math.nan

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


def _floor_call(_i: int) -> None:
    from gymbilling.celery import app

    app.tasks[FLOOR_TASK].apply_async().get(timeout=10)


def _direct_call(grpc_url: str, prompt: str) -> Callable[[int], None]:
    from inference.triton import GenerationRequest, pool_for

    pool = pool_for([grpc_url])

    def call(i: int) -> None:
        result = pool.generate(GenerationRequest(prompt=prompt, max_tokens=MAX_TOKENS, seed=i))
        if result.input_tokens <= 0:
            raise RuntimeError(f"no input tokens counted: {result}")

    return call


def floor() -> Row:
    return _timed_calls("floor", _floor_call)


def direct(grpc_url: str, prompt: str) -> Row:
    return _timed_calls("triton", _direct_call(grpc_url, prompt))


def _stamp_first(stamps: list[float], _text: str) -> None:
    if not stamps:
        stamps.append(time.perf_counter())


def direct_window(
    grpc_url: str, prompt: str, clients: int, warmup_s: float, duration_s: float, stream: bool
) -> Row:
    """Direct Triton at `clients` concurrency: as many threads, closed loop, on one pool (as
    the worker's threads share one); streamed, the latency is to the first response."""
    from inference.triton import GenerationRequest, pool_for

    pool = pool_for([grpc_url])
    row = Row("triton-stream" if stream else "triton", clients, duration_s=duration_s)
    seeds, lock = itertools.count(), threading.Lock()
    measure_from = time.perf_counter() + warmup_s
    stop_at = measure_from + duration_s

    def client() -> None:
        while time.perf_counter() < stop_at:
            first: list[float] = []
            request = GenerationRequest(prompt, MAX_TOKENS, seed=next(seeds), stream=stream)
            started = time.perf_counter()
            try:
                result = pool.generate(
                    request,
                    on_delta=functools.partial(_stamp_first, first),
                )
            except Exception as exc:
                with lock:
                    row.error(f"{type(exc).__name__}: {exc}")
                continue
            ended = (first[0] if first else None) if stream else time.perf_counter()
            with lock:
                row.ok += 1
                row.output_tokens += result.output_tokens
                if ended is not None and started >= measure_from and time.perf_counter() <= stop_at:
                    row.latencies.append(ended - started)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return row


@dataclass
class Interleaved:
    """Per round, seconds: the floor, direct Triton and the whole path, measured in turn; and,
    in the same rounds, the ledger's two transactions alone and a bare HTTP round trip."""

    floor: list[float] = field(default_factory=list)
    direct: list[float] = field(default_factory=list)
    path: list[float] = field(default_factory=list)
    ledger: list[float] = field(default_factory=list)
    http: list[float] = field(default_factory=list)
    errors: int = 0  # rounds not measured: a call failed

    def p50_ms(self, kind: str) -> float:
        return _percentile_ms(getattr(self, kind), 50)

    @property
    def added_over_floor_ms(self) -> float:
        """p50 of the path, less direct Triton's and the floor's p50: the target's figure."""
        return self.p50_ms("path") - self.p50_ms("direct") - self.p50_ms("floor")

    @property
    def per_round_ms(self) -> float:
        """The median over rounds of path - direct - floor, each round's own three calls."""
        each = [p - d - f for f, d, p in zip(self.floor, self.direct, self.path, strict=True)]
        return _percentile_ms(each, 50)

    @property
    def gateway_own_ms(self) -> float:
        """The target's figure less the ledger's and a bare HTTP round trip's p50s: about
        what the gateway's own code (authentication, limits, validation, dispatch, relay)
        adds (an estimate: a difference of medians, not a median of differences)."""
        return self.added_over_floor_ms - self.p50_ms("ledger") - self.p50_ms("http")


def _ledger_call(organization_id: int) -> Callable[[int], None]:
    from accounts.models import Organization
    from bench.ledger import settle_once

    organization = Organization.objects.get(pk=organization_id)
    run = uuid.uuid4().hex[:8]

    # Called from the rounds' event loop, synchronously, as the floor and
    # direct calls are (interleaved() allows the ORM there), not by a hop to
    # another thread, which would add its own latency to the figure.
    return lambda i: settle_once(organization, f"bench-inf-ledger-{run}-{i}", hold_durable=False)


def interleaved(
    port: int, key: str, grpc_url: str, prompt: str, ledger_org_id: int
) -> tuple[Interleaved, Row]:
    """INTERLEAVED_ROUNDS rounds (after WARMUP_CALLS) of one floor call, one direct call,
    one non-streamed request through the path, one settlement through the ledger's services
    and one GET /ping, in a random order per round; the Row counts the path's requests for
    the billing check. A round with a failed call is not measured."""
    calls = {
        "floor": _floor_call,
        "direct": _direct_call(grpc_url, prompt),
        "ledger": _ledger_call(ledger_org_id),
    }
    result, row = Interleaved(), Row("interleaved", 1)
    order = random.Random(0)

    async def run() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)

        async def path(i: int) -> None:
            writer.write(_request(port, key, 1_000_000 + i, False))
            status, _head, body, close = await api._read_response(reader)
            if status != 200 or close:
                raise ValueError(f"status {status} (closes: {close}): {body[:300]!r}")
            row.output_tokens += _usage_tokens(json.loads(body).get("usage"))
            row.ok += 1

        async def ping() -> None:
            writer.write(f"GET /ping HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
            status, _head, body, close = await api._read_response(reader)
            if status != 200 or close or body != b"pong":
                raise ValueError(f"/ping: status {status} (closes: {close}): {body[:300]!r}")

        async def call(kind: str, i: int) -> None:
            if kind == "path":
                await path(i)
            elif kind == "http":
                await ping()
            else:
                calls[kind](i)

        try:
            for i in range(WARMUP_CALLS + INTERLEAVED_ROUNDS):
                kinds = ["floor", "direct", "path", "ledger", "http"]
                order.shuffle(kinds)
                took: dict[str, float] = {}
                try:
                    for kind in kinds:
                        started = time.perf_counter()
                        await call(kind, i)
                        took[kind] = time.perf_counter() - started
                except Exception as exc:  # any failed call: the round is not measured
                    row.error(f"{type(exc).__name__}: {exc}")
                    writer.close()
                    reader, writer = await asyncio.open_connection(HOST, port)
                    continue
                if i >= WARMUP_CALLS:
                    for kind, seconds in took.items():
                        getattr(result, kind).append(seconds)
                        if kind == "path":
                            row.latencies.append(seconds)
        finally:
            writer.close()

    # Django refuses the ORM in an event loop's thread unless told it is safe:
    # it is here, the ledger calls are synchronous and no coroutine runs
    # meanwhile.
    unsafe = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        asyncio.run(run())
    finally:
        if unsafe is None:
            del os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"]
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = unsafe
    result.errors = row.errors
    return result, row


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


def _job_id(head: bytes) -> str:
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-gym-job-id":
            return value.strip().decode()
    return ""


async def _client(port: int, key: str, row: Row, window: tuple[float, float], stream: bool, n):
    measure_from, stop_at = window
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while time.perf_counter() < stop_at:
            request = _request(port, key, next(n), stream)
            started = time.perf_counter()
            sent_at = time.time()
            job_id = ""
            writer.write(request)
            try:
                if stream:
                    status, first, tokens = await _stream_response(reader)
                    ended = first
                    if status != 200 or tokens is None:
                        raise ValueError(f"status {status}, usage {tokens}")
                else:
                    status, head, body, close = await api._read_response(reader)
                    ended = time.perf_counter()
                    job_id = _job_id(head)
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
                if job_id:
                    row.jobs.append((sent_at, sent_at + (ended - started), job_id))
    finally:
        writer.close()


class CpuMeter:
    """CPU time (the scheduler's runtime, /proc) of each part of the path, and of the machine.

    Parts: gunicorn, the Celery worker, Triton (server and Python-backend stubs),
    the PostgreSQL backends of the bench database, and Redis (the machine's one
    server: anything else using it counts too). The processes are looked up at
    each sample, so worker processes and backends started meanwhile count.
    """

    def __init__(self, *, gunicorn: int, worker: int, triton: int, dbname: str) -> None:
        self.roots = {"gunicorn": gunicorn, "worker": worker, "Triton": triton}
        self.dbname = dbname

    def sample(self) -> tuple[dict[str, int], int]:
        parts = {name: _tree(pid) for name, pid in self.roots.items()}
        parts["PostgreSQL"] = api._backend_pids(self.dbname)
        parts["Redis"] = api._redis_pids()
        used = {
            name: sum(api._runtime_ns(pid) or 0 for pid in pids) for name, pids in parts.items()
        }
        return used, harness._busy_ticks()


def _tree(root: int) -> set[int]:
    """A process and all its descendants."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry.name))
    found, todo = {root}, [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def http_window(
    port: int,
    keys: list[str] | tuple[str, ...],
    clients: int,
    warmup_s: float,
    duration_s: float,
    stream: bool = False,
    cpu: CpuMeter | None = None,
    name: str = "",
) -> Row:
    """One row: `clients` closed-loop clients, client i with keys[i % len(keys)]."""
    row = Row(name or ("stream" if stream else "http"), clients, duration_s=duration_s)
    counter = iter(range(10**9))

    async def meter(measure_from: float) -> None:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        first, busy0 = cpu.sample()
        await asyncio.sleep(duration_s)
        last, busy1 = cpu.sample()
        served = max(1, len(row.latencies))
        row.cpu_ms = {name: (last[name] - first[name]) / 1e6 / served for name in first}
        ours = sum(last[name] - first[name] for name in first) / 1e9
        row.other_cpus = max(0.0, (busy1 - busy0) / harness._TICKS - ours) / duration_s

    async def run() -> None:
        measure_from = time.perf_counter() + warmup_s
        window = (measure_from, measure_from + duration_s)
        tasks = [
            asyncio.create_task(_client(port, keys[i % len(keys)], row, window, stream, counter))
            for i in range(clients)
        ]
        if cpu is not None:
            tasks.append(asyncio.create_task(meter(measure_from)))
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
    streams: list[Row]
    billing: dict[str, object]
    timings: dict[str, float]
    config: Config
    url: str
    stages: list[tuple[str, str, float, float]]
    interleaved: Interleaved | None = None
    direct: list[Row] = field(default_factory=list)  # direct Triton at 16 and 64, streamed too
    stages_16: list[tuple[str, str, float, float]] = field(default_factory=list)


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _log_row(log, row: Row) -> None:
    log(
        f"{row.name:>6} x{row.clients:<2}: {len(row.latencies)} measured, "
        f"{row.rate:7.1f}/s p50 {row.p50_ms:7.2f} ms p99 {row.p99_ms:7.2f} ms, "
        f"errors {row.errors}"
        + (f", CPU ms/request {_cpu_text(row)}" if row.cpu_ms else "")
        + (f" (first: {row.first_error[:300]})" if row.first_error else "")
    )


# Where one request's time goes, from the Job row's own timestamps (written by
# the API process and the worker on this machine's clock) and the client's.
STAGES = (
    (
        "API: request in to job row built",
        "gunicorn, API key, model and price (cached per process), rate limits, token and "
        "concurrency reservations in Redis, the Job row's values (`queued_at`)",
    ),
    (
        "dispatch: job row built to job started",
        "one statement writes the hold and the Job row and commits, `apply_async` at once, the "
        "message through Redis, a worker thread takes it, sends it to the engine and, while "
        "the engine works, loads the job as it marks it running (`started_at`)",
    ),
    (
        "engine: the Triton call",
        "the job's `engine_ms`, measured in the worker around the gRPC call",
    ),
    (
        "worker around the engine",
        "`started_at` to `finished_at` less the engine: the outcome (`finished_at` is "
        "stamped as the settlement starts), less the part of the engine call that came "
        "before `started_at` (so it may be below 0)",
    ),
    (
        "settlement and relay: to response read",
        "one statement claims the job and captures its hold with its usage record and "
        "commits; reservations released and the result published to the job's Redis stream "
        "in one pipeline, the waiting API thread wakes (XREAD BLOCK), response written and read",
    ),
)


def job_stages(row: Row) -> list[tuple[str, str, float, float]]:
    """(stage, what, p50 ms, mean ms) over the row's measured requests."""
    from inference.models import Job

    jobs = {
        j.public_id: j
        for j in Job.objects.filter(public_id__in=[job_id for _, _, job_id in row.jobs])
    }
    spans: list[list[float]] = [[] for _ in STAGES]
    for sent, received, job_id in row.jobs:
        job = jobs.get(job_id)
        if job is None or job.started_at is None or job.finished_at is None:
            continue
        queued, started = job.queued_at.timestamp(), job.started_at.timestamp()
        finished, engine = job.finished_at.timestamp(), job.engine_ms / 1000
        for i, span in enumerate(
            (
                queued - sent,
                started - queued,
                engine,
                finished - started - engine,
                received - finished,
            )
        ):
            spans[i].append(span)
    return [
        (
            name,
            what,
            _percentile_ms(values, 50),
            1000 * sum(values) / len(values) if values else math.nan,
        )
        for (name, what), values in zip(STAGES, spans, strict=True)
    ]


def _cpu_text(row: Row) -> str:
    parts = " + ".join(f"{name} {ms:.1f}" for name, ms in row.cpu_ms.items())
    return f"{parts} = {sum(row.cpu_ms.values()):.1f}"


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


def measure(
    url: str,
    *,
    warmup_s: float,
    duration_s: float,
    config: Config,
    log: Callable[[str], None],
) -> Result:
    from inference.engine.server import TritonDevServer

    timings = {"load_before": os.getloadavg()[0]}
    started = time.perf_counter()
    _environment(url)
    api.REDIS_URL = REDIS_URL  # what api.database_prepare sets and api.Server passes on
    api.database_prepare(url)
    api.redis_flush()
    previous = signal.signal(signal.SIGTERM, _terminate)
    triton = TritonDevServer()
    worker = Worker(url, config.pool, config.concurrency)
    server = api.Server(
        url, api.ServerConfig(config.server_workers, config.server_threads, api.CONN_MAX_AGE)
    )
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
        cpu = CpuMeter(
            gunicorn=server.proc.pid,
            worker=worker.proc.pid,
            triton=triton.process.pid,
            dbname=urlsplit(url).path.lstrip("/"),
        )
        http_rows = []
        for clients in CLIENTS:
            row = http_window(server.port, [seed_.api_key], clients, warmup_s, duration_s, cpu=cpu)
            _log_row(log, row)
            http_rows.append(row)
        spread_row = http_window(
            server.port,
            seed_.spread_keys,
            SPREAD_ORGS,
            warmup_s,
            duration_s,
            cpu=cpu,
            name="http-orgs",
        )
        _log_row(log, spread_row)
        http_rows.append(spread_row)
        stream_rows = []
        for clients in CLIENTS:
            row = http_window(
                server.port, [seed_.api_key], clients, warmup_s, duration_s, stream=True
            )
            _log_row(log, row)
            stream_rows.append(row)
        # Direct Triton at the same concurrencies, for what the path adds at each.
        direct_rows = []
        for stream in (False, True):
            for clients in CLIENTS if stream else CLIENTS[1:]:
                row = direct_window(
                    triton.grpc_url, seed_.prompt, clients, warmup_s, duration_s, stream
                )
                _log_row(log, row)
                direct_rows.append(row)
        rounds, rounds_row = interleaved(
            server.port, seed_.api_key, triton.grpc_url, seed_.prompt, seed_.ledger_org_id
        )
        log(
            f"interleaved: floor {rounds.p50_ms('floor'):.2f}, direct "
            f"{rounds.p50_ms('direct'):.2f}, path {rounds.p50_ms('path'):.2f} ms "
            f"-> {rounds.added_over_floor_ms:.2f} above the floor; ledger alone "
            f"{rounds.p50_ms('ledger'):.2f}, /ping {rounds.p50_ms('http'):.2f} -> gateway's own "
            f"{rounds.gateway_own_ms:.2f} ({rounds_row.errors} errors)"
        )
        for proc, name in ((server.proc, "gunicorn"), (worker.proc, "celery worker")):
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} died during the run")
        stages = job_stages(next(r for r in http_rows if r.clients == 1))
        stages_16 = job_stages(next(r for r in http_rows if r.clients == 16 and r.name == "http"))
        billing = billing_check([*http_rows, *stream_rows, rounds_row])
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
    return Result(
        floor_row,
        triton_row,
        http_rows,
        stream_rows,
        billing,
        timings,
        config,
        url,
        stages,
        rounds,
        direct_rows,
        stages_16,
    )


# --- the report ------------------------------------------------------------------------------


def _fmt(value: float, digits: int = 2) -> str:
    return "—" if math.isnan(value) else f"{value:,.{digits}f}"


def _met(ok: bool) -> str:
    return "**met**" if ok else "**not met**"


def _clients(row: Row) -> str:
    return (
        f"{row.clients}, {row.clients} organizations"
        if row.name == "http-orgs"
        else str(row.clients)
    )


def _interleaved_lines(rounds: Interleaved) -> list[str]:
    return [
        "### The 1-client target, measured interleaved",
        "",
        "The rows above are measured one after another, minutes apart, and this machine's "
        "speed moves by half within minutes, so the floor, direct Triton and the 1-client "
        "path may each have met it at another speed. Here the three are measured in turn: "
        f"{len(rounds.path)} rounds (after {WARMUP_CALLS} warm-up rounds; {rounds.errors} "
        "not measured because a call failed) of one floor call, one direct call and one "
        "request through the whole path (same request, client and connection kind as the "
        "1-client row), in a random order per round. Each call follows calls of other "
        "kinds, so none finds the parts it uses still warm from one like it (the worker "
        "thread that ran the last floor task, Triton's last request): the floor and direct "
        "figures here run higher than in their own rows, which run back to back.",
        "",
        "| floor p50 ms | direct Triton p50 ms | path p50 ms | path - direct - floor, "
        "of the p50s (the target's figure) | median over rounds of each round's "
        "path - direct - floor |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {_fmt(rounds.p50_ms('floor'))} | {_fmt(rounds.p50_ms('direct'))} "
        f"| {_fmt(rounds.p50_ms('path'))} | {_fmt(rounds.added_over_floor_ms)} "
        f"| {_fmt(rounds.per_round_ms)} |",
        "",
        "In the same rounds, two parts of the path that the floor has no counterpart for "
        "and that no gateway code can shorten: the ledger's two transactions alone "
        "(a hold placed, then captured, through the metering services, committed as the "
        "path commits them: the hold without waiting for its WAL flush, as an answer given "
        "only after settlement allows, the capture durably; the path writes the Job row in "
        "the first and claims the job in the second) and a bare HTTP round trip to the same gunicorn (`GET /ping`, a "
        "constant through the same middleware). The last column is what remains of the "
        "target's figure for the gateway's own work (authentication, limits, validation, "
        "the Celery publish and the relay): an estimate, the difference of medians.",
        "",
        "| ledger alone (place, capture) p50 ms | `GET /ping` p50 ms | the target's figure "
        "less both |",
        "| ---: | ---: | ---: |",
        f"| {_fmt(rounds.p50_ms('ledger'))} | {_fmt(rounds.p50_ms('http'))} "
        f"| {_fmt(rounds.gateway_own_ms)} |",
        "",
    ]


def markdown(*, result: Result, machine_rows, date: str, warmup_s: float, duration_s: float) -> str:
    fl, tr, cfg = result.floor, result.triton, result.config
    lines = [
        "| path | clients | measured | requests/s | p50 ms | p99 ms | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {
        "floor": f"Celery floor: `{FLOOR_TASK}.apply_async().get()`",
        "triton": "direct Triton: `pool_for([grpc]).generate()` (a thread per client)",
        "triton-stream": "direct Triton, streamed: time to the first response",
        "http": "`POST /v1/chat/completions` through gunicorn",
        "http-orgs": "same, each client billing its own organization",
        "stream": "same, `stream: true`: time to first content chunk",
    }
    plain = [r for r in result.direct if r.name == "triton"]
    streamed = [r for r in result.direct if r.name == "triton-stream"]
    rows = [fl, tr, *plain, *result.http, *streamed, *result.streams]
    for r in rows:
        lines.append(
            f"| {labels[r.name]} | {r.clients} | {len(r.latencies)} | {_fmt(r.rate, 1)} "
            f"| {_fmt(r.p50_ms)} | {_fmt(r.p99_ms)} | {r.errors} |"
        )
    # Each path row next to direct Triton at its own concurrency.
    direct_at = {r.clients: r for r in [tr, *plain]}
    added = [
        "| clients | direct Triton p50 ms | p50 ms added over it | p99 ms added over it "
        "| p50 added minus the Celery floor p50 |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result.http:
        base = direct_at.get(r.clients, tr)
        a50 = r.p50_ms - base.p50_ms
        added.append(
            f"| {_clients(r)} | {_fmt(base.p50_ms)} | {_fmt(a50)} "
            f"| {_fmt(r.p99_ms - base.p99_ms)} | {_fmt(a50 - fl.p50_ms)} |"
        )
    stream_at = {r.clients: r for r in streamed}
    added_ttft = [
        "| clients | direct Triton, first response p50 ms | path, first content chunk p50 ms "
        "| p50 ms added | p99 ms added |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result.streams:
        base = stream_at.get(r.clients)
        if base is not None:
            added_ttft.append(
                f"| {r.clients} | {_fmt(base.p50_ms)} | {_fmt(r.p50_ms)} "
                f"| {_fmt(r.p50_ms - base.p50_ms)} | {_fmt(r.p99_ms - base.p99_ms)} |"
            )
    cpus = os.cpu_count() or 1
    names = list(result.http[0].cpu_ms) if result.http[0].cpu_ms else []
    cpu_lines = [
        f"| clients | {' | '.join(names)} | total | {cpus} CPUs ÷ total: requests/s at most "
        "| other CPU load |",
        "| ---: |" + " ---: |" * (len(names) + 3),
    ]
    for r in result.http:
        if r.cpu_ms:
            total = sum(r.cpu_ms.values())
            cpu_lines.append(
                f"| {_clients(r)} | {' | '.join(_fmt(r.cpu_ms[n]) for n in names)} "
                f"| {_fmt(total)} | {_fmt(cpus * 1000 / total, 0)} | {_fmt(r.other_cpus)} |"
            )
    one = next(r for r in result.http if r.clients == 1)
    sixteen = next(r for r in result.http if r.clients == 16 and r.name == "http")
    over_floor = one.p50_ms - tr.p50_ms - fl.p50_ms
    rounds = result.interleaved
    billed = bool(result.billing["all billed"])
    errors_16 = sixteen.errors == 0
    spread = next((r for r in result.http if r.name == "http-orgs"), None)
    out = [
        "## Inference path overhead",
        "",
        f"`POST /v1/chat/completions` (`{MODEL}`, non-streaming, `max_tokens` {MAX_TOKENS}, "
        "one short user message, a different `seed` per request) through gunicorn, the API "
        "submitting a job (hold placed, token and concurrency limits counted in Redis), a "
        "Celery worker calling Triton and settling the job, the result relayed back through "
        "Redis; next to the same prompt sent straight to Triton, and next to the round trip "
        "of a Celery task that does nothing (the floor any Celery hop costs).",
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
        f"{QUEUES} --pool {cfg.pool} --concurrency {cfg.concurrency}`, settings "
        "`gymbilling.settings.test`, `DATABASE_URL` with `conn_max_age` (persistent "
        "connections, as gunicorn's).",
        f"- Server: gunicorn as in the API benchmark but {cfg.server_workers} workers x "
        f"{cfg.server_threads} threads (gthread, production settings, persistent database "
        "connections).",
        f"- Own database `{urlsplit(result.url).path.lstrip('/')}` (dropped, migrated and "
        "seeded through the services: a price book, the catalog as `demo_seed` makes it, "
        f"organizations with limits nothing reaches and an inference key each: one billed by "
        f"every row but one, {SPREAD_ORGS} more for the row whose clients each bill their own "
        "organization; every other row's requests all lock one wallet) and Redis database "
        f"`{REDIS_URL.rsplit('/', 1)[1]}` (broker, results, limits and relay; flushed).",
        f"- Floor: `{FLOOR_TASK}` (Celery's built-in no-op task) sent with `apply_async()` "
        f"and waited on with `.get()`; direct Triton: `{CALLS}` sequential calls. Both after "
        f"{WARMUP_CALLS} warm-up calls. Direct Triton at more clients, and streamed: as "
        "many threads of this process as clients, each in a closed loop on one shared "
        "pool (the worker's client, as its threads share it), timed like the HTTP rows.",
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
        "Each row of the path next to direct Triton at the same concurrency (the engine "
        "queues requests the same way for both); the 1-client comparison is with the 200 "
        "sequential calls above, the rest with the threaded rows.",
        "",
        *added,
        "",
        "Streamed, to the first token: the path to its first chunk with content, direct "
        "Triton to its first response (each carries a token).",
        "",
        *added_ttft,
        "",
        "### CPU per request",
        "",
        "CPU time (the scheduler's runtime, from /proc) each part of the path used in a "
        "measured window, per request served in it: gunicorn, the Celery worker, the "
        "PostgreSQL backends of the bench database, Redis (the machine's one server, so "
        "anything else using it counts too) and Triton (server and Python-backend stubs). "
        f"Every part shares the same {cpus} CPUs, so {cpus} CPUs' worth of time divided by "
        "the total is the most requests per second this machine could serve, before any "
        "waiting. Other CPU load: the CPUs' worth used meanwhile by everything else (other "
        "people's work on a shared machine, the load generator); well above 0, the rates "
        "and latencies of that row are lower than this machine can do.",
        "",
        *cpu_lines,
        "",
        *(_interleaved_lines(rounds) if rounds else []),
        "### Where the time of one request goes (1 client)",
        "",
        "From each measured request's Job row (`queued_at`, `started_at`, `engine_ms`, "
        "`finished_at`, stamped by the API process and the worker) and the client's send and "
        "receive times, all on this machine's clock. Medians of different stages do not add "
        "up to the median of the whole; the means do.",
        "",
        "| stage | what it covers | p50 ms | mean ms |",
        "| --- | --- | ---: | ---: |",
        *(
            f"| {name} | {what} | {_fmt(p50)} | {_fmt(mean)} |"
            for name, what, p50, mean in result.stages
        ),
        "",
        *(
            [
                "### The same at 16 clients, one organization",
                "",
                "Here each stage includes its waits: for a worker thread and a CPU "
                "(dispatch), for the engine's queue (engine), for the wallet's row lock "
                "(settlement: every request of this row settles against one wallet). The "
                "stage that grows most from 1 to 16 clients is where requests queue.",
                "",
                "| stage | p50 ms | mean ms |",
                "| --- | ---: | ---: |",
                *(
                    f"| {name} | {_fmt(p50)} | {_fmt(mean)} |"
                    for name, _what, p50, mean in result.stages_16
                ),
                "",
            ]
            if result.stages_16
            else []
        ),
        "### Billing",
        "",
        *(f"- {k}: {v}" for k, v in result.billing.items()),
        "",
        "### Targets",
        "",
        f"- Added latency at p50, 1 client, at most {TARGET_ADDED_P50_MS:g} ms above the "
        f"Celery floor: {_fmt(over_floor)} ms above it — {_met(over_floor <= TARGET_ADDED_P50_MS)}"
        + (
            f"; interleaved (the three measured in turn, section above): "
            f"{_fmt(rounds.added_over_floor_ms)} ms — "
            f"{_met(rounds.added_over_floor_ms <= TARGET_ADDED_P50_MS)}. Of that, the "
            f"ledger's two transactions alone take {_fmt(rounds.p50_ms('ledger'))} ms "
            f"and a bare HTTP round trip {_fmt(rounds.p50_ms('http'))} ms at this speed, "
            f"leaving {_fmt(rounds.gateway_own_ms)} ms for the gateway's own work."
            if rounds
            else "."
        ),
        f"- At least {TARGET_RATE_16:g} requests/s end to end at 16 clients with every token "
        f"billed: {_fmt(sixteen.rate, 1)} requests/s, "
        f"{'every token billed' if billed else 'billing check failed'} — "
        f"{_met(sixteen.rate >= TARGET_RATE_16 and billed and errors_16)} (one organization: "
        "every request locks its one wallet; "
        + (
            f"with {spread.clients} organizations, one per client: {_fmt(spread.rate, 1)} "
            "requests/s)."
            if spread
            else "no run with more organizations)."
        ),
        *(
            [
                f"  At 16 clients every request cost {_fmt(sum(sixteen.cpu_ms.values()))} ms of "
                f"CPU across the parts of the path (table above), so {cpus} CPUs serve at most "
                f"{_fmt(cpus * 1000 / sum(sixteen.cpu_ms.values()), 0)} requests/s, and only with "
                f"nothing else running; {TARGET_RATE_16:g}/s needs at most "
                f"{_fmt(cpus * 1000 / TARGET_RATE_16, 1)} ms per request."
            ]
            if sixteen.cpu_ms
            else []
        ),
    ]
    return "\n".join(out) + "\n"
