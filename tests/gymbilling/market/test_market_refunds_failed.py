"""A refund of a marketplace purchase that Stripe fails after making it (the buyer's card
was closed): the money came back to the gym, so what that refund took back goes back
where it was, once: the fee to the platform, the seller's share to their proceeds (or
the loss booked for a share already paid out recovered), the buyer's credits to their
lots; finance's figures stop counting it.

Stripe is the local stand-in over HTTP: refunds are made there as finance would in the
dashboard and failed there (`fail_refund`); their events are processed as the webhook
would (`deliver`), reading the refunds back from the stand-in.
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from gymbilling import stripe_client
from gymbilling.market.selectors import organization_earnings
from gymbilling.market.services import market_reversal_handle, orders_expire, payouts_run
from gymbilling.models import (
    BillingCustomer,
    EventStatus,
    MarketPayout,
    MarketReversal,
    MoneyTransaction,
    ProceedsState,
    StripeEvent,
)
from gymbilling.selectors import market_fee_income, reversals_by_customer
from gymbilling.services import stripe_event_process
from gymbilling.services.events import EventRetryLater
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from tests.gymbilling.market.conftest import money, reopened_then_paying_again, sold
from tests.gymbilling.test_admin import run_action
from tests.helpers import credits, ledger_rows

pytestmark = pytest.mark.django_db

LATER = timedelta(days=8)  # past the holding period
FAILURE_EVENTS = ["charge.refund.updated", "refund.updated", "refund.failed"]
CHANGELIST = "/admin/gymbilling/marketorder/"


def refund_at_stripe(order, amount: int) -> dict:
    """`amount` of the order's payment refunded at the stand-in (its events to `deliver`)."""
    return stripe_client.refund_create(
        key=f"dashboard:{uuid.uuid4()}",
        payment_intent=order.stripe_payment_intent_id,
        amount=amount,
    )


# `books` of `sold`'s order with 62 of its 124 refunded: fee 6 and the seller's 56 taken
# back, and 50 of the buyer's 100 credits.
REFUNDED_62 = {
    "seller_pending": 112 - 56,
    "seller_available": 0,
    "platform_fees": 6,
    "buyer_clearing": -62,
    "losses": 0,
    "payouts": 0,
    "buyer_credits": credits(50),
}


# `books` of `sold`'s order once a refund that failed is undone, 56 of the seller's 112
# paid out before it: the fee the platform's, the buyer's 100 credits back, the seller
# owed the other 56; and the seller's `earnings` then.
HALF_PAID_OUT = {
    "seller_pending": 0,
    "seller_available": 56,
    "platform_fees": 12,
    "buyer_clearing": -124,
    "losses": 0,
    "payouts": 56,
    "buyer_credits": credits(100),
}
HALF_PAID_OUT_EARNINGS = {
    "reversed": 0,
    "earned": 112,
    "pending": 0,
    "available": 56,
    "paid_out": 56,
}


def books(seller, buyer) -> dict[str, int]:
    """Every balance a refund of `sold`'s order moves, in both ledgers."""
    return {
        "seller_pending": money("seller_pending", organization=seller),
        "seller_available": money("seller_available", organization=seller),
        "platform_fees": money("platform_fees"),
        "buyer_clearing": money("buyer_clearing"),
        "losses": money("losses"),
        "payouts": money("payouts"),
        "buyer_credits": organization_balance(organization=buyer).available,
    }


def report(buyer) -> dict[str, int]:
    """Finance's figures for today: the buyer's marketplace reversals, and fee income."""
    start, end = timezone.now() - timedelta(days=1), timezone.now() + timedelta(days=1)
    rows = [row for row in reversals_by_customer(start=start, end=end) if row["customer"]]
    [buyer_row] = [row for row in rows if row["customer"] == buyer.slug] or [
        {"market_reversed": 0, "market_fees_reversed": 0, "market_losses": 0}
    ]
    [income] = market_fee_income(start=start, end=end) or [
        {"fees_returned": 0, "fees_reinstated": 0, "fee_income": 0}
    ]
    return {
        "reversed": buyer_row["market_reversed"],
        "fees_reversed": buyer_row["market_fees_reversed"],
        "losses": buyer_row["market_losses"],
        "fees_returned": income["fees_returned"],
        "fees_reinstated": income["fees_reinstated"],
        "fee_income": income["fee_income"],
    }


