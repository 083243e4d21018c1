"""A buyer organization's orders awaiting payment are capped (MARKET_PENDING_ORDERS_PER_BUYER):
each keeps its reserved credits off the market until paid or released, so a buyer who
never pays could otherwise hold the whole book, order after order.

Stripe is the stand-in over HTTP; the race runs on real PostgreSQL connections.
"""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.conf import settings as django_settings
from django.utils import timezone

from accounts.errors import ApplicationError
from gymbilling.market import services as market_services
from gymbilling.market.selectors import listings_with_availability
from gymbilling.market.services import (
    listing_create,
    market_checkout_handle,
    order_create,
    orders_expire,
)
from gymbilling.models import MarketOrder, MoneyEntry, OrderStatus
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from tests.gymbilling.market.conftest import client_for, market_member, paid_session
from tests.helpers import credits, ledger_rows, on_own_connection, pause_after, run_against_paused

ORDERS = "/api/v1/market/orders"


def _order(api, quantity=10, **more):
    body = {"quantity": credits(quantity), "max_price_per_1k": 300} | more
    return api.post(ORDERS, body, content_type="application/json")


def _state(buyer, listing):
    """What an order changes: the ledgers, the orders, the buyer's and the listing's credits."""
    return (
        ledger_rows(),
        MoneyEntry.objects.count(),
        MarketOrder.objects.count(),
        organization_balance(organization=buyer).escrowed,
        listings_with_availability().get(pk=listing.pk).available,
    )


@pytest.mark.django_db
def test_an_order_over_the_cap_is_refused_with_its_code_and_reserves_nothing(
    market_stripe, seller, buyer
):
    # given: the default cap, and as many orders awaiting payment as it allows
    assert django_settings.MARKET_PENDING_ORDERS_PER_BUYER == 3
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    api = client_for(buyer)
    assert [_order(api).status_code for _ in range(3)] == [201, 201, 201]
    before = _state(buyer, listing)

    # when: one more
    response = _order(api)

    # then: 429 with its code, nothing reserved, the ledgers as they were
    assert response.status_code == 429, response.content
    assert response.json()["error"]["code"] == "pending_order_limit_reached"
    assert _state(buyer, listing) == before
    assert before[-1] == credits(70)
    # and another buyer is not held back by it
    assert _order(client_for(market_member())).status_code == 201


@pytest.mark.django_db
def test_paying_an_order_or_its_expiry_frees_a_slot(market_stripe, seller, buyer, settings):
    # given: a cap of 2, reached
    settings.MARKET_PENDING_ORDERS_PER_BUYER = 2
    listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    api = client_for(buyer)
    first, second = (_order(api).json()["id"] for _ in range(2))
    assert _order(api).json()["error"]["code"] == "pending_order_limit_reached"

    # when: one is paid
    order = MarketOrder.objects.get(pk=first)
    market_checkout_handle(order.checkout, paid_session(market_stripe, order))

    # then: a slot is free again, and taken
    assert MarketOrder.objects.get(pk=first).status == OrderStatus.PAID
    third = _order(api)
    assert third.status_code == 201, third.content
    assert _order(api).json()["error"]["code"] == "pending_order_limit_reached"

    # when: the two awaiting payment expire unpaid
    orders_expire(now=timezone.now() + settings.MARKET_RESERVATION_TTL + timedelta(seconds=1))

    # then: both slots are free again
    assert set(
        MarketOrder.objects.filter(pk__in=[second, third.json()["id"]]).values_list(
            "status", flat=True
        )
    ) == {OrderStatus.EXPIRED}
    assert [_order(api).status_code for _ in range(2)] == [201, 201]
    assert ledger_reconcile().ok


@pytest.mark.django_db(transaction=True)
def test_two_orders_racing_for_the_last_slot_do_not_both_get_it(
    market_stripe, settings, monkeypatch
):
    # given: a cap of 3, two orders awaiting payment; two more sent at once, for two
    # different listings (neither waits for the other's listing rows); the first is
    # paused once it has counted the buyer's pending orders, before it commits
    settings.MARKET_PENDING_ORDERS_PER_BUYER = 3
    buyer = market_member()
    listings = [
        listing_create(
            seller=market_member(credits_amount=credits(100)),
            quantity=credits(100),
            price_per_1k=300,
            currency="usd",
        )
        for _ in range(2)
    ]

    def ten_credits(**more) -> None:
        order_create(
            buyer=buyer, quantity=credits(10), max_price_per_1k=300, currency="usd", **more
        )

    for _ in range(2):
        ten_credits()
    outcomes: dict[str, str] = {}
    errors: list = []

    def order(name: str, listing) -> None:
        try:
            ten_credits(listing_id=listing.pk)
            outcomes[name] = "reserved"
        except ApplicationError as exc:
            outcomes[name] = exc.code

    paused, resume = pause_after(monkeypatch, market_services, "_require_chargeable", thread="a")
    first = threading.Thread(
        name="a", target=on_own_connection, args=(lambda: order("a", listings[0]), errors)
    )
    first.start()
    assert paused.wait(timeout=60)

    # when: the second order comes meanwhile
    second = threading.Thread(
        name="b", target=on_own_connection, args=(lambda: order("b", listings[1]), errors)
    )
    run_against_paused(second, paused=first, resume=resume, what="the second order")

    # then: one got the last slot, the other was refused; three orders await payment
    assert errors == []
    assert sorted(outcomes.values()) == ["pending_order_limit_reached", "reserved"]
    assert outcomes["a"] == "reserved"
    assert MarketOrder.objects.filter(buyer=buyer, status=OrderStatus.PENDING).count() == 3
    assert organization_balance(organization=buyer).escrowed == credits(30)
    assert ledger_reconcile().ok
