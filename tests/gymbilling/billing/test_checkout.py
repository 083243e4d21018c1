"""Starting purchases: validation, Stripe outages, roles, packs, the portal, reads."""

from __future__ import annotations

import contextlib
import threading
import time
from datetime import timedelta

import pytest
import requests
from django.db.models import F
from django.test import override_settings
from rest_framework.test import APIClient

from accounts.models import Role
from accounts.services import membership_add
from gymbilling import stripe_client
from gymbilling.models import (
    BillingCustomer,
    CheckoutSession,
    CheckoutStatus,
    Plan,
    StripePrice,
    Subscription,
)
from gymbilling.stripe_standin.process import StandInError
from metering.models import MICRO, CreditLot
from tests.factories import UserFactory
from tests.helpers import ledger_rows

pytestmark = pytest.mark.django_db


def billing_rows() -> tuple[int, int, int]:
    return (
        BillingCustomer.objects.count(),
        CheckoutSession.objects.count(),
        Subscription.objects.count(),
    )


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({}, 400, "invalid_request"),
        ({"plan": "pro", "pack": "boost-1k"}, 400, "invalid_request"),
        ({"plan": "no-such-plan"}, 404, "plan_not_found"),
        ({"pack": "no-such-pack"}, 404, "pack_not_found"),
        ({"plan": "pro", "seats": 3}, 400, "invalid_seats"),
        ({"plan": "team", "seats": 1}, 400, "invalid_seats"),
        ({"plan": "team", "seats": 0}, 400, "invalid_request"),
        # a float, even a whole one, is not a count of seats (each one charged for)
        ({"plan": "team", "seats": 3.0}, 400, "invalid_request"),
        ({"plan": "pro", "coupon": "FREE"}, 400, "invalid_request"),
        ({"plan": ["pro"]}, 400, "invalid_request"),
        ({"pack": "boost-1k", "seats": 5}, 400, "invalid_seats"),
    ],
)
def test_bad_checkout_requests_are_refused_and_change_nothing(
    customer, catalog, body, status, code
):
    before = (billing_rows(), ledger_rows())
    response = customer.client.post("/api/v1/billing/checkout", body, format="json")
    assert response.status_code == status, response.content
    assert response.json()["error"]["code"] == code
    assert (billing_rows(), ledger_rows()) == before


def test_a_plan_not_offered_any_more_cannot_be_bought(customer, catalog):
    Plan.objects.filter(code="pro").update(active=False)
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "plan_not_available"


def test_stripe_unreachable_during_checkout_is_a_clear_503_and_writes_nothing(customer, catalog):
    # given: Stripe cannot be reached
    before = (billing_rows(), ledger_rows())
    with override_settings(STRIPE_API_BASE="http://127.0.0.1:9", STRIPE_MAX_NETWORK_RETRIES=0):
        # when
        response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    # then
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "payments_unavailable"
    assert (billing_rows(), ledger_rows()) == before


def test_a_request_stripe_refuses_is_a_502_that_says_so_not_a_server_error(
    customer, catalog, caplog
):
    # given an organization with a Stripe customer, and a pack whose price Stripe no
    # longer has (a missing object, but not the customer: the customer stays)
    assert customer.client.post("/api/v1/billing/portal").status_code == 200
    StripePrice.objects.filter(pack__code="boost-1k").update(stripe_price_id="price_gone")
    cus = BillingCustomer.objects.get(organization=customer.organization).stripe_customer_id
    before = (billing_rows(), ledger_rows())

    # when it buys the pack
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")

    # then Stripe's refusal is named by its code, nothing is written, and the
    # Idempotency-Key is not kept (a 5xx)
    assert response.status_code == 502, response.content
    error = response.json()["error"]
    assert (error["code"], error["provider_code"]) == (
        "payment_provider_refused",
        "resource_missing",
    )
    assert error["message"].startswith("The payment provider refused the request")
    # and Stripe's text, written for the account's operators, goes to the log
    # with Stripe's request id; the customer gets the id to quote
    [logged] = [r for r in caplog.records if r.name == "gymbilling.services.checkout"]
    stripe_said = logged.getMessage().rsplit("): ", 1)[1]
    assert logged.levelname == "ERROR" and stripe_said
    assert stripe_said not in error["message"]
    assert error["provider_request_id"].startswith("req_")
    assert error["provider_request_id"] in logged.getMessage()
    assert (billing_rows(), ledger_rows()) == before
    assert BillingCustomer.objects.get().stripe_customer_id == cus


