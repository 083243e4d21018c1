"""The marketplace page: the Django test client on the real database, Stripe's stand-in over HTTP.

Every refusal is drawn on the page with its status and code, and leaves the
ledger, the marketplace's rows and every balance exactly as they were.
"""

from __future__ import annotations

import re
from datetime import timedelta
from html import unescape

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts.models import Membership, Role
from gymbilling.market.services import (
    listing_create,
    order_reserve,
    order_shortfall_refund_resolve,
    payouts_run,
)
from gymbilling.models import CheckoutSession, MarketListing, MarketOrder
from gymbilling.pages.market import MarketPage
from metering.selectors import organization_balance
from tests.dashboard.conftest import DashboardClient
from tests.dashboard.pages import figure, refused, row, rows, text
from tests.factories import UserFactory
from tests.gymbilling import conftest as payment_fixtures
from tests.gymbilling.market import conftest as market_fixtures
from tests.gymbilling.market.conftest import (
    market_member,
    refund,
    refused_for_a_cause_finance_can_fix,
    shortfall_unrefunded,
    sold,
    subscription_credits,
)
from tests.helpers import credits, ledger_rows

pytestmark = pytest.mark.django_db

# The marketplace tests' own: the stand-in as the marketplace's Stripe, a seller with
# 1,000 credits of a paid subscription and a buyer (each a Stripe customer), and
# webhook delivery into this test's transaction.
market_stripe, seller, buyer = (
    market_fixtures.market_stripe,
    market_fixtures.seller,
    market_fixtures.buyer,
)
deliver = payment_fixtures.deliver

MARKET = "/dashboard/market"


def signed_in(organization, role: str = Role.OWNER) -> DashboardClient:
    """A browser of its own, signed in as a new member of `organization` in `role`."""
    user = UserFactory()
    Membership.objects.create(user=user, organization=organization, role=role)
    browser = DashboardClient()
    browser.force_login(user)
    return browser


def state(*organizations):
    """Everything a marketplace action may change: rows, and each organization's credits."""
    return (
        ledger_rows(),
        MarketListing.objects.count(),
        MarketOrder.objects.count(),
        CheckoutSession.objects.count(),
        [
            (balance.available, balance.held, balance.escrowed)
            for balance in (organization_balance(organization=o) for o in organizations)
        ],
    )


def older_link(page, what: str) -> str:
    """The query string of the page's link to the older `what` (orders, sales)."""
    found = re.search(rf'href="\?([^"]*)" rel="next" data-older="{what}"', text(page))
    assert found, f"no link to older {what}"
    return unescape(found[1])


def sell(browser, quantity: str, price: str, currency: str = "usd"):
    return browser.post(
        MARKET, {"action": "sell", "quantity": quantity, "price": price, "currency": currency}
    )


def buy(browser, quantity: str, price: str, **more):
    fields = {"action": "buy", "quantity": quantity, "price": price, "currency": "usd"}
    return browser.post(MARKET, fields | more)


def test_listing_credits_moves_them_into_escrow_and_shows_them_as_yours(seller):
    # given a seller with 1,000 credits of a paid subscription
    browser = signed_in(seller)
    assert organization_balance(organization=seller).available == credits(1000)

    # when they list 100 at 2.50 USD per 1,000 credits
    response = sell(browser, "100", "2.50")

    # then 100 credits moved from the wallet into escrow, for one listing at 250 cents
    listing = MarketListing.objects.get(seller=seller)
    assert response.status_code == 302 and response["Location"] == MARKET
    assert (listing.quantity, listing.price_per_1k, listing.currency, listing.status) == (
        credits(100),
        250,
        "usd",
        "open",
    )
    balance = organization_balance(organization=seller)
    assert (balance.available, balance.escrowed) == (credits(900), credits(100))
    # and the page says so once, lists it under the seller's listings and in the book
    page = browser.get(MARKET)
    assert f"Listed 100 credits (listing #{listing.pk})" in text(page)
    assert row(page, "data-own-listing", listing.pk) == {
        "quantity": "100",
        "sold": "0",
        "available": "100",
        "price": "2.50 USD",
        "status": "Open",
    }
    assert row(page, "data-listing", listing.pk) == {"available": "100", "price": "2.50 USD"}
    assert "Listed 100 credits" not in text(browser.get(MARKET))
    overview = browser.get("/dashboard/")
    assert (figure(overview, "available"), figure(overview, "escrowed")) == ("900", "100")


