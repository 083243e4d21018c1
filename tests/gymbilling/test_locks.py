"""session_lock on real PostgreSQL, directly and behind a transaction-pooling PgBouncer.

What the locks serialize (payout sends, refunds, overage runs, a customer's Stripe
events) pays money twice if two processes get in at once, so each test runs the lock
on real connections, two threads standing for two processes, and asserts who got in
when: a waiting thread is seen waiting in pg_locks (tests/helpers.py), not assumed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest
from django.db import connection, connections, transaction

from gymbilling import locks
from gymbilling.locks import _lock_id, session_lock
from tests.helpers import lock_waiters, on_own_connection, stop_process, wait_until

pytestmark = pytest.mark.django_db

PGBOUNCER = os.environ.get("PGBOUNCER") or shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def held(name: str) -> bool:
    """Whether some session holds `name`'s lock: asked by another thread, on a connection
    of its own, in a transaction of its own that takes the lock if it is free and lets it
    go as it ends (one server connection throughout, behind PgBouncer too)."""
    answer, errors = [], []

    def ask():
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s)", [_lock_id(name)])
            answer.append(not cursor.fetchone()[0])

    asking = threading.Thread(target=on_own_connection, args=(ask, errors))
    asking.start()
    asking.join(timeout=60)
    assert errors == [] and len(answer) == 1, errors
    return answer[0]


class Holder:
    """A thread that takes `name`'s lock, runs `inside(record)` under it and says so
    (`entered`), runs `inside` again under it when the test calls `go_on`, and keeps the
    lock until the test calls `end`."""

    def __init__(self, name: str, inside=lambda record: None):
        self.entered, self.errors, self.record = threading.Event(), [], []
        self._go_on, self._went_on, self._release = (threading.Event() for _ in range(3))

        def work():
            with session_lock(name):
                inside(self.record)
                self.entered.set()
                if self._go_on.wait(timeout=60):
                    inside(self.record)
                    self._went_on.set()
                assert self._release.wait(timeout=60)

        self.thread = threading.Thread(target=on_own_connection, args=(work, self.errors))
        self.thread.start()

    def go_on(self) -> None:
        self._go_on.set()
        assert self._went_on.wait(timeout=60), self.errors

    def end(self) -> None:
        self._go_on.set()
        self._release.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive() and self.errors == []


def waits_for(name: str) -> Holder:
    """A second thread asking for `name`, returned once it waits for the lock (or, the
    lock not holding, has got in)."""
    second = Holder(name)
    wait_until(
        lambda: second.entered.is_set() or lock_waiters() > 0, what="the second to ask for it"
    )
    return second


def transactions(record: list) -> None:
    """A holder's work between its Stripe calls: transactions of its own, one after the
    other, on its Django connection (the id of each recorded)."""
    for _ in range(3):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute("SELECT txid_current()")
            record.append(cursor.fetchone()[0])


def assert_one_after_the_other(name: str) -> None:
    # given: one thread holds the lock, and has run transactions under it
    first = Holder(name, inside=transactions)
    assert first.entered.wait(timeout=60)

    # when: a second asks for it, and meanwhile the first runs more transactions
    second = waits_for(name)
    first.go_on()

    # then: the second waits until the first lets go (six transactions later), and only
    # then gets in
    assert not second.entered.is_set(), "two holders of one lock at once"
    assert held(name)
    assert len(set(first.record)) == 6
    first.end()
    assert second.entered.wait(timeout=60)
    second.end()
    assert not held(name)


def test_two_threads_hold_one_lock_one_after_the_other():
    assert_one_after_the_other("payout:1")


def test_the_lock_outlives_the_holders_own_connection_being_closed():
    # given: a thread holds the lock, then its Django connection is closed (a connection
    # dropped, Django's close_old_connections) and opened again by its next query
    def close_and_query(record: list) -> None:
        connection.close()
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            record.append(cursor.fetchone()[0])

    first = Holder("refund:pi_1", inside=close_and_query)
    assert first.entered.wait(timeout=60)

    # when: another thread asks for the lock, and the first closes its connection again
    second = waits_for("refund:pi_1")
    first.go_on()

    # then: it waits for the first block to end, not for the connection
    assert first.record == [1, 1]
    assert not second.entered.is_set(), "the lock went with the holder's connection"
    first.end()
    assert second.entered.wait(timeout=60)
    second.end()


def test_nested_locks_end_with_their_own_blocks():
    # given / when: locks nested in one thread
    with session_lock("outer"):
        with session_lock("inner"):
            # then: both held while the inner block runs
            assert (held("outer"), held("inner")) == (True, True)
        # the inner one ends with its block; the outer one is still held
        assert (held("outer"), held("inner")) == (True, False)
        # the outer one's name taken again inside it is held until the outer block ends
        with session_lock("outer"):
            pass
        assert held("outer")
    assert (held("outer"), held("inner")) == (False, False)


def test_a_lock_ends_when_its_block_raises():
    # given / when: a block raises under a lock, and an inner block raises under another
    with pytest.raises(ZeroDivisionError), session_lock("payout:2"):
        with pytest.raises(KeyError), session_lock("payout:3"):
            raise KeyError("inner")
        # then: the inner lock ended with its block; the outer one still holds
        assert (held("payout:2"), held("payout:3")) == (True, False)
        raise ZeroDivisionError

    # then: nothing is held, and the lock is taken again at once
    assert (held("payout:2"), held("payout:3")) == (False, False)
    with session_lock("payout:2"):
        assert held("payout:2")


def test_a_process_of_the_release_before_and_this_one_exclude_each_other():
    """During a rolling deploy the release before takes the lock at session level
    (`pg_advisory_lock` on the same crc32 of the name); this one, in a transaction. Both
    kinds exclude each other on one key, either way round."""
    # given: an older process holds the lock its way (the test's connection stands for it)
    name = "stripe-customer:cus_1"
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_lock(%s)", [_lock_id(name)])

    # when: this release asks for it
    first = Holder(name)
    wait_until(lambda: first.entered.is_set() or lock_waiters() > 0, what="it to ask")

    # then: it waits for the older one, and gets in once that lets go
    assert not first.entered.is_set()
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_advisory_unlock(%s)", [_lock_id(name)])
    assert first.entered.wait(timeout=60)

    # and while this release holds it, the older one's way does not get it
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_try_advisory_lock(%s)", [_lock_id(name)])
        assert cursor.fetchone()[0] is False
    first.end()


def test_a_transaction_lock_on_a_key_the_thread_holds_by_session_lock_goes_on(monkeypatch):
    """Two names whose crc32 is the same are one lock. Taken by one thread, session_lock's
    on its lock connection and then transaction_lock's on its Django connection, the second
    would wait for the first, held by the same thread, idle in its transaction: a wait no
    one ends (PostgreSQL sees two sessions, not a deadlock). The thread holds the key
    already, so it goes on, as it did when both ran on one session."""
    # given: every name maps to one key
    monkeypatch.setattr(locks, "_lock_id", lambda name: 42)
    pids, errors, done = [], [], threading.Event()

    def work():
        with session_lock("a"), transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                pids.append(cursor.fetchone()[0])
            # when: the thread takes a transaction lock on the key it holds
            locks.transaction_lock("b")
            done.set()

    thread = threading.Thread(target=on_own_connection, args=(work, errors))
    thread.start()
    thread.join(timeout=5)
    if thread.is_alive():
        # stuck waiting for itself: its waiting connection ended, so that the suite goes on
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pids[0]])
        thread.join(timeout=60)

    # then: it got through, with the key held by no one once the block ended
    assert done.is_set(), "transaction_lock waited for its own thread's session_lock"
    assert not thread.is_alive() and errors == []
    assert not held("anything")


def test_a_lock_outlives_the_servers_idle_in_transaction_timeout(monkeypatch):
    # given: the role (or the server) ends sessions idle in a transaction after 100 ms
    settings_dict = connections["default"].settings_dict
    options = {**settings_dict["OPTIONS"], "options": "-c idle_in_transaction_session_timeout=100"}
    monkeypatch.setitem(settings_dict, "OPTIONS", options)

    # when: a block holds the lock while it waits, longer than that, for Stripe
    with session_lock("overage-run"):
        time.sleep(0.5)

        # then: the lock is still held
        assert held("overage-run")
    assert not held("overage-run")


def test_a_kept_lock_connection_dropped_between_blocks_is_opened_again(monkeypatch):
    # given: lock connections kept between blocks (CONN_MAX_AGE), and this thread's one
    # ended by the server (a restart, a pooler's or a firewall's idle limit) between two
    monkeypatch.setitem(connections["default"].settings_dict, "CONN_MAX_AGE", 60)
    try:
        with session_lock("payout:4"):
            pass
        pid = locks._held.conn.connection.info.backend_pid
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        wait_until(lambda: not _backend_alive(pid), what="the connection to end")

        # when: the thread takes a lock again
        with session_lock("payout:4"):
            # then: it holds it, on a new connection
            assert held("payout:4")
            assert locks._held.conn.connection.info.backend_pid != pid
        assert not held("payout:4")
    finally:
        locks._held.conn.close()


def _backend_alive(pid: int) -> bool:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid])
        return cursor.fetchone()[0] > 0


# --- behind PgBouncer in transaction mode ---------------------------------------------------


@pytest.fixture
def through_pgbouncer(monkeypatch):
    """Connections opened from now on (the threads', their lock connections') go through
    a PgBouncer in transaction mode (Debian's: `make test` installs it,
    scripts/ensure_pgbouncer.sh), which hands each transaction, or each statement outside
    one, whichever of its server connections is free. The test's own connection stays
    where it is, directly on PostgreSQL."""
    assert os.access(PGBOUNCER, os.X_OK), (
        f"{PGBOUNCER} is missing: `make pgbouncer` installs it (or set PGBOUNCER)"
    )
    db = connections["default"].settings_dict
    port = _free_port()
    folder = Path(tempfile.mkdtemp(prefix="pgbouncer-"))
    # Three server connections: one a holder's lock transaction keeps, one a waiter's, one
    # for the holder's own transactions. A lock taken at session level (the release
    # before) left none kept: the one in use at a time was the one the waiter was handed
    # next, lock and all.
    server = f"host={db['HOST'] or '127.0.0.1'} port={db['PORT'] or 5432}"
    if db["PASSWORD"]:
        server += f" password={db['PASSWORD']}"
    (folder / "users.txt").write_text(f'"{db["USER"]}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        f"[databases]\n* = {server}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 3\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
    )
    for path in (folder, *folder.iterdir()):
        path.chmod(0o755 if path.is_dir() else 0o644)
    # PgBouncer refuses to run as root; as root (CI), it is told to become nobody.
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    log = folder / "pgbouncer.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [PGBOUNCER, *user, str(folder / "pgbouncer.ini")], stdout=out, stderr=out
        )
    try:
        wait_until(lambda: _answers(port) or proc.poll() is not None, what="PgBouncer")
        assert proc.poll() is None, log.read_text()
        monkeypatch.setitem(db, "HOST", "127.0.0.1")
        monkeypatch.setitem(db, "PORT", str(port))
        yield port
    finally:
        stop_process(proc)
        shutil.rmtree(folder, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_behind_pgbouncer_in_transaction_mode_two_threads_hold_one_lock_one_after_the_other(
    through_pgbouncer,
):
    """A session-level lock taken through it stays on the server connection, which goes
    back to the pool at once: the next process handed that connection would get the same
    lock again (PostgreSQL's locks are re-entrant) while the first still ran."""
    assert_one_after_the_other("market-payout:5")
