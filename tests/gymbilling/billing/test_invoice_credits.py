"""What a paid subscription invoice's lines buy, and until when (invoices.invoice_credits),
and which of its payments paid it (invoices.invoice_payment_intent_id).

Invoices here are Stripe's documented object (the `invoice.paid` event's, API version
2025-03-31 and later), built by hand: the stand-in starts every period at the wall
clock, so it cannot make a change late in a period, and pays an invoice with one
PaymentIntent, so it cannot list a canceled payment before the one that paid.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from gymbilling.models import BillingCustomer, StripePrice, Subscription
from gymbilling.services.invoices import invoice_sync
from metering.models import MICRO, CreditLot
from tests.factories import OrganizationFactory
from tests.gymbilling.market.conftest import plan_priced

pytestmark = pytest.mark.django_db


def _plan(code: str, *, monthly_price: int, rollover_percent: int) -> StripePrice:
    return plan_priced(
        code,
        amount=monthly_price,
        credits_=monthly_price * MICRO,
        rollover_percent=rollover_percent,
    )


def _proration(price: StripePrice, *, amount: int, start, end) -> dict:
    return {
        "amount": amount,
        "quantity": 1,
        "period": {"start": int(start.timestamp()), "end": int(end.timestamp())},
        "pricing": {"price_details": {"price": price.stripe_price_id}},
        "parent": {"subscription_item_details": {"proration": True}},
    }


def test_an_upgrade_late_in_the_period_rolls_over_for_a_full_period():
    # given: a member on Small (no rollover) on day 28 of a 30-day period, upgrading to
    # Large, which rolls a quarter of a month over
    small = _plan("small", monthly_price=1_000, rollover_percent=0)
    large = _plan("large", monthly_price=3_000, rollover_percent=25)
    org = OrganizationFactory()
    BillingCustomer.objects.create(organization=org, stripe_customer_id=f"cus_up_{org.pk}")
    now = timezone.now().replace(microsecond=0)
    period_start, period_end = now - timedelta(days=28), now + timedelta(days=2)
    sub = Subscription.objects.create(
        organization=org,
        stripe_subscription_id=f"sub_up_{org.pk}",
        plan=large.plan,
        seats=1,
        status="active",
        current_period_start=period_start,
        current_period_end=period_end,
    )
    upgrade = {
        "id": f"in_up_{org.pk}",
        "customer": f"cus_up_{org.pk}",
        "status": "paid",
        "currency": "usd",
        "billing_reason": "subscription_update",
        "amount_paid": 133,
        "created": int(now.timestamp()),
        "status_transitions": {"paid_at": int(now.timestamp())},
        "lines": {
            "data": [
                _proration(small, amount=-67, start=now, end=period_end),
                _proration(large, amount=200, start=now, end=period_end),
            ]
        },
    }

    # when: its paid invoice is processed
    invoice_sync(invoice=upgrade, subscription=sub)

    # then: the prorated difference, lasting a whole period past this one, as the
    # period's own credits do (not the 2 days the proration covers)
    lot = CreditLot.objects.get(organization=org, source="subscription")
    assert lot.amount == 3_000 * MICRO * 2 // 30 - 1_000 * MICRO * 2 // 30
    assert lot.expires_at == period_end + (period_end - period_start)


def _payment(intent: str, status: str) -> dict:
    return {
        "id": f"inpay_{intent}",
        "object": "invoice_payment",
        "amount_paid": 9_900 if status == "paid" else 0,
        "amount_requested": 9_900,
        "currency": "usd",
        "is_default": status == "paid",
        "status": status,
        "payment": {"type": "payment_intent", "payment_intent": intent},
    }


def test_an_invoice_is_traced_to_the_payment_that_paid_it_not_the_first_listed():
    # given: a paid invoice whose payments list a canceled attempt before the paid one
    org = OrganizationFactory()
    BillingCustomer.objects.create(organization=org, stripe_customer_id=f"cus_pay_{org.pk}")
    now = int(timezone.now().timestamp())
    invoice = {
        "id": f"in_pay_{org.pk}",
        "customer": f"cus_pay_{org.pk}",
        "status": "paid",
        "currency": "usd",
        "billing_reason": "manual",
        "amount_paid": 9_900,
        "created": now,
        "status_transitions": {"paid_at": now},
        "lines": {"data": []},
        "payments": {
            "object": "list",
            "data": [_payment("pi_canceled", "canceled"), _payment("pi_paid", "paid")],
        },
    }

    # when: it is mirrored
    row = invoice_sync(invoice=invoice, subscription=None)

    # then: it names the PaymentIntent that paid it, which its refunds will name
    assert row.stripe_payment_intent_id == "pi_paid"
