"""A dispute the gym wins: Stripe reinstates the funds, so what the dispute took
from a subscription payment comes back, once, whichever of its events comes first.

Stripe is the local stand-in over HTTP; its events are processed as the webhook
would (`deliver`), and every ledger invariant is checked after each test.
"""

from __future__ import annotations

import pytest

from accounts.errors import ApplicationError
from gymbilling.models import BillingCustomer, PaymentReversal, RolloverCarry, StripeEvent
from gymbilling.reconcile import stripe_reconcile
from gymbilling.services import payment_reversals_pending_settle, stripe_event_process
from metering.models import MICRO, CreditLot, LedgerAccount
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import hold_capture, hold_place, hold_release
from tests.helpers import ledger_rows, system_balance

pytestmark = pytest.mark.django_db

WON_EVENTS = ["charge.dispute.funds_reinstated", "charge.dispute.closed"]


def spend(org, credits: int, key: str) -> None:
    hold_place(organization=org, amount=credits, key=key)
    hold_capture(key=key, amount=credits)


def invoice_charge(sub, stripe_sdk) -> str:
    """The charge that paid the subscription's first invoice."""
    intent = stripe_sdk.v1.payment_intents.retrieve(sub.invoices.get().stripe_payment_intent_id)
    charge = intent.latest_charge
    return charge if isinstance(charge, str) else charge.id


def wallet_claim(org) -> int:
    return LedgerAccount.objects.get(organization=org, kind="wallet").claimed


def taken_pending_lost_back(reversal: PaymentReversal) -> tuple[int, int, int, int]:
    reversal.refresh_from_db()
    return (
        reversal.credits_clawed_back,
        reversal.credits_pending,
        reversal.credits_lost,
        reversal.credits_reinstated,
    )


