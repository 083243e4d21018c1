"""A seller's sales and earnings (gymbilling.market.selectors) against the money ledger.

The earnings a seller reads are worked out from their fills and payouts; the
money ledger books the same events as entries. After each step of a seller's
life (sales delivered, the holding period over, a payout sent, one refused, one
in flight, refunds before and after payout, a dispute won) the two must agree,
figure by figure, and add up: earned = gross - fees - reversed = pending +
available + in transit + paid out. Stripe is the local stand-in over HTTP.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db.models import Sum
from django.utils import timezone

from gymbilling.market.selectors import (
    organization_earnings,
    organization_payouts,
    organization_sales,
)
from gymbilling.market.services import payouts_run
from gymbilling.models import (
    BillingCustomer,
    MoneyAccount,
    MoneyEntry,
    PayoutStatus,
    ProceedsState,
)
from tests.gymbilling.market.conftest import (
    half_disputed_then_paid_out,
    market_member,
    refund,
    sold,
)
from tests.helpers import credits

pytestmark = pytest.mark.django_db

LATER = timedelta(days=8)  # past the holding period (7 days)


def balance(seller, kind: str, currency: str = "usd") -> int:
    """The money account's cached balance (0 before it is opened)."""
    account = MoneyAccount.objects.filter(organization=seller, kind=kind, currency=currency).first()
    return account.balance if account else 0


def booked(seller, *, account: str, transaction: str | None = None, currency="usd") -> int:
    """The sum of the seller's money entries on accounts of one kind (of one transaction kind)."""
    entries = MoneyEntry.objects.filter(
        transaction__organization=seller, transaction__currency=currency, account__kind=account
    )
    if transaction is not None:
        entries = entries.filter(transaction__kind=transaction)
    return entries.aggregate(s=Sum("amount"))["s"] or 0


def ledger(seller) -> dict[str, int]:
    """The seller's figures as the money ledger alone has them."""
    return {
        "gross": -booked(seller, account="buyer_clearing", transaction="sale"),
        "fees": booked(seller, account="platform_fees", transaction="fee"),
        "pending": balance(seller, "seller_pending"),
        "available": balance(seller, "seller_available"),
        # A payout moves its amount into the payouts account; a refused one moves it out.
        "in_transit_and_paid_out": booked(seller, account="payouts"),
    }


def summary(seller) -> dict[str, int]:
    [usd] = organization_earnings(organization=seller)
    assert usd.currency == "usd"
    # the figures add up, whatever the step
    assert usd.earned == usd.gross - usd.fees - usd.reversed
    assert usd.earned == usd.pending + usd.available + usd.in_transit + usd.paid_out
    # and agree with the ledger's
    assert ledger(seller) == {
        "gross": usd.gross,
        "fees": usd.fees,
        "pending": usd.pending,
        "available": usd.available,
        "in_transit_and_paid_out": usd.in_transit + usd.paid_out,
    }
    return {
        name: getattr(usd, name)
        for name in (
            "sales",
            "gross",
            "fees",
            "reversed",
            "pending",
            "available",
            "in_transit",
            "paid_out",
        )
    }


