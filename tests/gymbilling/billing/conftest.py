"""Billing against the Stripe stand-in over HTTP, with webhooks delivered to the app.

`billing_live` is the whole loop: the stand-in signs webhooks and posts them
to the app served by pytest-django's live server, which stores them and
queues a task; the real Celery worker process reads the objects back from the
stand-in and applies them to the test database.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import pytest
import stripe
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import Organization, Scope
from accounts.services import apikey_create, organization_create
from gymbilling import stripe_client
from gymbilling.services.catalog import catalog_seed_defaults, catalog_sync
from gymbilling.stripe_client import API_VERSION
from gymbilling.stripe_standin.webhooks import sign
from tests.conftest import STRIPE_TEST_SECRET_KEY, STRIPE_TEST_WEBHOOK_SECRET
from tests.factories import UserFactory
from tests.gymbilling.market.conftest import market_stripe  # noqa: F401 (resales, in billing tests)
from tests.helpers import credits


@dataclass
class Customer:
    organization: Organization
    client: APIClient  # authenticated with an admin-scoped API key
    key: str


@pytest.fixture
def stripe_sdk(stripe_standin) -> stripe.StripeClient:
    """Stripe's own SDK pointed at the stand-in: the tests' view of "Stripe"."""
    return stripe.StripeClient(
        STRIPE_TEST_SECRET_KEY,
        stripe_version=API_VERSION,
        base_addresses={"api": stripe_standin.api_base},
    )


@pytest.fixture
def catalog(stripe_standin):
    """The default plans and packs, synced to the stand-in."""
    catalog_seed_defaults()
    catalog_sync()


@pytest.fixture
def customer(db) -> Customer:
    owner = UserFactory()
    org = organization_create(slug=f"gym-{owner.pk}", name="Lifting Club", owner=owner)
    _, raw = apikey_create(
        organization=org,
        name="billing",
        scopes=[Scope.ADMIN, Scope.BILLING_READ, Scope.INFERENCE, Scope.MARKETPLACE],
    )
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return Customer(organization=org, client=client, key=raw)


@pytest.fixture
def billing_live(transactional_db, live_server, celery_worker_process, stripe_standin, catalog):
    """Webhooks from the stand-in go to the live app; a real worker processes them."""
    stripe_standin.register_webhook(
        f"{live_server.url}/stripe/webhook/", STRIPE_TEST_WEBHOOK_SECRET, webhook_id="app"
    )
    yield live_server
    _quiesce(stripe_standin)
    # Later tests deliver by hand: a live-server URL of a finished test would only fail.
    stripe_standin.register_webhook(
        "http://127.0.0.1:9/unused", STRIPE_TEST_WEBHOOK_SECRET, webhook_id="app", events=["none"]
    )


def _quiesce(stripe_standin) -> None:
    """Wait until no webhook is on its way and the worker has applied every event.

    The test database is truncated after a transactional test; a worker still
    applying a late event would hold locks that deadlock the truncation.
    """
    from gymbilling.models import EventStatus, StripeEvent
    from tests.helpers import wait_until

    wait_until(
        lambda: all(
            event.get("deliveries", {}).get("app") != "pending" for event in stripe_standin.events()
        ),
        what="the stand-in's last webhook deliveries",
    )
    wait_until(
        lambda: (
            not StripeEvent.objects.filter(
                status__in=[EventStatus.PENDING, EventStatus.PROCESSING]
            ).exists()
        ),
        what="the worker to apply the last events",
    )


def signed(
    payload: dict | bytes, *, secret: str = STRIPE_TEST_WEBHOOK_SECRET, at: int | None = None
):
    """A body and a Stripe-Signature header, as Stripe computes them."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return body, sign(body, secret, int(time.time()) if at is None else at)


def event_for(obj: dict, event_type: str, *, event_id: str | None = None) -> dict:
    """A webhook event about `obj` (a dict, or an SDK object), shaped like Stripe's."""
    if not isinstance(obj, dict):
        obj = json.loads(json.dumps(obj.to_dict(), default=str))
    return {
        "id": event_id or f"evt_test_{obj['id']}_{event_type}_{time.time_ns()}",
        "object": "event",
        "type": event_type,
        "created": int(time.time()),
        "livemode": False,
        "api_version": API_VERSION,
        "data": {"object": obj},
    }


