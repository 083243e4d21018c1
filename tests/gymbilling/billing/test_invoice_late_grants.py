"""A paid subscription invoice is granted once, however late its event is processed."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from gymbilling.models import BillingCustomer, Plan, StripePrice, Subscription
from gymbilling.reconcile import paid_invoices_without_grant
from gymbilling.services.invoices import LATE_PAYMENT_VALIDITY, invoice_sync
from metering.models import MICRO, CreditLot
from metering.reconcile import ledger_reconcile
from metering.selectors import organization_balance
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


def member() -> tuple[Subscription, StripePrice]:
    """A member whose subscription is in its current period, with no grant yet."""
    plan = Plan.objects.create(
        code="late", name="Late", monthly_price=1_000, monthly_credits=1000 * MICRO
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
