"""Payouts pending from before sends were counted (gymbilling/0038): a send of that release
that died mid-call (its worker killed) left no count and no error, and may have credited
the seller's customer; gymbilling/0039 counts every pending payout as sent once, so a
customer deleted since is left to finance, not paid again at its replacement.

The payout is made at the Stripe stand-in by the real services; the database is then
migrated back to 0038 and forward.
"""

from __future__ import annotations

from django.utils import timezone

from gymbilling.market.services import _payout_create_at_stripe, payouts_run
from gymbilling.models import MarketPayout, PayoutMethod, PayoutStatus
from gymbilling.services.customers import billing_customer_replace
from tests.gymbilling.market.conftest import money, sold
from tests.gymbilling.market.test_market_payouts import (
    LATER,
    _recorded_not_sent,
    _seller_customer,
)

BEFORE = [("gymbilling", "0038_marketpayout_send_attempts")]


def test_a_payout_pending_from_before_counted_sends_is_not_paid_again_at_a_replacement(
    transactional_db, market_stripe, seller, buyer, migrated_back_and_forth
):
    # given: a payout of 112 to the seller's customer, recorded, and credited there by a
    # send of the release before counted sends whose worker was killed mid-call: pending,
    # no count, no error; Stripe has forgotten the send's key since
    sold(market_stripe, seller, buyer)
    payout = _recorded_not_sent(seller)
    gone = _seller_customer(seller)
    assert _payout_create_at_stripe(payout)["customer"] == gone.stripe_customer_id
    market_stripe.standin.expire_idempotency_keys()
    # and another seller's payout, sent
    sent = MarketPayout.objects.create(
        seller=buyer,
        currency="usd",
        amount=5,
        method=PayoutMethod.INVOICE_CREDIT,
        destination="cus_elsewhere",
        status=PayoutStatus.SENT,
    )
    # and the customer was deleted at Stripe and replaced by a new one
    market_stripe.delete_customer(gone.stripe_customer_id)
    billing_customer_replace(customer=gone)
    replacement = _seller_customer(seller).stripe_customer_id
    assert replacement != gone.stripe_customer_id

    # when: the database is migrated back to 0038 and forward (the deploy)
    migrated_back_and_forth(BEFORE)

    # then: the pending payout counts as sent once, the sent one as it was
    counts = dict(MarketPayout.objects.values_list("pk", "send_attempts"))
    assert counts == {payout.pk: 1, sent.pk: 0}

    # when: the payout run sends the payout again
    payouts_run(now=timezone.now() + LATER)

    # then: not paid to the new customer: failed for finance, the proceeds back to available
    payout.refresh_from_db()
    assert (payout.status, payout.destination) == (PayoutStatus.FAILED, gone.stripe_customer_id)
    assert payout.may_have_paid
    assert market_stripe.balance_credits(seller) == []  # the replacement's: nothing
    assert money("payouts") == 0
    assert money("seller_available", organization=seller) == 112
