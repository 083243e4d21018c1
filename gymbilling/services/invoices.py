"""Paid subscription invoices grant credits: once per invoice, keyed by its id.

The credits an invoice buys are read from its lines, by the credits each
line's price was made for (StripePrice.credits: a member renewing at an old
price gets what it was sold for, not what the plan gives now):
- a regular line (billing_reason subscription_create/cycle) buys a month of
  the price's credits for its quantity;
- proration lines (an upgrade, billing_reason subscription_update) buy the
  fraction of a month their period covers, and an unused-time line (negative
  amount) gives the same fraction of the old price's back: the grant is the
  difference, floored to a micro-credit (never in the customer's favour by
  more than the rounding of one line);
- metered overage lines buy nothing (the credits were already used).

Subscription credits expire at the end of the period they were bought for,
or a period later when the plan rolls over some of them (the rollover cap is
enforced at the period change: subscriptions.period_rollover). Credits granted
after that cap of their period ran roll nothing over (_grant_expiry).
"""

from __future__ import annotations

import calendar
import logging
from datetime import datetime, timedelta
from typing import NamedTuple

from django.db import transaction
from django.utils import timezone

from gymbilling import stripe_client
from gymbilling.models import Invoice, PriceKind, StripePrice, Subscription
from gymbilling.services.catalog import stripe_price_meter_read
from gymbilling.services.customers import organization_for_customer
from gymbilling.services.subscriptions import current_overage_price, ts
from metering.models import MICRO, JournalTransaction, LotSource
from metering.services import LotSale, credits_grant

logger = logging.getLogger(__name__)

OVERAGE_LOT_PRIORITY = 1000  # burned after every other lot: overage is the last resort
# The invoices that buy a period, each of which grants that period's overage allowance.
PERIOD_BILLING_REASONS = ("subscription_create", "subscription_cycle")


def invoice_subscription_id(invoice: dict) -> str | None:
    """The subscription an invoice bills (its place moved in API version 2025-03-31)."""
    details = ((invoice.get("parent") or {}).get("subscription_details")) or {}
    return details.get("subscription") or invoice.get("subscription") or None


def invoice_payment_intent_id(invoice: dict) -> str:
    """The PaymentIntent that paid the invoice, which its refunds and disputes name.

    An invoice may list several payments (an attempt canceled, then another that paid):
    the paid one comes first, else the first listed, as Stripe lists them."""
    if invoice.get("payment_intent"):
        return str(invoice["payment_intent"])
    payments = (invoice.get("payments") or {}).get("data") or []
    # A stable sort: paid first, each group in Stripe's order.
    for payment in sorted(payments, key=lambda payment: payment.get("status") != "paid"):
        intent = (payment.get("payment") or {}).get("payment_intent")
        if intent:
            return str(intent)
    return ""


def _line_price_id(line: dict) -> str | None:
    pricing = (line.get("pricing") or {}).get("price_details") or {}
    price = pricing.get("price") or line.get("price")
    if isinstance(price, dict):
        price = price.get("id")
    return price


class InvoiceCredits(NamedTuple):
    """What a subscription invoice buys: `credits` (micro-credits), valid until `expires_at`,
    for `amount` (minor units of the invoice's currency, what its lines that buy credits
    charge less their discounts, before tax: the credits' revenue, CreditLot.revenue)."""

    credits: int
    expires_at: datetime | None
    amount: int


def _line_amount(line: dict) -> int:
    """What the line charges, less the discounts applied to it (tax is not in it)."""
    discounts = sum(int(d.get("amount") or 0) for d in line.get("discount_amounts") or [])
    return int(line.get("amount") or 0) - discounts


def invoice_credits(*, invoice: dict, subscription: Subscription) -> InvoiceCredits:
    """The micro-credits this invoice buys, when they expire, and what it charges for them.

    The amount is that of the same lines that buy the credits: a proration's
    unused-time line takes off as it takes credits off; metered overage lines
    (billed in arrears, for credits of the period before) are not in it."""
    lines = (invoice.get("lines") or {}).get("data") or []
    price_ids = [_line_price_id(line) for line in lines]
    prices = {
        p.stripe_price_id: p
        for p in StripePrice.objects.filter(
            stripe_price_id__in=[p for p in price_ids if p], kind=PriceKind.PLAN
        ).select_related("plan")
    }
    total = 0
    amount = 0
    expires_at: datetime | None = None
    for line in lines:
        price = prices.get(_line_price_id(line))
        if price is None:
            continue
        amount += _line_amount(line)
        plan = price.plan
        quantity = int(line.get("quantity") or 1)
        period = line.get("period") or {}
        start, end = ts(period.get("start")), ts(period.get("end"))
        month_credits = price.plan_credits_for(quantity)
        # The length of the period the line buys credits in: what rolled-over credits last
        # past its end, as a whole period's do.
        period_length = end - start if start and end else timedelta(days=31)
        if line.get("proration") or (
            (line.get("parent") or {}).get("subscription_item_details") or {}
        ).get("proration"):
            covered = max(0, int((end - start).total_seconds())) if start and end else 0
            period_seconds = _period_seconds(subscription, ends_at=end)
            share = month_credits * min(covered, period_seconds) // period_seconds
            total += share if int(line.get("amount") or 0) >= 0 else -share
            # A proration line starts at the change, not at the period's start: an upgrade
            # on day 28 of 30 would roll its credits over for 2 days, not a period.
            period_length = timedelta(seconds=period_seconds)
        else:
            total += month_credits
        if end is not None:
            lot_end = end
            if plan.rollover_percent:
                lot_end = end + period_length
            expires_at = max(expires_at, lot_end) if expires_at else lot_end
    return InvoiceCredits(credits=total, expires_at=expires_at, amount=max(0, amount))


