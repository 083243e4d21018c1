"""job_submit writes the Job row and its hold together, or neither.

On the ledger's fast path one statement writes both (hold_place's `row`), so
the organization's wallet is locked for that statement only; on the ORM path
(the fast path off, or no prepared statements) one transaction does. Both
paths must leave the same rows, and a refused hold must leave none.

One database transaction per test, never committed, as in
test_job_admission.py: the Celery task of an admitted job is never sent.
"""

from __future__ import annotations

import psycopg
import pytest
import redis
from django.db import connection

from accounts.errors import ApplicationError
from accounts.models import Membership, Role, Scope
from accounts.ratelimits import Limit, rate_limit_consume
from accounts.redis import get_redis
from accounts.services import apikey_create
from inference import relay
from inference.models import Job, JobStatus
from inference.relay import relay_cancel_requested
from inference.services import jobs
from metering.models import Hold, HoldStatus
from metering.selectors import model_price, organization_balance
from metering.services import fastpath, hold_place
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import StatementLog, credits, ledger_rows, served_model, submit_job

pytestmark = pytest.mark.django_db

MODEL = "gym-submit"


@pytest.fixture(params=["fast", "orm"])
def path(request, settings) -> str:
    settings.METERING_FAST_PATH = request.param == "fast"
    return request.param


def test_an_admitted_job_is_stored_with_its_hold(path, grant):
    # given an organization with credits
    served_model(MODEL)
    org = OrganizationFactory()
    grant(org, credits(10))
    before = organization_balance(organization=org).available

    # when a job is submitted
    statements = StatementLog()
    with connection.execute_wrapper(statements):
        job = submit_job(org, MODEL, max_tokens=16)

    # then its row is stored queued, with the primary key it was given
    stored = Job.objects.get(pk=job.pk)
    assert stored.public_id == job.public_id and stored.status == JobStatus.QUEUED
    assert stored.organization_id == org.pk and stored.hold_amount == job.hold_amount > 0
    assert stored.queued_at == job.queued_at
    assert stored.params["max_tokens"] == 16

    # and its hold, keyed by its id, holds exactly its worst case
    hold = Hold.objects.get(key=job.public_id)
    assert (hold.amount, hold.status) == (job.hold_amount, HoldStatus.PENDING)
    assert organization_balance(organization=org).available == before - job.hold_amount

    # and on the fast path one statement wrote both
    if path == "fast":
        writes = [s for s in statements.sql if "INSERT" in s or "UPDATE" in s]
        assert len(writes) == 1
        assert "INSERT INTO metering_hold" in writes[0] and '"inference_job"' in writes[0]


@pytest.mark.parametrize(
    ("fast", "prepared"),
    [(True, True), (False, True), (False, False)],
    ids=["fast", "orm", "orm-unprepared"],
)
def test_the_job_row_names_the_member_or_the_key_that_sent_it(fast, prepared, settings, grant):
    # given an organization with credits, a member of it and an API key of it;
    # on the fast path, or the ORM path with or without prepared statements (an
    # old PgBouncer's setting: the row is then saved by the ORM itself)
    settings.METERING_FAST_PATH, settings.DATABASE_PREPARED_STATEMENTS = fast, prepared
    served_model(MODEL)
    org = OrganizationFactory()
    grant(org, credits(10))
    member = UserFactory()
    Membership.objects.create(user=member, organization=org, role=Role.MEMBER)
    key, _raw = apikey_create(organization=org, name="app", scopes=[Scope.INFERENCE])

    # when the member sends a job through the dashboard's session, and the key one
    statements = StatementLog()
    with connection.execute_wrapper(statements):
        by_member = submit_job(org, MODEL, user=member)
    by_key = submit_job(org, MODEL, api_key=key)

    # then each row names who sent it, and only that
    stored = {job.public_id: job for job in Job.objects.filter(organization=org)}
    assert (stored[by_member.public_id].user_id, stored[by_member.public_id].api_key_id) == (
        member.pk,
        None,
    )
    assert (stored[by_key.public_id].user_id, stored[by_key.public_id].api_key_id) == (
        None,
        key.pk,
    )
    # and on the fast path the member's row still went with its hold, in one statement
    if fast:
        writes = [s for s in statements.sql if "INSERT" in s or "UPDATE" in s]
        assert len(writes) == 1
        assert "INSERT INTO metering_hold" in writes[0] and '"user_id"' in writes[0]


