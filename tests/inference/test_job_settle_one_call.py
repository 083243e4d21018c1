"""job_settle from a worker: the claim and the hold's settlement in one statement.

With no transaction open (a worker), on the ledger's fast path, the job's
claim and its hold's settlement run as one call to `inference_job_settle`
(migration inference/0004), its own transaction. It must do exactly what
the transaction does (test_job_settle.py), and when the settlement is not
the fast path's it must leave nothing written, claim included, for the
transaction to decide.

Transactional: the statements commit as in the worker. The Job row and its
hold are written directly, so no Celery task is sent.
"""

from __future__ import annotations

from contextlib import nullcontext
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from accounts.errors import ApplicationError
from inference import tasks
from inference.models import InputTokensSource, Job, JobStatus
from inference.services import job_settle, job_start
from inference.services.jobs import Outcome
from metering.models import AccountKind, CreditLot, Hold, HoldStatus, UsageRecord
from metering.selectors import model_price, organization_balance
from metering.services import hold_place, hold_release
from metering.services.postings import accounts_for
from tests.factories import OrganizationFactory, UserFactory
from tests.helpers import StatementLog, credits, expire_just_after, ledger_rows, served_model

pytestmark = pytest.mark.django_db(transaction=True)

MODEL = "gym-settle-one-call"


@pytest.fixture
def running_job(grant) -> Job:
    model = served_model(MODEL, access_tier="basic")
    org = OrganizationFactory()
    grant(org, credits(10))
    job = Job.objects.create(
        public_id="job_settle_one_call",
        organization=org,
        model=model,
        model_price=model_price(model_name=MODEL),
        priority="standard",
        params={"max_tokens": 16},
        hold_amount=credits(1),
    )
    hold_place(organization=org, amount=credits(1), key=job.public_id, new_key=True)
    # The system's consumption account, opened by the first settlement ever
    # (through the ORM path: the fast path steps aside until it exists).
    accounts_for(org, AccountKind.CONSUMPTION)
    started = job_start(job_pk=job.pk)
    # What the worker has loaded (from its caches) before it settles.
    started.model, started.model_price = model, job.model_price
    assert started.model_price.price_book is not None
    return started


def _served() -> Outcome:
    return Outcome(
        text="Squat, then rest.",
        input_tokens=7,
        output_tokens=5,
        engine_ms=9,
        finish_reason="stop",
        first_token_at=timezone.now() - timedelta(milliseconds=20),
        input_tokens_source=InputTokensSource.ENGINE,
    )


@pytest.mark.parametrize("way", ["one call", "in a transaction", "orm"])
def test_a_members_job_settles_with_a_usage_record_that_names_them(running_job, settings, way):
    # given a job a member sent with their dashboard session (no key), settled
    # by the worker in one statement, inside a transaction (the ledger's
    # function through hold_capture, as a job with a webhook settles), or
    # through the ORM path
    member = UserFactory()
    Job.objects.filter(pk=running_job.pk).update(user=member)
    running_job.user_id = member.pk
    settings.METERING_FAST_PATH = way != "orm"

    # when it settles
    statements = StatementLog()
    opened = transaction.atomic() if way == "in a transaction" else nullcontext()
    with connection.execute_wrapper(statements), opened:
        job_settle(job=running_job, outcome=_served(), status=JobStatus.SUCCEEDED)

    # then its usage record names the member, and no key, as the job does
    record = UsageRecord.objects.get(job_id=running_job.public_id)
    assert (record.user_id, record.api_key_id) == (member.pk, None)
    assert record.credits == Job.objects.get(pk=running_job.pk).credits_charged > 0
    # with no statement more than any job's settlement
    if way == "one call":
        assert len(statements.sql) == 1 and "inference_job_settle(" in statements.sql[0]
    if way == "in a transaction":
        assert sum("metering_hold_settle(" in s for s in statements.sql) == 1


