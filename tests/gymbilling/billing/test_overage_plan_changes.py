"""The overage a plan change leaves on Stripe's subscription: a period's overage
allowance is granted only while a price on the subscription invoices the meter at its
plan's price (its current one, or an old one the subscription keeps, in its currency,
that reads the meter overage is reported to); upgrades move the overage item with the
plan item, downgrades once the renewal invoice has billed the old period's overage at the
old plan's price."""

from __future__ import annotations

import logging

import pytest
from django.test import override_settings

from accounts.errors import ApplicationError
from gymbilling import stripe_client
from gymbilling.models import Plan, StripePrice, Subscription
from gymbilling.services import catalog_sync, overage_report
from gymbilling.services.events import invoice_refresh, subscription_refresh
from gymbilling.services.invoices import invoice_sync
from metering.models import MICRO, CreditLot, JournalTransaction
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import credits_expire, hold_capture, hold_place
from tests.helpers import ledger_rows

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


def _spend_beyond_credits(customer, credits: int) -> None:
    """Spend every credit that is not overage allowance, then `credits` whole credits more,
    as a job's hold and capture would (402 insufficient_credits where nothing allows it)."""
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


def _overage_used(customer, credits: int) -> None:
    """Spend everything but the overage allowance, then `credits` whole credits of it, and
    report them to the meter as beat would."""
    _spend_beyond_credits(customer, credits)
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


# --- members on an old price whose plan's overage now sells in another currency -------


def _sold_in_euros(code: str, *, overage_price_per_1k: int) -> StripePrice:
    """Finance sell `code`, and its overage at `overage_price_per_1k` cents of a euro per
    1,000 credits, in euros from now (the catalog synced); returns the dollar overage price
    members had, retired."""
    dollars = StripePrice.objects.get(plan__code=code, kind="overage", current=True)
    Plan.objects.filter(code=code).update(currency="eur", overage_price_per_1k=overage_price_per_1k)
    catalog_sync()
    euros = StripePrice.objects.get(plan__code=code, kind="overage", current=True)
    assert (euros.currency, euros.unit_amount) == ("eur", overage_price_per_1k)
    dollars.refresh_from_db()
    assert not dollars.current
    return dollars


def _allowance(invoice_id: str) -> CreditLot | None:
    return CreditLot.objects.filter(
        created_by__idempotency_key=f"grant:overage:{invoice_id}"
    ).first()


def _first_allowance_expires(customer, renewal: str) -> None:
    """Expire the allowances before the renewal's as the clock reaching their period's end
    would: the stand-in's renewal moves its own clock a period on, not the wall clock."""
    [first] = CreditLot.objects.filter(
        organization=customer.organization, source="overage", account__kind="wallet"
    ).exclude(created_by__idempotency_key=f"grant:overage:{renewal}")
    credits_expire(now=first.expires_at)
    first.refresh_from_db()
    assert first.remaining == 0


def _meter_of(stripe_sdk, price: StripePrice) -> str:
    """The meter a metered price reads, as Stripe says."""
    return stripe_sdk.v1.prices.retrieve(price.stripe_price_id).recurring.meter


