"""A price buys the credits it was made for: finance changing a plan or pack (its price and
its credits) and syncing the catalog leaves what was bought at the old price as it was sold,
through the stand-in."""

from __future__ import annotations

import pytest

from gymbilling.models import (
    CheckoutSession,
    CreditPack,
    Invoice,
    Plan,
    StripeEvent,
    StripePrice,
    Subscription,
)
from gymbilling.services import catalog_sync, stripe_event_process, stripe_event_record
from gymbilling.services.catalog import catalog_seed_defaults
from gymbilling.services.subscriptions import subscription_sync
from gymbilling.stripe_client import API_VERSION, WebhookEvent
from metering.models import MICRO, CreditLot
from metering.selectors import organization_balance
from tests.factories import OrganizationFactory
from tests.gymbilling.market.conftest import plan_priced, roll, rollover_member
from tests.helpers import credits, system_balance

pytestmark = pytest.mark.django_db


def test_a_plan_s_new_price_and_credits_leave_its_old_subscribers_what_they_bought(
    customer, subscribed, stripe_standin, deliver, buy
):
    # given: a member on Pro at $99 for 12,000 credits a month; then finance make Pro
    # $129 for 15,000 and sync the catalog
    sub = subscribed("pro")
    Plan.objects.filter(code="pro").update(monthly_price=12_900, monthly_credits=15_000 * MICRO)
    report = catalog_sync()
    assert "gym_plan_pro" in report.created
    old, new = StripePrice.objects.filter(lookup_key="gym_plan_pro").order_by("pk")
    assert (old.current, old.unit_amount, old.credits) == (False, 9_900, 12_000 * MICRO)
    assert (new.current, new.unit_amount, new.credits) == (True, 12_900, 15_000 * MICRO)

    # when: the member renews, still at the $99 price
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()

    # then: they paid $99 and got the 12,000 that price was sold for
    renewal = Invoice.objects.get(subscription=sub, billing_reason="subscription_cycle")
    assert (renewal.amount_paid, renewal.credits_granted) == (9_900, 12_000 * MICRO)

    # when: another organization subscribes now
    newcomer = OrganizationFactory()
    buy(newcomer, plan="pro")

    # then: it paid $129 for 15,000
    first = Invoice.objects.get(subscription=Subscription.objects.get(organization=newcomer))
    assert (first.amount_paid, first.credits_granted) == (12_900, 15_000 * MICRO)


def subscription_credits_left(org) -> int:
    """Subscription credits still in the wallet (lots hold the truth)."""
    lots = CreditLot.objects.filter(
        organization=org, source="subscription", account__kind="wallet", remaining__gt=0
    )
    return sum(lot.remaining for lot in lots)


@pytest.mark.parametrize("now_credits", [15_000 * MICRO, 8_000 * MICRO], ids=["raised", "lowered"])
def test_an_old_price_s_rollover_cap_is_a_share_of_its_own_credits(
    customer, subscribed, stripe_standin, deliver, now_credits
):
    # given: a member on Pro at $99 for 12,000 credits a month, 25% rolling over (a cap of
    # 3,000), all 12,000 unspent; then finance change Pro's credits and sync the catalog
    sub = subscribed("pro")
    org = customer.organization
    assert subscription_credits_left(org) == 12_000 * MICRO
    Plan.objects.filter(code="pro").update(monthly_credits=now_credits)
    assert "gym_plan_pro" in catalog_sync().created
    expired_before = system_balance("expiry")

    # when: the member renews, still at the old price
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()

    # then: the cap is 25% of the 12,000 their price sells, not of what Pro gives now:
    # 3,000 roll over, 9,000 expire, and the renewal grants 12,000
    assert system_balance("expiry") - expired_before == 9_000 * MICRO
    assert subscription_credits_left(org) == 3_000 * MICRO + 12_000 * MICRO


