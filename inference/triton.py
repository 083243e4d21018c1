"""The one client of Triton Inference Server (STYLE.md rule 13): the gateway calls only this.

It speaks TensorRT-LLM's `ensemble` interface (DESIGN.md, "Credits out") to a
pool of servers and returns what billing needs: the text and the engine's own
token counts. What must stay true, and why it is built the way it is:

- **Every request goes over the gRPC bidirectional stream** (`ModelStreamInfer`),
  streamed or not: the model is decoupled, so unary `ModelInfer` answers
  UNIMPLEMENTED and HTTP `/infer` answers 501, on the development engine and on
  a TensorRT-LLM deployment with `decoupled_mode=true` alike.
- **A stream carries one request at a time and is kept open between requests**
  (a small per-server pool of open streams, one channel per server). Opening a
  stream per request cost about 1 ms more per request than sending on an open
  one; the engine answers a short request in 2-4 ms. Keeping streams open has a
  price: Triton does not finish shutting down while a client holds a stream
  open, so a stream idle for `stream_idle_s` is closed, and every idle stream
  to a server is closed as soon as that server stops answering ready.
- **The caller's thread reads the stream itself** (no reader thread, no hand-off
  per token); one watchdog thread per process ends a stream whose caller asked
  to cancel, that stayed silent past `timeout_s`, or that ran past the
  caller's `deadline` (a job's run limit: Triton's own timeouts count silence
  only), and closes idle streams. A request that is not streamed is silent
  until its generation ends: with a deadline, only the deadline ends it.
- We drive gRPC through tritonclient's generated stubs (`service_pb2`,
  `service_pb2_grpc`) rather than `InferenceServerClient`: that class holds one
  stream per client, and `stop_stream(cancel_requests=True)` leaves gRPC's
  request-feeding thread blocked forever (one leaked thread per cancellation).
- Counts: `num_input_tokens` and `num_cached_tokens` repeat on every streamed
  response (take one); `num_output_tokens` counts its own response (sum them).
  `exclude_input_in_output` is always sent, so a non-streamed TensorRT-LLM
  response counts only generated tokens, as ours does.
- Errors are typed (`TritonError` and its subclasses, each with a `code`). An
  error raised after the engine delivered something carries `partial`: what
  the caller received, so billing charges exactly that. A connection error is
  retried on another ready server only before anything was delivered.
- Cancelling ends the gRPC stream, which cancels the request in Triton. Through
  an `ensemble` on Triton 2.51 (ours and TensorRT-LLM's) the engine does not
  see the cancellation and runs on to `max_tokens` or a stop word; the caller
  is still released at once with what was delivered, and `sent` says whether
  the engine got the request at all (the gateway bills a prompt taken but
  never counted by the model's tokenizer: inference/tasks.py).
"""

from __future__ import annotations

import codecs
import http.client
import inspect
import itertools
import logging
import math
import os
import queue
import re
import struct
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

logger = logging.getLogger(__name__)

# tritonclient's own channel settings (no message size limit, keepalive off:
# Triton refuses pings more often than every 5 minutes without data), plus a
# short reconnect backoff: gRPC's default grows to 120 s, which would keep a
# restarted server out of the pool long after it answers ready again.
_MAX_MESSAGE = 2**31 - 1
_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 2**31 - 1),
    ("grpc.keepalive_timeout_ms", 20000),
    ("grpc.keepalive_permit_without_calls", False),
    ("grpc.http2.max_pings_without_data", 2),
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]
# How often the watchdog looks at in-flight requests: the most a cancellation
# waits when the engine sends nothing (between tokens the caller checks itself).
_WATCH_INTERVAL_S = 0.05
_SWEEP_INTERVAL_S = 1.0
# A pool no request has used for this long stops having its servers checked
# and forgets their answers: its next request checks them as at first use.
# Pools live as long as the process (pool_for), including those of servers
# the catalog no longer names.
_FORGET_AFTER_IDLE_S = 60.0
# Triton prefixes an error from an ensemble step with the ensemble's name; the
# rest is the engine's own message, the part worth showing a user.
_ENSEMBLE_PREFIX = re.compile(r"^in ensemble '[^']*', ")
_INT_FORMATS = {"INT32": "<i", "INT64": "<q", "UINT32": "<I", "UINT64": "<Q"}


# -- errors -------------------------------------------------------------------


class TritonError(Exception):
    """Base of every error this module raises; `code` is machine-readable.

    `partial` is set when the engine had already delivered output: bill it.
    """

    code = "triton_error"

    def __init__(self, message: str, *, partial: GenerationResult | None = None):
        super().__init__(message)
        self.message = message
        self.partial = partial


class EngineUnavailable(TritonError):
    """No server is ready, or every attempt failed to connect before any output."""

    code = "engine_unavailable"


class EngineTimeout(TritonError):
    """The engine sent nothing for `timeout_s` (before the first response or between two;
    a request not streamed with a deadline waits for its one response until then)."""

    code = "engine_timeout"