def test_a_won_dispute_gives_back_the_credits_it_took_back(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Basic (2,000 credits), 500 spent, then the charge disputed:
    # 1,500 taken back, 500 lost, reselling frozen
    sub = subscribed("basic")
    org = customer.organization
    spend(org, 500 * MICRO, key="job-1")
    lot = CreditLot.objects.get(organization=org, source="subscription")
    dispute = stripe_standin.dispute(invoice_charge(sub, stripe_sdk))
    assert deliver() == ["processed"]
    reversal = PaymentReversal.objects.get(kind="dispute")
    assert taken_pending_lost_back(reversal) == (1_500 * MICRO, 0, 500 * MICRO, 0)
    assert organization_balance(organization=org).available == 0

    # when: the gym wins it, and Stripe's events of the win are processed
    stripe_standin.close_dispute(dispute["id"], status="won")
    assert deliver() == ["processed", "processed"]

    # then: the 1,500 credits are back in the lot they were taken from, with
    # its expiry and flags (no new lot), and the adjustments account nets to zero
    assert organization_balance(organization=org).available == 1_500 * MICRO
    assert list(
        CreditLot.objects.filter(organization=org, source="subscription").values_list(
            "pk", "remaining", "expires_at", "paid", "resellable"
        )
    ) == [(lot.pk, 1_500 * MICRO, lot.expires_at, True, True)]
    assert system_balance("adjustments") == 0
    # the reversal says it was undone: nothing lost any more, nothing pending
    reversal.refresh_from_db()
    assert reversal.reinstated_at is not None
    assert taken_pending_lost_back(reversal) == (1_500 * MICRO, 0, 0, 1_500 * MICRO)
    # reselling stays frozen until finance lifts it
    assert BillingCustomer.objects.get(organization=org).resale_frozen_at is not None
    assert ledger_reconcile().ok and stripe_reconcile().ok

    # when: the win's events are delivered again, and the dispute's first one too
    rows, reinstated_at = ledger_rows(), reversal.reinstated_at
    for event in StripeEvent.objects.filter(type__startswith="charge.dispute.").order_by("pk"):
        assert stripe_event_process(event_pk=event.pk, force=True) == "processed"

    # then: nothing more moved
    assert ledger_rows() == rows
    assert organization_balance(organization=org).available == 1_500 * MICRO
    reversal.refresh_from_db()
    assert reversal.reinstated_at == reinstated_at
    assert taken_pending_lost_back(reversal) == (1_500 * MICRO, 0, 0, 1_500 * MICRO)


def test_a_won_dispute_stops_taking_back_what_running_work_held(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Basic, 500 spent, and a job holding 300 when the charge is disputed:
    # 1,200 taken back, 300 pending on the job, 500 lost
    sub = subscribed("basic")
    org = customer.organization
    spend(org, 500 * MICRO, key="job-1")
    hold_place(organization=org, amount=300 * MICRO, key="job-2")
    dispute = stripe_standin.dispute(invoice_charge(sub, stripe_sdk))
    deliver()
    reversal = PaymentReversal.objects.get()
    assert taken_pending_lost_back(reversal) == (1_200 * MICRO, 300 * MICRO, 500 * MICRO, 0)

    # when: the dispute is won, then the job ends without using its credits
    stripe_standin.close_dispute(dispute["id"], status="won")
    deliver()
    hold_release(key="job-2")

    # then: the sweep takes nothing: all 1,500 unspent credits are the customer's
    assert payment_reversals_pending_settle() == 0
    assert organization_balance(organization=org).available == 1_500 * MICRO
    assert taken_pending_lost_back(reversal) == (1_200 * MICRO, 0, 0, 1_200 * MICRO)


@pytest.mark.parametrize("fast_path", [True, False], ids=["sql", "orm"])
def test_a_won_dispute_drops_the_claim_on_what_running_work_gave_back(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, settings, fast_path
):
    settings.METERING_FAST_PATH = fast_path  # the placement statement and post() agree
    # given: Basic, 500 spent, and a job holding 300 when the charge is
    # disputed: the 300 pending, claimed on the wallet; then the job ends
    # without using them
    sub = subscribed("basic")
    org = customer.organization
    spend(org, 500 * MICRO, key="job-1")
    hold_place(organization=org, amount=300 * MICRO, key="job-2")
    dispute = stripe_standin.dispute(invoice_charge(sub, stripe_sdk))
    deliver()
    hold_release(key="job-2")
    assert wallet_claim(org) == 300 * MICRO
    with pytest.raises(ApplicationError) as refused:
        hold_place(organization=org, amount=300 * MICRO, key="job-3")
    assert refused.value.code == "insufficient_credits"

    # when: the gym wins the dispute
    stripe_standin.close_dispute(dispute["id"], status="won")
    deliver()

    # then: nothing is claimed any more, and all 1,500 unspent credits can be held
    assert wallet_claim(org) == 0
    assert taken_pending_lost_back(PaymentReversal.objects.get()) == (
        1_200 * MICRO,
        0,
        0,
        1_200 * MICRO,
    )
    hold_place(organization=org, amount=1_500 * MICRO, key="job-4")
    assert payment_reversals_pending_settle() == 0
    assert ledger_reconcile().ok


def test_a_dispute_won_before_its_events_were_processed_moves_nothing(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Basic with a quarter of its charge refunded (taken back: 500 credits)
    sub = subscribed("basic")
    org = customer.organization
    charge = invoice_charge(sub, stripe_sdk)
    amount = stripe_sdk.v1.charges.retrieve(charge).amount
    stripe_sdk.v1.refunds.create(params={"charge": charge, "amount": amount // 4})
    deliver()
    refund = PaymentReversal.objects.get(kind="refund")
    assert refund.credits_clawed_back == 500 * MICRO
    rows = ledger_rows()

    # when: the rest is disputed and won at Stripe before any of the dispute's
    # events was processed, then they all are
    dispute = stripe_standin.dispute(charge, amount=amount - amount // 4)
    stripe_standin.close_dispute(dispute["id"], status="won")
    statuses = deliver()

    # then: the dispute took nothing, so it gives nothing back; the refund stands
    assert statuses == ["ignored", "ignored", "ignored"]
    assert ledger_rows() == rows
    assert list(PaymentReversal.objects.values_list("key", "reinstated_at")) == [(refund.key, None)]
    assert organization_balance(organization=org).available == 1_500 * MICRO


def plan_credits(org) -> int:
    """Unexpired subscription credits in the wallet."""
    from django.db.models import Sum
    from django.utils import timezone

    return (
        CreditLot.objects.filter(
            organization=org,
            source="subscription",
            account__kind="wallet",
            remaining__gt=0,
            expires_at__gt=timezone.now(),
        ).aggregate(s=Sum("remaining"))["s"]
        or 0
    )


def test_a_dispute_won_after_a_rollover_gives_back_no_more_than_its_cap(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Pro (12,000 credits a month; 25%, 3,000, roll over), its first charge
    # disputed: all 12,000 taken back
    sub = subscribed("pro")
    org = customer.organization
    [old_lot] = CreditLot.objects.filter(organization=org, source="subscription")
    dispute = stripe_standin.dispute(invoice_charge(sub, stripe_sdk))
    assert "failed" not in deliver()
    assert plan_credits(org) == 0
    # and the period renews while the dispute is open: the rollover finds nothing
    # to trim, and the renewal brings a new month
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()
    assert plan_credits(org) == 12_000 * MICRO
    expiry_before = system_balance("expiry")

    # when: the gym wins the dispute
    stripe_standin.close_dispute(dispute["id"], status="won")
    assert "failed" not in deliver()

    # then: of the 12,000 given back to their lot, the 3,000 the cap carries over
    # stay and 9,000 expire, as if they had been home when the period ended
    reversal = PaymentReversal.objects.get(kind="dispute")
    assert reversal.reinstated_at is not None
    assert plan_credits(org) == (12_000 + 3_000) * MICRO
    old_lot.refresh_from_db()
    assert old_lot.remaining == 3_000 * MICRO
    assert system_balance("expiry") - expiry_before == 9_000 * MICRO
    assert ledger_reconcile().ok and stripe_reconcile().ok

    # when: the win's events are delivered again
    rows = ledger_rows()
    for event in StripeEvent.objects.filter(type__startswith="charge.dispute.").order_by("pk"):
        assert stripe_event_process(event_pk=event.pk, force=True) == "processed"

    # then: nothing more moved
    assert ledger_rows() == rows
    assert plan_credits(org) == (12_000 + 3_000) * MICRO


def test_a_lost_dispute_is_final_and_no_rollover_waits_for_its_credits(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Pro's first charge disputed, all 12,000 plan credits taken back
    sub = subscribed("pro")
    org = customer.organization
    dispute = stripe_standin.dispute(invoice_charge(sub, stripe_sdk))
    assert "failed" not in deliver()

    # when: the gym loses the dispute, then the period renews
    stripe_standin.close_dispute(dispute["id"], status="lost")
    assert "failed" not in deliver()
    reversal = PaymentReversal.objects.get(kind="dispute")
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()

    # then: the reversal is marked lost (final, nothing given back), and the rollover
    # recorded no carry waiting for credits that will never come back
    reversal.refresh_from_db()
    assert reversal.lost_at is not None and reversal.reinstated_at is None
    assert reversal.credits_clawed_back == 12_000 * MICRO
    assert not RolloverCarry.objects.filter(organization=org).exists()
    assert ledger_reconcile().ok
