"""job_settle's claim: one UPDATE decides the one settlement, prepared or through the ORM.

No worker and no engine, as in test_job_cancel.py: one database transaction,
never committed, so the job's Celery task is never sent.
"""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from inference.models import InputTokensSource, Job, JobStatus
from inference.services import job_settle, job_start
from inference.services.jobs import Outcome
from metering.models import Hold, HoldStatus, UsageRecord
from tests.factories import OrganizationFactory
from tests.helpers import credits, served_model, submit_job

pytestmark = pytest.mark.django_db

MODEL = "gym-settle-unit"


@pytest.fixture(params=[True, False], ids=["prepared", "orm"])
def running_job(request, settings, grant) -> Job:
    # Both the prepared claim (accounts.sql) and the ORM's UPDATE it falls
    # back to (an old transaction-pooling PgBouncer, SQLite) must behave alike.
    settings.DATABASE_PREPARED_STATEMENTS = request.param
    served_model(MODEL, access_tier="basic")
    org = OrganizationFactory(tokens_per_minute=1_000_000, concurrent_jobs=10)
    grant(org, credits(10))
    job = submit_job(org, MODEL)
    return job_start(job_pk=job.pk)


def test_the_first_settlement_claims_the_job_and_a_second_changes_nothing(running_job):
    first_token = timezone.now() - timedelta(milliseconds=40)
    outcome = Outcome(
        text="Monday: rest.",
        input_tokens=5,
        output_tokens=4,
        engine_ms=12,
        finish_reason="stop",
        first_token_at=first_token,
        input_tokens_source=InputTokensSource.ENGINE,
    )

    # when the worker settles it, then a redelivered task settles it again
    # with another outcome
    settled = job_settle(job=running_job, outcome=outcome, status=JobStatus.SUCCEEDED)
    again = job_settle(
        job=running_job,
        outcome=Outcome(output_tokens=9, first_token_at=timezone.now()),
        status=JobStatus.FAILED,
    )

    # then the row holds the first settlement, and only the first was billed
    row = Job.objects.get(pk=running_job.pk)
    assert (row.status, row.input_tokens, row.output_tokens) == (JobStatus.SUCCEEDED, 5, 4)
    assert (row.finish_reason, row.engine_ms, row.output) == ("stop", 12, "Monday: rest.")
    assert row.first_token_at == first_token and row.finished_at is not None
    assert row.credits_charged == settled.credits_charged > 0
    assert (again.status, again.output_tokens) == (JobStatus.SUCCEEDED, 4)
    hold = Hold.objects.get(key=row.public_id)
    assert (hold.status, hold.captured) == (HoldStatus.CAPTURED, row.credits_charged)
    assert UsageRecord.objects.filter(job_id=row.public_id).count() == 1


class _Clock:
    """The clock of the rate limits and of job_submit's reservation, set by the test: which
    minute's window counts."""

    def __init__(self, now: float):
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return time.monotonic()


def test_unused_tokens_go_back_to_the_window_they_were_reserved_in(monkeypatch, grant):
    # given a job that reserved its worst case in the last second of a minute
    from accounts import ratelimits
    from accounts.redis import get_redis
    from inference.services import jobs

    served_model(MODEL, access_tier="basic")
    org = OrganizationFactory(tokens_per_minute=1_000_000, concurrent_jobs=10)
    grant(org, credits(10))
    minute = int(timezone.now().timestamp()) // 60
    clock = _Clock(minute * 60 + 59.5)
    monkeypatch.setattr(ratelimits, "time", clock)
    monkeypatch.setattr(jobs, "time", clock)
    first = job_start(job_pk=submit_job(org, MODEL, max_tokens=400).pk)
    # and, the next minute, another job of the organization
    clock.now = (minute + 1) * 60 + 1
    second = submit_job(org, MODEL, max_tokens=400)
    reserved_now = second.params["reserved_tokens"]

    # when the first settles, in that next minute, for a few of the tokens it reserved
    job_settle(
        job=first,
        outcome=Outcome(input_tokens=5, output_tokens=4, finish_reason="stop"),
        status=JobStatus.SUCCEEDED,
    )

    # then the tokens it did not use are not given back to the next minute's window,
    # where the organization did not spend them: that window still counts the second job
    counted = get_redis().get(f"rl:tokens:org:{org.pk}:{minute + 1}")
    assert int(counted) == reserved_now
