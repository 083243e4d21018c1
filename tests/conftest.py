"""Suite-wide fixtures: real PostgreSQL, real Redis, real Celery workers.

`make test` checks that PostgreSQL and Redis answer before pytest starts.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.conf import settings
from django.utils import timezone

from metering.reconcile import ledger_reconcile
from metering.services import credits_grant
from tests.factories import OrganizationFactory
from tests.helpers import (
    RUNNING_WORKERS,
    migrate,
    migrate_to_latest,
    process_env,
    stop_process,
    take_queued,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def _fresh_redis():
    """Start the run with an empty test Redis database (settings.REDIS_URL).

    Rate-limit windows and concurrency slots are keyed by organization id, and
    a new test database hands out the same ids again: counters left by an
    earlier run must not count against this one.
    The broker's database too (a Redis broker; CELERY_BROKER_URL and the
    result backend): a message an interrupted run left queued names a job id
    this run's database gives to another job, and would run on it.
    """
    import redis
    from django.conf import settings

    from accounts.redis import get_redis

    get_redis().flushdb()
    for url in {settings.CELERY_BROKER_URL, settings.CELERY_RESULT_BACKEND}:
        if url.split("://", 1)[0] in ("redis", "rediss"):
            redis.Redis.from_url(url).flushdb()


# Rate-limit windows are fixed minutes: a test that counts requests must not
# straddle a window boundary, or the count resets half way through.
WINDOW_MARGIN_SECONDS = 5


@pytest.fixture
def fresh_window() -> None:
    """Wait, if need be, so the test runs inside one rate-limit window."""
    from accounts.ratelimits import WINDOW_SECONDS

    left = WINDOW_SECONDS - time.time() % WINDOW_SECONDS
    if left < WINDOW_MARGIN_SECONDS:
        time.sleep(left + 0.05)


@pytest.fixture(autouse=True)
def _fresh_caches():
    """Each test starts with the catalog and price caches (accounts.cache) dropped in
    every process: the tables they mirror are emptied between tests without the
    save signals that would drop them."""
    from accounts.cache import caches_reset

    caches_reset()


@pytest.fixture(autouse=True)
def _ledger_reconciles(request):
    """After every test that touched the database, every ledger invariant must hold.

    The database fixture is requested from here, so pytest tears this fixture
    down first: the check sees the test's rows, before they are rolled back.
    """
    marker = request.node.get_closest_marker("django_db")
    transactional = "transactional_db" in request.fixturenames or bool(
        marker and (marker.kwargs.get("transaction") or (marker.args and marker.args[0]))
    )
    if transactional:
        request.getfixturevalue("transactional_db")
    elif marker or "db" in request.fixturenames:
        request.getfixturevalue("db")
    else:
        yield
        return
    yield
    report = ledger_reconcile()
    assert report.ok, f"ledger invariants broken after {request.node.nodeid}: {report.violations}"


@pytest.fixture
def migrated_back_and_forth():
    """`run(before)`: migrate back to `before` ((app, migration) pairs), then forward to
    the latest; forward again at the end whatever happens, so the next test finds the
    schema it expects. For a data migration's test (transactional_db)."""

    def _run(before) -> None:
        migrate(before)
        migrate_to_latest()

    yield _run
    migrate_to_latest()


@pytest.fixture
def org(db):
    return OrganizationFactory()


@pytest.fixture
def other_org(db):
    return OrganizationFactory()


@pytest.fixture
def grant():
    """Grant credits through the real service, with sensible defaults."""

    def _grant(organization, amount, **kwargs):
        params = {
            "source": "subscription",
            "paid": True,
            "resellable": True,
            "key": f"test-grant-{uuid.uuid4()}",
            "expires_at": timezone.now() + timedelta(days=30),
        }
        params.update(kwargs)
        return credits_grant(organization=organization, amount=amount, **params)

    return _grant


STRIPE_TEST_SECRET_KEY = "sk_test_gymbilling"
STRIPE_TEST_WEBHOOK_SECRET = "whsec_gymbilling_tests"


@pytest.fixture(scope="session")
def stripe_standin():
    """The local Stripe stand-in (gymbilling/stripe_standin) on a free loopback port.

    Billing in this test process and in the Celery worker talks to it over
    HTTP exactly as it would to api.stripe.com; nothing is mocked.
    """
    from gymbilling.stripe_standin.process import StripeStandIn

    data_dir = ROOT / "var" / f"stripe-standin-{uuid.uuid4().hex[:8]}"
    standin = StripeStandIn(data_dir=data_dir)
    values = {
        "STRIPE_SECRET_KEY": STRIPE_TEST_SECRET_KEY,
        "STRIPE_WEBHOOK_SECRET": STRIPE_TEST_WEBHOOK_SECRET,
        "STRIPE_API_BASE": standin.api_base,
    }
    saved = {name: getattr(settings, name) for name in values}
    for name, value in values.items():
        setattr(settings, name, value)
        os.environ[name] = value  # for the worker process, started after this
    try:
        yield standin
    finally:
        for name, value in saved.items():
            setattr(settings, name, value)
            os.environ.pop(name, None)
        standin.stop()


