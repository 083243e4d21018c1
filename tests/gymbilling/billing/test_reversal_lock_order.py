"""One lock order for refunds and disputes of a payment and the ledger (the market's, in
gymbilling.market.services): a reversal being applied, which settles the charge's earlier
reversals first, meets an order's release and the pending sweep, each on a connection of
its own, where the reversal used to hold the wallet and wait for a reversal row that the
other held while waiting for the wallet; and a subscription's sync that ends it and rolls
its period over (the rollover takes the pending refunds' rows) meets the pending sweep,
where the sync used to lock the wallet first, ending the overage allowance. Both go
through, and the ledger is right."""

from __future__ import annotations

import threading

import pytest
from django.utils import timezone

from gymbilling import stripe_client
from gymbilling.market import rollover
from gymbilling.market.services import listing_create, order_release, order_reserve
from gymbilling.models import CheckoutSession, Invoice, PaymentReversal, RolloverCarry
from gymbilling.services import payment_reversals_pending_settle, payments
from gymbilling.services.events import charge_refund_refresh, subscription_refresh
from metering.models import MICRO, CreditLot, LedgerAccount
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import hold_capture, hold_place, hold_release
from tests.factories import OrganizationFactory
from tests.helpers import no_deadlock_retries, on_own_connection, pause_after, run_against_paused


def charge_of(payment_intent_id: str) -> str:
    charge = stripe_client.payment_intent_retrieve(payment_intent_id)["latest_charge"]
    return charge["id"] if isinstance(charge, dict) else charge


def taken_pending_lost(reversal: PaymentReversal) -> tuple[int, int, int]:
    reversal.refresh_from_db()
    return (reversal.credits_clawed_back, reversal.credits_pending, reversal.credits_lost)


def wallet_claim(org) -> int:
    return LedgerAccount.objects.get(organization=org, kind="wallet").claimed


def refund(stripe_sdk, charge_id: str, cents: int, deliver=None) -> None:
    """`cents` of the charge refunded at Stripe; applied now when `deliver` is given."""
    stripe_sdk.v1.refunds.create(params={"charge": charge_id, "amount": cents})
    if deliver is not None:
        assert "failed" not in deliver()


@pytest.mark.django_db(transaction=True)
def test_a_refund_and_an_order_s_release_of_the_refunded_credits_do_not_deadlock(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, monkeypatch
):
    # given: Basic ($20.00 for 2,000 credits); 800 listed and all reserved by a buyer's
    # order not paid yet, 1,000 held by a running job, 200 free. $5.00 refunded: it took
    # the 200 and waits for 300 the job holds. $10.00 more: its 1,000 found nothing free,
    # 700 more wait for the job, and the 300 reserved are lost until they come home
    sub = subscribed("basic")
    org = customer.organization
    listing_create(seller=org, quantity=800 * MICRO, price_per_1k=500, currency="usd")
    order = order_reserve(
        buyer=OrganizationFactory(), quantity=800 * MICRO, max_price_per_1k=500, currency="usd"
    )
    hold_place(organization=org, amount=1_000 * MICRO, key="job-running")
    charge_id = charge_of(sub.invoices.get().stripe_payment_intent_id)
    refund(stripe_sdk, charge_id, 500, deliver)
    refund(stripe_sdk, charge_id, 1_000, deliver)
    first, second = PaymentReversal.objects.order_by("pk")
    assert taken_pending_lost(first) == (200 * MICRO, 300 * MICRO, 0)
    assert taken_pending_lost(second) == (0, 700 * MICRO, 300 * MICRO)

    # The last $5.00 is refunded at Stripe and applied on a connection of its own: it
    # settles the first refund (the wallet's lock taken) and pauses there, before it
    # settles the second (whose row the release locks before the wallet).
    refund(stripe_sdk, charge_id, 500)
    no_deadlock_retries(monkeypatch)
    paused, resume = pause_after(monkeypatch, payments, "claim_settle", thread="refund")
    errors: list = []
    refunding = threading.Thread(
        name="refund",
        target=on_own_connection,
        args=(lambda: charge_refund_refresh(charge_id=charge_id), errors),
    )
    refunding.start()
    assert paused.wait(timeout=60)

    # when: the buyer's reservation runs out meanwhile, and the order is released
    releasing = threading.Thread(
        name="release",
        target=on_own_connection,
        args=(
            lambda: order_release(order_id=order.pk, status="expired", code="reservation_timeout"),
            errors,
        ),
    )
    run_against_paused(
        releasing, paused=refunding, resume=resume, what="the release to wait for the refund"
    )

    # then: both went through, without a deadlock; the 800 that came home all went back
    # (300 to the second refund, the last refund's 500 to it): the member keeps only what
    # the job holds, all of it waited for
    assert errors == []
    order.refresh_from_db()
    assert order.status == "expired"
    last = PaymentReversal.objects.order_by("pk").last()
    assert (last.amount, taken_pending_lost(last)) == (500, (500 * MICRO, 0, 0))
    assert taken_pending_lost(second) == (300 * MICRO, 700 * MICRO, 0)
    balance = organization_balance(organization=org)
    assert (balance.available, balance.held, balance.escrowed) == (0, 1_000 * MICRO, 0)
    assert wallet_claim(org) == 1_000 * MICRO
    assert ledger_reconcile().ok

    # when: the job ends without using them, and the sweep runs
    hold_release(key="job-running")
    assert payment_reversals_pending_settle() == 1_000 * MICRO

    # then: nothing of the refunded payment is left, and nothing was lost
    assert organization_balance(organization=org).total == 0
    assert sum(PaymentReversal.objects.values_list("credits_lost", flat=True)) == 0
    assert ledger_reconcile().ok