def test_a_downgrade_s_last_period_is_capped_at_the_old_price_s_credits(
    customer, subscribed, stripe_standin, deliver
):
    # given: a member on Pro at $99 for 12,000 credits a month (25% rolls over), all
    # unspent; finance make Pro give 15,000, and the member moves to Basic (2,000 a month,
    # no rollover) from the next period: Stripe's item is at Basic's price already
    sub = subscribed("pro")
    org = customer.organization
    Plan.objects.filter(code="pro").update(monthly_credits=15_000 * MICRO)
    catalog_sync()
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "basic"}, format="json")
    assert response.json()["kind"] == "change_scheduled", response.content
    assert "failed" not in deliver()
    expired_before = system_balance("expiry")

    # when: the period renews, at Basic
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver()

    # then: the Pro period that ended rolls over 25% of the 12,000 its price sold (3,000),
    # and Basic's first month adds its 2,000
    assert system_balance("expiry") - expired_before == 9_000 * MICRO
    assert subscription_credits_left(org) == 3_000 * MICRO + 2_000 * MICRO
    assert Subscription.objects.get(pk=sub.pk).price.lookup_key == "gym_plan_basic"


def test_a_subscription_synced_before_its_price_was_recorded_is_capped_at_its_item_s(
    market_stripe,
):
    # given: a member of a plan of 1,000 credits a month rolling 10% over, all unspent,
    # whose row was synced before subscriptions recorded their price; then the plan gives
    # 2,000 (a new price, for new purchases), the member's item staying at the old one
    org, stripe_sub, _ = rollover_member()
    StripePrice.objects.filter(stripe_price_id="price_roll_10").update(credits=credits(1000))
    Subscription.objects.filter(organization=org).update(price=None)
    Plan.objects.filter(code="roll-10").update(monthly_credits=credits(2000))

    # when: the period renews
    roll(stripe_sub)

    # then: the cap is 10% of the 1,000 the item's price sold (100 left, 900 expired), and
    # the row now names that price
    assert organization_balance(organization=org).available == credits(100)
    sub = Subscription.objects.select_related("price").get(organization=org)
    assert sub.price.stripe_price_id == "price_roll_10"


def mini_plan_price() -> StripePrice:
    """The price of Mini, a plan of 200 credits a month for $5 that rolls nothing over."""
    return plan_priced("mini", amount=500, credits_=credits(200), credits=credits(200))


def moved_up_from_mini_by_an_old_worker() -> tuple:
    """A member of Roll 10 (1,000 credits a month for $10, 10% rolling over), all unspent,
    whose row still names Mini's price: a worker of the release before Subscription.price
    moved the member up from Mini and saved the plan without it (its save() does not know
    the column). Returns the organization, its subscription at Stripe, and Mini's price."""
    org, stripe_sub, _ = rollover_member()
    mini = mini_plan_price()
    Subscription.objects.filter(organization=org).update(price=mini)
    return org, stripe_sub, mini


def test_a_price_of_another_plan_is_repaired_by_the_next_sync(market_stripe):
    # given: a member of Roll 10 whose row names Mini's price
    org, stripe_sub, _ = moved_up_from_mini_by_an_old_worker()

    # when: Stripe's subscription, its item at Roll 10's price, is synced again (any event)
    subscription_sync(stripe_sub=stripe_sub)

    # then: the row names the price its plan is paid at, as Stripe's item says
    sub = Subscription.objects.select_related("price").get(organization=org)
    assert (sub.plan.code, sub.price.stripe_price_id) == ("roll-10", "price_roll_10")


