"""Tokens from the worker to the waiting API process, through Redis streams.

A stream, not pub/sub: the worker may publish before the API process starts
reading, and a stream keeps every event until it is read (or expires).
"""

from __future__ import annotations

import json
from collections.abc import Iterator

from accounts.redis import get_redis

STREAM_TTL_SECONDS = 600
MAX_EVENTS = 100_000


def _stream(job_id: str) -> str:
    return f"jobstream:{job_id}"


def _cancel_key(job_id: str) -> str:
    return f"jobcancel:{job_id}"


def relay_publish(job_id: str, event: dict) -> None:
    redis = get_redis()
    pipe = redis.pipeline(transaction=False)
    pipe.xadd(_stream(job_id), {"e": json.dumps(event)}, maxlen=MAX_EVENTS, approximate=True)
    pipe.expire(_stream(job_id), STREAM_TTL_SECONDS)
    pipe.execute()


def relay_events(job_id: str, *, timeout_s: float, poll_ms: int = 500) -> Iterator[dict]:
    """Yield the job's events in order until a final one, or raise TimeoutError."""
    import time

    redis = get_redis()
    last = "0-0"
    deadline = time.monotonic() + timeout_s
    while True:
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            raise TimeoutError(job_id)
        # Block in slices, so the Redis client's socket timeout is never reached.
        reply = redis.xread({_stream(job_id): last}, block=min(poll_ms, left_ms), count=256)
        for _stream_name, entries in reply or []:
            for entry_id, fields in entries:
                last = entry_id
                event = json.loads(fields[b"e"])
                yield event
                if event.get("type") in ("done", "error"):
                    return


def relay_cancel(job_id: str) -> None:
    get_redis().set(_cancel_key(job_id), b"1", ex=STREAM_TTL_SECONDS)


def relay_cancelled(job_id: str) -> bool:
    return bool(get_redis().exists(_cancel_key(job_id)))
