"""A job whose hold expired ends `expired`, nothing charged; a late worker writes nothing.

The ledger's sweep (`holds_expire`) releases a hold that stayed pending past
its expiry: the job's worker vanished or its message was lost. The job then
ends too (through metering's `hold_expired` signal), with a `job.expired`
webhook if it asked for one. Transactional: each step commits as in the
sweep and the worker. Job rows and holds are written directly, so no job
message is sent; a webhook's delivery is, and is waited for.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from inference import tasks
from inference.models import CallbackStatus, Job, JobCallback, JobStatus
from inference.relay import relay_events, relay_publish
from inference.services import job_settle
from inference.services.jobs import Outcome
from metering.models import Hold, HoldStatus, UsageRecord
from metering.selectors import model_price, organization_balance
from metering.services import hold_place, holds_expire
from metering.services.holds import HOLD_EXPIRY_FORCED_AFTER
from metering.signals import hold_expired
from tests.factories import OrganizationFactory
from tests.helpers import credits, job_state, ledger_rows, served_model, wait_until
from tests.inference import test_callbacks as callback_fixtures

pytestmark = pytest.mark.django_db(transaction=True)

receiver_of = callback_fixtures.receiver_of

MODEL = "gym-expiry"


@pytest.fixture
def open_job(grant):
    model = served_model(MODEL, access_tier="basic")
    org = OrganizationFactory()
    grant(org, credits(10))

    def make(public_id: str, *, status: str = JobStatus.QUEUED, callback_url: str = "") -> Job:
        job = Job.objects.create(
            public_id=public_id,
            organization=org,
            model=model,
            model_price=model_price(model_name=MODEL),
            priority="standard",
            status=status,
            params={"max_tokens": 16},
            hold_amount=credits(1),
            callback_url=callback_url,
        )
        hold_place(organization=org, amount=credits(1), key=public_id, new_key=True)
        return job

    return make


def _expire_holds() -> int:
    Hold.objects.filter(status=HoldStatus.PENDING).update(expires_at=timezone.now())
    return holds_expire(now=timezone.now() + timedelta(seconds=1))


def test_jobs_whose_holds_expired_end_expired_with_nothing_charged(open_job):
    # given a queued job and a running one whose worker vanished
    queued = open_job("job_expiry_queued")
    running = open_job("job_expiry_running", status=JobStatus.RUNNING)
    org = queued.organization
    before = organization_balance(organization=org)

    # when the ledger's sweep releases their holds
    assert _expire_holds() == 2

    # then both jobs ended expired, nothing charged, every credit back
    for job in (queued, running):
        row = Job.objects.get(pk=job.pk)
        assert (row.status, row.credits_charged, row.error_code) == (
            JobStatus.EXPIRED,
            0,
            "job_expired",
        )
        assert row.finished_at is not None
        assert Hold.objects.get(key=job.public_id).status == HoldStatus.EXPIRED
    after = organization_balance(organization=org)
    assert after.held == 0 and after.available == before.available + credits(2)


def test_an_expired_job_with_a_webhook_gets_its_event(open_job, celery_worker_process, receiver_of):
    # given a job whose webhook goes to a receiver of this test's
    receiver = receiver_of(200)
    job = open_job("job_expiry_hooked", callback_url=f"{receiver.url}/jobs")

    # when
    _expire_holds()

    # then its webhook says it expired, as GET says
    callback = JobCallback.objects.get(job_id=job.pk)
    assert callback.event_type == "job.expired"
    assert '"status":"expired"' in callback.body
    # and the session's worker delivers it, once (waited for: the delivery
    # writes the callback row, which must not race the test's teardown)
    wait_until(
        lambda: JobCallback.objects.get(pk=callback.pk).status == CallbackStatus.DELIVERED,
        timeout=30,
        what="the webhook to be delivered",
    )
    [delivered] = receiver.received
    assert json.loads(delivered.body)["type"] == "job.expired"


def test_a_worker_that_finishes_an_expired_job_later_writes_nothing(open_job):
    # given a running job whose hold expired
    job = open_job("job_expiry_late", status=JobStatus.RUNNING)
    _expire_holds()
    rows = ledger_rows()

    # when its worker comes back and settles what it served
    outcome = Outcome(text="late", input_tokens=7, output_tokens=5, finish_reason="stop")
    settled = job_settle(job=job, outcome=outcome, status=JobStatus.SUCCEEDED)

    # then the job stays expired and nothing is billed
    assert settled.status == JobStatus.EXPIRED and settled.credits_charged == 0
    assert ledger_rows() == rows
    assert not UsageRecord.objects.filter(job_id=job.public_id).exists()
    # and a client still waiting is answered with the error, not the free text
    final = tasks._final_event(settled, outcome)
    assert (final["type"], final["error_code"]) == ("error", "job_expired")


def test_a_settled_job_is_left_alone_by_the_sweep(open_job):
    # given a job its worker settled
    job = open_job("job_expiry_done", status=JobStatus.RUNNING)
    job_settle(
        job=job,
        outcome=Outcome(text="ok", input_tokens=7, output_tokens=5, finish_reason="stop"),
        status=JobStatus.SUCCEEDED,
    )
    settled = job_state(job)
    assert settled[0]["status"] == JobStatus.SUCCEEDED

    # when the sweep runs
    assert _expire_holds() == 0

    # then it stays as it was: its row and its hold's whole, the ledger, the balance
    assert job_state(job) == settled


def test_a_job_the_sweep_could_not_end_keeps_its_hold_until_a_later_sweep_ends_both(open_job):
    # given two jobs whose holds are past their expiry, and a receiver of the
    # ledger's signal that fails on the first one's hold (as a database error
    # in ending that job would)
    stuck, other = open_job("job_expiry_stuck"), open_job("job_expiry_other")

    def fails_on_the_first(sender, key: str, **kwargs) -> None:
        if key == stuck.public_id:
            raise RuntimeError("the job could not be ended")

    hold_expired.connect(fails_on_the_first, dispatch_uid="test-fails-on-the-first")
    try:
        # when the sweep runs
        assert _expire_holds() == 1
    finally:
        hold_expired.disconnect(dispatch_uid="test-fails-on-the-first")

    # then that job stays open on a pending hold, not open on a released one,
    # while the other hold and its job expired
    assert Job.objects.get(pk=stuck.pk).status == JobStatus.QUEUED
    assert Hold.objects.get(key=stuck.public_id).status == HoldStatus.PENDING
    assert Job.objects.get(pk=other.pk).status == JobStatus.EXPIRED
    assert Hold.objects.get(key=other.public_id).status == HoldStatus.EXPIRED

    # and the next sweep ends it, nothing charged
    assert _expire_holds() == 1
    job = Job.objects.get(pk=stuck.pk)
    assert (job.status, job.credits_charged) == (JobStatus.EXPIRED, 0)
    assert Hold.objects.get(key=stuck.public_id).status == HoldStatus.EXPIRED
    assert organization_balance(organization=job.organization).held == 0


def test_a_hold_a_day_past_its_expiry_is_released_even_if_a_receiver_always_fails(open_job):
    # given a job whose hold expired more than a day ago, and a receiver of the
    # ledger's signal that fails every time (a bug): the sweep could not
    # release the hold since
    job = open_job("job_expiry_forced")
    a_day_ago = timezone.now() - HOLD_EXPIRY_FORCED_AFTER - timedelta(minutes=1)
    Hold.objects.filter(key=job.public_id).update(expires_at=a_day_ago)

    def always_fails(sender, key: str, **kwargs) -> None:
        raise RuntimeError("a receiver with a bug")

    hold_expired.connect(always_fails, dispatch_uid="test-always-fails")
    try:
        # when the sweep runs
        expired = holds_expire()
    finally:
        hold_expired.disconnect(dispatch_uid="test-always-fails")

    # then the customer's credits are released all the same, and the job,
    # whose own receiver was told after the release, ended expired
    assert expired == 1
    assert Hold.objects.get(key=job.public_id).status == HoldStatus.EXPIRED
    row = Job.objects.get(pk=job.pk)
    assert (row.status, row.credits_charged) == (JobStatus.EXPIRED, 0)
    assert organization_balance(organization=job.organization).held == 0


def test_a_stream_waiting_on_a_job_whose_hold_expired_gets_its_end(open_job):
    # given a running streamed job whose dead run had relayed part of its
    # answer, its client waiting on its stream
    job = open_job("job_expiry_streamed", status=JobStatus.RUNNING)
    relay_publish(job.public_id, {"type": "delta", "text": "Squat"})

    # when the ledger's sweep releases its hold
    assert _expire_holds() == 1

    # then the stream ends: after what it was sent, the job's end, expired,
    # nothing charged (before, no final event came and the client waited on)
    *deltas, final = relay_events(job.public_id, timeout_s=5)
    assert [event["text"] for event in deltas] == ["Squat"]
    assert (final["type"], final["status"], final["error_code"]) == (
        "error",
        JobStatus.EXPIRED,
        "job_expired",
    )
    assert final["credits_charged"] == 0