def earnings(seller) -> dict[str, int]:
    [figures] = organization_earnings(organization=seller)
    return {
        "reversed": figures.reversed,
        "earned": figures.earned,
        "pending": figures.pending,
        "available": figures.available,
        "paid_out": figures.paid_out,
    }


def redeliver(*types: str) -> None:
    for event in StripeEvent.objects.filter(type__in=types).order_by("pk"):
        stripe_event_process(event_pk=event.pk, force=True)


def test_a_partial_refund_that_fails_puts_both_ledgers_back_once(
    market_stripe, seller, buyer, deliver
):
    # given: 100 credits sold for 124 (fee 12, the seller's 112 pending); 62 refunded:
    # fee 6 and the seller's 56 taken back, and 50 of the buyer's credits
    order = sold(market_stripe, seller, buyer)
    deliver()
    before = books(seller, buyer)
    refund = refund_at_stripe(order, 62)
    assert deliver() == ["processed", "ignored"]  # charge.refunded, refund.created
    reversal = MarketReversal.objects.get()
    assert (reversal.amount, reversal.fee_reversed, reversal.seller_reversed) == (62, 6, 56)
    assert books(seller, buyer) == before | {
        "seller_pending": 56,
        "platform_fees": 6,
        "buyer_clearing": -62,
        "buyer_credits": credits(50),
    }
    assert report(buyer)["reversed"] == 62

    # when: Stripe fails the refund, and its events are processed
    assert market_stripe.standin.fail_refund(refund["id"])["status"] == "failed"
    assert deliver() == ["processed", "processed", "processed"]

    # then: every balance is what it was before the refund, the fill owes the seller
    # all 112 again, and the refund says it was undone
    assert books(seller, buyer) == before
    fill = order.fills.get()
    assert (fill.refunded, fill.seller_reversed, fill.proceeds) == (0, 0, ProceedsState.PENDING)
    reversal.refresh_from_db()
    assert reversal.reinstated_at is not None
    assert reversal.credits_reinstated == credits(50)
    # finance: no refund of the buyer's counts; the fee came back, so no income was lost
    assert report(buyer) == {
        "reversed": 0,
        "fees_reversed": 0,
        "losses": 0,
        "fees_returned": 6,
        "fees_reinstated": 6,
        "fee_income": 12,
    }
    assert earnings(seller) == {
        "reversed": 0,
        "earned": 112,
        "pending": 112,
        "available": 0,
        "paid_out": 0,
    }
    assert ledger_reconcile().ok

    # and: the seller is paid their 112, once, after the holding period
    assert payouts_run(now=timezone.now() + LATER) == 1
    assert MarketPayout.objects.get().amount == 112


def test_of_two_partial_refunds_only_the_one_that_failed_is_given_back(
    market_stripe, seller, buyer, deliver
):
    # given: 100 credits sold for 124; 31 refunded, then 31 more, each applied as its
    # webhook arrived: fee 3 and the seller's 28 each, 25 credits each
    order = sold(market_stripe, seller, buyer)
    deliver()
    first = refund_at_stripe(order, 31)
    deliver()
    refund_at_stripe(order, 31)
    deliver()
    assert books(seller, buyer) == REFUNDED_62

    # when: the first one fails
    market_stripe.standin.fail_refund(first["id"])
    deliver()

    # then: only its share is back: the second refund still stands
    assert books(seller, buyer) == {
        "seller_pending": 112 - 28,
        "seller_available": 0,
        "platform_fees": 9,
        "buyer_clearing": -93,
        "losses": 0,
        "payouts": 0,
        "buyer_credits": credits(75),
    }
    failed, standing = MarketReversal.objects.order_by("pk")
    assert failed.reinstated_at is not None and standing.reinstated_at is None
    assert order.fills.get().refunded == 31
    assert report(buyer) | {"fees_returned": None} == {
        "reversed": 31,
        "fees_reversed": 3,
        "losses": 0,
        "fees_returned": None,
        "fees_reinstated": 3,
        "fee_income": 9,
    }
    assert earnings(seller)["reversed"] == 28

    # when: 31 is refunded again (for real this time), then 31 more
    refund_at_stripe(order, 31)
    deliver()
    refund_at_stripe(order, 31)
    deliver()

    # then: each is applied, neither mistaken for the failed one: 93 of the 124 back
    # to the buyer (three refunds of 31), 75 credits taken back, the seller's 28 and
    # fee 3 of the last 31 left
    assert books(seller, buyer) == {
        "seller_pending": 28,
        "seller_available": 0,
        "platform_fees": 3,
        "buyer_clearing": -31,
        "losses": 0,
        "payouts": 0,
        "buyer_credits": credits(25),
    }
    assert market_stripe.refunded(order.stripe_payment_intent_id) == 93
    assert (report(buyer)["reversed"], report(buyer)["fees_reversed"]) == (93, 9)
    assert earnings(seller)["reversed"] == 84
    assert ledger_reconcile().ok


