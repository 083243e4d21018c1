"""Billing's Celery tasks: thin, take ids, safe to run twice (STYLE.md 8)."""

from __future__ import annotations

from celery import shared_task

from gymbilling import stripe_client
from gymbilling.services import (
    overage_report,
    payment_reversals_pending_settle,
    stripe_event_process,
    stripe_events_retry,
    stripe_prices_retired_archive,
    subscription_downgrade_restore,
    subscriptions_downgrade_restore,
    subscriptions_last_period_cap,
    subscriptions_suspend_overdue,
)
from gymbilling.services.events import EventRetryLater


@shared_task(
    bind=True,
    autoretry_for=(EventRetryLater,),
    retry_backoff=5,
    retry_backoff_max=300,
    max_retries=10,
)
def stripe_event_process_task(self, event_pk: int) -> str | None:
    """Apply one stored webhook event; Stripe unreachable -> retried with backoff."""
    return stripe_event_process(event_pk=event_pk)


@shared_task
def stripe_events_retry_task() -> int:
    return stripe_events_retry()


@shared_task
def subscriptions_suspend_overdue_task() -> int:
    return subscriptions_suspend_overdue()


@shared_task
def subscriptions_last_period_cap_task() -> int:
    return subscriptions_last_period_cap()


@shared_task
def overage_report_task() -> int:
    return overage_report()


@shared_task
def payment_reversals_pending_settle_task() -> int:
    return payment_reversals_pending_settle()


@shared_task(
    bind=True,
    autoretry_for=(stripe_client.StripeUnavailable,),
    retry_backoff=5,
    retry_backoff_max=300,
    max_retries=10,
)
def subscription_downgrade_restore_task(self, subscription_pk: int) -> bool:
    """Put back a scheduled downgrade an interrupted upgrade lifted; Stripe unreachable ->
    retried with backoff (past that, subscriptions_downgrade_restore_task's sweep, or the
    subscription's next change, puts it back)."""
    return subscription_downgrade_restore(subscription_pk=subscription_pk)


@shared_task
def subscriptions_downgrade_restore_task() -> int:
    return subscriptions_downgrade_restore()


@shared_task
def stripe_prices_retired_archive_task() -> list[str]:
    return stripe_prices_retired_archive()
