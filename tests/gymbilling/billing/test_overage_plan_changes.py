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


def _overage_item_remove(stripe_sdk, sub: Subscription, price: str) -> None:
    """Remove the overage item at Stripe, as by hand in the dashboard."""
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    [item] = [item for item in at_stripe["items"].data if item.price.id == price]
    stripe_sdk.v1.subscriptions.update(
        sub.stripe_subscription_id,
        params={"items": [{"id": item.id, "deleted": True}], "proration_behavior": "none"},
    )


def _renew(stripe_standin, sub: Subscription) -> str:
    """End the period at Stripe (renewed, the invoice paid); returns the renewal invoice."""
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
    _overage_item_remove(stripe_sdk, sub, overage)

    # when: the period renews, paid, and its grant is made from Stripe's subscription as
    # read then, without the repair the webhook's refresh makes first (as when Stripe
    # refuses it: subscription_overage_align)
    invoice_id = _renew(stripe_standin, sub)
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
    renewal = _renew(stripe_standin, sub)
    assert "failed" not in deliver()
    pro = Plan.objects.get(code="pro")
    allowance = CreditLot.objects.get(created_by__idempotency_key=f"grant:overage:{renewal}")
    assert allowance.amount == pro.fair_use_ceiling
    # and 1,000 credits of it are used and reported, then the next period begins
    _overage_used(customer, 1_000)
    next_invoice = _renew(stripe_standin, sub)

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
    renewal = _renew(stripe_standin, sub)

    # then: the renewal invoice bills the period's overage at Enterprise's price (6.00
    # per 1,000 credits), the price on the subscription when the period ended, as Stripe
    # bills a meter
    assert _usage_billed(renewal) == {_overage_price("enterprise"): (1_000, 600)}


@pytest.mark.parametrize(
    ("dearer", "cheaper", "billed"),
    [("enterprise", "pro", 600), ("pro", "basic", 900)],
    ids=["enterprise to pro", "pro to basic (no overage)"],
)
def test_a_downgrade_bills_the_period_s_overage_at_the_dearer_plan_then_moves_the_item(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, dearer, cheaper, billed
):
    # given: the dearer plan, 1,000 credits of its overage used and reported, and a
    # downgrade scheduled (it applies from the next period)
    sub = subscribed(dearer)
    _overage_used(customer, 1_000)
    assert _change(customer, cheaper) == "change_scheduled"
    assert "failed" not in deliver()
    # then: the overage item stays at the dearer plan's price for the period paid at it
    assert _overage_price(dearer) in _stripe_prices(stripe_sdk, sub)

    # when: the period renews, paid, at the cheaper plan
    renewal = _renew(stripe_standin, sub)
    assert "failed" not in deliver()

    # then: the renewal invoice bills the period's overage at the dearer plan's price
    assert _usage_billed(renewal) == {_overage_price(dearer): (1_000, billed)}
    # and Stripe's subscription now carries the cheaper plan's overage price, if any,
    # and its allowance is granted, not withheld for the item moved just before it
    cheaper_plan = Plan.objects.get(code=cheaper)
    overage_prices = set(
        StripePrice.objects.filter(kind="overage").values_list("stripe_price_id", flat=True)
    )
    granted = CreditLot.objects.filter(created_by__idempotency_key=f"grant:overage:{renewal}")
    if cheaper_plan.overage_allowed:
        assert _stripe_prices(stripe_sdk, sub) & overage_prices == {_overage_price(cheaper)}
        assert [lot.amount for lot in granted] == [cheaper_plan.fair_use_ceiling]
    else:
        assert not _stripe_prices(stripe_sdk, sub) & overage_prices
        assert not granted
    sub.refresh_from_db()
    assert sub.plan == cheaper_plan


def test_a_renewal_puts_back_an_overage_item_removed_by_hand(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: Pro, whose overage item was removed at Stripe by hand
    sub = subscribed("pro")
    _overage_item_remove(stripe_sdk, sub, _overage_price("pro"))

    # when: the period renews, paid
    renewal = _renew(stripe_standin, sub)
    assert "failed" not in deliver()

    # then: the item is back, before the grant, so the period's allowance is granted
    assert _overage_price("pro") in _stripe_prices(stripe_sdk, sub)
    assert CreditLot.objects.filter(created_by__idempotency_key=f"grant:overage:{renewal}")
