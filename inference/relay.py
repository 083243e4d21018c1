"""Tokens from the worker to the waiting API process, and cancellations back, through Redis.

Tokens travel in a stream, not pub/sub: the worker may publish before the API
process starts reading, and a stream keeps every event until it is read (or
expires). A cancellation is a key (`relay_cancel`) that the worker's process
polls for every job it runs (`relay_cancel_watch`), whether the job is
waiting for the engine, streaming, or not streaming at all. Its value says
who asked (CancelOrigin): the client, or the gateway that stopped waiting,
which the worker bills differently (inference.tasks). A job's run holds
a lease (`relay_run_lease`) that the same poller keeps alive, so that a
second message for a job whose first run is alive is told from one handed
back after its worker died.

A streamed job's reader (the API process serving its SSE response) keeps a
marker alive while it reads (`relay_events(reader=True)`), and the same
poller cancels a streamed job whose marker lapsed: the cancel a client that
hangs up sends comes from the API process, which may die (killed after its
graceful timeout, out of memory) with nobody left to send it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from django.conf import settings
from redis.exceptions import RedisError

from accounts.redis import get_redis

logger = logging.getLogger(__name__)

# How long a job's stream outlives its last event once that event is its final one
# ("done", "error"): long enough for its reader to read the end.
STREAM_TTL_SECONDS = 600
MAX_EVENTS = 100_000
# How often a worker process asks Redis whether any of its running jobs was
# cancelled: one MGET for all of them, so the cost does not grow with tokens
# or jobs. A cancellation waits at most this long, plus the Triton watchdog's
# tick, before the engine request is ended.
CANCEL_POLL_S = 0.1
# Written to a streamed response while nothing else is, so that a client that
# went away is noticed (a write to its closed connection fails) even while the
# job waits for its first token.
HEARTBEAT = {"type": "heartbeat"}


def _stream(job_id: str) -> str:
    return f"jobstream:{job_id}"


def _cancel_key(job_id: str) -> str:
    return f"jobcancel:{job_id}"


def _reader_key(job_id: str) -> str:
    return f"jobreader:{job_id}"


def reader_ttl_s() -> float:
    """How long a streamed job's reader marker lives unless its reader renews it, and how
    long a worker waits for it to appear: INFERENCE_STREAM_READER_TTL_SECONDS. The web
    processes and the workers must agree on it."""
    return settings.INFERENCE_STREAM_READER_TTL_SECONDS


def _run_lease_key(job_pk: int) -> str:
    # By the primary key: the one thing every task message names (one from an
    # API of an earlier release carries no public id).
    return f"jobrun:{job_pk}"


# A job's run lease (relay_run_lease) lives this long unless its worker's
# process renews it, which it does every RUN_LEASE_RENEW_S while the run
# lasts: five renewals may be missed (a stalled process, a slow Redis) before
# a live run's lease lapses, and a message handed back after its worker died
# waits at most this long before it runs.
RUN_LEASE_S = 5.0
RUN_LEASE_RENEW_S = 1.0

# Renews the leases whose token is still theirs: one whose run stalled past
# its life may have been taken by a run after it, whose lease is not ours.
# One that is gone is taken again, for the same token: it lapsed while its
# run lived on (Redis failed for longer than RUN_LEASE_S, or lost its keys;
# a run that started while Redis failed never had it). Else it stayed gone
# for the rest of the run, whose job the orphaned jobs' sweep then took for a
# dead worker's and ended live (jobs_orphaned_sweep).
_RENEW = """
for i, key in ipairs(KEYS) do
  local held = redis.call('get', key)
  if held == ARGV[i + 1] then redis.call('pexpire', key, ARGV[1])
  elseif not held then redis.call('set', key, ARGV[i + 1], 'px', ARGV[1]) end
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