class DeadlineExceeded(EngineTimeout):
    """The request was still running at the `deadline` its caller gave (a job's run limit),
    and was ended there (as a cancellation is: through an ensemble the engine runs on).
    `sent`: it had gone out to a server, whose engine took its prompt; `engine_ms`: from
    sending it to its end, delivered or not."""

    code = "job_deadline_exceeded"

    def __init__(
        self,
        message: str,
        *,
        partial: GenerationResult | None = None,
        sent: bool,
        engine_ms: int = 0,
    ):
        super().__init__(message, partial=partial)
        self.sent = sent
        self.engine_ms = engine_ms


class EngineError(TritonError):
    """The engine refused or failed the request; the message is the engine's."""

    code = "engine_error"


# -- requests and results -------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    max_tokens: int
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False


@dataclass(frozen=True)
class GenerationResult:
    """What the engine delivered. `finish_reason`: "stop", "length" or "cancelled".

    `input_tokens` and `output_tokens` are the engine's counts, the ones billed;
    `cached_input_tokens` is the part of the prompt served from the prefix cache
    (0 where the engine does not report it). `engine_ms` is wall time from
    sending the request to its final response. `sent`: the request went out to
    a server; a request cancelled after that and before any response has
    `sent` and no counts (the engine took its prompt, and through an ensemble
    goes on generating).
    """

    text: str
    input_tokens: int
    cached_input_tokens: int
    output_tokens: int
    engine_ms: int
    finish_reason: str
    server_url: str = ""
    sent: bool = False


def _pack(fmt: str, value, name: str) -> bytes:
    try:
        return struct.pack(fmt, value)
    except struct.error as exc:
        raise EngineError(f"{name}={value!r} is out of range for the engine: {exc}.") from exc


def _bytes_tensor(items: Sequence[str], name: str) -> bytes:
    """Triton's BYTES wire format: each element as a 4-byte little-endian length, then the bytes."""
    parts = []
    for item in items:
        try:
            data = item.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise EngineError(f"{name} must be valid UTF-8 text.") from exc
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def _encode(model_name: str, request: GenerationRequest, request_id: str):
    """The ensemble's tensors, batched: each [1] input travels as [1, 1], word lists as [1, n]."""
    message = service_pb2.ModelInferRequest(model_name=model_name, id=request_id)

    def add(name: str, datatype: str, raw: bytes, width: int = 1) -> None:
        tensor = message.inputs.add()
        tensor.name = name
        tensor.datatype = datatype
        tensor.shape.extend((1, width))
        message.raw_input_contents.append(raw)

    add("text_input", "BYTES", _bytes_tensor([request.prompt], "prompt"))
    add("max_tokens", "INT32", _pack("<i", request.max_tokens, "max_tokens"))
    add("stream", "BOOL", b"\x01" if request.stream else b"\x00")
    add("exclude_input_in_output", "BOOL", b"\x01")
    add("return_num_input_tokens", "BOOL", b"\x01")
    add("return_num_output_tokens", "BOOL", b"\x01")
    if request.temperature is not None:
        add("temperature", "FP32", _pack("<f", request.temperature, "temperature"))
    if request.top_p is not None:
        add("top_p", "FP32", _pack("<f", request.top_p, "top_p"))
    if request.top_k is not None:
        add("top_k", "INT32", _pack("<i", request.top_k, "top_k"))
    if request.seed is not None:
        add("seed", "UINT64", _pack("<Q", request.seed, "seed"))
    # The ensemble's own inputs (FP32), OpenAI's meaning: subtracted from the logit of each
    # token already generated, once (presence) or per occurrence (frequency).
    if request.presence_penalty is not None:
        add("presence_penalty", "FP32", _pack("<f", request.presence_penalty, "presence_penalty"))
    if request.frequency_penalty is not None:
        add(
            "frequency_penalty",
            "FP32",
            _pack("<f", request.frequency_penalty, "frequency_penalty"),
        )
    if request.stop:
        add("stop_words", "BYTES", _bytes_tensor(request.stop, "stop"), width=len(request.stop))
    # Without it the final flag of a stream rides on no response at all.
    message.parameters["triton_enable_empty_final_response"].bool_param = True
    return message


def engine_text(text: str) -> str:
    """The engine's text with each NUL (U+0000) made U+FFFD, as the decoder makes bytes that
    are no UTF-8.

    A byte-fallback tokenizer can decode a token to a NUL, which JSON carries
    but PostgreSQL's text cannot: an asynchronous job's output that held one
    could never be stored, and its job never settled. Replaced here, where
    the text enters, a streamed delta, an answer and a stored output say the
    same, character for character (a job's progress counts characters).
    """
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


