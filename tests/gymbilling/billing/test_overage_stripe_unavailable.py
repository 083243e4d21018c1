"""Overage reported while Stripe answers 429 or 5xx (the stand-in's injected faults,
`/_config/faults`): nothing is wrong with the batch, so it counts toward no re-send cap
and is not left to finance; it is sent again under its identifier once Stripe answers,
and counted once, even where Stripe ran the request it answered 500. Only while Stripe
still refuses that identifier as one it has (24 hours; the stand-in forgets it once its
events are aged, `/_config/meter_events/age`): past that, it is left to finance."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.models import AuditEvent
from gymbilling import stripe_client
from gymbilling.models import MeterError, OverageReport
from gymbilling.services import overage_report
from gymbilling.services.overage import meter_event_key, overage_used
from metering.models import MICRO, CreditLot
from metering.reconcile import ledger_reconcile
from tests.gymbilling.billing.test_overage_and_refunds import spend
from tests.gymbilling.billing.test_overage_meter_errors import (
    CHANGELIST,
    _checked,
    _finance,
    _shown,
    counted,
    customer_id,
)
from tests.helpers import ledger_rows

pytestmark = pytest.mark.django_db

METER_EVENTS = "/v1/billing/meter_events"


@pytest.fixture
def faults(stripe_standin):
    """The stand-in, its faults forgotten after the test (the whole run shares it)."""
    yield stripe_standin
    stripe_standin.clear_faults()


def _batches(org) -> list[tuple]:
    """Each batch: credits, sent, refusals toward the re-send cap, meter error, failed."""
    return [
        (b.credits, b.sent_at is not None, b.refusals, b.meter_error, b.failed_at)
        for b in OverageReport.objects.filter(organization=org).order_by("pk")
    ]


def _faulted(standin) -> list[tuple[int, int]]:
    """Each fault's status and the requests the stand-in answered with it."""
    return [(f["status"], f["faulted"]) for f in standin.faults()]


def _unavailable_run() -> None:
    with pytest.raises(stripe_client.StripeUnavailable):
        overage_report()


def test_overage_stripe_rate_limits_past_the_re_send_cap_is_reported_once_it_answers(
    customer, subscribed, faults, settings
):
    # given: at most 1 re-send, no retries by the SDK (each run is one request); Pro with
    # 10 credits of overage used; Stripe rate limiting the next 3 meter events
    settings.BILLING_OVERAGE_MAX_RESENDS = 1
    settings.STRIPE_MAX_NETWORK_RETRIES = 0
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    faults.fault(METER_EVENTS, 429, count=3)

    # when: three runs are answered 429, 5 more credits used before the last
    _unavailable_run()
    _unavailable_run()
    spend(org, 5 * MICRO, key="job-2")
    rows = ledger_rows()
    _unavailable_run()

    # then: nothing sent, nothing counted toward the cap (past it), nothing for finance
    assert _faulted(faults) == [(429, 3)]
    assert _batches(org) == [
        (10, False, 0, MeterError.NONE, None),
        (5, False, 0, MeterError.NONE, None),
    ]
    assert counted(faults, org) == []
    assert not AuditEvent.objects.filter(organization=org, action__startswith="billing.overage")

    # when: Stripe answers again
    assert overage_report() == 15
    assert overage_report() == 0

    # then: each batch counted once, under its identifier: exactly the overage used; the
    # ledger untouched by the reporting
    first, second = OverageReport.objects.filter(organization=org).order_by("pk")
    assert counted(faults, org) == [(first.identifier, 10), (second.identifier, 5)]
    assert _batches(org) == [
        (10, True, 0, MeterError.NONE, None),
        (5, True, 0, MeterError.NONE, None),
    ]
    allowance = CreditLot.objects.get(organization=org, source="overage")
    assert overage_used(allowance) == 15 * MICRO
    assert ledger_rows() == rows
    assert ledger_reconcile().ok