def stream_running_ttl_s() -> int:
    """How long a job's stream outlives its last event while that is not its final one.

    What a dead worker's stream relayed is what its job is billed for
    (tasks._relayed_before), and it is read only when the job's message comes
    back (after the broker's visibility timeout, on a threads worker) or when
    the orphaned jobs' sweep ends the job, which it does only once the run is
    INFERENCE_ORPHAN_GRACE_SECONDS old: so the stream outlives that grace,
    and a short stream life more for the sweep's two sightings and a late
    beat. Else the text would have expired by then, and the stream billed
    nothing. A job that ends shortens it again (its final event), so only a
    dead worker's stream lives this long.
    """
    return settings.INFERENCE_ORPHAN_GRACE_SECONDS + STREAM_TTL_SECONDS


def relay_publish(job_id: str, event: dict, pipe=None) -> None:
    """Append `event` to the job's stream; with `pipe`, queued on that Redis pipeline.

    Its life is set in the same round trip: long while the job runs
    (stream_running_ttl_s), STREAM_TTL_SECONDS from its final event on."""
    own = pipe is None
    if own:
        pipe = get_redis().pipeline(transaction=False)
    pipe.xadd(_stream(job_id), {"e": json.dumps(event)}, maxlen=MAX_EVENTS, approximate=True)
    final = event.get("type") in ("done", "error")
    pipe.expire(_stream(job_id), STREAM_TTL_SECONDS if final else stream_running_ttl_s())
    if own:
        pipe.execute()


def relay_events(
    job_id: str,
    *,
    timeout_s: float,
    poll_ms: int = 500,
    heartbeat: bool = False,
    quiet_s: float | None = None,
    reader: bool = False,
) -> Iterator[dict]:
    """Yield the job's events in order until a final one, or raise TimeoutError: after
    `timeout_s` in all, or, with `quiet_s`, once that long passed without an event.

    With `heartbeat`, HEARTBEAT is yielded after every `poll_ms` without an event.
    With `reader` (a streamed job's SSE response), the job's reader marker is kept
    alive while the events are read (see _CancelWatcher): renewed every quarter of
    its life, in the same round trip as a read, so a stream costs no round trip more.
    A generator left unread (its process died, or stalls writing to its client) lets
    it lapse, and the job's worker cancels the job.
    """
    redis_client = get_redis()
    last = "0-0"
    deadline = time.monotonic() + timeout_s
    heard_by = deadline if quiet_s is None else time.monotonic() + quiet_s
    renew_every_s = reader_ttl_s() / 4 if reader else math.inf
    # A read blocks no longer than a renewal's interval: while the events are
    # read (and passed on without stalling), a marker is never left unrenewed
    # for more than two of them, half its life.
    poll_ms = min(poll_ms, max(int(renew_every_s * 1000), 1)) if reader else poll_ms
    renew_at = time.monotonic() if reader else math.inf
    while True:
        now = time.monotonic()
        left_ms = int((min(deadline, heard_by) - now) * 1000)
        if left_ms <= 0:
            raise TimeoutError(job_id)
        # Block in slices, so the Redis client's socket timeout is never reached.
        block = min(poll_ms, left_ms)
        if now >= renew_at:
            renew_at = now + renew_every_s
            pipe = redis_client.pipeline(transaction=False)
            pipe.set(_reader_key(job_id), b"1", px=max(int(reader_ttl_s() * 1000), 1))
            pipe.xread({_stream(job_id): last}, block=block, count=256)
            _renewed, reply = pipe.execute()
        else:
            reply = redis_client.xread({_stream(job_id): last}, block=block, count=256)
        if not reply and heartbeat:
            yield HEARTBEAT
        if reply and quiet_s is not None:
            heard_by = time.monotonic() + quiet_s
        for _stream_name, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                event = json.loads(fields[b"e"])
                yield event
                if event.get("type") in ("done", "error"):
                    return


@dataclass(frozen=True)
class Relayed:
    """What a job's stream relayed: its text, and how many delta events carried it."""

    text: str
    # Each delta is one engine response, which carries at least one token: a
    # bound on the tokens a tokenizer's count of the text may claim (decoded
    # text re-encodes to more tokens than the engine made, U+FFFD for one).
    deltas: int


