"""A seller whose reselling a refund or dispute froze is not paid until finance lifts it.

Stripe is the stand-in over HTTP. The freeze is billing's own (`resale_freeze`), taken
by a dispute delivered from the stand-in, or called as its webhook does; where a test
needs it to land at one point of a payout in flight, a wrapper around a service only
decides when it runs (nothing is mocked).
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from gymbilling.market import services as market_services
from gymbilling.market.services import (
    _fill_mature,
    _payout_record,
    payouts_retry,
    payouts_run,
)
from gymbilling.models import (
    BillingCustomer,
    MarketFill,
    MarketPayout,
    MarketReversal,
    PayoutStatus,
    ProceedsState,
)
from gymbilling.services.customers import billing_customer_replace
from gymbilling.services.payments import resale_freeze, resale_unfreeze
from metering.reconcile import ledger_reconcile
from tests.gymbilling.market.conftest import (
    dispute_at_stripe,
    market_member,
    money,
    refund,
    sold,
)
from tests.helpers import credits, on_own_connection, run_against_paused

LATER = timedelta(days=8)
CHANGELIST = "/admin/gymbilling/marketpayout/"


def _later():
    return timezone.now() + LATER


def _lift(seller) -> None:
    """Finance lift the freeze they were shown (admin: Billing customers)."""
    customer = BillingCustomer.objects.get(organization=seller)
    resale_unfreeze(
        customer_id=customer.pk, frozen_at=customer.resale_frozen_at, note="looked", actor=None
    )


def _matured(seller) -> None:
    for pk in MarketFill.objects.filter(seller=seller).values_list("pk", flat=True):
        _fill_mature(fill_id=pk, now=_later())


def _refused(market_stripe, seller, buyer) -> tuple[MarketPayout, str]:
    """A sale's 112 whose transfer Stripe refused (the seller's Connect account could not
    receive transfers, fixed since): the payout holds the seller's payouts until finance
    retries it. Returns it and the account."""
    account = market_stripe.connect_account(seller)
    market_stripe.standin.set_capabilities(account, transfers="inactive")
    sold(market_stripe, seller, buyer)
    assert payouts_run(now=_later()) == 0
    market_stripe.standin.set_capabilities(account, transfers="active")
    refused = MarketPayout.objects.get()
    assert (refused.status, refused.retry_allowed_at) == (PayoutStatus.FAILED, None)
    return refused, account


def _disputed_at_the_record(monkeypatch, seller, reason: str, *, before: bool = False) -> None:
    """A dispute freezes the seller (`reason`) when a payout of theirs is recorded: once it
    is recorded (committed), or `before` it is."""
    real_record = market_services._payout_record

    def record(**kwargs):
        if before:
            resale_freeze(organization=seller, reason=reason)
        payout = real_record(**kwargs)
        if not before:
            resale_freeze(organization=seller, reason=reason)
        return payout

    monkeypatch.setattr(market_services, "_payout_record", record)


def _paid_once_when_lifted(market_stripe, monkeypatch, seller, account, amount=112) -> None:
    """Finance lift the freeze (no dispute comes again): the payout run pays the seller's
    `amount`, once."""
    monkeypatch.undo()
    _lift(seller)
    assert payouts_run(now=_later()) == 1
    assert payouts_run(now=_later()) == 0
    assert [t["amount"] for t in market_stripe.transfers(account)] == [amount]
    assert money("seller_available", organization=seller) == 0
    assert ledger_reconcile().ok


def _recorded_then_frozen(market_stripe, seller, buyer):
    """A sale's 112 (the buyer paid 124, fee 12), its payout recorded and not sent yet (the
    run that recorded it ended first: no send has called Stripe for it), then the seller
    frozen by a dispute. Returns the order, the payout and the seller's Connect account."""
    account = market_stripe.connect_account(seller)
    order = sold(market_stripe, seller, buyer)
    _matured(seller)
    payout = _payout_record(seller_id=seller.pk, currency="usd")
    assert (payout.status, payout.send_attempts, payout.last_error) == (
        PayoutStatus.PENDING,
        0,
        "",
    )
    resale_freeze(organization=seller, reason="dispute of ch_1")
    return order, payout, account


def _frozen_listed(admin_client) -> list[int]:
    """The payouts the admin lists under "holding the seller's payouts: frozen seller"."""
    listed = admin_client.get(CHANGELIST, {"holding": "frozen"})
    return [p.pk for p in listed.context["cl"].result_list]


