"""The marketplace over HTTP: shapes, codes, and that refused requests change nothing."""

from __future__ import annotations

import pytest

from accounts.models import Scope
from gymbilling import stripe_client
from gymbilling.market.services import listing_create
from gymbilling.models import MarketListing, MarketOrder, MoneyEntry
from tests.gymbilling.market.conftest import client_for, paid_session
from tests.helpers import credits, ledger_rows

pytestmark = pytest.mark.django_db


def rows():
    return (
        ledger_rows(),
        MarketListing.objects.count(),
        MarketOrder.objects.count(),
        MoneyEntry.objects.count(),
    )


def test_list_browse_order_and_follow_an_order(market_stripe, seller, buyer):
    from gymbilling.market.services import market_checkout_handle

    api_seller, api_buyer = client_for(seller), client_for(buyer)
    # list
    r = api_seller.post(
        "/api/v1/market/listings",
        {"quantity": credits(100), "price_per_1k": 250, "currency": "usd"},
        content_type="application/json",
    )
    assert r.status_code == 201, r.content
    listing = r.json()
    assert (listing["available"], listing["status"], listing["price_per_1k"]) == (
        credits(100),
        "open",
        250,
    )
    # the book, with a quote
    r = api_buyer.get("/api/v1/market/listings", {"quantity": credits(40)})
    assert r.status_code == 200
    book = r.json()
    assert [each["id"] for each in book["listings"]] == [listing["id"]]
    assert book["listings"][0]["expires_at"] is not None
    assert book["quote"] == {
        "quantity": credits(40),
        "fillable": credits(40),
        "best_price_per_1k": 250,
        "worst_price_per_1k": 250,
        "amount": 10,
        "depth": credits(100),
    }
    # order
    r = api_buyer.post(
        "/api/v1/market/orders",
        {"quantity": credits(40), "max_price_per_1k": 300},
        content_type="application/json",
    )
    assert r.status_code == 201, r.content
    order = r.json()
    assert order["status"] == "pending" and order["amount_total"] == 10
    assert order["checkout_url"].startswith(market_stripe.standin.api_base + "/checkout/")
    # pay, then the order shows it
    row = MarketOrder.objects.get(pk=order["id"])
    market_checkout_handle(row.checkout, paid_session(market_stripe, row))
    r = api_buyer.get(f"/api/v1/market/orders/{order['id']}")
    assert r.status_code == 200 and r.json()["status"] == "paid"
    assert r.json()["fills"][0]["delivered_quantity"] == credits(40)
    # the seller cancels the rest
    r = api_seller.delete(f"/api/v1/market/listings/{listing['id']}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"


@pytest.mark.parametrize(
    "body,code",
    [
        ({"quantity": 0, "price_per_1k": 250}, "invalid_request"),
        ({"quantity": -5, "price_per_1k": 250}, "invalid_request"),
        ({"quantity": credits(100), "price_per_1k": 0}, "invalid_request"),
        ({"quantity": credits(100), "price_per_1k": 100_001}, "price_out_of_bounds"),
        ({"quantity": credits(1), "price_per_1k": 250}, "quantity_below_minimum"),
        ({"quantity": credits(5000), "price_per_1k": 250}, "insufficient_resellable_credits"),
        ({"quantity": credits(100), "price_per_1k": 250, "bogus": 1}, "invalid_request"),
    ],
)
def test_bad_listings_are_refused_with_a_code_and_change_nothing(seller, body, code):
    api = client_for(seller)
    before = rows()
    r = api.post("/api/v1/market/listings", body, content_type="application/json")
    assert 400 <= r.status_code < 500, r.content
    error = r.json()["error"]
    assert error["code"] == code or (code == "invalid_request" and error["code"]), error
    assert rows() == before


def test_bad_orders_are_refused_with_a_code_and_change_nothing(market_stripe, seller, buyer):
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    api_seller, api_buyer = client_for(seller), client_for(buyer)
    before = rows()
    for api, body, status, code in [
        (api_buyer, {"quantity": 0, "max_price_per_1k": 300}, 400, None),
        (api_buyer, {"quantity": -1, "max_price_per_1k": 300}, 400, None),
        (
            api_buyer,
            {"quantity": credits(10), "max_price_per_1k": 100_001},
            400,
            "price_out_of_bounds",
        ),
        (
            api_buyer,
            {"quantity": credits(101), "max_price_per_1k": 300},
            409,
            "insufficient_liquidity",
        ),
        (
            api_seller,
            {"quantity": credits(10), "max_price_per_1k": 300, "listing": listing.pk},
            400,
            "own_listing",
        ),
        (
            api_buyer,
            {"quantity": credits(10), "max_price_per_1k": 300, "listing": 999_999},
            404,
            "listing_not_found",
        ),
    ]:
        r = api.post("/api/v1/market/orders", body, content_type="application/json")
        assert r.status_code == status, (body, r.content)
        if code:
            assert r.json()["error"]["code"] == code
    assert rows() == before


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("listings", {"quantity": float(credits(100)), "price_per_1k": 250}, "quantity"),
        ("listings", {"quantity": credits(100), "price_per_1k": 250.0}, "price_per_1k"),
        ("listings", {"quantity": "100000000.0", "price_per_1k": 250}, "quantity"),
        ("listings", {"quantity": credits(100), "price_per_1k": True}, "price_per_1k"),
        ("orders", {"quantity": float(credits(10)), "max_price_per_1k": 300}, "quantity"),
        ("orders", {"quantity": credits(10), "max_price_per_1k": 3e2}, "max_price_per_1k"),
    ],
)
def test_a_whole_number_written_as_a_float_is_refused_and_changes_nothing(
    market_stripe, seller, buyer, path, body, param
):
    # given: credits on offer, so a valid order would be reserved
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    api = client_for(seller if path == "listings" else buyer)
    before = rows()

    # when
    r = api.post(f"/api/v1/market/{path}", body, content_type="application/json")

    # then: refused as malformed, naming the field, not read as the integer it rounds to
    assert r.status_code == 400, r.content
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", param)
    assert rows() == before