class _Accumulator:
    """Everything one request delivered so far, whichever response carried it."""

    def __init__(self, request: GenerationRequest, server_url: str):
        self.request = request
        self.server_url = server_url
        # A token may end inside a multi-byte character; the decoder holds the
        # bytes until the character is complete. Bytes that are no UTF-8 come
        # out as U+FFFD, and so does a NUL (engine_text).
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.parts: list[str] = []
        self.input_tokens = 0
        self.cached_input_tokens = 0
        self.output_tokens = 0
        self.responses = 0
        self.started = 0.0

    def add(self, response) -> str:
        """Reads one ModelInferResponse; returns its text delta."""
        self.responses += 1
        delta = ""
        for output, raw in zip(response.outputs, response.raw_output_contents, strict=False):
            name = output.name
            if name == "text_output":
                if len(raw) >= 4:
                    (length,) = struct.unpack_from("<I", raw)
                    delta = engine_text(self._decoder.decode(raw[4 : 4 + length]))
                    if delta:
                        self.parts.append(delta)
            elif name in ("num_output_tokens", "num_input_tokens", "num_cached_tokens"):
                fmt = _INT_FORMATS.get(output.datatype)
                if fmt is None or len(raw) < struct.calcsize(fmt):
                    continue
                (value,) = struct.unpack_from(fmt, raw)
                if name == "num_output_tokens":
                    self.output_tokens += value
                elif name == "num_input_tokens":
                    self.input_tokens = value
                else:
                    self.cached_input_tokens = value
        return delta

    def result(self, finish_reason: str | None = None) -> GenerationResult:
        tail = self._decoder.decode(b"", final=True)
        if tail:
            self.parts.append(tail)
        if finish_reason is None:
            finish_reason = "length" if self.output_tokens >= self.request.max_tokens else "stop"
        return GenerationResult(
            text="".join(self.parts),
            input_tokens=self.input_tokens,
            cached_input_tokens=self.cached_input_tokens,
            output_tokens=self.output_tokens,
            engine_ms=round((time.perf_counter() - self.started) * 1000),
            finish_reason=finish_reason,
            server_url=self.server_url,
            sent=True,
        )

    def partial(self) -> GenerationResult | None:
        """What was delivered before a failure; its finish_reason is "error"."""
        return self.result("error") if self.responses else None


# -- streams, servers and the watchdog ------------------------------------------


class _Stream:
    """One open `ModelStreamInfer` call that carries one request at a time."""

    def __init__(self, stub):
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        # gRPC feeds the call from this iterator on a thread of its own; the
        # None that close() sends ends that thread.
        self.call = stub.ModelStreamInfer(iter(self._outbox.get, None))
        self.idle_since = time.monotonic()
        self.abort_reason: str | None = None

    def send(self, message) -> None:
        self._outbox.put(message)

    def usable(self) -> bool:
        return self.abort_reason is None and not self.call.done()

    def abort(self, reason: str) -> None:
        """From any thread: ends the call; the reader's next() raises CANCELLED."""
        if self.abort_reason is None:
            self.abort_reason = reason
        self.call.cancel()

    def close(self) -> None:
        self._outbox.put(None)
        self.call.cancel()


class _Server:
    def __init__(self, url: str, index: int, metrics_url: str = ""):
        self.url = url
        self.index = index
        self.metrics_url = metrics_url
        self.channel = grpc.insecure_channel(url, options=_CHANNEL_OPTIONS)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)
        self.check_lock = threading.Lock()
        self.ready = False
        self.checked_at: float | None = None  # None: unknown, check before use
        # Moved on by a connection error: a check that began before it does
        # not record its answer, which may predate the failure.
        self.epoch = 0
        self.inflight = 0
        self.picked = 0  # requests ever routed here (only grows): see _scrape_load_and_release
        self.idle: list[_Stream] = []  # LIFO: the most recently used stream first
        # What other clients (other processes) have running on it, from its
        # metrics (_scrape_load_and_release): `others` as of `load_at` (None:
        # never read, or the last reading failed); `read_at`: when the last
        # reading ended, read or failed (the next is due load_ttl_s later).
        self.load_lock = threading.Lock()
        self.others: int | None = None
        self.load_at: float | None = None
        self.read_at: float | None = None
        self.load_failing = False


@dataclass(eq=False)
class _Flight:
    stream: _Stream
    cancel: threading.Event | None
    heard_by: float  # the next response is due by then (timeout_s of silence)
    ends_by: float  # the caller's deadline (math.inf: none)


