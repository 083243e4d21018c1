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
"""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Q, Sum
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
                    )
        except IntegrityError:
            pass  # another run wrote this batch; it is sent below
    for report in OverageReport.objects.filter(sent_at__isnull=True).select_related(
        "organization__billing_customer"
    ):
        try:
            stripe_client.meter_event_create(
                event_name=settings.STRIPE_OVERAGE_EVENT_NAME,
                customer=report.organization.billing_customer.stripe_customer_id,
                value=report.credits,
                identifier=report.identifier,
                timestamp=int(now.timestamp()),
            )
        except stripe_client.StripeRequestRefused:
            # This report alone (say, a customer deleted at Stripe): it stays
            # unsent and is tried again next run; the others go on. Stripe
            # being unreachable still ends the run (StripeUnavailable).
            logger.exception("overage report %s refused by Stripe", report.identifier)
            continue
        OverageReport.objects.filter(pk=report.pk).update(sent_at=now)
        reported += report.credits
    return reported