def test_a_never_sent_payout_of_a_seller_frozen_since_is_closed_and_their_refunds_are_theirs(
    market_stripe, seller, buyer, admin_client
):
    # given: a payout of the seller's 112, recorded, never sent; then the seller frozen
    order, payout, account = _recorded_then_frozen(market_stripe, seller, buyer)

    # when: the payout run comes
    assert payouts_run(now=_later()) == 0

    # then: closed unsent, why on it; the 112 back in the seller's available proceeds, its
    # sale unpaid again, nothing at Stripe; finance find it under the frozen sellers'
    payout.refresh_from_db()
    assert payout.status == PayoutStatus.SELLER_FROZEN
    assert payout.last_error.startswith(
        "not sent: the seller's reselling is frozen (dispute of ch_1)"
    )
    assert market_stripe.transfers(account) == []
    assert money("seller_available", organization=seller) == 112
    assert money("payouts") == 0
    assert MarketFill.objects.get(seller=seller).proceeds == ProceedsState.AVAILABLE
    assert _frozen_listed(admin_client) == [payout.pk]
    assert ledger_reconcile().ok

    # when: the buyer is refunded half the sale (62: fee 6, the seller's 56) while the
    # seller is frozen, and the payout run comes again
    refund(order, 62)
    assert payouts_run(now=_later()) == 0

    # then: the seller's 56 came out of their proceeds, none of it the platform's loss,
    # and nothing was recorded for the frozen seller
    assert money("seller_available", organization=seller) == 56
    assert money("losses") == 0
    [reversal] = MarketReversal.objects.filter(order=order)
    assert (reversal.seller_reversed, reversal.loss) == (56, 0)
    assert list(MarketPayout.objects.filter(seller=seller)) == [payout]
    assert ledger_reconcile().ok

    # when: finance lifts the freeze, and the payout runs come
    _lift(seller)
    assert payouts_run(now=_later()) == 1
    assert payouts_run(now=_later()) == 0

    # then: one new payout of the 56 left, paid once; the closed one waits for nothing
    new = MarketPayout.objects.exclude(pk=payout.pk).get(seller=seller)
    assert (new.status, new.amount) == (PayoutStatus.SENT, 56)
    assert [t["amount"] for t in market_stripe.transfers(account)] == [56]
    assert money("seller_available", organization=seller) == 0
    assert money("payouts") == 56
    assert _frozen_listed(admin_client) == []
    assert ledger_reconcile().ok
    # and a later freeze does not list the closed one again: the new payout paid it
    resale_freeze(organization=seller, reason="dispute of ch_2")
    assert _frozen_listed(admin_client) == []


def test_a_refund_booked_as_a_loss_against_a_payout_closed_for_a_freeze_is_the_seller_s(
    market_stripe, seller, buyer
):
    # given: a payout of the seller's 112, recorded, never sent, the seller frozen; and half
    # its sale refunded before any send came: its fill paid out, the seller's 56 of it
    # booked as the platform's loss, as for any payout in flight
    order, payout, account = _recorded_then_frozen(market_stripe, seller, buyer)
    refund(order, 62)
    assert money("losses") == -56  # the losses account: debits negative

    # when: the payout run comes
    assert payouts_run(now=_later()) == 0

    # then: closed unsent, and the loss taken from the seller's share instead: 56 left
    payout.refresh_from_db()
    assert payout.status == PayoutStatus.SELLER_FROZEN
    assert money("losses") == 0
    assert money("seller_available", organization=seller) == 56
    [reversal] = MarketReversal.objects.filter(order=order)
    assert (reversal.seller_reversed, reversal.loss) == (56, 0)
    assert market_stripe.transfers(account) == []
    assert ledger_reconcile().ok
    # and once the freeze is lifted, the next run pays the 56 left, once
    _lift(seller)
    assert payouts_run(now=_later()) == 1
    assert payouts_run(now=_later()) == 0
    assert [t["amount"] for t in market_stripe.transfers(account)] == [56]
    assert ledger_reconcile().ok