class _Watchdog:
    """One daemon thread per process: ends streams that were cancelled, went silent or ran
    past their deadline, closes streams left idle, and has expired readiness answers
    checked again.

    It ticks at a fixed pace instead of being woken per request: waking a thread
    for every request made each one wait for the GIL, about 5 ms (the default
    switch interval) on a request the engine answers in 3.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._flights: set[_Flight] = set()
        self._pools: weakref.WeakSet[ServerPool] = weakref.WeakSet()
        self._thread: threading.Thread | None = None

    def _ensure_running(self) -> None:
        # Called with the lock held.
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name="triton-watchdog", daemon=True)
            self._thread.start()

    def add_pool(self, pool: ServerPool) -> None:
        with self._lock:
            self._pools.add(pool)
            self._ensure_running()

    def remove_pool(self, pool: ServerPool) -> None:
        with self._lock:
            self._pools.discard(pool)

    def register(
        self, stream: _Stream, cancel: threading.Event | None, heard_by: float, ends_by: float
    ) -> _Flight:
        flight = _Flight(stream, cancel, heard_by, ends_by)
        with self._lock:
            self._flights.add(flight)
            self._ensure_running()
        return flight

    def unregister(self, flight: _Flight) -> None:
        # Under the lock: once this returns, the watchdog never touches the stream.
        with self._lock:
            self._flights.discard(flight)

    def _run(self) -> None:
        last_sweep = time.monotonic()
        while True:
            time.sleep(_WATCH_INTERVAL_S)
            now = time.monotonic()
            try:
                with self._lock:
                    if not self._flights and not self._pools:
                        self._thread = None
                        return
                    self._watch(now)
                    pools = list(self._pools)
                for pool in pools:
                    pool._refresh(now)
                if now - last_sweep >= _SWEEP_INTERVAL_S:
                    last_sweep = now
                    for pool in pools:
                        pool._close_idle_streams(now)
            except Exception:  # the thread must outlive any one bad sweep
                logger.exception("triton watchdog sweep failed")

    def _watch(self, now: float) -> None:
        for flight in list(self._flights):
            if flight.cancel is not None and flight.cancel.is_set():
                flight.stream.abort("cancelled")
            elif now > flight.ends_by:
                flight.stream.abort("deadline")
            elif now > flight.heard_by:
                flight.stream.abort("timeout")
            else:
                continue
            self._flights.discard(flight)


_watchdog = _Watchdog()


def _start_holding(lock: threading.Lock, target: Callable, server: _Server, what: str) -> None:
    """Runs target(server) in a thread of its own, which releases `lock`, held by the caller
    (released here if the thread cannot start)."""
    try:
        threading.Thread(
            target=target, args=(server,), name=f"triton-{what}-{server.url}", daemon=True
        ).start()
    except BaseException:
        lock.release()
        raise


class _Once:
    """`generate`'s after_send: called after the first send only, not again on a retry."""

    def __init__(self, call: Callable[[], bool]):
        self._call = call
        self.called = False

    def __call__(self) -> bool:
        self.called = True
        return self._call()


class _Retry(Exception):
    """A connection failed before the engine delivered anything: try another server."""


# -- the pool -------------------------------------------------------------------


