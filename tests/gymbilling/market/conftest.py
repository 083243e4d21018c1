"""Marketplace fixtures.

Stripe is the local stand-in (gymbilling/stripe_standin) over HTTP, as in
every billing test: `market_stripe` only adds the switches these tests need
(Stripe unreachable; a payout destination that does not exist) and reads back
what Stripe holds (sessions, refunds, transfers, balance credits).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from django.db.models import Sum
from django.test import Client
from django.utils import timezone

from accounts.models import Scope
from accounts.services import apikey_create
from gymbilling import stripe_client
from gymbilling.models import (
    BillingCustomer,
    MarketOrder,
    MoneyAccount,
    MoneyEntry,
    Plan,
    StripePrice,
)
from gymbilling.services import billing_customer_ensure, subscription_sync
from metering.models import MICRO, CreditLot
from metering.services import credits_grant
from tests.factories import OrganizationFactory
from tests.helpers import credits

UNREACHABLE = "http://127.0.0.1:9"


class MarketStripe:
    """The stand-in, as the marketplace's Stripe, with two switches."""

    def __init__(self, standin, settings) -> None:
        self.standin = standin
        self._settings = settings
        self._retries = settings.STRIPE_MAX_NETWORK_RETRIES

    @property
    def down(self) -> bool:
        return self.standin.api_base != self._settings.STRIPE_API_BASE

    @down.setter
    def down(self, value: bool) -> None:
        # A closed port: every call fails to connect, as when Stripe is down.
        self._settings.STRIPE_API_BASE = UNREACHABLE if value else self.standin.api_base
        self._settings.STRIPE_MAX_NETWORK_RETRIES = 0 if value else self._retries

    def session(self, session_id: str) -> dict:
        return stripe_client.checkout_session_retrieve(session_id)

    def pay(self, session_id: str) -> dict:
        self.standin.pay_checkout(session_id)
        return self.session(session_id)

    def expire(self, session_id: str) -> dict:
        return stripe_client.checkout_session_expire(session_id)

    def _list(self, path: str) -> list[dict]:
        import json
        import urllib.request

        request = urllib.request.Request(
            f"{self.standin.api_base}{path}",
            headers={"Authorization": f"Bearer {self._settings.STRIPE_SECRET_KEY}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())["data"]

    def delete_customer(self, customer_id: str) -> None:
        """Delete the customer at Stripe, as from its dashboard."""
        import stripe

        stripe.StripeClient(
            self._settings.STRIPE_SECRET_KEY,
            stripe_version=stripe_client.API_VERSION,
            base_addresses={"api": self.standin.api_base},
        ).v1.customers.delete(customer_id)

    def refunded(self, payment_intent: str) -> int:
        """Minor units Stripe has refunded of the payment's charge."""
        charge = stripe_client.payment_intent_retrieve(payment_intent)["latest_charge"]
        charge_id = charge["id"] if isinstance(charge, dict) else charge
        return int(stripe_client.charge_retrieve(charge_id)["amount_refunded"])

    def transfers(self, destination: str) -> list[dict]:
        return self._list(f"/v1/transfers?destination={destination}&limit=100")

    def balance_credits(self, organization) -> list[dict]:
        customer = BillingCustomer.objects.get(organization=organization).stripe_customer_id
        return self._list(f"/v1/customers/{customer}/balance_transactions?limit=100")

    def connect_account(self, organization) -> str:
        account = stripe_client.connect_account_create(
            key=f"acct:{organization.pk}:{uuid.uuid4()}", email="seller@example.test", metadata={}
        )
        BillingCustomer.objects.filter(organization=organization).update(
            stripe_connect_account_id=account["id"]
        )
        return account["id"]


@pytest.fixture
def market_stripe(stripe_standin, settings) -> MarketStripe:
    return MarketStripe(stripe_standin, settings)


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


def market_member(*, credits_amount: int = 0):
    """An organization with a real Stripe customer at the stand-in (and credits)."""
    org = OrganizationFactory()
    billing_customer_ensure(organization=org)
    if credits_amount:
        subscription_credits(org, credits_amount)
    return org


@pytest.fixture
def seller(db, market_stripe):
    return market_member(credits_amount=credits(1000))


@pytest.fixture
def buyer(db, market_stripe):
    return market_member()


@pytest.fixture
def unrefunded_shortfall(market_stripe, buyer, django_capture_on_commit_callbacks):
    """An order of 30 paid after its reserved credits expired (nothing delivered, 30 owed
    back) whose shortfall refund could not reach Stripe; returns (order, payment intent)."""
    return shortfall_unrefunded(market_stripe, buyer, django_capture_on_commit_callbacks)


def shortfall_unrefunded(market_stripe, buyer, capture_on_commit, *, seller=None):
    """`unrefunded_shortfall`'s order; with `seller`, 100 credits more in it, listed by
    `seller` at 1234 and delivered (paid 154: 124 delivered, the 30 short)."""
    from gymbilling.market.services import listing_create, order_create, order_pay

    short = OrganizationFactory()
    subscription_credits(short, credits(100), days=2)
    listing_create(seller=short, quantity=credits(100), price_per_1k=300, currency="usd")
    price, quantity = 300, credits(100)
    if seller is not None:
        listing_create(seller=seller, quantity=credits(100), price_per_1k=1234, currency="usd")
        price, quantity = 1234, credits(200)
    order = order_create(buyer=buyer, quantity=quantity, max_price_per_1k=price, currency="usd")
    intent = market_stripe.pay(order.checkout.stripe_session_id)["payment_intent"]
    market_stripe.down = True
    with capture_on_commit(execute=True):
        order_pay(
            order_id=order.pk, payment_intent_id=intent, now=timezone.now() + timedelta(days=3)
        )
    market_stripe.down = False
    order.refresh_from_db()
    assert (order.shortfall_amount, order.shortfall_refunded_at) == (30, None)
    assert market_stripe.refunded(intent) == 0
    return order, intent


def refused_for_a_cause_finance_can_fix(market_stripe, order: MarketOrder) -> None:
    """`order`'s shortfall refund refused by Stripe (the platform's balance could not cover
    it: the sweep leaves it to finance), Stripe taking refunds again now: a retry goes
    through."""
    from gymbilling.market.services import orders_expire

    market_stripe.standin.refuse_refunds("balance_insufficient")
    try:
        orders_expire()
    finally:
        market_stripe.standin.refuse_refunds(None)
    order.refresh_from_db()
    assert order.shortfall_refund_error.startswith("balance_insufficient:")


def client_for(org, scopes=(Scope.MARKETPLACE,)) -> Client:
    """An API client with a new key of the organization's, of `scopes`."""
    _, raw = apikey_create(organization=org, name="market", scopes=list(scopes))
    return Client(HTTP_AUTHORIZATION=f"Bearer {raw}")


def paid_session(stripe: MarketStripe, order: MarketOrder) -> dict:
    return stripe.pay(order.checkout.stripe_session_id)


def sold(
    stripe: MarketStripe, seller, buyer, *, quantity=100 * MICRO, price=1234, currency="usd"
) -> MarketOrder:
    """`quantity` of the seller's credits listed at `price`, bought by the buyer, paid."""
    from gymbilling.market.services import listing_create, market_checkout_handle, order_create

    listing_create(seller=seller, quantity=quantity, price_per_1k=price, currency=currency)
    order = order_create(buyer=buyer, quantity=quantity, max_price_per_1k=price, currency=currency)
    market_checkout_handle(order.checkout, paid_session(stripe, order))
    order.refresh_from_db()
    return order


def money(kind, currency="usd", organization=None) -> int:
    """The money account's balance, as the sum of its entries (0 before it exists)."""
    account = MoneyAccount.objects.filter(
        kind=kind, currency=currency, organization=organization
    ).first()
    if account is None:
        return 0
    return MoneyEntry.objects.filter(account=account).aggregate(s=Sum("amount"))["s"] or 0


def charge_for(order: MarketOrder, *, amount_refunded=0) -> dict:
    order.refresh_from_db()
    return {
        "id": f"ch_{order.pk}",
        "payment_intent": order.stripe_payment_intent_id,
        "amount": order.amount_total,
        "amount_refunded": amount_refunded,
        "currency": order.currency,
    }


def dispute_at_stripe(
    market_stripe: MarketStripe, order: MarketOrder, amount: int | None = None
) -> str:
    """A dispute of the order's charge opened at the stand-in (its events to `deliver`)."""
    charge = stripe_client.payment_intent_charge(order.stripe_payment_intent_id)["id"]
    return market_stripe.standin.dispute(charge, amount=amount)["id"]


def half_disputed_then_paid_out(market_stripe: MarketStripe, seller, buyer, deliver):
    """A sale (124 paid: fee 12, the seller's 112) half disputed in its holding period
    (fee 6 and the seller's 56 taken back), then the other 56 paid out as an invoice
    credit; returns the order and the dispute's id."""
    from gymbilling.market.services import payouts_run

    order = sold(market_stripe, seller, buyer)
    deliver()
    dispute = dispute_at_stripe(market_stripe, order, amount=62)
    deliver()
    assert payouts_run(now=timezone.now() + timedelta(days=8)) == 1
    return order, dispute


def reopened_then_paying_again(market_stripe: MarketStripe, seller, buyer, deliver):
    """A sale (124 paid: fee 12, the seller's 112) half disputed in its holding period,
    the other 56 paid by transfer, then the dispute won: the fill reopened with the 56
    it took (earlier payouts 56). Then its second payout, of those 56, recorded while
    Stripe was down, to an account Stripe has closed since (Stripe refuses it when it is
    sent). Returns the order and the account the first payout went to."""
    from gymbilling.market.services import payouts_run

    later = timezone.now() + timedelta(days=8)
    account = market_stripe.connect_account(seller)
    order = sold(market_stripe, seller, buyer)
    deliver()
    dispute = dispute_at_stripe(market_stripe, order, amount=62)
    deliver()
    assert payouts_run(now=later) == 1
    market_stripe.standin.close_dispute(dispute, status="won")
    deliver()
    BillingCustomer.objects.filter(organization=seller).update(
        stripe_connect_account_id="acct_gone"
    )
    market_stripe.down = True
    assert payouts_run(now=later) == 0
    market_stripe.down = False
    return order, account


def refunded_then_disputed(
    market_stripe: MarketStripe, seller, buyer, deliver, *, paid_out=False, won=False
) -> MarketOrder:
    """A sale (124 paid: fee 12, the seller's 112) half refunded at Stripe (fee 6 and the
    seller's 56 taken back), then disputed whole: the dispute takes the 62 the sale had
    left (fee 6 and the seller's 56; a loss when the rest was `paid_out` first) and
    returns 62 beyond it (`unapplied`). `won`: the gym then wins the dispute, which
    zeroes its loss. Returns the order."""
    from gymbilling.market.services import payouts_run
    from gymbilling.models import MarketReversal

    order = sold(market_stripe, seller, buyer)
    deliver()
    stripe_client.refund_create(
        key=f"half:{order.pk}", payment_intent=order.stripe_payment_intent_id, amount=62
    )
    deliver()
    if paid_out:
        payouts_run(now=timezone.now() + timedelta(days=8))
    dispute = dispute_at_stripe(market_stripe, order)
    deliver()
    taken = MarketReversal.objects.get(key=f"dispute:{dispute}")
    assert (taken.amount, taken.unapplied, taken.loss) == (62, 62, 56 if paid_out else 0)
    if won:
        market_stripe.standin.close_dispute(dispute, status="won")
        deliver()
    return order


def refund(order: MarketOrder, amount: int) -> bool:
    """Stripe's refunds of a sold order's charge, `amount` in all so far, as its webhook
    hands them on."""
    from gymbilling.market.services import market_reversal_handle

    return market_reversal_handle(
        kind="refund",
        key=f"refund:ch_{order.pk}:{amount}",
        charge=charge_for(order, amount_refunded=amount),
        amount=amount,
        cumulative=True,
    )


# --- the rollover cap ---------------------------------------------------------------------------

ROLL_PERIOD = timedelta(days=30)


def plan_priced(
    code: str, *, amount: int, credits_: int, rollover_percent: int = 0, **price_fields
) -> StripePrice:
    """A plan of `amount` cents and `credits_` a month, and its Stripe price
    ("price_<code>", with - as _)."""
    plan = Plan.objects.create(
        code=code,
        name=code.replace("-", " ").title(),
        monthly_price=amount,
        monthly_credits=credits_,
        rollover_percent=rollover_percent,
    )
    return StripePrice.objects.create(
        stripe_price_id=f"price_{code.replace('-', '_')}",
        kind="plan",
        plan=plan,
        unit_amount=amount,
        currency="usd",
        lookup_key=code,
        **price_fields,
    )


def rollover_member():
    """A member of a plan of 1,000 credits a month that rolls 10% over, in its first period.

    Returns the organization, its subscription as Stripe shows it, and the
    period's lot as the paid invoice grants it: expiring a period after the
    period ends, as a rollover plan's credits do (invoices.invoice_credits).
    """
    price = plan_priced("roll-10", amount=1_000, credits_=credits(1000), rollover_percent=10)
    org = market_member()
    start = timezone.now() - timedelta(days=29)
    stripe_sub = {
        "id": f"sub_roll_{org.pk}",
        "customer": BillingCustomer.objects.get(organization=org).stripe_customer_id,
        "status": "active",
        "items": {"data": [{"price": {"id": price.stripe_price_id}, "quantity": 1}]},
    }
    stripe_sub = stripe_period(stripe_sub, start)
    subscription_sync(stripe_sub=stripe_sub)
    # 29 days into a 30-day period: a period after it ends is 31 days from now.
    lot = subscription_credits(org, credits(1000), days=31)
    return org, stripe_sub, lot


def stripe_period(stripe_sub: dict, start) -> dict:
    """The subscription with its item in the period that begins at `start`."""
    [item] = stripe_sub["items"]["data"]
    item = item | {
        "current_period_start": int(start.timestamp()),
        "current_period_end": int((start + ROLL_PERIOD).timestamp()),
    }
    return stripe_sub | {"items": {"data": [item]}}


def roll(stripe_sub: dict) -> dict:
    """The next period begins (Stripe's renewal, as the webhook's re-read shows it); returns
    the subscription in its new period, for the next roll."""
    [item] = stripe_sub["items"]["data"]
    renewed = stripe_period(stripe_sub, datetime.fromtimestamp(item["current_period_end"], tz=UTC))
    subscription_sync(stripe_sub=renewed)
    return renewed


def subscription_credits_owned(org) -> int:
    """Unexpired subscription credits the organization holds: in its wallet and its listings."""
    return (
        CreditLot.objects.filter(
            organization=org,
            source="subscription",
            account__kind__in=["wallet", "escrow"],
            remaining__gt=0,
            expires_at__gt=timezone.now(),
        ).aggregate(s=Sum("remaining"))["s"]
        or 0
    )
