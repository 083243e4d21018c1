"""Overage Stripe took, then dropped: its meter error report (a thin
`v1.billing.meter.error_report_triggered` event) re-queues a batch Stripe named under a
new identifier, fails one whose customer was deleted, and flags for finance the batches
it may have dropped without naming them; nothing is billed twice."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

import pytest
from django.contrib.admin import helpers
from django.test import Client
from django.utils import timezone

from accounts.models import AuditEvent
from gymbilling import stripe_client
from gymbilling.models import (
    BillingCustomer,
    EventStatus,
    MeterError,
    OverageReport,
    StripeEvent,
    Subscription,
)
from gymbilling.services import overage_report, stripe_event_process
from gymbilling.services.events import METER_ERROR_EVENTS
from gymbilling.services.overage import (
    meter_error_report_read,
    meter_event_key,
    overage_meter_errors_apply,
)
from metering.models import MICRO, CreditLot
from tests.gymbilling.billing.test_overage_and_refunds import spend
from tests.gymbilling.test_admin import offered_actions, staff_with
from tests.helpers import (
    lock_waiters,
    on_own_connection,
    pause_after,
    run_against_paused,
    wait_until,
)

THIN_SECRET = "whsec_gymbilling_thin_tests"
ERROR_REPORT = "v1.billing.meter.error_report_triggered"


def customer_id(org) -> str:
    return BillingCustomer.objects.get(organization=org).stripe_customer_id


def counted(stripe_standin, org) -> list[tuple[str, int]]:
    """The meter events Stripe counted for the organization: identifier and credits."""
    events = stripe_standin.meter_events(customer_id(org))
    return [(e["identifier"], int(e["value"])) for e in events]


@pytest.fixture
def meter_errors_later(stripe_standin):
    """The stand-in takes meter events for a customer it has not got and reports them
    dropped later, as Stripe does."""
    stripe_standin.validate_meter_events_later()
    yield
    stripe_standin.validate_meter_events_later(False)


@pytest.fixture
def meter_errors_live(billing_live, stripe_standin, settings, meter_errors_later):
    """The meter's thin events go to the live app from an event destination of their own,
    signed with its own secret, as Stripe sends them."""
    settings.STRIPE_THIN_WEBHOOK_SECRET = THIN_SECRET
    url = f"{billing_live.url}/stripe/webhook/"
    events = sorted(METER_ERROR_EVENTS)
    stripe_standin.register_webhook(url, THIN_SECRET, webhook_id="app-thin", events=events)
    yield billing_live
    stripe_standin.register_webhook(
        "http://127.0.0.1:9/unused", THIN_SECRET, webhook_id="app-thin", events=["none"]
    )


@pytest.mark.django_db(transaction=True)
def test_overage_stripe_drops_for_a_deleted_customer_is_failed_for_finance_over_http(
    meter_errors_live, customer, stripe_standin, stripe_sdk
):
    # given: Pro, paid (its webhooks applied by the worker), 10 credits of overage used,
    # then the customer deleted at Stripe (which ends the subscription)
    org = customer.organization
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    assert response.status_code == 200, response.content
    stripe_standin.pay_checkout(response.json()["session_id"])
    wait_until(
        lambda: CreditLot.objects.filter(organization=org, source="overage").exists(),
        what="the paid period's overage allowance",
    )
    spend(org, 12_010 * MICRO, key="job-1")
    deleted = customer_id(org)
    stripe_sdk.v1.customers.delete(deleted)
    wait_until(
        lambda: Subscription.objects.filter(organization=org, status="canceled").exists(),
        what="the subscription ended with its customer",
    )

    # when: the report runs: Stripe takes the meter event (200), then reports it dropped
    assert overage_report() == 10
    wait_until(
        lambda: StripeEvent.objects.filter(
            type=ERROR_REPORT, status__in=[EventStatus.PROCESSED, EventStatus.IGNORED]
        ).exists(),
        what="Stripe's meter error report, applied by the worker",
    )

    # then: the batch is failed for finance, not sent, with Stripe's code and what to do
    batch = OverageReport.objects.get(organization=org)
    assert batch.failed_at is not None
    assert (batch.sent_at, batch.meter_error, batch.stripe_error_code) == (
        None,
        MeterError.DROPPED,
        "meter_event_customer_not_found",
    )
    assert deleted in batch.error and "10 credits" in batch.error
    assert stripe_standin.meter_events(deleted) == []
    event = StripeEvent.objects.get(type=ERROR_REPORT)
    assert event.status == EventStatus.PROCESSED
    audit = AuditEvent.objects.get(organization=org, action="billing.overage_dropped")
    assert (audit.target, audit.data["outcome"], audit.data["credits"]) == (
        batch.identifier,
        "failed",
        10,
    )
    # and the next run leaves it alone
    assert overage_report() == 0


@pytest.mark.django_db
def test_a_batch_stripe_names_as_dropped_is_sent_again_under_a_new_identifier_once(
    customer, subscribed, stripe_standin, deliver, meter_errors_later, caplog
):
    # given: Pro with 10 credits of overage used, its subscription naming a customer id
    # Stripe has not got (a wrong id, put right later), and the report run: Stripe took
    # the event, then reported it dropped
    sub = subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    Subscription.objects.filter(pk=sub.pk).update(stripe_customer_id="cus_not_at_stripe")
    assert overage_report() == 10
    [first] = OverageReport.objects.filter(organization=org)
    assert first.sent_at is not None

    # when: the report is processed, twice (Stripe sends an event again; a replay)
    with caplog.at_level(logging.ERROR, logger="gymbilling.services.overage"):
        assert deliver() == [EventStatus.PROCESSED]
    [event] = StripeEvent.objects.filter(type=ERROR_REPORT)
    assert stripe_event_process(event_pk=event.pk, force=True) == EventStatus.IGNORED

    # then: the batch is re-queued once, under a new identifier, with Stripe's code
    batch = OverageReport.objects.get(pk=first.pk)
    assert batch.identifier == f"{first.identifier}_r1"
    assert (batch.sent_at, batch.failed_at) == (None, None)
    assert (batch.meter_error, batch.stripe_error_code) == (
        MeterError.DROPPED,
        "meter_event_customer_not_found",
    )
    errors = [r for r in caplog.records if r.name == "gymbilling.services.overage"]
    assert [(r.levelno, r.getMessage()) for r in errors] == [
        (logging.ERROR, f"overage report {first.identifier} dropped by Stripe: {batch.error}")
    ]
    assert AuditEvent.objects.get(action="billing.overage_dropped").data["resent_as"] == (
        batch.identifier
    )
    # when: the customer id is put right and the report runs again
    Subscription.objects.filter(pk=sub.pk).update(stripe_customer_id=customer_id(org))
    assert overage_report() == 10
    assert overage_report() == 0

    # then: Stripe counts the 10 credits once, under the new identifier
    assert counted(stripe_standin, org) == [(batch.identifier, 10)]


def _error_report(
    *, start, end, named: list[str], error_count: int, code: str = "meter_event_invalid_value"
) -> dict:
    """A meter error report's data, in Stripe's documented shape: `named`, the requests'
    idempotency keys (a sample's `request.identifier`)."""
    return {
        "developer_message_summary": f"There are {error_count} invalid events",
        "reason": {
            "error_count": error_count,
            "error_types": [
                {
                    "code": code,
                    "error_count": error_count,
                    "sample_errors": [
                        {"error_message": "Value is not a number.", "request": {"identifier": i}}
                        for i in named
                    ],
                }
            ],
        },
        "validation_start": start.isoformat().replace("+00:00", "Z"),
        "validation_end": end.isoformat().replace("+00:00", "Z"),
    }


def marked(batch: OverageReport) -> tuple:
    """The batch as it is now: its identifier, when it was sent, and what Stripe said."""
    batch.refresh_from_db()
    return (batch.identifier, batch.sent_at, batch.meter_error)


def sent_batch(sub, identifier: str, sent_at, credits: int = 5) -> OverageReport:
    """A batch of the subscription's organization, sent at `sent_at`."""
    return OverageReport.objects.create(
        identifier=identifier,
        organization=sub.organization,
        subscription=sub,
        lot_id=0,
        credits=credits,
        used_at=sent_at,
        sent_at=sent_at,
    )


@pytest.mark.django_db
def test_batches_stripe_may_have_dropped_unnamed_are_flagged_in_doubt_not_sent_again(
    customer, subscribed, stripe_standin
):
    # given: two organizations' batches sent in one run, and an older one
    sub = subscribed("pro")
    now = timezone.now()
    named, unnamed, older = (
        sent_batch(sub, "ovg_0_5", now),
        sent_batch(sub, "ovg_0_10", now),
        sent_batch(sub, "ovg_0_15", now - timedelta(hours=3)),
    )

    # when: Stripe reports 2 failures in the window after the run, naming one
    report = _error_report(
        start=now + timedelta(seconds=10),
        end=now + timedelta(seconds=20),
        named=[meter_event_key(identifier=named.identifier, sent_at=now)],
        error_count=2,
    )
    assert overage_meter_errors_apply(report=meter_error_report_read(report), our_meter=True) == 2
    # and again (a replay): nothing more is marked
    assert overage_meter_errors_apply(report=meter_error_report_read(report), our_meter=True) == 0

    # then: the named one is re-queued; the other one sent then is flagged in doubt and
    # stays sent (never re-sent by itself); the older one is left alone
    assert marked(named) == ("ovg_0_5_r1", None, MeterError.DROPPED)
    assert marked(unnamed) == ("ovg_0_10", now, MeterError.IN_DOUBT)
    assert "bills it twice" in unnamed.error
    older.refresh_from_db()
    assert (older.meter_error, older.error) == (MeterError.NONE, "")
    assert overage_report() == 5  # the re-queued one alone
    # and another meter's unnamed failures flag nothing
    other = _error_report(start=now - timedelta(hours=4), end=now, named=[], error_count=3)
    assert overage_meter_errors_apply(report=meter_error_report_read(other), our_meter=False) == 0
    older.refresh_from_db()
    assert older.meter_error == MeterError.NONE


@pytest.mark.django_db
def test_a_name_that_is_no_batchs_counts_as_unnamed_on_the_overage_meter(
    customer, subscribed, stripe_standin
):
    """Stripe's sample may name a failed request by a key of the SDK's, not the batch's
    identifier: on the overage meter (ours alone) that failure is still one of ours."""
    # given: a batch sent just now
    sub = subscribed("pro")
    now = timezone.now()
    sent = sent_batch(sub, "ovg_0_7", now, credits=7)

    # when: Stripe reports one failure in the window after, named by something else
    report = _error_report(
        start=now + timedelta(seconds=10),
        end=now + timedelta(seconds=20),
        named=["8d6c2a1e-5f0b-4a52-9d1e-3c1b2a7f9e10"],
        error_count=1,
    )
    assert overage_meter_errors_apply(report=meter_error_report_read(report), our_meter=True) == 1

    # then: the batch is flagged in doubt, still sent (never re-sent by itself)
    assert marked(sent) == ("ovg_0_7", now, MeterError.IN_DOUBT)


@pytest.mark.django_db
def test_a_batch_stripe_refused_at_once_is_sent_afresh_at_the_next_run(
    customer, subscribed, stripe_standin
):
    """Each attempt has an idempotency key of its own: a key naming the batch alone would
    be answered Stripe's saved refusal (or refused for other parameters) for a day."""
    # given: Pro with 10 credits of overage used, its subscription naming a customer id
    # Stripe has not got: Stripe refuses the batch at once (404), and it waits
    sub = subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    Subscription.objects.filter(pk=sub.pk).update(stripe_customer_id="cus_not_at_stripe")
    assert overage_report() == 0

    # when: the customer id is put right and the report runs again
    Subscription.objects.filter(pk=sub.pk).update(stripe_customer_id=customer_id(org))
    assert overage_report() == 10

    # then: the batch is sent and counted once
    [batch] = OverageReport.objects.filter(organization=org)
    assert (batch.sent_at is not None, batch.failed_at) == (True, None)
    assert counted(stripe_standin, org) == [(batch.identifier, 10)]


@pytest.mark.django_db
def test_a_no_meter_found_report_naming_one_of_ours_flags_those_sent_with_it(
    customer, subscribed, stripe_standin
):
    """`v1.billing.meter.no_meter_found` names no meter: one naming a batch of ours is
    about the overage event name, and what it counts unnamed may be ours too."""
    # given: two batches sent just now
    sub = subscribed("pro")
    now = timezone.now()
    named, other = sent_batch(sub, "ovg_0_5", now), sent_batch(sub, "ovg_0_10", now)

    # when: Stripe reports 2 events with no meter for their name, naming one by its
    # request's idempotency key
    report = _error_report(
        start=now + timedelta(seconds=10),
        end=now + timedelta(seconds=20),
        named=[meter_event_key(identifier=named.identifier, sent_at=now)],
        error_count=2,
        code="meter_event_no_meter_found",
    )
    assert overage_meter_errors_apply(report=meter_error_report_read(report), our_meter=False) == 2

    # then: the named one is re-queued, the other one sent then is flagged in doubt
    assert marked(named) == ("ovg_0_5_r1", None, MeterError.DROPPED)
    assert marked(other) == ("ovg_0_10", now, MeterError.IN_DOUBT)


@pytest.mark.django_db
def test_a_batch_is_stamped_sent_when_it_was_sent_not_when_its_run_began(
    customer, subscribed, stripe_standin
):
    # given: 10 credits of overage used, sent by a run that began two hours before (a
    # long run sends its last batches late)
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    before = timezone.now()
    assert overage_report(now=before - timedelta(hours=2)) == 10

    # when: Stripe reports a failure it does not name, validated just after it was sent
    report = _error_report(
        start=before, end=timezone.now() + timedelta(seconds=10), named=[], error_count=1
    )
    assert overage_meter_errors_apply(report=meter_error_report_read(report), our_meter=True) == 1

    # then: the batch, sent in that window, is flagged in doubt
    batch = OverageReport.objects.get(organization=org)
    assert batch.sent_at >= before
    assert batch.meter_error == MeterError.IN_DOUBT


@pytest.mark.django_db(transaction=True)
def test_a_report_read_while_a_run_sends_waits_for_the_run(
    customer, subscribed, stripe_standin, monkeypatch
):
    """The run and the report's reading are on connections of their own; Stripe's answer
    to the run's meter event is held (at the client module, stripe_client) until the
    report is applied or waits for the run."""
    # given: Pro with 10 credits of overage used, and a run that has sent its batch and
    # is paused before it marks it sent
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    before = timezone.now()
    paused, resume = pause_after(monkeypatch, stripe_client, "meter_event_create", thread="run")
    errors: list = []
    running = threading.Thread(name="run", target=on_own_connection, args=(overage_report, errors))
    running.start()
    assert paused.wait(timeout=60)

    # when: Stripe reports a failure it does not name, in the window the batch was sent in
    report = meter_error_report_read(
        _error_report(
            start=before, end=timezone.now() + timedelta(minutes=5), named=[], error_count=1
        )
    )
    reading = threading.Thread(
        name="report",
        target=on_own_connection,
        args=(lambda: overage_meter_errors_apply(report=report, our_meter=True), errors),
    )
    run_against_paused(
        reading, paused=running, resume=resume, what="the report to wait for the run"
    )

    # then: the report waited for the run: the batch it sent is flagged in doubt
    assert errors == []
    batch = OverageReport.objects.get(organization=org)
    assert batch.sent_at is not None
    assert batch.meter_error == MeterError.IN_DOUBT


# --- finance's word on a batch flagged maybe dropped, in the admin --------------------------------

CHANGELIST = "/admin/gymbilling/overagereport/"


def _in_doubt(sub, identifier: str = "ovg_0_10", credits: int = 10) -> OverageReport:
    """A batch of the subscription's organization sent just now, then flagged maybe dropped
    by Stripe's report of a failure it did not name, in the window it was sent in."""
    now = timezone.now()
    batch = sent_batch(sub, identifier, now, credits=credits)
    report = _error_report(
        start=now + timedelta(seconds=10), end=now + timedelta(seconds=20), named=[], error_count=1
    )
    assert overage_meter_errors_apply(report=meter_error_report_read(report), our_meter=True) == 1
    assert marked(batch) == (identifier, now, MeterError.IN_DOUBT)
    return batch, report


def _finance() -> Client:
    return staff_with("view_overagereport", "change_overagereport")


def _checked(client: Client, action: str, *pks: int, **form):
    """The admin's action on the batches: chosen on the list, or with `form`, its page's
    form sent; redirects followed."""
    sent = {"_checked": "go", **form} if form else {}
    return client.post(
        CHANGELIST,
        {"action": action, helpers.ACTION_CHECKBOX_NAME: list(pks), **sent},
        follow=True,
    )


def _shown(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


@pytest.mark.django_db
def test_finance_clears_the_flag_of_a_batch_they_found_counted_at_stripe(
    customer, subscribed, stripe_standin
):
    # given: a batch of 10 credits flagged maybe dropped
    sub = subscribed("pro")
    batch, report = _in_doubt(sub)
    sent_at = batch.sent_at
    finance = _finance()

    # when: finance, having found it among the meter's events, chooses "Counted at Stripe":
    # a page asks for a note; and they send it
    page = _checked(finance, "counted_at_stripe", batch.pk)
    assert b'id="checked-form"' in page.content and b"ovg_0_10" in page.content
    response = _checked(finance, "counted_at_stripe", batch.pk, note="evt 10 credits found")

    # then: the flag is cleared, the batch still sent as it was, never sent again
    assert _shown(response) == ["batch ovg_0_10: counted at Stripe, flag cleared"]
    assert marked(batch) == ("ovg_0_10", sent_at, MeterError.COUNTED)
    assert "evt 10 credits found" in batch.error
    assert overage_report() == 0
    # and the organization's audit log says who and why
    [audit] = AuditEvent.objects.filter(action="billing.overage_counted")
    assert audit.organization == sub.organization
    assert audit.actor_user.has_perm("gymbilling.change_overagereport")
    assert audit.data == {"identifier": "ovg_0_10", "credits": 10, "note": "evt 10 credits found"}
    # and Stripe's report read again (a replay) flags it no more
    assert overage_meter_errors_apply(report=meter_error_report_read(report), our_meter=True) == 0
    assert marked(batch) == ("ovg_0_10", sent_at, MeterError.COUNTED)


@pytest.mark.django_db
def test_finance_sends_again_a_batch_they_found_not_counted_at_stripe(
    customer, subscribed, stripe_standin
):
    # given: a batch of 10 credits flagged maybe dropped, not among the meter's events
    sub = subscribed("pro")
    batch, _report = _in_doubt(sub)
    finance = _finance()

    # when: finance chooses "Not counted — send again" on it, with a note
    page = _checked(finance, "not_counted_send_again", batch.pk)
    assert b"Send again only a batch you did not find there" in page.content
    response = _checked(finance, "not_counted_send_again", batch.pk, note="no event for it")

    # then: re-queued under a new identifier, as a batch Stripe named as dropped is
    assert _shown(response) == ["batch ovg_0_10: re-queued under a new identifier"]
    assert marked(batch) == ("ovg_0_10_r1", None, MeterError.DROPPED)
    assert "no event for it" in batch.error
    [audit] = AuditEvent.objects.filter(action="billing.overage_dropped")
    assert audit.actor_user.has_perm("gymbilling.change_overagereport")
    assert (audit.target, audit.data["outcome"], audit.data["resent_as"]) == (
        "ovg_0_10",
        "resent",
        "ovg_0_10_r1",
    )
    assert audit.data["note"] == "no event for it"
    # and the next run sends it, and Stripe counts it, once
    assert overage_report() == 10
    assert overage_report() == 0
    assert counted(stripe_standin, sub.organization) == [("ovg_0_10_r1", 10)]


@pytest.mark.django_db
@pytest.mark.parametrize("action", ["counted_at_stripe", "not_counted_send_again"])
def test_finance_s_word_is_refused_for_a_batch_not_flagged_maybe_dropped(
    customer, subscribed, stripe_standin, action
):
    # given: a batch sent with no meter error (hours ago), and one Stripe named as dropped
    # (re-queued)
    sub = subscribed("pro")
    now = timezone.now()
    plain = sent_batch(sub, "ovg_0_5", now - timedelta(hours=3))
    named = sent_batch(sub, "ovg_0_10", now)
    report = _error_report(
        start=now + timedelta(seconds=10),
        end=now + timedelta(seconds=20),
        named=[meter_event_key(identifier="ovg_0_10", sent_at=now)],
        error_count=1,
    )
    assert overage_meter_errors_apply(report=meter_error_report_read(report), our_meter=True) == 1
    finance = _finance()
    before = [marked(plain), marked(named)]

    # when: finance chooses the action on them, and sends its form for them anyway
    chosen = _checked(finance, action, plain.pk, named.pk)
    sent = _checked(finance, action, plain.pk, named.pk, note="looked")

    # then: refused, saying why; nothing changed, nothing audited
    assert _shown(chosen) == [
        "No batch flagged maybe dropped selected: only those can be checked at Stripe here."
    ]
    [shown] = _shown(sent)
    assert "batch ovg_0_10_r1: Only a batch flagged maybe dropped" in shown
    assert "ovg_0_10_r1 is dropped by Stripe, which named it" in shown
    assert "ovg_0_5 is not flagged" in shown and "(overage_not_in_doubt)" in shown
    assert [marked(plain), marked(named)] == before
    assert (
        not AuditEvent.objects.filter(
            action__in=["billing.overage_counted", "billing.overage_dropped"]
        )
        .exclude(target="ovg_0_10")
        .exists()
    )
    # and a note is required; staff who may only view batches are not offered the action
    flagged, _ = _in_doubt(sub, "ovg_0_20")
    bare = _checked(finance, action, flagged.pk, note="  ")
    assert bare.context["form"].errors.keys() == {"note"}
    assert marked(flagged)[2] == MeterError.IN_DOUBT
    assert action not in offered_actions(staff_with("view_overagereport"), CHANGELIST)


@pytest.mark.django_db(transaction=True)
def test_finance_s_word_waits_for_a_run_sending_batches(
    customer, subscribed, stripe_standin, monkeypatch
):
    # given: a batch flagged maybe dropped, and a run paused sending another batch
    sub = subscribed("pro")
    batch, _report = _in_doubt(sub)
    spend(sub.organization, 12_010 * MICRO, key="job-1")
    paused, resume = pause_after(monkeypatch, stripe_client, "meter_event_create", thread="run")
    errors: list = []
    running = threading.Thread(name="run", target=on_own_connection, args=(overage_report, errors))
    running.start()
    assert paused.wait(timeout=60)

    # when: finance says the flagged batch was counted
    actor = _finance()
    checking = threading.Thread(
        name="finance",
        target=on_own_connection,
        args=(
            lambda: _checked(actor, "counted_at_stripe", batch.pk, note="found it"),
            errors,
        ),
    )
    checking.start()
    wait_until(
        lambda: lock_waiters() > 0 or not checking.is_alive(),
        what="finance's action to wait for the run",
    )

    # then: it waits for the run, then clears the flag
    assert checking.is_alive(), "finance's action did not wait for the run's lock"
    assert marked(batch)[2] == MeterError.IN_DOUBT
    resume.set()
    running.join(timeout=120)
    checking.join(timeout=120)
    assert errors == []
    assert marked(batch)[2] == MeterError.COUNTED


# --- which attempt Stripe's report names ---------------------------------------------------


def lose_answers(monkeypatch, *, landed: list[bool]) -> list[str]:
    """The next meter events get no answer (a timeout), one per item of `landed`, which says
    whether Stripe got that one all the same; then they are answered again. Returns the
    idempotency key of every attempt, in order. At the client module (stripe_client): the
    stand-in cannot lose an answer by itself, so a landed call is sent through to it and its
    answer dropped, as stripe_holds_next_update does."""
    real = stripe_client.meter_event_create
    keys: list[str] = []
    plan = list(landed)

    def answer_lost(**params):
        keys.append(params["key"])
        if not plan:
            return real(**params)
        if plan.pop(0):
            real(**params)
        raise stripe_client.StripeUnavailable("Request timed out")

    monkeypatch.setattr(stripe_client, "meter_event_create", answer_lost)
    return keys


def _attempt_at(key: str):
    """When the attempt an idempotency key names was sent (meter_event_key)."""
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=int(key.partition(":")[2]))


def _named_dropped(*keys: str) -> int:
    """Stripe's report of the events these keys were sent with, dropped (all named)."""
    now = timezone.now()
    report = _error_report(
        start=now - timedelta(minutes=5), end=now, named=list(keys), error_count=len(keys)
    )
    return overage_meter_errors_apply(report=meter_error_report_read(report), our_meter=True)


def _logged(caplog) -> list[tuple[int, str]]:
    """What the overage service logged at WARNING and above."""
    return [
        (r.levelno, r.getMessage())
        for r in caplog.records
        if r.name == "gymbilling.services.overage" and r.levelno >= logging.WARNING
    ]


@pytest.mark.django_db
def test_a_report_naming_an_earlier_attempt_of_a_batch_stripe_took_later_bills_it_once(
    customer, subscribed, stripe_standin, monkeypatch, caplog
):
    """Only one attempt of a batch can count (Stripe refuses its identifier twice), and the
    one Stripe answered 200 is it, unless Stripe reports that one dropped."""
    # given: Pro with 10 credits of overage used; the batch's first attempt got no answer
    # (it never reached the meter, though nothing here can know it), and the next run's
    # attempt was taken (200) and counted
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    keys = lose_answers(monkeypatch, landed=[False])
    with pytest.raises(stripe_client.StripeUnavailable):
        overage_report()
    assert overage_report() == 10
    first, taken = keys
    [batch] = OverageReport.objects.filter(organization=org)
    before = marked(batch)

    # when: Stripe reports the first attempt dropped, naming its key
    with caplog.at_level(logging.WARNING, logger="gymbilling.services.overage"):
        assert _named_dropped(first) == 0

    # then: the batch is left as it was, sent with the attempt Stripe took, never re-sent
    assert marked(batch) == before == (batch.identifier, _attempt_at(taken), MeterError.NONE)
    assert overage_report() == 0
    assert counted(stripe_standin, org) == [(batch.identifier, 10)]
    # and the report's word on the earlier attempt is logged, not acted on
    [(level, message)] = _logged(caplog)
    assert level == logging.WARNING and first in message and "ignored" in message
    assert not AuditEvent.objects.filter(action__startswith="billing.overage_").exists()


def _earlier_named_with(count: int, sent: OverageReport, earlier) -> int:
    """Stripe's report of `count` failures validated just after `sent` was sent, its
    sample naming only the batch's `earlier` attempt."""
    report = _error_report(
        start=sent.sent_at + timedelta(seconds=10),
        end=sent.sent_at + timedelta(seconds=20),
        named=[meter_event_key(identifier=sent.identifier, sent_at=earlier)],
        error_count=count,
    )
    return overage_meter_errors_apply(report=meter_error_report_read(report), our_meter=True)


@pytest.mark.django_db
def test_a_batch_named_by_an_earlier_attempt_is_flagged_when_its_window_has_unnamed_failures(
    customer, subscribed, stripe_standin
):
    """Stripe's samples are capped: a cause that drops the attempt a report names (an
    archived meter) may have dropped the batch's answered attempt too, uncounted among the
    failures it does not name. Naming an earlier attempt says nothing of that one."""
    # given: a batch whose first attempt's answer was lost, sent again and answered 200
    sub = subscribed("pro")
    taken = timezone.now()
    first = taken - timedelta(minutes=30)
    batch = sent_batch(sub, "ovg_0_10", taken, credits=10)
    OverageReport.objects.filter(pk=batch.pk).update(last_attempt_at=taken)

    # when: Stripe reports 2 failures in the window the answered attempt was validated in,
    # naming only the first attempt
    assert _earlier_named_with(2, batch, first) == 1

    # then: the unnamed failure may be its answered attempt: flagged maybe dropped for
    # finance, still sent with that attempt, never re-sent by itself
    assert marked(batch) == ("ovg_0_10", taken, MeterError.IN_DOUBT)
    assert "bills it twice" in batch.error
    assert overage_report() == 0


@pytest.mark.django_db
def test_a_batch_named_by_an_earlier_attempt_is_left_alone_when_every_failure_is_named(
    customer, subscribed, stripe_standin
):
    # given: a batch sent again and answered 200 after an attempt whose answer was lost
    sub = subscribed("pro")
    taken = timezone.now()
    batch = sent_batch(sub, "ovg_0_10", taken, credits=10)
    OverageReport.objects.filter(pk=batch.pk).update(last_attempt_at=taken)

    # when: Stripe reports 1 failure in its window, naming that earlier attempt
    assert _earlier_named_with(1, batch, taken - timedelta(minutes=30)) == 0

    # then: the answered attempt counts: the batch is left as it was
    assert marked(batch) == ("ovg_0_10", taken, MeterError.NONE)
    assert not AuditEvent.objects.filter(action__startswith="billing.overage_").exists()


@pytest.mark.django_db
def test_a_report_naming_an_earlier_attempt_while_a_later_one_went_unanswered_bills_it_once(
    customer, subscribed, stripe_standin, monkeypatch
):
    # given: 10 credits of overage whose batch was tried twice with no answer: the first
    # attempt never reached the meter, the second was taken and counted
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    keys = lose_answers(monkeypatch, landed=[False, True])
    for _ in range(2):
        with pytest.raises(stripe_client.StripeUnavailable):
            overage_report()
    first, taken = keys
    [batch] = OverageReport.objects.filter(organization=org)
    assert batch.sent_at is None

    # when: Stripe reports the first attempt dropped
    assert _named_dropped(first) == 1

    # then: nothing says whether the second counted: the batch is not re-queued but
    # flagged maybe dropped for finance, sent with that attempt, and not sent again
    assert marked(batch) == (batch.identifier, _attempt_at(taken), MeterError.IN_DOUBT)
    assert first in batch.error and "bills it twice" in batch.error
    assert overage_report() == 0
    assert counted(stripe_standin, org) == [(batch.identifier, 10)]
    # and finance, finding it counted, says so
    _checked(_finance(), "counted_at_stripe", batch.pk, note="found, 10 credits")
    assert marked(batch) == (batch.identifier, _attempt_at(taken), MeterError.COUNTED)


@pytest.mark.django_db
def test_a_report_naming_the_last_attempt_re_queues_the_batch_whatever_came_before(
    customer, subscribed, stripe_standin, deliver, meter_errors_later, monkeypatch
):
    # given: a batch whose first attempt got no answer, then sent to a customer id Stripe
    # has not got: taken (200), then reported dropped, naming that last attempt
    sub = subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    keys = lose_answers(monkeypatch, landed=[False])
    with pytest.raises(stripe_client.StripeUnavailable):
        overage_report()
    Subscription.objects.filter(pk=sub.pk).update(stripe_customer_id="cus_not_at_stripe")
    assert overage_report() == 10
    [batch] = OverageReport.objects.filter(organization=org)
    first_identifier = batch.identifier

    # when: the report is processed
    assert deliver() == [EventStatus.PROCESSED]

    # then: the batch is re-queued, and once the customer id is put right, counted once
    assert marked(batch) == (f"{first_identifier}_r1", None, MeterError.DROPPED)
    Subscription.objects.filter(pk=sub.pk).update(stripe_customer_id=customer_id(org))
    assert overage_report() == 10
    assert counted(stripe_standin, org) == [(batch.identifier, 10)]
    assert len(keys) == 3


@pytest.mark.django_db
def test_a_batch_whose_dropped_attempt_went_unanswered_and_was_refused_again_goes_to_finance(
    customer, subscribed, stripe_standin, deliver, meter_errors_later, monkeypatch
):
    """Stripe refused the next attempt as the identifier it had: no answer says whether
    the attempt it had is the one it reports dropped, or one it counted."""
    # given: a batch sent to a customer id Stripe has not got: taken, dropped later, its
    # answer lost; the id put right, the next attempt refused as the identifier Stripe has
    sub = subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    Subscription.objects.filter(pk=sub.pk).update(stripe_customer_id="cus_not_at_stripe")
    keys = lose_answers(monkeypatch, landed=[True])
    with pytest.raises(stripe_client.StripeUnavailable):
        overage_report()
    Subscription.objects.filter(pk=sub.pk).update(stripe_customer_id=customer_id(org))
    assert overage_report() == 10
    dropped, refused = keys
    [batch] = OverageReport.objects.filter(organization=org)

    # when: Stripe's report of the first attempt is processed
    assert deliver() == [EventStatus.PROCESSED]

    # then: flagged maybe dropped for finance, not re-sent by itself
    assert marked(batch) == (batch.identifier, _attempt_at(refused), MeterError.IN_DOUBT)
    assert dropped in batch.error
    assert overage_report() == 0
    # and finance, finding nothing counted, sends it again: counted once
    _checked(_finance(), "not_counted_send_again", batch.pk, note="no event at Stripe")
    assert overage_report() == 10
    assert counted(stripe_standin, org) == [(batch.identifier + "_r1", 10)]


@pytest.mark.django_db
def test_a_batch_named_by_its_identifier_alone_is_flagged_in_doubt_not_re_sent(
    customer, subscribed, stripe_standin
):
    """A sample naming the batch without the attempt does not say which attempt Stripe
    dropped: one Stripe counted may be another, so it is finance's to check."""
    # given: a batch sent just now
    sub = subscribed("pro")
    now = timezone.now()
    batch = sent_batch(sub, "ovg_0_10", now, credits=10)

    # when: Stripe's report names its identifier, bare
    assert _named_dropped("ovg_0_10") == 1

    # then: flagged maybe dropped, still sent, never re-sent by itself
    assert marked(batch) == ("ovg_0_10", now, MeterError.IN_DOUBT)
    assert overage_report() == 0


# --- a batch Stripe keeps dropping ----------------------------------------------------------


@pytest.mark.django_db
def test_a_batch_stripe_keeps_dropping_goes_to_finance_after_the_re_send_cap(
    customer, subscribed, stripe_standin, deliver, meter_errors_later, settings, caplog
):
    # given: at most 2 re-sends; 10 credits of overage, its subscription naming a customer
    # id Stripe has not got, and not put right
    settings.BILLING_OVERAGE_MAX_RESENDS = 2
    sub = subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    Subscription.objects.filter(pk=sub.pk).update(stripe_customer_id="cus_not_at_stripe")

    # when: runs and Stripe's reports follow each other: sent, dropped, three times
    with caplog.at_level(logging.ERROR, logger="gymbilling.services.overage"):
        assert overage_report() == 10
        [batch] = OverageReport.objects.filter(organization=org)
        first = batch.identifier
        assert deliver() == [EventStatus.PROCESSED]
        for _ in range(2):
            assert overage_report() == 10
            assert deliver() == [EventStatus.PROCESSED]
        # and the last report again (a replay)
        last = StripeEvent.objects.filter(type=ERROR_REPORT).order_by("-pk").first()
        assert stripe_event_process(event_pk=last.pk, force=True) == EventStatus.IGNORED

    # then: re-sent twice, then left to finance: flagged, still sent, not sent again
    batch.refresh_from_db()
    assert batch.identifier == f"{first}_r2"
    assert (batch.sent_at is not None, batch.failed_at) == (True, None)
    assert (batch.meter_error, batch.stripe_error_code) == (
        MeterError.IN_DOUBT,
        "meter_event_customer_not_found",
    )
    assert "re-sent 2 times" in batch.error
    assert overage_report() == 0
    # and logged once each: two re-queues, then the one for finance
    logged = _logged(caplog)
    assert [level for level, _ in logged] == [logging.ERROR] * 3
    assert logged[-1][1] == f"overage report {batch.identifier} left to finance: {batch.error}"
    audit = AuditEvent.objects.filter(action="billing.overage_dropped").order_by("pk").last()
    assert (audit.target, audit.data["outcome"]) == (batch.identifier, "finance")

    # when: finance puts the customer id right and says it was not counted
    Subscription.objects.filter(pk=sub.pk).update(stripe_customer_id=customer_id(org))
    _checked(_finance(), "not_counted_send_again", batch.pk, note="customer id put right")

    # then: sent again once, and counted once
    assert overage_report() == 10
    assert counted(stripe_standin, org) == [(f"{first}_r3", 10)]


def _overage_meter(stripe_sdk):
    """The overage meter at the stand-in, as the catalog's sync made it."""
    from django.conf import settings

    [meter] = [
        m
        # every page: the stand-in lives for the whole run, and other tests' meters
        # fill Stripe's default page of 10
        for m in stripe_sdk.v1.billing.meters.list(params={"limit": 100}).auto_paging_iter()
        if m.event_name == settings.STRIPE_OVERAGE_EVENT_NAME and m.status == "active"
    ]
    return meter


@pytest.mark.django_db
def test_a_batch_stripe_keeps_refusing_at_once_goes_to_finance_after_the_re_send_cap(
    customer, subscribed, stripe_standin, stripe_sdk, settings, caplog
):
    # given: at most 2 re-sends; 10 credits of overage; and the overage meter deactivated
    # at Stripe (by hand, in the dashboard), so Stripe refuses every meter event at once
    # (400: no active meter for the event name)
    settings.BILLING_OVERAGE_MAX_RESENDS = 2
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    meter = _overage_meter(stripe_sdk)
    stripe_sdk.v1.billing.meters.deactivate(meter.id)

    # when: a run is refused; a run finds Stripe unreachable (counts toward nothing: the
    # batch is not at fault); then two more runs are refused
    with caplog.at_level(logging.WARNING, logger="gymbilling.services.overage"):
        assert overage_report() == 0
        [batch] = OverageReport.objects.filter(organization=org)
        standin, settings.STRIPE_MAX_NETWORK_RETRIES = settings.STRIPE_API_BASE, 0
        settings.STRIPE_API_BASE = "http://127.0.0.1:9"  # nothing listens there
        with pytest.raises(stripe_client.StripeUnavailable):
            overage_report()
        settings.STRIPE_API_BASE = standin
        batch.refresh_from_db()
        assert (batch.sent_at, batch.meter_error) == (None, MeterError.NONE)
        assert overage_report() == 0
        assert overage_report() == 0
        # and more runs
        assert overage_report() == 0
        assert overage_report() == 0

    # then: tried again twice after the first refusal, then left to finance: flagged, marked
    # sent (no run sends it), its error saying why and what to do
    batch.refresh_from_db()
    first = batch.identifier
    assert (batch.sent_at is not None, batch.failed_at) == (True, None)
    assert (batch.meter_error, batch.stripe_error_code) == (
        MeterError.IN_DOUBT,
        "resource_missing",
    )
    assert "refused" in batch.error and "re-sent 2 times" in batch.error
    assert batch.refusals == 2  # the first refusal, and the one after the unanswered run
    # (the attempt that got no answer may have reached Stripe, for all the run knew)
    assert "An earlier attempt got no answer and may have counted" in batch.error
    assert counted(stripe_standin, org) == []
    # and logged: each refusal tried again at WARNING, then once at ERROR for finance, never
    # again by the runs after; one audit record
    logged = _logged(caplog)
    assert [level for level, _ in logged] == [logging.WARNING] * 2 + [logging.ERROR]
    assert logged[-1][1] == f"overage report {first} left to finance: {batch.error}"
    [audit] = AuditEvent.objects.filter(action="billing.overage_refused")
    assert (audit.target, audit.data["outcome"], audit.data["code"], audit.data["credits"]) == (
        first,
        "finance",
        "resource_missing",
        10,
    )

    # when: finance puts the meter right and says it was not counted
    stripe_sdk.v1.billing.meters.reactivate(meter.id)
    _checked(_finance(), "not_counted_send_again", batch.pk, note="meter reactivated")

    # then: sent again once, under a new identifier, and counted once
    assert overage_report() == 10
    assert overage_report() == 0
    assert counted(stripe_standin, org) == [(f"{first}_r1", 10)]


# --- finance's word stands -----------------------------------------------------------------


@pytest.mark.django_db
def test_no_report_re_flags_or_re_sends_a_batch_finance_found_counted(
    customer, subscribed, stripe_standin, caplog
):
    # given: a batch flagged maybe dropped that finance found counted at Stripe
    sub = subscribed("pro")
    batch, unnamed = _in_doubt(sub)
    sent_at = batch.sent_at
    _checked(_finance(), "counted_at_stripe", batch.pk, note="evt 10 credits found")

    # when: a report names its attempt as dropped (late, or read again), and another counts
    # failures it does not name in the window it was sent in
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gymbilling.services.overage"):
        assert _named_dropped(meter_event_key(identifier=batch.identifier, sent_at=sent_at)) == 0
    assert overage_meter_errors_apply(report=meter_error_report_read(unnamed), our_meter=True) == 0

    # then: it stays counted and sent, and is never sent again
    assert marked(batch) == ("ovg_0_10", sent_at, MeterError.COUNTED)
    assert overage_report() == 0
    [(level, message)] = _logged(caplog)
    assert level == logging.WARNING and "counted at Stripe" in message
