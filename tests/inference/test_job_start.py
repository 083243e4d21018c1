"""job_start: one statement that loads a job as it marks it running (a redelivery runs it
again, an ended job is not started).

Transactional: the statement runs in autocommit, as in the worker; the Job row
is written directly, so no Celery task is sent for it.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from inference.models import Job, JobStatus
from inference.services import job_start
from metering.models import Hold
from metering.selectors import model_price
from metering.services import hold_place, hold_release
from tests.factories import OrganizationFactory
from tests.helpers import credits, job_state, served_model

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=[True, False], ids=["prepared", "orm"])
def prepared(request, settings) -> bool:
    # Both the prepared statement (accounts.sql) and the ORM's raw() it falls
    # back to (an old transaction-pooling PgBouncer, SQLite) must behave alike.
    settings.DATABASE_PREPARED_STATEMENTS = request.param
    return request.param


@pytest.fixture
def job(prepared, grant) -> Job:
    """A queued job and its hold (a job is started only while its hold is pending)."""
    model = served_model("gym-start", access_tier="basic")
    org = OrganizationFactory()
    grant(org, credits(1))
    job = Job.objects.create(
        public_id="job_start_test",
        organization=org,
        model=model,
        model_price=model_price(model_name="gym-start"),
        params={"max_tokens": 4},
        hold_amount=1,
    )
    hold_place(organization=org, amount=1, key=job.public_id, new_key=True)
    return job


def _synchronous_commit() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return cursor.fetchone()[0]


def test_a_queued_job_is_loaded_running_and_committed(job):
    # when the worker starts it
    started = job_start(job_pk=job.pk)

    # then it comes back running, stamped, as stored
    assert started.pk == job.pk and started.status == JobStatus.RUNNING
    assert started.started_at is not None
    assert started.params == {"max_tokens": 4} and started.hold_amount == 1
    assert Job.objects.get(pk=job.pk).status == JobStatus.RUNNING

    # and committed durably, like every later write on the connection
    assert _synchronous_commit() == "on"


def test_a_redelivered_running_job_runs_again_and_keeps_its_first_start(job):
    first = job_start(job_pk=job.pk)

    again = job_start(job_pk=job.pk)

    assert again.status == JobStatus.RUNNING
    assert again.started_at == first.started_at
    # and its run's start is this one's (the orphaned jobs' sweep's grace runs from it)
    assert first.run_started_at == first.started_at
    assert again.run_started_at > first.run_started_at
    assert Job.objects.get(pk=job.pk).run_started_at == again.run_started_at


def test_an_ended_job_is_not_started(job):
    Job.objects.filter(pk=job.pk).update(status=JobStatus.CANCELED)

    assert job_start(job_pk=job.pk) is None
    assert Job.objects.get(pk=job.pk).status == JobStatus.CANCELED
    assert _synchronous_commit() == "on"


def test_a_job_whose_hold_is_not_pending_is_not_started(job):
    # given a queued job whose hold has been settled (released: its job is
    # over for the ledger, whatever its row still says)
    hold_release(key=job.public_id)

    # then its message starts nothing
    assert job_start(job_pk=job.pk, public_id=job.public_id) is None
    assert Job.objects.get(pk=job.pk).status == JobStatus.QUEUED


def test_a_message_for_another_job_under_the_same_key_starts_nothing(job):
    # given a job whose primary key a lost job once had (a hold placed without
    # waiting for the disk, lost in a database crash, its key given again),
    # and that lost job's message, which names it by its public id too
    queued = job_state(job)
    assert queued[0]["status"] == JobStatus.QUEUED

    # when the message is run
    started = job_start(job_pk=job.pk, public_id="job_lost_in_a_crash")

    # then nothing is started, and the job of that key is left as it was: its row and its
    # hold's whole, the ledger, the balance
    assert started is None
    assert job_state(job) == queued
    # while its own message starts it
    assert job_start(job_pk=job.pk, public_id=job.public_id).status == JobStatus.RUNNING


def test_a_fresh_job_starts_under_a_hold_ttl_shorter_than_the_start_margin(job, settings):
    # given holds that live 5 minutes (shorter than JOB_START_MARGIN, 10): a
    # deployment of short jobs
    settings.METERING_HOLD_TTL = timedelta(minutes=5)
    Hold.objects.filter(key=job.public_id).update(expires_at=timezone.now() + timedelta(minutes=5))

    # then a job whose hold was just placed still starts (the margin is at
    # most half the hold's life)
    assert job_start(job_pk=job.pk, public_id=job.public_id).status == JobStatus.RUNNING


@pytest.mark.parametrize(
    ("run_limit_s", "starts"), [(300, True), (900, False)], ids=["5-minute runs", "15-minute runs"]
)
def test_a_job_starts_only_with_two_runs_left_on_its_hold(job, settings, run_limit_s, starts):
    # given hour-long holds, and a job whose hold has 20 minutes left (a
    # backlog's, or one a dead worker's broker handed back late)
    settings.METERING_HOLD_TTL = timedelta(hours=1)
    settings.INFERENCE_JOB_DEADLINE_SECONDS = run_limit_s
    Hold.objects.filter(key=job.public_id).update(expires_at=timezone.now() + timedelta(minutes=20))

    # when its task runs
    started = job_start(job_pk=job.pk, public_id=job.public_id)

    # then it starts when it may run 5 minutes (the margin is 10: the least
    # there is), not when it may run 15 (it could still be running, or
    # settling, when its hold expires under it: the margin is two runs, 30)
    assert (started is not None) is starts
    expected = JobStatus.RUNNING if starts else JobStatus.QUEUED
    assert Job.objects.get(pk=job.pk).status == expected