def test_overage_stripe_answers_5xx_is_tried_again_under_its_identifier_and_counted_once(
    customer, subscribed, faults, settings
):
    # given: at most 1 re-send; the SDK retrying a 5xx once, under the same idempotency key
    # (so a run is 2 requests); Pro with 10 credits of overage used; Stripe answering the
    # next meter events 500 for a run, 503 for the next, then 503 once more
    settings.BILLING_OVERAGE_MAX_RESENDS = 1
    settings.STRIPE_MAX_NETWORK_RETRIES = 1
    tries = 1 + settings.STRIPE_MAX_NETWORK_RETRIES
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    faults.fault(METER_EVENTS, 500, count=tries)
    faults.fault(METER_EVENTS, 503, count=tries)
    faults.fault(METER_EVENTS, 503)
    rows = ledger_rows()

    # when: two runs get no answer but 5xx, retries included
    _unavailable_run()
    _unavailable_run()

    # then: the batch waits under its identifier, toward no cap, its last attempt kept
    # (a 5xx does not say whether Stripe took it)
    [batch] = OverageReport.objects.filter(organization=org)
    identifier, attempt = batch.identifier, batch.last_attempt_at
    assert _faulted(faults) == [(500, tries), (503, tries), (503, 0)]
    assert _batches(org) == [(10, False, 0, MeterError.NONE, None)]
    assert attempt is not None
    assert counted(faults, org) == []

    # when: the next run, its first request answered 503 and the SDK's retry taken
    assert overage_report() == 10
    assert overage_report() == 0

    # then: counted once, under the same identifier; that attempt the batch's sending
    batch.refresh_from_db()
    assert _faulted(faults) == [(500, tries), (503, tries), (503, 1)]
    assert counted(faults, org) == [(identifier, 10)]
    assert _batches(org) == [(10, True, 0, MeterError.NONE, None)]
    assert batch.identifier == identifier
    assert batch.sent_at == batch.last_attempt_at > attempt
    assert not AuditEvent.objects.filter(organization=org, action__startswith="billing.overage")
    assert ledger_rows() == rows


def test_overage_stripe_took_but_answered_500_is_not_reported_twice(
    customer, subscribed, faults, settings
):
    # given: the SDK retrying 5xx; Pro with 10 credits of overage used; Stripe running the
    # next meter event, then answering 500 (and keeping that 500 under its idempotency key,
    # saying not to retry)
    settings.STRIPE_MAX_NETWORK_RETRIES = 2
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    faults.fault(METER_EVENTS, 500, taken=True)

    # when: a run is answered 500
    _unavailable_run()

    # then: Stripe counted it all the same, the batch not marked sent
    [batch] = OverageReport.objects.filter(organization=org)
    taken = batch.last_attempt_at
    assert counted(faults, org) == [(batch.identifier, 10)]
    assert _batches(org) == [(10, False, 0, MeterError.NONE, None)]

    # when: the next run sends it again
    assert overage_report() == 10
    assert overage_report() == 0

    # then: under a key of its own (the first key would be answered its kept 500) and the
    # same identifier, which Stripe refuses as one it has: counted once; the attempt Stripe
    # took stays the batch's last, the one Stripe's reports name it by
    batch.refresh_from_db()
    assert counted(faults, org) == [(batch.identifier, 10)]
    [event] = faults.meter_events(customer_id(org))
    assert event["request_key"] == meter_event_key(identifier=batch.identifier, sent_at=taken)
    assert _batches(org) == [(10, True, 0, MeterError.NONE, None)]
    assert batch.last_attempt_at == taken < batch.sent_at
    assert _faulted(faults) == [(500, 1)]


DAY = 24 * 60 * 60


def _in_doubt_audits(org) -> list[dict]:
    return [
        e.data
        for e in AuditEvent.objects.filter(
            organization=org, action="billing.overage_in_doubt"
        ).order_by("pk")
    ]


