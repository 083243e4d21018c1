"""A refund that fails after it was made (the card was closed, the bank sent it back):
Stripe gives the money back to the gym, so the credits the refund took back come back,
once, and finance's report stops counting it.

Stripe is the local stand-in over HTTP; its events are processed as the webhook would
(`deliver`).
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.utils import timezone

from gymbilling.models import CheckoutSession, PaymentReversal, StripeEvent
from gymbilling.selectors import reversals_by_customer
from gymbilling.services import stripe_event_process
from metering.models import MICRO
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from tests.helpers import lock_waiters, on_own_connection, pause_after, wait_until

pytestmark = pytest.mark.django_db


@pytest.fixture
def refund(customer, buy, stripe_sdk):
    """`customer` buys a 1,000-credit pack for $12.00; returns `refund(amount)`, which
    refunds that much of it at Stripe and returns the refund."""
    buy(customer.organization, pack="boost-1k")
    intent = CheckoutSession.objects.get().stripe_payment_intent_id

    def _refund(amount: int):
        return stripe_sdk.v1.refunds.create(params={"payment_intent": intent, "amount": amount})

    return _refund


def refunded_in_report() -> tuple[int, int]:
    now = timezone.now()
    (row,) = reversals_by_customer(start=now - timedelta(days=1), end=now + timedelta(days=1))
    return row["refunded"], row["credits_clawed_back"]


def test_a_failed_refund_gives_back_what_it_took_once_and_leaves_the_report(
    customer, refund, stripe_standin, deliver
):
    # given: a 1,000-credit pack bought for $12.00; $6.00 refunded, then $3.00 more,
    # each applied as its webhook arrived: 500 then 250 credits taken back
    org = customer.organization
    first = refund(600)
    deliver()
    second = refund(300)
    deliver()
    assert organization_balance(organization=org).available == 250 * MICRO

    # when: the first refund fails (the money is the gym's again), and its events are
    # delivered, then delivered again
    assert stripe_standin.fail_refund(first.id)["status"] == "failed"
    deliver()
    for event in StripeEvent.objects.filter(
        type__in=["charge.refund.updated", "refund.updated", "refund.failed"]
    ):
        stripe_event_process(event_pk=event.pk, force=True)

    # then: its 500 credits are back, once; the report counts only the $3.00 refund
    assert organization_balance(organization=org).available == 750 * MICRO
    failed = PaymentReversal.objects.order_by("pk").first()
    assert (failed.amount, failed.credits_reinstated) == (600, 500 * MICRO)
    assert failed.reinstated_at is not None
    assert refunded_in_report() == (300, 250 * MICRO)

    # when: $6.00 is refunded again (for real this time)
    refund(600)
    deliver()

    # then: it is applied, not mistaken for the failed one: $9.00 refunded in all, 750
    # credits taken back in all
    assert organization_balance(organization=org).available == 250 * MICRO
    assert refunded_in_report() == (900, 750 * MICRO)
    assert second.status == "succeeded"
    assert ledger_reconcile().ok


def test_a_refund_that_failed_before_its_events_were_processed_moves_nothing(
    customer, refund, stripe_standin, deliver, caplog
):
    # given: a 1,000-credit pack bought for $12.00, $6.00 of it refunded
    org = customer.organization
    first = refund(600)

    # when: the refund fails before any of its events is processed here, then they all are
    stripe_standin.fail_refund(first.id)
    deliver()

    # then: nothing was taken, nothing given, nothing reported
    assert organization_balance(organization=org).available == 1_000 * MICRO
    assert not PaymentReversal.objects.exists()
    now = timezone.now()
    assert reversals_by_customer(start=now - timedelta(days=1), end=now + timedelta(days=1)) == []

    # when: $3.00 is refunded after it, and its event comes twice
    refund(300)
    deliver()
    for event in StripeEvent.objects.filter(type="charge.refunded"):
        stripe_event_process(event_pk=event.pk, force=True)

    # then: that one alone is applied, and the failed one is no error for finance
    assert organization_balance(organization=org).available == 750 * MICRO
    assert refunded_in_report() == (300, 250 * MICRO)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert ledger_reconcile().ok


@pytest.mark.django_db(transaction=True)
def test_a_reading_of_refunds_from_before_a_failure_does_not_take_its_credits_again(
    customer, refund, stripe_standin, deliver, monkeypatch
):
    from gymbilling import stripe_client
    from gymbilling.services import events
    from gymbilling.services.events import charge_refund_refresh

    # given: a 1,000-credit pack bought for $12.00, $6.00 refunded and applied (500
    # credits taken back), and $3.00 more refunded at Stripe
    org = customer.organization
    first = refund(600)
    deliver()
    charge = refund(300).charge

    # when: one worker reads the charge's refunds (both succeeded) and stalls; the first
    # refund fails; another worker applies the failure (its credits back) and stalls
    # before the second refund; the first goes on with what it read, then the other
    read_paused, read_resume = pause_after(monkeypatch, stripe_client, "refunds_list", thread="B")
    back_paused, back_resume = pause_after(
        monkeypatch, events, "payment_reversal_reinstate", thread="A"
    )
    errors: list = []
    stale = threading.Thread(
        target=on_own_connection,
        args=(lambda: charge_refund_refresh(charge_id=charge), errors),
        name="B",
    )
    stale.start()
    assert read_paused.wait(timeout=60)
    stripe_standin.fail_refund(first.id)
    fresh = threading.Thread(
        target=on_own_connection,
        args=(lambda: charge_refund_refresh(charge_id=charge), errors),
        name="A",
    )
    fresh.start()
    wait_until(
        lambda: back_paused.is_set() or lock_waiters() > 0 or not fresh.is_alive(),
        what="the second worker to give back the failed refund, or to wait for the first",
    )
    read_resume.set()
    stale.join(timeout=60)
    back_resume.set()
    fresh.join(timeout=60)

    # then: the failed refund's credits are back and the second refund took its 250:
    # nothing taken twice
    assert errors == [] and not stale.is_alive() and not fresh.is_alive()
    assert organization_balance(organization=org).available == 750 * MICRO
    assert refunded_in_report() == (300, 250 * MICRO)
    assert ledger_reconcile().ok