def test_a_refused_hold_stores_no_job_and_gives_the_tokens_back(path, grant):
    # given an organization whose credits cannot cover a job's worst case
    served_model(MODEL)
    org = OrganizationFactory(tokens_per_minute=100_000)
    grant(org, 1)
    tokens = [Limit(scope=f"org:{org.pk}", limit=org.tokens_per_minute)]
    tokens_left = rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining
    rows, jobs = ledger_rows(), Job.objects.count()

    # when a job is submitted
    with pytest.raises(ApplicationError) as refused:
        submit_job(org, MODEL)

    # then it is refused for credits, with no row, no hold, no tokens taken
    assert (refused.value.code, refused.value.status) == ("insufficient_credits", 402)
    assert Job.objects.count() == jobs
    assert ledger_rows() == rows
    assert rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining == tokens_left


def test_a_row_goes_with_a_new_key_only(grant):
    # a replayed hold would not write the row: refused before anything is written
    org = OrganizationFactory()
    grant(org, credits(1))
    rows = ledger_rows()
    with pytest.raises(ValueError, match="new_key"):
        hold_place(organization=org, amount=5, key="job-x", row=Job(public_id="job-x"))
    assert ledger_rows() == rows


def _place_job_hold(grant, public_id: str, *, durable: bool) -> tuple[Job, str]:
    """A new job's hold placed with its row, as job_submit places it; the placement's SQL."""
    org = OrganizationFactory()
    grant(org, credits(10))
    job = Job(
        public_id=public_id,
        organization=org,
        model=served_model(MODEL),
        model_price=model_price(model_name=MODEL),
        priority="standard",
        kind="chat",
        params={"max_tokens": 16},
        hold_amount=1000,
    )
    statements = StatementLog()
    with connection.execute_wrapper(statements):
        hold_place(
            organization=org, amount=1000, key=public_id, new_key=True, row=job, durable=durable
        )
    [placement] = [s for s in statements.sql if "INSERT INTO metering_hold" in s]
    return job, placement


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("durable", [False, True], ids=["unflushed", "durable"])
def test_a_hold_placed_without_waiting_for_the_disk_still_commits_with_its_row(
    settings, grant, durable
):
    # given the fast path and no transaction open: when a new job's hold is
    # placed with its row, with or without waiting for the WAL flush
    settings.METERING_FAST_PATH = True
    job, placement = _place_job_hold(grant, f"job_durable_{durable}", durable=durable)

    # then both are committed: another connection sees them
    with psycopg.connect(**connection.get_connection_params()) as other:
        seen = other.execute(
            "SELECT h.status, j.status FROM metering_hold h"
            " JOIN inference_job j ON j.public_id = h.key WHERE h.key = %s",
            [job.public_id],
        ).fetchone()
    assert seen == (HoldStatus.PENDING, JobStatus.QUEUED)
    # and only the unflushed placement asked PostgreSQL not to wait for the disk
    assert ("synchronous_commit" in placement) is not durable
    # for its own transaction only: this connection's next commit waits again
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"


def test_the_unflushed_placement_really_turns_the_flush_off_for_its_transaction():
    # The setting is joined into the placement's last SELECT so that it is
    # evaluated (an unreferenced CTE that only reads never runs): inside a
    # transaction (the test's), the same join leaves the setting off.
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "on"
        cursor.execute(f"SELECT placed.x FROM (SELECT 1 AS x) placed{fastpath._NOT_FLUSHED}")
        assert cursor.fetchone() == (1,)
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == "off"


def test_inside_a_transaction_a_hold_is_always_placed_durable(settings, grant):
    # the caller's transaction may write more; its commit is not this one's to weaken
    settings.METERING_FAST_PATH = True
    job, placement = _place_job_hold(grant, "job_in_a_transaction", durable=False)
    assert "synchronous_commit" not in placement
    assert Job.objects.filter(public_id=job.public_id).exists()


@pytest.mark.django_db(transaction=True)
def test_a_job_whose_message_the_broker_refuses_is_cancelled_and_takes_nothing(grant, monkeypatch):
    # given an organization with credits, and a broker that refuses the job's
    # message. Stood in at the broker client's one entry point (task_publish):
    # a real outage would stop the test session's worker, which other tests share.
    org = OrganizationFactory(tokens_per_minute=100_000)
    served_model(MODEL)
    grant(org, credits(10))
    tokens = [Limit(scope=f"org:{org.pk}", limit=org.tokens_per_minute)]
    tokens_left = rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining
    before = organization_balance(organization=org)

    def refused(*_args, **_kwargs):
        raise redis.ConnectionError("the broker is down")

    monkeypatch.setattr(jobs, "task_publish", refused)

    # when a job is submitted
    with pytest.raises(ApplicationError) as failed:
        submit_job(org, MODEL)

    # then the client is told to retry, and the job, written with its hold,
    # is cancelled: nothing charged or held, its tokens and its slot given back once
    assert (failed.value.code, failed.value.status) == ("engine_unavailable", 503)
    [job] = Job.objects.filter(organization=org)
    assert (job.status, job.credits_charged) == (JobStatus.CANCELED, 0)
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.RELEASED
    assert organization_balance(organization=org) == before
    assert rate_limit_consume(kind="tokens", limits=tokens, cost=0).remaining == tokens_left
    assert get_redis().zscore(f"conc:org:{org.pk}", job.public_id) is None


