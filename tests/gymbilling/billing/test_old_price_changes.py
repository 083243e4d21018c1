"""Plan and seat changes of a member left on an old price (finance changed the plan since,
a new price sells it now): what they keep paying and are granted, through the API, against
the Stripe stand-in over HTTP.

Staying on what they pay (taking back a scheduled downgrade, the item put back before an
upgrade is prorated, a change of seats on the same plan) keeps their price; another plan
is a new purchase, at its price now. Whether a change is an upgrade (charged now) or a
downgrade (from the next period) is decided against what they pay, not against what their
plan costs now.
"""

from __future__ import annotations

import pytest

from gymbilling.models import BillingCustomer, Invoice, Plan, StripePrice, Subscription
from gymbilling.services import catalog_sync
from gymbilling.services.checkout import LIFTED, plan_change_price
from gymbilling.stripe_standin.subscriptions import prorated
from metering.models import MICRO

pytestmark = pytest.mark.django_db


def _repriced(code: str, *, monthly_price: int, monthly_credits: int) -> StripePrice:
    """Finance change `code`'s price and credits and sync the catalog: the price members
    had is retired (archived at Stripe); returns that old price."""
    old = StripePrice.objects.get(plan__code=code, kind="plan", current=True)
    Plan.objects.filter(code=code).update(
        monthly_price=monthly_price, monthly_credits=monthly_credits
    )
    assert f"gym_plan_{code}" in catalog_sync().created
    old.refresh_from_db()
    assert not old.current
    return old


def _current(code: str) -> str:
    return StripePrice.objects.get(plan__code=code, kind="plan", current=True).stripe_price_id


def _change(customer, plan: str, seats: int = 1) -> str:
    response = customer.client.post(
        "/api/v1/billing/checkout", {"plan": plan, "seats": seats}, format="json"
    )
    assert response.status_code == 200, response.content
    return response.json()["kind"]


def _item(stripe_sdk, sub) -> tuple[str, int]:
    """Stripe's plan item: its price and quantity."""
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    item = at_stripe["items"].data[0]
    return item.price.id, item.quantity


def _update_invoices(stripe_sdk, sub) -> list:
    invoices = stripe_sdk.v1.invoices.list(params={"subscription": sub.stripe_subscription_id})
    return [i for i in invoices.data if i.billing_reason == "subscription_update"]


def _renewal(stripe_standin, deliver, sub) -> tuple[int, int]:
    """Renew the period at Stripe; what its invoice charged and granted."""
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()
    renewal = Invoice.objects.get(subscription=sub, billing_reason="subscription_cycle")
    return renewal.amount_paid, renewal.credits_granted


def _proration_of(update, sub) -> tuple[int, int]:
    """The seconds an update invoice's lines cover, and the period's length."""
    sub.refresh_from_db()
    line = update.lines.data[0]
    return (
        line.period.end - line.period.start,
        int((sub.current_period_end - sub.current_period_start).total_seconds()),
    )


def _old_pro_with_basic_scheduled(customer, subscribed, deliver) -> tuple:
    """A member on Pro at $99 for 12,000 credits a month, then Pro made $129 for 15,000,
    then a downgrade to Basic scheduled; returns the subscription and the $99 price."""
    sub = subscribed("pro")
    old = _repriced("pro", monthly_price=12_900, monthly_credits=15_000 * MICRO)
    assert _change(customer, "basic") == "change_scheduled"
    assert "failed" not in deliver()
    return sub, old