@pytest.mark.django_db(transaction=True)
def test_a_refund_and_the_pending_sweep_do_not_deadlock(
    customer, catalog, stripe_standin, stripe_sdk, deliver, grant, monkeypatch, caplog
):
    # given: a 1,000-credit pack for $12.00 beside the member's own 500; 400 of it spent,
    # 600 held by a running job. $3.00 refunded: its 250 wait for the job; $3.00 more:
    # 250 more wait for it
    org = customer.organization
    grant(org, 500 * MICRO, source="promotion", paid=False, resellable=False, expires_at=None)
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    stripe_standin.pay_checkout(response.json()["session_id"])
    assert "failed" not in deliver()
    hold_place(organization=org, amount=400 * MICRO, key="job-spent")
    hold_capture(key="job-spent", amount=400 * MICRO)
    hold_place(organization=org, amount=600 * MICRO, key="job-running")
    charge_id = charge_of(CheckoutSession.objects.get().stripe_payment_intent_id)
    refund(stripe_sdk, charge_id, 300, deliver)
    refund(stripe_sdk, charge_id, 300, deliver)
    first, second = PaymentReversal.objects.order_by("pk")
    assert taken_pending_lost(first) == (0, 250 * MICRO, 0)
    assert taken_pending_lost(second) == (0, 250 * MICRO, 0)

    # The pending sweep, while the job runs, settles the first refund (nothing came back
    # yet) and pauses once it has locked the second's row, before the wallet.
    paused, resume = pause_after(
        monkeypatch,
        payments,
        "reversal_lots",
        thread="sweep",
        when=lambda reversal: reversal.pk == second.pk,
    )
    errors: list = []
    sweeping = threading.Thread(
        name="sweep",
        target=on_own_connection,
        args=(payment_reversals_pending_settle, errors),
    )
    sweeping.start()
    assert paused.wait(timeout=60)

    # when: $3.00 more is refunded and applied meanwhile, on a connection of its own
    refund(stripe_sdk, charge_id, 300)
    refunding = threading.Thread(
        name="refund",
        target=on_own_connection,
        args=(lambda: charge_refund_refresh(charge_id=charge_id), errors),
    )
    run_against_paused(
        refunding, paused=sweeping, resume=resume, what="the refund to wait for the sweep"
    )

    # then: both went through, without a deadlock (the sweep logs one it lost); the
    # last refund waits for the 100 the job holds beyond the first two's 500, and the
    # rest of its 250 was spent
    assert errors == []
    assert "failed" not in caplog.text
    last = PaymentReversal.objects.order_by("pk").last()
    assert (last.amount, taken_pending_lost(last)) == (300, (0, 100 * MICRO, 150 * MICRO))
    assert taken_pending_lost(first) == (0, 250 * MICRO, 0)
    assert taken_pending_lost(second) == (0, 250 * MICRO, 0)
    assert wallet_claim(org) == 600 * MICRO
    assert ledger_reconcile().ok

    # when: the job ends without using them, and the sweep runs
    hold_release(key="job-running")
    assert payment_reversals_pending_settle() == 600 * MICRO

    # then: the job's 600 went back to the three refunds; the member keeps their own 500
    assert taken_pending_lost(first) == (250 * MICRO, 0, 0)
    assert taken_pending_lost(second) == (250 * MICRO, 0, 0)
    assert taken_pending_lost(last) == (100 * MICRO, 0, 150 * MICRO)
    assert wallet_claim(org) == 0
    assert organization_balance(organization=org).total == 500 * MICRO
    assert ledger_reconcile().ok