@pytest.mark.parametrize(
    ("quantity", "price", "currency", "status", "code"),
    [
        ("5000", "2.50", "usd", 402, "insufficient_resellable_credits"),
        ("5", "2.50", "usd", 400, "quantity_below_minimum"),
        ("0", "2.50", "usd", 400, "invalid_quantity"),
        ("100", "0", "usd", 400, "price_out_of_bounds"),
        ("100", "1000.01", "usd", 400, "price_out_of_bounds"),
        ("100", "2.50", "eur", 400, "unsupported_currency"),
        ("0.0000001", "2.50", "usd", 400, "invalid_quantity"),
        ("1e99999999", "2.50", "usd", 400, "invalid_quantity"),
        ("-100", "2.50", "usd", 400, "invalid_quantity"),
        # digits of other scripts, which Decimal would read as 100 and 2.50
        ("\u0661\u0660\u0660", "2.50", "usd", 400, "invalid_quantity"),
        ("100", "\u0968.\u096b\u0966", "usd", 400, "invalid_price"),
        ("100", "2.505", "usd", 400, "invalid_price"),
        ("100", "two", "usd", 400, "invalid_price"),
    ],
)
def test_a_refused_listing_is_drawn_with_its_code_and_changes_nothing(
    seller, quantity, price, currency, status, code
):
    browser = signed_in(seller)
    before = state(seller)

    response = sell(browser, quantity, price, currency)

    assert refused(response, status, code), (response.status_code, text(response)[-800:])
    assert 'aria-label="List credits"' in text(response)  # the page, drawn again
    assert state(seller) == before


def test_only_paid_subscription_credits_can_be_listed(market_stripe, grant):
    # given an organization whose 500 credits are a credit pack's
    org = market_member()
    grant(org, credits(500), source="pack", resellable=False)
    browser = signed_in(org)
    before = state(org)

    response = sell(browser, "100", "2.50")

    assert refused(response, 402, "insufficient_resellable_credits")
    assert state(org) == before


def test_buying_a_listing_goes_to_checkout_and_the_paid_credits_show(
    market_stripe, seller, buyer, deliver
):
    # given 100 credits on offer at 2.50 USD per 1,000, and a buyer on the page
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=250, currency="usd")
    browser = signed_in(buyer, Role.BILLING)
    page = browser.get(MARKET)
    assert row(page, "data-listing", listing.pk) == {"available": "100", "price": "2.50 USD"}
    assert seller.name not in text(page) and seller.slug not in text(page)

    # when they buy 40 of them
    response = buy(browser, "40", "2.50", listing_id=listing.pk)

    # then the credits are reserved for them and the browser goes to Stripe's Checkout
    order = MarketOrder.objects.get(buyer=buyer)
    assert response.status_code == 302 and response["Location"] == order.checkout_url
    assert order.checkout_url.startswith(f"{market_stripe.standin.api_base}/checkout/")
    assert (order.quantity, order.amount_total, order.status) == (credits(40), 10, "pending")
    assert order.checkout.kind == "market_order"
    assert row(browser.get(MARKET), "data-listing", listing.pk)["available"] == "60"

    # and once paid at Stripe, back on the page: the order is paid and the credits theirs
    market_stripe.pay(order.checkout.stripe_session_id)
    assert "failed" not in deliver()
    back = browser.get(f"/market/?order={order.pk}&checkout=success", follow=True)
    assert f'data-order="{order.pk}" data-order-status="paid"' in text(back)
    assert f"Order #{order.pk}: 40 credits for 0.10 USD" in text(back)
    assert figure(browser.get("/dashboard/"), "available") == "40"
    # and the seller sees 40 sold, 60 still on offer
    assert row(signed_in(seller).get(MARKET), "data-own-listing", listing.pk) == {
        "quantity": "100",
        "sold": "40",
        "available": "60",
        "price": "2.50 USD",
        "status": "Open",
    }


