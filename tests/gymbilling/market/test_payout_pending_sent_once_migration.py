"""Payouts pending from before sends were counted (gymbilling/0038): a send of that release
that died mid-call (its worker killed) left no count and no error, and may have credited
the seller's customer; gymbilling/0039 counts every pending payout as sent once, so a
customer deleted since is left to finance, not paid again at its replacement.

The payout is made at the Stripe stand-in by the real services; the database is then
migrated back to 0038 and forward. A worker of that release still up after 0039 ran can
leave such a payout too: the `payouts_pending_sent_once` command counts it, run once no
such worker is left.
"""

from __future__ import annotations

import io

from django.core.management import call_command
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


def _sent_by_an_old_worker_that_died(market_stripe, seller, buyer):
    """A payout of 112 to the seller's customer, recorded, and credited there by a send of
    the release before counted sends whose worker was killed mid-call: pending, no count,
    no error; Stripe has forgotten the send's key since. Another seller's payout, sent.
    The customer then deleted at Stripe and replaced by a new one. Returns the two
    payouts, the deleted customer and its replacement."""
    sold(market_stripe, seller, buyer)
    payout = _recorded_not_sent(seller)
    gone = _seller_customer(seller)
    assert _payout_create_at_stripe(payout)["customer"] == gone.stripe_customer_id
    market_stripe.standin.expire_idempotency_keys()
    sent = MarketPayout.objects.create(
        seller=buyer,
        currency="usd",
        amount=5,
        method=PayoutMethod.INVOICE_CREDIT,
        destination="cus_elsewhere",
        status=PayoutStatus.SENT,
    )
    market_stripe.delete_customer(gone.stripe_customer_id)
    billing_customer_replace(customer=gone)
    replacement = _seller_customer(seller).stripe_customer_id
    assert replacement != gone.stripe_customer_id
    return payout, sent, gone


def _left_to_finance_not_paid_again(market_stripe, seller, payout, gone) -> None:
    """The payout run sends the payout again: it is not paid to the new customer but
    failed for finance, the proceeds back to available."""
    payouts_run(now=timezone.now() + LATER)
    payout.refresh_from_db()
    assert (payout.status, payout.destination) == (PayoutStatus.FAILED, gone.stripe_customer_id)
    assert payout.may_have_paid
    assert market_stripe.balance_credits(seller) == []  # the replacement's: nothing
    assert money("payouts") == 0
    assert money("seller_available", organization=seller) == 112


def test_a_payout_pending_from_before_counted_sends_is_not_paid_again_at_a_replacement(
    transactional_db, market_stripe, seller, buyer, migrated_back_and_forth
):
    # given: a payout the release before counted sends credited at Stripe, its worker
    # killed mid-call, and the customer it went to deleted and replaced since
    payout, sent, gone = _sent_by_an_old_worker_that_died(market_stripe, seller, buyer)

    # when: the database is migrated back to 0038 and forward (the deploy)
    migrated_back_and_forth(BEFORE)

    # then: the pending payout counts as sent once, the sent one as it was
    counts = dict(MarketPayout.objects.values_list("pk", "send_attempts"))
    assert counts == {payout.pk: 1, sent.pk: 0}
    # and the payout run leaves it to finance rather than paying the replacement
    _left_to_finance_not_paid_again(market_stripe, seller, payout, gone)


def test_a_payout_an_old_worker_sent_after_0039_is_counted_by_the_command(
    db, market_stripe, seller, buyer
):
    # given: 0039 applied, then a worker of the release before it, still up during the
    # deploy, recorded and sent a payout and was killed mid-call (no count, no error);
    # the customer it went to deleted and replaced since
    payout, sent, gone = _sent_by_an_old_worker_that_died(market_stripe, seller, buyer)

    # when: the operator runs the command once no old worker is left, twice (it is safe
    # to run again)
    out, again = io.StringIO(), io.StringIO()
    call_command("payouts_pending_sent_once", stdout=out)
    call_command("payouts_pending_sent_once", stdout=again)

    # then: the pending payout counts as sent once, the sent one as it was, and the
    # command said how many it counted
    counts = dict(MarketPayout.objects.values_list("pk", "send_attempts"))
    assert counts == {payout.pk: 1, sent.pk: 0}
    assert out.getvalue().startswith("1 pending payouts")
    assert again.getvalue().startswith("0 pending payouts")
    # and the payout run leaves it to finance rather than paying the replacement
    _left_to_finance_not_paid_again(market_stripe, seller, payout, gone)
