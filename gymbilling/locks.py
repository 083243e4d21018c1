"""PostgreSQL advisory locks on things with no row of ours to lock (no-ops on the demo's SQLite).

Stripe objects have no row of ours to lock before we know them, so events
and reversals about one Stripe object serialize on a lock named after it.

A name maps to its lock by crc32 (_lock_id). That mapping must never change: a
process of the release before and one of this release, running side by side in a
rolling deploy, must take the same lock for the same name. They do even though the
kinds differ (the release before took session_lock as a session-level
`pg_advisory_lock`, this one as a transaction-level `pg_advisory_xact_lock`): both kinds
of advisory lock on one key exclude each other (tests/gymbilling/test_locks.py).
"""

from __future__ import annotations

import logging
import os
import threading
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from django.db import DEFAULT_DB_ALIAS, DatabaseError, OperationalError, connection, connections

logger = logging.getLogger(__name__)

# Server-side limits that would end the lock's transaction while it waits, idle, for
# the block (a Stripe call of a minute, a payout run): the lock would go with it, and a
# second payout send or refund would start under the first. Zero for the lock's own
# transaction only (set_config's `true`: like SET LOCAL), whatever the role or server
# says; a limit this server does not have (transaction_timeout before PostgreSQL 17)
# is not there to set.
_NO_TIMEOUTS = (
    "SELECT count(set_config(name, '0', true)) FROM pg_settings"
    " WHERE name IN ('idle_in_transaction_session_timeout', 'transaction_timeout')"
)
_TAKE = "SELECT pg_advisory_xact_lock(%s)"


def _lock_id(name: str) -> int:
    return zlib.crc32(name.encode())


class _ThreadLocks(threading.local):
    """This thread's lock connection (a Django connection of its own, not registered in
    `connections`), the process it was opened in, how many session_lock blocks of this
    thread are open on it, and the keys they hold (how many blocks hold each)."""

    conn = None
    pid = 0
    depth = 0

    def __init__(self) -> None:  # run in each thread: a dict of its own
        self.keys: Counter[int] = Counter()


_held = _ThreadLocks()


@contextmanager
def session_lock(name: str) -> Iterator[None]:
    """Held across transactions (and the Stripe calls between them), until the block ends.

    Taken in a transaction of its own (`pg_advisory_xact_lock`) on a connection of its
    own: one per thread, opened from the default database's settings (the same host,
    port, user, password and OPTIONS; the test database under the tests), open while
    the block runs. So the lock is the same directly on PostgreSQL and behind a
    transaction-pooling PgBouncer, where a transaction keeps its one server connection
    to its end (a session-level lock on the default connection did not stay with this
    process there). The block's own queries, its transactions and connection.close()
    are on the default connection and do not touch it; the lock ends with the block,
    raised or not (the transaction rolled back), or with the connection if the process
    dies.

    Nested blocks on one thread share the transaction, each in a savepoint rolled back
    at its end: an inner block's lock ends with the inner block, as it did before (the
    same name twice is taken twice, held until the outer one ends).

    Call it with no transaction open on the default connection (each service owns its
    transactions, and no Stripe call runs inside one): the lock's connection is another
    PostgreSQL session, so rows the caller's open transaction had locked would stay
    locked while it waits, and a wait on each other through this process would be a
    deadlock PostgreSQL cannot see.

    The connection is kept between blocks for as long as the default connection would
    be (CONN_MAX_AGE: at the default 0, closed as the outermost block ends).
    """
    if connection.vendor != "postgresql" or not name:
        yield
        return
    lock_id = _lock_id(name)
    depth = _held.depth
    if depth == 0:
        conn = _begin(lock_id)
    else:
        conn = _held.conn
        if conn.connection is None:
            # Closed as an inner block's release failed: the outer block's locks are gone
            # with it. Not reopened (a statement here would), the work stops here.
            raise OperationalError(
                f"session lock {name!r}: the locks of the blocks around it were lost"
            )
        savepoint = f"session_lock_{depth}"
        _execute(conn, f"SAVEPOINT {savepoint}")
        try:
            _execute(conn, _TAKE, [lock_id])
        except BaseException:
            _release(conn, savepoint, name=name)
            raise
    _held.depth = depth + 1
    _held.keys[lock_id] += 1
    try:
        yield
    finally:
        _held.keys[lock_id] -= 1
        if not _held.keys[lock_id]:
            del _held.keys[lock_id]
        _held.depth = depth
        _release(conn, f"session_lock_{depth}" if depth else None, name=name)


