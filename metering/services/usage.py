"""Usage records: one per job, written with the capture of its hold."""

from __future__ import annotations

from django.db import IntegrityError, transaction

from accounts.errors import ApplicationError
from metering.models import Hold, ModelPrice, UsageRecord
from metering.services.pricing import Usage


def usage_record_create(
    *,
    organization_id: int,
    job_id: str,
    model_name: str,
    priority: str,
    usage: Usage,
    credits: int,
    api_key_id: int | None = None,
    hold: Hold | None = None,
    model_price: ModelPrice | None = None,
    engine_busy_ms: int = 0,
    serving_cost: int = 0,
    currency: str = "usd",
    only_writer: bool = False,
) -> UsageRecord:
    """Record a job's usage once; a repeat for the same job returns the first record.

    `only_writer`: the caller holds a lock that makes it the only writer of
    this job's record (the settlement's claim of the job row), so a repeat
    cannot happen and no savepoint is set for one (two round trips less); a
    duplicate then fails the caller's transaction instead of being returned.
    """
    if credits < 0 or serving_cost < 0 or engine_busy_ms < 0:
        raise ApplicationError(code="invalid_usage", message="Amounts cannot be negative.")
    fields = {
        "organization_id": organization_id,
        "api_key_id": api_key_id,
        "job_id": job_id,
        "hold": hold,
        "model_name": model_name,
        "priority": priority,
        "input_tokens": usage.input_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "output_tokens": usage.output_tokens,
        "engine_busy_ms": engine_busy_ms,
        "credits": credits,
        "model_price": model_price,
        "serving_cost": serving_cost,
        "currency": currency,
    }
    if only_writer:
        return UsageRecord.objects.create(**fields)
    try:
        with transaction.atomic():
            return UsageRecord.objects.create(**fields)
    except IntegrityError:
        existing = UsageRecord.objects.filter(job_id=job_id).first()
        if existing is None:
            raise
        if existing.organization_id != organization_id or existing.credits != credits:
            raise ApplicationError(
                code="idempotency_conflict",
                message=f"Usage for job {job_id!r} was already recorded differently.",
                status=409,
            ) from None
        return existing