def test_the_cheapest_offers_fill_an_order_across_listings(market_stripe, seller, buyer):
    # given 100 credits at 2.00 USD and 100 at 3.00 USD per 1,000, of two sellers
    other = market_member(credits_amount=credits(1000))
    cheap = listing_create(seller=seller, quantity=credits(100), price_per_1k=200, currency="usd")
    dear = listing_create(seller=other, quantity=credits(100), price_per_1k=300, currency="usd")
    browser = signed_in(buyer)

    # when the buyer asks for 150 credits at most 3.00 per 1,000
    response = buy(browser, "150", "3")

    # then all of the cheaper listing and 50 of the dearer are reserved: 20 + 15 cents
    order = MarketOrder.objects.get(buyer=buyer)
    assert response["Location"] == order.checkout_url
    assert sorted((f.listing_id, f.quantity) for f in order.fills.all()) == [
        (cheap.pk, credits(100)),
        (dear.pk, credits(50)),
    ]
    assert order.amount_total == 35


def test_a_refused_order_is_drawn_with_its_code_and_changes_nothing(
    market_stripe, seller, buyer, settings
):
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    as_buyer, as_seller = signed_in(buyer), signed_in(seller)
    before = state(seller, buyer)

    for browser, fields, status, code in [
        (as_seller, {"quantity": "10", "price": "3", "listing_id": listing.pk}, 400, "own_listing"),
        (as_buyer, {"quantity": "101", "price": "3"}, 409, "insufficient_liquidity"),
        (as_buyer, {"quantity": "10", "price": "2.99"}, 409, "insufficient_liquidity"),
        (
            as_buyer,
            {"quantity": "10", "price": "3", "listing_id": 999_999},
            404,
            "listing_not_found",
        ),
        (as_buyer, {"quantity": "0", "price": "3"}, 400, "invalid_quantity"),
        (as_buyer, {"quantity": "ten", "price": "3"}, 400, "invalid_quantity"),
        (as_buyer, {"quantity": "\u0661\u0660", "price": "3"}, 400, "invalid_quantity"),
        # more than the ledger moves at once, with whatever is offered accepted: it was a
        # 500 (a BIGINT overflow) before the services checked the bound the API checks
        (
            as_buyer,
            {"quantity": "1000000000.000001", "price": "3", "allow_partial": "on"},
            400,
            "invalid_quantity",
        ),
        (
            as_buyer,
            {"quantity": "10", "price": "3", "currency": "eur"},
            400,
            "unsupported_currency",
        ),
    ]:
        response = buy(browser, **fields)
        assert refused(response, status, code), (fields, response.status_code)
    # (Stripe's card minimum, 50 cents, is more than 10 credits at 3.00 per 1,000)
    settings.MARKET_MIN_ORDER_AMOUNTS = settings.STRIPE_MINIMUM_CHARGES
    assert refused(buy(as_buyer, "10", "3"), 400, "amount_below_minimum")

    assert state(seller, buyer) == before
    assert listing.status == MarketListing.objects.get(pk=listing.pk).status == "open"


def test_an_order_over_the_buyer_s_pending_orders_cap_is_drawn_with_its_code(
    market_stripe, seller, buyer, settings
):
    # given: a buyer with as many orders awaiting payment as the cap allows
    settings.MARKET_PENDING_ORDERS_PER_BUYER = 1
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    browser = signed_in(buyer)
    assert buy(browser, "10", "3").status_code == 302
    before = state(seller, buyer)

    # when: they order again on the page
    response = buy(browser, "10", "3")

    # then: the page says why, with the code, and nothing was reserved
    assert refused(response, 429, "pending_order_limit_reached")
    assert "At most 1 of your orders may await payment at once" in text(response)
    assert state(seller, buyer) == before