class ServerPool:
    """Triton servers that serve one model; `generate()` is safe from any number of threads.

    Readiness (server live and ready, model ready) is checked again every
    `ready_ttl_s` per server while it answers ready, and every
    `not_ready_ttl_s` while it does not (a restarted server is back in the
    pool within about a second), each check bounded by `connect_timeout_s`;
    in the background, so requests use the last answer and never wait on a
    check, except a server's first (and its next after a connection error). A
    request goes to the ready server with the fewest requests in flight (ties
    in turn): this process's own, plus, when the pool has `metrics_urls` (one
    per server, Triton's Prometheus endpoint) and more than one server, the
    requests every other client has on it, read from the server's metrics
    every `load_ttl_s` in the background (engine_load). While any candidate's
    load is unknown (not read yet, its last reading failed, or older than
    three times that), all are compared by this process's counts alone, as
    without metrics. A connection error before anything was
    delivered is retried, up to `retries` times, on another ready server (the
    same one if it is the only one and answers ready again). `timeout_s` bounds
    the silence before the first response and between two responses; of a
    request not streamed (one response, when its generation ends) the
    caller's `deadline`, when given, bounds it instead (_first_heard_by).
    """

    def __init__(
        self,
        urls: Sequence[str],
        model_name: str = "ensemble",
        *,
        timeout_s: float = 60,
        connect_timeout_s: float = 2,
        ready_ttl_s: float = 5,
        not_ready_ttl_s: float = 1,
        retries: int = 2,
        stream_idle_s: float = 2,
        metrics_urls: Sequence[str] = (),
        load_ttl_s: float = 1,
    ):
        if not urls:
            raise ValueError("a ServerPool needs at least one gRPC url (host:port)")
        if metrics_urls and len(metrics_urls) != len(urls):
            raise ValueError("metrics_urls, when given, has one url per gRPC url, in order")
        self.urls = tuple(urls)
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.ready_ttl_s = ready_ttl_s
        self.not_ready_ttl_s = not_ready_ttl_s
        self.retries = retries
        self.stream_idle_s = stream_idle_s
        self.metrics_urls = tuple(metrics_urls)
        self.load_ttl_s = load_ttl_s
        self._servers = [
            _Server(url, index, metrics_url)
            for index, (url, metrics_url) in enumerate(
                itertools.zip_longest(self.urls, self.metrics_urls, fillvalue="")
            )
        ]
        # With one server there is nothing to choose: its load is not read.
        self._reads_load = len(self._servers) > 1 and bool(self.metrics_urls)
        self._lock = threading.Lock()
        self._turn = itertools.count()
        self._ids = itertools.count(1)
        self._closed = False
        self.used_at = time.monotonic()
        _watchdog.add_pool(self)

    def __repr__(self) -> str:
        return f"ServerPool({list(self.urls)!r}, {self.model_name!r})"

    # -- public ---------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        *,
        on_delta: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        request_id: str = "",
        after_send: Callable[[], bool] | None = None,
        deadline: float | None = None,
    ) -> GenerationResult:
        """Runs one generation; see the module docstring for the guarantees.

        With `request.stream`, `on_delta(text)` is called in this thread for each
        token delta as it arrives. When `cancel` is set, the request is ended and
        what was delivered so far comes back with finish_reason "cancelled".
        `after_send()` is called once, in this thread, as soon as the request
        first went out to a server and before any response is read: work that
        may overlap the engine's. If it returns False the request is abandoned
        (ended on the server; the result is empty, finish_reason "cancelled");
        if it raises, the request is ended and the exception propagates. While
        it runs responses queue up unread, so for a request that finished
        meanwhile `engine_ms` includes the rest of its run. A request still
        running at `deadline` (time.monotonic(), retries included) is ended
        there: DeadlineExceeded, with what was delivered. A request not streamed
        with a deadline is not timed out for its silence before its one response.
        Raises EngineUnavailable, EngineTimeout (DeadlineExceeded) or EngineError.
        """
        if self._closed:
            raise EngineUnavailable(f"{self!r} is closed.")
        if cancel is not None and cancel.is_set():
            return GenerationResult("", 0, 0, 0, 0, "cancelled")
        message = _encode(self.model_name, request, request_id or f"gym-{next(self._ids)}")
        hook = _Once(after_send) if after_send is not None else None
        tried: set[_Server] = set()
        failures: list[str] = []
        ends_by = math.inf if deadline is None else deadline
        for attempt in range(self.retries + 1):
            if time.monotonic() >= ends_by:
                raise DeadlineExceeded(
                    "The request reached its deadline before any server took it.", sent=False
                )
            server = self._pick(tried)
            if server is None:
                break
            tried.add(server)
            try:
                return self._attempt(server, message, request, on_delta, cancel, hook, ends_by)
            except _Retry as exc:
                failures.append(f"{server.url}: {exc}")
                # Check it again before the next pick: a restarted server is
                # ready again, a dead one drops out.
                with self._lock:
                    server.epoch += 1
                server.checked_at = None
                self._close_idle_streams_of(server)
                if attempt < self.retries:
                    logger.warning(
                        "triton %s failed before any output (%s); retrying", server.url, exc
                    )
        detail = "; ".join(failures) if failures else "none answered ready"
        raise EngineUnavailable(
            f"No Triton server could serve {self.model_name!r} from {list(self.urls)} ({detail})."
        )

    def ready_urls(self) -> list[str]:
        """The servers whose last answer was ready (refreshed: ready_ttl_s, not_ready_ttl_s)."""
        return [server.url for server in self._servers if self._is_ready(server)]

    def close(self) -> None:
        """Closes every stream and channel; lets Triton servers shut down promptly."""
        self._closed = True
        _watchdog.remove_pool(self)
        with self._lock:
            streams = [stream for server in self._servers for stream in server.idle]
            for server in self._servers:
                server.idle.clear()
        for stream in streams:
            stream.close()
        for server in self._servers:
            server.channel.close()

    # -- routing and readiness -------------------------------------------------

    def _pick(self, tried: set[_Server]) -> _Server | None:
        self.used_at = time.monotonic()
        ready = [server for server in self._servers if self._is_ready(server)]
        fresh = [server for server in ready if server not in tried]
        candidates = fresh or ready
        if not candidates:
            return None
        count = len(self._servers)
        now = time.monotonic()
        # Other clients' load counts only when every candidate's is known: a
        # server whose reading failed or is stale (its metrics endpoint
        # overloaded, say) must not look idle next to servers with readings.
        # Then, as without metrics, this process's own requests decide.
        known: dict[_Server, int] = {}
        if self._reads_load:
            others = [self._others(s, now) for s in candidates]
            if None not in others:
                known = dict(zip(candidates, others, strict=True))
        with self._lock:
            turn = next(self._turn)
            # A server whose answer expired (being checked again) only when no
            # other will do: it may have stopped answering since.
            server = min(
                candidates,
                key=lambda s: (
                    not self._answer_holds(s),
                    s.inflight + known.get(s, 0),
                    (s.index - turn) % count,
                ),
            )
            server.inflight += 1
            server.picked += 1
        return server

    def _others(self, server: _Server, now: float) -> int | None:
        """Other clients' requests on the server from its last reading; None when unknown
        (never read, the last reading failed, or it is older than 3 * load_ttl_s)."""
        load_at, others = server.load_at, server.others
        if load_at is None or others is None or now - load_at > 3 * self.load_ttl_s:
            return None
        return others

    def _answer_holds(self, server: _Server) -> bool:
        checked_at = server.checked_at
        ttl = self.ready_ttl_s if server.ready else self.not_ready_ttl_s
        return checked_at is not None and time.monotonic() - checked_at < ttl

    def _is_ready(self, server: _Server) -> bool:
        # The last answer, however old: the watchdog has it checked again in
        # the background once it expires (_refresh), so a request never waits
        # on a check, of a server that hangs least of all (up to
        # connect_timeout_s). Only a server with no answer yet (first use, or
        # after a connection error) is checked here, by one thread while the
        # others wait for its answer.
        if server.checked_at is not None:
            return server.ready
        with server.check_lock:
            if server.checked_at is not None:
                return server.ready
            return self._check(server)

    def _refresh(self, now: float) -> None:
        """From the watchdog: checks again, each in a thread of its own, servers whose answer
        expired; one check per server at a time (its check_lock, released by that thread).
        A pool left unused forgets its answers instead (_FORGET_AFTER_IDLE_S)."""
        idle = now - self.used_at > _FORGET_AFTER_IDLE_S
        if self._reads_load and not idle:
            self._refresh_load(now)
        for server in self._servers:
            if self._closed or server.checked_at is None:
                continue
            if not idle and self._answer_holds(server):
                continue
            if not server.check_lock.acquire(blocking=False):
                continue
            if idle:
                server.checked_at = None
                server.check_lock.release()
                continue
            _start_holding(server.check_lock, self._check_and_release, server, "ready")

    def _refresh_load(self, now: float) -> None:
        """Reads again, each in a thread of its own, the load of servers read load_ttl_s ago."""
        for server in self._servers:
            if self._closed or not server.metrics_url:
                continue
            if server.read_at is not None and now - server.read_at < self.load_ttl_s:
                continue
            if not server.load_lock.acquire(blocking=False):
                continue
            _start_holding(server.load_lock, self._scrape_load_and_release, server, "load")

    def _scrape_load_and_release(self, server: _Server) -> None:
        try:
            before, picked_before = server.inflight, server.picked
            try:
                load = engine_load(
                    scrape_samples(server.metrics_url, timeout_s=self.connect_timeout_s)
                )
                if load is None:
                    raise ValueError("its metrics report no load (no pending or active requests)")
            except Exception as exc:  # whatever the endpoint sent: this thread ends here
                # Unknown, not 0 (_pick then routes by this process's counts);
                # not ready is the readiness check's to say. Logged when it
                # starts failing, not every load_ttl_s.
                server.others = None
                if not server.load_failing:
                    server.load_failing = True
                    logger.warning("triton %s: load unknown: %r", server.url, exc)
                return
            if server.load_failing:
                server.load_failing = False
                logger.info("triton %s: load read again", server.url)
            # Triton counts this process's requests too: at most those in
            # flight when the reading began and those routed here while it
            # ran (one that started and ended within it may have been
            # counted, yet is in neither `before` nor the count after it, and
            # would read as another client's until the next reading, drawing
            # this process's requests to the other servers). Erring towards
            # fewer others errs towards this process's own counts.
            ours = before + server.picked - picked_before
            server.others = max(0, load - ours)
            server.load_at = time.monotonic()
        finally:
            server.read_at = time.monotonic()
            server.load_lock.release()

    def _check_and_release(self, server: _Server) -> None:
        try:
            if not self._closed:
                self._check(server)
        except Exception:
            if not self._closed:  # a pool closed meanwhile has closed its channels
                logger.exception("triton %s: readiness check failed", server.url)
        finally:
            server.check_lock.release()

    def _check(self, server: _Server) -> bool:
        """Asks the server and records its answer; called with its check_lock held."""
        first, epoch = server.checked_at is None, server.epoch
        ready, why = self._probe(server)
        if self._closed:  # its channels were closed under the check
            return False
        if server.epoch != epoch:  # a connection error since: this answer may predate it
            return ready
        if ready != server.ready or first:
            log = logger.info if ready else logger.warning
            log("triton %s %s", server.url, "is ready" if ready else f"is not ready: {why}")
        server.ready, server.checked_at = ready, time.monotonic()
        if not ready:
            # A server shutting down waits for its open streams: let it go.
            self._close_idle_streams_of(server)
        return ready

    def _probe(self, server: _Server) -> tuple[bool, str]:
        return _probe(server.stub, self.model_name, self.connect_timeout_s)

    # -- streams ---------------------------------------------------------------

    def _checkout(self, server: _Server) -> _Stream:
        while True:
            with self._lock:
                stream = server.idle.pop() if server.idle else None
            if stream is None:
                return _Stream(server.stub)
            if stream.usable():
                return stream
            stream.close()

    def _release(self, server: _Server, stream: _Stream, reusable: bool) -> None:
        with self._lock:
            server.inflight -= 1
            if reusable and not self._closed and stream.usable():
                stream.idle_since = time.monotonic()
                server.idle.append(stream)
                return
        stream.close()

    def _close_idle_streams_of(self, server: _Server) -> None:
        with self._lock:
            streams, server.idle = server.idle, []
        for stream in streams:
            stream.close()

    def _close_idle_streams(self, now: float) -> None:
        expired: list[_Stream] = []
        with self._lock:
            for server in self._servers:
                keep = []
                for stream in server.idle:
                    fresh = now - stream.idle_since < self.stream_idle_s
                    (keep if fresh else expired).append(stream)
                server.idle = keep
        for stream in expired:
            stream.close()

    # -- one attempt on one server ---------------------------------------------

    def _first_heard_by(self, request: GenerationRequest, ends_by: float) -> float:
        """When the first response is due (time.monotonic()).

        A request that is not streamed has one response, sent when its
        generation ends: silence until then says nothing of the engine, and
        `timeout_s` would cut every generation longer than it (the caller
        fails it, billing nothing, while the engine runs on to its end). Its
        caller's deadline bounds it instead; without one, `timeout_s` does, as
        nothing else would.
        """
        if not request.stream and ends_by != math.inf:
            return ends_by
        return time.monotonic() + self.timeout_s

    def _attempt(
        self, server, message, request, on_delta, cancel, hook, ends_by: float
    ) -> GenerationResult:
        try:
            stream = self._checkout(server)
        except BaseException:
            with self._lock:
                server.inflight -= 1
            raise
        acc = _Accumulator(request, server.url)
        flight = _watchdog.register(stream, cancel, self._first_heard_by(request, ends_by), ends_by)
        reusable = False
        try:
            acc.started = time.perf_counter()
            stream.send(message)
            if hook is not None and not hook.called:
                try:
                    go_on = hook()
                except BaseException:
                    stream.abort("cancelled")
                    raise
                if not go_on:
                    stream.abort("cancelled")
                    return GenerationResult("", 0, 0, 0, 0, "cancelled", server.url, sent=True)
            for reply in stream.call:
                flight.heard_by = time.monotonic() + self.timeout_s
                response = reply.infer_response
                if response.id and response.id != message.id:
                    # A late response of an earlier request on this reused
                    # stream: never bill (or relay) one request's tokens to another.
                    logger.warning("triton %s: dropped a response of %r", server.url, response.id)
                    continue
                final = response.parameters.get("triton_final_response")
                final = final is not None and final.bool_param
                if reply.error_message:
                    # The error is the request's last response; the stream lives on.
                    reusable = final
                    raise EngineError(
                        _ENSEMBLE_PREFIX.sub("", reply.error_message), partial=acc.partial()
                    )
                delta = acc.add(response)
                if delta and request.stream and on_delta is not None:
                    on_delta(delta)
                if final:
                    reusable = True
                    return acc.result()
                if cancel is not None and cancel.is_set():
                    stream.abort("cancelled")
                    return acc.result("cancelled")
            failure = "the server closed the stream before the final response"
            if acc.responses:
                raise EngineError(
                    f"Triton {server.url} {failure} after {acc.output_tokens} tokens.",
                    partial=acc.partial(),
                )
            raise _Retry(failure)
        except grpc.RpcError as exc:
            if stream.abort_reason == "cancelled":
                return acc.result("cancelled")
            if stream.abort_reason == "deadline":
                raise DeadlineExceeded(
                    f"The request ran past its deadline and was ended after "
                    f"{acc.output_tokens} tokens (Triton {server.url}).",
                    partial=acc.partial(),
                    sent=True,
                    engine_ms=round((time.perf_counter() - acc.started) * 1000),
                ) from None
            if stream.abort_reason == "timeout":
                raise EngineTimeout(
                    f"Triton {server.url} sent nothing for {self.timeout_s:g} s.",
                    partial=acc.partial(),
                ) from None
            failure = f"{exc.code().name}: {exc.details()}"
            if acc.responses:
                raise EngineError(
                    f"Triton {server.url} failed after {acc.output_tokens} tokens ({failure}).",
                    partial=acc.partial(),
                ) from None
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise _Retry(failure) from None
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise EngineTimeout(f"Triton {server.url}: {failure}") from None
            raise EngineError(f"Triton {server.url}: {failure}") from None
        finally:
            _watchdog.unregister(flight)
            self._release(server, stream, reusable)


