"""Small helpers shared by tests."""

import contextlib
from decimal import Decimal

MICRO = 1_000_000


def credits(n: int | str) -> int:
    """Credits (an int or a decimal string such as "0.5") to micro-credits."""
    value = Decimal(str(n)) * MICRO
    assert value == value.to_integral_value(), f"{n} is finer than a micro-credit"
    return int(value)


def migrate(targets) -> None:
    """Migrate the test database to `targets`: (app, migration) pairs, back or forward."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    MigrationExecutor(connection).migrate(targets)


def migrate_to_latest() -> None:
    """Migrate the test database forward to every app's latest migration."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())


def ledger_rows() -> tuple[int, int, int, int, int]:
    """Row counts of every ledger table: a refused call must leave them all as they were."""
    from metering.models import CreditLot, Hold, JournalTransaction, LedgerEntry, LotMovement

    return (
        JournalTransaction.objects.count(),
        LedgerEntry.objects.count(),
        CreditLot.objects.count(),
        LotMovement.objects.count(),
        Hold.objects.count(),
    )


def system_balance(kind: str) -> int:
    """A system account's balance (the sum of its entries; 0 before it exists)."""
    from metering.models import LedgerAccount
    from metering.selectors import account_balance

    account = LedgerAccount.objects.filter(kind=kind, organization__isnull=True).first()
    return account_balance(account=account) if account else 0


def expire_just_after(hold, *lots) -> None:
    """The lots expire a microsecond after the hold was placed, as the passing of time
    would have them, and their account is told, as a grant tells it; no sweep runs."""
    from datetime import timedelta

    from metering.models import CreditLot, LedgerAccount

    expired_at = hold.created_at + timedelta(microseconds=1)
    CreditLot.objects.filter(pk__in=[lot.pk for lot in lots]).update(expires_at=expired_at)
    LedgerAccount.objects.filter(pk=lots[0].account_id).update(next_expiry_at=expired_at)


def expire_now(*lots) -> None:
    """The lots are past their expiry (a minute ago), as the passing of time would have them,
    and their account is told, as a grant tells it; the sweep has not run yet."""
    from datetime import timedelta

    from django.utils import timezone

    from metering.models import CreditLot, LedgerAccount

    expired_at = timezone.now() - timedelta(minutes=1)
    CreditLot.objects.filter(pk__in=[lot.pk for lot in lots]).update(expires_at=expired_at)
    LedgerAccount.objects.filter(pk=lots[0].account_id).update(next_expiry_at=expired_at)


def listed(org, amount: int, key: str = "listing-1") -> None:
    """`amount` of the organization's resellable credits listed: moved to its escrow,
    keeping their expiry."""
    from metering.models import AccountKind
    from metering.services import credits_transfer

    credits_transfer(
        source=org,
        destination=org,
        amount=amount,
        key=key,
        destination_kind=AccountKind.ESCROW,
        only_resellable=True,
    )


def lots_due_while_a_job_runs(org, grant) -> tuple:
    """Lots of the wallet past their expiry that the sweep has not moved yet, beside 100
    credits that never expire: `held`, 10 of which a job placed before they expired holds
    4 (key "job-running"), and `gone`, 10 that expired before the job was placed. Returns
    (held, gone, forever). The wallet shows 100 and the job holds 4: the sweep moves the
    other 16, and leaves `held` its 4 for the job."""
    from datetime import timedelta

    from django.utils import timezone

    from metering.services import hold_place

    tomorrow = timezone.now() + timedelta(days=1)
    held = grant(org, credits(10), expires_at=tomorrow)
    gone = grant(org, credits(10), expires_at=tomorrow)
    forever = grant(org, credits(100), expires_at=None)
    expire_just_after(hold_place(organization=org, amount=credits(4), key="job-running"), held)
    expire_now(gone)
    return held, gone, forever


