"""A disputed marketplace payment the gym wins: Stripe reinstates the funds, so
the fee, the seller's share and the buyer's credits go back where they were.

Stripe is the local stand-in over HTTP; the dispute's events are processed as
the webhook would (`deliver`), and every ledger invariant (credits, escrow,
proceeds) is checked after each test.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from gymbilling.market.services import (
    market_reversal_handle,
    market_reversals_pending_settle,
    payouts_run,
)
from gymbilling.models import (
    BillingCustomer,
    EventStatus,
    MarketPayout,
    MarketReversal,
    MoneyTransaction,
    PayoutStatus,
    ProceedsState,
    StripeEvent,
)
from gymbilling.services import stripe_event_process
from gymbilling.services.events import EventRetryLater
from metering.models import LedgerAccount
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import credits_adjust, hold_place, hold_release
from tests.gymbilling.market.conftest import (
    charge_for,
    dispute_at_stripe,
    half_disputed_then_paid_out,
    money,
    reopened_then_paying_again,
    sold,
)
from tests.helpers import credits, ledger_rows

pytestmark = pytest.mark.django_db

LATER = timedelta(days=8)  # past the holding period


def books(seller, buyer) -> dict[str, int]:
    """Every balance a dispute of `sold`'s order moves."""
    return {
        "seller_pending": money("seller_pending", organization=seller),
        "seller_available": money("seller_available", organization=seller),
        "platform_fees": money("platform_fees"),
        "buyer_clearing": money("buyer_clearing"),
        "losses": money("losses"),
        "payouts": money("payouts"),
        "buyer_credits": organization_balance(organization=buyer).available,
    }


def test_a_won_dispute_puts_the_books_back_as_they_were_before_it(
    market_stripe, seller, buyer, deliver
):
    # given: 100 credits sold (124 paid: fee 12, the seller's 112 pending), 30 of them spent
    order = sold(market_stripe, seller, buyer)
    deliver()
    credits_adjust(organization=buyer, amount=-credits(30), reason="spent", key="spend-30")
    before = books(seller, buyer)
    # and the payment disputed: fee and the seller's share reversed, 70 credits taken back
    dispute = dispute_at_stripe(market_stripe, order)
    assert deliver() == ["processed"]
    reversal = MarketReversal.objects.get()
    assert (reversal.fee_reversed, reversal.seller_reversed, reversal.loss) == (12, 112, 0)
    assert (reversal.credits_clawed_back, reversal.credits_lost) == (credits(70), credits(30))
    assert before == {
        "seller_pending": 112,
        "seller_available": 0,
        "platform_fees": 12,
        "buyer_clearing": -124,
        "losses": 0,
        "payouts": 0,
        "buyer_credits": credits(70),
    }
    assert books(seller, buyer) == before | {
        "seller_pending": 0,
        "platform_fees": 0,
        "buyer_clearing": 0,
        "buyer_credits": 0,
    }

    # when: the gym wins it, and Stripe's events of the win are processed
    market_stripe.standin.close_dispute(dispute, status="won")
    assert deliver() == ["processed", "processed"]

    # then: every balance is what it was before the dispute, the fill owes the
    # seller all 112 again, and the reversal says it was undone, at no loss
    assert books(seller, buyer) == before
    fill = order.fills.get()
    assert (fill.refunded, fill.seller_reversed, fill.proceeds) == (0, 0, ProceedsState.PENDING)
    reversal.refresh_from_db()
    assert reversal.reinstated_at is not None
    assert (reversal.credits_reinstated, reversal.loss, reversal.credits_lost) == (
        credits(70),
        0,
        0,
    )
    assert ledger_reconcile().ok
    # the buyer stays frozen until finance lifts it
    assert BillingCustomer.objects.get(organization=buyer).resale_frozen_at is not None

    # when: the dispute's events are all delivered again
    rows = (ledger_rows(), MoneyTransaction.objects.count())
    for event in StripeEvent.objects.filter(type__startswith="charge.dispute.").order_by("pk"):
        assert stripe_event_process(event_pk=event.pk, force=True) == "processed"

    # then: nothing more moved, and the seller is paid their 112 once, after the holding period
    assert (ledger_rows(), MoneyTransaction.objects.count()) == rows
    assert books(seller, buyer) == before
    assert payouts_run(now=timezone.now() + LATER) == 1
    assert MarketPayout.objects.get().amount == 112


