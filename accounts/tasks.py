"""Periodic housekeeping for the API (CELERY_BEAT_SCHEDULE)."""

from celery import shared_task

from accounts.idempotency import idempotency_purge


@shared_task
def idempotency_purge_task() -> int:
    return idempotency_purge()
