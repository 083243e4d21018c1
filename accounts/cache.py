"""Process-local caches of rarely written rows that every request reads.

Each inference request reads the same few rows: its catalog model and server
pool, the price in force, any dedicated capacity. Read through the ORM they
cost a query each, in the API process and again in the worker (about a fifth
of the CPU of a request, docs/BENCHMARKS.md). A `SharedCache` keeps them in
the process instead, and keeps them only while a generation token in Redis is
the one it read before loading them:

- every read asks Redis for the token (one GET, far cheaper than a query),
  or, inside a `cache_scope()` (a request, a job), reads every cache's token
  once, in one MGET, at its first read; a token other than the one its
  entries were loaded under empties the cache;
- or, inside an optimistic `cache_scope(optimistic=True)` (an inference
  request), takes the token this process last read and checks it later,
  in a Redis script the unit runs anyway before it does anything that
  counts (the rate-limit script: `cache_scope_expected`); should it have
  changed, or should the unit end in an error before that check, every
  token is read then (`cache_scope_recheck`) and a unit whose values were
  stale starts again (`CacheStale`, accounts.api_base). One round trip less
  on every such request;
- every write to the cached tables (`cache_invalidate_on_save` connects the
  models' save and delete signals) writes a new random token once its
  transaction commits, so the next read in every process reloads.

So a change is seen by the very next request (or job) anywhere, never a moment
later.
A token is random rather than a counter, so a Redis that was flushed (or
restarted: it keeps nothing on disk here) can never bring back a token that
stale entries were loaded under. Writes that bypass the signals (`update()`,
`bulk_create()` on their own, raw SQL) must call `invalidate()` themselves.

No caching inside a transaction: what it reads may be its own uncommitted
writes, which must not outlive a rollback. Nor without Redis: every read then
goes to the database, as if there were no cache.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TypeVar

import redis
from django.db import connection, transaction
from django.db.models.signals import post_delete, post_save

from accounts.redis import get_redis

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Entries per cache: catalogs hold tens of models, not thousands; a cache
# that fills up is emptied and refilled rather than tracked entry by entry.
MAX_ENTRIES = 4096
# A safety net, not the mechanism: entries are reloaded at least this often
# even if no new token was seen (a change committed while Redis could not be
# told, then Redis came back with the old token).
MAX_AGE_S = 60.0

_all: list[SharedCache] = []


class CacheStale(Exception):
    """Values an optimistic unit of work took from this process's caches had changed:
    the unit must start again (nothing it did before the check counted)."""


@dataclass
class _Scope:
    # Tokens read from Redis (or checked there), by Redis key.
    tokens: dict[str, bytes | None] = field(default_factory=dict)
    # Tokens taken from this process's caches, not checked yet (optimistic).
    assumed: dict[str, bytes | None] = field(default_factory=dict)
    optimistic: bool = False


# The current unit of work's tokens (cache_scope).
_scope_tokens: ContextVar[_Scope | None] = ContextVar("cache_scope_tokens", default=None)


@contextlib.contextmanager
def cache_scope(*, optimistic: bool = False) -> Iterator[None]:
    """One unit of work (a request, a job): each cache's token is read from Redis once.

    The first read of any cache inside it fetches every cache's token in one
    MGET; later reads use them. A change committed by another process while
    the unit runs is seen by the next unit; one it commits itself is seen by
    its own next read (invalidate() forgets the token read).

    `optimistic`: a cache whose token this process has read before is used
    under that token without asking Redis; the unit must then have the
    tokens checked (`cache_scope_expected` and `cache_scope_checked` around
    a Redis script that compares them, or `cache_scope_recheck`) before
    anything it does counts, and start again when they had changed.
    """
    reset = _scope_tokens.set(_Scope(optimistic=optimistic))
    try:
        yield
    finally:
        _scope_tokens.reset(reset)


def cache_scope_expected() -> dict[str, bytes | None] | None:
    """The tokens an optimistic scope took on trust, for a Redis script to compare
    (`GET key == value`, an absent key as ''), or None when nothing needs checking.

    Only those: a cache the unit has not read may hold a token that changed
    since (this process learns a new token when it next reads that cache),
    and checking it would start units again for nothing. A cache first read
    after the check reads every token (one MGET), as in any scope.
    """
    scope = _scope_tokens.get()
    if scope is None or not scope.assumed:
        return None
    return dict(scope.assumed)


def cache_scope_checked(expected: dict[str, bytes | None]) -> None:
    """A script found every token as `expected`: the unit goes on, as if it had read them."""
    scope = _scope_tokens.get()
    if scope is None:
        return
    scope.tokens.update(expected)
    scope.assumed.clear()
    scope.optimistic = False


def cache_scope_recheck() -> bool:
    """Read every token now; True when a value the scope took on trust was stale.

    For a unit ending before its check (an error, an early answer): what it
    answers may rest on stale values. Nothing to read (no token taken on
    trust) is no round trip.
    """
    scope = _scope_tokens.get()
    if scope is None or not scope.assumed:
        return False
    try:
        _read_all_tokens(scope)
    except CacheStale:
        return True
    return False


def _read_all_tokens(scope: _Scope) -> None:
    """Every cache's token, in one MGET, into the scope; CacheStale when one it took on
    trust had changed."""
    keys = [cache._token_key for cache in _all]
    scope.tokens.update(zip(keys, get_redis().mget(keys), strict=True))
    assumed, scope.assumed = scope.assumed, {}
    scope.optimistic = False
    if any(scope.tokens.get(key) != token for key, token in assumed.items()):
        raise CacheStale


class CacheScopeMiddleware:
    """Every request is one cache_scope (MIDDLEWARE)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        with cache_scope():
            return self.get_response(request)


