"""job_cancel on a job no worker has run yet, and on one a worker has just started.

No worker and no engine: the tests run inside one database transaction that
is never committed, so the job's Celery task (enqueued on commit) is never
sent. The cancellation of a running job, end to end, is in
tests/reliability/test_inference_cancel.py.
"""

from __future__ import annotations

import pytest

from accounts.redis import get_redis
from inference.models import InputTokensSource, Job, JobStatus
from inference.services import job_cancel, job_settle, job_start
from inference.services.jobs import Outcome
from metering.models import Hold, HoldStatus
from metering.selectors import organization_balance
from tests.factories import OrganizationFactory
from tests.helpers import credits, served_model, submit_job

pytestmark = pytest.mark.django_db

MODEL = "gym-cancel-unit"


@pytest.fixture
def queued_job(grant):
    served_model(MODEL, access_tier="basic")
    org = OrganizationFactory(tokens_per_minute=1_000_000, concurrent_jobs=10)
    grant(org, credits(10))
    return submit_job(org, MODEL)


def _cancel_requested(job: Job) -> bool:
    return bool(get_redis().exists(f"jobcancel:{job.public_id}"))


def test_cancelling_a_queued_job_releases_its_hold_at_once(queued_job):
    # when
    job = job_cancel(job=queued_job)

    # then it is over, nothing billed, the whole hold released
    assert (job.status, job.credits_charged) == (JobStatus.CANCELED, 0)
    assert job.input_tokens_source == InputTokensSource.NONE
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.RELEASED
    assert organization_balance(organization=job.organization).held == 0
    assert _cancel_requested(job)


def test_a_job_a_worker_started_meanwhile_is_left_to_the_worker_to_settle(queued_job):
    # given: the API read the job as queued, then a worker started it
    seen_by_the_api = Job.objects.get(pk=queued_job.pk)
    assert job_start(job_pk=queued_job.pk)

    # when the API cancels it with what it read
    job = job_cancel(job=seen_by_the_api)

    # then it is still running, its hold still held, and the worker was told
    assert job.status == JobStatus.RUNNING
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.PENDING
    assert _cancel_requested(job)

    # and the worker's settlement, for what the engine took, is the only one
    outcome = Outcome(
        input_tokens=4,
        finish_reason="cancelled",
        input_tokens_source=InputTokensSource.TOKENIZER,
    )
    settled = job_settle(job=queued_job, outcome=outcome, status=JobStatus.CANCELED)
    hold = Hold.objects.get(key=job.public_id)
    assert (settled.status, settled.input_tokens) == (JobStatus.CANCELED, 4)
    assert (hold.status, hold.captured) == (HoldStatus.CAPTURED, settled.credits_charged)
    assert settled.credits_charged > 0


def test_cancelling_a_job_that_ended_changes_nothing(queued_job):
    # given a job that succeeded and was billed
    job_start(job_pk=queued_job.pk)
    outcome = Outcome(input_tokens=4, output_tokens=3, finish_reason="stop")
    ended = job_settle(job=queued_job, outcome=outcome, status=JobStatus.SUCCEEDED)
    balance = organization_balance(organization=ended.organization)

    # when it is cancelled (a cancel that lost the race with its end)
    job = job_cancel(job=Job.objects.get(pk=ended.pk))

    # then it is answered as it ended, its charge and the balance as they
    # were, and no cancellation is left for a worker to find
    assert (job.status, job.credits_charged) == (JobStatus.SUCCEEDED, ended.credits_charged)
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.CAPTURED
    assert organization_balance(organization=job.organization) == balance
    assert not _cancel_requested(job)