@pytest.mark.django_db(transaction=True)
def test_the_rollover_s_claim_fitted_while_another_payment_s_refund_settles_stays_whole(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, monkeypatch
):
    # given: Pro (12,000 credits for $99, 3,000 roll over); a job holds all 12,000 of the
    # first period. $50 of the first period's payment is refunded: its 6,060 wait for the
    # job. The period ends: 9,000 over the cap, the rollover sets aside the 2,939 over the
    # cap of what the refund leaves. The job gives the 12,000 back; new work spends the
    # renewal's 12,000, then the renewal is refunded (all of it spent: lost)
    sub = subscribed("pro")
    org = customer.organization
    hold_place(organization=org, amount=12_000 * MICRO, key="job-running")
    first = Invoice.objects.get(subscription=sub, billing_reason="subscription_create")
    refund(stripe_sdk, charge_of(first.stripe_payment_intent_id), 5_000, deliver)
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()
    hold_release(key="job-running")
    waiting = PaymentReversal.objects.get()
    pending = 12_000 * MICRO * 5_000 // 9_900
    assert taken_pending_lost(waiting) == (0, pending, 0)
    carry = RolloverCarry.objects.get(organization=org)
    assert (carry.held_over, carry.held_claimed) == (9_000 * MICRO, 9_000 * MICRO - pending)
    hold_place(organization=org, amount=12_000 * MICRO, key="job-new")
    hold_capture(key="job-new", amount=12_000 * MICRO)
    renewal = Invoice.objects.get(subscription=sub, billing_reason="subscription_cycle")
    renewal_refund = stripe_sdk.v1.refunds.create(
        params={"payment_intent": renewal.stripe_payment_intent_id}
    )
    assert "failed" not in deliver()
    spent = PaymentReversal.objects.exclude(pk=waiting.pk).get()
    assert taken_pending_lost(spent) == (0, 0, 12_000 * MICRO)

    # The renewal's refund fails, and is given back on a connection of its own: it fits
    # the rollover's claim and pauses once it has read what the refunds wait for of the
    # rollover's lots.
    stripe_standin.fail_refund(renewal_refund.id)
    paused, resume = pause_after(monkeypatch, rollover, "_reversals_pending_on", thread="refund")
    errors: list = []
    refunding = threading.Thread(
        name="refund",
        target=on_own_connection,
        args=(lambda: payments.payment_reversal_reinstate(key=spent.key), errors),
    )
    refunding.start()
    assert paused.wait(timeout=60)

    # when: the pending sweep meanwhile takes back what the first refund waited for
    sweeping = threading.Thread(
        name="sweep", target=on_own_connection, args=(payment_reversals_pending_settle, errors)
    )
    run_against_paused(
        sweeping, paused=refunding, resume=resume, what="the sweep to wait for the refund"
    )

    # then: the first refund took its 6,060; the rollover still sets aside the 2,939 it
    # leaves over the cap, so no new work spends what its sweep expires
    assert errors == []
    spent.refresh_from_db()
    assert spent.reinstated_at is not None
    assert taken_pending_lost(waiting) == (pending, 0, 0)
    carry.refresh_from_db()
    assert carry.held_claimed == 9_000 * MICRO - pending
    assert wallet_claim(org) == carry.held_claimed
    assert ledger_reconcile().ok


