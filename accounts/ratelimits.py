"""Rate limits counted in Redis, so every web process shares them.

Requests and tokens per minute use fixed one-minute windows, checked and
counted for every scope (the key and its organization) in one Lua script:
either every window has room and all are counted, or none is. Concurrent jobs
are a sorted set of job ids scored by a lease expiry, so a job whose worker
died stops counting after its lease instead of forever.
"""

from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass

from accounts.errors import ApplicationError
from accounts.redis import get_redis

WINDOW_SECONDS = 60

# KEYS: one window key per scope. ARGV: cost, window, then one limit per key.
# Returns {0, ...remaining per key, ttl} when counted, {i, ttl} when scope i is full.
_CONSUME = """
local cost = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[2 + i])
  local used = tonumber(redis.call('GET', key) or '0')
  if used + cost > limit then
    local ttl = redis.call('TTL', key)
    if ttl < 0 then ttl = window end
    return {i, ttl, used}
  end
end
local result = {0}
for i, key in ipairs(KEYS) do
  local used = redis.call('INCRBY', key, cost)
  if used == cost then redis.call('EXPIRE', key, window) end
  table.insert(result, tonumber(ARGV[2 + i]) - used)
end
local ttl = redis.call('TTL', KEYS[1])
if ttl < 0 then ttl = window end
table.insert(result, ttl)
return result
"""


@functools.cache
def _script(source: str):
    """The script run by its SHA (EVALSHA): its text is not sent with every request.

    redis-py loads it again by itself should the server have lost it (a
    restart, SCRIPT FLUSH). Not for pipelines: there redis-py first asks
    whether the script exists, a round trip more than EVAL.
    """
    return get_redis().register_script(source)


@dataclass(frozen=True)
class Limit:
    scope: str  # "key:<id>" or "org:<id>"
    limit: int


@dataclass(frozen=True)
class Usage:
    """What the x-ratelimit-* headers report for one kind (requests or tokens)."""

    limit: int
    remaining: int
    reset_seconds: int


def _window_key(kind: str, scope: str, now: float) -> str:
    return f"rl:{kind}:{scope}:{int(now // WINDOW_SECONDS)}"


def rate_limit_consume(*, kind: str, limits: list[Limit], cost: int = 1) -> Usage:
    """Count `cost` against every limit, or raise `rate_limited` (429) and count nothing.

    The reported usage is the tightest scope's.
    """
    now = time.time()
    keys = [_window_key(kind, lim.scope, now) for lim in limits]
    result = _script(_CONSUME)(
        keys=keys, args=[cost, WINDOW_SECONDS, *[lim.limit for lim in limits]]
    )
    if result[0] != 0:
        full = limits[result[0] - 1]
        retry_after = max(1, int(result[1]))
        raise ApplicationError(
            code="rate_limited",
            message=(
                f"Rate limit reached: {full.limit} {kind} per minute for this "
                f"{'API key' if full.scope.startswith('key:') else 'organization'}. "
                f"Retry after {retry_after} s."
            ),
            status=429,
            extra={"retry_after": retry_after, "limit": full.limit, "kind": kind},
        )
    remaining = result[1:-1]
    tightest = min(range(len(limits)), key=lambda i: remaining[i])
    return Usage(
        limit=limits[tightest].limit,
        remaining=max(0, remaining[tightest]),
        reset_seconds=max(1, int(result[-1])),
    )


def rate_limit_refund(*, kind: str, limits: list[Limit], amount: int, pipe=None) -> None:
    """Give back counted units (a token reservation that was not used).

    With `pipe` (a Redis pipeline) the refund is queued on it, for the caller
    to send with its other commands.
    """
    if amount <= 0:
        return
    now = time.time()
    own = pipe is None
    if own:
        pipe = get_redis().pipeline()
    for lim in limits:
        key = _window_key(kind, lim.scope, now)
        # Only if the window still exists: never create a negative window.
        pipe.eval(
            "if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('DECRBY', KEYS[1], ARGV[1]) end return 0",
            1,
            key,
            amount,
        )
    if own:
        pipe.execute()


_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


def concurrency_acquire(
    *, scope: str, limit: int, job_id: str | None = None, lease: int = 900
) -> str:
    """Take one of `limit` concurrent slots for `job_id` (idempotent), or raise 429."""
    job_id = job_id or uuid.uuid4().hex
    now = time.time()
    ok = _script(_ACQUIRE)(
        keys=[f"conc:{scope}"], args=[now, limit, job_id, now + lease, lease + 60]
    )
    if not ok:
        raise ApplicationError(
            code="too_many_concurrent_jobs",
            message=f"{limit} jobs are already running for this organization; wait for one to finish.",
            status=429,
            extra={"retry_after": 1},
        )
    return job_id


def concurrency_release(*, scope: str, job_id: str, pipe=None) -> None:
    """Free `job_id`'s slot; with `pipe`, queued on that Redis pipeline."""
    (pipe if pipe is not None else get_redis()).zrem(f"conc:{scope}", job_id)
