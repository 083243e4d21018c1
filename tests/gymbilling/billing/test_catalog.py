"""stripe_sync_catalog: plans and packs become Stripe products and prices, idempotently."""

from __future__ import annotations

import io
import logging
import uuid

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from gymbilling import stripe_client
from gymbilling.models import Plan, StripePrice
from gymbilling.services import catalog_sync
from gymbilling.services.catalog import catalog_seed_defaults

pytestmark = pytest.mark.django_db


def test_sync_twice_creates_nothing_the_second_time(stripe_standin, stripe_sdk):
    # given
    catalog_seed_defaults()
    out = io.StringIO()
    call_command("stripe_sync_catalog", stdout=out)
    prices = set(StripePrice.objects.values_list("stripe_price_id", flat=True))

    # when
    report = catalog_sync()

    # then: every price already matched
    assert report.created == [] and report.deactivated == []
    assert set(StripePrice.objects.values_list("stripe_price_id", flat=True)) == prices
    # 4 plans + 3 overage prices + 2 packs
    assert len(prices) == 9
    pro = stripe_sdk.v1.prices.list(params={"lookup_keys": ["gym_plan_pro"]}).data
    assert [(p.unit_amount, p.currency, p.recurring.interval) for p in pro] == [
        (9_900, "usd", "month")
    ]
    overage = stripe_sdk.v1.prices.list(params={"lookup_keys": ["gym_plan_pro_overage"]}).data[0]
    assert overage.recurring.usage_type == "metered" and str(overage.unit_amount_decimal) == "0.9"


def test_overage_prices_record_their_meter_read_from_stripe_where_made_before(
    stripe_standin, stripe_sdk
):
    # given: synced; then the overage prices are as a release before StripePrice.meter
    # left them, their meter not recorded
    catalog_seed_defaults()
    catalog_sync()
    overage = StripePrice.objects.filter(kind="overage")
    meters = {price.pk: price.meter for price in overage}
    assert all(meters.values())
    assert all(
        stripe_sdk.v1.prices.retrieve(price.stripe_price_id).recurring.meter == price.meter
        for price in overage
    )
    assert not StripePrice.objects.exclude(kind="overage").exclude(meter="").exists()
    overage.update(meter="")

    # when: the catalog is synced again
    report = catalog_sync()

    # then: each one's meter is read from Stripe, the same as the sync's: nothing is made
    assert report.created == [] and report.deactivated == []
    assert {price.pk: price.meter for price in overage} == meters


def test_a_current_price_whose_meter_is_not_found_is_kept_not_archived_by_its_own_sync(
    stripe_standin, stripe_sdk, caplog
):
    # given: a plan with overage synced today, its prices made by this sync's own requests
    # (Stripe keeps the idempotency keys they were made under for a day); its overage
    # price is as a release before StripePrice.meter left it, and staff moved its lookup
    # key to a price of their own in the dashboard, so Stripe no longer lists it under it
    catalog_seed_defaults()
    code = f"pro-{uuid.uuid4().hex[:8]}"
    Plan.objects.filter(code="pro").update(code=code)
    catalog_sync()
    lookup_key = f"gym_plan_{code}_overage"
    overage = StripePrice.objects.get(lookup_key=lookup_key, current=True)
    meter = overage.meter
    StripePrice.objects.filter(pk=overage.pk).update(meter="")
    theirs = stripe_sdk.v1.prices.create(
        params={
            "product": f"gym_plan_{code}",
            "currency": "usd",
            "unit_amount": 1_500,
            "recurring": {"interval": "month"},
            "lookup_key": lookup_key,
            "transfer_lookup_key": True,
        }
    )

    # when: the catalog is synced again
    with caplog.at_level(logging.WARNING, logger="gymbilling.services.catalog"):
        report = catalog_sync()

    # then: Stripe's replay of the request that made the price returns that same price:
    # it stays the current one, active at Stripe (checkouts and renewals can put items on
    # it), its meter recorded; nothing made, nothing archived, staff told
    at_stripe = stripe_sdk.v1.prices.retrieve(overage.stripe_price_id)
    assert at_stripe.active is True and at_stripe.recurring.meter == meter
    overage.refresh_from_db()
    assert overage.current and overage.meter == meter
    assert report.created == [] and report.deactivated == []
    assert StripePrice.objects.filter(lookup_key=lookup_key).count() == 1
    assert stripe_sdk.v1.prices.retrieve(theirs.id).active is True
    assert overage.stripe_price_id in caplog.text
    # and a sync after it finds it as recorded: nothing more, nothing logged
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gymbilling.services.catalog"):
        assert catalog_sync().created == []
    assert caplog.text == ""


