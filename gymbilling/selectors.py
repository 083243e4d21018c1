"""Billing reads."""

from __future__ import annotations

from django.db.models import QuerySet

from accounts.errors import ApplicationError
from accounts.models import Organization
from gymbilling.models import CreditPack, Invoice, Plan


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
