"""Market refunds whose loss a refused payout recovered before gymbilling/0027 had what it
recovered, by fill, nowhere but in their seller_reversed; gymbilling/0028 writes it into
`recovered_by_fill`, which undoing the refund reads.

The histories are made at the Stripe stand-in and applied by the real services; the
database is then migrated back to 0026 (which drops what the services recorded) and forward,
and the refunds then fail at Stripe, their events processed as the webhook would.
"""

from __future__ import annotations

from datetime import timedelta

from django.utils import timezone

from gymbilling.market.services import payouts_run
from gymbilling.models import BillingCustomer, MarketReversal
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from tests.gymbilling.market.conftest import (
    market_member,
    money,
    reopened_then_paying_again,
    sold,
)
from tests.gymbilling.market.test_market_refunds_failed import books, refund_at_stripe
from tests.helpers import credits

BEFORE = [("gymbilling", "0026_subscription_overage_price")]
LATER = timedelta(days=8)  # past the holding period


def refunded_while_paying(market_stripe, seller, buyer, deliver) -> tuple[object, dict]:
    """A sale whose 112 are being paid out, to an account Stripe has closed, when the whole
    charge is refunded (all 112 a loss); returns the order and the refund."""
    order = sold(market_stripe, seller, buyer)
    deliver()
    BillingCustomer.objects.filter(organization=seller).update(
        stripe_connect_account_id="acct_gone"
    )
    market_stripe.down = True
    assert payouts_run(now=timezone.now() + LATER) == 0
    market_stripe.down = False
    refund = refund_at_stripe(order, 124)
    deliver()
    return order, refund


def recovered(order) -> dict[str, int]:
    return MarketReversal.objects.get(order=order, kind="refund").recovered_by_fill


def test_refunds_recovered_before_0027_say_what_was_recovered_and_are_undone_exactly(
    transactional_db, market_stripe, seller, buyer, deliver, migrated_back_and_forth
):
    # given: a sale reopened by a won dispute after its first 56 were paid out, its
    # second payout of 56 waiting, the whole charge refunded (112 a loss)
    reopened, _ = reopened_then_paying_again(market_stripe, seller, buyer, deliver)
    reopened_refund = refund_at_stripe(reopened, 124)
    deliver()
    # and another whose 112 were all being paid out, refunded whole too
    other_seller, other_buyer = market_member(credits_amount=credits(1000)), market_member()
    whole, whole_refund = refunded_while_paying(market_stripe, other_seller, other_buyer, deliver)
    # and Stripe then refused both payouts: of the reopened sale 56 recovered, of the other 112
    assert payouts_run(now=timezone.now() + LATER) == 0
    assert money("losses") == -56
    [reopened_fill], [whole_fill] = reopened.fills.all(), whole.fills.all()
    expected = {reopened: {str(reopened_fill.pk): 56}, whole: {str(whole_fill.pk): 112}}
    assert {order: recovered(order) for order in expected} == expected
    rows = {
        r.pk: (r.seller_reversed, r.loss, r.recovered_by_fill) for r in MarketReversal.objects.all()
    }

    # when: the database is migrated back to 0026 (what the code before 0027 wrote: no
    # record of what was recovered) and forward
    migrated_back_and_forth(BEFORE)

    # then: each refund says again what the refusal recovered of it; the rest as it was
    assert {
        r.pk: (r.seller_reversed, r.loss, r.recovered_by_fill) for r in MarketReversal.objects.all()
    } == rows

    # when: it runs again
    migrated_back_and_forth(BEFORE)

    # then: nothing changes
    assert {order: recovered(order) for order in expected} == expected

    # when: both refunds fail at Stripe
    market_stripe.standin.fail_refund(reopened_refund["id"])
    market_stripe.standin.fail_refund(whole_refund["id"])
    deliver()

    # then: each is undone exactly: no loss, the fees the platform's, each buyer's 100
    # credits back; the reopened sale's seller keeps the 56 paid and is owed 56, the
    # other seller is owed all 112 (neither refused payout paid anything)
    assert books(seller, buyer) | {"payouts": None} == {
        "seller_pending": 0,
        "seller_available": 56,
        "platform_fees": 24,
        "buyer_clearing": -248,
        "losses": 0,
        "payouts": None,
        "buyer_credits": credits(100),
    }
    assert money("seller_available", organization=other_seller) == 112
    assert organization_balance(organization=other_buyer).available == credits(100)
    assert money("payouts") == 56
    assert MarketReversal.objects.filter(reinstated_at__isnull=True).count() == 0
    assert ledger_reconcile().ok