def test_a_new_price_takes_over_and_the_old_one_still_names_its_plan(stripe_standin, stripe_sdk):
    # given: synced, then staff raise Pro's price
    catalog_seed_defaults()
    catalog_sync()
    old = StripePrice.objects.get(lookup_key="gym_plan_pro", current=True)
    Plan.objects.filter(code="pro").update(monthly_price=10_900)

    # when
    report = catalog_sync()

    # then
    assert report.created == ["gym_plan_pro"] and report.deactivated == [old.stripe_price_id]
    new = StripePrice.objects.get(lookup_key="gym_plan_pro", current=True)
    assert new.unit_amount == 10_900 and new.plan.code == "pro"
    old.refresh_from_db()
    assert old.current is False and old.plan.code == "pro"
    assert stripe_sdk.v1.prices.retrieve(old.stripe_price_id).active is False
    looked_up = stripe_sdk.v1.prices.list(params={"lookup_keys": ["gym_plan_pro"]}).data
    assert [p.id for p in looked_up] == [new.stripe_price_id]


def test_a_price_that_goes_back_the_same_day_is_a_new_active_price(stripe_standin, stripe_sdk):
    # given: a plan synced today at $99, then raised to $109 and synced (the $99 price is
    # archived at Stripe); Stripe still keeps the idempotency keys they were made under
    catalog_seed_defaults()
    code = f"pro-{uuid.uuid4().hex[:8]}"
    Plan.objects.filter(code="pro").update(code=code)
    catalog_sync()
    first = StripePrice.objects.get(lookup_key=f"gym_plan_{code}", current=True)
    Plan.objects.filter(code=code).update(monthly_price=10_900)
    catalog_sync()

    # when: finance put it back to $99, and the catalog is synced
    Plan.objects.filter(code=code).update(monthly_price=9_900)
    report = catalog_sync()

    # then: the current $99 price is one Stripe sells (active, under the lookup key), not
    # the archived first one, which Stripe's replay of the same request names again (its
    # answer as first given: "active")
    assert report.created == [f"gym_plan_{code}"]
    current = StripePrice.objects.get(lookup_key=f"gym_plan_{code}", current=True)
    assert current.unit_amount == 9_900 and current.stripe_price_id != first.stripe_price_id
    assert stripe_sdk.v1.prices.retrieve(current.stripe_price_id).active is True
    looked_up = stripe_sdk.v1.prices.list(params={"lookup_keys": [f"gym_plan_{code}"]}).data
    assert [p.id for p in looked_up] == [current.stripe_price_id]
    first.refresh_from_db()
    assert not first.current


def test_the_command_says_what_is_missing():
    with (
        override_settings(STRIPE_SECRET_KEY=""),
        pytest.raises(CommandError, match="STRIPE_SECRET_KEY"),
    ):
        call_command("stripe_sync_catalog")
    with override_settings(
        STRIPE_SECRET_KEY="sk_test_x",
        STRIPE_API_BASE="http://127.0.0.1:9",
        STRIPE_MAX_NETWORK_RETRIES=0,
    ):
        catalog_seed_defaults()
        with pytest.raises(CommandError, match="unreachable"):
            call_command("stripe_sync_catalog")