def test_overage_stripe_took_but_unreachable_for_a_day_is_left_to_finance_not_billed_twice(
    customer, subscribed, faults, settings, caplog
):
    # given: Pro with 10 credits of overage used; Stripe running the next meter event and
    # answering it 500 (so the run does not know it counted), then unreachable (503) for
    # the rest of the day
    settings.STRIPE_MAX_NETWORK_RETRIES = 0
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    faults.fault(METER_EVENTS, 500, taken=True)
    faults.fault(METER_EVENTS, 503)
    rows = ledger_rows()
    start = timezone.now()

    # when: the run is answered 500, and the one 22 hours later 503
    _unavailable_run()
    with pytest.raises(stripe_client.StripeUnavailable):
        overage_report(now=start + timedelta(hours=22))
    [batch] = OverageReport.objects.filter(organization=org)
    identifier, first, last = (
        batch.identifier,
        batch.first_unknown_attempt_at,
        batch.last_attempt_at,
    )

    # then: Stripe counted the first attempt; the batch waits, its first unanswered attempt
    # kept beside its last
    assert faults.meter_events_total(customer_id(org)) == 10
    assert _batches(org) == [(10, False, 0, MeterError.NONE, None)]
    assert first is not None and last > first

    # when: Stripe answers again a day after that first attempt, having forgotten its
    # identifier, and a run comes
    assert faults.age_meter_events(DAY + 3600, customer_id(org)) == 1
    later = start + timedelta(hours=25)
    reported = overage_report(now=later)

    # then: not sent again (Stripe would have counted it twice): the meter holds exactly
    # the overage used; the batch is with finance, maybe dropped, sent at its last attempt,
    # its error saying why and what to do; audited and logged once; ledger untouched
    assert faults.meter_events_total(customer_id(org)) == 10
    assert counted(faults, org) == [(identifier, 10)]
    assert reported == 0
    assert overage_report(now=later) == 0
    allowance = CreditLot.objects.get(organization=org, source="overage")
    assert overage_used(allowance) == 10 * MICRO
    batch.refresh_from_db()
    assert _batches(org) == [(10, True, 0, MeterError.IN_DOUBT, None)]
    assert (batch.identifier, batch.sent_at, batch.first_unknown_attempt_at) == (
        identifier,
        last,
        first,
    )
    assert "got no answer" in batch.error and "could bill it twice" in batch.error
    assert "'Counted at Stripe'" in batch.error
    assert _in_doubt_audits(org) == [
        {
            "identifier": identifier,
            "credits": 10,
            "reason": "identifier_window",
            "first_unknown_attempt": first.isoformat(),
            "last_attempt": last.isoformat(),
        }
    ]
    logged = [r for r in caplog.records if r.levelname == "ERROR" and identifier in r.message]
    assert len(logged) == 1 and "left to finance" in logged[0].message
    assert ledger_rows() == rows
    assert ledger_reconcile().ok

    # when: finance finds it among the meter's events and says so
    finance = _finance()
    response = _checked(finance, "counted_at_stripe", batch.pk, note="evt of 10 found")

    # then: it stays sent, counted once, and no run sends it
    assert _shown(response) == [f"batch {identifier}: counted at Stripe, flag cleared"]
    assert overage_report(now=later) == 0
    assert _batches(org) == [(10, True, 0, MeterError.COUNTED, None)]
    assert faults.meter_events_total(customer_id(org)) == 10


def test_overage_retried_by_the_previous_release_through_a_day_is_not_billed_twice(
    customer, subscribed, faults, settings
):
    # given: Pro with 10 credits of overage used; Stripe counting the first attempt but
    # answering it 500; then, as the previous release left such a batch, only its LAST
    # attempt recorded: a retry 20 hours later, no first unanswered attempt
    settings.STRIPE_MAX_NETWORK_RETRIES = 0
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    faults.fault(METER_EVENTS, 500, taken=True)
    start = timezone.now()
    _unavailable_run()
    OverageReport.objects.filter(organization=org).update(
        first_unknown_attempt_at=None, last_attempt_at=start + timedelta(hours=20)
    )

    # when: Stripe has forgotten the first attempt's identifier, and this release's run
    # comes 25 hours after it (5 after the recorded retry)
    assert faults.age_meter_events(DAY + 3600, customer_id(org)) == 1
    reported = overage_report(now=start + timedelta(hours=25))

    # then: its clock ran from the batch's creation, not that retry: not sent again, with
    # finance, the meter holding exactly the overage used
    assert reported == 0
    assert faults.meter_events_total(customer_id(org)) == 10
    assert _batches(org) == [(10, True, 0, MeterError.IN_DOUBT, None)]
    assert ledger_reconcile().ok


