"""Rate limits counted in Redis, so every web process shares them.

Requests and tokens per minute use fixed one-minute windows, checked and
counted for every scope (the key and its organization) in one Lua script:
either every window has room and all are counted, or none is. Concurrent jobs
are a sorted set of job ids scored by a lease expiry, so a job whose worker
died stops counting after its lease instead of forever; a job's token
reservation and its slot are taken by the same script, in one round trip.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

from django.conf import settings

from accounts.errors import ApplicationError
from accounts.redis import get_redis

WINDOW_SECONDS = 60


def slot_lease_seconds() -> int:
    """A concurrency slot's lease: the longest a job may hold its slot when nothing releases
    it (inference's concurrency_slots_sweep frees the slots of jobs known to be over much
    sooner); RATELIMIT_SLOT_LEASE_SECONDS, a hold's life and 5 minutes, so that a job's
    slot counts for as long as the job may be open.

    One lease for every slot, so that a slot's score (its lease's end) also
    says when it was taken.
    """
    return settings.RATELIMIT_SLOT_LEASE_SECONDS


# Checks every window, and takes a concurrency slot when asked, all or nothing.
# KEYS: one window key per limit, then (when ARGV[2] is a job id) the
# organization's set of running jobs. ARGV: window, job id or '', now, slots,
# the job's lease expiry, the set's TTL, then a limit and a cost per window key.
# Returns {0, remaining per window..., ttl per window...} when counted,
# {i, ttl, used} when window i is full, {-1} when every slot is taken.
_TAKE = """
local window = tonumber(ARGV[1])
local job = ARGV[2]
local n = #KEYS
if job ~= '' then n = n - 1 end
for i = 1, n do
  local limit = tonumber(ARGV[5 + 2 * i])
  local cost = tonumber(ARGV[6 + 2 * i])
  local used = tonumber(redis.call('GET', KEYS[i]) or '0')
  if used + cost > limit then
    local ttl = redis.call('TTL', KEYS[i])
    if ttl < 0 then ttl = window end
    return {i, ttl, used}
  end
end
if job ~= '' then
  local running = KEYS[n + 1]
  redis.call('ZREMRANGEBYSCORE', running, '-inf', ARGV[3])
  if not redis.call('ZSCORE', running, job) then
    if redis.call('ZCARD', running) >= tonumber(ARGV[4]) then return {-1} end
    redis.call('ZADD', running, ARGV[5], job)
    redis.call('EXPIRE', running, ARGV[6])
  end
end
local result = {0}
local ttls = {}
for i = 1, n do
  local cost = tonumber(ARGV[6 + 2 * i])
  local used = redis.call('INCRBY', KEYS[i], cost)
  if used == cost then redis.call('EXPIRE', KEYS[i], window) end
  table.insert(result, tonumber(ARGV[5 + 2 * i]) - used)
  local ttl = redis.call('TTL', KEYS[i])
  if ttl < 0 then ttl = window end
  table.insert(ttls, ttl)
end
for i = 1, n do table.insert(result, ttls[i]) end
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
    # "key:<id>" or "org:<id>"; for people's own actions (sign-in, sign-up),
    # "ip:<address>", "email:<hash>" or "user:<id>".
    scope: str
    limit: int
    # What a refusal's message calls it ("... for this <name>"); by default its scope's
    # kind (_SCOPE_NAMES).
    name: str | None = None


def requests_limit(organization) -> Limit:
    """The organization's requests per minute: what its API keys and its people's API calls
    (the playground's among them) all count against, so no way into the API has a limit of
    its own."""
    return Limit(scope=f"org:{organization.pk}", limit=organization.requests_per_minute)


def dashboard_limit(user) -> Limit:
    """A person's changes through the dashboard's pages a minute
    (RATELIMIT_DASHBOARD_PER_USER), whatever organization they act for: a bucket of their
    own, not the organization's requests per minute, so that a partner app using the API
    up does not lock its people out of the dashboard, and their clicks spend none of it."""
    return Limit(scope=f"user:{user.pk}", limit=settings.RATELIMIT_DASHBOARD_PER_USER)


