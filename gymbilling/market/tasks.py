"""The marketplace's Celery tasks: thin, safe to run twice (STYLE.md 8)."""

from __future__ import annotations

from celery import shared_task

from gymbilling.market.services import (
    listings_expire,
    market_reversals_pending_settle,
    orders_expire,
    payouts_run,
)


@shared_task
def market_orders_expire_task() -> int:
    return orders_expire()


@shared_task
def market_listings_expire_task() -> int:
    return listings_expire()


@shared_task
def market_payouts_run_task() -> int:
    return payouts_run()


@shared_task
def market_reversals_pending_settle_task() -> int:
    return market_reversals_pending_settle()
