"""Marketplace fixtures.

Stripe is replaced at the client module (gymbilling.stripe_client) by
`FakeStripe` in these service-level tests: the stand-in runs over HTTP only in
test_end_to_end.py. The fake keeps what a test needs to assert on (sessions,
refunds, transfers, balance credits) and can be switched to "unavailable".
"""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

import pytest
from django.utils import timezone

from gymbilling import stripe_client
from gymbilling.models import BillingCustomer, MarketOrder
from metering.services import credits_grant
from tests.factories import OrganizationFactory
from tests.helpers import credits

_ids = itertools.count(1)


@dataclass
class FakeStripe:
    down: bool = False
    refuse_transfers: bool = False
    sessions: dict = field(default_factory=dict)
    refunds: list = field(default_factory=list)
    transfers: list = field(default_factory=list)
    balance_credits: list = field(default_factory=list)
    keys: list = field(default_factory=list)

    def _check(self, key=None):
        if self.down:
            raise stripe_client.StripeUnavailable("fake: Stripe is down")
        if key:
            self.keys.append(key)

    def customer_create(self, *, key, email, name, metadata):
        self._check(key)
        return {"id": f"cus_{next(_ids)}"}

    def checkout_session_create(self, *, key, **params):
        self._check(key)
        sid = f"cs_test_{next(_ids)}"
        session = {
            "id": sid,
            "url": f"https://checkout.test/{sid}",
            "status": "open",
            "payment_status": "unpaid",
            "payment_intent": None,
            "amount_total": params["line_items"][0]["price_data"]["unit_amount"],
            "params": params,
        }
        self.sessions[sid] = session
        return dict(session)

    def checkout_session_retrieve(self, session_id):
        self._check()
        return dict(self.sessions[session_id])

    def checkout_session_expire(self, session_id):
        self._check()
        session = self.sessions[session_id]
        if session["status"] != "open":
            raise stripe_client.StripeRequestRefused("not open", status=400)
        session["status"] = "expired"
        return dict(session)

    def pay(self, session_id):
        session = self.sessions[session_id]
        session.update(status="complete", payment_status="paid", payment_intent=f"pi_{session_id}")
        return dict(session)

    def refund_create(self, *, key, **params):
        self._check(key)
        self.refunds.append(params)
        return {"id": f"re_{next(_ids)}"}

    def transfer_create(self, *, key, **params):
        self._check(key)
        if self.refuse_transfers:
            raise stripe_client.StripeRequestRefused("no such destination", status=400)
        self.transfers.append(params)
        return {"id": f"tr_{next(_ids)}"}

    def customer_balance_credit(self, *, key, customer, **params):
        self._check(key)
        self.balance_credits.append({"customer": customer, **params})
        return {"id": f"cbtxn_{next(_ids)}"}


@pytest.fixture
def fake_stripe(monkeypatch, settings):
    fake = FakeStripe()
    settings.STRIPE_SECRET_KEY = "sk_test_fake"
    for name in (
        "customer_create",
        "checkout_session_create",
        "checkout_session_retrieve",
        "checkout_session_expire",
        "refund_create",
        "transfer_create",
        "customer_balance_credit",
    ):
        monkeypatch.setattr(stripe_client, name, getattr(fake, name))
    return fake


def subscription_credits(organization, amount, *, days=30):
    return credits_grant(
        organization=organization,
        amount=amount,
        source="subscription",
        paid=True,
        resellable=True,
        key=f"sub-{uuid.uuid4()}",
        expires_at=timezone.now() + timedelta(days=days),
    )


@pytest.fixture
def seller(db):
    org = OrganizationFactory()
    BillingCustomer.objects.create(organization=org, stripe_customer_id=f"cus_seller_{org.pk}")
    subscription_credits(org, credits(1000))
    return org


@pytest.fixture
def buyer(db):
    org = OrganizationFactory()
    BillingCustomer.objects.create(organization=org, stripe_customer_id=f"cus_buyer_{org.pk}")
    return org


def paid_session(fake: FakeStripe, order: MarketOrder) -> dict:
    return fake.pay(order.checkout.stripe_session_id)


def charge_for(order: MarketOrder, *, amount_refunded=0) -> dict:
    order.refresh_from_db()
    return {
        "id": f"ch_{order.pk}",
        "payment_intent": order.stripe_payment_intent_id,
        "amount": order.amount_total,
        "amount_refunded": amount_refunded,
        "currency": order.currency,
    }