@pytest.fixture
def subscribed(customer, catalog, stripe_standin, deliver):
    """Subscribe `customer` to a plan through Checkout, paid; returns the Subscription."""
    from gymbilling.models import Subscription

    def _subscribe(plan: str = "pro", seats: int = 1) -> Subscription:
        response = customer.client.post(
            "/api/v1/billing/checkout", {"plan": plan, "seats": seats}, format="json"
        )
        assert response.status_code == 200, response.content
        stripe_standin.pay_checkout(response.json()["session_id"])
        assert "failed" not in deliver()
        return Subscription.objects.get(organization=customer.organization)

    return _subscribe


@pytest.fixture
def buy(catalog, stripe_standin, deliver):
    """Buy for an organization as the dashboard does: Checkout for a plan or a pack (by
    code), paid at the stand-in, its webhooks applied."""
    from gymbilling.models import CreditPack, Plan
    from gymbilling.services import checkout_create

    def _buy(organization: Organization, *, plan: str = "", pack: str = "") -> None:
        result = checkout_create(
            organization=organization,
            plan=Plan.objects.get(code=plan) if plan else None,
            pack=CreditPack.objects.get(code=pack) if pack else None,
        )
        stripe_standin.pay_checkout(result.session_id)
        assert "failed" not in deliver()

    return _buy


@pytest.fixture
def free_credits(grant):
    """Give an organization free credits: a 10-credit welcome promotion, a 5-credit goodwill
    adjustment."""
    from metering.services import credits_adjust

    def _give(organization: Organization) -> None:
        grant(organization, credits(10), source="promotion", paid=False, resellable=False)
        credits_adjust(
            organization=organization,
            amount=credits(5),
            reason="Goodwill",
            key=f"t:{organization.pk}",
        )

    return _give


def report_rows(group_by: str) -> dict[tuple[str, str, str], dict]:
    """Finance's report of today (a day either side: no test runs across a period's edge),
    by group and currencies."""
    from metering.selectors import usage_margin_report

    now = timezone.now()
    rows = usage_margin_report(
        start=now - timedelta(days=1), end=now + timedelta(days=1), group_by=group_by
    )
    return {(row["group"], row["currency"], row["cost_currency"]): row for row in rows}


def stripe_holds_next_update(monkeypatch) -> Callable[[], dict]:
    """The next subscription update gets no answer (a timeout) and is not applied yet: it
    may still land at Stripe, late. Returns what lands it, as Stripe would on its own (the
    stand-in cannot hold a request by itself: its client module's call is wrapped, and the
    held call is sent through later, with its own idempotency key)."""
    real_update = stripe_client.subscription_update
    held: list[tuple[tuple, dict]] = []

    def held_then_lost(*args, **params):
        if held:
            return real_update(*args, **params)
        held.append((args, params))
        raise stripe_client.StripeUnavailable("Request timed out")

    monkeypatch.setattr(stripe_client, "subscription_update", held_then_lost)

    def land() -> dict:
        [(args, params)] = held
        return real_update(*args, **params)

    return land


def plan_sold_only_in_euros():
    """Pro EU, 89 EUR for 12,000 credits a month: a plan that never had a price in another
    currency, synced to Stripe."""
    from gymbilling.models import Plan
    from metering.models import MICRO

    plan = Plan.objects.create(
        code="pro-eu",
        name="Pro EU",
        description="Pro, sold in euros.",
        currency="eur",
        monthly_price=8_900,
        monthly_credits=12_000 * MICRO,
        sort_order=25,
    )
    catalog_sync()
    return plan


def subscription_state(stripe_sdk, sub) -> tuple:
    """Stripe's subscription and our row, whole, and the ledger: what a refused change
    leaves as it found them."""
    from gymbilling.models import Subscription
    from tests.helpers import ledger_rows

    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id).to_dict()
    return at_stripe, Subscription.objects.filter(pk=sub.pk).values().get(), ledger_rows()


def subscription_state_unsynced(stripe_sdk, sub) -> tuple:
    """subscription_state but the row's time of its last sync (a change syncs the row from
    Stripe before it decides, refused or not)."""
    at_stripe, row, ledger = subscription_state(stripe_sdk, sub)
    row.pop("synced_at")
    return at_stripe, row, ledger


def plans_sold_in(currency: str, *codes: str) -> None:
    """Finance sell the plans `codes` in `currency` from now, the catalog synced: a new
    current price each where that changes their currency (the one members had retired)."""
    from gymbilling.models import Plan, StripePrice

    Plan.objects.filter(code__in=codes).update(currency=currency)
    catalog_sync()
    current = StripePrice.objects.filter(kind="plan", plan__code__in=codes, current=True)
    assert sorted(current.values_list("currency", flat=True)) == [currency] * len(codes)