def test_stripe_unreachable_gives_the_reserved_credits_back(market_stripe, seller, buyer):
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    browser = signed_in(buyer)
    balances = state(seller, buyer)[-1]
    market_stripe.down = True

    response = buy(browser, "50", "3")

    assert refused(response, 503, "payments_unavailable")
    assert state(seller, buyer)[-1] == balances
    assert MarketOrder.objects.get(buyer=buyer).status == "failed"


def test_withdrawing_a_listing_gives_its_credits_back(seller):
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    browser = signed_in(seller, Role.ADMIN)

    response = browser.post(MARKET, {"action": "withdraw", "listing": listing.pk})
    again = browser.post(MARKET, {"action": "withdraw", "listing": listing.pk})

    assert response.status_code == 302 and response["Location"] == MARKET
    balance = organization_balance(organization=seller)
    assert (balance.available, balance.escrowed) == (credits(1000), 0)
    page = browser.get(MARKET)
    assert row(page, "data-own-listing", listing.pk)["status"] == "Canceled"
    assert rows(page, "data-listing") == []  # off the book
    assert refused(again, 409, "listing_not_open")


def test_another_organizations_listing_cannot_be_withdrawn(seller, buyer):
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    browser = signed_in(buyer)
    before = state(seller, buyer)

    response = browser.post(MARKET, {"action": "withdraw", "listing": listing.pk})

    assert refused(response, 404, "not_found")
    assert state(seller, buyer) == before
    assert MarketListing.objects.get(pk=listing.pk).status == "open"


def test_a_member_sees_the_market_but_cannot_trade(market_stripe, seller, buyer):
    # given a listing, and a plain member of each organization
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    as_seller, as_buyer = signed_in(seller, Role.MEMBER), signed_in(buyer, Role.MEMBER)
    before = state(seller, buyer)

    # when they read the page, and try to list, withdraw and buy
    page = as_seller.get(MARKET)
    listed = sell(as_seller, "100", "2.50")
    withdrawn = as_seller.post(MARKET, {"action": "withdraw", "listing": listing.pk})
    bought = buy(as_buyer, "10", "3", listing_id=listing.pk)

    # then they see the book and the organization's listings, with no forms to act,
    # and every action is refused as the API refuses it; nothing changed
    assert page.status_code == 200
    assert row(page, "data-own-listing", listing.pk)["status"] == "Open"
    assert 'name="action"' not in text(page).split("<main>", 1)[1]
    for response in (listed, withdrawn, bought):
        assert refused(response, 403, "permission_denied")
    assert state(seller, buyer) == before


def test_a_marketplace_post_needs_its_csrf_token(seller):
    user = UserFactory()
    Membership.objects.create(user=user, organization=seller, role=Role.OWNER)
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(user)
    before = state(seller)

    response = sell(browser, "100", "2.50")

    assert response.status_code == 403
    assert state(seller) == before


def test_the_page_reads_as_many_queries_for_many_listings_as_for_one(seller, buyer):
    # given one listing of the seller's and one of another's, then five more of each
    browser = signed_in(seller)
    others = market_member(credits_amount=credits(1000))

    def list_one():
        for org in (seller, others):
            listing_create(seller=org, quantity=credits(10), price_per_1k=300, currency="usd")

    list_one()
    with CaptureQueriesContext(connection) as few:
        browser.get(MARKET)
    for _ in range(5):
        list_one()
    with CaptureQueriesContext(connection) as many:
        page = browser.get(MARKET)

    # then the page shows them all, at the same cost
    assert len(rows(page, "data-listing")) == 12 and len(rows(page, "data-own-listing")) == 6
    assert len(many) == len(few)


def test_an_order_of_another_organization_is_not_shown(market_stripe, seller, buyer):
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    buy(signed_in(buyer), "50", "3")
    order = MarketOrder.objects.get(buyer=buyer)

    page = signed_in(seller).get(f"{MARKET}?order={order.pk}")
    odd = signed_in(seller).get(f"{MARKET}?order=²")

    assert page.status_code == 200 and "data-order=" not in text(page)
    assert odd.status_code == 200 and "data-order=" not in text(odd)