def _probe(stub, model_name: str, timeout: float) -> tuple[bool, str]:
    """Whether a server is live and ready and serves the model ready; if not, why."""
    try:
        if not stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=timeout).live:
            return False, "server not live"
        if not stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=timeout).ready:
            return False, "server not ready"
        model = service_pb2.ModelReadyRequest(name=model_name)
        if not stub.ModelReady(model, timeout=timeout).ready:
            return False, f"model {model_name!r} not ready"
    except grpc.RpcError as exc:
        return False, f"{exc.code().name}: {exc.details()}"
    return True, ""


# -- pools by url, process-wide -------------------------------------------------

_pools: dict[tuple, ServerPool] = {}
_pools_lock = threading.Lock()


_POOL_DEFAULTS = {
    name: parameter.default
    for name, parameter in inspect.signature(ServerPool).parameters.items()
    if parameter.default is not inspect.Parameter.empty
}


def pool_for(urls: Sequence[str], model_name: str = "ensemble", **options) -> ServerPool:
    """The process's ServerPool for these urls, model and options (built once, then shared).

    The gateway builds pools from the model catalog on every request; this keeps
    one set of channels and open streams per pool.
    """
    metrics = options.pop("metrics_urls", None) or ()
    if len(urls) > 1 and metrics:
        # From the catalog, written by whatever wrote the row: a list that
        # does not match the servers would make every job on the pool fail,
        # so it is left out (routing by this process's counts), and said.
        if len(metrics) == len(urls) and all(isinstance(url, str) for url in metrics):
            options["metrics_urls"] = tuple(metrics)
        else:
            logger.warning(
                "metrics urls %r do not match the servers %r one for one: not used",
                metrics,
                list(urls),
            )
    # One server, or none given: the same pool as without (nothing to read).
    # Likewise an option at ServerPool's default (the gateway passes its
    # settings, which are the defaults unless set): one pool, not two.
    options = {name: value for name, value in options.items() if _POOL_DEFAULTS.get(name) != value}
    key = (tuple(urls), model_name, tuple(sorted(options.items())))
    pool = _pools.get(key)
    if pool is None:
        with _pools_lock:
            pool = _pools.get(key)
            if pool is None:
                pool = _pools[key] = ServerPool(list(urls), model_name, **options)
    return pool