@pytest.mark.parametrize("way", ["one call", "in a transaction", "orm"])
def test_a_job_that_ran_past_its_credits_expiry_says_what_remains_without_them(
    running_job, grant, settings, way
):
    # given a job placed while its organization's 10 credits were valid, which then
    # expired as it ran (the minute's sweep has not moved them yet), and 5 credits
    # that never expire; settled as in the test above
    org = running_job.organization
    grant(org, credits(5), expires_at=None)
    expire_just_after(
        Hold.objects.get(key=running_job.public_id),
        CreditLot.objects.get(organization=org, expires_at__isnull=False),
    )
    settings.METERING_FAST_PATH = way != "orm"

    # when it settles, and its worker tells the waiting request
    statements = StatementLog()
    opened = transaction.atomic() if way == "in a transaction" else nullcontext()
    with connection.execute_wrapper(statements), opened:
        settled = job_settle(job=running_job, outcome=_served(), status=JobStatus.SUCCEEDED)
    end = tasks._final_event(settled, _served())

    # then what it says remains (X-Gym-Credits-Remaining) is the 5 a new job may take,
    # as the balance says, not the expired credits the job did not use
    if way == "one call":
        assert len(statements.sql) == 1 and "inference_job_settle(" in statements.sql[0]
    assert settled.credits_charged > 0
    assert end["credits_remaining"] == organization_balance(organization=org).available
    assert end["credits_remaining"] == credits(5)


@pytest.mark.parametrize("way", ["one call", "in a transaction", "orm"])
@pytest.mark.parametrize("status", [JobStatus.SUCCEEDED, JobStatus.FAILED])
def test_a_nul_in_what_the_engine_said_is_stored_as_u_fffd_and_the_job_settles(
    running_job, settings, way, status
):
    # given an asynchronous job (its output is stored) whose engine text, or
    # error message, holds a NUL, which PostgreSQL's text refuses (a
    # byte-fallback tokenizer decodes a token to one)
    Job.objects.filter(pk=running_job.pk).update(kind="async")
    running_job.kind = "async"
    settings.METERING_FAST_PATH = way != "orm"
    outcome = Outcome(
        text="Squat,\x00 then rest.",
        input_tokens=7,
        output_tokens=5,
        engine_ms=9,
        finish_reason="stop" if status == JobStatus.SUCCEEDED else "error",
        error_code="" if status == JobStatus.SUCCEEDED else "engine_error",
        error_message="" if status == JobStatus.SUCCEEDED else "the engine said \x00",
        input_tokens_source=InputTokensSource.ENGINE,
    )

    # when it settles
    opened = transaction.atomic() if way == "in a transaction" else nullcontext()
    with opened:
        settled = job_settle(job=running_job, outcome=outcome, status=status)

    # then it settled as any job does, charged for what was served, its output
    # (and message) stored with U+FFFD where the NUL was
    row = Job.objects.get(pk=running_job.pk)
    assert row.status == settled.status == status
    assert row.output == "Squat,\ufffd then rest."
    assert row.error_message == ("" if status == JobStatus.SUCCEEDED else "the engine said \ufffd")
    assert 0 < row.credits_charged == settled.credits_charged
    hold = Hold.objects.get(key=row.public_id)
    assert (hold.status, hold.captured) == (HoldStatus.CAPTURED, row.credits_charged)
    assert UsageRecord.objects.get(job_id=row.public_id).credits == row.credits_charged


def test_a_worker_settles_its_job_in_one_statement_once(running_job):
    org = running_job.organization
    before = organization_balance(organization=org)

    # when the worker settles it
    statements = StatementLog()
    with connection.execute_wrapper(statements):
        settled = job_settle(job=running_job, outcome=_served(), status=JobStatus.SUCCEEDED)

    # then one statement did it
    assert len(statements.sql) == 1 and "inference_job_settle(" in statements.sql[0]

    # and the job, its hold and its usage record say the same charge
    row = Job.objects.get(pk=running_job.pk)
    assert (row.status, row.input_tokens, row.output_tokens) == (JobStatus.SUCCEEDED, 7, 5)
    assert row.finished_at is not None and row.first_token_at is not None
    assert 0 < row.credits_charged == settled.credits_charged < credits(1)
    hold = Hold.objects.get(key=row.public_id)
    assert (hold.status, hold.captured) == (HoldStatus.CAPTURED, row.credits_charged)
    record = UsageRecord.objects.get(job_id=row.public_id)
    assert (record.credits, record.input_tokens, record.output_tokens) == (
        row.credits_charged,
        7,
        5,
    )
    after = organization_balance(organization=org)
    assert after.held == before.held - credits(1)
    assert after.available == before.available + credits(1) - row.credits_charged
    assert settled.wallet_balance_after == after.available

    # and a redelivered task settling it again changes nothing
    rows = ledger_rows()
    again = job_settle(job=running_job, outcome=Outcome(output_tokens=50), status=JobStatus.FAILED)
    assert (again.status, again.output_tokens) == (JobStatus.SUCCEEDED, 5)
    assert ledger_rows() == rows and UsageRecord.objects.filter(job_id=row.public_id).count() == 1


