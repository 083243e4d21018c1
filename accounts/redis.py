"""The one Redis connection pool for rate limits and counters (REDIS_URL)."""

from __future__ import annotations

from functools import cache

import redis
from django.conf import settings


@cache
def get_redis() -> redis.Redis:
    # Short timeouts: a rate limiter that hangs would take the API down with it.
    return redis.Redis.from_url(
        settings.REDIS_URL, socket_timeout=1.0, socket_connect_timeout=1.0, health_check_interval=30
    )