def test_a_share_a_dispute_took_before_the_payout_is_paid_when_the_dispute_is_won(
    market_stripe, seller, buyer, deliver
):
    # given: half of a sale disputed in its holding period (fee 6, the seller's 56
    # taken back), then the other 56 paid out as an invoice credit
    order, dispute = half_disputed_then_paid_out(market_stripe, seller, buyer, deliver)
    fill = order.fills.get()
    assert (fill.proceeds, fill.seller_reversed) == (ProceedsState.PAID_OUT, 56)

    # when: the gym wins the dispute
    market_stripe.standin.close_dispute(dispute, status="won")
    deliver()

    # then: the 56 are available again, and the next payout pays them, once
    assert money("seller_available", organization=seller) == 56
    fill.refresh_from_db()
    assert (fill.proceeds, fill.seller_reversed, fill.earlier_payouts, fill.refunded) == (
        ProceedsState.AVAILABLE,
        0,
        56,
        0,
    )
    assert payouts_run(now=timezone.now() + LATER) == 1
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert [c["amount"] for c in market_stripe.balance_credits(seller)] == [-56, -56]
    assert (money("payouts"), money("platform_fees"), money("buyer_clearing")) == (112, 12, -124)
    assert money("losses") == 0


def test_a_refund_while_a_reopened_fill_s_payout_is_refused_keeps_the_first_payout_a_loss(
    market_stripe, seller, buyer, deliver
):
    # given: half a sale disputed in its holding period, the other 56 paid by transfer,
    # then the dispute won: the fill reopened with the 56 it took; and the second
    # payout recorded while Stripe is down, to an account Stripe has closed
    order, account = reopened_then_paying_again(market_stripe, seller, buyer, deliver)

    # when: the whole charge is refunded while that payout waits (all 112 of the
    # seller's share a loss, the fill being paid out), then Stripe refuses the payout
    assert market_reversal_handle(
        kind="refund",
        key=f"refund:ch_{order.pk}:124",
        charge=charge_for(order, amount_refunded=124),
        amount=124,
        cumulative=True,
    )
    assert money("losses") == -112
    assert payouts_run(now=timezone.now() + LATER) == 0

    # then: only the 56 the refused payout was paying are recovered from the
    # loss; the 56 the first payout paid stay lost, and the seller is owed nothing
    assert [t["amount"] for t in market_stripe.transfers(account)] == [56]
    assert (money("losses"), money("payouts"), money("platform_fees")) == (-56, 56, 0)
    assert money("seller_available", organization=seller) == 0
    fill = order.fills.get()
    assert (fill.proceeds, fill.seller_reversed, fill.earlier_payouts) == (
        ProceedsState.AVAILABLE,
        56,
        56,
    )
    assert payouts_run(now=timezone.now() + LATER) == 0


def test_a_won_dispute_recovers_the_loss_of_a_share_already_paid_out(
    market_stripe, seller, buyer, deliver
):
    # given: a sale whose 112 were paid out, then disputed: the fee back, 112 a loss
    order = sold(market_stripe, seller, buyer)
    deliver()
    assert payouts_run(now=timezone.now() + LATER) == 1
    dispute = dispute_at_stripe(market_stripe, order)
    deliver()
    assert (money("losses"), money("platform_fees")) == (-112, 0)

    # when: the gym wins it
    market_stripe.standin.close_dispute(dispute, status="won")
    deliver()

    # then: no loss, the fee is the platform's again, and the seller is not paid twice
    assert (money("losses"), money("platform_fees"), money("buyer_clearing")) == (0, 12, -124)
    assert money("payouts") == 112
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert MarketReversal.objects.get().loss == 0


