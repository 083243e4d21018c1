"""Overage: usage beyond a month's credits, reported to a Stripe billing meter.

Where a plan allows overage, each paid period also grants an *overage
allowance* lot (source=overage, unpaid, not resellable, burned after every
other lot, as large as the plan's fair-use ceiling, expiring with the
period): holds and settlement work unchanged, the wallet never goes
negative, and what was burned from the allowance is exactly the overage.

Every run reports, per allowance lot, the whole credits burned since the last
report, as one meter event whose identifier is the lot and the running total
(`ovg_<lot>_<total>`). The OverageReport row is written before the call and
marked sent after, so a crash in between resends the same identifier, which
Stripe refuses as a duplicate: each credit is invoiced once.

Stripe bills a meter event in the period its timestamp falls in, so each is
stamped with when its credits were used, not when the run reports them:
usage of a period's last minutes, reported after its end (within Stripe's
hour of invoice finalization grace), is billed with that period, and so is
that of a subscription ending then. A batch never spans two periods: an
allowance is one period's, and a batch is one allowance's.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Max, Q, Sum
from django.utils import timezone

from gymbilling import stripe_client
from gymbilling.models import Invoice, OverageReport, Subscription
from metering.models import MICRO, CreditLot, LotMovement, LotSource, TransactionKind

logger = logging.getLogger(__name__)

# An allowance is looked at until this long after it expired: what was burned
# in its last minutes is reported by a run after its expiry, even with beat
# down for a while; older allowances are settled and cost no queries.
REPORT_AFTER_EXPIRY = timedelta(days=7)


def overage_used(lot: CreditLot) -> int:
    """Micro-credits of the allowance spent (not expired, not still held)."""
    expired = (
        LotMovement.objects.filter(lot=lot, transaction__kind=TransactionKind.EXPIRY).aggregate(
            total=Sum("amount")
        )["total"]
        or 0
    )
    return lot.amount - lot.remaining + expired  # expiry movements are negative


# Stripe refuses a meter event stamped more than 35 days in the past; an
# hour's margin covers the clocks and the call.
METER_EVENT_MAX_AGE = timedelta(days=35) - timedelta(hours=1)


def overage_used_at(lot: CreditLot) -> datetime | None:
    """When the allowance's latest credit was used, inside its period.

    A job held before the period's end and settled after it burned that
    period's allowance: it is that period's usage, stamped at its last second.
    """
    used_at = (
        LotMovement.objects.filter(lot=lot, amount__lt=0)
        .exclude(transaction__kind=TransactionKind.EXPIRY)
        .aggregate(at=Max("transaction__created_at"))["at"]
    )
    if used_at is None or lot.expires_at is None:
        return used_at
    return min(used_at, lot.expires_at - timedelta(seconds=1))


def meter_timestamp(*, used_at: datetime, now: datetime) -> int:
    """The meter event's timestamp: the usage's, unless Stripe would refuse it as too old
    (a batch that waited weeks, Stripe or beat down): then the oldest it takes."""
    return int(max(used_at, now - METER_EVENT_MAX_AGE).timestamp())


def _invoice_id(lot: CreditLot) -> str:
    return lot.created_by.idempotency_key.removeprefix("grant:overage:")  # grant:overage:<invoice>


def overage_report(*, now=None) -> int:
    """Report new overage to Stripe; returns the whole credits reported in this run."""
    now = now or timezone.now()
    reported = 0
    # Only allowances something was burned from, and not long expired.
    lots = list(
        CreditLot.objects.filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now - REPORT_AFTER_EXPIRY),
            source=LotSource.OVERAGE,
            account__kind="wallet",
            remaining__lt=F("amount"),
        )
        .select_related("created_by", "organization")
        .order_by("pk")
    )
    subscriptions = {
        invoice.stripe_invoice_id: invoice.subscription
        for invoice in Invoice.objects.filter(
            stripe_invoice_id__in={_invoice_id(lot) for lot in lots}
        ).select_related("subscription")
    }
    for lot in lots:
        subscription = subscriptions.get(_invoice_id(lot))
        if subscription is None:
            continue
        try:
            with transaction.atomic():
                # One run at a time per subscription: two overlapping runs would
                # each read the same total and report overlapping batches.
                Subscription.objects.select_for_update().filter(pk=subscription.pk).first()
                lot.refresh_from_db(fields=["remaining"])
                used = overage_used(lot) // MICRO  # whole credits; the rest waits
                done = (
                    OverageReport.objects.filter(lot_id=lot.pk).aggregate(t=Sum("credits"))["t"]
                    or 0
                )
                if used > done:
                    OverageReport.objects.create(
                        identifier=f"ovg_{lot.pk}_{used}",
                        organization=lot.organization,
                        subscription=subscription,
                        lot_id=lot.pk,
                        credits=used - done,
                        used_at=overage_used_at(lot) or now,
                    )
        except IntegrityError:
            pass  # another run wrote this batch; it is sent below
    gone: dict[str, bool] = {}  # customer -> deleted at Stripe, asked once a run
    for report in OverageReport.objects.filter(
        sent_at__isnull=True, failed_at__isnull=True
    ).select_related("organization__billing_customer", "subscription"):
        # The subscription's own customer: the organization's may since have replaced it
        # (deleted at Stripe), and the usage is invoiced on that subscription or on none.
        customer = (
            report.subscription.stripe_customer_id
            or report.organization.billing_customer.stripe_customer_id
        )
        try:
            stripe_client.meter_event_create(
                event_name=settings.STRIPE_OVERAGE_EVENT_NAME,
                customer=customer,
                value=report.credits,
                identifier=report.identifier,
                timestamp=meter_timestamp(used_at=report.used_at or report.created_at, now=now),
            )
        except stripe_client.StripeRequestRefused as exc:
            if exc.code == "resource_missing" and customer not in gone:
                try:
                    gone[customer] = stripe_client.customer_gone(customer)
                except stripe_client.StripeRequestRefused:
                    gone[customer] = False  # not known to be gone: tried again next run
            if gone.get(customer):
                _overage_report_fail(report=report, customer=customer, now=now)
                continue
            # This report alone: it stays unsent and is tried again next run; the others
            # go on. Stripe being unreachable still ends the run (StripeUnavailable).
            logger.exception("overage report %s refused by Stripe", report.identifier)
            continue
        OverageReport.objects.filter(pk=report.pk).update(sent_at=now)
        reported += report.credits
    return reported


def _overage_report_fail(*, report: OverageReport, customer: str, now: datetime) -> None:
    """Give up on a report whose Stripe customer was deleted: no meter can invoice it, so
    sending it again every run would only log an error every run, for good. Marked
    failed with why, for finance (admin: Overage reports) to invoice it another way or
    write it off."""
    error = (
        f"Stripe customer {customer} was deleted at Stripe: these {report.credits} credits "
        "of overage cannot be invoiced through the meter; invoice them by hand or write "
        "them off."
    )
    OverageReport.objects.filter(pk=report.pk, sent_at__isnull=True).update(
        failed_at=now, error=error
    )
    logger.warning("overage report %s failed for good: %s", report.identifier, error)
