"""The organization's Stripe customer."""

from __future__ import annotations

from django.db import IntegrityError, transaction

from accounts.models import Membership, Organization, Role
from accounts.services import audit_record
from gymbilling import stripe_client
from gymbilling.models import BillingCustomer


def _billing_email(organization: Organization) -> str:
    """Where Stripe sends receipts: a billing member, else an owner."""
    membership = (
        Membership.objects.filter(organization=organization, role__in=[Role.BILLING, Role.OWNER])
        .select_related("user")
        .order_by("role", "pk")  # "billing" sorts before "owner"
        .first()
    )
    return membership.user.email if membership else ""


def billing_customer_ensure(*, organization: Organization) -> BillingCustomer:
    """The organization's Stripe customer, created on first need.

    The Stripe call carries an idempotency key derived from the organization,
    so two first purchases at once create one customer; the row is written
    after Stripe answered, so a failed call leaves nothing behind.
    """
    existing = BillingCustomer.objects.filter(organization=organization).first()
    if existing is not None:
        return existing
    email = _billing_email(organization)
    customer = stripe_client.customer_create(
        key=f"customer:org:{organization.pk}",
        email=email,
        name=organization.name,
        metadata={"organization_id": str(organization.pk), "organization": organization.slug},
    )
    try:
        with transaction.atomic():
            return BillingCustomer.objects.create(
                organization=organization, stripe_customer_id=customer["id"], email=email
            )
    except IntegrityError:
        return BillingCustomer.objects.get(organization=organization)


def organization_for_customer(stripe_customer_id: str) -> Organization | None:
    row = (
        BillingCustomer.objects.filter(stripe_customer_id=stripe_customer_id)
        .select_related("organization")
        .first()
    )
    return row.organization if row else None


@transaction.atomic
def billing_customer_connect_account_set(
    *, customer_id: int, account_id: str, actor
) -> BillingCustomer:
    """Set the Stripe Connect account the organization's marketplace proceeds are paid to
    (blank: none). Recorded in its audit log, with the account it replaced: whoever
    changes where a seller's money goes is on record."""
    account_id = account_id.strip()
    customer = (
        BillingCustomer.objects.select_for_update()
        .select_related("organization")
        .get(pk=customer_id)
    )
    before = customer.stripe_connect_account_id
    if account_id == before:
        return customer
    BillingCustomer.objects.filter(pk=customer.pk).update(stripe_connect_account_id=account_id)
    audit_record(
        organization=customer.organization,
        action="billing.connect_account_changed",
        target=customer.stripe_customer_id,
        actor_user=actor,
        data={"from": before, "to": account_id},
    )
    customer.stripe_connect_account_id = account_id
    return customer
