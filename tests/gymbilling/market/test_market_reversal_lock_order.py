"""One lock order for a marketplace order's refunds and disputes and the ledger (in
gymbilling.market.services): a reversal being applied, which settles the order's earlier
reversals still waiting for the buyer's running work first, meets the pending sweep, each
on a connection of its own, where the reversal used to hold the buyer's wallet and wait
for a reversal row that the sweep held while waiting for the wallet. Both go through, and
the ledger is right. And a payout Stripe refuses locks the reversals whose losses it
recovers before the seller's money account, as that order says."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta

import pytest
from django.db import OperationalError, transaction
from django.utils import timezone

from gymbilling.market import services as market_services
from gymbilling.market.services import market_reversals_pending_settle, payout_send, payouts_run
from gymbilling.models import (
    BillingCustomer,
    MarketPayout,
    MarketReversal,
    MoneyAccount,
    MoneyAccountKind,
    PayoutStatus,
)
from metering.models import LedgerAccount
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import hold_place, hold_release
from tests.gymbilling.market.conftest import market_member, money, refund, sold
from tests.helpers import (
    credits,
    lock_waiters,
    no_deadlock_retries,
    on_own_connection,
    pause_after,
    run_against_paused,
    wait_until,
)


def taken_pending_lost(reversal: MarketReversal) -> tuple[int, int, int]:
    reversal.refresh_from_db()
    return (reversal.credits_clawed_back, reversal.credits_pending, reversal.credits_lost)


def wallet_claim(org) -> int:
    return LedgerAccount.objects.get(organization=org, kind="wallet").claimed


@pytest.mark.django_db(transaction=True)
def test_a_market_refund_and_the_pending_sweep_do_not_deadlock(market_stripe, monkeypatch, caplog):
    # given: 100 credits bought for 124, all held by the buyer's running job; a quarter
    # of the charge refunded (31): its 25 credits wait for the job; a quarter more (62
    # in all): 25 more wait for it
    seller = market_member(credits_amount=credits(1000))
    buyer = market_member()
    order = sold(market_stripe, seller, buyer)
    hold_place(organization=buyer, amount=credits(100), key="job-running")
    refund(order, 31)
    refund(order, 62)
    first, second = MarketReversal.objects.order_by("pk")
    assert taken_pending_lost(first) == (0, credits(25), 0)
    assert taken_pending_lost(second) == (0, credits(25), 0)

    # The pending sweep, while the job runs, settles the first refund (nothing came back
    # yet) and pauses once it has locked the second's row, before the wallet.
    no_deadlock_retries(monkeypatch)
    paused, resume = pause_after(
        monkeypatch,
        market_services,
        "_pending_fill_lots",
        thread="sweep",
        when=lambda reversal: reversal.pk == second.pk,
    )
    errors: list = []
    sweeping = threading.Thread(
        name="sweep", target=on_own_connection, args=(market_reversals_pending_settle, errors)
    )
    sweeping.start()
    assert paused.wait(timeout=60)

    # when: a quarter more is refunded (93 in all) and applied meanwhile, on a
    # connection of its own
    refunding = threading.Thread(
        name="refund", target=on_own_connection, args=(lambda: refund(order, 93), errors)
    )
    run_against_paused(
        refunding, paused=sweeping, resume=resume, what="the refund to wait for the sweep"
    )

    # then: both went through, without a deadlock (the sweep logs one it lost); the last
    # refund's 25 wait for the job too, and the wallet claims the three refunds' 75
    assert errors == []
    assert "failed" not in caplog.text
    last = MarketReversal.objects.order_by("pk").last()
    assert (last.amount, taken_pending_lost(last)) == (31, (0, credits(25), 0))
    assert taken_pending_lost(first) == (0, credits(25), 0)
    assert taken_pending_lost(second) == (0, credits(25), 0)
    assert wallet_claim(buyer) == credits(75)
    assert ledger_reconcile().ok

    # when: the job ends without using them, and the sweep runs
    hold_release(key="job-running")
    assert market_reversals_pending_settle() == credits(75)

    # then: the job's credits went back to the three refunds; the buyer keeps the 25
    # of the charge not refunded
    for reversal in (first, second, last):
        assert taken_pending_lost(reversal) == (credits(25), 0, 0)
    assert wallet_claim(buyer) == 0
    assert organization_balance(organization=buyer).total == credits(25)
    assert ledger_reconcile().ok


def locked_elsewhere(reversal: MarketReversal) -> bool:
    """Whether another connection holds the reversal's row lock now (asked without waiting)."""
    try:
        with transaction.atomic():
            list(MarketReversal.objects.select_for_update(nowait=True).filter(pk=reversal.pk))
    except OperationalError:
        return True
    return False


