"""Finance's usage, revenue and margin report over the ledger alone (metering's selector).

Lots say what they were sold for at their grant (LotSale), as gymbilling's grants do
(tests/gymbilling/billing/test_revenue_report.py drives those through Stripe); the
usage comes from real holds and captures.
"""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.errors import ApplicationError
from metering.models import CreditLot
from metering.selectors import _floor_share, report_sums, usage_margin_report
from metering.services import (
    LotSale,
    Usage,
    credits_expire,
    credits_transfer,
    credits_trim,
    hold_place,
    hold_release,
    lot_clawback,
    lots_trim,
    transaction_reverse,
    usage_record_create,
)
from tests.factories import OrganizationFactory
from tests.helpers import credits, job_settled, usage_draft

pytestmark = pytest.mark.django_db


@pytest.fixture
def sold(grant):
    """Credits granted as sold: `revenue` cents for all of them, by `origin`."""

    def _sold(org, amount: int, revenue: int, origin: str = "pro") -> CreditLot:
        return grant(org, amount, sale=LotSale(revenue=revenue, currency="usd", origin=origin))

    return _sold


def _report(group_by: str = "plan") -> list[dict]:
    now = timezone.now()
    return usage_margin_report(
        start=now - timedelta(days=1), end=now + timedelta(days=1), group_by=group_by
    )


def _figures(rows: list[dict]) -> list[tuple]:
    return [
        (r["group"], r["requests"], r["credits"], r["revenue"], r["serving_cost"], r["margin"])
        for r in rows
    ]


@pytest.mark.parametrize("fast_path", [True, False], ids=["settlement-function", "orm"])
def test_a_reversed_capture_gives_its_revenue_back_and_the_lot_still_earns_its_payment(
    settings, sold, fast_path
):
    settings.METERING_FAST_PATH = fast_path  # both settle with the same rows
    # given 10 credits sold for $7.00, and a job that burned 4 of them, whose capture
    # was then reversed (bad output: the credits went back to the lot)
    org = OrganizationFactory()
    sold(org, credits(10), 700)
    refunded = job_settled(org, credits(4), serving_cost=20)
    transaction_reverse(original=refunded.settle_transaction, reason="bad output")

    # when the member then burns all ten
    job_settled(org, credits(10), serving_cost=50)

    # then the refunded job counts no credits and no revenue (its cost stays: the GPU
    # worked), and the lot earned exactly its $7.00 once
    assert _figures(_report()) == [("pro", 2, credits(10), 700, 70, 630)]