def test_a_failed_refund_s_events_delivered_again_or_first_give_back_nothing_more(
    market_stripe, seller, buyer, deliver
):
    # given: half a sale refunded and applied, then the refund failed and given back
    order = sold(market_stripe, seller, buyer)
    deliver()
    before = books(seller, buyer)
    refund = refund_at_stripe(order, 62)
    deliver()
    market_stripe.standin.fail_refund(refund["id"])
    # its failure's events first, in reverse, before the refund's own are processed again
    deliver(first=("refund.failed", "refund.updated"))
    assert books(seller, buyer) == before
    rows = (ledger_rows(), MoneyTransaction.objects.count())

    # when: every event of the refund is delivered again, in any order
    redeliver(*reversed(FAILURE_EVENTS))
    redeliver("charge.refunded", *FAILURE_EVENTS)

    # then: nothing more moved, and nothing was taken back again
    assert (ledger_rows(), MoneyTransaction.objects.count()) == rows
    assert books(seller, buyer) == before
    assert MarketReversal.objects.get().credits_reinstated == credits(50)
    assert report(buyer)["fee_income"] == 12
    assert ledger_reconcile().ok


def test_a_refund_that_failed_before_its_events_were_processed_moves_nothing(
    market_stripe, seller, buyer, deliver
):
    # given: a sale, half refunded, and the refund failed before any of its events came
    order = sold(market_stripe, seller, buyer)
    deliver()
    before, rows = books(seller, buyer), (ledger_rows(), MoneyTransaction.objects.count())
    refund = refund_at_stripe(order, 62)
    market_stripe.standin.fail_refund(refund["id"])

    # when: they come
    deliver()

    # then: nothing was taken, nothing given back, nobody frozen
    assert books(seller, buyer) == before
    assert (ledger_rows(), MoneyTransaction.objects.count()) == rows
    assert not MarketReversal.objects.exists()
    assert BillingCustomer.objects.get(organization=buyer).resale_frozen_at is None


def test_a_refund_that_fails_after_the_rest_was_paid_out_has_its_share_paid_next(
    market_stripe, seller, buyer, deliver
):
    # given: half a sale refunded in its holding period (fee 6, the seller's 56 taken
    # back), then the other 56 paid out as an invoice credit
    order = sold(market_stripe, seller, buyer)
    deliver()
    refund = refund_at_stripe(order, 62)
    deliver()
    assert payouts_run(now=timezone.now() + LATER) == 1
    fill = order.fills.get()
    assert (fill.proceeds, fill.seller_reversed) == (ProceedsState.PAID_OUT, 56)

    # when: the refund fails
    market_stripe.standin.fail_refund(refund["id"])
    deliver()

    # then: the 56 it took are available again, the fee is the platform's, the buyer
    # has all 100 credits; the next payout pays the 56, once
    assert books(seller, buyer) == HALF_PAID_OUT
    assert earnings(seller) == HALF_PAID_OUT_EARNINGS
    assert payouts_run(now=timezone.now() + LATER) == 1
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert [c["amount"] for c in market_stripe.balance_credits(seller)] == [-56, -56]
    assert (earnings(seller)["paid_out"], earnings(seller)["available"]) == (112, 0)
    assert report(buyer) | {"fees_returned": None} == {
        "reversed": 0,
        "fees_reversed": 0,
        "losses": 0,
        "fees_returned": None,
        "fees_reinstated": 6,
        "fee_income": 12,
    }
    assert ledger_reconcile().ok