def test_a_pending_payout_an_earlier_send_may_have_sent_waits_for_the_freeze(
    market_stripe, seller, buyer, deliver, admin_client
):
    # given: a payout of the seller's 112 recorded while Stripe was down (still pending; its
    # send called Stripe, which may have paid it)
    account = market_stripe.connect_account(seller)
    sold(market_stripe, seller, buyer)
    market_stripe.down = True
    assert payouts_run(now=_later()) == 0
    market_stripe.down = False
    payout = MarketPayout.objects.get(seller=seller)
    assert (payout.status, payout.send_attempts) == (PayoutStatus.PENDING, 1)
    # and then the seller, buying credits on the marketplace, disputes that payment
    other = market_member(credits_amount=credits(1000))
    bought = sold(market_stripe, other, seller)
    dispute_at_stripe(market_stripe, bought)
    deliver()
    assert BillingCustomer.objects.get(organization=seller).resale_frozen_at is not None

    # when: the next payout runs come, Stripe up
    payouts_run(now=_later())
    payouts_run(now=_later())

    # then: not undone (Stripe may have paid it): still pending, nothing reached the
    # seller's account, and why is on the payout; finance finds it under the frozen
    # sellers' payouts
    payout.refresh_from_db()
    assert payout.status == PayoutStatus.PENDING
    assert payout.last_error.startswith("held: the seller's reselling is frozen (dispute of ")
    assert "an earlier send may have reached Stripe" in payout.last_error
    assert market_stripe.transfers(account) == []
    assert money("payouts") == 112  # recorded, not sent
    assert _frozen_listed(admin_client) == [payout.pk]
    assert ledger_reconcile().ok

    # when: finance lifts the freeze, and the payout runs come again
    _lift(seller)
    payouts_run(now=_later())
    payouts_run(now=_later())

    # then: the seller is paid the 112, once, and the hold's note is gone
    assert [t["amount"] for t in market_stripe.transfers(account)] == [112]
    payout.refresh_from_db()
    assert (payout.status, payout.last_error) == (PayoutStatus.SENT, "")
    assert MarketPayout.objects.filter(seller=seller).count() == 1
    assert money("seller_available", organization=seller) == 0
    assert _frozen_listed(admin_client) == []
    assert ledger_reconcile().ok


def test_finance_see_a_held_payout_that_may_have_been_sent_and_what_its_refunds_lost(
    market_stripe, seller, buyer, deliver, admin_client
):
    # given: a payout of the seller's 112 whose send Stripe did not answer (pending, maybe
    # paid), the seller then frozen by a dispute of their own marketplace payment; and a
    # never-sent payout of another frozen seller's, closed for its freeze
    account = market_stripe.connect_account(seller)
    order = sold(market_stripe, seller, buyer)
    market_stripe.down = True
    assert payouts_run(now=_later()) == 0
    market_stripe.down = False
    held = MarketPayout.objects.get(seller=seller)
    other = market_member(credits_amount=credits(1000))
    dispute_at_stripe(market_stripe, sold(market_stripe, other, seller))
    deliver()
    payouts_run(now=_later())
    other_seller = market_member(credits_amount=credits(1000))
    _, closed, _ = _recorded_then_frozen(market_stripe, other_seller, buyer)
    payouts_run(now=_later())
    closed.refresh_from_db()
    assert closed.status == PayoutStatus.SELLER_FROZEN

    # when: half the held payout's sale is refunded (62: fee 6, the seller's 56) while the
    # freeze lasts
    refund(order, 62)

    # then: the seller's 56 is the platform's loss (Stripe may have paid it, so the payout
    # is not undone), and finance find that payout, and only it, under its own filter,
    # saying what its refunds lost
    assert money("losses") == -56
    listed = admin_client.get(CHANGELIST, {"holding": "frozen_held"})
    assert [(p.pk, p.lost) for p in listed.context["cl"].result_list] == [(held.pk, 56)]
    assert sorted(_frozen_listed(admin_client)) == sorted([held.pk, closed.pk])
    assert market_stripe.transfers(account) == []
    assert ledger_reconcile().ok


def test_a_seller_frozen_between_the_record_and_the_send_of_one_run_is_not_paid(
    market_stripe, seller, buyer, monkeypatch
):
    # given: a sale's 112, and a dispute that freezes the seller while the payout run is
    # calling Stripe for other payouts: after it recorded the seller's payout, before it
    # sends it
    account = market_stripe.connect_account(seller)
    sold(market_stripe, seller, buyer)
    _disputed_at_the_record(monkeypatch, seller, "dispute of ch_mid_run")

    # when: the payout run goes on to send it
    assert payouts_run(now=_later()) == 0

    # then: recorded, never sent, so closed unsent: the 112 back to available, nothing at
    # Stripe
    payout = MarketPayout.objects.get()
    assert payout.status == PayoutStatus.SELLER_FROZEN
    assert "dispute of ch_mid_run" in payout.last_error
    assert market_stripe.transfers(account) == []
    assert money("seller_available", organization=seller) == 112
    assert money("payouts") == 0
    assert ledger_reconcile().ok
    # and once the freeze is lifted, the next run pays it in a new payout, once
    _paid_once_when_lifted(market_stripe, monkeypatch, seller, account)
    assert MarketPayout.objects.exclude(pk=payout.pk).get().status == PayoutStatus.SENT