@pytest.mark.parametrize("quantity", ["40000000.0", "4e7"])
def test_the_book_refuses_a_quote_for_a_quantity_with_a_decimal_point(seller, buyer, quantity):
    # when
    r = client_for(buyer).get("/api/v1/market/listings", {"quantity": quantity})

    # then
    assert r.status_code == 400, r.content
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (
        "invalid_request",
        "quantity",
    )


def test_another_organizations_listing_and_order_answer_404(market_stripe, seller, buyer):
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    api_buyer = client_for(buyer)
    r = api_buyer.post(
        "/api/v1/market/orders",
        {"quantity": credits(10), "max_price_per_1k": 300},
        content_type="application/json",
    )
    order_id = r.json()["id"]
    before = rows()
    api_seller = client_for(seller)
    assert api_buyer.delete(f"/api/v1/market/listings/{listing.pk}").status_code == 404
    assert api_buyer.get(f"/api/v1/market/listings/{listing.pk}").status_code == 404
    assert api_seller.get(f"/api/v1/market/orders/{order_id}").status_code == 404
    assert rows() == before


def test_a_key_without_the_marketplace_scope_is_refused(seller):
    api = client_for(seller, scopes=(Scope.BILLING_READ,))
    r = api.get("/api/v1/market/listings")
    assert r.status_code == 403 and r.json()["error"]["code"] == "permission_denied"


def test_stripe_down_answers_503_payments_unavailable(market_stripe, seller, buyer):
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    market_stripe.down = True
    r = client_for(buyer).post(
        "/api/v1/market/orders",
        {"quantity": credits(10), "max_price_per_1k": 300},
        content_type="application/json",
    )
    assert r.status_code == 503 and r.json()["error"]["code"] == "payments_unavailable"


def test_an_order_stripe_could_not_charge_is_refused_before_anything_is_reserved(
    market_stripe, seller, buyer, settings
):
    # given Stripe's card minimum (50 cents) and maximum (8 digits), and a
    # listing at $3 per 1,000 credits
    settings.MARKET_MIN_ORDER_AMOUNTS = settings.STRIPE_MINIMUM_CHARGES
    settings.MARKET_MAX_ORDER_AMOUNT = 99_999_999
    listing_create(seller=seller, quantity=credits(1000), price_per_1k=300, currency="usd")
    api = client_for(buyer)
    before = rows()

    # when a buyer orders 10 credits (3 cents)
    small = api.post(
        "/api/v1/market/orders",
        {"quantity": credits(10), "max_price_per_1k": 300},
        content_type="application/json",
    )

    # then it is refused with the amount and the minimum, nothing reserved
    # (no order, no journal), and no checkout opened at Stripe
    assert small.status_code == 400, small.content
    error = small.json()["error"]
    assert (error["code"], error["param"]) == ("amount_below_minimum", "quantity")
    assert (error["amount"], error["limit"]) == (3, 50)
    assert rows() == before
    # and above the maximum alike
    settings.MARKET_MAX_ORDER_AMOUNT = 2_99
    large = api.post(
        "/api/v1/market/orders",
        {"quantity": credits(1000), "max_price_per_1k": 300},
        content_type="application/json",
    )
    assert large.json()["error"]["code"] == "amount_above_maximum", large.content
    assert rows() == before
    # while 200 credits (60 cents) is an order
    fine = api.post(
        "/api/v1/market/orders",
        {"quantity": credits(200), "max_price_per_1k": 300},
        content_type="application/json",
    )
    assert fine.status_code == 201, fine.content
    assert fine.json()["amount_total"] == 60


