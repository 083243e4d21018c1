"""The organization's Stripe customer."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from django.db import IntegrityError, transaction

from accounts.models import Membership, Organization, Role
from accounts.services import audit_record
from gymbilling import stripe_client
from gymbilling.models import BillingCustomer, FormerStripeCustomer

logger = logging.getLogger(__name__)

T = TypeVar("T")


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


def billing_customer_call(*, organization: Organization, call: Callable[[BillingCustomer], T]) -> T:
    """`call(customer)` with the organization's Stripe customer; if Stripe refuses it because
    it no longer has that customer (deleted at Stripe), the customer is replaced by a new
    one (billing_customer_replace) and `call` runs once more, with it.

    Without this, every checkout, portal link and marketplace purchase of the organization
    would be refused for good, and staff could not repair it. Only a refusal for a missing
    object (`resource_missing`), and only once Stripe confirms the customer itself is gone:
    a price or session missing is not a reason to drop a customer. `call` must be safe to
    run twice (its Stripe keys derived from the customer it is given, or fresh).
    """
    customer = billing_customer_ensure(organization=organization)
    try:
        return call(customer)
    except stripe_client.StripeRequestRefused as exc:
        try:
            gone = exc.code == "resource_missing" and stripe_client.customer_gone(
                customer.stripe_customer_id
            )
        except stripe_client.StripeRequestRefused:
            gone = False  # not known to be gone: the request's own refusal is answered
        if not gone:
            raise
    return call(billing_customer_replace(customer=customer))


def billing_customer_replace(*, customer: BillingCustomer) -> BillingCustomer:
    """A new Stripe customer for the organization, in place of `customer`, which Stripe says
    it no longer has (deleted there); returns the row, holding the new id.

    The row stays the organization's (its resale freeze and Connect account with it); the
    old id is kept (FormerStripeCustomer: late events of its subscriptions still find the
    organization) and recorded in the audit log. The new customer's idempotency key names
    the one it replaces: the organization's first key (`customer:org:<pk>`) would be
    answered, for a day, with the deleted customer again, while two requests replacing
    the same customer at once make one. Stripe is called first, outside any transaction;
    the row changes only if it still holds the old id (else another request replaced it).
    """
    organization = customer.organization
    gone = customer.stripe_customer_id
    email = _billing_email(organization)
    created = stripe_client.customer_create(
        key=f"customer:org:{organization.pk}:replaces:{gone}",
        email=email,
        name=organization.name,
        metadata={
            "organization_id": str(organization.pk),
            "organization": organization.slug,
            "replaces": gone,
        },
    )
    with transaction.atomic():
        replaced = BillingCustomer.objects.filter(pk=customer.pk, stripe_customer_id=gone).update(
            stripe_customer_id=created["id"], email=email
        )
        if replaced:
            FormerStripeCustomer.objects.create(
                organization=organization, stripe_customer_id=gone, replaced_by=created["id"]
            )
            audit_record(
                organization=organization,
                action="billing.customer_replaced",
                target=created["id"],
                data={"from": gone, "to": created["id"], "why": "deleted at Stripe"},
            )
    if replaced:
        logger.warning(
            "organization %s: Stripe customer %s is gone at Stripe; replaced by %s",
            organization.pk,
            gone,
            created["id"],
        )
    return BillingCustomer.objects.select_related("organization").get(pk=customer.pk)


def organization_for_customer(stripe_customer_id: str) -> Organization | None:
    """The organization of a Stripe customer: its customer now, or one it had before."""
    row = (
        BillingCustomer.objects.filter(stripe_customer_id=stripe_customer_id)
        .select_related("organization")
        .first()
    )
    if row is not None:
        return row.organization
    former = (
        FormerStripeCustomer.objects.filter(stripe_customer_id=stripe_customer_id)
        .select_related("organization")
        .first()
    )
    return former.organization if former else None


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