def test_billing_off_without_a_stripe_key(customer, catalog):
    with override_settings(STRIPE_SECRET_KEY=""):
        response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
        portal = customer.client.post("/api/v1/billing/portal")
    assert (
        response.status_code == 503 and response.json()["error"]["code"] == "billing_not_configured"
    )
    assert portal.status_code == 503


def test_members_without_a_billing_role_cannot_buy(customer, catalog):
    customer.organization.seats = 5
    customer.organization.save(update_fields=["seats"])
    member = UserFactory()
    membership_add(organization=customer.organization, user=member, role=Role.MEMBER)
    client = APIClient()
    client.force_authenticate(member)
    response = client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    assert response.status_code == 403
    assert CheckoutSession.objects.count() == 0


def test_a_paid_pack_grants_its_credits_for_a_year(customer, catalog, stripe_standin, deliver):
    # given
    response = customer.client.post(
        "/api/v1/billing/checkout", {"pack": "boost-10k"}, format="json"
    )
    assert response.status_code == 200
    checkout = CheckoutSession.objects.get(stripe_session_id=response.json()["session_id"])
    assert checkout.kind == "pack" and checkout.status == "open"

    # when: paid on the stand-in's page, and its webhooks delivered
    page = requests.get(response.json()["url"], timeout=10)
    assert page.status_code == 200 and "4242" in page.text
    stripe_standin.pay_checkout(checkout.stripe_session_id)
    deliver()

    # then
    lot = CreditLot.objects.get(organization=customer.organization, source="pack")
    checkout.refresh_from_db()
    assert lot.amount == 10_000 * MICRO and lot.paid and not lot.resellable
    assert (lot.expires_at - checkout.completed_at).days == 365
    assert checkout.status == "complete"


def test_a_declined_card_grants_nothing(customer, catalog, stripe_standin, deliver):
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    with pytest.raises(StandInError) as declined:
        stripe_standin.pay_checkout(response.json()["session_id"], card="4000000000000002")
    assert declined.value.status == 402
    deliver()
    assert not CreditLot.objects.filter(organization=customer.organization).exists()


def test_subscription_and_invoices_read_back(customer, subscribed):
    assert customer.client.get("/api/v1/billing/subscription").json()["subscription"] is None
    sub = subscribed("team", seats=3)
    body = customer.client.get("/api/v1/billing/subscription").json()
    assert body["subscription"]["plan"] == "team" and body["subscription"]["seats"] == 3
    assert body["entitlements"]["seats"] == 3
    invoices = customer.client.get("/api/v1/billing/invoices").json()["results"]
    assert len(invoices) == 1
    assert invoices[0]["status"] == "paid" and invoices[0]["amount_paid"] == 3 * 4_900
    assert invoices[0]["credits_granted"] == 3 * 5_000 * MICRO
    assert sub.status == "active"


def test_a_downgrade_waits_for_the_period_end(customer, subscribed, stripe_standin, deliver):
    # given: Team with 5 seats
    sub = subscribed("team", seats=5)
    # when: down to 2 seats
    response = customer.client.post(
        "/api/v1/billing/checkout", {"plan": "team", "seats": 2}, format="json"
    )
    assert response.json()["kind"] == "change_scheduled"
    deliver()
    # then: still 5 seats until the period ends, then 2, and 2 seats' credits
    sub.refresh_from_db()
    assert (sub.seats, sub.scheduled_seats) == (5, 2)
    customer.organization.refresh_from_db()
    assert customer.organization.seats == 5
    stripe_standin.advance(sub.stripe_subscription_id)
    deliver()
    sub.refresh_from_db()
    customer.organization.refresh_from_db()
    assert (sub.seats, sub.scheduled_seats, customer.organization.seats) == (2, None, 2)
    assert sub.invoices.order_by("created_at", "pk").last().credits_granted == 2 * 5_000 * MICRO


