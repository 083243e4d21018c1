"""An organization whose Stripe customer was deleted at Stripe: its next purchase makes it
a new customer, what Stripe still sends about the old one is still its, and its overage
that can no longer be invoiced is failed for finance instead of retried for good."""

from __future__ import annotations

import logging

import pytest
from django.test import override_settings
from django.utils import timezone

from accounts.models import AuditEvent, Organization
from gymbilling.models import (
    BillingCustomer,
    CheckoutSession,
    FormerStripeCustomer,
    OverageReport,
    Subscription,
)
from gymbilling.services import overage_report
from metering.models import MICRO, CreditLot
from tests.gymbilling.billing.test_overage_and_refunds import spend

pytestmark = pytest.mark.django_db


def customer_id(org) -> str:
    return BillingCustomer.objects.get(organization=org).stripe_customer_id


@pytest.mark.parametrize("purchase", ["pack", "plan", "portal"])
def test_a_purchase_after_the_customer_was_deleted_at_stripe_makes_a_new_customer(
    customer, catalog, stripe_standin, stripe_sdk, deliver, purchase
):
    # given: an organization with a Stripe customer, frozen for resale, deleted at Stripe
    org = customer.organization
    assert customer.client.post("/api/v1/billing/portal").status_code == 200
    old = customer_id(org)
    frozen_at = timezone.now()
    BillingCustomer.objects.filter(organization=org).update(
        resale_frozen_at=frozen_at, resale_frozen_reason="dispute du_1"
    )
    stripe_sdk.v1.customers.delete(old)

    # when: it buys a pack, subscribes, or opens the portal
    if purchase == "portal":
        response = customer.client.post("/api/v1/billing/portal")
    else:
        body = {"pack": "boost-1k"} if purchase == "pack" else {"plan": "pro"}
        response = customer.client.post("/api/v1/billing/checkout", body, format="json")

    # then: it goes through, for a new customer the row now holds (the freeze kept)
    assert response.status_code == 200, response.content
    row = BillingCustomer.objects.get(organization=org)
    new = row.stripe_customer_id
    assert new != old and BillingCustomer.objects.count() == 1
    assert (row.resale_frozen_at, row.resale_frozen_reason) == (frozen_at, "dispute du_1")
    at_stripe = stripe_sdk.v1.customers.retrieve(new).to_dict()
    assert not at_stripe.get("deleted")
    assert at_stripe["metadata"]["organization_id"] == str(org.pk)
    # and the old one is on record: the audit log and the former customers
    audit = AuditEvent.objects.get(organization=org, action="billing.customer_replaced")
    assert (audit.target, audit.data["from"], audit.data["to"]) == (new, old, new)
    former = FormerStripeCustomer.objects.get(stripe_customer_id=old)
    assert (former.organization, former.replaced_by) == (org, new)
    if purchase == "portal":
        return
    # and, paid, what was bought is granted
    stripe_standin.pay_checkout(response.json()["session_id"])
    assert "failed" not in deliver()
    if purchase == "pack":
        assert CreditLot.objects.get(organization=org, source="pack").amount == 1_000 * MICRO
    else:
        sub = Subscription.objects.get(organization=org)
        assert (sub.status, sub.stripe_customer_id) == ("active", new)
        assert CreditLot.objects.filter(organization=org, source="subscription").exists()


def test_a_customer_stripe_never_knew_is_not_replaced(customer, catalog):
    # given: an organization whose customer id Stripe does not know (404), as when the
    # key is another account's or mode's after a rotation gone wrong
    org = customer.organization
    assert customer.client.post("/api/v1/billing/portal").status_code == 200
    BillingCustomer.objects.filter(organization=org).update(stripe_customer_id="cus_elsewhere")

    # when: it buys a pack
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")

    # then: Stripe's refusal is answered, and nothing is replaced: fixing the key must
    # find every organization's customer as it was
    assert response.status_code == 502, response.content
    assert response.json()["error"]["code"] == "payment_provider_refused"
    assert customer_id(org) == "cus_elsewhere"
    assert not FormerStripeCustomer.objects.exists()
    assert not AuditEvent.objects.filter(action="billing.customer_replaced").exists()


