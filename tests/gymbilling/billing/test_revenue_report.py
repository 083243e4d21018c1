"""Finance's revenue, cost and margin per model, plan and customer.

Credits are bought for real (Checkout at the Stripe stand-in, its webhooks applied as
the worker applies them) and spent through real holds and captures; the report is
read through its selector and through the admin page staff open.
"""

from __future__ import annotations

import csv
import io
import re
import uuid
from datetime import timedelta
from decimal import Decimal
from html.parser import HTMLParser

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.utils import timezone

from gymbilling import stripe_client
from gymbilling.models import CreditPack, MarketReversal, PaymentReversal
from gymbilling.selectors import market_fee_income, reversals_by_customer
from gymbilling.services import catalog_sync
from gymbilling.services.refunds import payment_refund
from metering.models import CreditLot, UsageRecord
from metering.reconcile import ledger_reconcile
from metering.selectors import report_totals, usage_margin_report
from metering.services import credits_expire
from tests.factories import OrganizationFactory, UserFactory
from tests.gymbilling.billing.conftest import report_rows
from tests.gymbilling.market.conftest import market_member, money, sold
from tests.helpers import credits, job_settled

pytestmark = pytest.mark.django_db


def _money(row: dict) -> tuple[int, int, int | None]:
    return row["revenue"], row["serving_cost"], row["margin"]


def test_a_member_on_a_plan_and_a_pack_earns_exactly_what_they_paid_for_what_they_burned(buy):
    # given a member on Pro ($99.00 for 12,000 credits) who also bought a Boost 1k pack
    # ($12.00 for 1,000 credits): the plan's credits expire first, so they burn first
    org = OrganizationFactory(slug="lifter")
    buy(org, plan="pro")
    buy(org, pack="boost-1k")
    plan_lot = CreditLot.objects.get(organization=org, source="subscription")
    pack_lot = CreditLot.objects.get(organization=org, source="pack")
    assert (plan_lot.revenue, plan_lot.revenue_currency, plan_lot.origin) == (9_900, "usd", "pro")
    assert (pack_lot.revenue, pack_lot.revenue_currency, pack_lot.origin) == (1_200, "usd", "pack")

    # when three jobs run: the second burns the plan's last 6,999.5 credits and the pack's
    # first 0.5, the third 333.333333 more of the pack
    job_settled(org, credits("5000.5"), model_name="gym-tiny", serving_cost=300)
    job_settled(org, credits(7_000), model_name="gym-large", serving_cost=700)
    job_settled(org, credits("333.333333"), model_name="gym-tiny", serving_cost=50)

    # then by plan: Pro's 12,000 credits, burned to the end, earned exactly its $99.00;
    # the pack's 333.833333 credits earned floor(1200 x 333.833333 / 1000) = 400; the
    # second job's $7.00 of cost is shared 6,999.5 : 0.5, rounded down on the first part
    # (699) and the rest to the last (1)
    by_plan = report_rows("plan")
    assert set(by_plan) == {("pro", "usd", "usd"), ("pack", "usd", "usd")}
    pro, pack = by_plan["pro", "usd", "usd"], by_plan["pack", "usd", "usd"]
    assert (pro["credits"], pack["credits"]) == (credits(12_000), credits("333.833333"))
    assert _money(pro) == (9_900, 300 + 699, 9_900 - 999)
    assert _money(pack) == (400, 1 + 50, 400 - 51)
    assert pro["free_credits"] == pack["free_credits"] == 0
    # by model: the first job's plan credits earned floor(9900 x 5000.5 / 12000) = 4125,
    # the second's the plan's remaining 5775 and nothing yet of the pack's 0.5 (0.6 of
    # a cent, rounded down), the third the pack's 400
    by_model = report_rows("model")
    assert _money(by_model["gym-tiny", "usd", "usd"]) == (4_125 + 400, 350, 4_525 - 350)
    assert _money(by_model["gym-large", "usd", "usd"]) == (5_775, 700, 5_775 - 700)
    assert [by_model[m, "usd", "usd"]["requests"] for m in ("gym-tiny", "gym-large")] == [2, 1]
    # by customer: all of it; and every grouping adds up to the very same totals (a job
    # counts its requests once, with the first lot it burned)
    [customer] = report_rows("organization").values()
    assert (customer["group"], *_money(customer)) == ("lifter", 10_300, 1_050, 9_250)
    totals = [
        report_totals(list(report_rows(g).values())) for g in ("model", "plan", "organization")
    ]
    assert totals[0] == totals[1] == totals[2]
    assert (totals[0][0]["requests"], *_money(totals[0][0])) == (3, 10_300, 1_050, 9_250)


