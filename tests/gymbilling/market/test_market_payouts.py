"""Payouts sent again: a seller is paid once, whatever happened between the sends.

Stripe is the stand-in over HTTP. "Stripe forgot the key" is the stand-in's
`/_config/idempotency_keys/expire`, what 24 hours do at Stripe.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from gymbilling.market.services import _payout_create_at_stripe, payouts_run
from gymbilling.models import MarketPayout, PayoutMethod, PayoutStatus
from tests.gymbilling.market.conftest import money, sold

LATER = timedelta(days=8)


def _recorded_while_stripe_is_down(market_stripe) -> MarketPayout:
    market_stripe.down = True
    assert payouts_run(now=timezone.now() + LATER) == 0
    market_stripe.down = False
    payout = MarketPayout.objects.get()
    assert payout.status == PayoutStatus.PENDING
    return payout


@pytest.mark.parametrize("method", [PayoutMethod.TRANSFER, PayoutMethod.INVOICE_CREDIT])
def test_a_payout_resent_after_stripe_forgot_its_key_is_found_not_made_again(
    market_stripe, seller, buyer, method
):
    # given: a sale (the seller's 112) whose payout (a Connect transfer, or a balance
    # credit for a seller without a Connect account) was recorded, sent, and made at
    # Stripe, but whose answer never came back (a crash, a timeout): still pending
    account = market_stripe.connect_account(seller) if method == PayoutMethod.TRANSFER else None
    sold(market_stripe, seller, buyer)
    payout = _recorded_while_stripe_is_down(market_stripe)
    made = _payout_create_at_stripe(payout)
    # and more than a day passes: Stripe no longer knows the call's idempotency key
    market_stripe.standin.expire_idempotency_keys()

    # when: the payout run sends the pending payout again
    assert payouts_run(now=timezone.now() + LATER) == 1

    # then: it recorded what Stripe already made; the seller is paid once
    payout.refresh_from_db()
    assert (payout.method, payout.status, payout.stripe_object_id) == (
        method,
        PayoutStatus.SENT,
        made["id"],
    )
    paid = (
        [t["amount"] for t in market_stripe.transfers(account)]
        if account
        else [-c["amount"] for c in market_stripe.balance_credits(seller)]
    )
    assert paid == [112]
    assert money("payouts") == 112
    assert money("seller_available", organization=seller) == 0
    # and a later run sends nothing more
    assert payouts_run(now=timezone.now() + LATER) == 0


def test_a_pending_payout_never_sent_is_sent_after_the_look_up(market_stripe, seller, buyer):
    # given: a payout recorded while Stripe was down, whose send never reached Stripe
    account = market_stripe.connect_account(seller)
    sold(market_stripe, seller, buyer)
    payout = _recorded_while_stripe_is_down(market_stripe)

    # when: Stripe is back
    assert payouts_run(now=timezone.now() + LATER) == 1

    # then: the look-up found nothing, and the transfer was made, in the payout's own group
    [transfer] = market_stripe.transfers(account)
    assert (transfer["amount"], transfer["transfer_group"]) == (112, f"market-payout-{payout.pk}")
    assert MarketPayout.objects.get().stripe_object_id == transfer["id"]
