"""Subscriptions made before gymbilling/0029 did not say which Stripe customer they belong
to; 0029 writes their organization's (the only one it ever had: none was replaced before),
so their overage still goes to that customer once a deleted one is replaced."""

from __future__ import annotations

from gymbilling.models import BillingCustomer, Subscription

BEFORE = [("gymbilling", "0028_marketreversal_recovered_by_fill_backfill")]


def test_subscriptions_from_before_0029_name_their_organizations_customer(
    transactional_db, customer, subscribed, migrated_back_and_forth
):
    # given: a subscription mirrored before the field existed
    sub = subscribed("pro")
    cus = BillingCustomer.objects.get(organization=customer.organization).stripe_customer_id

    # when: migrated back to 0028 (the field dropped) and forward
    migrated_back_and_forth(BEFORE)

    # then: it names the organization's customer
    assert Subscription.objects.get(pk=sub.pk).stripe_customer_id == cus
