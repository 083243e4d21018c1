"""The whole subscription lifecycle against the Stripe stand-in, over HTTP, with
signed webhooks delivered to the running app and processed by a real worker:
subscribe -> credits -> renew -> upgrade -> failed payment -> grace ->
suspension -> payment -> reactivation -> cancel."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from accounts.models import Organization, Standing
from gymbilling.models import Invoice, Plan, StripeEvent, Subscription
from gymbilling.reconcile import stripe_reconcile
from gymbilling.services import subscriptions_suspend_overdue
from metering.models import MICRO, CreditLot, JournalTransaction
from tests.helpers import wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def subscription_credits(org) -> int:
    """Unexpired subscription credits in the wallet (lots hold the truth)."""
    lots = CreditLot.objects.filter(
        organization=org, source="subscription", account__kind="wallet", remaining__gt=0
    )
    return sum(lot.remaining for lot in lots)


def invoice_grants(org) -> list[JournalTransaction]:
    return list(
        JournalTransaction.objects.filter(
            organization=org, idempotency_key__startswith="grant:invoice:"
        ).order_by("pk")
    )


def webhooks_settled(stripe_standin) -> None:
    """Wait until the stand-in delivered every event it made and the worker processed each.

    Before a step the test runs itself (with a simulated clock): a late event
    processed afterwards would re-derive the organization's standing from
    the real clock (for instance past due, still in its grace period) and
    overwrite what the step set.
    """

    def settled() -> bool:
        events = stripe_standin.events()
        delivered = all(
            status != "pending" for event in events for status in event["deliveries"].values()
        )
        ids = [event["id"] for event in events if "delivered" in event["deliveries"].values()]
        stored = StripeEvent.objects.filter(stripe_event_id__in=ids)
        return (
            delivered
            and stored.count() == len(ids)
            and not stored.filter(status__in=["pending", "processing"]).exists()
        )

    wait_until(settled, what="every webhook delivered and processed")


def paid_invoice(stripe_sdk, invoice_id):
    return wait_until(
        lambda: (
            Invoice.objects.filter(stripe_invoice_id=invoice_id, status="paid").first()
            and JournalTransaction.objects.filter(
                idempotency_key=f"grant:invoice:{invoice_id}"
            ).first()
        ),
        what=f"the grant of invoice {invoice_id}",
    )


def test_subscription_lifecycle(billing_live, customer, stripe_standin, stripe_sdk):
    org = customer.organization
    pro = Plan.objects.get(code="pro")
    enterprise = Plan.objects.get(code="enterprise")

    # given: a customer subscribes to Pro through Checkout and pays with a good card
    response = customer.client.post("/api/v1/billing/checkout", {"plan": "pro"}, format="json")
    assert response.status_code == 200, response.content
    assert response.json()["kind"] == "checkout"
    session_id = response.json()["session_id"]
    assert response.json()["url"].startswith(stripe_standin.api_base)
    session = stripe_standin.pay_checkout(session_id)

    # then: the first invoice's webhook grants a month of Pro credits, once
    sub = wait_until(
        lambda: Subscription.objects.filter(organization=org, status="active").first(),
        what="the active subscription",
    )
    first_invoice = stripe_sdk.v1.invoices.list(
        params={"subscription": sub.stripe_subscription_id}
    ).data[0]
    paid_invoice(stripe_sdk, first_invoice.id)
    assert subscription_credits(org) == 12_000 * MICRO
    org.refresh_from_db()
    assert org.model_tiers == ["basic", "pro"] and org.max_priority == "priority"
    assert org.requests_per_minute == pro.requests_per_minute
    overage = CreditLot.objects.get(organization=org, source="overage")
    assert overage.amount == pro.fair_use_ceiling and overage.paid is False
    body = customer.client.get("/api/v1/billing/subscription").json()
    assert body["subscription"]["plan"] == "pro" and body["entitlements"]["standing"] == "active"
    assert session["status"] == "complete"

    # when: the period ends and renews (12,000 left unspent; Pro rolls over 25%)
    renewal = stripe_standin.advance(sub.stripe_subscription_id)
    renewal_invoice = renewal["latest_invoice"]
    renewal_invoice = (
        renewal_invoice["id"] if isinstance(renewal_invoice, dict) else renewal_invoice
    )
    paid_invoice(stripe_sdk, renewal_invoice)

    # then: 3,000 roll over, 9,000 expire, a new month arrives
    wait_until(lambda: subscription_credits(org) == 15_000 * MICRO, what="rollover + renewal")
    assert len(invoice_grants(org)) == 2

    # when: the customer upgrades to Enterprise mid-period
    response = customer.client.post(
        "/api/v1/billing/checkout", {"plan": "enterprise"}, format="json"
    )
    assert response.status_code == 200, response.content
    assert response.json()["kind"] == "subscription_updated"

    # then: the proration invoice grants the prorated difference, and entitlements move at once
    update_invoice = wait_until(
        lambda: Invoice.objects.filter(
            organization=org, billing_reason="subscription_update", status="paid"
        ).first(),
        what="the paid proration invoice",
    )
    grant = paid_invoice(stripe_sdk, update_invoice.stripe_invoice_id)
    lines = stripe_sdk.v1.invoices.retrieve(update_invoice.stripe_invoice_id).lines.data
    sub.refresh_from_db()
    period = int((sub.current_period_end - sub.current_period_start).total_seconds())
    expected = 0
    for line in lines:
        covered = line.period.end - line.period.start
        share = (
            (enterprise.monthly_credits if line.amount > 0 else pro.monthly_credits)
            * covered
            // period
        )
        expected += share if line.amount > 0 else -share
    assert expected > 0
    assert grant.entries.get(account__kind="wallet").amount == expected
    org.refresh_from_db()
    assert "enterprise" in org.model_tiers and sub.plan_id == enterprise.pk

    # when: the next renewal fails (the card now declines off-session)
    stripe_standin.set_card(sub_customer(sub), "4000000000000341")
    failed = stripe_standin.advance(sub.stripe_subscription_id)
    failed_invoice = failed["latest_invoice"]
    failed_invoice = failed_invoice["id"] if isinstance(failed_invoice, dict) else failed_invoice

    # then: past due with a grace period; inference still runs during it
    wait_until(
        lambda: Organization.objects.get(pk=org.pk).standing == Standing.PAST_DUE, what="past due"
    )
    sub.refresh_from_db()
    assert sub.status == "past_due" and sub.grace_until > timezone.now() + timedelta(days=2)
    assert not JournalTransaction.objects.filter(
        idempotency_key=f"grant:invoice:{failed_invoice}"
    ).exists()

    # when: the grace period runs out (after the failed renewal's last event,
    # which would otherwise set "past due" again from the real clock)
    webhooks_settled(stripe_standin)
    assert subscriptions_suspend_overdue(now=sub.grace_until + timedelta(seconds=1)) == 1

    # then: inference is refused with 402 subscription_past_due, and no credits move
    org.refresh_from_db()
    assert org.standing == Standing.SUSPENDED
    chat = customer.client.post(
        "/v1/chat/completions",
        {"model": "gym-tiny", "messages": [{"role": "user", "content": "hi"}]},
        format="json",
    )
    assert chat.status_code == 402 and chat.json()["error"]["code"] == "subscription_past_due", (
        chat.content
    )

    # when: the customer fixes the card and the open invoice is paid
    stripe_standin.set_card(sub_customer(sub), "4242424242424242")
    stripe_sdk.v1.invoices.pay(failed_invoice)

    # then: reactivated, and that period's credits are granted
    paid_invoice(stripe_sdk, failed_invoice)
    wait_until(
        lambda: Organization.objects.get(pk=org.pk).standing == Standing.ACTIVE, what="reactivation"
    )
    sub.refresh_from_db()
    assert sub.status == "active" and sub.grace_until is None

    # when: the customer cancels at period end (as the portal does), and the period ends
    stripe_sdk.v1.subscriptions.update(
        sub.stripe_subscription_id, params={"cancel_at_period_end": True}
    )
    wait_until(
        lambda: Subscription.objects.get(pk=sub.pk).cancel_at_period_end,
        what="cancel_at_period_end",
    )
    grants_before = len(invoice_grants(org))
    stripe_standin.advance(sub.stripe_subscription_id)

    # then: canceled, back to the defaults, and no more grants
    wait_until(
        lambda: Subscription.objects.get(pk=sub.pk).status == "canceled", what="cancellation"
    )
    org.refresh_from_db()
    assert org.model_tiers == [] and org.standing == Standing.ACTIVE
    assert len(invoice_grants(org)) == grants_before
    assert not StripeEvent.objects.filter(status="failed").exists()
    report = stripe_reconcile()
    assert report.ok, report.mismatches
    assert report.checked == len(invoice_grants(org))


def sub_customer(sub: Subscription) -> str:
    return sub.organization.billing_customer.stripe_customer_id