@pytest.mark.django_db(transaction=True)
def test_a_refused_payout_locks_the_reversals_it_recovers_before_the_seller_s_money(
    market_stripe,
):
    # No deadlock to show here: nothing today holds a money account and then waits for a
    # reversal row, so the order the module documents is what this test asserts.
    # given: a sale (124: fee 12, the seller's 112) whose payout was recorded while Stripe
    # was down, to a Connect account Stripe no longer has; half the charge refunded
    # meanwhile: the seller's 56 of it booked as a loss, the fill being paid out
    seller = market_member(credits_amount=credits(1000))
    buyer = market_member()
    BillingCustomer.objects.filter(organization=seller).update(
        stripe_connect_account_id="acct_gone"
    )
    order = sold(market_stripe, seller, buyer)
    market_stripe.down = True
    assert payouts_run(now=timezone.now() + timedelta(days=8)) == 0
    market_stripe.down = False
    payout = MarketPayout.objects.get(status=PayoutStatus.PENDING)
    refund(order, 62)
    reversal = MarketReversal.objects.get()
    assert reversal.loss == 56

    # when: Stripe refuses the payout, sent on a connection of its own while another holds
    # the seller's available proceeds account, which it waits for to recover the loss
    # then: while it waits for that account, it holds the reversal it recovers
    assert reversal_held_while_waiting_for_seller_money(
        seller,
        reversal,
        lambda: payout_send(payout_id=payout.pk),
        what="the refused payout to wait for the seller's money account",
    )

    # and once it has the account: the payout failed, the loss is recovered from the
    # seller's share, and the seller has the other 56 available
    payout.refresh_from_db()
    assert payout.status == PayoutStatus.FAILED
    reversal.refresh_from_db()
    assert (reversal.fee_reversed, reversal.seller_reversed, reversal.loss) == (6, 56, 0)
    assert money("losses") == 0
    assert money("seller_available", organization=seller) == 56
    assert ledger_reconcile().ok


def reversal_held_while_waiting_for_seller_money(
    seller, reversal: MarketReversal, work: Callable[[], object], *, what: str
) -> bool:
    """Run `work` on a connection of its own while another connection holds the seller's
    available proceeds account; once `work` waits for a lock (`what`), whether it holds the
    reversal's row. Returns when `work` is done, the account let go, without errors."""
    held, release = threading.Event(), threading.Event()

    def hold_seller_money() -> None:
        with transaction.atomic():
            MoneyAccount.objects.select_for_update().get(
                kind=MoneyAccountKind.SELLER_AVAILABLE, organization=seller
            )
            held.set()
            release.wait(timeout=60)

    errors: list = []
    holding = threading.Thread(target=on_own_connection, args=(hold_seller_money, errors))
    working = threading.Thread(target=on_own_connection, args=(work, errors))
    holding.start()
    try:
        assert held.wait(timeout=60)
        working.start()
        wait_until(lambda: not working.is_alive() or lock_waiters() > 0, what=what)
        reversal_held = working.is_alive() and locked_elsewhere(reversal)
    finally:
        release.set()
        holding.join(timeout=120)
        if working.ident is not None:
            working.join(timeout=120)
    assert errors == []
    assert not working.is_alive()
    return reversal_held
