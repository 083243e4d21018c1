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

# The tokens read for the current unit of work (cache_scope), by Redis key.
_scope_tokens: ContextVar[dict[str, bytes | None] | None] = ContextVar(
    "cache_scope_tokens", default=None
)


@contextlib.contextmanager
def cache_scope() -> Iterator[None]:
    """One unit of work (a request, a job): each cache's token is read from Redis once.

    The first read of any cache inside it fetches every cache's token in one
    MGET; later reads use them. A change committed by another process while
    the unit runs is seen by the next unit; one it commits itself is seen by
    its own next read (invalidate() forgets the token read).
    """
    reset = _scope_tokens.set({})
    try:
        yield
    finally:
        _scope_tokens.reset(reset)


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
            if token != self._token or now - self._emptied_at > self.max_age_s:
                self._entries.clear()
                self._token = token
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
        if scope is None:
            return get_redis().get(self._token_key)
        if self._token_key not in scope:
            keys = [cache._token_key for cache in _all]
            scope.update(zip(keys, get_redis().mget(keys), strict=True))
        return scope[self._token_key]

    def invalidate(self) -> None:
        """Every process drops its entries, once the current transaction (if any) commits."""
        # robust: a failing callback registered before this one must not keep
        # the change from every other process.
        transaction.on_commit(self._new_token, robust=True)

    def _new_token(self) -> None:
        with self._lock:
            self._entries.clear()
        scope = _scope_tokens.get()
        if scope is not None:
            scope.pop(self._token_key, None)  # this unit's next read asks again
        try:
            get_redis().set(self._token_key, secrets.token_hex(16))
        except redis.RedisError:
            # The change is committed; other processes cannot be told. They
            # read Redis before every use, so with Redis down they read the
            # database anyway, and a Redis that comes back empty (no token)
            # differs from the token they loaded under.
            logger.exception("cache %s: could not publish a new token", self.name)


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