def _month_before(moment: datetime) -> datetime:
    """The same time a month earlier, on the month's last day when it is shorter (as
    Stripe steps a monthly period back from its end)."""
    year, month = (moment.year, moment.month - 1) if moment.month > 1 else (moment.year - 1, 12)
    return moment.replace(
        year=year, month=month, day=min(moment.day, calendar.monthrange(year, month)[1])
    )


def _period_seconds(subscription: Subscription, *, ends_at: datetime | None) -> int:
    """The length of the subscription's period that ends at `ends_at` (a proration line's
    end), which a proration is a share of.

    Not always the subscription's period now: an upgrade's invoice processed after a
    renewal (a late webhook) prorated the period before, of another length (28 days to
    31). That period starts a calendar month before its end, or later where the invoice
    that bought it says so (a period after the 31st: Jan 31 to Feb 28); not earlier, as
    that invoice's period also spans proration lines of the period before it, if any.
    """
    start = subscription.current_period_start
    if ends_at is not None and ends_at != subscription.current_period_end:
        bought_from = Invoice.objects.filter(
            subscription=subscription,
            period_end=ends_at,
            billing_reason__in=PERIOD_BILLING_REASONS,
            period_start__lt=ends_at,
        ).values_list("period_start", flat=True)
        start = max([_month_before(ends_at), *bought_from])
    end = ends_at or subscription.current_period_end
    return max(1, int((end - start).total_seconds()))


def invoice_sync(*, invoice: dict, subscription: Subscription | None) -> Invoice | None:
    """Mirror the invoice; if it is a paid subscription invoice, grant its credits once."""
    org = organization_for_customer(str(invoice.get("customer") or ""))
    if org is None:
        return None
    paid = invoice.get("status") == "paid"
    transitions = invoice.get("status_transitions") or {}
    period_start = ts(invoice.get("period_start"))
    period_end = ts(invoice.get("period_end"))
    lines = (invoice.get("lines") or {}).get("data") or []
    line_ends = [ts((line.get("period") or {}).get("end")) for line in lines]
    line_ends = [end for end in line_ends if end]
    if line_ends:
        # The period the invoice bought (Stripe's invoice period_* is the
        # period before it, for subscription invoices billed in advance).
        period_start = min(
            ts((line.get("period") or {}).get("start")) or period_start for line in lines
        )
        period_end = max(line_ends)
    bought = InvoiceCredits(credits=0, expires_at=None, amount=0)
    if paid and subscription is not None:
        bought = invoice_credits(invoice=invoice, subscription=subscription)
    row, _ = Invoice.objects.update_or_create(
        stripe_invoice_id=invoice["id"],
        defaults={
            "organization": org,
            "subscription": subscription,
            "billing_reason": str(invoice.get("billing_reason") or ""),
            "status": str(invoice.get("status") or ""),
            "currency": str(invoice.get("currency") or ""),
            "amount_due": int(invoice.get("amount_due") or 0),
            "amount_paid": int(invoice.get("amount_paid") or 0),
            "total": int(invoice["total"]) if invoice.get("total") is not None else None,
            "period_start": period_start,
            "period_end": period_end,
            "hosted_invoice_url": str(invoice.get("hosted_invoice_url") or ""),
            "stripe_payment_intent_id": invoice_payment_intent_id(invoice),
            "created_at": ts(invoice.get("created")),
            "paid_at": ts(transitions.get("paid_at")) if paid else None,
        },
    )
    already = JournalTransaction.objects.filter(
        idempotency_key=f"grant:invoice:{invoice['id']}"
    ).exists()
    # The amount depends on the subscription's period, which moves on: a
    # replay after the period changed must not compute a second, different
    # grant (the ledger's key would refuse it as a conflict). The key is the
    # gate; this read only spares the replay that refusal.
    if bought.credits > 0 and not already:
        if row.billing_reason in PERIOD_BILLING_REASONS:
            # Outside the grant's transaction: it may ask Stripe.
            overage_meter_known(subscription)
        subscription_period_grant(
            invoice=row,
            subscription=subscription,
            bought=bought._replace(
                expires_at=_grant_expiry(bought, invoice=row, subscription=subscription)
            ),
        )
    return row