def test_the_minimum_order_is_the_one_of_the_orders_currency(
    market_stripe, seller, buyer, settings
):
    # given a marketplace in dollars and pounds with Stripe's minimums (50
    # cents, 30 pence), and a listing in each at 3 minor units per 10 credits
    settings.MARKET_CURRENCIES = ["usd", "gbp"]
    settings.MARKET_MIN_ORDER_AMOUNTS = settings.STRIPE_MINIMUM_CHARGES
    for currency in ("usd", "gbp"):
        listing_create(seller=seller, quantity=credits(400), price_per_1k=300, currency=currency)
    api = client_for(buyer)
    before = rows()

    def order(currency):
        return api.post(
            "/api/v1/market/orders",
            {"quantity": credits(100), "max_price_per_1k": 300, "currency": currency},
            content_type="application/json",
        )

    # when a buyer orders 100 credits (30 minor units) in each
    in_dollars = order("usd")
    # then 30 cents is under the dollar's minimum, and nothing was reserved
    assert in_dollars.status_code == 400, in_dollars.content
    error = in_dollars.json()["error"]
    assert (error["code"], error["amount"], error["limit"]) == ("amount_below_minimum", 30, 50)
    assert rows() == before
    # while 30 pence is the pound's minimum: an order
    in_pounds = order("gbp")
    assert in_pounds.status_code == 201, in_pounds.content
    assert (in_pounds.json()["amount_total"], in_pounds.json()["currency"]) == (30, "gbp")


def test_an_order_in_a_currency_without_a_minimum_is_refused_not_a_server_error(
    market_stripe, seller, buyer, settings
):
    # given a deployment that trades Chilean pesos but set no minimum for them
    # (the system check that says so runs in manage.py, not in gunicorn)
    settings.MARKET_CURRENCIES = ["usd", "clp"]
    listing_create(seller=seller, quantity=credits(400), price_per_1k=300, currency="clp")
    before = rows()

    # when a buyer orders in pesos
    r = client_for(buyer).post(
        "/api/v1/market/orders",
        {"quantity": credits(100), "max_price_per_1k": 300, "currency": "clp"},
        content_type="application/json",
    )

    # then it is a 503 that names the currency, and nothing is reserved
    assert r.status_code == 503, r.content
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (
        "currency_not_configured",
        "currency",
    )
    assert rows() == before


def test_an_order_stripe_refuses_is_a_502_and_its_reservation_is_given_back(
    market_stripe, seller, buyer, monkeypatch
):
    # given Stripe refusing the order's checkout (a parameter it will not take; the
    # stand-in takes every valid one, so the client module's call is replaced)
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")

    def refuse(**_params):
        raise stripe_client.StripeRequestRefused(
            "Invalid currency", code="parameter_invalid", status=400, request_id="req_test"
        )

    monkeypatch.setattr(stripe_client, "checkout_session_create", refuse)

    # when it orders
    r = client_for(buyer).post(
        "/api/v1/market/orders",
        {"quantity": credits(10), "max_price_per_1k": 300},
        content_type="application/json",
    )

    # then Stripe's refusal is named (not "unreachable, try again"), and the
    # order failed with its credits back on the listing
    assert r.status_code == 502, r.content
    assert r.json()["error"]["code"] == "payment_provider_refused"
    order = MarketOrder.objects.get(buyer=buyer)
    assert (order.status, order.failure_code) == ("failed", "payment_provider_refused")
    listing.refresh_from_db()
    assert listing.status == "open"
    reorder = client_for(buyer).post(
        "/api/v1/market/orders",
        {"quantity": credits(100), "max_price_per_1k": 300, "listing": listing.pk},
        content_type="application/json",
    )
    assert reorder.json()["error"]["code"] == "payment_provider_refused"  # all 100 were free again


def test_an_order_of_a_buyer_whose_customer_was_deleted_at_stripe_goes_through(
    market_stripe, seller, buyer
):
    # given a buyer whose Stripe customer was deleted at Stripe
    from gymbilling.market.services import market_checkout_handle
    from gymbilling.models import BillingCustomer, FormerStripeCustomer

    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    old = BillingCustomer.objects.get(organization=buyer).stripe_customer_id
    market_stripe.delete_customer(old)

    # when it orders
    r = client_for(buyer).post(
        "/api/v1/market/orders",
        {"quantity": credits(10), "max_price_per_1k": 300},
        content_type="application/json",
    )

    # then the order is opened for a new customer, and, paid, delivers its credits
    assert r.status_code == 201, r.content
    new = BillingCustomer.objects.get(organization=buyer).stripe_customer_id
    assert new != old
    assert FormerStripeCustomer.objects.get(stripe_customer_id=old).replaced_by == new
    order = MarketOrder.objects.get(pk=r.json()["id"])
    assert market_stripe.session(order.checkout.stripe_session_id)["customer"] == new
    market_checkout_handle(order.checkout, paid_session(market_stripe, order))
    order.refresh_from_db()
    assert order.status == "paid"
