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

from dataclasses import dataclass

import pytest

from gymbilling import stripe_client
from gymbilling.models import (
    BillingCustomer,
    Invoice,
    Plan,
    StripeEvent,
    StripePrice,
    Subscription,
)
from gymbilling.services import (
    catalog_sync,
    stripe_event_process,
    stripe_prices_retired_archive,
)
from gymbilling.services.checkout import LIFTED, plan_change_price
from gymbilling.stripe_standin.subscriptions import prorated
from metering.models import MICRO, CreditLot, LotSource
from metering.selectors import organization_balance
from tests.gymbilling.billing.conftest import (
    plan_sold_only_in_euros,
    plans_sold_in,
    subscription_state_unsynced,
)
from tests.helpers import ledger_rows

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


@dataclass(frozen=True)
class _Upgrade:
    """An upgrade's proration invoice: what Stripe charged, our row of it, and what it
    must charge; `share` is a period's credits' share for the time it covers."""

    stripe_paid: int
    invoice: Invoice
    charged: int
    covered: int
    period: int

    def share(self, credits: int) -> int:
        return credits * self.covered // self.period


def _upgrade(stripe_sdk, sub, *, paid: tuple[str, int], to: tuple[str, int]) -> _Upgrade:
    """The one proration invoice of an upgrade from the price `paid` to the price `to`
    (each a Stripe price id, and what it charges a period for its seats): its unused-time
    line at the one, its remaining-time line at the other, and the prorated difference."""
    [update] = _update_invoices(stripe_sdk, sub)
    assert [line.pricing.price_details.price for line in update.lines.data] == [paid[0], to[0]]
    covered, period = _proration_of(update, sub)
    charged = prorated(to[1], remaining_s=covered, period_s=period) - prorated(
        paid[1], remaining_s=covered, period_s=period
    )
    return _Upgrade(
        stripe_paid=update.amount_paid,
        invoice=Invoice.objects.get(stripe_invoice_id=update.id),
        charged=charged,
        covered=covered,
        period=period,
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
    up = _upgrade(
        stripe_sdk, sub, paid=(old.stripe_price_id, 9_900), to=(_current("enterprise"), 99_900)
    )
    assert up.stripe_paid == up.charged
    assert (up.invoice.amount_paid, up.invoice.credits_granted) == (
        up.charged,
        up.share(150_000 * MICRO) - up.share(12_000 * MICRO),
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
        up = _upgrade(
            stripe_sdk,
            sub,
            paid=(old.stripe_price_id, 4_900 * seats),
            to=(old.stripe_price_id, 4_900 * to),
        )
        assert (up.stripe_paid, up.invoice.amount_paid) == (up.charged, up.charged)
        assert up.invoice.credits_granted == (
            up.share(5_000 * MICRO * to) - up.share(5_000 * MICRO * seats)
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
        up = _upgrade(
            stripe_sdk,
            sub,
            paid=(old.stripe_price_id, 9_900),
            to=(_current("team"), 4_900 * team_seats),
        )
        assert up.charged > 0
        assert (up.stripe_paid, up.invoice.amount_paid) == (up.charged, up.charged)
        assert up.invoice.credits_granted == (
            up.share(5_000 * MICRO * team_seats) - up.share(12_000 * MICRO)
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


def _active(stripe_sdk, price: StripePrice) -> bool:
    return stripe_sdk.v1.prices.retrieve(price.stripe_price_id).active


def test_a_retired_price_made_active_again_is_archived_once_no_member_needs_it(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a member on Pro at $99; finance make Pro $129 (the $99 price archived at
    # Stripe); the member moves to Basic from the next period
    sub, old = _old_pro_with_basic_scheduled(customer, subscribed, deliver)
    assert not _active(stripe_sdk, old)

    # when: they take the downgrade back: their item goes back to the $99 price, which is
    # made active again at Stripe for it
    assert _change(customer, "pro") == "change_canceled"
    assert "failed" not in deliver()
    assert _item(stripe_sdk, sub) == (old.stripe_price_id, 1)
    assert _active(stripe_sdk, old)

    # then: the daily sweep leaves it active while they are on it
    assert stripe_prices_retired_archive() == []
    assert _active(stripe_sdk, old)
    # and a downgrade scheduled and taken back again still works at that price
    assert _change(customer, "basic") == "change_scheduled"
    assert stripe_prices_retired_archive() == []
    assert _change(customer, "pro") == "change_canceled"
    assert "failed" not in deliver()
    assert _item(stripe_sdk, sub) == (old.stripe_price_id, 1)

    # when: their subscription ends
    stripe_sdk.v1.subscriptions.cancel(sub.stripe_subscription_id)
    assert "failed" not in deliver()
    assert Subscription.objects.get(pk=sub.pk).status == "canceled"

    # then: the sweep archives the retired price at Stripe again, once; the current ones
    # stay on sale
    assert stripe_prices_retired_archive() == [old.stripe_price_id]
    assert not _active(stripe_sdk, old)
    assert stripe_prices_retired_archive() == []
    assert stripe_sdk.v1.prices.retrieve(_current("pro")).active


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


def _subscription_lots(org) -> list[int]:
    """The amounts of the organization's subscription lots (grants), oldest first."""
    return list(
        CreditLot.objects.filter(organization=org, source=LotSource.SUBSCRIPTION, parent=None)
        .order_by("pk")
        .values_list("amount", flat=True)
    )


def test_a_move_to_the_plan_s_current_price_costing_more_is_charged_now_and_granted_once(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a member on Pro at $99 for 12,000 credits a month; finance make Pro $129 for
    # 15,000 (the $99 price retired)
    sub = subscribed("pro")
    org = customer.organization
    old = _repriced("pro", monthly_price=12_900, monthly_credits=15_000 * MICRO)

    # when: they ask for their own plan, Pro, again
    assert _change(customer, "pro") == "subscription_updated"
    assert "failed" not in deliver()

    # then: an upgrade, as any change costing more: Stripe's item is at Pro's price now,
    # and the prorated difference from the $99 they paid is charged at once
    assert _item(stripe_sdk, sub) == (_current("pro"), 1)
    up = _upgrade(stripe_sdk, sub, paid=(old.stripe_price_id, 9_900), to=(_current("pro"), 12_900))
    assert up.charged > 0 and up.stripe_paid == up.charged
    # and its credits, the prorated difference of 15,000 and 12,000, granted once
    extra = up.share(15_000 * MICRO) - up.share(12_000 * MICRO)
    assert (up.invoice.amount_paid, up.invoice.credits_granted) == (up.charged, extra)
    assert _subscription_lots(org) == [12_000 * MICRO, extra]
    granted = (ledger_rows(), organization_balance(organization=org))
    # however often the paid invoice's events are applied again
    for event in StripeEvent.objects.filter(type__startswith="invoice."):
        stripe_event_process(event_pk=event.pk, force=True)
    assert (ledger_rows(), organization_balance(organization=org)) == granted
    sub.refresh_from_db()
    assert (sub.plan.code, sub.price.stripe_price_id, sub.scheduled_plan) == (
        "pro",
        _current("pro"),
        None,
    )
    # and the next period costs $129 and grants 15,000
    assert _renewal(stripe_standin, deliver, sub) == (12_900, 15_000 * MICRO)


def test_a_move_to_the_plan_s_current_price_costing_less_is_from_the_next_period(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a member on Pro at $99 for 12,000 credits a month; finance make Pro $79 for
    # 10,000
    sub = subscribed("pro")
    org = customer.organization
    old = _repriced("pro", monthly_price=7_900, monthly_credits=10_000 * MICRO)
    before = (_subscription_lots(org), organization_balance(organization=org))

    # when: they ask for their own plan, Pro, again
    assert _change(customer, "pro") == "change_scheduled"
    assert "failed" not in deliver()

    # then: a downgrade, as any change costing less: Stripe's item is at $79 from the next
    # period, nothing is charged or granted now, and the $99 period stands
    assert _item(stripe_sdk, sub) == (_current("pro"), 1)
    assert not _update_invoices(stripe_sdk, sub)
    assert (_subscription_lots(org), organization_balance(organization=org)) == before
    sub.refresh_from_db()
    assert (sub.plan.code, sub.price, sub.scheduled_plan.code, sub.scheduled_seats) == (
        "pro",
        old,
        "pro",
        1,
    )
    state = customer.client.get("/api/v1/billing/subscription").json()["subscription"]
    assert (state["plan"], state["scheduled_plan"], state["scheduled_seats"]) == ("pro", "pro", 1)

    # and the next period costs $79 and grants 10,000, once, at the price now recorded
    assert _renewal(stripe_standin, deliver, sub) == (7_900, 10_000 * MICRO)
    assert _subscription_lots(org) == [12_000 * MICRO, 10_000 * MICRO]
    sub.refresh_from_db()
    assert (sub.price.stripe_price_id, sub.scheduled_plan) == (_current("pro"), None)


def test_a_scheduled_move_to_the_current_price_is_taken_back_by_asking_again(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a $99 Pro member with a move to Pro's $79 price scheduled
    sub = subscribed("pro")
    old = _repriced("pro", monthly_price=7_900, monthly_credits=10_000 * MICRO)
    assert _change(customer, "pro") == "change_scheduled"
    assert "failed" not in deliver()

    # when: they ask for Pro again, as for any scheduled change
    assert _change(customer, "pro") == "change_canceled"
    assert "failed" not in deliver()

    # then: the move is taken back: Stripe's item at the $99 price, nothing charged, and
    # the next period costs $99 and grants 12,000
    assert _item(stripe_sdk, sub) == (old.stripe_price_id, 1)
    assert not _update_invoices(stripe_sdk, sub)
    sub.refresh_from_db()
    assert (sub.price, sub.scheduled_plan) == (old, None)
    assert _renewal(stripe_standin, deliver, sub) == (9_900, 12_000 * MICRO)


def test_a_team_moves_to_its_plan_s_current_price_for_its_seats(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a team of 3 seats at $49 for 5,000 credits a seat; finance make Team $59 for
    # 6,000 a seat
    sub = subscribed("team", seats=3)
    old = _repriced("team", monthly_price=5_900, monthly_credits=6_000 * MICRO)

    # when: they ask for Team at their 3 seats
    assert _change(customer, "team", seats=3) == "subscription_updated"
    assert "failed" not in deliver()

    # then: charged the prorated difference of 3 seats at $59 from 3 at $49, and granted
    # the matching share of 3 x 6,000 less 3 x 5,000
    assert _item(stripe_sdk, sub) == (_current("team"), 3)
    up = _upgrade(
        stripe_sdk, sub, paid=(old.stripe_price_id, 3 * 4_900), to=(_current("team"), 3 * 5_900)
    )
    assert (up.stripe_paid, up.invoice.amount_paid) == (up.charged, up.charged)
    assert up.invoice.credits_granted == up.share(3 * 6_000 * MICRO) - up.share(3 * 5_000 * MICRO)
    assert _renewal(stripe_standin, deliver, sub) == (3 * 5_900, 3 * 6_000 * MICRO)


def test_asking_for_one_s_own_plan_at_its_current_price_is_still_no_change(
    customer, subscribed, stripe_sdk, deliver
):
    # given: a member on Pro at its current price
    sub = subscribed("pro")
    before = subscription_state_unsynced(stripe_sdk, sub)

    # when: they ask for Pro
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")

    # then: refused as before; nothing changed at Stripe, here or in the ledger
    assert response.status_code == 409, response.content
    assert response.json()["error"]["code"] == "no_change"
    assert subscription_state_unsynced(stripe_sdk, sub) == before


def test_asking_for_one_s_own_plan_sold_now_in_another_currency_is_no_change(
    customer, subscribed, stripe_sdk, deliver
):
    # given: a member on Pro at $99; then finance sell Pro in euros (a new current price,
    # which they cannot move to: Stripe keeps a customer in one currency)
    sub = subscribed("pro")
    plans_sold_in("eur", "pro")
    before = subscription_state_unsynced(stripe_sdk, sub)

    # when: they ask for Pro
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")

    # then: nothing to change, as for a member on the current price, saying why they stay
    # on theirs; nothing changed at Stripe, here or in the ledger
    assert response.status_code == 409, response.content
    error = response.json()["error"]
    assert error["code"] == "no_change"
    assert "sells in EUR now" in error["message"]
    assert subscription_state_unsynced(stripe_sdk, sub) == before


def test_a_member_paying_in_dollars_moves_to_a_plan_sold_in_dollars_after_theirs_went_euro(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a member on Pro at $99; then finance sell Pro in euros (Basic still in dollars,
    # the currency the member's customer at Stripe pays in)
    sub = subscribed("pro")
    paid = sub.price
    plans_sold_in("eur", "pro")

    # when: they move to Basic
    assert _change(customer, "basic") == "change_scheduled"
    assert "failed" not in deliver()

    # then: a downgrade from the next period as for any member: Stripe's item at Basic's
    # dollar price, the period standing at the $99 paid; the renewal charges $20 for 2,000
    assert _item(stripe_sdk, sub) == (_current("basic"), 1)
    sub.refresh_from_db()
    assert (sub.plan.code, sub.scheduled_plan.code, sub.price) == ("pro", "basic", paid)
    assert _renewal(stripe_standin, deliver, sub) == (2_000, 2_000 * MICRO)
    assert Invoice.objects.get(subscription=sub, billing_reason="subscription_cycle").currency == (
        "usd"
    )


def test_a_member_paying_in_dollars_is_refused_a_plan_sold_in_euros_as_their_own_now_is(
    customer, subscribed, stripe_sdk, deliver
):
    # given: a member on Pro at $99; then finance sell Pro and Basic in euros
    sub = subscribed("pro")
    plans_sold_in("eur", "pro", "basic")
    before = subscription_state_unsynced(stripe_sdk, sub)

    # when: they ask for Basic, sold in euros, as their own plan now is
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "basic"}, format="json")

    # then: refused, saying the currency they pay in; nothing changed at Stripe, here or in
    # the ledger (Stripe would refuse an item in another currency than its customer's)
    assert response.status_code == 400, response.content
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("currency_mismatch", "plan")
    assert "paid in USD and Basic sells in EUR" in error["message"]
    assert subscription_state_unsynced(stripe_sdk, sub) == before


def _currencies(stripe_sdk, sub) -> list[str]:
    """The currency of each price on Stripe's subscription, plan item first."""
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    return [item.price.currency for item in at_stripe["items"].data]


def test_a_team_paying_in_dollars_adds_seats_after_its_plan_went_euro_all_in_dollars(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a team of 2 seats at $49 a seat, its overage metered at Team's dollar price;
    # then finance sell Team, and its overage, in euros
    sub = subscribed("team", seats=2)
    paid, overage = sub.price, sub.overage_price
    plans_sold_in("eur", "team")

    # when: they add a seat (an upgrade, charged now)
    assert _change(customer, "team", seats=3) == "subscription_updated"
    assert "failed" not in deliver()

    # then: the seats change at the price they pay, and the overage item stays at its dollar
    # price: Stripe refuses a price in another currency on any item of the subscription, so
    # a change sending Team's euro overage price with it would fail whole (a 502)
    at_stripe = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)
    assert [item.price.id for item in at_stripe["items"].data] == [
        paid.stripe_price_id,
        overage.stripe_price_id,
    ]
    assert _item(stripe_sdk, sub) == (paid.stripe_price_id, 3)
    assert _currencies(stripe_sdk, sub) == ["usd", "usd"]
    [update] = _update_invoices(stripe_sdk, sub)
    assert (update.currency, update.status) == ("usd", "paid")
    sub.refresh_from_db()
    assert (sub.seats, sub.price, sub.overage_price) == (3, paid, overage)


def test_a_renewal_after_the_plan_went_euro_sends_stripe_no_euro_price(
    customer, subscribed, stripe_standin, stripe_sdk, deliver, caplog
):
    # given: a member on Pro at $99, its overage metered at Pro's dollar price; then finance
    # sell Pro, and its overage, in euros
    sub = subscribed("pro")
    paid, overage = sub.price, sub.overage_price
    plans_sold_in("eur", "pro")

    # when: the period renews, and its paid invoice is processed
    assert _renewal(stripe_standin, deliver, sub) == (9_900, 12_000 * MICRO)

    # then: the overage item is not moved to Pro's euro price, which Stripe would refuse
    # (asked, and logged as refused, each renewal): every price stays in dollars
    assert _currencies(stripe_sdk, sub) == ["usd", "usd"]
    sub.refresh_from_db()
    assert (sub.price, sub.overage_price) == (paid, overage)
    assert "could not be set" not in caplog.text


def test_a_switch_to_a_plan_sold_only_in_euros_is_refused_before_stripe_is_asked(
    customer, subscribed, stripe_sdk, deliver
):
    # given: a member on Pro at $99; and a plan sold only in euros (never in dollars)
    sub = subscribed("pro")
    euro = StripePrice.objects.get(plan=plan_sold_only_in_euros(), current=True)
    before = subscription_state_unsynced(stripe_sdk, sub)

    # when: they ask for it, with a question asked and with its "yes"
    asked = customer.client.post("/api/v1/billing/checkout", {"plan": "pro-eu"}, format="json")

    # then: our own refusal, a 400 saying what to do, not Stripe's (which would be a 502
    # payment_provider_refused): Stripe is not asked, and nothing changed at Stripe, in our
    # Subscription row or in the ledger
    assert asked.status_code == 400, asked.content
    error = asked.json()["error"]
    assert (error["code"], error["param"]) == ("currency_mismatch", "plan")
    assert error["message"] == (
        "The subscription is paid in USD and Pro EU sells in EUR: a subscription cannot "
        "change currency. Cancel it and subscribe again."
    )
    assert subscription_state_unsynced(stripe_sdk, sub) == before
    # and Stripe, asked, would have refused it: the refusal is the same rule, answered first
    item = stripe_sdk.v1.subscriptions.retrieve(sub.stripe_subscription_id)["items"].data[0]
    with pytest.raises(stripe_client.StripeRequestRefused) as refused:
        stripe_client.subscription_update(
            sub.stripe_subscription_id,
            key=f"test:{sub.pk}",
            items=[{"id": item.id, "price": euro.stripe_price_id}],
        )
    assert refused.value.status == 400
    assert subscription_state_unsynced(stripe_sdk, sub) == before


def test_a_member_whose_dollar_subscription_ended_subscribes_to_a_plan_sold_in_euros(
    customer, subscribed, stripe_standin, stripe_sdk, deliver
):
    # given: a member whose Pro subscription, in dollars, was canceled and has ended
    sub = subscribed("pro")
    stripe_sdk.v1.subscriptions.cancel(sub.stripe_subscription_id)
    assert "failed" not in deliver()
    plans_sold_in("eur", "basic")

    # when: they subscribe to Basic, sold in euros now, and pay
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "basic"}, format="json")
    assert response.status_code == 200, response.content
    stripe_standin.pay_checkout(response.json()["session_id"])
    assert "failed" not in deliver()

    # then: the same Stripe customer has a subscription in euros (Stripe lets a customer
    # whose subscriptions all ended subscribe in another currency), granted its credits
    new = Subscription.objects.get(organization=customer.organization, status="active")
    assert new.stripe_customer_id == sub.stripe_customer_id
    assert new.period_amount() == (2_000, "eur")
    assert Invoice.objects.get(subscription=new).currency == "eur"
