"""Billing reads."""

from __future__ import annotations

from django.db.models import QuerySet

from accounts.errors import ApplicationError
from accounts.models import Organization
from gymbilling.models import (
    CheckoutKind,
    CheckoutSession,
    CheckoutStatus,
    CreditPack,
    Invoice,
    PaymentReversal,
    Plan,
)


def plans_offered() -> QuerySet[Plan]:
    return Plan.objects.filter(active=True).order_by("sort_order", "monthly_price")


def packs_offered() -> QuerySet[CreditPack]:
    return CreditPack.objects.filter(active=True).order_by("price")


def catalog_items(
    *, plan: str | None = None, pack: str | None = None
) -> tuple[Plan | None, CreditPack | None]:
    """The plan and the pack these codes name (None where no code is given).

    A code that names nothing is a 404; one no longer offered is found, and
    `checkout_create` says it is not for sale.
    """
    found_plan = found_pack = None
    if plan is not None:
        found_plan = Plan.objects.filter(code=plan).first()
        if found_plan is None:
            raise ApplicationError(
                code="plan_not_found", message="No such plan.", status=404, param="plan"
            )
    if pack is not None:
        found_pack = CreditPack.objects.filter(code=pack).first()
        if found_pack is None:
            raise ApplicationError(
                code="pack_not_found", message="No such pack.", status=404, param="pack"
            )
    return found_plan, found_pack


def organization_invoices(*, organization: Organization) -> QuerySet[Invoice]:
    return Invoice.objects.filter(organization=organization)


def organization_pack_purchases(*, organization: Organization) -> QuerySet[CheckoutSession]:
    """The credit packs the organization paid for, newest first (their invoices are
    Stripe's receipts, not Invoice rows: a pack is a one-time Checkout payment)."""
    return (
        CheckoutSession.objects.filter(
            organization=organization, kind=CheckoutKind.PACK, status=CheckoutStatus.COMPLETE
        )
        .select_related("pack")
        .order_by("-completed_at", "-pk")
    )


def organization_payment_reversals(*, organization: Organization) -> QuerySet[PaymentReversal]:
    """Refunds and disputes of the organization's subscription and pack payments, newest first."""
    return PaymentReversal.objects.filter(organization=organization).order_by("-created_at", "-pk")