# What a limit's scope is called in a refusal's message, by the scope's prefix.
_SCOPE_NAMES = {
    "key": "API key",
    "org": "organization",
    "ip": "network address",
    "email": "email address",
    "user": "account",
}


@dataclass(frozen=True)
class Usage:
    """What the x-ratelimit-* headers report for one kind (requests or tokens)."""

    limit: int
    remaining: int
    reset_seconds: int


def _window_key(kind: str, scope: str, now: float, window: int = WINDOW_SECONDS) -> str:
    return f"rl:{kind}:{scope}:{int(now // window)}"


def _per(window: int) -> str:
    if window == WINDOW_SECONDS:
        return "minute"
    if window % 60 == 0:
        return f"{window // 60} minutes"
    return f"{window} seconds"


@dataclass(frozen=True)
class Slot:
    """One of `limit` concurrent-job slots of `scope`, taken for `job_id` until released, or
    for slot_lease_seconds()."""

    scope: str
    limit: int
    job_id: str


@dataclass
class RequestCount:
    """A request's count against its requests-per-minute limits, left to the work it asks for.

    An endpoint that reserves something else in Redis anyway (an inference
    job's tokens and slot) counts its request in the same script, a round
    trip less: the API view hands this to the service, whose
    `rate_limit_consume(..., request=...)` counts it and fills `usage`. An
    endpoint that failed before counting it counts it on its way out
    (accounts.api_base), so every request still counts once.
    """

    limits: list[Limit]
    usage: Usage | None = None
    refused: bool = False  # its own limit refused it: a 429, not counted


def rate_limit_consume(
    *,
    kind: str,
    limits: list[Limit],
    cost: int = 1,
    slot: Slot | None = None,
    request: RequestCount | None = None,
    now: float | None = None,
    window: int = WINDOW_SECONDS,
) -> Usage:
    """Count `cost` against every limit, or raise `rate_limited` (429) and count nothing.

    With `slot`, also take that concurrency slot, in the same script: both or
    neither (`too_many_concurrent_jobs`, 429, when every slot is taken). The
    slot is idempotent per job id. With `request`, also count one request
    against its limits, first and in the same script (its usage is set on
    it). The reported usage is the tightest scope's. `now`: the time that
    picks the window, for a caller that refunds into it later
    (rate_limit_refund's `counted_at`). `window`: the length of the fixed windows
    counted in, in seconds (a minute, as every limit of the API; a kind keeps one
    length, its windows' keys do not name it); a `request` is counted per minute.
    """
    if now is None:
        now = time.time()
    counted = [("requests", lim, 1) for lim in request.limits] if request is not None else []
    counted += [(kind, lim, cost) for lim in limits]
    if request is not None and window != WINDOW_SECONDS:
        raise ValueError("a request is counted per minute, with work counted per minute")
    keys = [_window_key(k, lim.scope, now, window) for k, lim, _cost in counted]
    args = [window, "", 0, 0, 0, 0]
    if slot is not None:
        keys.append(f"conc:{slot.scope}")
        lease = slot_lease_seconds()
        args[1:] = [slot.job_id, now, slot.limit, now + lease, lease + 60]
    for _kind, lim, units in counted:
        args += [lim.limit, units]
    result = _script(_TAKE)(keys=keys, args=args)
    if result[0] == -1:
        raise ApplicationError(
            code="too_many_concurrent_jobs",
            message=f"{slot.limit} jobs are already running for this organization; wait for one to finish.",
            status=429,
            extra={"retry_after": 1},
        )
    if result[0] != 0:
        full_kind, full, _units = counted[result[0] - 1]
        if request is not None and result[0] <= len(request.limits):
            request.refused = True
        retry_after = max(1, int(result[1]))
        raise ApplicationError(
            code="rate_limited",
            message=(
                f"Rate limit reached: {full.limit} {full_kind} per {_per(window)} for this "
                f"{full.name or _SCOPE_NAMES.get(full.scope.split(':', 1)[0], 'client')}. "
                f"Retry after {retry_after} s."
            ),
            status=429,
            extra={"retry_after": retry_after, "limit": full.limit, "kind": full_kind},
        )
    n = len(counted)
    remaining, ttls = result[1 : 1 + n], result[1 + n :]
    if request is not None:
        k = len(request.limits)
        request.usage = _usage(request.limits, remaining[:k], ttls[:k])
        remaining, ttls = remaining[k:], ttls[k:]
    return _usage(limits, remaining, ttls)