def relay_relayed_text(job_id: str) -> Relayed | None:
    """What the job's stream relayed (its delta events, in order), or None if it holds none.

    Read only for a streamed job whose task came back after its worker died
    (inference.tasks), and by the orphaned jobs' sweep: its client may be
    reading what the dead run relayed. One XRANGE of the whole stream (at
    most max_tokens deltas).
    """
    entries = get_redis().xrange(_stream(job_id))
    deltas = [json.loads(fields[b"e"]) for _entry_id, fields in entries]
    deltas = [event for event in deltas if event.get("type") == "delta"]
    if not deltas:
        return None
    return Relayed("".join(event["text"] for event in deltas), len(deltas))


def _progress_key(job_id: str) -> str:
    return f"jobprogress:{job_id}"


def relay_progress_set(job_id: str, progress: dict) -> None:
    """Say how far a running asynchronous job has come (GET /api/v1/jobs/{id} shows it).

    Advisory: the job's usage is counted by the engine and written when it
    settles; this is for the person polling a long job. It lives as long as
    the job's token stream would (STREAM_TTL_SECONDS) and is read only while
    the job runs.
    """
    get_redis().set(_progress_key(job_id), json.dumps(progress), ex=STREAM_TTL_SECONDS)


def relay_progress(job_ids: list[str]) -> dict[str, dict]:
    """The progress each of these jobs last reported (relay_progress_set), one MGET."""
    if not job_ids:
        return {}
    values = get_redis().mget([_progress_key(job_id) for job_id in job_ids])
    return {job_id: json.loads(v) for job_id, v in zip(job_ids, values, strict=True) if v}


class CancelOrigin:
    """Who asked a job to stop: the value of its cancel key (relay_cancel).

    CLIENT is b"1", the only value web processes of a release before origins
    wrote: their cancels, whatever asked for them, keep the meaning they had
    (billed as a cancel is). GATEWAY_TIMEOUT is the gateway's own cancel of a
    request it stopped waiting for (INFERENCE_TIMEOUT_SECONDS): its client was
    answered 504 with nothing, so a job stopped by it before any token bills
    nothing (inference.tasks).
    """

    CLIENT = "client"
    GATEWAY_TIMEOUT = "gateway_timeout"


_CANCEL_VALUES = {CancelOrigin.CLIENT: b"1", CancelOrigin.GATEWAY_TIMEOUT: b"timeout"}


def _cancel_origin(value: bytes) -> str:
    # Anything but the gateway's own value is a client's: b"1" is what every
    # release wrote before origins.
    if value == _CANCEL_VALUES[CancelOrigin.GATEWAY_TIMEOUT]:
        return CancelOrigin.GATEWAY_TIMEOUT
    return CancelOrigin.CLIENT


def relay_cancel(job_id: str, *, origin: str = CancelOrigin.CLIENT) -> None:
    """Ask the job's worker to stop it, for as long as the job can still run.

    A job's task may run again much later than its first run (a worker that
    died hands it back to the end of its queue), and a run after the request
    expired would bill in full: so it is kept until the job's hold has
    expired, after which no run can bill anything (the job has expired).

    The gateway's timeout never overwrites a cancel already asked for (NX): a
    client that cancelled first keeps its cancel's billing, and a worker that
    read that cancel already bills by it. A client's overwrites the gateway's:
    it asked to stop, as the client of any cancel does.
    """
    ttl = max(STREAM_TTL_SECONDS, int(settings.METERING_HOLD_TTL.total_seconds()) + 60)
    nx = origin == CancelOrigin.GATEWAY_TIMEOUT
    get_redis().set(_cancel_key(job_id), _CANCEL_VALUES[origin], ex=ttl, nx=nx)


def relay_cancel_requested(job_id: str) -> str | None:
    """Who asked the job to stop (a CancelOrigin), None if nobody has: one Redis read."""
    value = get_redis().get(_cancel_key(job_id))
    return None if value is None else _cancel_origin(value)


class CancelEvent(threading.Event):
    """A running job's cancel (relay_cancel_watch): set once it was asked to stop, with
    who asked (`origin`, a CancelOrigin; None when the worker stopped it itself)."""

    origin: str | None = None

    def set_by(self, origin: str) -> None:
        # The first origin seen stays: it is the cancel the run was stopped by.
        if not self.is_set():
            self.origin = origin
            self.set()


