"""20 buyers race for a listing that can fill 5 of them, on real PostgreSQL connections."""

from __future__ import annotations

import threading

import pytest
from django.db import connection

from accounts.errors import ApplicationError
from gymbilling.market.services import listing_create, order_create
from gymbilling.models import MarketFill, MarketOrder
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from tests.factories import OrganizationFactory
from tests.gymbilling.market.conftest import market_member, subscription_credits
from tests.helpers import credits


@pytest.mark.django_db(transaction=True)
def test_twenty_buyers_race_for_five_fills(market_stripe):
    # given: 100 credits listed; each buyer wants 20
    seller = OrganizationFactory()
    subscription_credits(seller, credits(100))
    listing = listing_create(seller=seller, quantity=credits(100), price_per_1k=300, currency="usd")
    buyers = [market_member() for _ in range(20)]
    barrier = threading.Barrier(len(buyers))
    outcomes: dict[int, str] = {}

    def buy(org):
        try:
            barrier.wait()
            order_create(buyer=org, quantity=credits(20), max_price_per_1k=300, currency="usd")
            outcomes[org.pk] = "filled"
        except ApplicationError as exc:
            outcomes[org.pk] = exc.code
        finally:
            connection.close()

    # when
    threads = [threading.Thread(target=buy, args=(org,)) for org in buyers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # then: exactly 5 fills, 15 clear refusals
    assert sorted(outcomes.values()).count("filled") == 5
    assert sorted(outcomes.values()).count("insufficient_liquidity") == 15
    assert MarketFill.objects.filter(listing=listing).count() == 5
    assert MarketOrder.objects.count() == 5
    assert organization_balance(organization=seller).escrowed == 0
    assert sum(organization_balance(organization=b).escrowed for b in buyers) == credits(100)
    assert ledger_reconcile().ok