def _usage(limits: list[Limit], remaining: list[int], ttls: list[int]) -> Usage:
    if not limits:
        return Usage(limit=0, remaining=0, reset_seconds=WINDOW_SECONDS)
    tightest = min(range(len(limits)), key=lambda i: remaining[i])
    return Usage(
        limit=limits[tightest].limit,
        remaining=max(0, remaining[tightest]),
        reset_seconds=max(1, int(ttls[tightest])),
    )


# Gives ARGV[1] units back to the window KEYS[1], only while it exists (never
# a negative window); with ARGV[2] (an id), only the first time for that id:
# KEYS[2], the window's set of the ids refunded, lives as long as the window.
_REFUND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] ~= '' then
  if redis.call('SADD', KEYS[2], ARGV[2]) == 0 then return 0 end
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) else redis.call('EXPIRE', KEYS[2], 120) end
end
return redis.call('DECRBY', KEYS[1], ARGV[1])
"""


def rate_limit_refund(
    *,
    kind: str,
    limits: list[Limit],
    amount: int,
    counted_at: float | None = None,
    once_for: str = "",
    pipe=None,
) -> None:
    """Give back counted units (a token reservation that was not used).

    `counted_at`: the time they were counted at (rate_limit_consume's `now`).
    They go back to that window only, while it lasts: refunded into a later
    one (a job reserved in one minute and settled in the next), they would
    cancel out units spent in it, and an organization whose jobs straddle
    minutes could use up to twice its limit. Without it, the current window.

    `once_for`: what they were reserved for (a job's id): given back once for
    it, however often this is called (a job's settlement tried again after
    its commit's answer was lost releases its reservations again).

    With `pipe` (a Redis pipeline) the refund is queued on it, for the caller
    to send with its other commands.
    """
    if amount <= 0:
        return
    now = time.time() if counted_at is None else counted_at
    own = pipe is None
    if own:
        pipe = get_redis().pipeline()
    for lim in limits:
        key = _window_key(kind, lim.scope, now)
        # Not under the window's own prefix: a window's keys hold counts.
        refunded = f"rlrefunded:{key.removeprefix('rl:')}"
        pipe.eval(_REFUND, 2, key, refunded, amount, once_for)
    if own:
        pipe.execute()


def concurrency_release(*, scope: str, job_id: str, pipe=None) -> None:
    """Free `job_id`'s slot; with `pipe`, queued on that Redis pipeline."""
    (pipe if pipe is not None else get_redis()).zrem(f"conc:{scope}", job_id)


def concurrency_slots_taken(*, before: float):
    """Yields (scope, job ids) of the concurrency slots taken before `before` (a Unix time, of
    the clocks of the processes that took them), scope by scope."""
    redis_client = get_redis()
    lease = slot_lease_seconds()
    for key in redis_client.scan_iter(match="conc:*", count=500):
        # A slot's score is its lease's end: it was taken a lease before.
        taken = redis_client.zrangebyscore(key, "-inf", before + lease)
        if taken:
            yield _text(key).removeprefix("conc:"), [_text(job) for job in taken]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
