"""Tokens from the worker to the waiting API process, and cancellations back, through Redis.

Tokens travel in a stream, not pub/sub: the worker may publish before the API
process starts reading, and a stream keeps every event until it is read (or
expires). A cancellation is a key (`relay_cancel`) that the worker's process
polls for every job it runs (`relay_cancel_watch`), whether the job is
waiting for the engine, streaming, or not streaming at all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterator

from django.conf import settings

from accounts.redis import get_redis

logger = logging.getLogger(__name__)

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


def relay_publish(job_id: str, event: dict, pipe=None) -> None:
    """Append `event` to the job's stream; with `pipe`, queued on that Redis pipeline."""
    own = pipe is None
    if own:
        pipe = get_redis().pipeline(transaction=False)
    pipe.xadd(_stream(job_id), {"e": json.dumps(event)}, maxlen=MAX_EVENTS, approximate=True)
    pipe.expire(_stream(job_id), STREAM_TTL_SECONDS)
    if own:
        pipe.execute()


def relay_events(
    job_id: str,
    *,
    timeout_s: float,
    poll_ms: int = 500,
    heartbeat: bool = False,
    quiet_s: float | None = None,
) -> Iterator[dict]:
    """Yield the job's events in order until a final one, or raise TimeoutError: after
    `timeout_s` in all, or, with `quiet_s`, once that long passed without an event.

    With `heartbeat`, HEARTBEAT is yielded after every `poll_ms` without an event.
    """
    redis_client = get_redis()
    last = "0-0"
    deadline = time.monotonic() + timeout_s
    heard_by = deadline if quiet_s is None else time.monotonic() + quiet_s
    while True:
        left_ms = int((min(deadline, heard_by) - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise TimeoutError(job_id)
        # Block in slices, so the Redis client's socket timeout is never reached.
        reply = redis_client.xread({_stream(job_id): last}, block=min(poll_ms, left_ms), count=256)
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


def relay_relayed_text(job_id: str) -> str | None:
    """The text the job's stream holds (its delta events, in order), or None if it holds none.

    Read only for a streamed job whose task came back after its worker died
    (inference.tasks): its client may be reading what the dead run relayed.
    One XRANGE of the whole stream (at most max_tokens deltas).
    """
    entries = get_redis().xrange(_stream(job_id))
    deltas = [json.loads(fields[b"e"]) for _entry_id, fields in entries]
    deltas = [event for event in deltas if event.get("type") == "delta"]
    if not deltas:
        return None
    return "".join(event["text"] for event in deltas)


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


def relay_cancel(job_id: str) -> None:
    """Ask the job's worker to stop it, for as long as the job can still run.

    A job's task may run again much later than its first run (a worker that
    died hands it back to the end of its queue), and a run after the request
    expired would bill in full: so it is kept until the job's hold has
    expired, after which no run can bill anything (the job has expired).
    """
    ttl = max(STREAM_TTL_SECONDS, int(settings.METERING_HOLD_TTL.total_seconds()) + 60)
    get_redis().set(_cancel_key(job_id), b"1", ex=ttl)


def relay_cancel_requested(job_id: str) -> bool:
    """Whether the job was asked to stop (relay_cancel), now: one Redis read."""
    return bool(get_redis().exists(_cancel_key(job_id)))


class _CancelWatcher:
    """One daemon thread per process, polling Redis for the cancel keys of the jobs it runs.

    It asks Redis only while a job is watched. It is started once and then
    kept, rather than started per job: starting a thread makes the job's own
    thread wait for it to be scheduled. Before it, the worker asked Redis
    between streamed tokens (a round trip per token), so a job that was not
    streamed, or still waited for its first token, could not be cancelled.
    """

    def __init__(self):
        self._lock = threading.Lock()
        # Keyed by the event: the same job may run twice in a process (a
        # redelivered task), and each run stops on its own.
        self._watched: dict[threading.Event, str] = {}
        self._thread: threading.Thread | None = None

    def watch(self, job_id: str) -> threading.Event:
        event = threading.Event()
        with self._lock:
            self._watched[event] = job_id
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="relay-cancel-watcher", daemon=True
                )
                self._thread.start()
        return event

    def unwatch(self, event: threading.Event) -> None:
        with self._lock:
            self._watched.pop(event, None)

    def _run(self) -> None:
        while True:
            time.sleep(CANCEL_POLL_S)
            with self._lock:
                watched = list(self._watched.items())
            if not watched:
                continue
            try:
                flags = get_redis().mget([_cancel_key(job_id) for _event, job_id in watched])
            except Exception:
                # Redis is down (or anything else): the thread must outlive it;
                # jobs run on, and a cancellation is seen once Redis is back.
                logger.warning("could not poll job cancellations", exc_info=True)
                continue
            for (event, _job_id), flag in zip(watched, flags, strict=True):
                if flag is not None:
                    event.set()


_watcher = _CancelWatcher()


@contextlib.contextmanager
def relay_cancel_watch(job_id: str) -> Iterator[threading.Event]:
    """An Event that is set once `relay_cancel(job_id)` was called (from any process)."""
    event = _watcher.watch(job_id)
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