def test_a_job_that_served_nothing_releases_its_whole_hold(running_job):
    org = running_job.organization
    before = organization_balance(organization=org)

    job_settle(
        job=running_job,
        outcome=Outcome(finish_reason="error", error_code="engine_unavailable"),
        status=JobStatus.FAILED,
    )

    row = Job.objects.get(pk=running_job.pk)
    assert (row.status, row.credits_charged, row.error_code) == (
        JobStatus.FAILED,
        0,
        "engine_unavailable",
    )
    assert Hold.objects.get(key=row.public_id).status == HoldStatus.RELEASED
    assert organization_balance(organization=org).available == before.available + credits(1)


def test_a_state_it_may_not_end_from_is_left_alone(running_job):
    rows = ledger_rows()

    # when a cancellation of queued jobs reaches it after the worker started it
    left = job_settle(
        job=running_job,
        outcome=Outcome(finish_reason="cancelled"),
        status=JobStatus.CANCELED,
        only_from=(JobStatus.QUEUED,),
    )

    # then nothing was written
    assert left.status == JobStatus.RUNNING
    assert Job.objects.get(pk=running_job.pk).status == JobStatus.RUNNING
    assert ledger_rows() == rows


def test_a_settlement_the_call_cannot_do_undoes_the_claim_too(running_job):
    # given a hold released while its job still ran (as no service does: the
    # sweep that expires holds ends their jobs too, test_job_expiry.py)
    hold_release(key=running_job.public_id)
    rows = ledger_rows()

    # when the worker settles the job: the call steps aside, and the
    # transaction's answer is the ORM path's error
    statements = StatementLog()
    with connection.execute_wrapper(statements), pytest.raises(ApplicationError) as refused:
        job_settle(job=running_job, outcome=_served(), status=JobStatus.SUCCEEDED)
    assert refused.value.code == "hold_already_settled"
    assert "inference_job_settle(" in statements.sql[0] and len(statements.sql) > 1

    # and neither the call nor the transaction left anything written
    assert Job.objects.get(pk=running_job.pk).status == JobStatus.RUNNING
    assert ledger_rows() == rows
    assert not UsageRecord.objects.filter(job_id=running_job.public_id).exists()


def test_lots_short_of_the_capture_fail_the_call_and_undo_the_claim(running_job):
    from metering.services.lots import LedgerInconsistent

    # given the wallet's lots emptied behind the ledger's back (no service
    # does that: it is the corruption the ledger's check is there for)
    org = running_job.organization
    corrupt = "UPDATE metering_creditlot SET remaining = remaining + %s WHERE organization_id = %s"
    with connection.cursor() as cursor:
        cursor.execute(corrupt, [-credits(10), org.pk])
    rows = ledger_rows()

    try:
        # when the worker settles the job
        statements = StatementLog()
        with connection.execute_wrapper(statements), pytest.raises(LedgerInconsistent) as short:
            job_settle(job=running_job, outcome=_served(), status=JobStatus.SUCCEEDED)

        # then the one call found it, and nothing of it stayed: the job still
        # runs (its claim undone, for a later delivery to settle once the
        # ledger is repaired), no usage record, the ledger as it was
        assert "to burn" in str(short.value)
        assert len(statements.sql) == 1 and "inference_job_settle(" in statements.sql[0]
        assert Job.objects.get(pk=running_job.pk).status == JobStatus.RUNNING
        assert Hold.objects.get(key=running_job.public_id).status == HoldStatus.PENDING
        assert not UsageRecord.objects.filter(job_id=running_job.public_id).exists()
        assert ledger_rows() == rows
    finally:
        with connection.cursor() as cursor:  # repaired, for the suite's reconcile check
            cursor.execute(corrupt, [credits(10), org.pk])