def test_no_payout_is_recorded_for_a_frozen_seller(market_stripe, seller, buyer):
    # given: a seller with a sale's 112 available, frozen by a dispute
    sold(market_stripe, seller, buyer)
    _matured(seller)
    resale_freeze(organization=seller, reason="dispute of ch_1")

    # when: a payout of their proceeds is recorded (as the payout run and Retry do)
    payout = _payout_record(seller_id=seller.pk, currency="usd")

    # then: none: the 112 stays available, where a refund or dispute can still reach it
    assert payout is None
    assert not MarketPayout.objects.exists()
    assert money("seller_available", organization=seller) == 112
    assert money("payouts") == 0


def _while_a_freeze_commits(seller, work) -> None:
    """`work()` on a connection of its own while a dispute's freeze of the seller, on
    another, has locked what it locks and not committed yet; once `work` waits for a lock
    (or ends), the freeze commits. What either raises fails the test."""
    errors: list = []
    resume, frozen = threading.Event(), threading.Event()

    def freeze_then_wait():
        with transaction.atomic():
            resale_freeze(organization=seller, reason="dispute of ch_race")
            frozen.set()
            resume.wait(timeout=60)

    freeze = threading.Thread(target=on_own_connection, args=(freeze_then_wait, errors))
    freeze.start()
    assert frozen.wait(timeout=60)
    working = threading.Thread(target=on_own_connection, args=(work, errors))
    run_against_paused(working, paused=freeze, resume=resume, what="the work to wait")
    assert errors == []


@pytest.mark.django_db(transaction=True)
def test_a_payout_recorded_while_a_freeze_commits_waits_for_it_and_records_nothing(
    market_stripe,
):
    # given: a seller with a sale's 112 available, and a dispute freezing them, not
    # committed yet
    seller = market_member(credits_amount=credits(1000))
    sold(market_stripe, seller, market_member())
    _matured(seller)

    # when: a payout of the seller's proceeds is recorded meanwhile
    recorded: list = []
    _while_a_freeze_commits(
        seller, lambda: recorded.append(_payout_record(seller_id=seller.pk, currency="usd"))
    )

    # then: it waited for the freeze and recorded nothing: the 112 is still available
    assert recorded == [None]
    assert not MarketPayout.objects.exists()
    assert money("seller_available", organization=seller) == 112
    assert ledger_reconcile().ok


@pytest.mark.django_db(transaction=True)
def test_a_retry_while_a_freeze_commits_waits_for_it_and_releases_nothing(market_stripe):
    # given: a refused payout of the seller's 112 (the cause fixed since), and a dispute
    # freezing the seller, not committed yet
    seller = market_member(credits_amount=credits(1000))
    refused, account = _refused(market_stripe, seller, market_member())

    # when: finance retries the payout meanwhile
    retried: dict = {}
    _while_a_freeze_commits(seller, lambda: retried.update(payouts_retry(payout_ids=[refused.pk])))

    # then: it waited, found the seller frozen, and changed nothing: nothing paid, the
    # refused payout still holds the seller's payouts
    assert retried == {refused.pk: "frozen"}
    refused.refresh_from_db()
    assert (refused.status, refused.retry_allowed_at) == (PayoutStatus.FAILED, None)
    assert MarketPayout.objects.count() == 1
    assert market_stripe.transfers(account) == []
    assert money("seller_available", organization=seller) == 112


def test_a_retry_whose_seller_is_frozen_once_released_records_and_sends_nothing(
    market_stripe, seller, buyer, monkeypatch
):
    # given: a refused payout of the seller's 112 (the cause fixed since); finance
    # retries it, and a dispute freezes the seller once the retry released it, before it
    # records the seller's new payout
    refused, account = _refused(market_stripe, seller, buyer)
    _disputed_at_the_record(monkeypatch, seller, "dispute of ch_in_retry", before=True)

    # when
    results = payouts_retry(payout_ids=[refused.pk])

    # then: nothing recorded nor paid, and finance is told why
    assert results == {refused.pk: "released; the seller is frozen: paid once it is lifted"}
    assert MarketPayout.objects.count() == 1
    assert market_stripe.transfers(account) == []
    assert money("seller_available", organization=seller) == 112
    # and once the freeze is lifted, the payout run pays the 112, once
    _paid_once_when_lifted(market_stripe, monkeypatch, seller, account)


