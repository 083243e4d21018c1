"""A concurrency slot whose job is over or was lost is freed by the sweep, not kept for its lease.

A job's slot (accounts.ratelimits, a sorted set per organization) is taken
before its hold and freed after its settlement. A request that dies between
the two, a database crash that takes an unflushed hold with its Job row, or a
worker that dies between a settlement's commit and the release leaves the
slot taken for its lease (a hold's life), so the organization runs one job fewer.

One database transaction per test, never committed: no job's task is sent.
"""

from __future__ import annotations

import time

import pytest

from accounts.errors import ApplicationError
from accounts.ratelimits import Limit, Slot, rate_limit_consume
from accounts.redis import get_redis
from inference.models import Job, JobStatus
from inference.services import concurrency_slots_sweep
from inference.services.jobs import SLOT_SWEEP_GRACE_SECONDS
from tests.factories import OrganizationFactory
from tests.helpers import credits, served_model, submit_job

pytestmark = pytest.mark.django_db

MODEL = "gym-slots"


def _slots(org) -> set[str]:
    return {job.decode() for job in get_redis().zrange(f"conc:org:{org.pk}", 0, -1)}


def test_slots_of_lost_and_finished_jobs_are_freed_and_open_jobs_keep_theirs(grant):
    # given an organization allowed 4 concurrent jobs, all taken: a queued
    # job, a running one, a job that finished but whose slot was never given
    # back, and a slot whose request died before its job was written
    served_model(MODEL)
    org = OrganizationFactory(concurrent_jobs=4)
    grant(org, credits(10))
    queued, running, finished = (submit_job(org, MODEL) for _ in range(3))
    Job.objects.filter(pk=running.pk).update(status=JobStatus.RUNNING)
    Job.objects.filter(pk=finished.pk).update(status=JobStatus.SUCCEEDED)
    taken = time.time()
    rate_limit_consume(
        kind="tokens",
        limits=[Limit(scope=f"org:{org.pk}", limit=10_000)],
        cost=20,
        slot=Slot(scope=f"org:{org.pk}", limit=4, job_id="job_lost"),
    )
    everyone = {queued.public_id, running.public_id, finished.public_id, "job_lost"}
    assert _slots(org) == everyone
    with pytest.raises(ApplicationError) as full:
        submit_job(org, MODEL)
    assert full.value.code == "too_many_concurrent_jobs"

    # when the sweep runs just before the grace is over, it frees none of
    # them: a job's row may not be committed yet
    concurrency_slots_sweep(now=taken + SLOT_SWEEP_GRACE_SECONDS - 5)
    assert _slots(org) == everyone

    # when it runs just after
    freed = concurrency_slots_sweep(now=time.time() + SLOT_SWEEP_GRACE_SECONDS + 5)

    # then the finished and the lost job's slots are free, and the open jobs keep theirs
    assert _slots(org) == {queued.public_id, running.public_id}
    assert freed >= 2  # other organizations' leftovers in the test database count too
    # and the organization runs two more jobs at once
    again = [submit_job(org, MODEL) for _ in range(2)]
    assert _slots(org) == {queued.public_id, running.public_id, *(j.public_id for j in again)}