def _grant_expiry(
    bought: InvoiceCredits, *, invoice: Invoice, subscription: Subscription
) -> datetime | None:
    """When the credits a paid invoice bought expire, granted now.

    A rollover plan's credits last a period past the one they bought, for what the
    rollover cap lets over: the cap is applied once, as that period ends, to what the
    organization holds then (period_rollover under the renewal's key, or
    subscription_last_period_cap for an ended subscription's last period). An invoice
    granted after that (its payment late, its event failed for days) was not there to be
    capped, and the key is spent: granted to the end of the rollover period, all of it
    would carry over, uncapped, as long as that lasts.

    So such a grant is treated as what it is, a late payment: its credits last to the end
    of the period they bought, or LATE_PAYMENT_VALIDITY from the payment or from now when
    that is over (as a plan without rollover grants them), and none of them rolls over.
    Not capped at grant time instead: a cap is what is left of a period's credits when it
    ends, and these could not be used in it at all; capping them now would leave a plan
    without rollover (cap 0) nothing of what was paid for, and one with rollover at most
    the cap, never the week every late payment gets. The cap that ran stands as it was:
    the organization keeps no more than it let over, past this grant's week.
    """
    expires_at = bought.expires_at
    if (
        expires_at is not None
        and invoice.period_end is not None
        and _period_capped(subscription, period_end=invoice.period_end)
    ):
        expires_at = min(expires_at, invoice.period_end)
    return _late_payment_expiry(expires_at, paid_at=invoice.paid_at)


def _period_capped(subscription: Subscription, *, period_end: datetime) -> bool:
    """Whether the rollover cap of the period ending at `period_end` has been applied: the
    subscription has moved past it (renewed: period_rollover ran in the same transaction
    as the move, subscription_sync), or it ended and its last period was capped."""
    return (
        subscription.last_period_capped_at is not None
        or period_end <= subscription.current_period_start
    )


# An invoice paid after the period it bought (a failed renewal paid late)
# still gets usable credits: they last this long from the payment, or from
# when its grant is made, whichever is later.
LATE_PAYMENT_VALIDITY = timedelta(days=7)


def _late_payment_expiry(
    expires_at: datetime | None, *, paid_at: datetime | None, now: datetime | None = None
) -> datetime | None:
    """When a paid invoice's credits expire: at the end of what it bought, unless that has
    passed by the time the grant is made.

    Then they last LATE_PAYMENT_VALIDITY from the payment, and never less than that from
    now: the grant may be made long after the payment (its event failed for days, a bug
    fixed later, a replay from the admin), and a grant expiring in the past is refused
    (`lot_expired`), which would leave a paid invoice without its credits for ever,
    named by reconcile every day. The member paid, so each paid invoice is granted once,
    whenever it is processed; a week to use them is what a late payment gets anyway."""
    if expires_at is None:
        return None
    now = now or timezone.now()
    if expires_at > now:
        return expires_at
    paid = paid_at or now
    return max(expires_at, paid + LATE_PAYMENT_VALIDITY, now + LATE_PAYMENT_VALIDITY)


@transaction.atomic
def subscription_period_grant(
    *, invoice: Invoice, subscription: Subscription, bought: InvoiceCredits
) -> None:
    """Grant what a paid invoice bought (and the plan's overage allowance), once.

    One transaction: the month's credits and its overage allowance appear together.
    Each lot says what it was sold for and by which plan, for finance's revenue.
    """
    plan = subscription.plan
    credits_grant(
        organization=invoice.organization,
        amount=bought.credits,
        source=LotSource.SUBSCRIPTION,
        paid=True,
        resellable=True,
        key=f"invoice:{invoice.stripe_invoice_id}",
        expires_at=bought.expires_at,
        memo=f"{plan.code} x{subscription.seats}, invoice {invoice.stripe_invoice_id}",
        sale=LotSale(revenue=bought.amount, currency=invoice.currency, origin=plan.code),
    )
    Invoice.objects.filter(pk=invoice.pk).update(credits_granted=bought.credits)
    allowance_until = invoice.period_end or subscription.current_period_end
    if not (
        plan.overage_allowed
        and invoice.billing_reason in PERIOD_BILLING_REASONS
        # Ended (its deletion processed first): no meter invoices overage any more.
        and subscription.live
        # Paid after its period: no overage to allow any more.
        and allowance_until > timezone.now()
    ):
        return
    billed_at = overage_price_billed(subscription)
    if billed_at is None:
        return
    allowance = plan.overage_ceiling_for(subscription.seats)
    credits_grant(
        organization=invoice.organization,
        amount=allowance,
        source=LotSource.OVERAGE,
        paid=False,
        resellable=False,
        priority=OVERAGE_LOT_PRIORITY,
        key=f"overage:{invoice.stripe_invoice_id}",
        expires_at=allowance_until,
        memo=f"overage allowance of {plan.code}, invoiced by the usage meter",
        # Sold at the price on the subscription's overage item as it is used (the meter
        # invoices it in arrears, in the subscription's currency): the whole allowance's
        # price, floored to a minor unit.
        sale=LotSale(
            revenue=overage_revenue(price=billed_at, credits=allowance),
            currency=billed_at.currency,
            origin=plan.code,
        ),
    )