def close_pools() -> None:
    """Closes every pool `pool_for` built (worker shutdown, tests)."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()


def _after_fork_in_child() -> None:
    # gRPC channels and threads do not survive fork: a child (a Celery prefork
    # worker) starts with no pools and its own watchdog. Locks are new too: one
    # may have been held by a thread that does not exist in the child.
    global _watchdog, _pools_lock
    _pools.clear()
    _pools_lock = threading.Lock()
    _watchdog = _Watchdog()


os.register_at_fork(after_in_child=_after_fork_in_child)


# -- metrics ----------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One series of a Prometheus text exposition: its name, its labels and its value."""

    name: str
    labels: dict[str, str]
    value: float


_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[Sample]:
    """The samples of a Prometheus text exposition (comments and unparsable lines skipped)."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        name, labels, value = match.groups()
        try:
            number = float(value)
        except ValueError:
            continue
        samples.append(Sample(name, dict(_LABEL.findall(labels or "")), number))
    return samples


def scrape_samples(metrics_url: str, *, timeout_s: float = 2.0) -> list[Sample]:
    """Triton's Prometheus metrics, series by series. Raises EngineUnavailable when the
    endpoint does not answer."""
    try:
        with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
            text = response.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, http.client.HTTPException, ValueError) as exc:
        # ValueError: not a url urllib can open; HTTPException: a broken answer.
        raise EngineUnavailable(f"Triton metrics at {metrics_url} did not answer: {exc!r}") from exc
    return parse_metrics(text)


def scrape_metrics(metrics_url: str, *, timeout_s: float = 2.0) -> dict[str, float]:
    """Triton's Prometheus metrics, each name summed over its series (models, labels).

    E.g. `nv_inference_request_success`, `nv_inference_queue_duration_us`,
    `gym_engine_output_tokens_total`. Raises EngineUnavailable when the
    endpoint does not answer.
    """
    totals: dict[str, float] = {}
    for sample in scrape_samples(metrics_url, timeout_s=timeout_s):
        totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals


# TensorRT-LLM's backend reports its executor's requests in this gauge family:
# request_type `active` (every request the executor holds, up to `max`),
# `scheduled` (those in this iteration's batch), `context`, `max`, and on
# newer backends `waiting` (active - scheduled: a part of active, not added
# to it). Requests queued in the executor beyond `max` are not exported. The
# development engine reports the same family.
TRTLLM_REQUESTS = "nv_trt_llm_request_metrics"
# Triton's own: requests queued in front of a model, before its backend has them.
TRITON_PENDING = "nv_inference_pending_request_count"


def engine_load(samples: Sequence[Sample]) -> int | None:
    """Requests a server holds, over all its models: Triton's pending requests plus the
    TensorRT-LLM executors' active ones; None when its metrics carry neither (values that
    are not finite numbers are skipped)."""
    load, seen = 0.0, False
    for sample in samples:
        if sample.name == TRITON_PENDING or (
            sample.name == TRTLLM_REQUESTS and sample.labels.get("request_type") == "active"
        ):
            seen = True
            if math.isfinite(sample.value):
                load += sample.value
    return int(load) if seen else None


# -- one server, for operators ---------------------------------------------------------


@dataclass
class ServerReport:
    """What `manage.py triton_status` shows of one server: readiness per model and, from its
    metrics when it has a url, its load and request counts (None: not read)."""

    url: str
    metrics_url: str
    models: dict[str, str]  # model name -> "" when ready, else why not
    load: int | None = None
    requests_ok: int | None = None
    requests_failed: int | None = None
    metrics_error: str = ""

    @property
    def ready(self) -> bool:
        return all(why == "" for why in self.models.values())


def server_report(
    url: str, model_names: Sequence[str], metrics_url: str = "", *, timeout_s: float = 2.0
) -> ServerReport:
    """Asks one server, now, whether it serves each model, and reads its metrics."""
    with grpc.insecure_channel(url, options=_CHANNEL_OPTIONS) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        models = {}
        for name in model_names:
            _, why = _probe(stub, name, timeout_s)
            models[name] = why
    report = ServerReport(url, metrics_url, models)
    if metrics_url:
        try:
            samples = scrape_samples(metrics_url, timeout_s=timeout_s)
        except Exception as exc:  # an operator's report says what went wrong, whatever it was
            report.metrics_error = str(exc) or repr(exc)
        else:
            report.load = engine_load(samples)
            totals = {}
            for sample in samples:
                if sample.labels.get("model") in models and math.isfinite(sample.value):
                    totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            report.requests_ok = int(totals.get("nv_inference_request_success", 0))
            report.requests_failed = int(totals.get("nv_inference_request_failure", 0))
    return report