@pytest.mark.django_db(transaction=True)
def test_a_job_a_worker_started_although_the_brokers_answer_was_lost_is_cancelled_not_denied(
    grant, monkeypatch
):
    # given a broker that took the job's message but whose answer was lost
    # (its socket timed out after the push), while a worker started the job.
    # Stood in at the broker client's one entry point: a reply lost after a
    # push cannot be made to happen on demand with a real Redis.
    org = OrganizationFactory()
    served_model(MODEL)
    grant(org, credits(10))

    def pushed_but_unanswered(_task, *, args, **_kwargs):
        jobs.job_start(job_pk=args[0])  # what the worker that took it did meanwhile
        raise redis.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(jobs, "task_publish", pushed_but_unanswered)

    # when a job is submitted
    with pytest.raises(ApplicationError) as failed:
        submit_job(org, MODEL)

    # then the client is not told that nothing was charged: the job is
    # running, so its worker is asked to stop it (it then settles for what
    # it served), and the answer names the job to look at
    [job] = Job.objects.filter(organization=org)
    assert (failed.value.code, failed.value.status) == ("engine_unavailable", 503)
    assert "nothing was charged" not in failed.value.message
    assert f"GET /api/v1/jobs/{job.public_id}" in failed.value.message
    assert failed.value.extra == {"job_id": job.public_id}
    assert job.status == JobStatus.RUNNING
    assert relay_cancel_requested(job.public_id)
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.PENDING


def _relay_down(_job_id, **_origin):
    # Stood in at the relay's one call that asks a worker to stop (relay_cancel):
    # Redis cannot be made to fail for one call here, and a real outage would
    # stop every other test's relay and broker.
    raise redis.ConnectionError("redis is down")


@pytest.mark.django_db(transaction=True)
def test_a_job_whose_message_was_not_sent_is_cancelled_even_when_redis_fails(grant, monkeypatch):
    # given a broker that refuses the job's message, and Redis failing under
    # the request to stop its worker too
    org = OrganizationFactory(tokens_per_minute=100_000)
    served_model(MODEL)
    grant(org, credits(10))
    before = organization_balance(organization=org)

    def refused(*_args, **_kwargs):
        raise redis.ConnectionError("the broker is down")

    monkeypatch.setattr(jobs, "task_publish", refused)
    monkeypatch.setattr(relay, "relay_cancel", _relay_down)

    # when a job is submitted
    with pytest.raises(ApplicationError) as failed:
        submit_job(org, MODEL)

    # then the queued job is cancelled in the database all the same: its hold
    # released, its slot given back, nothing charged, and the client told so
    [job] = Job.objects.filter(organization=org)
    assert (failed.value.code, failed.value.status) == ("engine_unavailable", 503)
    assert "nothing was charged" in failed.value.message
    assert (job.status, job.credits_charged) == (JobStatus.CANCELED, 0)
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.RELEASED
    assert organization_balance(organization=org) == before
    assert get_redis().zscore(f"conc:org:{org.pk}", job.public_id) is None


@pytest.mark.django_db(transaction=True)
def test_a_started_job_whose_worker_cannot_be_told_is_not_said_to_be_cancelled(grant, monkeypatch):
    # given a broker that took the job's message but whose answer was lost,
    # a worker that started the job, and Redis failing under the request to
    # stop it (both stood in as above)
    org = OrganizationFactory()
    served_model(MODEL)
    grant(org, credits(10))

    def pushed_but_unanswered(_task, *, args, **_kwargs):
        jobs.job_start(job_pk=args[0])
        raise redis.TimeoutError("Timeout reading from socket")

    monkeypatch.setattr(jobs, "task_publish", pushed_but_unanswered)
    monkeypatch.setattr(relay, "relay_cancel", _relay_down)

    # when a job is submitted
    with pytest.raises(ApplicationError) as failed:
        submit_job(org, MODEL)

    # then the answer does not claim a cancellation that did not happen: the
    # job runs on, and the answer names it
    [job] = Job.objects.filter(organization=org)
    assert job.status == JobStatus.RUNNING
    assert "was cancelled" not in failed.value.message
    assert "could not be cancelled" in failed.value.message
    assert f"GET /api/v1/jobs/{job.public_id}" in failed.value.message
    assert failed.value.took_effect
