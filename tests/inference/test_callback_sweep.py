"""The beat sweep queues a due callback once, not again every run while its message waits;
and every delivery goes through the `callbacks` queue, never the default one.

The sweep test runs inside one uncommitted test transaction: the messages the
sweep sends find no row a worker could see, so what is asserted is what the
sweep itself claims.

The callback's job is written directly, already ended, as a job with a
callback is (tests.helpers.pending_callback): submitting one would send its
Celery task on commit in the transactional test, and the session's worker,
shared with other modules, would run it while the test's teardown empties
the tables.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from inference.models import CallbackStatus, JobCallback, JobStatus
from inference.services.callbacks import (
    _lease,
    job_callback_deliver,
    job_callback_record,
    job_callbacks_sweep,
)
from inference.tasks import CALLBACK_QUEUE, job_callback_deliver_task
from tests.helpers import paused_consumers, pending_callback, take_queued

pytestmark = pytest.mark.django_db


@pytest.fixture
def due_callback():
    return pending_callback(
        name="sweep",
        url="https://hooks.example.com/x",
        due_at=timezone.now() - timedelta(seconds=1),
    )


def test_a_queued_callback_is_not_queued_again_until_its_lease_ends(due_callback):
    now = timezone.now()

    # when the sweep runs twice
    first = job_callbacks_sweep(now=now)
    second = job_callbacks_sweep(now=now + timedelta(seconds=10))

    # then it queued the callback once, leased until its attempt could be over
    assert (first, second) == (1, 0)
    due_callback.refresh_from_db()
    assert due_callback.next_attempt_at == now + _lease()
    assert due_callback.status == CallbackStatus.PENDING

    # and a message that was lost is queued again once the lease has run out
    assert job_callbacks_sweep(now=now + _lease() + timedelta(seconds=1)) == 1


@pytest.mark.django_db(transaction=True)  # a delivery refuses to run inside a transaction
def test_a_duplicate_delivery_message_finds_the_attempt_already_made(due_callback):
    # given: the attempt this message was queued for was made (by another copy)
    JobCallback.objects.filter(pk=due_callback.pk).update(attempts=1)

    # when the stale copy runs
    result = job_callback_deliver(callback_id=due_callback.pk, attempts=0)

    # then it does nothing
    assert result is None
    due_callback.refresh_from_db()
    assert due_callback.attempts == 1


@pytest.fixture
def callbacks_queue():
    """The `callbacks` queue with no consumer and nothing left on it: what a test puts
    there stays there for it to take (the session's worker, if running, is paused)."""
    with paused_consumers(CALLBACK_QUEUE):
        take_queued(CALLBACK_QUEUE)
        yield


def deliveries_queued() -> list[list]:
    """The arguments of each delivery waiting on the `callbacks` queue, taken off it."""
    taken = take_queued(CALLBACK_QUEUE)
    assert all(headers["task"] == job_callback_deliver_task.name for headers, _, _ in taken)
    return [args for _headers, args, _kwargs in taken]


# A slow receiver holds the worker's thread for the attempt's whole deadline: on the
# default queue, a few of them would hold up every tenant's inference jobs and billing.
def test_the_sweep_queues_deliveries_on_the_callbacks_queue(due_callback, callbacks_queue):
    # when the sweep queues the due callback
    assert job_callbacks_sweep() == 1

    # then its delivery waits on the callbacks queue
    assert deliveries_queued() == [[due_callback.pk, 0]]


def test_a_jobs_first_delivery_is_queued_on_the_callbacks_queue(
    due_callback, callbacks_queue, django_capture_on_commit_callbacks
):
    # given a job that asked for a callback (its row made afresh below)
    job = due_callback.job
    JobCallback.objects.filter(pk=due_callback.pk).delete()

    # when its end is recorded and committed
    with django_capture_on_commit_callbacks(execute=True):
        callback = job_callback_record(job=job, status=JobStatus.SUCCEEDED)

    # then its first delivery waits on the callbacks queue
    assert deliveries_queued() == [[callback.pk, 0]]