@pytest.mark.parametrize(
    "made_before",
    [(), ("retired",), ("retired", "current")],
    ids=["meters recorded", "retired made before", "both made before, no sync since"],
)
def test_an_old_dollar_price_member_keeps_its_overage_after_the_plan_went_euro(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, caplog, made_before
):
    # given: a member on Pro at $99, its overage metered at Pro's $9.00 per 1,000 credits;
    # then finance sell Pro in euros, its overage at 11.00 EUR per 1,000 credits: the
    # subscription (in dollars for life) keeps its dollar overage item, now retired
    sub = subscribed("pro")
    dollars = _sold_in_euros("pro", overage_price_per_1k=1_100)
    assert _stripe_prices(stripe_sdk, sub) >= {dollars.stripe_price_id}
    assert dollars.meter == _meter_of(stripe_sdk, dollars)
    euros = StripePrice.objects.get(plan__code="pro", kind="overage", current=True)
    if "retired" in made_before:
        # (a price made before prices recorded their meter: the renewal's sync reads it
        # from the subscription's item)
        StripePrice.objects.filter(pk=dollars.pk).update(meter="")
    if "current" in made_before:
        # (so is Pro's current overage price, and stripe_sync_catalog has not run since the
        # deploy: the renewal's grant reads its meter from Stripe)
        StripePrice.objects.filter(pk=euros.pk).update(meter="")

    # when: the period renews, paid, and its grant is made
    with caplog.at_level(logging.ERROR, logger="gymbilling.services.invoices"):
        renewal = _renew(stripe_standin, sub)
        assert "failed" not in deliver()

    # then: the period's allowance follows the item Stripe bills: the plan's fair-use
    # ceiling, sold at the dollar price on the item (20,000 credits at $9.00 per 1,000),
    # not Pro's euro price now; nothing logged as withheld
    pro = Plan.objects.get(code="pro")
    allowance = _allowance(renewal)
    assert allowance is not None
    assert allowance.amount == pro.fair_use_ceiling == 20_000 * MICRO
    assert (allowance.revenue, allowance.revenue_currency) == (18_000, "usd")
    assert "no overage allowance granted" not in caplog.text
    euros.refresh_from_db()
    assert euros.meter == _meter_of(stripe_sdk, euros) == _meter_of(stripe_sdk, dollars)
    # and the first period's allowance expires with its period (the stand-in's clock is a
    # period on, the wall clock is not): only the renewal's allows overage now
    _first_allowance_expires(customer, renewal)

    # when: the member uses 1,000 credits beyond the period's credits, and beat reports them
    _spend_beyond_credits(customer, 1_000)
    assert overage_report() == 1_000

    # then: they are taken (no 402), burned from the allowance, and counted once, on the
    # meter the subscription's own dollar overage price reads
    allowance.refresh_from_db()
    assert allowance.amount - allowance.remaining == 1_000 * MICRO
    events = stripe_standin.meter_events(sub.stripe_customer_id)
    assert [(e["meter"], int(e["value"])) for e in events] == [
        (_meter_of(stripe_sdk, dollars), 1_000)
    ]
    # and the next period's invoice bills them once, in dollars, at the dollar price
    next_invoice = _renew(stripe_standin, sub)
    assert "failed" not in deliver()
    assert _usage_billed(next_invoice) == {dollars.stripe_price_id: (1_000, 900)}
    assert stripe_client.invoice_retrieve(next_invoice)["currency"] == "usd"
    assert sum(int(e["value"]) for e in stripe_standin.meter_events(sub.stripe_customer_id)) == (
        1_000
    )
    assert ledger_reconcile().ok