def test_taking_back_a_scheduled_downgrade_keeps_the_old_price(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a member on Pro at $99 for 12,000 credits a month; finance make Pro $129 for
    # 15,000; the member moves to Basic from the next period (Stripe's item at Basic now)
    sub, old = _old_pro_with_basic_scheduled(customer, subscribed, deliver)

    # when: they take the downgrade back
    assert _change(customer, "pro") == "change_canceled"
    assert "failed" not in deliver()

    # then: Stripe's item is back at the $99 price they pay, not Pro's $129 now, and nothing
    # was charged for it
    assert _item(stripe_sdk, sub) == (old.stripe_price_id, 1)
    assert not _update_invoices(stripe_sdk, sub)
    sub.refresh_from_db()
    assert (sub.plan.code, sub.scheduled_plan, sub.price) == ("pro", None, old)
    # and the next period costs $99 and grants 12,000, as before the downgrade was asked for
    assert _renewal(stripe_standin, deliver, sub) == (9_900, 12_000 * MICRO)


def test_an_upgrade_over_a_scheduled_downgrade_is_prorated_from_the_old_price(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a member on Pro at $99 for 12,000 credits a month; finance make Pro $129 for
    # 15,000; the member moves to Basic from the next period (Stripe's item at Basic now)
    sub, old = _old_pro_with_basic_scheduled(customer, subscribed, deliver)

    # when: they ask for Enterprise instead
    assert _change(customer, "enterprise") == "subscription_updated"
    assert "failed" not in deliver()

    # then: the item was put back at the $99 they paid for this period before the upgrade,
    # so the unused time credited is the $99 price's, not $129's, and so are its credits
    [update] = _update_invoices(stripe_sdk, sub)
    unused, remaining = update.lines.data
    covered, period = _proration_of(update, sub)
    assert unused.pricing.price_details.price == old.stripe_price_id
    assert remaining.pricing.price_details.price == _current("enterprise")
    charged = prorated(99_900, remaining_s=covered, period_s=period) - prorated(
        9_900, remaining_s=covered, period_s=period
    )
    assert update.amount_paid == charged
    invoice = Invoice.objects.get(stripe_invoice_id=update.id)
    assert (invoice.amount_paid, invoice.credits_granted) == (
        charged,
        150_000 * MICRO * covered // period - 12_000 * MICRO * covered // period,
    )
    assert _item(stripe_sdk, sub) == (_current("enterprise"), 1)


@pytest.mark.parametrize(
    "seats, to, kind", [(2, 3, "subscription_updated"), (3, 2, "change_scheduled")]
)
def test_a_seat_change_on_the_same_plan_keeps_the_old_unit_price(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, seats, to, kind
):
    # given: a team on Team at $49 for 5,000 credits a seat; finance make Team $59 for 6,000
    sub = subscribed("team", seats=seats)
    old = _repriced("team", monthly_price=5_900, monthly_credits=6_000 * MICRO)

    # when: they change their number of seats
    assert _change(customer, "team", seats=to) == kind
    assert "failed" not in deliver()

    # then: the same plan at the same unit price: Stripe's item is at the $49 price for the
    # new seats (a decrease from the next period, an increase now)
    assert _item(stripe_sdk, sub) == (old.stripe_price_id, to)
    updates = _update_invoices(stripe_sdk, sub)
    if to > seats:
        # charged the prorated difference at $49 a seat, granted 5,000 a seat's share of it
        [update] = updates
        covered, period = _proration_of(update, sub)
        assert [line.pricing.price_details.price for line in update.lines.data] == [
            old.stripe_price_id,
            old.stripe_price_id,
        ]
        charged = prorated(4_900 * to, remaining_s=covered, period_s=period) - prorated(
            4_900 * seats, remaining_s=covered, period_s=period
        )
        invoice = Invoice.objects.get(stripe_invoice_id=update.id)
        assert (update.amount_paid, invoice.amount_paid) == (charged, charged)
        assert invoice.credits_granted == (
            5_000 * MICRO * to * covered // period - 5_000 * MICRO * seats * covered // period
        )
    else:
        assert not updates
    # and each period from the next costs $49 a seat and grants 5,000 a seat
    assert _renewal(stripe_standin, deliver, sub) == (4_900 * to, 5_000 * MICRO * to)
    sub.refresh_from_db()
    assert (sub.seats, sub.price) == (to, old)


@pytest.mark.parametrize(
    "pro_now, team_seats, kind, charged",
    [
        # Pro now $149: Team for 3 ($147) costs more than the $99 paid, though less than
        # Pro now: an upgrade, charged now
        (14_900, 3, "subscription_updated", True),
        # Pro now $79: Team for 2 ($98) costs less than the $99 paid, though more than Pro
        # now: a downgrade, from the next period, nothing charged
        (7_900, 2, "change_scheduled", False),
    ],
    ids=["raised", "cut"],
)
def test_an_old_price_member_s_change_is_an_upgrade_by_what_they_pay(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, pro_now, team_seats, kind, charged
):
    # given: a member on Pro at $99 for 12,000 credits; then finance change Pro's price
    sub = subscribed("pro")
    old = _repriced("pro", monthly_price=pro_now, monthly_credits=12_000 * MICRO)

    # when: they move to Team
    assert _change(customer, "team", seats=team_seats) == kind
    assert "failed" not in deliver()

    # then: Stripe's item is at Team's price now, for the seats asked
    assert _item(stripe_sdk, sub) == (_current("team"), team_seats)
    sub.refresh_from_db()
    if charged:
        # the prorated difference from the $99 paid, and Team's credits from now
        [update] = _update_invoices(stripe_sdk, sub)
        unused, remaining = update.lines.data
        covered, period = _proration_of(update, sub)
        assert unused.pricing.price_details.price == old.stripe_price_id
        assert remaining.pricing.price_details.price == _current("team")
        expected = prorated(4_900 * team_seats, remaining_s=covered, period_s=period) - prorated(
            9_900, remaining_s=covered, period_s=period
        )
        assert expected > 0
        invoice = Invoice.objects.get(stripe_invoice_id=update.id)
        assert (update.amount_paid, invoice.amount_paid) == (expected, expected)
        assert invoice.credits_granted == (
            5_000 * MICRO * team_seats * covered // period - 12_000 * MICRO * covered // period
        )
        assert (sub.plan.code, sub.seats, sub.scheduled_plan) == ("team", team_seats, None)
    else:
        # nothing charged; the $99 Pro period stands, Team from the next one
        assert not _update_invoices(stripe_sdk, sub)
        assert (sub.plan.code, sub.price, sub.scheduled_plan.code, sub.scheduled_seats) == (
            "pro",
            old,
            "team",
            team_seats,
        )
        assert _renewal(stripe_standin, deliver, sub) == (
            4_900 * team_seats,
            5_000 * MICRO * team_seats,
        )


def test_an_upgrade_declined_after_the_scheduled_price_was_retired_puts_the_downgrade_back(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a member on Pro with a downgrade to Basic at $20 scheduled (Stripe's item at
    # that price now); then finance make Basic $25, retiring (archiving) the $20 price; and
    # a card that now declines
    sub = subscribed("pro")
    assert _change(customer, "basic") == "change_scheduled"
    assert "failed" not in deliver()
    old_basic = _repriced("basic", monthly_price=2_500, monthly_credits=2_000 * MICRO)
    stripe_standin.set_card(BillingCustomer.objects.get().stripe_customer_id, "4000000000000341")

    # when: they ask for Enterprise, which the card declines
    response = customer.client.post(
        "/api/v1/billing/checkout", {"plan": "enterprise"}, format="json"
    )
    assert "failed" not in deliver()

    # then: declined (not a provider error), and the downgrade is back on the $20 price
    # (made usable again at Stripe), the lift's marker gone: Pro now, Basic from the next
    # period, which costs the $20 chosen, not Pro's $99
    assert response.status_code == 402, response.content
    assert response.json()["error"]["code"] == "card_declined"
    assert _item(stripe_sdk, sub) == (old_basic.stripe_price_id, 1)
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert not at_stripe.metadata.to_dict().get(LIFTED)
    sub.refresh_from_db()
    assert (sub.plan.code, sub.scheduled_plan.code) == ("pro", "basic")
    stripe_standin.set_card(BillingCustomer.objects.get().stripe_customer_id, "4242424242424242")
    assert _renewal(stripe_standin, deliver, sub)[0] == 2_000


def test_a_change_to_the_plan_of_a_stale_price_is_at_that_plan_s_price_now(subscribed):
    # given: a member on Pro whose row still carries an old Basic price (left by a worker of
    # the release before the price column moving the plan without it); Basic's price since
    # replaced
    sub = subscribed("pro")
    old_basic = _repriced("basic", monthly_price=2_500, monthly_credits=2_500 * MICRO)
    Subscription.objects.filter(pk=sub.pk).update(price=old_basic)
    sub.refresh_from_db()

    # when: the price a change to Basic is made at is asked for
    price = plan_change_price(subscription=sub, plan=Plan.objects.get(code="basic"))

    # then: Basic's price now, a new purchase, not the stale one
    assert price.stripe_price_id == _current("basic")