@pytest.mark.parametrize("renewed_at", ["price_roll_10", "price_mini"], ids=["same", "downgrade"])
def test_a_price_of_another_plan_does_not_make_the_rollover_cap(market_stripe, renewed_at):
    # given: a member of Roll 10 (a cap of 10% of 1,000), all 1,000 unspent, whose row names
    # Mini's price (200 credits: a cap of 20 of them); for "downgrade", they then moved
    # down to Mini from the next period, so Stripe's item is at Mini's price already and
    # no sync can tell Roll 10's price from it
    org, stripe_sub, mini = moved_up_from_mini_by_an_old_worker()
    if renewed_at == "price_mini":
        [item] = stripe_sub["items"]["data"]
        stripe_sub = stripe_sub | {"items": {"data": [item | {"price": {"id": "price_mini"}}]}}
        subscription_sync(stripe_sub=stripe_sub)
        sub = Subscription.objects.get(organization=org)
        assert (sub.plan.code, sub.scheduled_plan, sub.price) == ("roll-10", mini.plan, mini)

    # when: the period renews
    roll(stripe_sub)

    # then: the period that ended is capped at 10% of Roll 10's 1,000 credits, which it
    # was paid for (100 left, 900 expired), not of Mini's 200 (20 left)
    assert organization_balance(organization=org).available == credits(100)
    assert Subscription.objects.get(organization=org).price.stripe_price_id == renewed_at


def test_changed_credits_alone_make_a_new_price(stripe_standin):
    # given: the catalog synced; then Pro gives 15,000 credits a month for the same $99
    catalog_seed_defaults()
    catalog_sync()
    old = StripePrice.objects.get(lookup_key="gym_plan_pro", current=True)
    Plan.objects.filter(code="pro").update(monthly_credits=15_000 * MICRO)

    # when
    report = catalog_sync()

    # then: a new $99 price sells the 15,000; members at the old one keep its 12,000
    assert report.created == ["gym_plan_pro"] and report.deactivated == [old.stripe_price_id]
    new = StripePrice.objects.get(lookup_key="gym_plan_pro", current=True)
    assert (new.unit_amount, new.credits) == (9_900, 15_000 * MICRO)
    old.refresh_from_db()
    assert (old.current, old.credits) == (False, 12_000 * MICRO)
    # and a sync with nothing changed makes nothing
    assert catalog_sync().created == []


def test_a_pack_checkout_opened_before_a_change_is_granted_what_its_price_bought(
    customer, catalog, stripe_standin, deliver
):
    # given: a checkout opened for Boost 1k ($12.00, 1,000 credits); then finance make it
    # $15.00 for 1,500 and sync the catalog
    org = customer.organization
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    assert response.status_code == 200, response.content
    CreditPack.objects.filter(code="boost-1k").update(price=1_500, credits=1_500 * MICRO)
    catalog_sync()

    # when: the checkout is paid, at the price it was opened at
    stripe_standin.pay_checkout(response.json()["session_id"])
    assert "failed" not in deliver()

    # then: $12.00 bought the 1,000 credits it was sold for
    [lot] = CreditLot.objects.filter(organization=org, source="pack")
    assert (lot.amount, lot.revenue) == (1_000 * MICRO, 1_200)
    assert CheckoutSession.objects.get(organization=org).credits == 1_000 * MICRO

    # when: the pack changes again, and the payment's event is replayed
    CreditPack.objects.filter(code="boost-1k").update(credits=2_000 * MICRO)
    completed = StripeEvent.objects.get(type="checkout.session.completed")
    assert stripe_event_process(event_pk=completed.pk, force=True) == "processed"

    # then: the same grant, once
    assert list(CreditLot.objects.filter(organization=org, source="pack")) == [lot]


def _open_pack_checkout(customer, pack: str = "boost-1k") -> CheckoutSession:
    response = customer.client.post("/api/v1/billing/checkout", {"pack": pack}, format="json")
    assert response.status_code == 200, response.content
    return CheckoutSession.objects.get(stripe_session_id=response.json()["session_id"])


