"""Billing reads."""

from __future__ import annotations

from django.db.models import QuerySet

from accounts.models import Organization
from gymbilling.models import CreditPack, Invoice, Plan


def plans_offered() -> QuerySet[Plan]:
    return Plan.objects.filter(active=True).order_by("sort_order", "monthly_price")


def packs_offered() -> QuerySet[CreditPack]:
    return CreditPack.objects.filter(active=True).order_by("price")


def organization_invoices(*, organization: Organization) -> QuerySet[Invoice]:
    return Invoice.objects.filter(organization=organization)
