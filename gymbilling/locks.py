"""PostgreSQL advisory locks on Stripe objects (no-ops on the demo's SQLite).

Stripe objects have no row of ours to lock before we know them, so events
and reversals about one Stripe object serialize on a lock named after it.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import connection


def _lock_id(name: str) -> int:
    return zlib.crc32(name.encode())


@contextmanager
def session_lock(name: str) -> Iterator[None]:
    """Held across transactions (and the Stripe calls between them), until the block ends."""
    if connection.vendor != "postgresql" or not name:
        yield
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [_lock_id(name)])
    try:
        yield
    finally:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s)", [_lock_id(name)])


def transaction_lock(name: str) -> None:
    """Held until the current transaction ends."""
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [_lock_id(name)])