def test_subscription_credits_of_the_buyer_stay_where_they_are(market_stripe, seller, buyer):
    # Buying never touches the buyer's own credits: they pay by card.
    subscription_credits(buyer, credits(70))
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")

    buy(signed_in(buyer), "50", "3")

    assert organization_balance(organization=buyer).available == credits(70)


# --- the organization's orders, sales, earnings and payouts ---------------------------------


def test_the_buyer_s_orders_show_newest_first_a_page_at_a_time(
    market_stripe, seller, buyer, monkeypatch
):
    # given: pages of two orders, and three orders of the buyer's (the first paid),
    # and one of another buyer's
    monkeypatch.setattr(MarketPage, "orders_per_page", 2)
    paid = sold(market_stripe, seller, buyer, price=250)
    listing_create(seller=seller, quantity=credits(500), price_per_1k=300, currency="usd")
    pending = [
        order_reserve(buyer=buyer, quantity=credits(q), max_price_per_1k=300, currency="usd")
        for q in (100, 200)
    ]
    other = order_reserve(
        buyer=market_member(), quantity=credits(50), max_price_per_1k=300, currency="usd"
    )
    browser = signed_in(buyer, Role.MEMBER)

    # when: the buyer reads the page, then its older orders
    page = browser.get(MARKET)
    older = browser.get(f"{MARKET}?{older_link(page, 'orders')}")

    # then: newest first, two a page, none of the other buyer's
    assert rows(page, "data-own-order") == [str(pending[1].pk), str(pending[0].pk)]
    assert rows(older, "data-own-order") == [str(paid.pk)]
    assert str(other.pk) not in rows(page, "data-own-order") + rows(older, "data-own-order")
    assert row(page, "data-own-order", pending[1].pk) == {
        "quantity": "200",
        "amount": "0.60 USD",
        "status": "Reserved, awaiting payment",
        "note": "",
    }
    assert row(older, "data-own-order", paid.pk) == {
        "quantity": "100",
        "amount": "0.25 USD",
        "status": "Paid and delivered",
        "note": "",
    }
    assert 'data-older="orders"' not in text(older)


def test_the_seller_sees_earnings_sales_and_payouts(market_stripe, seller, buyer, monkeypatch):
    # given: a sale paid out (1.24 USD, fee 0.12), half refunded afterwards (the
    # seller keeps it), then a sale in its holding period (0.50 USD, fee 0.05),
    # on pages of one sale
    monkeypatch.setattr(MarketPage, "sales_per_page", 1)
    first = sold(market_stripe, seller, buyer)
    assert payouts_run(now=timezone.now() + timedelta(days=8)) == 1
    refund(first, 62)
    second = sold(market_stripe, seller, buyer, price=500)
    browser = signed_in(seller, Role.MEMBER)

    # when
    page = browser.get(MARKET)
    older = browser.get(f"{MARKET}?{older_link(page, 'sales')}")

    # then: the summary of the currency, in its money
    assert row(page, "data-earnings", "usd") == {
        "sales": "2",
        "gross": "1.74 USD",
        "fees": "0.17 USD",
        "reversed": "0.00 USD",
        "earned": "1.57 USD",
        "pending": "0.45 USD",
        "available": "0.00 USD",
        "in_transit": "0.00 USD",
        "paid_out": "1.12 USD",
    }
    # the sales, a page at a time, newest first
    [newest], [oldest] = second.fills.all(), first.fills.all()
    assert rows(page, "data-sale") == [str(newest.pk)]
    assert row(page, "data-sale", newest.pk) == {
        "quantity": "100",
        "gross": "0.50 USD",
        "fee": "0.05 USD",
        "refunded": "0.00 USD",
        "earned": "0.45 USD",
        "proceeds": "In the holding period",
    }
    assert rows(older, "data-sale") == [str(oldest.pk)]
    assert row(older, "data-sale", oldest.pk) == {
        "quantity": "100",
        "gross": "1.24 USD",
        "fee": "0.12 USD",
        "refunded": "0.62 USD",
        "earned": "1.12 USD",
        "proceeds": "Paid out",
    }
    # (the summary stays on every page of sales)
    assert row(older, "data-earnings", "usd")["earned"] == "1.57 USD"
    # and the payout
    oldest.refresh_from_db()
    assert row(page, "data-payout", oldest.payout_id) == {
        "amount": "1.12 USD",
        "method": "Credit on the next invoice",
        "status": "Sent",
    }
    # the buyer sold nothing and sees none of it
    theirs = signed_in(buyer).get(MARKET)
    assert rows(theirs, "data-sale") == rows(theirs, "data-payout") == []
    assert 'data-earnings="none"' in text(theirs)
    assert rows(page, "data-own-order") == []


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("orders_before=abc", "invalid_orders_before"),
        ("orders_before=0", "invalid_orders_before"),
        ("sales_before=-1", "invalid_sales_before"),
        ("sales_before=99999999999999999999", "invalid_sales_before"),
    ],
)
def test_a_page_cursor_that_is_not_an_id_is_a_400_with_its_code(seller, query, code):
    response = signed_in(seller).get(f"{MARKET}?{query}")

    assert refused(response, 400, code), (response.status_code, text(response)[-500:])