def test_a_second_deletion_is_replaced_again(customer, catalog, stripe_standin, stripe_sdk):
    """The replacement's Stripe key names the customer it replaces: the same key again
    would be answered, for a day, with the customer deleted the second time."""
    # given: a customer deleted at Stripe, replaced, and the replacement deleted too
    org = customer.organization
    assert customer.client.post("/api/v1/billing/portal").status_code == 200
    first = customer_id(org)
    stripe_sdk.v1.customers.delete(first)
    assert customer.client.post("/api/v1/billing/portal").status_code == 200
    second = customer_id(org)
    stripe_sdk.v1.customers.delete(second)

    # when: it buys a pack
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")

    # then: a third customer, and both former ones on record
    assert response.status_code == 200, response.content
    third = customer_id(org)
    assert len({first, second, third}) == 3
    assert not stripe_sdk.v1.customers.retrieve(third).to_dict().get("deleted")
    assert sorted(
        FormerStripeCustomer.objects.filter(organization=org).values_list(
            "stripe_customer_id", "replaced_by"
        )
    ) == sorted([(first, second), (second, third)])


def test_the_deleted_customers_subscription_ending_late_still_reaches_the_organization(
    customer, subscribed, stripe_sdk, deliver
):
    # given: Pro, paid; the customer deleted at Stripe (which ends its subscription), and
    # a pack bought before those events are processed (the customer replaced)
    sub = subscribed("pro")
    org = customer.organization
    stripe_sdk.v1.customers.delete(customer_id(org))
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    assert response.status_code == 200, response.content

    # when: Stripe's events of the deletion are processed
    assert "failed" not in deliver()

    # then: the old subscription's end reached the organization: it is not left on a
    # subscription Stripe ended (Pro's entitlements for nothing)
    sub.refresh_from_db()
    assert sub.status == "canceled"
    org.refresh_from_db()
    defaults = Organization()
    assert (org.requests_per_minute, org.concurrent_jobs) == (
        defaults.requests_per_minute,
        defaults.concurrent_jobs,
    )
    assert (org.requests_per_minute, org.concurrent_jobs) != (
        sub.plan.requests_per_minute,
        sub.plan.concurrent_jobs,
    )


def test_overage_of_a_customer_deleted_at_stripe_fails_for_finance_and_is_not_retried(
    customer, subscribed, stripe_sdk, caplog
):
    # given: Pro with 10 credits of overage used, and its customer deleted at Stripe
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    old = customer_id(org)
    stripe_sdk.v1.customers.delete(old)

    # when: the report runs, then again 15 minutes later
    assert overage_report() == 0
    report = OverageReport.objects.get(organization=org)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gymbilling.services.overage"):
        assert overage_report() == 0

    # then: the batch is failed for good, saying why, and the next run leaves it alone
    assert report.sent_at is None and report.failed_at is not None
    assert old in report.error and "10 credits" in report.error
    assert OverageReport.objects.get(pk=report.pk).failed_at == report.failed_at
    assert [r for r in caplog.records if r.name == "gymbilling.services.overage"] == []


def test_overage_of_a_replaced_customers_subscription_is_not_sent_to_the_new_customer(
    customer, subscribed, stripe_standin, stripe_sdk
):
    # given: Pro with 10 credits of overage used, not reported yet; the customer deleted at
    # Stripe, then a pack bought (a new customer made)
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    stripe_sdk.v1.customers.delete(customer_id(org))
    response = customer.client.post("/api/v1/billing/checkout", {"pack": "boost-1k"}, format="json")
    assert response.status_code == 200, response.content

    # when: the report runs
    assert overage_report() == 0

    # then: the usage of the old customer's subscription is not billed to the new one
    assert stripe_standin.meter_events(customer_id(org)) == []
    assert OverageReport.objects.get(organization=org).failed_at is not None


def test_a_missing_meter_is_not_a_deleted_customer(customer, subscribed, stripe_standin):
    # given: Pro with 10 credits of overage used, reported under an event name Stripe has
    # no meter for (Stripe: resource_missing, as for a customer it does not have)
    subscribed("pro")
    org = customer.organization
    spend(org, 12_010 * MICRO, key="job-1")
    with override_settings(STRIPE_OVERAGE_EVENT_NAME="no_such_meter"):
        assert overage_report() == 0

    # then: the batch waits, not failed, and the customer is kept
    report = OverageReport.objects.get(organization=org)
    assert (report.sent_at, report.failed_at) == (None, None)
    assert not FormerStripeCustomer.objects.exists()
    # and once the meter is right, it is sent
    assert overage_report() == 10
    assert sum(int(e["value"]) for e in stripe_standin.meter_events(customer_id(org))) == 10
    assert CheckoutSession.objects.filter(organization=org).count() == 1
