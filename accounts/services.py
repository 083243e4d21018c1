"""Writes for identity and tenancy."""

from __future__ import annotations

from django.db import IntegrityError, transaction

from accounts.errors import ApplicationError
from accounts.models import Organization


def organization_create(*, slug: str, name: str = "") -> Organization:
    """Create an organization. Its ledger accounts are opened by metering on first use."""
    try:
        with transaction.atomic():
            return Organization.objects.create(slug=slug, name=name or slug)
    except IntegrityError:
        raise ApplicationError(
            code="organization_exists",
            message=f"An organization with the slug {slug!r} already exists; choose another slug.",
            status=409,
            param="slug",
        ) from None