class SharedCache:
    """Values loaded from the database, shared by a process's threads, dropped on any change."""

    def __init__(self, name: str, *, max_age_s: float = MAX_AGE_S):
        self.name = name
        self.max_age_s = max_age_s
        self._token_key = f"cachegen:{name}"
        self._lock = threading.Lock()
        self._token: bytes | None = None
        self._token_read = False  # _token was read from Redis (None is a token too)
        self._entries: dict[Hashable, object] = {}
        self._emptied_at = time.monotonic()
        _all.append(self)

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        """The cached value for `key`, or `load()`'s (kept for the next caller).

        A value of None is not kept: `load` returns None for "no such row",
        which the next request must look for again.
        """
        if connection.in_atomic_block:
            return load()
        try:
            token = self._current_token()
        except redis.RedisError:
            logger.warning("cache %s: Redis unreachable, reading the database", self.name)
            return load()
        with self._lock:
            now = time.monotonic()
            stale = token != self._token or not self._token_read
            if stale or now - self._emptied_at > self.max_age_s:
                self._entries.clear()
                self._token = token
                self._token_read = True
                self._emptied_at = now
            elif key in self._entries:
                return self._entries[key]  # type: ignore[return-value]
        # Loaded outside the lock: the database is slow, and two threads
        # loading the same key at once both get a correct value.
        value = load()
        with self._lock:
            # Only under the token it was loaded under: a change that
            # committed meanwhile has moved the token on.
            if value is not None and token == self._token:
                if len(self._entries) >= MAX_ENTRIES:
                    self._entries.clear()
                self._entries[key] = value
        return value

    def _current_token(self) -> bytes | None:
        scope = _scope_tokens.get()
        key = self._token_key
        if scope is None:
            return get_redis().get(key)
        if key in scope.tokens:
            return scope.tokens[key]
        if key in scope.assumed:
            return scope.assumed[key]
        if scope.optimistic and self._token_read:
            with self._lock:
                scope.assumed[key] = self._token
            return scope.assumed[key]
        _read_all_tokens(scope)  # CacheStale if a token taken on trust had changed
        return scope.tokens[key]

    def invalidate(self) -> None:
        """Every process drops its entries, once the current transaction (if any) commits."""
        # robust: a failing callback registered before this one must not keep
        # the change from every other process.
        transaction.on_commit(self._new_token, robust=True)

    def _new_token(self) -> None:
        with self._lock:
            self._entries.clear()
            # Until the new token is known here, an optimistic scope must read
            # it rather than trust the one it replaces.
            self._token_read = False
        scope = _scope_tokens.get()
        if scope is not None:  # this unit's next read asks again
            scope.tokens.pop(self._token_key, None)
            scope.assumed.pop(self._token_key, None)
        token = secrets.token_hex(16).encode()
        try:
            get_redis().set(self._token_key, token)
        except redis.RedisError:
            # The change is committed; other processes cannot be told. They
            # read Redis before every use, so with Redis down they read the
            # database anyway, and a Redis that comes back empty (no token)
            # differs from the token they loaded under.
            logger.exception("cache %s: could not publish a new token", self.name)
            return
        with self._lock:
            if not self._entries:  # nothing was loaded under an older token meanwhile
                self._token, self._token_read = token, True


def cache_invalidate_on_save(cache: SharedCache, *models) -> None:
    """Drop `cache` everywhere whenever a row of one of `models` is saved or deleted."""

    def changed(**_kwargs) -> None:
        cache.invalidate()

    for model in models:
        uid = f"{cache.name}:{model._meta.label}"
        post_save.connect(changed, sender=model, weak=False, dispatch_uid=f"{uid}:save")
        post_delete.connect(changed, sender=model, weak=False, dispatch_uid=f"{uid}:delete")


def caches_reset() -> None:
    """Every cache dropped in every process, now: after `migrate` (data migrations
    send no save signals) and between tests (which empty tables without them)."""
    for cache in _all:
        cache._new_token()
