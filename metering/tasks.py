"""Periodic ledger sweeps (CELERY_BEAT_SCHEDULE). Both are safe to run twice."""

from celery import shared_task
from django.utils import timezone

from metering.services import credits_expire, holds_expire


@shared_task
def credits_expire_task() -> int:
    return credits_expire(now=timezone.now())


@shared_task
def holds_expire_task() -> int:
    return holds_expire(now=timezone.now())