def test_a_cancelled_subscription_s_plan_is_not_changed_until_it_is_renewed(
    customer, subscribed, stripe_sdk, stripe_standin, deliver
):
    # given: Team with 5 seats, cancelled at period end in the portal
    sub = subscribed("team", seats=5)
    stripe_sdk.v1.subscriptions.update(
        sub.stripe_subscription_id, params={"cancel_at_period_end": True}
    )
    deliver()
    invoices = len(stripe_sdk.v1.invoices.list(params={"subscription": sub.stripe_subscription_id}))

    # when: the member takes seats away, then adds one (an upgrade, charged at once)
    seats = customer.client.post(
        "/api/v1/billing/checkout", {"plan": "team", "seats": 2}, format="json"
    )
    upgrade = customer.client.post(
        "/api/v1/billing/checkout", {"plan": "team", "seats": 6}, format="json"
    )

    # then: both refused, saying when it ends and how to renew it; the cancellation
    # stands at Stripe and here, nothing was invoiced, and nothing changed
    sub.refresh_from_db()
    ends = sub.current_period_end.date().isoformat()
    for response in (seats, upgrade):
        assert response.status_code == 409, response.content
        error = response.json()["error"]
        assert error["code"] == "subscription_canceling"
        assert f"ends with its period, on {ends}" in error["message"]
        assert "POST /api/v1/billing/portal" in error["message"]
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert at_stripe.cancel_at_period_end
    listed = stripe_sdk.v1.invoices.list(params={"subscription": sub.stripe_subscription_id})
    assert len(listed) == invoices
    assert sub.cancel_at_period_end
    assert (sub.plan.code, sub.seats, sub.scheduled_plan_id, sub.scheduled_seats) == (
        "team",
        5,
        None,
        None,
    )

    # when: renewed in the portal, then the seats changed
    stripe_sdk.v1.subscriptions.update(
        sub.stripe_subscription_id, params={"cancel_at_period_end": False}
    )
    deliver()
    again = customer.client.post(
        "/api/v1/billing/checkout", {"plan": "team", "seats": 2}, format="json"
    )

    # then: the change is scheduled as any downgrade is
    assert again.json()["kind"] == "change_scheduled", again.content


def test_taking_back_a_scheduled_downgrade_charges_nothing_more(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Pro, paid for this period, with a downgrade to Basic scheduled
    sub = subscribed("pro")
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "basic"}, format="json")
    assert response.json()["kind"] == "change_scheduled"
    deliver()
    before = ledger_rows()

    # when: the member changes their mind and asks for Pro again
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["kind"] == "change_canceled"
    deliver()

    # then: nothing is charged again for a period already paid at Pro's price, nor
    # granted again; the downgrade is gone, and the next period is Pro's
    invoices = stripe_sdk.v1.invoices.list(params={"subscription": sub.stripe_subscription_id})
    assert [invoice.billing_reason for invoice in invoices.data] == ["subscription_create"]
    assert ledger_rows() == before
    sub.refresh_from_db()
    assert (sub.plan.code, sub.scheduled_plan) == ("pro", None)
    stripe_standin.advance(sub.stripe_subscription_id)
    deliver()
    renewal = sub.invoices.get(billing_reason="subscription_cycle")
    assert renewal.amount_paid == Plan.objects.get(code="pro").monthly_price


