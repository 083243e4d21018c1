"""Market refunds and disputes written before gymbilling/0022 held all they returned in
`amount`; gymbilling/0023 leaves there what the money ledger took back of the sale (their
reversal:<key>:<fill> transactions) and moves the rest to `unapplied`, and leaves rows that
hold it already as they are.

The histories are made at the Stripe stand-in and applied by the real services, which write
each row as 0022 has it; the rows that returned more than the sale had left are then given
what the code before 0022 wrote (all of it in `amount`, `unapplied` 0: the money ledger was
right, so only the row differs), and the database is migrated back to 0022 and forward.
"""

from __future__ import annotations

import importlib
from datetime import timedelta

from django.db.models import F
from django.utils import timezone

from gymbilling import stripe_client
from gymbilling.models import MarketOrder, MarketReversal
from gymbilling.selectors import reversals_by_customer
from metering.reconcile import ledger_reconcile
from tests.gymbilling.market.conftest import market_member, refunded_then_disputed
from tests.helpers import credits

BEFORE = [("gymbilling", "0022_marketreversal_unapplied")]


def as_before_0022() -> None:
    """What the code before 0022 wrote for a refund given as Stripe's running total, or a
    dispute: all it returned, in its amount."""
    MarketReversal.objects.filter(unapplied__gt=0).update(
        amount=F("amount") + F("unapplied"), unapplied=0
    )


def recorded(order: MarketOrder) -> list[tuple[str, int, int]]:
    """The order's refunds and disputes: (kind, amount, unapplied)."""
    rows = MarketReversal.objects.filter(order=order).order_by("pk")
    return [(row.kind, row.amount, row.unapplied) for row in rows]


def report() -> dict[str, tuple[int, int]]:
    """Finance's reversals report of today: (marketplace reversed, unapplied) per buyer."""
    now = timezone.now()
    rows = reversals_by_customer(start=now - timedelta(days=1), end=now + timedelta(days=1))
    return {row["customer"]: (row["market_reversed"], row["market_unapplied"]) for row in rows}


def test_reversals_that_returned_more_than_the_sale_had_left_keep_in_amount_what_it_took(
    transactional_db,
    market_stripe,
    unrefunded_shortfall,
    buyer,
    deliver,
    migrated_back_and_forth,
    monkeypatch,
):
    # given: a sale half refunded, then disputed whole after the seller was paid the
    # other half (the dispute's 56 a loss), and the dispute won: its loss zeroed
    won_buyer = market_member()
    won = refunded_then_disputed(
        market_stripe,
        market_member(credits_amount=credits(1000)),
        won_buyer,
        deliver,
        paid_out=True,
        won=True,
    )
    # and the same before any payout, not won
    disputed_buyer = market_member()
    disputed = refunded_then_disputed(
        market_stripe, market_member(credits_amount=credits(1000)), disputed_buyer, deliver
    )
    # and an order that delivered nothing of the 30 paid, its shortfall refund not made,
    # refunded whole by hand in Stripe's dashboard
    short, intent = unrefunded_shortfall
    stripe_client.refund_create(key=f"dashboard:{short.pk}", payment_intent=intent)
    deliver()
    # all written before 0022
    as_before_0022()
    assert recorded(won) == [("refund", 62, 0), ("dispute", 124, 0)]
    assert recorded(disputed) == [("refund", 62, 0), ("dispute", 124, 0)]
    assert recorded(short) == [("refund", 30, 0)]
    reinstated = MarketReversal.objects.get(order=won, kind="dispute")
    assert reinstated.reinstated_at is not None
    assert (reinstated.fee_reversed, reinstated.seller_reversed, reinstated.loss) == (6, 0, 0)
    overstated = {won_buyer.slug: (186, 0), disputed_buyer.slug: (186, 0), buyer.slug: (30, 0)}
    assert report() == overstated
    flagged = {v.check: v.rows for v in ledger_reconcile().violations}
    assert {row["key"] for row in flagged["market_reversal_amount"]} == {
        reinstated.key,
        MarketReversal.objects.get(order=disputed, kind="dispute").key,
        MarketReversal.objects.get(order=short).key,
    }

    # when: the database is migrated back to 0022 and forward, two rows a batch
    monkeypatch.setattr(
        importlib.import_module("gymbilling.migrations.0023_marketreversal_unapplied_backfill"),
        "BATCH",
        2,
    )
    migrated_back_and_forth(BEFORE)

    # then: each keeps in its amount what the ledger took back of the sale (the won
    # dispute too, whatever its row's loss says now), the rest beside it; the refunds
    # that took no more than the sale had are as they were
    expected = {
        won: [("refund", 62, 0), ("dispute", 62, 62)],
        disputed: [("refund", 62, 0), ("dispute", 62, 62)],
        short: [("refund", 0, 30)],
    }
    assert {order: recorded(order) for order in expected} == expected
    fixed = {won_buyer.slug: (124, 62), disputed_buyer.slug: (124, 62), buyer.slug: (0, 30)}
    assert report() == fixed
    assert ledger_reconcile().ok

    # when: it runs again (back is a no-op: the rows keep what 0022's code reads)
    migrated_back_and_forth(BEFORE)

    # then: nothing changes
    assert {order: recorded(order) for order in expected} == expected
    assert report() == fixed
