"""Optimistic cache scopes (accounts.cache): cached rows used under the token this process
last read, checked later in the rate-limit script, a stale unit of work started again.

Against the test run's real Redis. "Another process" changing a row is its
token rewritten in Redis while this process's cache keeps what it loaded, as
a change committed elsewhere leaves it.
"""

from __future__ import annotations

import uuid

import pytest

from accounts.cache import (
    CacheStale,
    SharedCache,
    cache_scope,
    cache_scope_checked,
    cache_scope_expected,
    cache_scope_recheck,
)
from accounts.ratelimits import Limit, rate_limit_consume
from accounts.redis import get_redis

# Outside a transaction: caches are bypassed inside one (accounts.cache).
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cache():
    """A cache this process has read once (its token is known here), holding k=v1."""
    shared = SharedCache(f"test-optimistic-{uuid.uuid4().hex[:8]}")
    with cache_scope():
        assert shared.get("k", lambda: "v1") == "v1"
    return shared


def _changed_elsewhere(cache: SharedCache) -> None:
    get_redis().set(f"cachegen:{cache.name}", uuid.uuid4().hex)


def _limit() -> list[Limit]:
    return [Limit(scope=f"org:test-{uuid.uuid4().hex}", limit=100)]


def _remaining(limits: list[Limit]) -> int:
    return rate_limit_consume(kind="tokens", limits=limits, cost=0).remaining


def test_a_token_taken_on_trust_and_found_current_is_checked_by_the_script(cache):
    limits = _limit()
    with cache_scope(optimistic=True):
        # given a value used under the token this process knows
        assert cache.get("k", lambda: "reloaded") == "v1"
        expected = cache_scope_expected()
        assert f"cachegen:{cache.name}" in expected

        # when the script checks it along with its counting
        usage = rate_limit_consume(kind="tokens", limits=limits, cost=7, caches=expected)
        cache_scope_checked(expected)

        # then it counted, and nothing is left to check
        assert usage.remaining == 93
        assert cache_scope_expected() is None
        assert cache_scope_recheck() is False


def test_a_token_changed_elsewhere_fails_the_script_which_counts_nothing(cache):
    limits = _limit()
    with cache_scope(optimistic=True):
        # given a value used on trust, then changed by another process
        assert cache.get("k", lambda: "v2") == "v1"
        _changed_elsewhere(cache)

        # when the script checks the token
        with pytest.raises(CacheStale):
            rate_limit_consume(kind="tokens", limits=limits, cost=7, caches=cache_scope_expected())

    # then nothing was counted
    assert _remaining(limits) == 100
    # and the next unit that reads it (optimistic or not) loads the new value
    with cache_scope():
        assert cache.get("k", lambda: "v2") == "v2"


def test_a_unit_ending_before_its_check_rechecks_and_sees_the_change(cache):
    with cache_scope(optimistic=True):
        assert cache.get("k", lambda: "v2") == "v1"
        _changed_elsewhere(cache)
        # an error answer about to go out: its values are checked first
        assert cache_scope_recheck() is True
    # the unit starting again reads every token first, and the new value
    with cache_scope():
        assert cache.get("k", lambda: "v2") == "v2"
    # after which a unit trusts the new token: nothing stale
    with cache_scope(optimistic=True):
        assert cache.get("k", lambda: "unused") == "v2"
        assert cache_scope_recheck() is False


def test_a_cache_this_process_never_read_is_read_with_every_token(cache):
    # given a unit that took a token on trust, then another process's change
    fresh = SharedCache(f"test-optimistic-new-{uuid.uuid4().hex[:8]}")
    with cache_scope(optimistic=True):
        assert cache.get("k", lambda: "v2") == "v1"
        _changed_elsewhere(cache)

        # when it reads a cache whose token this process has never read
        # (every token is read then), the stale one is found at once
        with pytest.raises(CacheStale):
            fresh.get("k", lambda: "x")


def test_a_change_this_process_commits_is_trusted_under_its_new_token(cache):
    with cache_scope(optimistic=True):
        # given a change committed here (its new token written, its entries dropped)
        cache.invalidate()
        # then the next read loads, and the token it is trusted under is the new one
        assert cache.get("k", lambda: "v2") == "v2"
        expected = cache_scope_expected()
        stored = get_redis().get(f"cachegen:{cache.name}")
        assert expected is None or expected[f"cachegen:{cache.name}"] == stored
        assert cache_scope_recheck() is False