def changelist_column(page: str, field: str) -> dict[str, str]:
    """An admin changelist's `field` column as rendered, by each row's id (its first column)."""
    import re

    rows = re.findall(r'<th class="field-id"><a [^>]*>(\d+)</a></th>(.*?)</tr>', page, re.S)
    cell = re.compile(rf'<td class="field-{field}[^"]*">([^<]*)</td>')
    return {pk: match[1] for pk, rest in rows if (match := cell.search(rest))}


def drawn_form(page: str, form_id: str) -> dict[str, str]:
    """What a browser sends of the page's form `form_id` as drawn (no submit button): its
    inputs' values, ticked boxes only, textareas, and each select's selected option."""
    from html.parser import HTMLParser

    class _Form(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.inside, self.fields, self._text, self._select = False, {}, None, None

        def handle_starttag(self, tag, attrs):
            a = dict(attrs)
            if tag == "form":
                self.inside = a.get("id") == form_id
            elif tag == "option" and self._select and "selected" in a:
                self.fields[self._select] = a.get("value") or ""
            elif not self.inside or not a.get("name"):
                return
            elif tag == "input" and a.get("type") not in ("submit", "button", "image"):
                if a.get("type") not in ("checkbox", "radio") or "checked" in a:
                    self.fields[a["name"]] = a.get("value") or ""
            elif tag == "textarea":
                self._text = a["name"]
                self.fields[self._text] = ""
            elif tag == "select":
                self._select = a["name"]

        def handle_endtag(self, tag):
            if tag == "form":
                self.inside = False
            elif tag == "textarea" and self._text:
                # A browser drops the one line break that opens a textarea's text.
                self.fields[self._text] = self.fields[self._text].removeprefix("\n")
                self._text = None
            elif tag == "select":
                self._select = None

        def handle_data(self, data):
            if self._text:
                self.fields[self._text] += data

    parser = _Form()
    parser.feed(page)
    return parser.fields


def wait_until(condition, *, timeout: float = 60.0, what: str = "the condition"):
    """Poll `condition` until it returns something truthy, and return that.

    For outcomes another process produces (a webhook delivered, a Celery task
    run): the test asserts the outcome, and the timeout only bounds how long
    a broken build takes to fail.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def redis_aged(seconds: float, *keys: str) -> None:
    """Redis's clock moved on by `seconds` for these keys: each whose life left is shorter
    is gone, as it would have expired; the rest have that much less to live. A test of
    what is still there after the broker's visibility timeout or the orphaned jobs'
    grace cannot wait for either."""
    from accounts.redis import get_redis

    redis_client = get_redis()
    for key in keys:
        left_ms = redis_client.pttl(key)
        if left_ms == -1:
            continue  # no expiry: nothing to age
        if left_ms <= seconds * 1000:
            redis_client.delete(key)
        else:
            redis_client.pexpire(key, left_ms - int(seconds * 1000))


# --- races on real connections -------------------------------------------------------------
#
# A hook on a call the code makes anyway only decides when each connection runs
# (nothing is mocked); a race test then waits for a state PostgreSQL reports (a lock
# waited for, a thread done), never for a length of time.


def lock_waiters() -> int:
    """Connections to this database waiting for a lock (row, transaction or advisory)."""
    from django.db import connection

    with connection.cursor() as cursor:
        # pg_stat_activity is read once per transaction unless told otherwise, and
        # the caller may be inside one.
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE NOT l.granted AND a.datname = current_database()"
        )
        return cursor.fetchone()[0]


def on_own_connection(work, errors: list) -> None:
    """A thread's body: `work()` on the thread's own database connection, closed after; what
    it raises goes to `errors`, for the test to assert on."""
    from django.db import connection

    try:
        work()
    except Exception as exc:  # surfaced by the test's assertion
        errors.append(exc)
    finally:
        connection.close()


def pause_after(monkeypatch, module, name: str, *, thread: str | None = None, when=None):
    """Make `module.name` pause its caller once it returns, the first time it is called (on
    the thread named `thread`, if given, and with arguments for which `when(*args,
    **kwargs)` is true, if given), until the test sets `resume`: the caller's
    transaction stays open, holding what it locked. Returns (paused, resume) events."""
    import threading

    real = getattr(module, name)
    paused, resume = threading.Event(), threading.Event()

    def call_then_pause(*args, **kwargs):
        result = real(*args, **kwargs)
        here = thread is None or threading.current_thread().name == thread
        if here and (when is None or when(*args, **kwargs)) and not paused.is_set():
            paused.set()
            resume.wait(timeout=60)
        return result

    monkeypatch.setattr(module, name, call_then_pause)
    return paused, resume


def no_deadlock_retries(monkeypatch) -> None:
    """A deadlock reaches its caller instead of being retried away (retry_on_deadlock):
    one detected at COMMIT, where PostgreSQL checks Django's deferred foreign keys, too."""
    from metering.services import postings

    monkeypatch.setattr(postings, "DEADLOCK_RETRIES", 0)


def run_against_paused(thread, *, paused, resume, what: str) -> None:
    """Start `thread` while the thread `paused` waits in pause_after's hook; once `thread` is
    done or waits for a lock (`what`), let `paused` go on, and wait for both to end."""
    thread.start()
    wait_until(lambda: not thread.is_alive() or lock_waiters() > 0, what=what)
    resume.set()
    paused.join(timeout=120)
    thread.join(timeout=120)
    assert not paused.is_alive() and not thread.is_alive(), "a thread is stuck (a deadlock?)"


def served_model(
    name: str,
    *,
    grpc_urls: list[str] | None = None,
    metrics_urls: list[str] | None = None,
    input_rate: str = "0.5",
    cached_input_rate: str = "0.25",
    output_rate: str = "1.5",
    **model_fields,
):
    """A catalog model on its own server pool, priced in the price book (credits per 1M tokens).

    The pool's default address is one nothing listens on: for tests that never
    reach an engine.
    """
    from inference.models import CatalogModel, ServerPool
    from metering.services import price_book_publish

    price_book_publish(
        prices=[
            {
                "model_name": name,
                "input_rate": Decimal(input_rate),
                "cached_input_rate": Decimal(cached_input_rate),
                "output_rate": Decimal(output_rate),
                "minimum_charge": 0,
            }
        ]
    )
    pool = ServerPool.objects.create(
        name=f"pool-{name}",
        grpc_urls=grpc_urls or ["127.0.0.1:1"],
        metrics_urls=metrics_urls or [],
    )
    return CatalogModel.objects.create(name=name, pool=pool, **model_fields)


def pending_callback(*, name: str, url: str, due_at=None):
    """A pending callback, due at `due_at` (now by default), of a job that has already
    ended (asking for it at `url`): both written directly, so no Celery message is sent
    for it. `name` names its model, job and event."""
    from django.utils import timezone

    from inference.models import Job, JobCallback, JobStatus
    from metering.selectors import model_price
    from tests.factories import OrganizationFactory

    model = served_model(f"gym-{name}", access_tier="basic")
    job = Job.objects.create(
        public_id=f"job_{name}_test",
        organization=OrganizationFactory(),
        model=model,
        model_price=model_price(model_name=model.name),
        status=JobStatus.SUCCEEDED,
        params={"max_tokens": 4},
        hold_amount=0,
        finished_at=timezone.now(),
        callback_url=url,
    )
    return JobCallback.objects.create(
        job=job,
        organization=job.organization,
        event_id=f"evt_{name}",
        event_type="job.succeeded",
        url=url,
        body=f'{{"id":"evt_{name}"}}',
        next_attempt_at=due_at or timezone.now(),
    )


def submit_job(
    organization,
    model_name: str,
    *,
    prompt: str = "Plan my week.",
    max_tokens=16,
    priority: str = "standard",
    api_key=None,
    user=None,
):
    """An asynchronous job through the real job_submit (hold, limits, row; its task on commit),
    sent by `api_key` or by `user` (a member signed in to the dashboard), or by neither."""
    from inference.services import job_submit
    from inference.services.jobs import SubmitParams

    return job_submit(
        organization=organization,
        api_key=api_key,
        user=user,
        model_name=model_name,
        prompt=prompt,
        params=SubmitParams(max_tokens=max_tokens),
        priority=priority,
        kind="async",
    )


def usage_draft(
    organization,
    job_id: str,
    charged: int,
    *,
    model_name: str = "gym-tiny",
    engine_busy_ms: int = 0,
    serving_cost: int = 0,
    currency: str = "usd",
    user_id: int | None = None,
):
    """The usage record a settlement writes with its capture (metering's UsageDraft)."""
    from metering.services import Usage
    from metering.services.usage import UsageDraft

    return UsageDraft(
        organization_id=organization.pk,
        job_id=job_id,
        model_name=model_name,
        priority="standard",
        usage=Usage(input_tokens=40, cached_input_tokens=8, output_tokens=12),
        credits=charged,
        engine_busy_ms=engine_busy_ms,
        serving_cost=serving_cost,
        currency=currency,
        user_id=user_id,
    )


def job_settled(organization, charged: int, *, job_id: str | None = None, **usage):
    """A job of `charged` micro-credits as inference settles one: held for exactly that,
    then captured with its usage record (`usage`: usage_draft's options). Returns the hold."""
    import uuid

    from metering.services import hold_capture, hold_place

    job_id = job_id or f"job-{uuid.uuid4().hex[:12]}"
    hold_place(organization=organization, amount=charged, key=job_id)
    return hold_capture(
        key=job_id, amount=charged, usage=usage_draft(organization, job_id, charged, **usage)
    )


def job_state(job) -> tuple:
    """A job's row and its hold's, whole, the ledger's row counts and its organization's
    balance: what a message or a sweep that must leave the job alone leaves as it was."""
    from inference.models import Job
    from metering.models import Hold
    from metering.selectors import organization_balance

    return (
        Job.objects.filter(pk=job.pk).values().get(),
        Hold.objects.filter(key=job.public_id).values().get(),
        ledger_rows(),
        organization_balance(organization=job.organization),
    )


class StatementLog:
    """Every statement sent through Django's connection, the prepared ones (accounts.sql) too.

    Use as `with connection.execute_wrapper(log := StatementLog()): ...`.
    """

    def __init__(self):
        self.sql: list[str] = []

    def __call__(self, execute, sql, params, many, context):
        self.sql.append(sql)
        return execute(sql, params, many, context)


def stop_process(proc) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 30 s (a subprocess.Popen)."""
    import signal
    import subprocess

    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def process_env(*, conn_max_age: int = 0) -> dict[str, str]:
    """The environment for a process a test starts (a Celery worker, gunicorn): this run's
    settings, the test database (`conn_max_age`: Django's persistent connections, in
    seconds), its Redis and its broker."""
    import os

    from django.conf import settings

    db = settings.DATABASES["default"]
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "gymbilling.settings.test",
        "DATABASE_URL": (
            f"postgres://{db['USER']}:{db.get('PASSWORD') or ''}@{db['HOST']}:{db['PORT']}"
            f"/{db['NAME']}?conn_max_age={conn_max_age}"
        ),
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "CELERY_RESULT_BACKEND": settings.CELERY_RESULT_BACKEND,
    }


def settings_in_a_fresh_process(script: str, *, env: dict[str, str]):
    """Run `script` after `django.setup()` in a new Python process with exactly `env`
    (settings derive their values as the process starts, so a test of what the environment
    does needs a process of its own; a developer's .env is not read). Returns the
    CompletedProcess: stdout and stderr as text."""
    import subprocess
    import sys

    from django.conf import settings

    prelude = (
        "import environ, django\nenviron.Env.read_env = lambda *a, **k: None\ndjango.setup()\n"
    )
    return subprocess.run(
        [sys.executable, "-c", prelude + script],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def take_queued(queue_name: str) -> list[tuple[dict, list, dict]]:
    """Every message waiting on the broker's `queue_name`, taken off it in order: each
    one's headers (the task's name under "task"), and the task's args and kwargs."""
    from kombu import Queue

    from gymbilling.celery import app

    taken = []
    with app.connection_for_read() as connection:
        queue = Queue(queue_name)(connection.default_channel)
        while (message := queue.get(no_ack=True, accept=["json"])) is not None:
            args, kwargs, _embed = message.decode()
            taken.append((message.headers, args, kwargs))
    return taken


@contextlib.contextmanager
def celery_worker_started(
    log,
    *,
    queues: list[str],
    pool: str,
    concurrency: int,
    conn_max_age: int = 0,
    env: dict[str, str] | None = None,
    node_prefix: str = "own",
):
    """A `celery -A gymbilling worker` process of the test's own on `queues` (its -Q, in
    that order), answering pings; yields (process, log). `log`: the file its output goes
    to; `env`: more environment for it (its settings). Stopped when the block ends.

    Other workers (the session's) still consume the same queues: pause them first
    (paused_consumers) where a test needs the messages to go to this one.
    """
    import os
    import subprocess
    import sys
    import time
    import uuid

    from django.conf import settings

    from gymbilling.celery import app

    node = f"{node_prefix}-{uuid.uuid4().hex[:8]}@{os.uname().nodename}"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "celery", "-A", "gymbilling", "worker",
                f"--pool={pool}", f"--concurrency={concurrency}", "--loglevel=INFO",
                "-n", node, "-Q", ",".join(queues), "--without-gossip", "--without-mingle",
            ],
            cwd=settings.BASE_DIR, env=process_env(conn_max_age=conn_max_age) | (env or {}),
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(destination=[node], timeout=1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the test's celery worker did not start:\n{log.read_text()}")
        yield proc, log
    finally:
        stop_process(proc)


# The Celery worker processes the tests run now ("name@host"), which
# paused_consumers pauses: tests.conftest's session worker registers itself.
RUNNING_WORKERS: set[str] = set()


def _consumers_of(queue_name: str, nodes: set[str]) -> set[str] | None:
    """Which of `nodes` consume `queue_name` now; None if one of them did not answer."""
    from gymbilling.celery import app

    replies = app.control.inspect(destination=sorted(nodes), timeout=3).active_queues() or {}
    if set(replies) != nodes:
        return None
    return {
        node for node, queues in replies.items() if any(q["name"] == queue_name for q in queues)
    }


@contextlib.contextmanager
def paused_consumers(queue_name: str, *, timeout: float = 60.0):
    """The tests' Celery workers (RUNNING_WORKERS) stop consuming `queue_name` until the
    block ends.

    Waits until none consumes it, whatever their replies to the cancel said (a
    busy worker may answer after the reply's timeout, and still act on it);
    afterwards each is told to consume it again, whether or not it confirmed
    the pause, and waited for, so that a lost reply never leaves the session's
    worker deaf to the queue for the tests that follow.
    """
    from gymbilling.celery import app

    nodes = set(RUNNING_WORKERS)
    if not nodes:
        yield
        return
    app.control.cancel_consumer(queue_name, destination=sorted(nodes), reply=True, timeout=3)
    try:
        wait_until(
            lambda: _consumers_of(queue_name, nodes) == set(),
            timeout=timeout,
            what=f"{sorted(nodes)} to stop consuming {queue_name}",
        )
        yield
    finally:
        app.control.add_consumer(queue_name, destination=sorted(nodes), reply=True, timeout=3)
        wait_until(
            lambda: _consumers_of(queue_name, nodes) == nodes,
            timeout=timeout,
            what=f"{sorted(nodes)} to consume {queue_name} again",
        )
