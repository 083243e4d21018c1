"""Lots granted before lots said what they were sold for get it from the migrations
(metering/0016 and gymbilling/0014), as their grants would write it now.

The ledger is made by the real services (Stripe stand-in, marketplace, holds), then the
database is migrated back to before the columns existed (dropping them, and what they
held) and forward again: the backfill must find, from the invoices, checkouts and
lots alone, what the grants had written.
"""

from __future__ import annotations

import importlib
import io

from django.core.management import call_command

from metering.models import CreditLot
from metering.services import credits_grant
from tests.factories import OrganizationFactory
from tests.gymbilling.billing.conftest import report_rows
from tests.gymbilling.market.conftest import market_member, sold
from tests.helpers import credits, job_settled, migrate, migrate_to_latest

BEFORE = [
    ("metering", "0015_capture_burns_claimed_lots_last"),
    ("gymbilling", "0013_payment_reversal_lost_at"),
]


def _sales() -> dict[int, tuple]:
    return {
        lot.pk: (lot.root_id, lot.revenue, lot.revenue_currency, lot.origin)
        for lot in CreditLot.objects.order_by("pk")
    }


def _lots_of_every_sale(buy, market_stripe, free_credits) -> tuple:
    """A Pro member (its period's credits, its overage allowance, a pack) who resold 1,200
    credits on the marketplace (split three lots deep, down to the buyer's), and another
    team with free credits (a promotion, an adjustment): (member, buyer, other)."""
    member = OrganizationFactory(slug="member")
    buy(member, plan="pro")
    buy(member, pack="boost-1k")
    buyer = market_member()
    sold(market_stripe, member, buyer, quantity=credits(1_200), price=500)
    other = OrganizationFactory()
    free_credits(other)
    return member, buyer, other


def test_the_migrations_backfill_what_each_lot_was_sold_for(
    transactional_db,
    buy,
    market_stripe,
    free_credits,
    migrated_back_and_forth,
    monkeypatch,
):
    # given a ledger of every kind of lot: a Pro member (its period's credits, its
    # overage allowance) who resold 1,200 credits on the marketplace (split three lots
    # deep, down to the buyer's), a pack, a promotion, an adjustment, paid credits of
    # unknown price; some of it burned
    member, buyer, other = _lots_of_every_sale(buy, market_stripe, free_credits)
    credits_grant(
        organization=other, amount=credits(2), source="pack", paid=True, resellable=False, key="c"
    )
    job_settled(member, credits(700), model_name="gym-tiny", serving_cost=10)
    job_settled(buyer, credits(600), model_name="gym-large", serving_cost=20)
    job_settled(other, credits(17), model_name="gym-tiny", serving_cost=30)
    granted, report = _sales(), {g: report_rows(g) for g in ("model", "plan", "organization")}

    # when the database goes back to before the columns, and forward again, two lots a
    # batch (so that parents and their roots are in earlier batches)
    for name in ("metering.migrations.0016_creditlot_revenue", "gymbilling.migrations.0014_creditlot_sale_backfill"):  # fmt: skip
        monkeypatch.setattr(importlib.import_module(name), "BATCH", 2)
    migrated_back_and_forth(BEFORE)

    # then every lot says again what its grant said: roots of split lots, a pack's
    # checkout total, the invoice's plan and amount, the overage allowance at the plan's
    # rate, free credits at 0, unknown prices unknown; and the report is the same
    backfilled = _sales()
    assert backfilled == granted
    lots = CreditLot.objects.filter(parent=None)
    assert {(lot.source, lot.revenue, lot.revenue_currency, lot.origin) for lot in lots} == {
        ("subscription", 9_900, "usd", "pro"),
        ("overage", 20_000 * 900 // 1_000, "usd", "pro"),
        ("pack", 1_200, "usd", "pack"),
        ("promotion", 0, "", ""),
        ("adjustment", 0, "", ""),
        ("pack", None, "", ""),
    }
    plan_lot = lots.get(organization=member, source="subscription")
    bought = CreditLot.objects.get(organization=buyer, account__kind="wallet")
    assert bought.parent.parent.parent == plan_lot and bought.root == plan_lot
    assert {g: report_rows(g) for g in report} == report


def test_a_renewal_that_also_billed_overage_counts_only_the_plan_s_price(
    transactional_db, buy, migrated_back_and_forth
):
    # given a Pro member whose renewal invoice also billed last period's overage (paid
    # $99.00 + $4.50), as its mirror shows it
    member = OrganizationFactory()
    buy(member, plan="pro")
    invoice = member.invoices.get()
    type(invoice).objects.filter(pk=invoice.pk).update(amount_paid=9_900 + 450)

    # when the backfill prices its credits
    migrated_back_and_forth(BEFORE)

    # then they are sold at the plan's price, not with the overage, which the overage
    # allowance's own revenue counts
    lot = CreditLot.objects.get(organization=member, source="subscription")
    assert (lot.revenue, lot.origin) == (9_900, "pro")


def test_the_backfill_leaves_what_a_grant_wrote_alone(
    transactional_db, buy, migrated_back_and_forth
):
    # given a pack whose grant wrote its sale (here, other than its checkout says)
    member = OrganizationFactory()
    buy(member, pack="boost-1k")
    lot = CreditLot.objects.get(organization=member)
    CreditLot.objects.filter(pk=lot.pk).update(revenue=5, revenue_currency="eur", origin="x")

    # when the backfill runs again (gymbilling's migration alone, back and forward)
    migrate([("gymbilling", "0013_payment_reversal_lost_at")])
    migrate_to_latest()

    # then the lot keeps what its grant said
    lot.refresh_from_db()
    assert (lot.revenue, lot.revenue_currency, lot.origin) == (5, "eur", "x")


def test_lots_backfill_sale_roots_and_prices_what_old_processes_wrote_after_0016(
    transactional_db, buy, market_stripe, free_credits
):
    # given, after 0016 ran, lots that processes still running the code before it
    # wrote during a rolling deploy: a pack's and a plan's grants with no sale, a free
    # grant without its 0, and a marketplace purchase three splits deep with no roots
    _lots_of_every_sale(buy, market_stripe, free_credits)
    granted = _sales()
    CreditLot.objects.update(root=None, revenue=None, revenue_currency="", origin="")

    # when the operator runs the command, twice (it is safe to run again)
    out = io.StringIO()
    call_command("lots_backfill_sale", stdout=out)
    call_command("lots_backfill_sale", stdout=io.StringIO())

    # then every lot says what its grant would have written, and the command said so
    assert _sales() == granted
    assert "0 split lots without a root, 0 granted lots without a price" in out.getvalue()