def test_the_page_reads_as_many_queries_for_many_sales_and_orders_as_for_one(
    market_stripe, seller, buyer
):
    # given: an organization that sold and bought once, then four times more
    trader = market_member(credits_amount=credits(1000))
    browser = signed_in(trader)

    def trade():
        sold(market_stripe, trader, buyer, price=500)
        sold(market_stripe, seller, trader, price=500)

    trade()
    payouts_run(now=timezone.now() + timedelta(days=8))
    with CaptureQueriesContext(connection) as few:
        browser.get(MARKET)
    for _ in range(4):
        trade()
    payouts_run(now=timezone.now() + timedelta(days=8))
    with CaptureQueriesContext(connection) as many:
        page = browser.get(MARKET)

    # then: the page shows them all, at the same cost
    assert len(rows(page, "data-sale")) == len(rows(page, "data-own-order")) == 5
    assert len(rows(page, "data-payout")) == 2
    assert len(many) == len(few)


def test_a_trader_can_pay_a_pending_order_from_the_list_and_a_member_cannot(
    market_stripe, seller, buyer
):
    # given: an order the buyer reserved and has not paid yet
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    buy(signed_in(buyer, Role.BILLING), "50", "3")
    order = MarketOrder.objects.get(buyer=buyer)

    # when: a billing member and a plain member read the page
    as_trader = signed_in(buyer, Role.BILLING).get(MARKET)
    as_member = signed_in(buyer, Role.MEMBER).get(MARKET)

    # then: the trader has the link to Stripe's page, the member only the order
    assert f'<a href="{order.checkout_url}"' in text(as_trader)
    assert row(as_member, "data-own-order", order.pk)["status"] == "Reserved, awaiting payment"
    assert order.checkout_url not in text(as_member)


def test_a_shortfall_finance_refunded_by_hand_shows_refunded_to_the_buyer(
    market_stripe, buyer, django_capture_on_commit_callbacks
):
    # given: an order of the buyer's paid after its credits expired, whose refund of the
    # 0.30 USD not delivered Stripe refused, so it waits for finance
    order, _ = shortfall_unrefunded(market_stripe, buyer, django_capture_on_commit_callbacks)
    refused_for_a_cause_finance_can_fix(market_stripe, order)
    browser = signed_in(buyer, Role.MEMBER)
    waiting = row(browser.get(MARKET), "data-own-order", order.pk)["note"]
    assert waiting == "0.30 USD not delivered, being refunded"

    # when: finance refunds it by bank transfer and marks it resolved in the admin
    order_shortfall_refund_resolve(
        order_id=order.pk, note="Bank transfer BT-7", actor=UserFactory(is_staff=True)
    )

    # then: the buyer reads that it is refunded
    resolved = row(browser.get(MARKET), "data-own-order", order.pk)["note"]
    assert resolved == "0.30 USD not delivered, refunded"