@pytest.fixture
def app_server(transactional_db, stripe_standin):
    """The app under gunicorn (gthread, 2 workers x 24 threads), as production serves it, on
    the test database and Redis; yields its base URL.

    For crowds: Django's development server behind `live_server` takes a thread and a
    PostgreSQL connection per connection, so 200 clients at once would exhaust
    PostgreSQL's 100 connections; gunicorn queues them for its 48 threads (48
    connections, beside the workers' and the test's own).
    """
    import socket
    import urllib.request

    env = process_env(conn_max_age=600)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = ROOT / "var" / "test-gunicorn.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "gunicorn", "gymbilling.wsgi:application",
                "--bind", f"127.0.0.1:{port}", "--worker-class", "gthread",
                "--workers", "2", "--threads", "24", "--backlog", "512",
                "--graceful-timeout", "5", "--no-control-socket",
            ],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited early; see {log}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=1) as response:
                    if response.status == 200:
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gunicorn did not answer in 60 s; see {log}") from None
                time.sleep(0.1)
        yield url
    finally:
        stop_process(proc)


class EmailWorker:
    """The `email` queue's worker, in the test's own process (see `email_worker`)."""

    def take_messages(self) -> list[tuple[dict, dict]]:
        """Every email queued on the broker, taken off it in order: each message's
        headers and the task's kwargs (to, subject, body), as the message carries them."""
        from accounts.tasks import EMAIL_QUEUE, email_send_task

        taken = []
        for headers, _args, kwargs in take_queued(EMAIL_QUEUE):
            assert headers["task"] == email_send_task.name, headers
            taken.append((headers, kwargs))
        return taken

    def take(self) -> list[dict]:
        """The kwargs of every email queued, taken off the queue."""
        return [kwargs for _headers, kwargs in self.take_messages()]

    def work(self) -> list[dict]:
        """Send every email queued, as a worker would (the task, its retries included);
        the emails land in django.core.mail.outbox. Returns what it took."""
        from accounts.tasks import email_send_task

        taken = self.take()
        for kwargs in taken:
            # (Run eagerly, a retry runs at once, without its wait.)
            result = email_send_task.apply(kwargs=kwargs)
            if result.failed():
                raise result.result
        return taken


@pytest.fixture
def email_worker() -> EmailWorker:
    """Email is sent by a Celery task on the `email` queue (accounts.services.mail). Here
    the test's own process takes the messages off the real broker and runs them, so
    that the emails reach the test's outbox (django.core.mail.outbox); the session's
    worker process (`celery_worker_process`) does not consume that queue, and could only
    send them into an outbox of its own. What an earlier test left queued is dropped
    first."""
    worker = EmailWorker()
    worker.take()
    return worker


@pytest.fixture
def commit_then_mail(django_capture_on_commit_callbacks, email_worker):
    """`with commit_then_mail(): ...`: the block's on_commit callbacks run as its commit
    would run them (the test's own transaction never commits), then the email worker:
    the emails the block queued are in django.core.mail.outbox after it, and none before
    its end."""

    @contextlib.contextmanager
    def _block():
        with django_capture_on_commit_callbacks(execute=True) as callbacks:
            yield callbacks
        email_worker.work()

    return _block


@pytest.fixture(scope="session")
def celery_worker_process(django_db_setup, django_db_blocker, stripe_standin):
    """A real `celery -A gymbilling worker` process on the test database and Redis.

    Not eager mode: tasks cross Redis to another process, as in production.
    Tests using it need `transactional_db` so the worker sees committed rows.
    Every queue but `email`, which `email_worker` works in the test's process
    (`callbacks` included: the job-callback tests expect it to make the first delivery),
    in the precedence order README's worker command gives them (settings:
    queue_order_strategy).
    """
    env = process_env()
    node = f"test-{uuid.uuid4().hex[:8]}"
    named = f"{node}@{os.uname().nodename}"  # as Celery names the node (-n NODE@%h)
    log = ROOT / "var" / "test-celery-worker.log"
    log.parent.mkdir(exist_ok=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "gymbilling", "worker",
                "--pool=prefork", "--concurrency=2", "--loglevel=INFO",
                "-n", f"{node}@%h",
                "-Q", "celery,callbacks,inference.priority,inference.standard,inference.batch",
            ],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        from gymbilling.celery import app

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"celery worker exited early; see {log}:\n{log.read_text()}")
            replies = app.control.ping(destination=[named], timeout=1)
            if replies:
                break
        else:
            raise RuntimeError(f"celery worker did not answer a ping in 60 s; see {log}")
        RUNNING_WORKERS.add(named)
        yield proc
    finally:
        RUNNING_WORKERS.discard(named)
        stop_process(proc)