@dataclass
class _Watch:
    job_id: str
    # A streamed job's: when (time.monotonic()) its reader's marker is first
    # required; None once it was found missing, or for a job not streamed.
    reader_due: float | None = None


class _CancelWatcher:
    """One daemon thread per process, polling Redis for the cancel keys of the jobs it runs,
    and renewing their run leases (relay_run_lease).

    It asks Redis only while a job is watched or leased. It is started once
    and then kept, rather than started per job: starting a thread makes the
    job's own thread wait for it to be scheduled. Before it, the worker asked
    Redis between streamed tokens (a round trip per token), so a job that was
    not streamed, or still waited for its first token, could not be cancelled.

    A streamed job is cancelled too when its reader's marker (relay_events
    with `reader`) is missing once the job has been watched for the marker's
    life (reader_ttl_s): its reader had that long to show itself (it reads
    from the moment the job is queued, so it has, unless its process died),
    and a marker lapses that long after its reader stops renewing it. The
    marker rides in the same MGET as the cancel keys. Its life bounds what
    a stream nobody reads can cost: tokens generated for that long. A job
    not streamed has no reader to lose: its client waits for the whole
    answer, and pays for it once it was made.
    """

    def __init__(self):
        self._lock = threading.Lock()
        # Keyed by the event: the same job may run twice in a process (a
        # redelivered task), and each run stops on its own.
        self._watched: dict[CancelEvent, _Watch] = {}
        # Run leases, by their token: key.
        self._leases: dict[str, str] = {}
        # Held across a renewal's round trip: a renewal takes a lease that is
        # gone again, so one that reads a lease before its run lets it go must
        # be over before the release is sent (unlease), or it would take the
        # lease back after its run ended.
        self._renewing = threading.Lock()
        self._renewed_at = 0.0
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        # Under self._lock.
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="relay-cancel-watcher", daemon=True
            )
            self._thread.start()

    def watch(self, job_id: str, *, reader: bool = False) -> CancelEvent:
        event = CancelEvent()
        due = time.monotonic() + reader_ttl_s() if reader else None
        with self._lock:
            self._watched[event] = _Watch(job_id, reader_due=due)
            self._start()
        return event

    def unwatch(self, event: CancelEvent) -> None:
        with self._lock:
            self._watched.pop(event, None)

    def lease(self, token: str, key: str) -> None:
        with self._lock:
            self._leases[token] = key
            self._start()

    def unlease(self, token: str) -> None:
        with self._renewing, self._lock:
            self._leases.pop(token, None)

    def _renew(self) -> None:
        now = time.monotonic()
        if now - self._renewed_at < RUN_LEASE_RENEW_S:
            return
        with self._renewing:
            with self._lock:
                leases = list(self._leases.items())
            if not leases:
                return
            self._renewed_at = now
            try:
                _script(_RENEW)(
                    keys=[key for _token, key in leases],
                    args=[int(RUN_LEASE_S * 1000), *(token for token, _key in leases)],
                )
            except Exception:
                # As for the cancel keys: the runs go on, and take their
                # leases back once Redis is; a lease gone meanwhile lets a
                # duplicate message run, as it did before leases.
                logger.warning("could not renew the run leases of running jobs", exc_info=True)

    def _run(self) -> None:
        while True:
            time.sleep(CANCEL_POLL_S)
            self._renew()
            with self._lock:
                watched = list(self._watched.items())
            if not watched:
                continue
            now = time.monotonic()
            read = [
                (event, w)
                for event, w in watched
                if w.reader_due is not None and now >= w.reader_due
            ]
            try:
                flags = get_redis().mget(
                    [_cancel_key(w.job_id) for _event, w in watched]
                    + [_reader_key(w.job_id) for _event, w in read]
                )
            except Exception:
                # Redis is down (or anything else): the thread must outlive it;
                # jobs run on, and a cancellation is seen once Redis is back.
                logger.warning("could not poll job cancellations", exc_info=True)
                continue
            for (event, _w), flag in zip(watched, flags[: len(watched)], strict=True):
                if flag is not None:
                    event.set_by(_cancel_origin(flag))
            for (event, w), marker in zip(read, flags[len(watched) :], strict=True):
                if marker is None:
                    logger.warning(
                        "job %s: nobody reads its stream any more (its reader's marker "
                        "lapsed); cancelling it",
                        w.job_id,
                    )
                    w.reader_due = None
                    # Its client is gone with its reader: a client's cancel.
                    event.set_by(CancelOrigin.CLIENT)


