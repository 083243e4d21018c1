"""A refund or dispute takes back the credits the money it returned paid for, not its share
of the charge: a Pro renewal of $99 (12,000 credits) and $45 of overage (5,000 credits at
$9 per 1,000), paid in part by the customer balance (marketplace proceeds paid as a
credit) or all by card; refunded or disputed in parts or whole, through the stand-in."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from gymbilling import stripe_client
from gymbilling.models import BillingCustomer, Invoice, PaymentReversal, StripeEvent
from gymbilling.reconcile import stripe_reconcile
from gymbilling.services import (
    overage_report,
    payment_reversals_pending_settle,
    stripe_event_process,
)
from gymbilling.services.payments import reversal_credits
from metering.models import MICRO, CreditLot
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import hold_capture, hold_place, hold_release
from tests.helpers import ledger_rows

pytestmark = pytest.mark.django_db

PLAN_CREDITS = 12_000 * MICRO
PLAN_PRICE = 9_900
OVERAGE = 4_500  # 5,000 credits at $9.00 per 1,000


def _renewed_with_overage(customer, subscribed, stripe_standin, deliver, *, balance: int = 0):
    """Pro, its 12,000 credits and 5,000 of overage spent (reported to the meter), `balance`
    cents of proceeds credited to the customer's balance, then renewed: the renewal's
    invoice row, and the lot of 12,000 credits it bought."""
    sub = subscribed("pro")
    org = customer.organization
    hold_place(organization=org, amount=17_000 * MICRO, key="job-1")
    hold_capture(key="job-1", amount=17_000 * MICRO)
    assert overage_report() == 5_000
    if balance:
        # As the marketplace pays proceeds to a member without a Connect account.
        stripe_client.customer_balance_credit(
            key=f"proceeds-{uuid.uuid4()}",
            customer=BillingCustomer.objects.get(organization=org).stripe_customer_id,
            amount=-balance,
            currency="usd",
            description="Marketplace proceeds",
        )
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()
    invoice = Invoice.objects.get(subscription=sub, billing_reason="subscription_cycle")
    lot = CreditLot.objects.get(
        organization=org, source="subscription", amount=PLAN_CREDITS, remaining=PLAN_CREDITS
    )
    return invoice, lot


def _charge(invoice: Invoice) -> dict:
    return stripe_client.payment_intent_charge(invoice.stripe_payment_intent_id)


def _reversed(reversal: PaymentReversal) -> int:
    return reversal.credits_clawed_back + reversal.credits_pending + reversal.credits_lost


def _overage_then_rest_refunded(stripe_sdk, deliver, invoice: Invoice) -> tuple:
    """The invoice's $45 of overage refunded at Stripe, then the $99 left, each delivered;
    returns the two refunds."""
    intent = invoice.stripe_payment_intent_id
    overage = stripe_sdk.v1.refunds.create(params={"payment_intent": intent, "amount": OVERAGE})
    deliver()
    rest = stripe_sdk.v1.refunds.create(params={"payment_intent": intent})
    deliver()
    return overage, rest


@pytest.mark.parametrize("kind", ["dispute", "refund"])
def test_a_reversal_of_a_renewal_the_balance_helped_pay_leaves_what_the_balance_paid_for(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, kind
):
    # given: the renewal ($99 plan + $45 overage = $144), $60 of it paid by the balance,
    # the card charged $84
    invoice, lot = _renewed_with_overage(
        customer, subscribed, stripe_standin, deliver, balance=6_000
    )
    charge = _charge(invoice)
    assert (invoice.total, invoice.amount_paid, charge["amount"]) == (14_400, 8_400, 8_400)
    assert lot.revenue == PLAN_PRICE

    # when: the member disputes the whole card charge, or finance refund all of it
    if kind == "dispute":
        stripe_standin.dispute(charge["id"])
    else:
        stripe_sdk.v1.refunds.create(params={"payment_intent": invoice.stripe_payment_intent_id})
    assert "failed" not in deliver()

    # then: the $84 returned the overage ($45) and $39 of the plan; the $60 the balance
    # paid of the plan keeps its credits: 39/99 of 12,000 taken, rounded down
    reversal = PaymentReversal.objects.get()
    assert (reversal.kind, reversal.amount) == (kind, 8_400)
    taken = PLAN_CREDITS * 3_900 // PLAN_PRICE
    assert (reversal.credits_clawed_back, reversal.credits_lost) == (taken, 0)
    lot.refresh_from_db()
    assert lot.remaining == PLAN_CREDITS - taken == 7_272_727_273
    assert stripe_reconcile().ok


@pytest.mark.parametrize("rest", ["refund", "dispute"])
def test_a_refund_of_the_overage_takes_no_plan_credits_and_the_rest_takes_them_all(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, admin_client, rest
):
    # given: the renewal, all $144 paid by card
    invoice, lot = _renewed_with_overage(customer, subscribed, stripe_standin, deliver)
    assert (invoice.total, _charge(invoice)["amount"]) == (14_400, 14_400)

    # when: finance refund the $45 of overage from the invoice's admin page
    response = admin_client.post(
        f"/admin/gymbilling/invoice/{invoice.pk}/refund/",
        {"amount": OVERAGE, "note": "Overage billed in error", "key": uuid.uuid4().hex},
    )
    assert response.status_code == 302

    # then: the plan was paid in full all the same: none of its credits are taken (the
    # refund is recorded, and freezes reselling as any refund does)
    refund = PaymentReversal.objects.get()
    assert (refund.amount, _reversed(refund)) == (OVERAGE, 0)
    lot.refresh_from_db()
    assert lot.remaining == PLAN_CREDITS
    assert BillingCustomer.objects.get(organization=invoice.organization).resale_frozen_at

    # when: the rest ($99, what paid the plan) is refunded, or disputed
    if rest == "refund":
        stripe_sdk.v1.refunds.create(params={"payment_intent": invoice.stripe_payment_intent_id})
    else:
        stripe_standin.dispute(_charge(invoice)["id"], amount=PLAN_PRICE)
    assert "failed" not in deliver()

    # then: it takes all 12,000, as a refund of the whole takes them
    later = PaymentReversal.objects.exclude(pk=refund.pk).get()
    assert (later.kind, later.amount, later.credits_clawed_back) == (rest, PLAN_PRICE, PLAN_CREDITS)
    lot.refresh_from_db()
    assert lot.remaining == 0
    assert stripe_reconcile().ok


@pytest.mark.parametrize("job", [False, True], ids=["idle", "job-holding"])
def test_an_overage_refund_that_fails_after_the_rest_was_refunded_gives_the_excess_back(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, caplog, job
):
    # given: the renewal all by card; its $45 of overage refunded (no credits taken), then
    # the $99 left (all 12,000 due back: the $144 is back), taken back at once, or with a
    # job holding 2,000 of them: 10,000 taken, 2,000 waiting for the job
    invoice, lot = _renewed_with_overage(customer, subscribed, stripe_standin, deliver)
    org = invoice.organization
    intent = invoice.stripe_payment_intent_id
    held = 2_000 * MICRO if job else 0
    if job:
        hold_place(organization=org, amount=held, key="job-running")
    overage = stripe_sdk.v1.refunds.create(params={"payment_intent": intent, "amount": OVERAGE})
    deliver()
    stripe_sdk.v1.refunds.create(params={"payment_intent": intent})
    deliver()
    first, rest = PaymentReversal.objects.order_by("pk")
    assert (_reversed(first), rest.credits_clawed_back, rest.credits_pending) == (
        0,
        PLAN_CREDITS - held,
        held,
    )

    # when: the overage's refund fails (its $45 is the gym's again)
    stripe_standin.fail_refund(overage.id)
    with caplog.at_level("ERROR", logger="gymbilling.services.payments"):
        assert "failed" not in deliver()

    # then: it gave back what it took (nothing); the $99 refund now keeps what $99 alone
    # paid for, 54/99 of the 12,000, rounded down, as if the $45 had never been refunded:
    # what the job holds stops waiting first, the rest comes back to the renewal's lot
    first.refresh_from_db()
    assert (first.reinstated_at is not None, first.credits_reinstated) == (True, 0)
    kept = PLAN_CREDITS * 5_400 // PLAN_PRICE
    rest.refresh_from_db()
    assert (rest.credits_clawed_back, rest.credits_pending, rest.credits_lost) == (kept, 0, 0)
    lot.refresh_from_db()
    assert lot.remaining == PLAN_CREDITS - kept
    balance = organization_balance(organization=org)
    assert balance.set_aside == 0
    assert not [r for r in caplog.records if r.name == "gymbilling.services.payments"]
    assert ledger_reconcile().ok and stripe_reconcile().ok

    # when: the overage's failure is delivered again
    rows = ledger_rows()
    for event in StripeEvent.objects.filter(type__startswith="charge.refund").order_by("pk"):
        stripe_event_process(event_pk=event.pk, force=True)

    # then: nothing more moved
    assert ledger_rows() == rows


def test_a_refit_without_the_amount_paid_recorded_is_logged_not_silent(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, caplog
):
    # given: the renewal's $45 of overage refunded, then the $99 left (all 12,000 taken
    # back), and the invoice's mirror of what was paid lost (0)
    invoice, _ = _renewed_with_overage(customer, subscribed, stripe_standin, deliver)
    overage, _ = _overage_then_rest_refunded(stripe_sdk, deliver, invoice)
    Invoice.objects.filter(pk=invoice.pk).update(amount_paid=0)

    # when: the overage's refund fails
    stripe_standin.fail_refund(overage.id)
    with caplog.at_level("ERROR", logger="gymbilling.services.payments"):
        assert "failed" not in deliver()

    # then: the $99 refund keeps what it took (nothing says what the payment paid), and
    # the skipped refit is logged as an error for finance to look into
    rest = PaymentReversal.objects.order_by("pk").last()
    assert (rest.credits_clawed_back, rest.credits_pending) == (PLAN_CREDITS, 0)
    [logged] = [r for r in caplog.records if r.name == "gymbilling.services.payments"]
    assert logged.levelname == "ERROR"
    assert invoice.stripe_payment_intent_id in logged.getMessage()


@pytest.mark.parametrize("job_ends", ["released", "captured"])
def test_what_a_refit_takes_again_that_old_work_now_holds_waits_for_that_work(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, grant, job_ends
):
    # given: the renewal all by card, and besides it 8,000 promotional credits expiring
    # first and 8,000 of the member's own that never expire. A job holds 8,000 (its
    # capture would burn the promotional ones first). The $45 of overage is refunded, then
    # the $99 (all 12,000 taken back at once: none of them held); then new work spends
    # the 8,000 promotional credits: the old job's capture would now burn the renewal's
    invoice, lot = _renewed_with_overage(customer, subscribed, stripe_standin, deliver)
    org = invoice.organization
    soon = timezone.now() + timedelta(days=3)
    grant(org, 8_000 * MICRO, source="promotion", paid=False, resellable=False, expires_at=soon)
    grant(org, 8_000 * MICRO, source="promotion", paid=False, resellable=False, expires_at=None)
    hold_place(organization=org, amount=8_000 * MICRO, key="job-old")
    intent = invoice.stripe_payment_intent_id
    overage = stripe_sdk.v1.refunds.create(params={"payment_intent": intent, "amount": OVERAGE})
    deliver()
    stripe_sdk.v1.refunds.create(params={"payment_intent": intent})
    deliver()
    rest = PaymentReversal.objects.order_by("pk").last()
    assert (rest.credits_clawed_back, rest.credits_pending) == (PLAN_CREDITS, 0)
    hold_place(organization=org, amount=8_000 * MICRO, key="job-new")
    hold_capture(key="job-new", amount=8_000 * MICRO)

    # when: the overage's refund fails: the $99 keeps 54/99 of the 12,000
    stripe_standin.fail_refund(overage.id)
    assert "failed" not in deliver()

    # then: what the old job holds of them it cannot take again now: it waits for the job,
    # set aside, rather than being booked as lost
    kept = PLAN_CREDITS * 5_400 // PLAN_PRICE
    rest.refresh_from_db()
    assert (rest.credits_clawed_back, rest.credits_pending, rest.credits_lost) == (
        4_000 * MICRO,
        kept - 4_000 * MICRO,
        0,
    )
    assert organization_balance(organization=org).set_aside == kept - 4_000 * MICRO
    assert ledger_reconcile().ok and stripe_reconcile().ok

    # when: the old job ends (gives all back, or spends all) and the pending sweep runs
    if job_ends == "released":
        hold_release(key="job-old")
    else:
        hold_capture(key="job-old", amount=8_000 * MICRO)
    payment_reversals_pending_settle()

    # then: the $99 took what its money paid for once the job gave it back; spent, it is
    # lost; nothing is set aside
    rest.refresh_from_db()
    taken = kept if job_ends == "released" else 4_000 * MICRO
    assert (rest.credits_clawed_back, rest.credits_pending, rest.credits_lost) == (
        taken,
        0,
        kept - taken,
    )
    lot.refresh_from_db()
    assert lot.remaining == (PLAN_CREDITS - kept if job_ends == "released" else 0)
    assert organization_balance(organization=org).set_aside == 0
    assert ledger_reconcile().ok and stripe_reconcile().ok


def test_a_wait_a_refit_raises_to_what_a_sweep_took_at_is_still_taken(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, grant
):
    # given: as above (8,000 promotional credits expiring first, a job holding 8,000 of
    # them), and a second job holding the 2,545.45... of the renewal's credits that the
    # refit below will leave waiting. The $45 of overage is refunded, then the $99: what
    # the second job holds waits for it; it gives it back and the sweep takes it
    invoice, lot = _renewed_with_overage(customer, subscribed, stripe_standin, deliver)
    org = invoice.organization
    soon = timezone.now() + timedelta(days=3)
    grant(org, 8_000 * MICRO, source="promotion", paid=False, resellable=False, expires_at=soon)
    grant(org, 8_000 * MICRO, source="promotion", paid=False, resellable=False, expires_at=None)
    kept = PLAN_CREDITS * 5_400 // PLAN_PRICE
    waits = kept - 4_000 * MICRO
    hold_place(organization=org, amount=8_000 * MICRO, key="job-old")
    hold_place(organization=org, amount=waits, key="job-short")
    overage, _ = _overage_then_rest_refunded(stripe_sdk, deliver, invoice)
    rest = PaymentReversal.objects.order_by("pk").last()
    assert rest.credits_pending == waits
    hold_release(key="job-short")
    payment_reversals_pending_settle()
    rest.refresh_from_db()
    assert (rest.credits_clawed_back, rest.credits_pending) == (PLAN_CREDITS, 0)

    # when: new work spends the promotional credits, and the overage's refund fails: the
    # $99 keeps 54/99 of the 12,000, and waits again for what the old job now holds of
    # them: as much as it waited for before the sweep
    hold_place(organization=org, amount=8_000 * MICRO, key="job-new")
    hold_capture(key="job-new", amount=8_000 * MICRO)
    stripe_standin.fail_refund(overage.id)
    assert "failed" not in deliver()
    rest.refresh_from_db()
    assert (rest.credits_clawed_back, rest.credits_pending) == (4_000 * MICRO, waits)

    # and the old job gives its credits back, and the pending sweep runs
    hold_release(key="job-old")
    payment_reversals_pending_settle()

    # then: the $99 took what its money paid for; nothing waits, nothing is set aside
    rest.refresh_from_db()
    assert (rest.credits_clawed_back, rest.credits_pending, rest.credits_lost) == (kept, 0, 0)
    lot.refresh_from_db()
    assert lot.remaining == PLAN_CREDITS - kept
    assert organization_balance(organization=org).set_aside == 0
    assert ledger_reconcile().ok and stripe_reconcile().ok


@pytest.mark.parametrize("fails", ["overage", "rest"])
def test_credits_a_refund_took_before_the_period_changed_come_back_within_the_cap(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, fails
):
    # given: the renewal all by card; its $45 of overage refunded, then the $99 left (all
    # 12,000 taken back), then the period ends: nothing of the renewal's lot left to trim
    # (its 3,000 cap unused)
    invoice, lot = _renewed_with_overage(customer, subscribed, stripe_standin, deliver)
    overage, rest = _overage_then_rest_refunded(stripe_sdk, deliver, invoice)
    stripe_standin.advance(invoice.subscription.stripe_subscription_id)
    assert "failed" not in deliver()
    lot.refresh_from_db()
    assert lot.remaining == 0

    # when: the overage's refund fails (the $99 keeps 54/99 of the 12,000, the rest comes
    # back), or the $99's (all 12,000 come back)
    stripe_standin.fail_refund((overage if fails == "overage" else rest).id)
    assert "failed" not in deliver()

    # then: what comes back to the ended period's lot fills the cap the rollover left
    # unused, no more: the member carries 3,000 of it over, the rest expired
    later = PaymentReversal.objects.order_by("pk").last()
    if fails == "overage":
        assert later.credits_clawed_back == PLAN_CREDITS * 5_400 // PLAN_PRICE
    else:
        assert later.reinstated_at is not None
    lot.refresh_from_db()
    assert lot.remaining == 3_000 * MICRO
    assert ledger_reconcile().ok and stripe_reconcile().ok

    # when: the $99's refund fails too, after the overage's
    if fails == "overage":
        stripe_standin.fail_refund(rest.id)
        assert "failed" not in deliver()

    # then: the 54/99 it kept taken come back past a cap already full: all expire
    lot.refresh_from_db()
    assert lot.remaining == 3_000 * MICRO
    assert ledger_reconcile().ok and stripe_reconcile().ok


@pytest.mark.parametrize(
    ("price", "charge", "total", "returned", "taken"),
    [
        # a pack ($12.00, 1,000 credits): a quarter back, then all
        (1_200, 1_200, 1_200, 300, 250 * MICRO),
        (1_200, 1_200, 1_200, 1_200, 1_000 * MICRO),
        # Pro all by card: the overage first, then the plan
        (9_900, 14_400, 14_400, 4_500, 0),
        (9_900, 14_400, 14_400, 4_600, 1_000 * MICRO * 100 // 9_900),
        (9_900, 14_400, 14_400, 14_400, 1_000 * MICRO),
        # Pro, $60 by the balance: the card's $84 paid $39 of the plan
        (9_900, 8_400, 14_400, 8_400, 1_000 * MICRO * 3_900 // 9_900),
        # the balance paid the whole plan: the card only the overage
        (9_900, 4_000, 14_400, 4_000, 0),
        # a debt of $5.00 carried in: the card paid it too, first given back
        (9_900, 10_400, 9_900, 500, 0),
        (9_900, 10_400, 9_900, 10_400, 1_000 * MICRO),
        # more than the charge (a refund and a dispute overlapping): no more than it paid
        (9_900, 9_900, 9_900, 20_000, 1_000 * MICRO),
    ],
)
def test_the_credits_taken_back_are_those_the_money_returned_paid_for(
    price, charge, total, returned, taken
):
    assert (
        reversal_credits(
            credits=1_000 * MICRO, price=price, charge=charge, total=total, returned=returned
        )
        == taken
    )
