"""A paid subscription invoice is granted once, however late its event is processed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from gymbilling.models import BillingCustomer, Plan, StripePrice, Subscription
from gymbilling.reconcile import paid_invoices_without_grant
from gymbilling.services import subscriptions_last_period_cap
from gymbilling.services.invoices import LATE_PAYMENT_VALIDITY, invoice_sync
from metering.models import MICRO, CreditLot
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from metering.services import credits_expire
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


def member(*, rollover_percent: int = 0) -> tuple[Subscription, StripePrice]:
    """A member whose subscription is in its current period, with no grant yet."""
    plan = Plan.objects.create(
        code="late",
        name="Late",
        monthly_price=1_000,
        monthly_credits=1000 * MICRO,
        rollover_percent=rollover_percent,
    )
    price = StripePrice.objects.create(
        stripe_price_id="price_late",
        kind="plan",
        plan=plan,
        unit_amount=1_000,
        currency="usd",
        lookup_key="late",
    )
    org = OrganizationFactory()
    BillingCustomer.objects.create(organization=org, stripe_customer_id=f"cus_late_{org.pk}")
    now = timezone.now()
    sub = Subscription.objects.create(
        organization=org,
        stripe_subscription_id=f"sub_late_{org.pk}",
        plan=plan,
        seats=1,
        status="active",
        current_period_start=now - timedelta(days=10),
        current_period_end=now + timedelta(days=20),
    )
    return sub, price


def renewal(sub: Subscription, price: StripePrice, *, paid_days_ago: int, ended_days_ago: int):
    """A paid renewal invoice for the period that ended `ended_days_ago`."""
    now = timezone.now()
    return {
        "id": f"in_late_{paid_days_ago}",
        "customer": f"cus_late_{sub.organization_id}",
        "status": "paid",
        "currency": "usd",
        "billing_reason": "subscription_cycle",
        "amount_paid": 1000,
        "created": int((now - timedelta(days=paid_days_ago + 1)).timestamp()),
        "status_transitions": {"paid_at": int((now - timedelta(days=paid_days_ago)).timestamp())},
        "lines": {
            "data": [
                {
                    "price": {"id": price.stripe_price_id},
                    "quantity": 1,
                    "amount": 1000,
                    "period": {
                        "start": int((now - timedelta(days=ended_days_ago + 30)).timestamp()),
                        "end": int((now - timedelta(days=ended_days_ago)).timestamp()),
                    },
                }
            ]
        },
    }


def test_a_paid_invoice_processed_weeks_after_its_payment_is_granted_for_a_week_from_then():
    # given: the renewal that bought last period, paid 8 days ago; its period ended 2 days
    # ago; its event failed (a bug, an outage) and is replayed now
    sub, price = member()
    invoice = renewal(sub, price, paid_days_ago=8, ended_days_ago=2)

    # when
    before = timezone.now()
    invoice_sync(invoice=invoice, subscription=sub)
    after = timezone.now()

    # then: the member gets what they paid for, usable for a week from the grant
    lot = CreditLot.objects.get(organization=sub.organization, source="subscription")
    assert (lot.amount, lot.remaining, lot.paid) == (1000 * MICRO, 1000 * MICRO, True)
    assert before + LATE_PAYMENT_VALIDITY <= lot.expires_at <= after + LATE_PAYMENT_VALIDITY
    assert organization_balance(organization=sub.organization).available == 1000 * MICRO
    # and reconcile finds the paid invoice granted
    assert paid_invoices_without_grant() == []
    assert ledger_reconcile().ok

    # when: the event is replayed once more
    invoice_sync(invoice=invoice, subscription=sub)

    # then: still one grant
    assert CreditLot.objects.filter(organization=sub.organization).count() == 1


def test_a_paid_invoice_processed_soon_after_a_late_payment_lasts_a_week_from_it():
    # given: the renewal paid 2 days ago, 5 days after its period ended
    sub, price = member()
    invoice = renewal(sub, price, paid_days_ago=2, ended_days_ago=7)

    # when
    before = timezone.now()
    invoice_sync(invoice=invoice, subscription=sub)
    after = timezone.now()

    # then: a week from now (no less than a week from its payment)
    lot = CreditLot.objects.get(organization=sub.organization, source="subscription")
    assert before + LATE_PAYMENT_VALIDITY <= lot.expires_at <= after + LATE_PAYMENT_VALIDITY
    assert ledger_reconcile().ok


def test_a_rollover_plan_s_invoice_granted_after_its_period_renewed_lasts_a_week_not_a_period():
    # given: a plan that rolls a quarter of a month over; the renewal that bought the period
    # before this one (it ended 11 days ago: the subscription has renewed since, and that
    # renewal capped what was held then), paid on time, its event failing until now
    sub, price = member(rollover_percent=25)
    invoice = renewal(sub, price, paid_days_ago=40, ended_days_ago=11)

    # when
    before = timezone.now()
    invoice_sync(invoice=invoice, subscription=sub)
    after = timezone.now()

    # then: all of it, for a late payment's week, not to the end of the rollover period
    # (19 days on): the cap it missed would have let a quarter of it over, not all
    lot = CreditLot.objects.get(organization=sub.organization, source="subscription")
    assert lot.amount == 1000 * MICRO
    assert before + LATE_PAYMENT_VALIDITY <= lot.expires_at <= after + LATE_PAYMENT_VALIDITY
    assert paid_invoices_without_grant() == []
    assert ledger_reconcile().ok


def _subscribe_with_invoices_failing(customer, stripe_standin, deliver) -> Subscription:
    """Pro (12,000 credits a month, a quarter of it rolls over), paid through Checkout, its
    invoices' events failing (a bug, an outage) until `deliver()` without `later`."""
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    assert response.status_code == 200, response.content
    stripe_standin.pay_checkout(response.json()["session_id"])
    assert "failed" not in deliver(later=("invoice.",))
    return Subscription.objects.get(organization=customer.organization)


