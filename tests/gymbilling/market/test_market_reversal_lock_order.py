"""One lock order for a marketplace order's refunds and disputes and the ledger (in
gymbilling.market.services): a reversal being applied, which settles the order's earlier
reversals still waiting for the buyer's running work first, meets the pending sweep, each
on a connection of its own, where the reversal used to hold the buyer's wallet and wait
for a reversal row that the sweep held while waiting for the wallet. Both go through, and
the ledger is right."""

from __future__ import annotations

import threading

import pytest

from gymbilling.market import services as market_services
from gymbilling.market.services import market_reversals_pending_settle
from gymbilling.models import MarketReversal
from metering.models import LedgerAccount
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import hold_place, hold_release
from tests.gymbilling.market.conftest import market_member, refund, sold
from tests.helpers import (
    credits,
    no_deadlock_retries,
    on_own_connection,
    pause_after,
    run_against_paused,
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