def test_a_refund_after_payout_that_fails_recovers_its_loss(market_stripe, seller, buyer, deliver):
    # given: a sale whose 112 were paid out, then all of it refunded: the fee back, the
    # seller's 112 a loss (the seller keeps what was paid), the 100 credits taken back
    order = sold(market_stripe, seller, buyer)
    deliver()
    assert payouts_run(now=timezone.now() + LATER) == 1
    refund = refund_at_stripe(order, 124)
    deliver()
    assert (money("losses"), money("platform_fees"), money("buyer_clearing")) == (-112, 0, 0)
    assert report(buyer)["losses"] == 112

    # when: the refund fails
    market_stripe.standin.fail_refund(refund["id"])
    deliver()

    # then: no loss, the fee is the platform's again, the credits are the buyer's
    # again, and the seller is not paid twice
    assert books(seller, buyer) == {
        "seller_pending": 0,
        "seller_available": 0,
        "platform_fees": 12,
        "buyer_clearing": -124,
        "losses": 0,
        "payouts": 112,
        "buyer_credits": credits(100),
    }
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert report(buyer) | {"fees_returned": None} == {
        "reversed": 0,
        "fees_reversed": 0,
        "losses": 0,
        "fees_returned": None,
        "fees_reinstated": 12,
        "fee_income": 12,
    }
    assert earnings(seller) == {
        "reversed": 0,
        "earned": 112,
        "pending": 0,
        "available": 0,
        "paid_out": 112,
    }
    assert ledger_reconcile().ok


def test_a_refund_that_fails_after_a_reopened_fill_s_payout_was_refused_gives_back_what_it_took(
    market_stripe, seller, buyer, deliver
):
    # given: half a sale disputed, the other 56 paid out, the dispute won: the fill
    # reopened (56 paid earlier), its second payout, of the other 56, waiting to be
    # sent to an account Stripe has closed
    order, account = reopened_then_paying_again(market_stripe, seller, buyer, deliver)
    # and the whole charge refunded while it waits: the seller's 112 a loss
    refund = refund_at_stripe(order, 124)
    assert deliver() == ["processed", "ignored"]
    assert money("losses") == -112
    # then Stripe refuses that payout: only the 56 it was paying are recovered from
    # the loss (the 56 the first payout paid stay lost)
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert (money("losses"), order.fills.get().seller_reversed) == (-56, 56)

    # when: the refund fails, and its events are processed
    market_stripe.standin.fail_refund(refund["id"])
    assert deliver() == ["processed", "processed", "processed"]

    # then: the refund is undone: no loss, the fee the platform's, the buyer's 100
    # credits back; the seller keeps the 56 paid and is owed the 56 the refused
    # payout did not pay
    assert books(seller, buyer) == HALF_PAID_OUT
    fill = order.fills.get()
    assert (fill.proceeds, fill.refunded, fill.seller_reversed, fill.earlier_payouts) == (
        ProceedsState.AVAILABLE,
        0,
        0,
        56,
    )
    reversal = MarketReversal.objects.get(kind="refund")
    assert reversal.reinstated_at is not None
    assert (reversal.loss, reversal.credits_reinstated) == (0, credits(100))
    assert earnings(seller) == HALF_PAID_OUT_EARNINGS
    assert report(buyer)["losses"] == 0
    assert ledger_reconcile().ok

    # when: the seller connects an account Stripe takes, and payouts run
    second = market_stripe.connect_account(seller)
    assert payouts_run(now=timezone.now() + LATER) == 1

    # then: the 56 are paid there, once: the seller was paid the 112 of the sale in all
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert [t["amount"] for t in market_stripe.transfers(account)] == [56]
    assert [t["amount"] for t in market_stripe.transfers(second)] == [56]
    assert (money("payouts"), money("seller_available", organization=seller)) == (112, 0)
    assert ledger_reconcile().ok


