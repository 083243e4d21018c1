"""A marketplace order over HTTP against the local Stripe stand-in: nothing mocked.

order -> Checkout URL -> pay on the stand-in's page -> the checkout.session
event processed (checkout_session_refresh reads the session from Stripe) ->
the buyer has the credits and the seller's proceeds are pending.
"""

from __future__ import annotations

import contextlib

import pytest

from gymbilling.market.services import listing_create, order_create
from gymbilling.models import MarketOrder, MoneyAccount, OrderStatus
from gymbilling.services.events import checkout_session_refresh
from metering.selectors import organization_balance
from tests.factories import OrganizationFactory
from tests.gymbilling.market.conftest import subscription_credits
from tests.helpers import credits

pytestmark = pytest.mark.django_db


def test_order_paid_on_the_stand_in_delivers_the_credits(stripe_standin):
    # given: a listing, and a buyer with no Stripe customer yet
    seller, buyer = OrganizationFactory(), OrganizationFactory()
    subscription_credits(seller, credits(500))
    listing_create(seller=seller, quantity=credits(200), price_per_1k=450, currency="usd")
    # when: the buyer orders and pays on the Checkout page
    order = order_create(buyer=buyer, quantity=credits(150), max_price_per_1k=500, currency="usd")
    assert order.checkout_url and order.amount_total == 68  # 67.5 rounded up
    session_id = order.checkout.stripe_session_id
    stripe_standin.pay_checkout(session_id)
    assert checkout_session_refresh(session_id=session_id)
    # then
    order = MarketOrder.objects.get(pk=order.pk)
    assert order.status == OrderStatus.PAID and order.stripe_payment_intent_id
    assert organization_balance(organization=buyer).available == credits(150)
    pending = MoneyAccount.objects.get(organization=seller, kind="seller_pending")
    assert pending.balance == 68 - 7  # fee 6.8 -> 7


def test_a_declined_card_leaves_the_reservation_until_it_times_out(stripe_standin):
    seller, buyer = OrganizationFactory(), OrganizationFactory()
    subscription_credits(seller, credits(500))
    listing_create(seller=seller, quantity=credits(200), price_per_1k=450, currency="usd")
    order = order_create(buyer=buyer, quantity=credits(150), max_price_per_1k=500, currency="usd")
    session_id = order.checkout.stripe_session_id
    # The stand-in answers a declined card with an error page.
    with contextlib.suppress(Exception):
        stripe_standin.pay_checkout(session_id, card="4000000000000002")
    checkout_session_refresh(session_id=session_id)
    assert MarketOrder.objects.get(pk=order.pk).status == OrderStatus.PENDING
    # the timeout expires the session at Stripe and releases
    from datetime import timedelta

    from django.utils import timezone

    from gymbilling.market.services import orders_expire

    assert orders_expire(now=timezone.now() + timedelta(minutes=16)) == 1
    assert MarketOrder.objects.get(pk=order.pk).status == OrderStatus.EXPIRED
    assert organization_balance(organization=seller).escrowed == credits(200)
    assert organization_balance(organization=buyer).escrowed == 0
