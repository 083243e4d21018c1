"""Billing in the Django admin, as finance staff use it."""

from __future__ import annotations

import pytest
from django.contrib.admin import helpers

from gymbilling.models import BillingCustomer
from tests.factories import OrganizationFactory

pytestmark = pytest.mark.django_db


def _customer(**fields) -> BillingCustomer:
    organization = OrganizationFactory()
    return BillingCustomer.objects.create(
        organization=organization, stripe_customer_id=f"cus_{organization.slug}", **fields
    )


def test_a_billing_customer_cannot_be_deleted_in_the_admin(admin_client):
    # given the customer later invoice.paid webhooks find their organization by
    customer = _customer()

    # when a superuser opens its delete page, and posts "delete selected" on the list
    page = admin_client.post(
        f"/admin/gymbilling/billingcustomer/{customer.pk}/delete/", {"post": "yes"}
    )
    listed = admin_client.post(
        "/admin/gymbilling/billingcustomer/",
        {"action": "delete_selected", helpers.ACTION_CHECKBOX_NAME: [customer.pk], "post": "yes"},
    )

    # then both are refused and the row is still there
    assert page.status_code == 403
    assert listed.status_code == 302  # back to the list: no such action
    assert BillingCustomer.objects.filter(pk=customer.pk).exists()
