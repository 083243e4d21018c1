"""The marketplace's Celery tasks: thin, safe to run twice (STYLE.md 8)."""

from __future__ import annotations

from celery import shared_task
from django.utils import timezone

from gymbilling.market.rollover import rollover_holds_settle
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
    """What running jobs gave back: of refunded purchases (taken back), and of plan credits
    they kept from a rollover's cap (expired)."""
    taken = market_reversals_pending_settle()
    return taken + rollover_holds_settle(now=timezone.now())