def overage_price_billed(subscription: Subscription) -> StripePrice | None:
    """The overage price a period's allowance is invoiced at: the one Stripe's subscription
    carries (as read just before this grant: invoice_refresh syncs it first), when it is an
    overage price of the subscription's plan, current or retired, that reads the meter
    overage is reported to (the current overage price's: the catalog's sync makes every
    current one read it; where its meter is not recorded yet, overage_meter_known read it
    before this grant). Only a price on the subscription reads the meter, and only events
    reported to its own meter are billed at it, so anything else would serve the allowance
    on credit never invoiced (a plan change that left the item behind, an item removed by
    hand, a retired price reading the meter of an earlier STRIPE_OVERAGE_EVENT_NAME).

    A retired price is one a member on an old price of their plan keeps where the plan's
    overage now sells in another currency (Stripe keeps a subscription in one currency,
    checkout.overage_item_changes), or one a renewal could not move: Stripe bills the
    usage at it, once, in the currency the member pays. None: withheld, and a human is
    told."""
    carried = subscription.overage_price
    current = current_overage_price(subscription.plan)
    if carried is None or current is None or carried.plan_id != subscription.plan_id:
        why = (
            f"its Stripe items do not carry an overage price of {subscription.plan.code} "
            f"(current: {current.stripe_price_id if current is not None else 'none synced'}; "
            f"they carry {carried.stripe_price_id if carried is not None else 'none'})"
        )
    elif carried.pk == current.pk or (carried.meter and carried.meter == current.meter):
        return carried
    else:
        why = (
            f"it carries the retired overage price {carried.stripe_price_id} of "
            f"{subscription.plan.code}, which reads meter {carried.meter or 'unknown'}, not "
            f"{current.meter or 'unknown'} that overage is reported to (the current "
            f"{current.stripe_price_id}'s, unknown where Stripe could not say it)"
        )
    logger.error(
        "subscription %s: no overage allowance granted, %s",
        subscription.stripe_subscription_id,
        why,
    )
    return None


def overage_meter_known(subscription: Subscription) -> None:
    """Before a period's grant: where the subscription carries a retired overage price of
    its plan whose meter is recorded, and its plan's current overage price's is not (made
    before gymbilling/0046, no stripe_sync_catalog since), read that one from Stripe and
    record it, so that overage_price_billed compares the two meters rather than withhold
    the allowance until a sync (which no deploy step runs). At most one Stripe call, at a
    renewal (or first) invoice's grant, none once the meter is recorded or where nothing
    is compared.

    Outside any transaction. Stripe refusing the read, or not listing the price under its
    lookup key, leaves it unknown: the grant withholds the allowance and logs why, as
    before. Stripe unreachable is raised, as subscription_overage_align does just before,
    and the event is retried, its grant with it: a period's allowance is granted once, so
    a passing outage must not withhold it for the whole period."""
    carried = subscription.overage_price
    if carried is None or not carried.meter or carried.plan_id != subscription.plan_id:
        return
    current = current_overage_price(subscription.plan)
    if current is None or current.meter or current.pk == carried.pk:
        return
    try:
        stripe_price_meter_read(price=current)
    except stripe_client.StripeRequestRefused as exc:
        logger.warning(
            "overage price %s: its meter could not be read from Stripe (%s): %s",
            current.stripe_price_id,
            exc.code or exc.status,
            exc,
        )


def overage_revenue(*, price: StripePrice, credits: int) -> int:
    """Minor units (of the price's currency) `credits` micro-credits of overage cost at an
    overage price (per 1,000 credits), rounded down: never more than the meter invoices."""
    return price.unit_amount * credits // (1_000 * MICRO)