def test_an_upgrade_while_a_downgrade_is_scheduled_charges_from_the_plan_paid_for(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Pro, paid for this period, with a downgrade to Basic scheduled
    sub = subscribed("pro")
    customer.client.post("/api/v1/billing/checkout", {"plan": "basic"}, format="json")
    deliver()

    # when: the member asks for Enterprise instead
    response = customer.client.post(
        "/api/v1/billing/checkout", {"plan": "enterprise"}, format="json"
    )
    assert response.json()["kind"] == "subscription_updated", response.content
    deliver()

    # then: the prorated difference is from Pro, which this period was paid at, not from
    # Basic (which would charge Pro's part of the period again), and so are its credits
    invoices = stripe_sdk.v1.invoices.list(params={"subscription": sub.stripe_subscription_id})
    update = next(i for i in invoices.data if i.billing_reason == "subscription_update")
    unused, remaining = update.lines.data
    prices = {
        code: StripePrice.objects.get(plan__code=code, kind="plan", current=True).stripe_price_id
        for code in ("pro", "enterprise")
    }
    assert unused.amount < 0 and unused.pricing.price_details.price == prices["pro"]
    assert remaining.pricing.price_details.price == prices["enterprise"]
    sub.refresh_from_db()
    period = int((sub.current_period_end - sub.current_period_start).total_seconds())
    covered = unused.period.end - unused.period.start
    pro, enterprise = Plan.objects.get(code="pro"), Plan.objects.get(code="enterprise")
    granted = sub.invoices.get(stripe_invoice_id=update.id).credits_granted
    assert granted == (
        enterprise.monthly_credits * covered // period - pro.monthly_credits * covered // period
    )
    assert (sub.plan, sub.scheduled_plan) == (enterprise, None)


def test_an_upgrade_declined_while_a_downgrade_is_scheduled_leaves_the_downgrade(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Pro with a downgrade to Basic scheduled, and a card that now declines
    sub = subscribed("pro")
    customer.client.post("/api/v1/billing/checkout", {"plan": "basic"}, format="json")
    deliver()
    stripe_standin.set_card(BillingCustomer.objects.get().stripe_customer_id, "4000000000000341")
    before = ledger_rows()

    # when: Enterprise is asked for
    response = customer.client.post(
        "/api/v1/billing/checkout", {"plan": "enterprise"}, format="json"
    )
    deliver()

    # then: declined, and the subscription is as it was: Pro now, Basic from the next period
    assert response.status_code == 402, response.content
    basic = StripePrice.objects.get(plan__code="basic", kind="plan", current=True)
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert (at_stripe.status, at_stripe["items"].data[0].price.id) == (
        "active",
        basic.stripe_price_id,
    )
    sub.refresh_from_db()
    assert (sub.plan.code, sub.scheduled_plan.code, sub.status) == ("pro", "basic", "active")
    assert ledger_rows() == before


def test_the_portal_link_opens(customer, catalog):
    response = customer.client.post("/api/v1/billing/portal")
    assert response.status_code == 200
    assert requests.get(response.json()["url"], timeout=10).status_code == 200


def test_the_portal_takes_no_fields(customer, catalog):
    # given a field the portal does not take (it was ignored: the client believed its
    # return_url was used, and got a link that goes back elsewhere)
    before = (billing_rows(), ledger_rows())

    # when
    response = customer.client.post(
        "/api/v1/billing/portal", {"return_url": "https://example.test/"}, format="json"
    )

    # then
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", "return_url")
    assert (billing_rows(), ledger_rows()) == before


def test_plans_are_public(client, catalog):
    response = client.get("/api/v1/plans")
    assert response.status_code == 200
    codes = [plan["code"] for plan in response.json()["plans"]]
    assert codes == ["basic", "pro", "team", "enterprise"]
    assert {pack["code"] for pack in response.json()["packs"]} == {"boost-1k", "boost-10k"}
    # and ?format= picks no renderer (DRF's override answered 404 for one it lacked)
    assert client.get("/api/v1/plans", {"format": "xml"}).json() == response.json()


def test_one_open_subscription_checkout_per_organization(customer, catalog, stripe_sdk):
    """Two tabs must not make two subscriptions: the same choice reuses the session."""
    first = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json").json()
    again = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json").json()
    assert again["session_id"] == first["session_id"]

    # another choice replaces it: the first can no longer be paid
    other = customer.client.post(
        "/api/v1/billing/checkout", {"plan": "basic"}, format="json"
    ).json()
    assert other["session_id"] != first["session_id"]
    assert stripe_sdk.v1.checkout.sessions.retrieve(first["session_id"]).status == "expired"
    assert CheckoutSession.objects.get(stripe_session_id=first["session_id"]).status == "expired"


def _pro_checkout_aged(customer, stripe_standin, age: timedelta) -> dict:
    """A subscription checkout for Pro, opened `age` ago here and at Stripe, not paid."""
    first = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json").json()
    CheckoutSession.objects.filter(stripe_session_id=first["session_id"]).update(
        created_at=F("created_at") - age
    )
    stripe_standin.age_checkout(first["session_id"], int(age.total_seconds()))
    return first


def test_a_subscription_checkout_too_old_to_be_reused_cannot_be_paid_at_stripe(
    customer, catalog, stripe_standin, stripe_sdk
):
    """A session older than the reuse window is not looked at here: Stripe must have
    expired it, or the member could pay it beside the next one (two subscriptions)."""
    # given: a subscription checkout opened 23.5 hours ago (here and at Stripe), not paid
    first = _pro_checkout_aged(customer, stripe_standin, timedelta(hours=23, minutes=30))

    # when: the member asks again
    again = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")

    # then: a new session, and the old one can no longer be paid
    assert again.status_code == 200, again.content
    assert again.json()["session_id"] != first["session_id"]
    assert stripe_sdk.v1.checkout.sessions.retrieve(first["session_id"]).status == "expired"
    with pytest.raises(StandInError) as refused:
        stripe_standin.pay_checkout(first["session_id"])
    assert refused.value.status == 400
    assert Subscription.objects.count() == 0


def test_a_subscription_checkout_about_to_expire_is_not_handed_out_again(
    customer, catalog, stripe_standin, stripe_sdk
):
    # given: a subscription checkout opened 22 h 45 min ago, a quarter of an hour before
    # Stripe expires it, not paid
    first = _pro_checkout_aged(customer, stripe_standin, timedelta(hours=22, minutes=45))

    # when: the member asks for the same plan again
    again = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")

    # then: a new session, not the one about to expire, which is expired at Stripe (so
    # only one can be paid)
    assert again.status_code == 200, again.content
    assert again.json()["session_id"] != first["session_id"]
    assert stripe_sdk.v1.checkout.sessions.retrieve(first["session_id"]).status == "expired"
    assert CheckoutSession.objects.get(stripe_session_id=first["session_id"]).status == (
        CheckoutStatus.EXPIRED
    )


def _paid_checkout_whose_events_wait(customer, stripe_standin, *, row: str) -> str:
    """A Pro checkout opened 23.5 hours ago and paid at Stripe in its last minutes, whose
    events are not processed yet; our row `open` (no event yet) or `complete` (an event
    marked it, then Stripe could not be read for its subscription). Returns the Stripe
    subscription it made."""
    first = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    assert first.status_code == 200, first.content
    session_id = first.json()["session_id"]
    paid = stripe_standin.pay_checkout(session_id)
    age = timedelta(hours=23, minutes=30)
    CheckoutSession.objects.filter(stripe_session_id=session_id).update(
        created_at=F("created_at") - age, status=row
    )
    stripe_standin.age_checkout(session_id, int(age.total_seconds()))
    assert not Subscription.objects.exists()  # our mirror knows nothing of it yet
    return paid["subscription"]


def _at_stripe(stripe_sdk) -> tuple[list[str], list[str]]:
    """Every Checkout session and every subscription not ended, at Stripe."""
    sessions = stripe_sdk.v1.checkout.sessions.list(params={"limit": 100}).data
    subscriptions = stripe_sdk.v1.subscriptions.list(params={"limit": 100}).data
    return sorted(s.id for s in sessions), sorted(s.id for s in subscriptions)


@pytest.mark.parametrize("row", [CheckoutStatus.OPEN, CheckoutStatus.COMPLETE])
def test_a_late_paid_checkout_whose_events_wait_is_not_subscribed_to_twice(
    customer, catalog, stripe_standin, stripe_sdk, deliver, row
):
    # given: a subscription paid at Stripe that our mirror does not know yet
    stripe_sub = _paid_checkout_whose_events_wait(customer, stripe_standin, row=row)
    at_stripe = _at_stripe(stripe_sdk)
    rows = CheckoutSession.objects.count()

    # when: a billing member clicks Subscribe again
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")

    # then: refused, nothing opened or charged at Stripe, and the subscription mirrored
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "subscription_exists"
    assert _at_stripe(stripe_sdk) == at_stripe
    assert CheckoutSession.objects.count() == rows
    mirrored = Subscription.objects.get(organization=customer.organization)
    assert (mirrored.stripe_subscription_id, mirrored.plan.code, mirrored.status) == (
        stripe_sub,
        "pro",
        "active",
    )
    # and the next ask is a plan change of it, not a checkout
    again = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    assert (again.status_code, again.json()["error"]["code"]) == (409, "no_change")
    # and its late events apply, granting the month's credits once
    assert "failed" not in deliver()
    assert (
        CreditLot.objects.filter(organization=customer.organization, source="subscription")
        .values_list("amount", flat=True)
        .get()
        == 12_000 * MICRO
    )


def test_stripe_unreachable_when_asked_for_its_subscriptions_is_a_503_and_opens_nothing(
    customer, catalog, stripe_standin, stripe_sdk, monkeypatch
):
    # given: a subscription paid at Stripe that our mirror does not know yet, and Stripe
    # not answering the question whether the customer has one (the stand-in cannot fail
    # one request alone: the client module's call is replaced, the rest reach it)
    _paid_checkout_whose_events_wait(customer, stripe_standin, row=CheckoutStatus.OPEN)
    at_stripe, before = _at_stripe(stripe_sdk), (billing_rows(), ledger_rows())

    def unreachable(**_params):
        raise stripe_client.StripeUnavailable("Request timed out")

    monkeypatch.setattr(stripe_client, "subscriptions_list", unreachable)

    # when: Subscribe again
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")

    # then: the checkout path's 503, and nothing opened here or at Stripe
    assert response.status_code == 503, response.content
    assert response.json()["error"]["code"] == "payments_unavailable"
    assert (_at_stripe(stripe_sdk), (billing_rows(), ledger_rows())) == (at_stripe, before)


def test_a_customer_whose_subscriptions_ended_or_who_bought_only_packs_may_subscribe(
    customer, subscribed, buy, stripe_sdk, deliver
):
    # given: a customer at Stripe with a pack bought and a subscription canceled since
    buy(customer.organization, pack="boost-1k")
    sub = subscribed("basic")
    stripe_sdk.v1.subscriptions.cancel(sub.stripe_subscription_id)
    assert "failed" not in deliver()

    # when: it subscribes again
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")

    # then: a Checkout page to pay
    assert response.status_code == 200, response.content
    assert response.json()["kind"] == "checkout"
    assert CheckoutSession.objects.filter(
        stripe_session_id=response.json()["session_id"], plan__code="pro", status="open"
    ).exists()


def test_an_upgrade_the_card_declines_is_a_402_and_changes_nothing(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Basic, paid, and a card that now declines every charge made off-session
    sub = subscribed("basic")
    stripe_standin.set_card(BillingCustomer.objects.get().stripe_customer_id, "4000000000000341")
    before = ledger_rows()

    # when: an upgrade to Pro is asked for, and whatever Stripe sent is applied
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    deliver()

    # then: refused as declined; at Stripe the subscription is still Basic and active
    assert response.status_code == 402, response.content
    assert response.json()["error"]["code"] == "card_declined"
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    basic = Plan.objects.get(code="basic")
    assert at_stripe.status == "active"
    assert at_stripe["items"].data[0].price.id in {p.stripe_price_id for p in basic.prices.all()}
    # and here: still Basic, in good standing, with Basic's entitlements, nothing granted
    sub.refresh_from_db()
    customer.organization.refresh_from_db()
    assert (sub.plan_id, sub.status, sub.grace_until) == (basic.pk, "active", None)
    assert customer.organization.standing == "active"
    assert customer.organization.model_tiers == basic.model_tiers
    assert ledger_rows() == before


def test_an_upgrade_processed_after_a_renewal_is_shared_over_its_own_period(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    """The upgrade's credits are the share of the period it was made in, however late its
    invoice is processed: not of the subscription's period when it is (a shorter one)."""
    # given: Basic, a second into its first period (so the proration is a part of it)
    sub = subscribed("basic")
    first_start, first_end = sub.current_period_start, sub.current_period_end
    time.sleep(1.1)

    # when: the member upgrades to Pro, and its invoice is processed only after two
    # renewals, in a period of another length (its webhook late)
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    assert response.json()["kind"] == "subscription_updated", response.content
    for _ in range(2):
        stripe_standin.advance(sub.stripe_subscription_id)
    deliver()

    # then: the grant is the share of the first period the proration covers
    sub.refresh_from_db()
    assert sub.current_period_end - sub.current_period_start != first_end - first_start
    invoices = stripe_sdk.v1.invoices.list(params={"subscription": sub.stripe_subscription_id})
    update = next(i for i in invoices.data if i.billing_reason == "subscription_update")
    unused, remaining = update.lines.data
    assert (unused.period.start, unused.period.end) == (
        remaining.period.start,
        remaining.period.end,
    )
    assert remaining.period.end == int(first_end.timestamp())
    period = int((first_end - first_start).total_seconds())
    covered = remaining.period.end - remaining.period.start
    assert 0 < covered < period
    basic, pro = Plan.objects.get(code="basic"), Plan.objects.get(code="pro")
    granted = sub.invoices.get(stripe_invoice_id=update.id).credits_granted
    assert granted == pro.monthly_credits * covered // period - (
        basic.monthly_credits * covered // period
    )


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("first", "second"), [("pro", "pro"), ("pro", "basic")], ids=["same plan", "two plans"]
)
def test_two_subscription_checkouts_at_once_leave_one_open_session(
    live_server, stripe_standin, catalog, customer, stripe_sdk, monkeypatch, first, second
):
    """Two tabs at once get what two tabs one after the other get: one open session."""
    # given: Stripe answers the session's creation only once both requests reach it,
    # or after 2 seconds (when one of them waits for the other, as it must)
    from gymbilling import stripe_client

    both_there = threading.Barrier(2)
    real_create = stripe_client.checkout_session_create

    def create_when_both_there(**params):
        with contextlib.suppress(threading.BrokenBarrierError):
            both_there.wait(timeout=2)
        return real_create(**params)

    monkeypatch.setattr(stripe_client, "checkout_session_create", create_when_both_there)

    # when: two subscription checkouts of the organization are asked for at once
    url = f"{live_server.url}/api/v1/billing/checkout"
    answers: dict[str, requests.Response] = {}

    def ask(tab: str, plan: str) -> None:
        answers[tab] = requests.post(
            url,
            json={"plan": plan},
            headers={"Authorization": f"Bearer {customer.key}"},
            timeout=30,
        )

    tabs = [
        threading.Thread(target=ask, args=(tab, plan))
        for tab, plan in (("first", first), ("second", second))
    ]
    for tab in tabs:
        tab.start()
    for tab in tabs:
        tab.join()

    # then: both are answered a checkout, and one session of the organization can be
    # paid, here and at Stripe (the same plan: both tabs have it; another: the later
    # choice replaced the earlier)
    assert [answers[tab].status_code for tab in ("first", "second")] == [200, 200]
    returned = {answers[tab].json()["session_id"] for tab in ("first", "second")}
    open_here = CheckoutSession.objects.filter(organization=customer.organization, status="open")
    assert open_here.count() == 1
    open_at_stripe = [
        session
        for session in CheckoutSession.objects.filter(organization=customer.organization)
        if stripe_sdk.v1.checkout.sessions.retrieve(session.stripe_session_id).status == "open"
    ]
    assert open_at_stripe == [open_here.get()]
    if first == second:
        assert returned == {open_here.get().stripe_session_id}