_watcher = _CancelWatcher()


@functools.cache
def _script(source: str):
    # Run by its SHA (EVALSHA), as accounts.ratelimits runs its own.
    return get_redis().register_script(source)


@contextlib.contextmanager
def relay_run_lease(job_pk: int, *, wait: bool = True, unleased: bool = True) -> Iterator[bool]:
    """Hold the job's run lease while the body runs; yields False, holding nothing, when
    another run of the job holds it and is alive: this message is a duplicate.

    A job's task message can reach two workers: the broker's push sent twice
    (gymbilling.broker), a publish retried after its answer was lost. The
    second must not run the job again, nor take it for a dead worker's
    (tasks._relayed_before would end a live stream, billed for its first
    tokens only). A message handed back after its worker died must run it
    again. The lease tells
    them apart: a live run's process renews it every RUN_LEASE_RENEW_S, a
    dead one's lapses within RUN_LEASE_S. A message that finds it held
    watches it: renewed, its run is alive (about a second, at most
    RUN_LEASE_S); lapsed, it takes it and runs (at most RUN_LEASE_S late).

    Redis failing, the run goes on unleased, as before leases (a Redis
    outage stops its relay anyway): a duplicate is rare, a job left unrun
    is not. Its process takes the lease once Redis is back, as it takes back
    one that lapsed during an outage (_RENEW), unless another run took it
    meanwhile. With `unleased` False (the orphaned jobs' sweep, which must not
    end a job whose run it cannot see) the RedisError is raised instead.
    With `wait` False a held lease is not watched: False at once, whether its
    holder is alive or lapsing.
    """
    key, token = _run_lease_key(job_pk), secrets.token_hex(8)
    try:
        taken = _run_lease_take(key, token, wait=wait)
    except RedisError as exc:
        if not unleased:
            raise
        logger.warning(
            "job %s: its run lease cannot be taken (%r); running it unleased", job_pk, exc
        )
        taken = True
    if not taken:
        yield False
        return
    _watcher.lease(token, key)
    _held.lease = held = _HeldLease(key, token)
    try:
        yield True
    finally:
        _held.lease = None
        _watcher.unlease(token)
        if not held.released:
            with contextlib.suppress(RedisError):  # else it lapses within RUN_LEASE_S
                _script(_RELEASE)(keys=[key], args=[token])


@dataclass
class _HeldLease:
    key: str
    token: str
    released: bool = False  # queued on the run's last pipeline (relay_run_lease_release)


# The lease this thread's run holds (a run is one task, on one thread).
_held = threading.local()


def relay_run_lease_release(pipe) -> None:
    """Queue the release of this thread's run lease on `pipe`, the pipeline that sends the
    job's final event: one round trip to Redis less per job than releasing it on its own.
    A pipeline that fails leaves the lease to lapse within RUN_LEASE_S, as a dead
    worker's does."""
    held = getattr(_held, "lease", None)
    if held is None or held.released:
        return
    # No renewal after this one: it would take the lease back once let go.
    _watcher.unlease(held.token)
    # EVAL, not a registered script: a pipeline holding one asks Redis first whether it
    # has it (SCRIPT EXISTS), the round trip this saves (the token refund beside it is
    # an EVAL too).
    pipe.eval(_RELEASE, 1, held.key, held.token)
    held.released = True


def _run_lease_missing_key(job_pk: int) -> str:
    return f"jobrunmissing:{job_pk}"


