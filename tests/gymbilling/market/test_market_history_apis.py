"""A member's marketplace history over HTTP: their orders, their sales, earnings and payouts.

Lists are cursor-paginated as every list of the API; each shows the caller's
own rows only; bad parameters are 400s with a code. Stripe is the stand-in.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone

from accounts.models import Membership, Role, Scope
from gymbilling.market.services import listing_create, order_create, payouts_run
from gymbilling.models import MarketFill
from tests.factories import UserFactory
from tests.gymbilling.market.conftest import client_for, market_member, refund, sold
from tests.helpers import credits

pytestmark = pytest.mark.django_db

ORDERS, SALES = "/api/v1/market/orders", "/api/v1/market/sales"
EARNINGS, PAYOUTS = "/api/v1/market/earnings", "/api/v1/market/payouts"
LATER = timedelta(days=8)  # past the holding period


def every_page(api: Client, path: str, **params) -> list[list[dict]]:
    """The list's pages, following `next` from the first."""
    response = api.get(path, params)
    pages = []
    while True:
        assert response.status_code == 200, response.content
        body = response.json()
        pages.append(body["results"])
        if not body["next"]:
            return pages
        response = api.get(body["next"])


def test_a_buyer_lists_their_orders_newest_first_a_page_at_a_time(market_stripe, seller, buyer):
    # given: three orders of the buyer's (one paid), and one of another buyer's
    listing_create(seller=seller, quantity=credits(500), price_per_1k=300, currency="usd")
    paid = sold(market_stripe, market_member(credits_amount=credits(100)), buyer, price=250)
    pending = [
        order_create(buyer=buyer, quantity=credits(q), max_price_per_1k=300, currency="usd")
        for q in (100, 200)
    ]
    other = order_create(
        buyer=market_member(), quantity=credits(50), max_price_per_1k=300, currency="usd"
    )
    api = client_for(buyer)

    # when: the buyer lists them two at a time
    pages = every_page(api, ORDERS, limit=2)

    # then: newest first, each as GET /orders/{id} shows it, none of the other buyer's
    ids = [order["id"] for page in pages for order in page]
    assert [len(page) for page in pages] == [2, 1]
    assert ids == [pending[1].pk, pending[0].pk, paid.pk]
    assert other.pk not in ids
    for page in pages:
        for order in page:
            assert order == api.get(f"{ORDERS}/{order['id']}").json()
    [first] = pages[1]
    assert (first["status"], first["amount_total"], first["quantity"]) == (
        "paid",
        25,
        credits(100),
    )
    assert first["fills"][0]["delivered_quantity"] == credits(100)
    # and a status picks those in it
    r = api.get(ORDERS, {"status": "pending"})
    assert [o["id"] for o in r.json()["results"]] == [pending[1].pk, pending[0].pk]
    # the other buyer's order is not found by this one's id either
    assert api.get(f"{ORDERS}/{other.pk}").status_code == 404


def test_a_seller_lists_their_sales_with_what_each_earned(market_stripe, seller, buyer):
    # given: two sales of the seller's (the first paid out, then half refunded: the
    # seller keeps it), and one of another seller's to the same buyer
    first = sold(market_stripe, seller, buyer)  # 124, fee 12
    assert payouts_run(now=timezone.now() + LATER) == 1
    refund(first, 62)
    second = sold(market_stripe, seller, buyer, price=500)  # 50, fee 5
    sold(market_stripe, market_member(credits_amount=credits(100)), buyer, price=800)
    api = client_for(seller)

    # when: the seller lists them one at a time
    pages = every_page(api, SALES, limit=1)

    # then: newest first, only theirs, with their money
    sales = [sale for page in pages for sale in page]
    [second_fill], [first_fill] = second.fills.all(), first.fills.all()
    assert [sale["id"] for sale in sales] == [second_fill.pk, first_fill.pk]
    newest = sales[0]
    assert newest == {
        "id": second_fill.pk,
        "listing": second_fill.listing_id,
        "currency": "usd",
        "price_per_1k": 500,
        "quantity": credits(100),
        "gross": 50,
        "fee": 5,
        "net": 45,
        "refunded": 0,
        "seller_reversed": 0,
        "earned": 45,
        "unpaid": 45,
        "proceeds": "pending",
        "available_at": newest["available_at"],
        "payout": None,
        "sold_at": newest["sold_at"],
    }
    first_fill.refresh_from_db()
    assert (sales[1]["refunded"], sales[1]["earned"], sales[1]["unpaid"]) == (62, 112, 0)
    assert (sales[1]["proceeds"], sales[1]["payout"]) == ("paid_out", first_fill.payout_id)
    # the buyer sold nothing; a filter by proceeds picks the paid-out one
    assert client_for(buyer).get(SALES).json()["results"] == []
    assert [s["id"] for s in api.get(SALES, {"proceeds": "paid_out"}).json()["results"]] == [
        first_fill.pk
    ]


