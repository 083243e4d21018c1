"""The rollover cap of a canceled subscription's last period (subscriptions.
subscription_last_period_cap): no renewal comes to cap it, so the cancellation's
sync does once the period is over, or the minute's sweep does when it ends.

Stripe is the local stand-in over HTTP; the subscription objects are built as
Stripe shows them (conftest.rollover_member), as the webhook's re-read hands
them to subscription_sync.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from gymbilling.models import Plan, StripePrice, Subscription
from gymbilling.services import subscription_sync, subscriptions_last_period_cap
from metering.models import CreditLot
from metering.selectors import organization_balance
from metering.services import credits_expire
from tests.gymbilling.market.conftest import rollover_member, stripe_period, subscription_credits
from tests.helpers import credits, system_balance

pytestmark = pytest.mark.django_db

SECOND = timedelta(seconds=1)


def period_end(stripe_sub: dict) -> datetime:
    [item] = stripe_sub["items"]["data"]
    return datetime.fromtimestamp(item["current_period_end"], tz=UTC)


def canceled(stripe_sub: dict, *, at: datetime) -> dict:
    """The subscription as Stripe shows it once it ended at `at` (its period unchanged)."""
    return stripe_sub | {
        "status": "canceled",
        "canceled_at": int(at.timestamp()),
        "ended_at": int(at.timestamp()),
    }


def test_a_subscription_canceled_at_period_end_keeps_only_the_rollover_cap(market_stripe):
    # given: a member of a plan of 1,000 credits a month that rolls 10% over (cap 100),
    # a day before the period ends, all 1,000 unspent, who cancels at period end
    org, stripe_sub, lot = rollover_member()
    stripe_sub = stripe_sub | {"cancel_at_period_end": True}
    subscription_sync(stripe_sub=stripe_sub)
    assert organization_balance(organization=org).available == credits(1000)
    expiry_before = system_balance("expiry")
    end = period_end(stripe_sub)

    # when: the period ends: Stripe ends the subscription, its deletion is processed,
    # and the period boundary's sweep runs
    subscription_sync(stripe_sub=canceled(stripe_sub, at=end), now=end + SECOND)
    subscriptions_last_period_cap(now=end + SECOND)

    # then: the member keeps the cap, as a renewal would have left them, no more
    assert organization_balance(organization=org).available == credits(100)
    assert system_balance("expiry") - expiry_before == credits(900)
    assert Subscription.objects.get(organization=org).last_period_capped_at == end + SECOND
    # and the 100 keep their expiry, a period past the one that ended, then expire
    [left] = CreditLot.objects.filter(organization=org, account__kind="wallet", remaining__gt=0)
    assert left.expires_at == lot.expires_at
    credits_expire(now=lot.expires_at + SECOND)
    assert organization_balance(organization=org).total == 0


def test_the_last_period_s_cap_is_a_share_of_the_credits_its_price_sold(market_stripe):
    # given: the same member, whose price sold 1,000 credits a month; then finance make the
    # plan give 2,000 (a new price, for new purchases), and the member cancels at once
    org, stripe_sub, _ = rollover_member()
    StripePrice.objects.filter(stripe_price_id="price_roll_10").update(credits=credits(1000))
    Plan.objects.filter(code="roll-10").update(monthly_credits=credits(2000))
    subscription_sync(stripe_sub=canceled(stripe_sub, at=timezone.now()))

    # when: the period boundary's sweep runs once the period has ended
    expired = subscriptions_last_period_cap(now=period_end(stripe_sub) + SECOND)

    # then: the cap is 10% of the 1,000 their price sold, not of the plan's 2,000 now
    assert expired == credits(900)
    assert organization_balance(organization=org).available == credits(100)


def test_a_subscription_canceled_at_once_is_capped_when_its_period_ends(market_stripe):
    # given: the same member cancels at once, a day before the period ends
    org, stripe_sub, _ = rollover_member()
    subscription_sync(stripe_sub=canceled(stripe_sub, at=timezone.now()))
    end = period_end(stripe_sub)

    # then: they keep the period they paid for until it ends
    assert subscriptions_last_period_cap() == 0
    assert organization_balance(organization=org).available == credits(1000)

    # when: the period boundary's sweep runs once the period has ended (twice)
    expired = subscriptions_last_period_cap(now=end + SECOND)
    again = subscriptions_last_period_cap(now=end + 2 * SECOND)

    # then: 900 expired, once; the cap is left
    assert (expired, again) == (credits(900), 0)
    assert organization_balance(organization=org).available == credits(100)


def test_a_re_subscription_s_credits_are_not_capped_by_the_canceled_one(market_stripe):
    # given: a member who canceled at once and subscribed again before the old period
    # ended: 1,000 credits of each
    org, stripe_sub, _ = rollover_member()
    subscription_sync(stripe_sub=canceled(stripe_sub, at=timezone.now()))
    renewed = stripe_period(stripe_sub | {"id": f"sub_again_{org.pk}"}, timezone.now())
    subscription_sync(stripe_sub=renewed)
    subscription_credits(org, credits(1000), days=61)

    # when: the old period ends and the sweep runs
    expired = subscriptions_last_period_cap(now=period_end(stripe_sub) + SECOND)

    # then: nothing expired: the live subscription's renewal caps them all
    assert expired == 0
    assert organization_balance(organization=org).available == credits(2000)