@pytest.mark.django_db(transaction=True)
def test_the_sync_of_an_ended_subscription_s_new_period_and_the_pending_sweep_do_not_deadlock(
    customer, subscribed, grant, stripe_standin, stripe_sdk, deliver, monkeypatch, caplog
):
    # given: Pro (12,000 credits for $99.00, 3,000 roll over, a 20,000-credit overage
    # allowance beside them) and the member's own 500; a job holds all 12,000 of the
    # period. $50.00 of the period's payment refunded: its 6,060.606060 wait for the job
    sub = subscribed("pro")
    org = customer.organization
    grant(org, 500 * MICRO, source="promotion", paid=False, resellable=False, expires_at=None)
    [plan_lot] = CreditLot.objects.filter(organization=org, source="subscription")
    [allowance] = CreditLot.objects.filter(organization=org, source="overage")
    assert allowance.remaining == 20_000 * MICRO
    hold_place(organization=org, amount=12_000 * MICRO, key="job-running")
    first = Invoice.objects.get(subscription=sub, billing_reason="subscription_create")
    refund(stripe_sdk, charge_of(first.stripe_payment_intent_id), 5_000, deliver)
    waiting = PaymentReversal.objects.get()
    pending = 12_000 * MICRO * 5_000 // 9_900
    assert taken_pending_lost(waiting) == (0, pending, 0)
    ended = sub.current_period_end

    # Stripe renews the subscription and it is canceled at once, before either is applied:
    # its sync ends it (the overage allowance with it) and rolls its period over. The
    # pending sweep locks the refund's row and pauses there, before the wallet.
    stripe_standin.advance(sub.stripe_subscription_id)
    stripe_sdk.v1.subscriptions.cancel(sub.stripe_subscription_id)
    no_deadlock_retries(monkeypatch)
    paused, resume = pause_after(monkeypatch, payments, "reversal_lots", thread="sweep")
    errors: list = []
    sweeping = threading.Thread(
        name="sweep", target=on_own_connection, args=(payment_reversals_pending_settle, errors)
    )
    sweeping.start()
    assert paused.wait(timeout=60)

    # when: the subscription's event is applied meanwhile, on a connection of its own
    syncing = threading.Thread(
        name="sync",
        target=on_own_connection,
        args=(lambda: subscription_refresh(subscription_id=sub.stripe_subscription_id), errors),
    )
    run_against_paused(
        syncing, paused=sweeping, resume=resume, what="the sync to wait for the sweep"
    )

    # then: both went through, without a deadlock (the sweep logs one it lost). The sweep
    # found the job still holding what the refund waits for; the rollover left the job
    # the 12,000 it holds, setting aside the 9,000 over the cap less the refund's; the
    # allowance ended, all but the 12,000 the job now burns first of it expired at once.
    # The member may spend their own 500 and the cap's 3,000
    assert errors == []
    assert "failed" not in caplog.text
    sub.refresh_from_db()
    assert (sub.status, sub.current_period_start) == ("canceled", ended)
    assert taken_pending_lost(waiting) == (0, pending, 0)
    carry = RolloverCarry.objects.get(organization=org)
    assert (carry.held_over, carry.held_claimed) == (9_000 * MICRO, 9_000 * MICRO - pending)
    plan_lot.refresh_from_db()
    allowance.refresh_from_db()
    assert (plan_lot.remaining, allowance.remaining) == (12_000 * MICRO, 12_000 * MICRO)
    assert allowance.expires_at <= timezone.now()
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.held, balance.set_aside) == (
        12_500 * MICRO,
        12_000 * MICRO,
        9_000 * MICRO,
    )
    assert balance.available == 3_500 * MICRO
    assert wallet_claim(org) == 9_000 * MICRO
    assert ledger_reconcile().ok

    # when: the job ends without using them, and the sweeps run
    hold_release(key="job-running")
    assert payment_reversals_pending_settle() == pending
    assert rollover.rollover_holds_settle(now=timezone.now()) == 9_000 * MICRO - pending

    # then: the refund took its 6,060.606060 and nothing was lost; the member keeps the
    # cap of the period and their own 500, nothing set aside
    assert taken_pending_lost(waiting) == (pending, 0, 0)
    plan_lot.refresh_from_db()
    assert plan_lot.remaining == 3_000 * MICRO
    balance = organization_balance(organization=org)
    assert (balance.wallet, balance.held, balance.set_aside) == (3_500 * MICRO, 0, 0)
    assert wallet_claim(org) == 0
    assert ledger_reconcile().ok