def test_earnings_follow_the_money_ledger_through_sales_payouts_and_refunds(
    market_stripe, seller, buyer
):
    # given: sale A (100 credits at 12.34 per 1,000: 124 paid, fee 12) paid out as
    # an invoice credit once its holding period is over
    a = sold(market_stripe, seller, buyer)
    assert summary(seller) == {
        "sales": 1,
        "gross": 124,
        "fees": 12,
        "reversed": 0,
        "pending": 112,
        "available": 0,
        "in_transit": 0,
        "paid_out": 0,
    }
    assert payouts_run(now=timezone.now() + LATER) == 1
    # then sales B (50, fee 5) and C (124, fee 12), whose payout Stripe refuses
    # (the seller's Connect account is gone): their 45 + 112 are back to available
    account = market_stripe.connect_account(seller)
    BillingCustomer.objects.filter(organization=seller).update(
        stripe_connect_account_id="acct_gone"
    )
    sold(market_stripe, seller, buyer, price=500)
    c = sold(market_stripe, seller, buyer)
    assert payouts_run(now=timezone.now() + LATER) == 0
    # and sale D (80, fee 8), still in its holding period
    sold(market_stripe, seller, buyer, price=800)

    # when: half of C is refunded while available (fee 6 back, the seller's 56
    # taken back), and half of A after it was paid out (the seller keeps it: a loss)
    refund(c, 62)
    refund(a, 62)

    # then: the summary is the ledger's, and only C's refund reduced the earnings
    assert summary(seller) == {
        "sales": 4,
        "gross": 124 + 50 + 124 + 80,
        "fees": 12 + 5 + 12 + 8,
        "reversed": 56,
        "pending": 72,
        "available": 45 + 112 - 56,
        "in_transit": 0,
        "paid_out": 112,
    }
    # and the sales say the same of each fill, newest first
    sales = list(organization_sales(organization=seller))
    assert [
        (s.gross, s.refunded, s.seller_reversed, s.earned, s.unpaid, s.proceeds) for s in sales
    ] == [
        (80, 0, 0, 72, 72, ProceedsState.PENDING),
        (124, 62, 56, 56, 56, ProceedsState.AVAILABLE),
        (50, 0, 0, 45, 45, ProceedsState.AVAILABLE),
        (124, 62, 0, 112, 0, ProceedsState.PAID_OUT),
    ]
    assert [s.proceeds for s in organization_sales(organization=seller, proceeds="available")] == [
        ProceedsState.AVAILABLE
    ] * 2

    # when: the account is fixed, and the next payout is recorded while Stripe is down
    BillingCustomer.objects.filter(organization=seller).update(stripe_connect_account_id=account)
    market_stripe.down = True
    soon = timezone.now() + timedelta(days=1)  # D still in its holding period
    assert payouts_run(now=soon) == 0
    # then: what was available is in transit
    assert summary(seller) | {"sales": 0} == {
        "sales": 0,
        "gross": 378,
        "fees": 37,
        "reversed": 56,
        "pending": 72,
        "available": 0,
        "in_transit": 101,
        "paid_out": 112,
    }

    # when: Stripe is back and takes it
    market_stripe.down = False
    assert payouts_run(now=soon) == 1
    # then: paid out, as Stripe has it
    assert summary(seller)["in_transit"] == 0
    assert summary(seller)["paid_out"] == 213
    assert [t["amount"] for t in market_stripe.transfers(account)] == [101]
    assert [(p.amount, p.status) for p in organization_payouts(organization=seller)] == [
        (101, PayoutStatus.SENT),
        (157, PayoutStatus.FAILED),
        (112, PayoutStatus.SENT),
    ]


def test_a_dispute_won_after_its_payout_owes_the_seller_only_the_share_it_took(
    market_stripe, seller, buyer, deliver
):
    # given: half of a sale disputed in its holding period (the seller's 56 taken
    # back), then the other 56 paid out
    _, dispute = half_disputed_then_paid_out(market_stripe, seller, buyer, deliver)
    assert summary(seller)["reversed"] == 56

    # when: the gym wins the dispute
    market_stripe.standin.close_dispute(dispute, status="won")
    deliver()

    # then: nothing is reversed any more, 56 paid out, and only the other 56
    # available (the fill's earlier payout is not owed twice)
    assert summary(seller) == {
        "sales": 1,
        "gross": 124,
        "fees": 12,
        "reversed": 0,
        "pending": 0,
        "available": 56,
        "in_transit": 0,
        "paid_out": 56,
    }
    [sale] = organization_sales(organization=seller)
    assert (sale.earned, sale.unpaid, sale.proceeds) == (112, 56, ProceedsState.AVAILABLE)
    # and once paid, all 112
    assert payouts_run(now=timezone.now() + LATER) == 1
    assert (summary(seller)["available"], summary(seller)["paid_out"]) == (0, 112)


def test_earnings_are_per_currency_and_only_the_organization_s_own(
    market_stripe, seller, buyer, settings
):
    # given: the seller sells in dollars and pounds, another seller in dollars
    settings.MARKET_CURRENCIES = ["usd", "gbp"]
    other = market_member(credits_amount=credits(1000))
    sold(market_stripe, seller, buyer)
    sold(market_stripe, seller, buyer, price=500, currency="gbp")
    sold(market_stripe, other, buyer, price=800)

    # when
    earnings = organization_earnings(organization=seller)

    # then: one summary a currency, never added together, and none of the other's
    assert [(e.currency, e.gross, e.fees, e.pending) for e in earnings] == [
        ("gbp", 50, 5, 45),
        ("usd", 124, 12, 112),
    ]
    assert organization_earnings(organization=buyer) == []
    assert {s.currency for s in organization_sales(organization=seller)} == {"usd", "gbp"}
    assert len(organization_sales(organization=other)) == 1
