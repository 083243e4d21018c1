"""Overage reported while Stripe answers 429 or 5xx (the stand-in's injected faults,
`/_config/faults`): nothing is wrong with the batch, so it counts toward no re-send cap
and is not left to finance; it is sent again under its identifier once Stripe answers,
and counted once, even where Stripe ran the request it answered 500."""

from __future__ import annotations

import pytest

from accounts.models import AuditEvent
from gymbilling import stripe_client
from gymbilling.models import MeterError, OverageReport
from gymbilling.services import overage_report
from gymbilling.services.overage import meter_event_key, overage_used
from metering.models import MICRO, CreditLot
from metering.reconcile import ledger_reconcile
from tests.gymbilling.billing.test_overage_and_refunds import spend
from tests.gymbilling.billing.test_overage_meter_errors import counted, customer_id
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
