"""Usage records: one per job, written with the capture of its hold."""

from __future__ import annotations

from django.db import IntegrityError, transaction

from accounts.errors import ApplicationError
from accounts.models import ApiKey, Organization
from metering.models import Hold, ModelPrice, UsageRecord
from metering.services.pricing import Usage


def usage_record_create(
    *,
    organization: Organization,
    job_id: str,
    model_name: str,
    priority: str,
    usage: Usage,
    credits: int,
    api_key: ApiKey | None = None,
    hold: Hold | None = None,
    model_price: ModelPrice | None = None,
    engine_busy_ms: int = 0,
    serving_cost: int = 0,
    currency: str = "usd",
) -> UsageRecord:
    """Record a job's usage once; a repeat for the same job returns the first record."""
    if credits < 0 or serving_cost < 0 or engine_busy_ms < 0:
        raise ApplicationError(code="invalid_usage", message="Amounts cannot be negative.")
    try:
        with transaction.atomic():
            return UsageRecord.objects.create(
                organization=organization,
                api_key=api_key,
                job_id=job_id,
                hold=hold,
                model_name=model_name,
                priority=priority,
                input_tokens=usage.input_tokens,
                cached_input_tokens=usage.cached_input_tokens,
                output_tokens=usage.output_tokens,
                engine_busy_ms=engine_busy_ms,
                credits=credits,
                model_price=model_price,
                serving_cost=serving_cost,
                currency=currency,
            )
    except IntegrityError:
        existing = UsageRecord.objects.filter(job_id=job_id).first()
        if existing is None:
            raise
        if existing.organization_id != organization.pk or existing.credits != credits:
            raise ApplicationError(
                code="idempotency_conflict",
                message=f"Usage for job {job_id!r} was already recorded differently.",
                status=409,
            ) from None
        return existing