def test_the_overage_meter_past_stripes_first_page_is_found_not_made_again(
    stripe_standin, stripe_sdk
):
    # given: the overage meter, made more than a day ago (Stripe has forgotten the
    # idempotency key it was made under), then 100 meters more on the account: Stripe lists
    # meters newest first, 100 a page, so the overage meter is on the second page
    event_name = f"gym_overage_{uuid.uuid4().hex[:10]}"
    made = stripe_client.meter_ensure(event_name=event_name, display_name="Overage credits")
    for n in range(100):
        stripe_sdk.v1.billing.meters.create(
            params={
                "display_name": f"Other {n}",
                "event_name": f"other_{uuid.uuid4().hex[:10]}",
                "default_aggregation": {"formula": "sum"},
            }
        )
    stripe_standin.expire_idempotency_keys()
    first_page = stripe_sdk.v1.billing.meters.list(params={"limit": 100})
    assert first_page.has_more and made["id"] not in {m.id for m in first_page.data}

    # when: the catalog sync ensures the meter again
    found = stripe_client.meter_ensure(event_name=event_name, display_name="Overage credits")

    # then: the meter already there is returned, and no second one was made for its events
    assert found["id"] == made["id"]
    same_events = [
        m.id
        for m in stripe_sdk.v1.billing.meters.list(params={"limit": 100}).auto_paging_iter()
        if m.event_name == event_name
    ]
    assert same_events == [made["id"]]


def _meter_params(event_name: str) -> dict:
    return {
        "display_name": "Overage credits",
        "event_name": event_name,
        "default_aggregation": {"formula": "sum"},
    }


def _meters_for(stripe_sdk, event_name: str) -> dict[str, str]:
    return {
        m.id: m.status
        for m in stripe_sdk.v1.billing.meters.list(params={"limit": 100}).auto_paging_iter()
        if m.event_name == event_name
    }


def test_the_active_overage_meter_is_taken_over_a_newer_deactivated_one(stripe_sdk):
    # given: a meter for the overage events that was deactivated, then the active one made
    # since, then a newer meter for the same events made and deactivated too (Stripe lists
    # newest first, so a deactivated meter comes first)
    event_name = f"gym_overage_{uuid.uuid4().hex[:10]}"
    active = stripe_sdk.v1.billing.meters.create(params=_meter_params(event_name))
    stripe_sdk.v1.billing.meters.deactivate(active.id)
    newer = stripe_sdk.v1.billing.meters.create(params=_meter_params(event_name))
    stripe_sdk.v1.billing.meters.deactivate(newer.id)
    stripe_sdk.v1.billing.meters.reactivate(active.id)

    # when: the catalog sync ensures the meter
    found = stripe_client.meter_ensure(event_name=event_name, display_name="Overage credits")

    # then: the active meter is the one overage is reported to; the other stays deactivated
    assert found["id"] == active.id and found["status"] == "active"
    assert _meters_for(stripe_sdk, event_name) == {active.id: "active", newer.id: "inactive"}


def test_a_deactivated_overage_meter_is_reactivated_not_made_again(stripe_standin, stripe_sdk):
    # given: the overage meter, deactivated by hand in the dashboard more than a day after
    # it was made (Stripe has forgotten its creation's idempotency key)
    event_name = f"gym_overage_{uuid.uuid4().hex[:10]}"
    made = stripe_client.meter_ensure(event_name=event_name, display_name="Overage credits")
    stripe_sdk.v1.billing.meters.deactivate(made["id"])
    stripe_standin.expire_idempotency_keys()

    # when: the catalog sync ensures the meter again
    found = stripe_client.meter_ensure(event_name=event_name, display_name="Overage credits")

    # then: the same meter is active again, no second one was made, and it takes events
    assert found["id"] == made["id"] and found["status"] == "active"
    assert found["status_transitions"]["deactivated_at"] is None
    assert _meters_for(stripe_sdk, event_name) == {made["id"]: "active"}
    buyer = stripe_sdk.v1.customers.create(params={"name": "Lifting Club"})
    identifier = f"overage-{uuid.uuid4().hex}"
    stripe_client.meter_event_create(
        event_name=event_name,
        customer=buyer.id,
        value=5,
        identifier=identifier,
        timestamp=made["created"],
        key=f"{identifier}:1",
    )
    assert [(e["meter"], e["value"]) for e in stripe_standin.meter_events(buyer.id)] == [
        (made["id"], "5")
    ]