def test_a_retry_whose_seller_is_frozen_once_recorded_closes_the_new_payout_unsent(
    market_stripe, seller, buyer, monkeypatch
):
    # given: a refused payout of the seller's 112 (the cause fixed since); finance
    # retries it, and a dispute freezes the seller once the retry recorded the new
    # payout, before it sends it
    refused, account = _refused(market_stripe, seller, buyer)
    _disputed_at_the_record(monkeypatch, seller, "dispute of ch_in_retry")

    # when
    results = payouts_retry(payout_ids=[refused.pk])

    # then: the new payout, never sent, is closed unsent, its 112 back to available, and
    # finance is told why
    new = MarketPayout.objects.exclude(pk=refused.pk).get()
    assert results == {refused.pk: "released; the seller is frozen: paid once it is lifted"}
    assert new.status == PayoutStatus.SELLER_FROZEN
    assert market_stripe.transfers(account) == []
    assert money("seller_available", organization=seller) == 112
    assert ledger_reconcile().ok
    # and once the freeze is lifted, the payout run pays the 112, once
    _paid_once_when_lifted(market_stripe, monkeypatch, seller, account)


def test_a_payout_the_previous_release_held_for_a_freeze_counts_as_never_sent_once_lifted(
    market_stripe, seller, buyer
):
    # given: a seller paid by balance credits, whose payout of 112 was recorded and never
    # sent (the run that recorded it ended first); a dispute froze them, and a payout run
    # of the previous release held it for the freeze, pending (no Stripe call, none
    # counted; this release closes such a payout instead)
    sold(market_stripe, seller, buyer)
    _matured(seller)
    payout = _payout_record(seller_id=seller.pk, currency="usd")
    resale_freeze(organization=seller, reason="dispute of ch_1")
    MarketPayout.objects.filter(pk=payout.pk).update(
        last_error="held: the seller's reselling is frozen (dispute of ch_1) since "
        "2026-12-01T00:00:00+00:00: not sent. Sent by the first payout run once finance "
        'lifts the freeze (Billing customers, "Allow reselling again").'
    )
    payout.refresh_from_db()
    assert (payout.status, payout.send_attempts) == (PayoutStatus.PENDING, 0)
    # and, the freeze lifted, the seller's Stripe customer was deleted and replaced
    _lift(seller)
    gone = BillingCustomer.objects.get(organization=seller)
    market_stripe.delete_customer(gone.stripe_customer_id)
    replacement = billing_customer_replace(customer=gone).stripe_customer_id

    # when: the payout run sends it
    assert payouts_run(now=_later()) == 1

    # then: the hold was no send that may have credited the deleted customer: the 112 went
    # to the replacement, once, not to finance as a payout that may have paid
    payout.refresh_from_db()
    assert (payout.status, payout.may_have_paid, payout.destination) == (
        PayoutStatus.SENT,
        False,
        replacement,
    )
    assert [(c["amount"], c["customer"]) for c in market_stripe.balance_credits(seller)] == [
        (-112, replacement)
    ]


def test_a_payout_the_previous_release_held_for_a_freeze_still_on_is_closed_unsent(
    market_stripe, seller, buyer
):
    # given: a payout of the seller's 112, recorded, never sent, the seller frozen, and
    # held pending by a payout run of the previous release (its note, no send counted)
    _, payout, account = _recorded_then_frozen(market_stripe, seller, buyer)
    MarketPayout.objects.filter(pk=payout.pk).update(
        last_error="held: the seller's reselling is frozen (dispute of ch_1) since "
        "2026-12-01T00:00:00+00:00: not sent."
    )

    # when: the payout run comes, the seller still frozen
    assert payouts_run(now=_later()) == 0

    # then: the hold was no send: closed unsent, the 112 back to available
    payout.refresh_from_db()
    assert payout.status == PayoutStatus.SELLER_FROZEN
    assert money("seller_available", organization=seller) == 112
    assert money("payouts") == 0
    assert market_stripe.transfers(account) == []
    assert ledger_reconcile().ok
