"""The beat sweep queues a due callback once, not again every run while its message waits.

The sweep test runs inside one uncommitted test transaction: the messages the
sweep sends find no row a worker could see, so what is asserted is what the
sweep itself claims.

The callback's job is written directly, already ended (as a job with a
callback is): submitting one would send its Celery task on commit in the
transactional test, and the session's worker, shared with other modules, would
run it while the test's teardown empties the tables.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from inference.models import CallbackStatus, Job, JobCallback, JobStatus
from inference.services.callbacks import _lease, job_callback_deliver, job_callbacks_sweep
from metering.selectors import model_price
from tests.factories import OrganizationFactory
from tests.helpers import served_model

pytestmark = pytest.mark.django_db


@pytest.fixture
def due_callback():
    model = served_model("gym-sweep", access_tier="basic")
    job = Job.objects.create(
        public_id="job_sweep_test",
        organization=OrganizationFactory(),
        model=model,
        model_price=model_price(model_name="gym-sweep"),
        status=JobStatus.SUCCEEDED,
        params={"max_tokens": 4},
        hold_amount=0,
        finished_at=timezone.now(),
    )
    return JobCallback.objects.create(
        job=job,
        organization=job.organization,
        event_id="evt_sweep",
        event_type="job.succeeded",
        url="https://hooks.example.com/x",
        body="{}",
        next_attempt_at=timezone.now() - timedelta(seconds=1),
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