def _invoice_lots(organization) -> list[CreditLot]:
    return list(
        CreditLot.objects.filter(
            organization=organization,
            source="subscription",
            created_by__idempotency_key__startswith="grant:invoice:",
        ).order_by("pk")
    )


def test_an_invoice_granted_after_its_period_renewed_rolls_nothing_over(
    customer, catalog, stripe_standin, deliver
):
    # given: a member of Pro whose first invoice's events fail until its period has renewed
    # and the renewal has capped what was held then (none of it: it was not granted)
    sub = _subscribe_with_invoices_failing(customer, stripe_standin, deliver)
    first_period_end = sub.current_period_end
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver(later=("invoice.",))
    sub.refresh_from_db()
    assert sub.current_period_start == first_period_end

    # when: the invoices' events are processed at last
    assert "failed" not in deliver()

    # then: the first period's credits are granted in full, to the end of the period they
    # bought: none of them rolls over the cap that already ran
    first, renewed = _invoice_lots(customer.organization)
    assert (first.amount, first.expires_at) == (12_000 * MICRO, first_period_end)
    # and the renewal's month, granted in its period, lasts a period past it as ever
    assert renewed.amount == 12_000 * MICRO
    assert renewed.expires_at == sub.current_period_end + (
        sub.current_period_end - sub.current_period_start
    )
    assert paid_invoices_without_grant() == []


def test_an_invoice_granted_after_the_last_period_was_capped_rolls_nothing_over(
    customer, catalog, stripe_standin, stripe_sdk, deliver
):
    # given: a member of Pro who cancels at period end; the subscription ends, and the
    # minute's sweep caps its last period once over, before the invoice's events succeed
    sub = _subscribe_with_invoices_failing(customer, stripe_standin, deliver)
    stripe_sdk.v1.subscriptions.update(
        sub.stripe_subscription_id, params={"cancel_at_period_end": True}
    )
    stripe_standin.advance(sub.stripe_subscription_id)
    assert "failed" not in deliver(later=("invoice.",))
    end = Subscription.objects.get(pk=sub.pk).current_period_end
    subscriptions_last_period_cap(now=end + timedelta(seconds=1))
    assert Subscription.objects.get(pk=sub.pk).last_period_capped_at is not None

    # when: the invoice's events are processed at last
    assert "failed" not in deliver()

    # then: its credits are granted in full, to the end of the period they bought
    [lot] = _invoice_lots(customer.organization)
    assert (lot.amount, lot.expires_at) == (12_000 * MICRO, end)
    # and once that period is over, nothing of them is left past the cap that ran
    credits_expire(now=end + timedelta(seconds=1))
    lot.refresh_from_db()
    assert lot.remaining == 0
    assert paid_invoices_without_grant() == []
