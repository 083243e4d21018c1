"""The overage a plan change leaves on Stripe's subscription: a period's overage
allowance is granted only while a price on the subscription invoices the meter at its
plan's price; upgrades move the overage item with the plan item, downgrades once the
renewal invoice has billed the old period's overage at the old plan's price."""

from __future__ import annotations

import logging

import pytest

from gymbilling import stripe_client
from gymbilling.models import Plan, StripePrice, Subscription
from gymbilling.services import overage_report
from gymbilling.services.events import subscription_refresh
from gymbilling.services.invoices import invoice_sync
from metering.models import MICRO, CreditLot, JournalTransaction
from metering.selectors import organization_balance
from metering.services import hold_capture, hold_place

pytestmark = pytest.mark.django_db


def _overage_price(code: str) -> str:
    return StripePrice.objects.get(plan__code=code, kind="overage", current=True).stripe_price_id


def _stripe_prices(stripe_sdk, sub: Subscription) -> set[str]:
    """The prices on Stripe's subscription now."""
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    return {item.price.id for item in at_stripe["items"].data}


def _change(customer, plan: str) -> str:
    response = customer.client.post("/api/v1/billing/checkout", {"plan": plan}, format="json")
    assert response.status_code == 200, response.content
    return response.json()["kind"]


def _overage_used(customer, credits: int) -> None:
    """Spend everything but the overage allowance, then `credits` whole credits of it, and
    report them to the meter as beat would."""
    org = customer.organization
    allowance = sum(
        lot.remaining
        for lot in CreditLot.objects.filter(
            organization=org, source="overage", account__kind="wallet", remaining__gt=0
        )
    )
    amount = organization_balance(organization=org).available - allowance + credits * MICRO
    hold_place(organization=org, amount=amount, key=f"job-{amount}")
    hold_capture(key=f"job-{amount}", amount=amount)
    assert overage_report() == credits


def _usage_billed(invoice_id: str) -> dict[str, tuple[int, int]]:
    """The invoice's metered lines: price -> (credits, amount in cents)."""
    lines = stripe_client.invoice_retrieve(invoice_id)["lines"]["data"]
    return {
        line["pricing"]["price_details"]["price"]: (line["quantity"], line["amount"])
        for line in lines
        if "usage" in (line.get("metadata") or {})
    }


def _latest_invoice(stripe_standin, sub: Subscription) -> str:
    renewal = stripe_standin.advance(sub.stripe_subscription_id)
    invoice = renewal["latest_invoice"]
    return invoice["id"] if isinstance(invoice, dict) else invoice


def test_no_overage_allowance_when_stripe_s_subscription_lacks_the_overage_price(
    customer, subscribed, stripe_standin, stripe_sdk, caplog
):
    # given: Pro (overage allowed), whose overage item was then removed at Stripe (by
    # hand, in the dashboard): nothing on the subscription reads the meter any more
    sub = subscribed("pro")
    overage = _overage_price("pro")
    [item] = [
        item
        for item in stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)["items"].data
        if item.price.id == overage
    ]
    stripe_sdk.v1.subscriptions.update(
        sub.stripe_subscription_id,
        params={"items": [{"id": item.id, "deleted": True}], "proration_behavior": "none"},
    )

    # when: the period renews, paid, and its grant is made from Stripe's subscription as
    # read then (the grant's own check, whatever left the item off)
    invoice_id = _latest_invoice(stripe_standin, sub)
    with caplog.at_level(logging.ERROR, logger="gymbilling.services.invoices"):
        invoice_sync(
            invoice=stripe_client.invoice_retrieve(invoice_id),
            subscription=subscription_refresh(subscription_id=sub.stripe_subscription_id),
        )

    # then: the month's credits are granted, no overage allowance (it would be used and
    # never invoiced), and the subscription is named for a human
    assert JournalTransaction.objects.filter(idempotency_key=f"grant:invoice:{invoice_id}")
    assert not JournalTransaction.objects.filter(idempotency_key=f"grant:overage:{invoice_id}")
    [first_period] = CreditLot.objects.filter(organization=customer.organization, source="overage")
    assert first_period.expires_at == sub.current_period_end  # the paid-for period's only
    [logged] = [r for r in caplog.records if r.name == "gymbilling.services.invoices"]
    assert sub.stripe_subscription_id in logged.getMessage()
    assert overage in logged.getMessage()


def test_an_upgrade_to_a_plan_with_overage_bills_its_overage_at_its_price(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Basic (no overage), upgraded to Pro mid-period
    sub = subscribed("basic")
    assert _overage_price("pro") not in _stripe_prices(stripe_sdk, sub)
    assert _change(customer, "pro") == "subscription_updated"
    assert "failed" not in deliver()

    # then: Stripe's subscription carries Pro's overage price with the plan
    assert _overage_price("pro") in _stripe_prices(stripe_sdk, sub)

    # when: the period renews, paid: Pro's overage allowance is granted
    renewal = _latest_invoice(stripe_standin, sub)
    assert "failed" not in deliver()
    pro = Plan.objects.get(code="pro")
    allowance = CreditLot.objects.get(created_by__idempotency_key=f"grant:overage:{renewal}")
    assert allowance.amount == pro.fair_use_ceiling
    # and 1,000 credits of it are used and reported, then the next period begins
    _overage_used(customer, 1_000)
    next_invoice = _latest_invoice(stripe_standin, sub)

    # then: the next invoice bills them at Pro's price (9.00 per 1,000 credits)
    assert _usage_billed(next_invoice) == {_overage_price("pro"): (1_000, 900)}


def test_overage_used_before_an_upgrade_is_billed_at_the_new_plan_s_price(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Pro, with 1,000 credits of overage used and reported this period
    sub = subscribed("pro")
    _overage_used(customer, 1_000)

    # when: it upgrades to Enterprise mid-period, then the period ends
    assert _change(customer, "enterprise") == "subscription_updated"
    assert "failed" not in deliver()
    assert _stripe_prices(stripe_sdk, sub) >= {_overage_price("enterprise")}
    assert _overage_price("pro") not in _stripe_prices(stripe_sdk, sub)
    renewal = _latest_invoice(stripe_standin, sub)

    # then: the renewal invoice bills the period's overage at Enterprise's price (6.00
    # per 1,000 credits), the price on the subscription when the period ended, as Stripe
    # bills a meter
    assert _usage_billed(renewal) == {_overage_price("enterprise"): (1_000, 600)}