def _begin(lock_id: int):
    """The outermost lock: this thread's lock connection, a transaction, the lock in it."""
    if _held.conn is None or _held.pid != os.getpid():
        # A connection inherited across a fork is the parent's socket: left alone (psycopg
        # does not close a connection of another process), never used.
        default = connections[DEFAULT_DB_ALIAS]
        _held.conn, _held.pid = type(default)(default.settings_dict, DEFAULT_DB_ALIAS), os.getpid()
    conn = _held.conn
    conn.close_if_unusable_or_obsolete()  # past CONN_MAX_AGE, or failing since last used
    while True:
        reused = conn.connection is not None
        try:
            _transaction_lock(conn, lock_id)
        except OperationalError:
            if reused and _broken(conn):
                # Dropped while idle between blocks (the server restarted, a pooler or a
                # firewall closed it): nothing was held on it; once more on a new one.
                conn.close()
                continue
            _rollback(conn)
            raise
        except BaseException:
            _rollback(conn)
            raise
        return conn


def _transaction_lock(conn, lock_id: int) -> None:
    with conn.cursor() as cursor:
        cursor.execute("BEGIN")
        cursor.execute(_NO_TIMEOUTS)
        cursor.execute(_TAKE, [lock_id])


def _release(conn, savepoint: str | None, *, name: str) -> None:
    """End a block's lock: its savepoint rolled back, or the outermost's transaction.

    A connection that fails here has lost its locks with it (PostgreSQL ends the
    transaction of a connection that is gone): closed, and logged, not raised over what
    the block did or raised."""
    if conn.connection is None:  # closed after an earlier failure: its locks went with it
        return
    try:
        if savepoint is None:
            _execute(conn, "ROLLBACK")
        else:
            _execute(conn, f"ROLLBACK TO SAVEPOINT {savepoint}")
            _execute(conn, f"RELEASE SAVEPOINT {savepoint}")
    except DatabaseError:
        logger.exception("session lock %r: its connection failed; closed, with its locks", name)
        conn.close()
        return
    if savepoint is None:
        conn.close_if_unusable_or_obsolete()


def _rollback(conn) -> None:
    """After a failed start: no transaction left open on the lock connection."""
    try:
        if conn.connection is not None:
            _execute(conn, "ROLLBACK")
    except DatabaseError:
        conn.close()


def _execute(conn, sql: str, params=None) -> None:
    with conn.cursor() as cursor:
        cursor.execute(sql, params)


def _broken(conn) -> bool:
    raw = conn.connection
    return raw is None or bool(raw.closed) or bool(getattr(raw, "broken", False))


def transaction_lock(name: str) -> None:
    """Held until the current transaction ends.

    Taken on the default connection, unless a session_lock block of this thread holds the
    same key (another name with the same crc32: the prefixes of the two kinds' names
    differ) on its lock connection. The thread has the key already, so the lock is not
    taken twice: on the default connection it would wait for the lock connection, held
    by this same thread, idle in its transaction until the thread goes on, which it never
    would (PostgreSQL sees two sessions, not a deadlock, and the lock connection's idle
    timeouts are off). The key stays held to the transaction's end: session_lock is
    entered with no transaction open, so a transaction begun in its block ends before
    the block does. So it was when both ran on one session (its locks are re-entrant).

    Accepted, given its odds: two threads (or processes), one holding session_lock on a
    key and then waiting for rows the other's transaction has locked, the other then
    taking transaction_lock on the same key (a crc32 collision of two names). Each waits
    for the other, through a connection PostgreSQL does not see waiting, until the
    session lock's block is ended from outside (pg_terminate_backend on either). Taking
    transaction locks in a key space of their own (the two-int form of the lock) would
    end it, but a process of this release and one of the release before, side by side in
    a rolling deploy, would then not exclude each other on one name (module docstring).
    """
    if connection.vendor != "postgresql":
        return
    lock_id = _lock_id(name)
    if _held.keys[lock_id] and _held.pid == os.getpid() and _held.conn.connection is not None:
        # Held by this thread's session_lock, on its lock connection, still open (closed,
        # after a failed release, its locks went with it). Not in a process forked inside
        # the block: the parent holds it there.
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_xact_lock(%s)", [lock_id])