def test_a_lot_burned_to_the_end_earns_exactly_its_payment_across_months(buy):
    # given a pack of 3 credits sold for $10.00: 1,000 cents do not divide into 3,000,000
    # micro-credits, so most burns earn a fraction of a cent
    CreditPack.objects.create(code="trial-3", name="Trial 3", credits=credits(3), price=1_000)
    catalog_sync()
    org = OrganizationFactory()
    buy(org, pack="trial-3")

    # when it is burned by seven jobs of uneven sizes, each on a model of its own, the
    # first three last month
    sizes = ["0.333333", "0.333333", "0.333334", "1", "0.5", "0.25", "0.25"]
    for n, size in enumerate(sizes):
        job_settled(org, credits(size), model_name=f"model-{n}", serving_cost=1)
    last_month = timezone.now() - timedelta(days=40)
    UsageRecord.objects.filter(model_name__in=["model-0", "model-1", "model-2"]).update(
        created_at=last_month
    )

    # then each job earned its share within a cent: what the lot has earned after each
    # burn is its payment's share of all it has burned, rounded down; so this month's four
    # and last month's three jobs add up to exactly $10.00
    earlier = usage_margin_report(
        start=last_month - timedelta(days=1), end=last_month + timedelta(days=1), group_by="model"
    )
    this_month = list(report_rows("model").values())
    assert (len(earlier), len(this_month)) == (3, 4)
    earned = {row["group"]: row["revenue"] for row in earlier + this_month}
    so_far, burned = 0, Decimal(0)
    for n, size in enumerate(sizes):
        so_far, burned = so_far + earned[f"model-{n}"], burned + Decimal(size)
        assert abs(earned[f"model-{n}"] - Decimal(1_000) * Decimal(size) / 3) < 1
        assert so_far == int(1_000 * burned // 3)
    assert sum(earned.values()) == 1_000


def test_overage_earns_the_plan_s_overage_price(buy):
    # given a Pro member: 12,000 credits a month for $99.00, and overage beyond them at
    # $9.00 per 1,000 credits (its allowance lot: 20,000 credits, priced $180.00 in all)
    org = OrganizationFactory()
    buy(org, plan="pro")
    allowance = CreditLot.objects.get(organization=org, source="overage")
    assert (allowance.paid, allowance.revenue, allowance.origin) == (False, 18_000, "pro")

    # when one job uses the month's credits and 1,000 more
    job_settled(org, credits(13_000), model_name="gym-large", serving_cost=1_300)

    # then the plan earned its $99.00 and the overage's $9.00 (which the meter invoices
    # later): no free credits
    [row] = report_rows("plan").values()
    assert (row["group"], row["credits"], row["free_credits"]) == ("pro", credits(13_000), 0)
    assert _money(row) == (9_900 + 900, 1_300, 10_800 - 1_300)


def test_an_overage_allowance_left_unused_earns_nothing(buy):
    # given a Pro member ($99.00 for 12,000 credits, and a 20,000-credit overage allowance
    # priced $180.00 should all of it be used) who uses 1,000 credits of overage
    org = OrganizationFactory()
    buy(org, plan="pro")
    job_settled(org, credits(13_000), model_name="gym-large", serving_cost=1_300)

    # when the period ends and the sweep expires the 19,000 credits of overage not used
    allowance = CreditLot.objects.get(organization=org, source="overage")
    credits_expire(now=allowance.expires_at + timedelta(seconds=1))
    allowance.refresh_from_db()
    assert allowance.remaining == 0

    # then the plan earned $99.00 and the overage used $9.00, what the meter invoices: the
    # allowance unused was never sold, so it is no breakage
    [row] = report_rows("plan").values()
    assert (row["revenue"], row["breakage"]) == (9_900 + 900, 0)


def test_credits_bought_on_the_marketplace_earn_the_original_sale_s_price(
    buy,
    market_stripe,
):
    # given a Pro member ($99.00 for 12,000 credits) who resells 1,200 of them at $5.00
    # per 1,000 credits ($6.00 in all) to another member
    seller = OrganizationFactory(slug="seller")
    buy(seller, plan="pro")
    buyer = market_member()
    order = sold(market_stripe, seller, buyer, quantity=credits(1_200), price=500)
    assert order.amount_total == 600
    bought = CreditLot.objects.get(organization=buyer, source="marketplace", account__kind="wallet")
    assert bought.root == CreditLot.objects.get(
        organization=seller, source="subscription", parent=None
    )

    # when the buyer burns them all
    job_settled(buyer, credits(1_200), model_name="gym-tiny", serving_cost=25)

    # then they earned a tenth of the seller's $99.00 (not the resale's $6.00: the
    # gym's income there is its fee), under the seller's plan, for the buyer
    [row] = report_rows("organization").values()
    assert (row["group"], row["credits"], *_money(row)) == (
        buyer.slug,
        credits(1_200),
        990,
        25,
        965,
    )
    assert list(report_rows("plan")) == [("pro", "usd", "usd")]


def test_free_credits_earn_nothing_and_are_shown_as_free(free_credits):
    # given a member with a 10-credit promotion and a 5-credit goodwill adjustment
    org = OrganizationFactory()
    free_credits(org)

    # when a job burns all 15 credits
    job_settled(org, credits(15), model_name="gym-tiny", serving_cost=40)

    # then they earned nothing: free credits consumed, at the serving cost's loss
    [row] = report_rows("plan").values()
    assert (row["group"], row["credits"], row["free_credits"]) == ("free", credits(15), credits(15))
    assert _money(row) == (0, 40, -40)


def test_two_currencies_are_never_added_together(buy):
    # given a member who bought a dollar pack and one who bought a euro pack (1,000
    # credits for 11.00 euros), and two models whose GPU hours cost dollars and euros
    CreditPack.objects.create(
        code="boost-1k-eur", name="Boost 1k", credits=credits(1_000), price=1_100, currency="eur"
    )
    catalog_sync()
    dollars, euros = OrganizationFactory(slug="dollars"), OrganizationFactory(slug="euros")
    buy(dollars, pack="boost-1k")
    buy(euros, pack="boost-1k-eur")

    # when each burns 500 credits on the euro model, and the euro member 100 more on the
    # dollar model
    job_settled(dollars, credits(500), model_name="gym-eu", serving_cost=30, currency="eur")
    job_settled(euros, credits(500), model_name="gym-eu", serving_cost=30, currency="eur")
    job_settled(euros, credits(100), model_name="gym-us", serving_cost=9, currency="usd")

    # then each row keeps its revenue's and its cost's currencies: a margin only where
    # they are the same, and totals per pair of currencies, never across
    by_customer = report_rows("organization")
    assert _money(by_customer["dollars", "usd", "eur"]) == (600, 30, None)
    assert _money(by_customer["euros", "eur", "eur"]) == (550, 30, 520)
    assert _money(by_customer["euros", "eur", "usd"]) == (110, 9, None)
    totals = {
        (t["currency"], t["cost_currency"]): _money(t)
        for t in report_totals(list(by_customer.values()))
    }
    assert totals == {
        ("usd", "eur"): (600, 30, None),
        ("eur", "eur"): (550, 30, 520),
        ("eur", "usd"): (110, 9, None),
    }


# --- the marketplace's fee income ---------------------------------------------------------
#
# Money ledger rows are append-only (their timestamps cannot be moved), so each test takes
# its periods' edges as real instants between what it does.


def _fees(start, end) -> dict[str, dict]:
    return {row["currency"]: row for row in market_fee_income(start=start, end=end)}


def _fee_figures(row: dict) -> tuple[int, ...]:
    """fills, volume, fees earned, returned, reinstated, fee income."""
    return (
        row["fills"],
        row["volume"],
        row["fees_earned"],
        row["fees_returned"],
        row["fees_reinstated"],
        row["fee_income"],
    )


def _refund(order, amount: int) -> None:
    """Finance refund part of a marketplace payment, at Stripe, applied at once."""
    refund = payment_refund(
        organization=order.buyer,
        payment_intent_id=order.stripe_payment_intent_id,
        amount=amount,
        note="Not what they expected",
        key=uuid.uuid4().hex,
        actor=None,
    )
    assert refund["gym_applied"]


def test_a_delivered_fill_s_fee_is_income_in_its_currency_and_its_days(market_stripe):
    # given a member who sells 100 credits at $12.34 per 1,000 credits
    seller = market_member(credits_amount=credits(1_000))
    buyer = market_member()
    before = timezone.now()

    # when another member buys them: $1.24 paid, of which the gym's 10% fee is $0.12
    order = sold(market_stripe, seller, buyer, quantity=credits(100), price=1_234)
    after = timezone.now()

    # then the fee is the gym's income in dollars, in the days of the sale, and nowhere else
    assert (order.amount_total, order.fills.get().fee) == (124, 12)
    assert {c: _fee_figures(row) for c, row in _fees(before, after).items()} == {
        "usd": (1, 124, 12, 0, 0, 12)
    }
    assert _fees(before - timedelta(days=1), before) == {}
    assert _fees(after, after + timedelta(days=1)) == {}


def test_a_refund_lowers_fee_income_in_its_own_days_as_the_platform_fee_account_moves(
    market_stripe,
):
    # given a sale in an earlier period: $1.24 for 100 credits, fee $0.12
    seller = market_member(credits_amount=credits(1_000))
    first_buyer, second_buyer = market_member(), market_member()
    start = timezone.now()
    first = sold(market_stripe, seller, first_buyer, quantity=credits(100), price=1_234)
    edge, fees_at_edge = timezone.now(), money("platform_fees")

    # when, in the next period, another sale ($2.00, fee $0.20) and a refund of half of
    # the first ($0.62: its fee share comes back, 12 x 62 / 124 = 6)
    sold(market_stripe, seller, second_buyer, quantity=credits(200), price=1_000)
    _refund(first, 62)
    end, fees_at_end = timezone.now(), money("platform_fees")

    # then the earlier period keeps its fee; the later one has its own sale's fee less
    # the refund's share (the first fill, sold before, is not counted in it again)
    earlier, later = _fees(start, edge)["usd"], _fees(edge, end)["usd"]
    assert _fee_figures(earlier) == (1, 124, 12, 0, 0, 12)
    assert _fee_figures(later) == (1, 200, 20, 6, 0, 14)
    assert MarketReversal.objects.get().fee_reversed == 6
    # and each period's income is what the platform fees account moved in it, as the
    # books have it (its balance at each edge)
    assert (fees_at_edge, fees_at_end) == (12, 26)
    assert earlier["fee_income"] == fees_at_edge - 0
    assert later["fee_income"] == fees_at_end - fees_at_edge
    # and the refunds table of the same days says the same fee share came back
    [refunds] = reversals_by_customer(start=edge, end=end)
    assert (refunds["customer"], refunds["market_fees_reversed"]) == (first_buyer.slug, 6)
    assert ledger_reconcile().ok


def test_a_dispute_takes_the_fee_back_and_a_won_one_returns_it_in_their_days(
    market_stripe, deliver
):
    # given a sale: $1.24, fee $0.12
    seller = market_member(credits_amount=credits(1_000))
    order = sold(market_stripe, seller, market_member(), quantity=credits(100), price=1_234)
    deliver()
    disputed_from = timezone.now()

    # when the buyer disputes the payment in full, and later the gym wins the dispute
    charge = stripe_client.payment_intent_charge(order.stripe_payment_intent_id)["id"]
    dispute = market_stripe.standin.dispute(charge)["id"]
    assert deliver() == ["processed"]
    won_from, fees_after_dispute = timezone.now(), money("platform_fees")
    market_stripe.standin.close_dispute(dispute, status="won")
    assert deliver() == ["processed", "processed"]
    won_until = timezone.now()

    # then the dispute's days lose the whole fee, the win's days get it back: each the
    # movement of the platform fees account in those days
    assert fees_after_dispute == 0
    assert _fee_figures(_fees(disputed_from, won_from)["usd"]) == (0, 0, 0, 12, 0, -12)
    assert _fee_figures(_fees(won_from, won_until)["usd"]) == (0, 0, 0, 0, 12, 12)
    assert money("platform_fees") == 12
    assert _fee_figures(_fees(disputed_from - timedelta(days=1), won_until)["usd"]) == (
        1,
        124,
        12,
        12,
        12,
        12,
    )


def test_fee_income_in_two_currencies_is_never_added_together(market_stripe, settings):
    # given a marketplace that trades in dollars and euros
    settings.MARKET_CURRENCIES = ["usd", "eur"]
    seller = market_member(credits_amount=credits(1_000))
    start = timezone.now()

    # when 100 credits sell for dollars ($1.24, fee 12 cents) and 300 for euros at 5.00
    # euros per 1,000 credits (1.50 euros, fee 15 cents), and the euro sale is refunded
    # in full
    sold(market_stripe, seller, market_member(), quantity=credits(100), price=1_234)
    in_euros = sold(
        market_stripe, seller, market_member(), quantity=credits(300), price=500, currency="eur"
    )
    _refund(in_euros, 150)
    end = timezone.now()

    # then each currency has its own row: the euro fee came back in full, the dollar one stays
    assert {c: _fee_figures(row) for c, row in _fees(start, end).items()} == {
        "eur": (1, 150, 15, 15, 0, 0),
        "usd": (1, 124, 12, 0, 0, 12),
    }
    assert (money("platform_fees", "usd"), money("platform_fees", "eur")) == (12, 0)


# --- the page -----------------------------------------------------------------------------


class _Tables(HTMLParser):
    """The cells of the page's report tables, by table id: what a reader sees."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and "report-table" in (attrs.get("class") or ""):
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif self._table and tag == "tr":
            self.tables[self._table].append([])
        elif self._table and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self._table = None
        elif tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _tables(page: bytes) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(page.decode())
    return parser.tables


def _finance_client() -> Client:
    """Staff who may view usage records, and nothing else: the report's permission."""
    staff = UserFactory(is_staff=True)
    staff.user_permissions.add(Permission.objects.get(codename="view_usagerecord"))
    client = Client()
    client.force_login(staff)
    return client


def _today_query(group_by: str) -> dict[str, str]:
    """The report's form for today, a day either side (no test runs across a day's edge)."""
    today = timezone.now().date()
    return {
        "start": (today - timedelta(days=1)).isoformat(),
        "end": (today + timedelta(days=1)).isoformat(),
        "group_by": group_by,
    }


def test_finance_read_revenue_and_refunds_on_the_page_and_export_each_table(buy):
    # given a member who bought a Boost 1k pack ($12.00), burned 300 credits of it on
    # one job, then was refunded $3.00
    org = OrganizationFactory(slug="refunded")
    buy(org, pack="boost-1k")
    job_settled(org, credits(300), model_name="gym-tiny", serving_cost=80)
    checkout = org.checkout_sessions.get()
    payment_refund(
        organization=org,
        payment_intent_id=checkout.stripe_payment_intent_id,
        amount=300,
        note="Goodwill",
        key=uuid.uuid4().hex,
        actor=None,
    )
    assert PaymentReversal.objects.get(organization=org).amount == 300
    client = _finance_client()
    query = _today_query("organization")
    url = "/admin/metering/usagerecord/report/"

    # when finance open the report per customer, and export each of its tables
    page = client.get(url, query)
    exported = {
        key: client.get(url, {**query, "export": key}) for key in ("organization", "reversals")
    }

    # then the page shows the customer's revenue, its cost and margin (the refund does not
    # lower the revenue recognized), the refund in its own table, and says how they relate
    assert page.status_code == 200
    tables = _tables(page.content)
    header, row, total = tables["report"]
    assert header[:3] == ["customer", "currency", "cost currency"]
    shown = dict(zip(header, row, strict=True))
    assert (shown["customer"], shown["credits consumed"]) == ("refunded", "300")
    assert (shown["revenue (minor units)"], shown["serving cost (minor units)"]) == ("360", "80")
    assert (shown["margin (minor units)"], shown["margin %"]) == ("280", "77.8%")
    assert total[:3] == ["total", "usd", "usd"] and total[-4:] == row[-4:]
    reversal_header, reversal_row, _ = tables["reversals"]
    refunds = dict(zip(reversal_header, reversal_row, strict=True))
    assert (refunds["customer"], refunds["refunded (minor units)"]) == ("refunded", "300")
    assert refunds["credits taken back unspent"] == "250"
    assert "do not lower the recognized revenue" in page.content.decode()
    # and each CSV holds the very cells of its table, header and totals included
    for key, table_id in (("organization", "report"), ("reversals", "reversals")):
        assert exported[key].status_code == 200
        assert exported[key]["Content-Type"].startswith("text/csv")
        rows = list(csv.reader(io.StringIO(exported[key].content.decode())))
        assert rows == tables[table_id]


@pytest.mark.parametrize("group_by", ["model", "plan", "organization"])
def test_each_grouping_renders_with_its_figures(buy, group_by):
    # given a Pro member who ran one job
    org = OrganizationFactory(slug="pro-member")
    buy(org, plan="pro")
    job_settled(org, credits(1_200), model_name="gym-large", serving_cost=99)

    # when finance open the report in each grouping
    page = _finance_client().get("/admin/metering/usagerecord/report/", _today_query(group_by))

    # then its row names the model, plan or customer with the job's revenue (a tenth of
    # $99.00) and cost
    assert page.status_code == 200
    header, row, _ = _tables(page.content)["report"]
    shown = dict(zip(header, row, strict=True))
    assert row[0] == {"model": "gym-large", "plan": "pro", "organization": "pro-member"}[group_by]
    figures = ["revenue", "breakage", "taken back by refunds", "serving cost", "margin"]
    assert [shown[f"{name} (minor units)"] for name in figures] == ["990", "0", "0", "99", "891"]


def test_staff_without_the_permission_cannot_open_or_export_thereport_rows(client):
    staff = UserFactory(is_staff=True)
    client.force_login(staff)

    assert client.get("/admin/metering/usagerecord/report/").status_code == 403
    assert client.get("/admin/metering/usagerecord/report/?export=model").status_code == 403


def test_the_page_links_each_table_s_export():
    page = _finance_client().get("/admin/metering/usagerecord/report/")

    assert page.status_code == 200
    links = re.findall(r'class="report-export" href="([^"]+)"', page.content.decode())
    assert [link.rsplit("export=", 1)[1] for link in links] == [
        "model",
        "reversals",
        "marketplace_fees",
    ]


def test_finance_read_the_marketplace_fee_income_on_the_page_and_in_its_csv(market_stripe):
    # given today a marketplace sale ($1.24, fee $0.12) refunded in part ($0.62: fee $0.06
    # back)
    seller = market_member(credits_amount=credits(1_000))
    order = sold(market_stripe, seller, market_member(), quantity=credits(100), price=1_234)
    _refund(order, 62)
    client = _finance_client()
    query = _today_query("model")
    url = "/admin/metering/usagerecord/report/"

    # when finance open the report and export its marketplace fee table
    page = client.get(url, query)
    exported = client.get(url, {**query, "export": "marketplace_fees"})

    # then the page shows the fee income per currency in a table of its own, and says what
    # it is
    assert page.status_code == 200
    assert "<h2>Marketplace fee income</h2>" in page.content.decode()
    header, row = _tables(page.content)["marketplace_fees"]
    assert dict(zip(header, row, strict=True)) == {
        "currency": "usd",
        "fills delivered": "1",
        "marketplace volume (minor units)": "124",
        "fees earned (minor units)": "12",
        "fees returned by refunds and disputes (minor units)": "6",
        "fees reinstated by disputes won and refunds failed (minor units)": "0",
        "fee income (minor units)": "6",
    }
    assert "movement of the" in page.content.decode()
    # and its CSV holds the very cells of the table, header first
    assert exported.status_code == 200
    assert exported["Content-Type"].startswith("text/csv")
    assert "marketplace_fees-" in exported["Content-Disposition"]
    assert list(csv.reader(io.StringIO(exported.content.decode()))) == [header, row]


def test_days_without_marketplace_activity_say_so():
    page = _finance_client().get("/admin/metering/usagerecord/report/")

    assert page.status_code == 200
    assert _tables(page.content)["marketplace_fees"][1:] == [
        ["No marketplace sale, refund or dispute in these days."]
    ]