def test_a_shortfall_refund_that_fails_is_logged_for_finance_and_takes_nothing(
    market_stripe, seller, buyer, deliver, caplog
):
    # given: a sale, and a refund that says it is the order's shortfall refund (what it
    # paid for and did not get), made and failed at Stripe
    order = sold(market_stripe, seller, buyer)
    deliver()
    before = books(seller, buyer)
    refund = stripe_client.refund_create(
        key=f"market-shortfall:{order.pk}",
        payment_intent=order.stripe_payment_intent_id,
        amount=24,
        metadata={"market_order": str(order.pk), "reason": "not_delivered"},
    )
    deliver()
    assert books(seller, buyer) == before  # it takes nothing of the sale
    caplog.set_level(logging.ERROR, logger="gymbilling.market.services")

    # when: it fails
    market_stripe.standin.fail_refund(refund["id"])
    deliver()

    # then: nothing moves, and finance is told the buyer was not refunded
    assert books(seller, buyer) == before
    assert any(
        f"market order {order.pk}: its shortfall refund {refund['id']} failed" in r.getMessage()
        for r in caplog.records
        if r.levelno == logging.ERROR
    )


def test_a_refund_by_hand_of_credits_never_delivered_takes_nothing_back(
    market_stripe, unrefunded_shortfall, buyer, deliver
):
    # given: an order paid after its credits expired (nothing delivered, 30 owed back)
    # whose shortfall refund has not reached Stripe yet
    order, intent = unrefunded_shortfall

    # when: finance refunds the 30 by hand in Stripe's dashboard, and its event comes
    stripe_client.refund_create(key=f"dashboard:{order.pk}", payment_intent=intent)
    deliver()

    # then: it is no refund of a sale: nothing reversed, the buyer not frozen
    assert market_stripe.refunded(intent) == 30
    assert [r.amount for r in MarketReversal.objects.all()] == [0]
    assert BillingCustomer.objects.get(organization=buyer).resale_frozen_at is None
    assert report(buyer)["reversed"] == 0


def test_a_shortfall_refund_stripe_fails_goes_back_to_finance_once_and_their_retry_stands(
    market_stripe, unrefunded_shortfall, admin_client, deliver
):
    # given: an order that delivered nothing of the 30 it was paid; its shortfall refund
    # sent by the sweep and taken by Stripe: the order shows it refunded
    order, intent = unrefunded_shortfall
    orders_expire()
    deliver()
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None
    first = order.shortfall_refund_id
    assert market_stripe.refunded(intent) == 30

    # when: Stripe fails it (the buyer's card was closed), its events delivered twice
    market_stripe.standin.fail_refund(first)
    deliver()
    order.refresh_from_db()
    refused_at = order.shortfall_refund_refused_at
    redeliver(*FAILURE_EVENTS)

    # then: the order is back with finance, once, saying which refund failed and why;
    # the buyer still has nothing back, and the sweep leaves it to finance
    order.refresh_from_db()
    assert order.shortfall_refunded_at is None
    assert refused_at is not None and order.shortfall_refund_refused_at == refused_at
    assert order.shortfall_refund_error.startswith(
        f"refund {first} failed at Stripe (expired_or_canceled_card)"
    )
    assert market_stripe.refunded(intent) == 0
    assert refused_orders(admin_client) == [order.pk]
    orders_expire()
    assert market_stripe.refunded(intent) == 0

    # when: finance retries it from the admin once the buyer has a card again
    response = run_action(admin_client, CHANGELIST, "retry_shortfall_refund", order.pk)
    deliver()

    # then: a new refund, not the failed one replayed; the order is refunded by it
    assert response.status_code == 302
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None
    second = order.shortfall_refund_id
    assert second not in ("", first)
    assert market_stripe.refunded(intent) == 30
    assert refused_orders(admin_client) == []

    # when: the first refund's failure is delivered again after that
    redeliver(*FAILURE_EVENTS)

    # then: the retry that went through stands; nothing of the sale was taken back
    order.refresh_from_db()
    assert order.shortfall_refunded_at is not None
    assert (order.shortfall_refund_id, order.shortfall_refund_refused_at) == (second, None)
    assert refused_orders(admin_client) == []
    assert MarketReversal.objects.filter(amount__gt=0).count() == 0
    assert ledger_reconcile().ok