def test_a_seller_reads_earnings_per_currency_and_their_payouts(market_stripe, seller, buyer):
    # given: a sale paid out, then another in its holding period
    sold(market_stripe, seller, buyer)  # 124, fee 12
    assert payouts_run(now=timezone.now() + LATER) == 1
    second = sold(market_stripe, seller, buyer, price=500)  # 50, fee 5
    api = client_for(seller)

    # when
    earnings = api.get(EARNINGS)
    payouts = api.get(PAYOUTS)

    # then: integers of minor units, one summary for the one currency
    assert earnings.status_code == 200, earnings.content
    available_at = MarketFill.objects.get(order=second).available_at
    assert earnings.json() == {
        "earnings": [
            {
                "currency": "usd",
                "sales": 2,
                "sold_quantity": credits(200),
                "gross": 174,
                "fees": 17,
                "reversed": 0,
                "earned": 157,
                "pending": 45,
                "available": 0,
                "in_transit": 0,
                "paid_out": 112,
                "next_available_at": earnings.json()["earnings"][0]["next_available_at"],
            }
        ]
    }
    assert earnings.json()["earnings"][0]["next_available_at"].startswith(
        available_at.strftime("%Y-%m-%dT%H:%M:%S")
    )
    [payout] = payouts.json()["results"]
    assert (payout["amount"], payout["currency"], payout["method"], payout["status"]) == (
        112,
        "usd",
        "invoice_credit",
        "sent",
    )
    # and the buyer, who sold nothing, has nothing
    assert client_for(buyer).get(EARNINGS).json() == {"earnings": []}
    assert client_for(buyer).get(PAYOUTS).json()["results"] == []


@pytest.mark.parametrize("path", [ORDERS, SALES, PAYOUTS])
@pytest.mark.parametrize(
    ("params", "code", "param"),
    [
        ({"limit": "0"}, "invalid_request", "limit"),
        ({"limit": "201"}, "invalid_request", "limit"),
        ({"limit": "ten"}, "invalid_request", "limit"),
        ({"cursor": "not-a-cursor"}, "invalid_cursor", "cursor"),
        ({"cursor": "cD1hYmM="}, "invalid_cursor", "cursor"),  # p=abc
        ({"bogus": "1"}, "invalid_request", "bogus"),
    ],
)
def test_bad_list_parameters_are_a_400_naming_them(seller, path, params, code, param):
    r = client_for(seller).get(path, params)

    assert r.status_code == 400, r.content
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (code, param)


@pytest.mark.parametrize(
    ("path", "params", "param"),
    [
        (ORDERS, {"status": "lost"}, "status"),
        (SALES, {"proceeds": "none"}, "proceeds"),
        (SALES, {"proceeds": "later"}, "proceeds"),
    ],
)
def test_a_filter_out_of_its_choices_is_a_400_naming_it(seller, path, params, param):
    r = client_for(seller).get(path, params)

    assert r.status_code == 400, r.content
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("invalid_request", param)


@pytest.mark.parametrize("path", [ORDERS, SALES, EARNINGS, PAYOUTS])
def test_a_key_without_the_marketplace_scope_reads_none_of_it(seller, path):
    r = client_for(seller, scopes=(Scope.BILLING_READ,)).get(path)

    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"


@pytest.mark.parametrize("path", [ORDERS, SALES, EARNINGS, PAYOUTS])
def test_any_member_reads_them_as_they_read_the_book(market_stripe, seller, buyer, path):
    # given: a sale paid out, and a plain member of the buyer's (for its orders) or of
    # the seller's (for the rest), signed in
    sold(market_stripe, seller, buyer)
    assert payouts_run(now=timezone.now() + LATER) == 1
    organization = buyer if path == ORDERS else seller
    user = UserFactory()
    Membership.objects.create(user=user, organization=organization, role=Role.MEMBER)
    browser = Client()
    browser.force_login(user)

    # when
    r = browser.get(path, HTTP_X_ORGANIZATION=organization.slug)

    # then: one row (or summary) each
    assert r.status_code == 200, r.content
    assert len(r.json()["earnings" if path == EARNINGS else "results"]) == 1