def test_credits_moved_to_another_organization_earn_their_first_sale_s_price(sold):
    # given 30 credits sold for $9.99 to one team, 12 of which it moved to another
    first, second = OrganizationFactory(slug="first"), OrganizationFactory(slug="second")
    lot = sold(first, credits(30), 999)
    credits_transfer(source=first, destination=second, amount=credits(12), key="move-1")
    moved = CreditLot.objects.get(organization=second)
    assert (moved.root_id, moved.revenue) == (lot.pk, None)

    # when both teams burn all they hold, the second first
    job_settled(second, credits(12), serving_cost=1)
    job_settled(first, credits(18), serving_cost=1)

    # then each earned its share of the one payment, which they add up to exactly
    by_team = {r["group"]: r["revenue"] for r in _report("organization")}
    assert by_team == {"second": 999 * 12 // 30, "first": 999 - 999 * 12 // 30}


def _per_lot() -> dict[int, dict]:
    """The report over all time, per root lot (the grouping the per-lot identity reads)."""
    now = timezone.now()
    rows = usage_margin_report(
        start=now - timedelta(days=400), end=now + timedelta(days=400), group_by="lot"
    )
    return {row["group"]: row for row in rows}


def _assert_each_lot_accounts_for_its_payment(*lots: CreditLot) -> None:
    """usage revenue + breakage + what refunds took back = the lot's payment, exactly."""
    per_lot = _per_lot()
    for lot in lots:
        row = per_lot[lot.pk]
        assert row["revenue"] + row["breakage"] + row["taken_back"] == lot.revenue, row


def _expire_all() -> None:
    credits_expire(now=timezone.now() + timedelta(days=31))  # `grant` expires in 30 days


def test_expired_credits_are_breakage_and_the_lot_earns_its_whole_payment(sold):
    # given 10 credits sold for $7.00, 4 of them used
    org = OrganizationFactory(slug="gym")
    lot = sold(org, credits(10), 700)
    job_settled(org, credits(4), serving_cost=30)

    # when the other 6 expire
    _expire_all()

    # then the 4 earned $2.80 as revenue, the 6 expired $4.20 as breakage, in every
    # grouping (the model grouping shows it on its own "(expired)" row), and the margin
    # counts both
    [plan] = _report("plan")
    assert (plan["group"], plan["revenue"], plan["breakage"], plan["margin"]) == (
        "pro",
        280,
        420,
        700 - 30,
    )
    [team] = _report("organization")
    assert (team["group"], team["revenue"], team["breakage"]) == ("gym", 280, 420)
    by_model = {r["group"]: (r["credits"], r["revenue"], r["breakage"]) for r in _report("model")}
    assert by_model == {"gym-tiny": (credits(4), 280, 0), "(expired)": (0, 0, 420)}
    _assert_each_lot_accounts_for_its_payment(lot)


def test_a_rollover_trim_is_breakage_and_a_lot_burned_after_it_still_sums_to_its_payment(
    sold,
):
    # given 3 credits sold for $1.00 (a share that does not divide), 1 used
    org = OrganizationFactory()
    lot = sold(org, credits(3), 100, origin="basic")
    job_settled(org, credits(1), serving_cost=1)

    # when the rollover cap trims one, and the last is then used
    assert credits_trim(
        organization=org, source="subscription", keep=credits(1), key="cap-1", memo="cap"
    ) == credits(1)
    job_settled(org, credits(1), serving_cost=1)

    # then the burns and the trim took floor-of-cumulative shares: 33 + 33 + 34
    [row] = _report()
    assert (row["revenue"], row["breakage"], row["taken_back"]) == (33 + 34, 33, 0)
    _assert_each_lot_accounts_for_its_payment(lot)


def test_a_clawback_is_taken_back_never_revenue_nor_breakage(sold):
    # given 10 credits sold for $7.00, 5 used
    org = OrganizationFactory()
    lot = sold(org, credits(10), 700)
    job_settled(org, credits(5), serving_cost=10)

    # when a refund takes the other 5 back
    assert lot_clawback(lot=lot, amount=credits(5), key="refund-1", memo="refund") == credits(5)

    # then the usage earned $3.50, the refund took back the other $3.50's credits
    [row] = _report()
    assert (row["revenue"], row["breakage"], row["taken_back"]) == (350, 0, 350)
    _assert_each_lot_accounts_for_its_payment(lot)


def test_usage_trims_expiry_clawbacks_and_a_marketplace_move_mixed_sum_to_each_payment(sold):
    # given two lots with awkward shares, one moved in part to another team
    first, second = OrganizationFactory(slug="first"), OrganizationFactory(slug="second")
    a = sold(first, credits(7), 1000)
    b = sold(first, credits(11), 999, origin="basic")
    credits_transfer(source=first, destination=second, amount=credits(3), key="move-mixed")

    # when usage, a clawback, a trim of named lots and expiry consume everything
    job_settled(second, credits(2), serving_cost=1)
    job_settled(first, credits(5), serving_cost=1)
    lot_clawback(lot=b, amount=credits(2), key="refund-mixed", memo="refund", family=True)
    lots_trim(organization=first, lot_ids=[b.pk], amount=credits(3), key="trim-b", memo="cap")
    job_settled(first, credits(1), serving_cost=1)
    _expire_all()

    # then every credit was consumed, and each lot's parts add up to its payment
    assert sum(CreditLot.objects.values_list("remaining", flat=True)) == 0
    _assert_each_lot_accounts_for_its_payment(a, b)
    per_lot = _per_lot()
    assert all(per_lot[lot.pk]["breakage"] > 0 for lot in (a, b))
    assert per_lot[b.pk]["taken_back"] > 0


def test_a_job_that_charged_nothing_and_usage_without_a_hold_cost_under_no_lot(sold):
    # given a job released before any token (its usage recorded, nothing charged), and
    # usage recorded without a hold (no lot paid for its credits)
    org = OrganizationFactory()
    sold(org, credits(5), 100)
    hold_place(organization=org, amount=credits(1), key="canceled")
    hold_release(key="canceled", usage=usage_draft(org, "canceled", 0, serving_cost=7))
    usage_record_create(
        organization_id=org.pk,
        job_id="unheld",
        model_name="gym-tiny",
        priority="standard",
        usage=Usage(input_tokens=1, cached_input_tokens=0, output_tokens=1),
        credits=credits(2),
        serving_cost=3,
    )

    # then both are costs under "(no lot)", the unheld credits without a known price
    [row] = _report()
    assert _figures([row]) == [("(no lot)", 2, credits(2), 0, 10, -10)]
    assert row["unpriced_credits"] == credits(2)


def test_paid_credits_granted_without_a_price_show_as_such(grant):
    # given paid credits granted with no word of their price (credits_grant's command)
    org = OrganizationFactory()
    grant(org, credits(3), source="pack", resellable=False)

    # when they are burned
    job_settled(org, credits(3), serving_cost=4)

    # then they earned nothing known, and say so
    [row] = _report()
    assert (row["group"], row["unpriced_credits"], row["free_credits"], row["revenue"]) == (
        "(price unknown)",
        credits(3),
        0,
        0,
    )


def test_a_sale_currency_in_upper_case_or_padded_is_normalized(grant):
    # given an invoice that says its currency in upper case, with a space
    org = OrganizationFactory()

    # when its credits are granted
    lot = grant(org, credits(1), sale=LotSale(revenue=100, currency=" USD", origin="pro"))

    # then the lot keeps the sale, its currency as ISO 4217's lower-case code
    assert (lot.revenue, lot.revenue_currency, lot.origin) == (100, "usd", "pro")


@pytest.mark.parametrize(
    "sale",
    [
        LotSale(revenue=-1, currency="usd"),
        LotSale(revenue=100),
        LotSale(revenue=100, currency="dollars"),
        LotSale(revenue=0, origin="x" * 65),
    ],
    ids=["negative", "no-currency", "not-a-currency", "origin-too-long"],
)
def test_a_malformed_sale_never_refuses_the_grant_its_price_is_unknown(grant, caplog, sale):
    # given a paying customer whose grant's sale (report metadata) is malformed
    org = OrganizationFactory()

    # when the credits are granted
    lot = grant(org, credits(1), sale=sale)

    # then the customer has the credits, at a price the report shows as unknown, and the
    # log says why
    assert (lot.amount, lot.revenue, lot.revenue_currency) == (credits(1), None, "")
    assert len(lot.origin) <= 64
    assert "sale" in caplog.text and "unknown" in caplog.text


def test_on_sqlite_a_share_past_64_bits_is_refused_never_shown_rounded():
    # given a share whose product passes SQLite's 64-bit integers ($1,000,000.00 of a
    # lot of 100 million credits, all burned), computed as the report's SQL does there
    whole, part = 100_000_000, credits(100_000_000)
    with sqlite3.connect(":memory:") as demo:
        [(figure,)] = demo.execute(
            f"SELECT {_floor_share(str(whole), str(part), str(part), 'sqlite')}"
        ).fetchall()

    # when the report reads it
    with pytest.raises(ApplicationError) as refused:
        report_sums({"revenue": figure})

    # then it is refused (SQLite made it a float), and says to use PostgreSQL
    assert isinstance(figure, float)
    assert refused.value.code == "report_needs_postgresql"
    assert report_sums({"revenue": whole}) == {"revenue": whole}