def test_a_won_dispute_waits_for_a_payout_being_sent(market_stripe, seller, buyer, deliver):
    # given: a sale whose payout is recorded while Stripe is down, then disputed
    # while it waits to be sent: the seller's share, being paid, is a loss
    order = sold(market_stripe, seller, buyer)
    deliver()
    market_stripe.down = True
    assert payouts_run(now=timezone.now() + LATER) == 0
    market_stripe.down = False
    dispute = dispute_at_stripe(market_stripe, order)
    deliver()
    assert money("losses") == -112

    # when: the win is processed while the payout is still unsent
    market_stripe.standin.close_dispute(dispute, status="won")
    with pytest.raises(EventRetryLater):
        deliver()

    # then: the event waits, and nothing moved
    waiting = StripeEvent.objects.get(type="charge.dispute.funds_reinstated")
    assert waiting.status == EventStatus.PENDING
    assert money("losses") == -112

    # when: the payout is sent, then the event is retried
    assert payouts_run(now=timezone.now() + LATER) == 1
    assert MarketPayout.objects.get().status == PayoutStatus.SENT
    assert stripe_event_process(event_pk=waiting.pk) == "processed"

    # then: the loss is recovered; the seller was paid once
    assert (money("losses"), money("platform_fees"), money("payouts")) == (0, 12, 112)


def test_a_dispute_won_before_its_events_were_processed_moves_nothing(
    market_stripe, seller, buyer, deliver
):
    # given: a sale, disputed and won at Stripe before any of the dispute's events was processed
    order = sold(market_stripe, seller, buyer)
    deliver()
    before, rows = books(seller, buyer), (ledger_rows(), MoneyTransaction.objects.count())
    dispute = dispute_at_stripe(market_stripe, order)
    market_stripe.standin.close_dispute(dispute, status="won")

    # when: they are
    assert deliver() == ["ignored", "ignored", "ignored"]

    # then: nothing was taken, nothing given back, nobody frozen
    assert books(seller, buyer) == before
    assert (ledger_rows(), MoneyTransaction.objects.count()) == rows
    assert not MarketReversal.objects.exists()
    assert BillingCustomer.objects.get(organization=buyer).resale_frozen_at is None


def test_a_won_dispute_drops_the_claim_on_bought_credits_running_work_held(
    market_stripe, seller, buyer, deliver
):
    # given: 100 credits bought, 60 of them held by the buyer's running job
    # when the payment is disputed: 40 taken back, 60 pending and claimed;
    # then the job ends without using them
    order = sold(market_stripe, seller, buyer)
    deliver()
    hold_place(organization=buyer, amount=credits(60), key="job-running")
    dispute = dispute_at_stripe(market_stripe, order)
    assert deliver() == ["processed"]
    hold_release(key="job-running")
    reversal = MarketReversal.objects.get()
    assert (reversal.credits_clawed_back, reversal.credits_pending) == (credits(40), credits(60))
    assert wallet_claim(buyer) == credits(60)

    # when: the gym wins it
    market_stripe.standin.close_dispute(dispute, status="won")
    assert deliver() == ["processed", "processed"]

    # then: the 40 are back, nothing is pending or claimed, and all 100 can be held
    reversal.refresh_from_db()
    assert (reversal.credits_reinstated, reversal.credits_pending, reversal.credits_lost) == (
        credits(40),
        0,
        0,
    )
    assert wallet_claim(buyer) == 0
    hold_place(organization=buyer, amount=credits(100), key="job-after")
    assert market_reversals_pending_settle() == 0
    assert ledger_reconcile().ok


def wallet_claim(org) -> int:
    return LedgerAccount.objects.get(organization=org, kind="wallet").claimed
