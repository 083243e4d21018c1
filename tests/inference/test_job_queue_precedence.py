"""A worker on several inference queues takes them in precedence order: what `priority`
is paid for.

Real parts only: jobs submitted here are pushed onto the real broker, and a real
`celery worker` process (one child, so it runs one job at a time) started
afterwards runs them against the CPU Triton server. The order it ran them in is
read from the jobs' rows (started_at), never from timings.
"""

from __future__ import annotations

import contextlib

import pytest

from accounts.models import Priority
from inference.models import Job, JobStatus
from inference.services import job_submit
from inference.services.jobs import SubmitParams
from tests.factories import OrganizationFactory
from tests.helpers import celery_worker_started, credits, paused_consumers, wait_until
from tests.inference.test_catalog_cache import MODEL, _model, _prices

pytestmark = pytest.mark.django_db(transaction=True)

# As README's worker command lists them: precedence order.
INFERENCE_QUEUES = ["inference.priority", "inference.standard", "inference.batch"]


def _submit(org, priority: str, n: int) -> Job:
    return job_submit(
        organization=org,
        api_key=None,
        model_name=MODEL,
        prompt=f"Strength training {n}",
        params=SubmitParams(max_tokens=2, seed=n),
        priority=priority,
    )


def _all_ended(jobs: list[Job]) -> list[Job] | None:
    """The jobs' rows in the order they started, once every one has ended."""
    rows = list(Job.objects.filter(pk__in=[job.pk for job in jobs]).order_by("started_at"))
    return rows if all(row.finished_at is not None for row in rows) else None


def test_a_worker_runs_queued_priority_jobs_before_standard_before_batch(
    triton_server, grant, tmp_path
):
    # given an organization allowed every priority, and room for all its jobs at once
    _prices("1")
    _model([triton_server.grpc_url])
    org = OrganizationFactory(
        max_priority=Priority.PRIORITY, tokens_per_minute=10_000_000, concurrent_jobs=100
    )
    grant(org, credits(100))

    with contextlib.ExitStack() as paused:
        # No worker consumes the inference queues meanwhile (the session's, if it
        # runs, is paused; paused last-first, so that it gets them back in
        # precedence order).
        for queue in reversed(INFERENCE_QUEUES):
            paused.enter_context(paused_consumers(queue))

        # and a backlog of batch jobs, then a standard job, then two priority jobs, queued
        batch = [_submit(org, Priority.BATCH, n) for n in range(3)]
        standard = [_submit(org, Priority.STANDARD, 3)]
        priority = [_submit(org, Priority.PRIORITY, n) for n in (4, 5)]
        jobs = batch + standard + priority

        # when a worker on all three queues, running one job at a time, takes them
        with celery_worker_started(
            tmp_path / "celery-worker.log",
            queues=INFERENCE_QUEUES,
            pool="prefork",
            concurrency=1,
        ):
            done = wait_until(lambda: _all_ended(jobs), what="every job to end")

    # then every job ran, the priority ones first, then the standard one, then the
    # batch backlog (each queue first in, first out)
    assert {job.status for job in done} == {JobStatus.SUCCEEDED}
    assert [job.pk for job in done] == [job.pk for job in priority + standard + batch]