def test_overage_unanswered_for_a_day_not_taken_is_sent_again_by_finance_and_counted_once(
    customer, subscribed, faults, settings
):
    # given: Pro with 10 credits of overage used; Stripe answering the next meter event
    # 503 without running it
    settings.STRIPE_MAX_NETWORK_RETRIES = 0
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    faults.fault(METER_EVENTS, 503)

    # when: the run is answered 503, and the next comes 23 hours after that attempt (beat
    # stopped meanwhile)
    _unavailable_run()
    [batch] = OverageReport.objects.filter(organization=org)
    later = batch.first_unknown_attempt_at + timedelta(hours=23)
    assert overage_report(now=later) == 0

    # then: not sent (whether that attempt counted is not known here), left to finance,
    # the reason shown on the admin's list
    assert counted(faults, org) == []
    assert _batches(org) == [(10, True, 0, MeterError.IN_DOUBT, None)]
    finance = _finance()
    listing = finance.get(CHANGELIST).content.decode()
    assert batch.identifier in listing and "Maybe dropped" in listing
    assert "Stripe refuses an identifier twice only for 24" in listing

    # when: finance, having found no event for it at Stripe, sends it again
    response = _checked(finance, "not_counted_send_again", batch.pk, note="no event for it")

    # then: re-queued under a new identifier, sent at the next run, counted once
    assert _shown(response) == [f"batch {batch.identifier}: re-queued under a new identifier"]
    assert overage_report(now=later) == 10
    assert overage_report(now=later) == 0
    assert counted(faults, org) == [(f"{batch.identifier}_r1", 10)]
    batch.refresh_from_db()
    assert batch.first_unknown_attempt_at is None
    assert batch.sent_at == batch.last_attempt_at
    assert _batches(org) == [(10, True, 0, MeterError.DROPPED, None)]
    assert ledger_reconcile().ok


def test_overage_stamped_older_than_stripe_takes_is_refused_then_left_to_finance(
    customer, subscribed, faults, settings
):
    # given: at most 1 re-send; a batch of 3 credits used 40 days ago and never sent (beat
    # stopped since), and this clock 2 hours behind Stripe's, so that the oldest timestamp
    # it stamps (35 days less an hour before its now) is older than Stripe takes
    settings.BILLING_OVERAGE_MAX_RESENDS = 1
    sub = subscribed("pro")
    org = customer.organization
    real = timezone.now()
    batch = OverageReport.objects.create(
        identifier=f"ovg_stale_{customer_id(org)}",
        organization=org,
        subscription=sub,
        lot_id=0,
        credits=3,
        used_at=real - timedelta(days=40),
    )
    behind = real - timedelta(hours=2)

    # when: two runs send it, Stripe refusing it at once each time
    assert overage_report(now=behind) == 0
    batch.refresh_from_db()
    assert (batch.refusals, batch.sent_at, batch.stripe_error_code) == (1, None, "")
    assert overage_report(now=behind) == 0
    assert overage_report(now=behind) == 0

    # then: not tried for good, nor lost: left to finance past the re-send cap, its error
    # saying what Stripe said
    batch.refresh_from_db()
    assert counted(faults, org) == []
    assert _batches(org) == [(3, True, 1, MeterError.IN_DOUBT, None)]
    assert batch.stripe_error_code == "timestamp_too_far_in_past"
    assert "Stripe took no attempt of it" in batch.error

    # when: finance, the clock put right, sends it again
    response = _checked(_finance(), "not_counted_send_again", batch.pk, note="no event")

    # then: sent at the next run, stamped as old as Stripe takes, counted once
    assert _shown(response) == [f"batch {batch.identifier}: re-queued under a new identifier"]
    assert overage_report() == 3
    assert overage_report() == 0
    [event] = faults.meter_events(customer_id(org))
    assert (event["identifier"], event["value"]) == (f"{batch.identifier}_r1", "3")
    assert event["timestamp"] > int((real - timedelta(days=35)).timestamp())
    assert faults.meter_events_total(customer_id(org)) == 3
