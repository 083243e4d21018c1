"""Usage records: one per job, written with the capture of its hold."""

from __future__ import annotations

from dataclasses import dataclass, fields

from django.db import IntegrityError, transaction

from accounts.errors import ApplicationError
from metering.models import Hold, ModelPrice, UsageRecord
from metering.services.pricing import Usage


@dataclass(frozen=True)
class UsageDraft:
    """A usage record to write with the settlement of the hold that paid for it.

    hold_capture / hold_release(usage=...) write it in the same transaction,
    on the SQL fast path in the same statement as the lots burnt: one round
    trip less while the wallet's row lock is held.
    """

    organization_id: int
    job_id: str
    model_name: str
    priority: str
    usage: Usage
    credits: int
    api_key_id: int | None = None
    model_price: ModelPrice | None = None
    engine_busy_ms: int = 0
    serving_cost: int = 0
    currency: str = "usd"
    # The member who spent it when no key did (a dashboard session's request).
    user_id: int | None = None

    def validate(self) -> None:
        if self.credits < 0 or self.serving_cost < 0 or self.engine_busy_ms < 0:
            raise ApplicationError(code="invalid_usage", message="Amounts cannot be negative.")

    def write(self, *, hold: Hold | None) -> UsageRecord:
        """Through the ORM (the reference path): once per job, a repeat returns the first."""
        # The draft's fields are usage_record_create's arguments, by name.
        return usage_record_create(
            hold=hold, **{field.name: getattr(self, field.name) for field in fields(self)}
        )


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
    user_id: int | None = None,
) -> UsageRecord:
    """Record a job's usage once; a repeat for the same job returns the first record."""
    if credits < 0 or serving_cost < 0 or engine_busy_ms < 0:
        raise ApplicationError(code="invalid_usage", message="Amounts cannot be negative.")
    values = {
        "organization_id": organization_id,
        "api_key_id": api_key_id,
        "user_id": user_id,
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
    try:
        with transaction.atomic():
            return UsageRecord.objects.create(**values)
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