def _deliver_again(checkout: CheckoutSession) -> list[str]:
    """The session's completion again, as Stripe sends it: the same event twice (stored
    once), then processed again (a retry), and another event of the same session."""
    completed = StripeEvent.objects.get(
        type="checkout.session.completed", object_id=checkout.stripe_session_id
    )
    again, created = stripe_event_record(
        event=WebhookEvent(
            id=completed.stripe_event_id,
            type=completed.type,
            created=int(completed.stripe_created_at.timestamp()),
            livemode=False,
            api_version=API_VERSION,
            object_type="checkout.session",
            object_id=checkout.stripe_session_id,
            payload=completed.payload,
        )
    )
    assert (again.pk, created) == (completed.pk, False)
    other, _ = stripe_event_record(
        event=WebhookEvent(
            id=f"{completed.stripe_event_id}_other",
            type="checkout.session.async_payment_succeeded",
            created=int(completed.stripe_created_at.timestamp()),
            livemode=False,
            api_version=API_VERSION,
            object_type="checkout.session",
            object_id=checkout.stripe_session_id,
            payload={**completed.payload, "id": f"{completed.stripe_event_id}_other"},
        )
    )
    return [
        stripe_event_process(event_pk=completed.pk, force=True),
        stripe_event_process(event_pk=other.pk),
    ]


def test_a_pack_checkout_is_granted_the_credits_recorded_when_it_was_opened(
    customer, catalog, stripe_standin, deliver
):
    # given: a checkout opened for Boost 1k ($12.00 for 1,000 credits)
    org = customer.organization
    checkout = _open_pack_checkout(customer)
    price = StripePrice.objects.get(lookup_key="gym_pack_boost-1k", current=True)
    assert (checkout.price, checkout.credits) == (price, 1_000 * MICRO)

    # when: staff change what that very price and the pack give before it is paid
    StripePrice.objects.filter(pk=price.pk).update(credits=1_500 * MICRO)
    CreditPack.objects.filter(code="boost-1k").update(credits=2_000 * MICRO)
    stripe_standin.pay_checkout(checkout.stripe_session_id)
    assert "failed" not in deliver()

    # then: it is granted the 1,000 credits it was opened at
    [lot] = CreditLot.objects.filter(organization=org, source="pack")
    assert (lot.amount, lot.revenue) == (1_000 * MICRO, 1_200)

    # when: its completion comes again, twice stored once, retried, and by another event
    assert _deliver_again(checkout) == ["processed", "processed"]

    # then: the same grant, once
    assert list(CreditLot.objects.filter(organization=org, source="pack")) == [lot]
    assert organization_balance(organization=org).available == 1_000 * MICRO


def test_a_pack_checkout_opened_before_credits_were_recorded_reads_its_price_at_stripe(
    customer, catalog, stripe_standin, deliver
):
    # given: a checkout for Boost 1k left as code before this release opened it (no price,
    # no credits on the row); then finance make the pack $15.00 for 1,500 and sync
    org = customer.organization
    checkout = _open_pack_checkout(customer)
    opened_at = checkout.price
    CheckoutSession.objects.filter(pk=checkout.pk).update(price=None, credits=None)
    CreditPack.objects.filter(code="boost-1k").update(price=1_500, credits=1_500 * MICRO)
    catalog_sync()

    # when: it is paid, and its completion comes again
    stripe_standin.pay_checkout(checkout.stripe_session_id)
    assert "failed" not in deliver()
    assert _deliver_again(checkout) == ["processed", "processed"]

    # then: granted once the 1,000 credits of the price its line item names at Stripe,
    # which the row now records
    [lot] = CreditLot.objects.filter(organization=org, source="pack")
    assert (lot.amount, lot.revenue) == (1_000 * MICRO, 1_200)
    checkout.refresh_from_db()
    assert (checkout.price, checkout.credits) == (opened_at, 1_000 * MICRO)


def test_prices_made_before_credits_were_recorded_read_their_plan_s_and_pack_s(
    transactional_db, stripe_standin, migrated_back_and_forth
):
    # given: the catalog synced
    catalog_seed_defaults()
    catalog_sync()

    # when: it is migrated back to before them, and forward again
    migrated_back_and_forth([("gymbilling", "0031_invoice_total")])

    # then: plan and pack prices buy their plan's and pack's credits; overage prices none
    for price in StripePrice.objects.select_related("plan", "pack"):
        expected = {
            "plan": price.plan and price.plan.monthly_credits,
            "pack": price.pack and price.pack.credits,
            "overage": None,
        }[price.kind]
        assert price.credits == expected, price.lookup_key
    assert StripePrice.objects.filter(credits__isnull=False).count() == 6