def relay_run_lease_missing_since(job_pk: int, *, now: float, ttl_s: float) -> float:
    """Note that the job's run lease was found missing at `now` (a Unix time), for the
    orphaned jobs' sweep; returns when it was first found missing: `now` if it was not
    found so within the last `ttl_s` seconds (nor found held since: relay_run_lease_seen).
    One round trip."""
    key = _run_lease_missing_key(job_pk)
    pipe = get_redis().pipeline(transaction=False)
    pipe.set(key, repr(now), nx=True, px=max(int(ttl_s * 1000), 1))
    pipe.get(key)
    _first, since = pipe.execute()
    return float(since) if since is not None else now


# For each job, its lease key then its sighting's: a held lease forgets the sighting;
# a missing one notes it (a first) or keeps it alive (ARGV: now, life in ms).
_MISSING_NOTE = """
for i = 1, #KEYS, 2 do
  if redis.call('exists', KEYS[i]) == 1 then redis.call('del', KEYS[i + 1])
  elseif not redis.call('set', KEYS[i + 1], ARGV[1], 'nx', 'px', ARGV[2]) then
    redis.call('pexpire', KEYS[i + 1], ARGV[2])
  end
end
return 0
"""


def relay_run_lease_missing_note(job_pks: list[int], *, now: float, ttl_s: float) -> None:
    """Check the jobs' run leases without taking them, for the orphaned jobs' sweep past
    its cap: a sighting of one missing is noted at `now` or, noted before, kept another
    `ttl_s` seconds from its first; one found held is forgotten. One round trip."""
    if not job_pks:
        return
    keys = [key for pk in job_pks for key in (_run_lease_key(pk), _run_lease_missing_key(pk))]
    _script(_MISSING_NOTE)(keys=keys, args=[repr(now), max(int(ttl_s * 1000), 1)])


def relay_run_lease_seen(job_pk: int) -> None:
    """The job's run lease was found held: a sighting of it missing before is forgotten."""
    get_redis().delete(_run_lease_missing_key(job_pk))


def _run_lease_take(key: str, token: str, *, wait: bool = True) -> bool:
    """Take the lease: at once if free; once it lapses if its holder no longer renews it.
    False when its holder renews it (it is alive), or, without `wait`, when it is held."""
    redis_client = get_redis()
    ttl_ms = int(RUN_LEASE_S * 1000)
    first_end = None
    # A lease not renewed lapses within RUN_LEASE_S; one still there after
    # that was renewed, which the loop would have seen: the bound is a guard.
    deadline = time.monotonic() + RUN_LEASE_S + 2 * RUN_LEASE_RENEW_S
    while True:
        if redis_client.set(key, token, nx=True, px=ttl_ms):
            return True
        if not wait:
            return False
        left_ms = redis_client.pttl(key)
        if left_ms == -2:
            continue  # it lapsed (or was let go) since the SET: take it now
        now = time.monotonic()
        if left_ms >= 0:
            # When it ends, on this clock: an unrenewed lease's end stays put
            # (give or take a round trip); each renewal moves it on by about
            # RUN_LEASE_RENEW_S.
            ends_at = now + left_ms / 1000
            if first_end is None:
                first_end = ends_at
            elif ends_at - first_end > RUN_LEASE_RENEW_S / 2:
                return False
        if now > deadline:
            return False
        time.sleep(RUN_LEASE_RENEW_S / 4)


@contextlib.contextmanager
def relay_cancel_watch(job_id: str, *, reader: bool = False) -> Iterator[CancelEvent]:
    """An Event that is set once `relay_cancel(job_id)` was called (from any process), with
    its origin; with `reader` (a streamed job), also once its reader's marker lapsed
    (_CancelWatcher)."""
    event = _watcher.watch(job_id, reader=reader)
    try:
        yield event
    finally:
        _watcher.unwatch(event)


def _after_fork_in_child() -> None:
    # A prefork child starts without the parent's thread; its lock may have
    # been held by a thread that does not exist in the child.
    global _watcher
    _watcher = _CancelWatcher()


os.register_at_fork(after_in_child=_after_fork_in_child)