def test_stripe_unreachable_for_the_current_price_s_meter_retries_the_renewal_s_grant(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a $99 Pro member kept on its dollar overage price after Pro went euro, both
    # overage prices made before prices recorded their meter, no catalog sync since
    sub = subscribed("pro")
    dollars = _sold_in_euros("pro", overage_price_per_1k=1_100)
    StripePrice.objects.filter(plan__code="pro", kind="overage").update(meter="")
    renewal = _renew(stripe_standin, sub)

    # when: the renewal's invoice is processed while Stripe does not answer the read of
    # the current price's meter (its listing by lookup key; the SDK's retries too)
    stripe_standin.fault("/v1/prices", 503, method="GET", count=3)
    try:
        with pytest.raises(stripe_client.StripeUnavailable):
            invoice_refresh(invoice_id=renewal)
        faulted = [(f["status"], f["faulted"]) for f in stripe_standin.faults()]
    finally:
        stripe_standin.clear_faults()

    # then: nothing is granted yet, the paid credits nor the allowance (one grant, so the
    # period's allowance is not withheld for a passing outage): the event is retried
    assert faulted == [(503, 3)]
    assert not JournalTransaction.objects.filter(idempotency_key__endswith=renewal).exists()

    # when: the renewal's events are processed, Stripe answering
    assert "failed" not in deliver()

    # then: both are granted, the allowance sold at the dollar price the item carries
    assert JournalTransaction.objects.filter(idempotency_key=f"grant:invoice:{renewal}")
    allowance = _allowance(renewal)
    assert allowance is not None and allowance.amount == 20_000 * MICRO
    assert (allowance.revenue, allowance.revenue_currency) == (18_000, "usd")
    dollars.refresh_from_db()
    assert dollars.meter == _meter_of(stripe_sdk, dollars)
    assert ledger_reconcile().ok


def test_no_overage_allowance_on_a_retired_price_that_reads_another_meter(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, caplog
):
    # given: a member on Pro at $99, its overage metered at Pro's dollar price, which reads
    # the overage meter; then overage is reported under another event name (a meter of its
    # own), and finance sell Pro in euros
    sub = subscribed("pro")
    with override_settings(STRIPE_OVERAGE_EVENT_NAME="gym_overage_credits_eu"):
        dollars = _sold_in_euros("pro", overage_price_per_1k=1_100)

        # then: the catalog's sync made every current overage price read the new meter
        # (a meter is fixed on a price, so each is a new price); the member's retired
        # dollar price, kept on its subscription, still reads the old one
        current = StripePrice.objects.filter(kind="overage", current=True)
        [new_meter] = {price.meter for price in current}
        assert {_meter_of(stripe_sdk, price) for price in current} == {new_meter}
        assert stripe_client.meter_retrieve(new_meter)["event_name"] == "gym_overage_credits_eu"
        assert _meter_of(stripe_sdk, dollars) == dollars.meter != new_meter
        assert _stripe_prices(stripe_sdk, sub) >= {dollars.stripe_price_id}

        # when: the period renews, paid
        with caplog.at_level(logging.ERROR, logger="gymbilling.services.invoices"):
            renewal = _renew(stripe_standin, sub)
            assert "failed" not in deliver()

        # then: no allowance: what it allowed would be reported to a meter the price on the
        # subscription does not read, used and never invoiced; a human is told why
        assert _allowance(renewal) is None
        [logged] = [r for r in caplog.records if r.name == "gymbilling.services.invoices"]
        assert sub.stripe_subscription_id in logged.getMessage()
        assert dollars.stripe_price_id in logged.getMessage()
        assert new_meter in logged.getMessage()
        _first_allowance_expires(customer, renewal)

        # and: beyond the period's credits, a job is refused (402), nothing reported
        before = ledger_rows()
        with pytest.raises(ApplicationError) as refused:
            _spend_beyond_credits(customer, 1_000)
        assert (refused.value.status, refused.value.code) == (402, "insufficient_credits")
        assert ledger_rows() == before
        assert overage_report() == 0
        assert stripe_standin.meter_events(sub.stripe_customer_id) == []
    assert ledger_reconcile().ok


def test_no_overage_allowance_for_an_old_price_member_without_an_overage_item(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a member on Pro at $99 whose overage item was removed at Stripe by hand; then
    # finance sell Pro in euros
    sub = subscribed("pro")
    _overage_item_remove(stripe_sdk, sub, _overage_price("pro"))
    _sold_in_euros("pro", overage_price_per_1k=1_100)

    # when: the period renews, paid
    renewal = _renew(stripe_standin, sub)
    assert "failed" not in deliver()

    # then: the renewal cannot put Pro's euro overage price on a dollar subscription, so it
    # carries none, and no allowance is granted: nothing would invoice it
    overage_prices = set(
        StripePrice.objects.filter(kind="overage").values_list("stripe_price_id", flat=True)
    )
    assert not _stripe_prices(stripe_sdk, sub) & overage_prices
    assert _allowance(renewal) is None
    _first_allowance_expires(customer, renewal)
    with pytest.raises(ApplicationError) as refused:
        _spend_beyond_credits(customer, 1_000)
    assert refused.value.code == "insufficient_credits"
    assert overage_report() == 0