def test_a_shortfall_refund_that_fails_before_it_is_recorded_waits_for_the_record(
    market_stripe, unrefunded_shortfall, deliver
):
    # given: the sweep's shortfall refund taken by Stripe under its key, the answer lost
    # on the way back (the order still waits for it), then failed at Stripe
    order, intent = unrefunded_shortfall
    refund = stripe_client.refund_create(
        key=f"market-shortfall:{order.pk}",
        payment_intent=intent,
        amount=30,
        metadata={"market_order": str(order.pk), "reason": "not_delivered"},
    )
    market_stripe.standin.fail_refund(refund["id"])

    # when: its events come before the sweep sends the refund again
    with pytest.raises(EventRetryLater):
        deliver()

    # then: the event waits; the order still waits for its refund
    [waiting] = StripeEvent.objects.all()
    assert waiting.status == EventStatus.PENDING
    order.refresh_from_db()
    assert (order.shortfall_refunded_at, order.shortfall_refund_refused_at) == (None, None)

    # when: the sweep's next request replays the refund Stripe made, and the event is
    # retried, then the rest come
    orders_expire()
    assert stripe_event_process(event_pk=waiting.pk) == "processed"
    deliver()

    # then: the refund that failed is not counted as the buyer's refund: finance has it
    order.refresh_from_db()
    assert order.shortfall_refund_id == refund["id"]
    assert order.shortfall_refunded_at is None
    assert order.shortfall_refund_refused_at is not None
    assert order.shortfall_refund_error.startswith(f"refund {refund['id']} failed at Stripe")
    assert market_stripe.refunded(intent) == 0


def refused_orders(admin_client) -> list[int]:
    """The orders in finance's admin list of shortfall refunds Stripe refused."""
    listed = admin_client.get(CHANGELIST, {"shortfall_refund": "refused"})
    return [o.pk for o in listed.context["cl"].result_list]


def read_as_before_per_refund_keys(order) -> None:
    """Apply the order's charge as a refund event did before refunds were applied one by
    one (5e00b59): all its refunds at once, under Stripe's running `amount_refunded`, the
    rows topped up to it (the cumulative path). What a database from before then holds."""
    intent = stripe_client.payment_intent_retrieve(order.stripe_payment_intent_id)
    charge_id = intent["latest_charge"]
    charge = stripe_client.charge_retrieve(
        charge_id["id"] if isinstance(charge_id, dict) else charge_id
    )
    refunded = int(charge["amount_refunded"])
    # The call of those events (events.py's `legacy` until 5e00b59).
    legacy = {"key": f"refund:{charge['id']}:{refunded}", "amount": refunded}
    assert market_reversal_handle(kind="refund", charge=charge, cumulative=True, **legacy)


def test_refunds_applied_under_the_old_running_totals_are_not_applied_again(
    market_stripe, seller, buyer, deliver
):
    # given: 100 credits sold for 124; 31 refunded, then failed, then 62 refunded, each
    # applied when it was made under the old keys: refund:<charge>:31, then
    # refund:<charge>:62 (the failed 31 left out of Stripe's running total, and the
    # top-up taking 31 for the 62, as 31 were taken already): the 62 alone stands
    order = sold(market_stripe, seller, buyer)
    deliver()
    first = refund_at_stripe(order, 31)
    read_as_before_per_refund_keys(order)
    market_stripe.standin.fail_refund(first["id"])
    refund_at_stripe(order, 62)
    read_as_before_per_refund_keys(order)
    charge = MarketReversal.objects.get(amount=31, key__endswith=":31").stripe_charge_id
    assert sorted(MarketReversal.objects.values_list("key", "amount")) == [
        (f"refund:{charge}:31", 31),
        (f"refund:{charge}:62", 31),
    ]
    assert books(seller, buyer) == REFUNDED_62
    rows = (ledger_rows(), MoneyTransaction.objects.count())

    # when: the charge's events are processed by today's reading, refund by refund under
    # the new keys (31, then 93: the failed one counted)
    deliver()

    # then: the ledger moved once for the 62, under its old key: not again for the 62
    # (the new key 93 is not an old row's), and not back for the failed 31 (the 62's
    # top-up made up for it)
    assert books(seller, buyer) == REFUNDED_62
    assert (ledger_rows(), MoneyTransaction.objects.count()) == rows
    assert not MarketReversal.objects.filter(reinstated_at__isnull=False).exists()
    assert MarketReversal.objects.count() == 2
    assert order.fills.get().refunded == 62
    assert ledger_reconcile().ok
