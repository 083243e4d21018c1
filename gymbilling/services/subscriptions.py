"""Our mirror of a Stripe subscription, and the entitlements it gives.

`subscription_sync` takes Stripe's current subscription object (never a
webhook payload: events arrive late, twice and out of order, so the handler
re-reads the object) and makes our row and the organization's entitlements
match it:

- an upgrade (as much or more per month than the price paid now: plan or
  seats) applies at once; Stripe's proration invoice, once paid, grants the
  prorated difference (invoices.py);
- a downgrade is scheduled for the period end: the organization keeps what it
  paid for until then;
- a move of a member on an old price of their plan to the plan's price now is one or
  the other, by what they pay (the same plan and seats are then scheduled);
- a new period expires last period's credits beyond its rollover cap (the plan's
  percent of the credits that period's price sold: `Subscription.price`);
- `past_due` starts the grace period; past it inference is suspended
  (`subscriptions_suspend_overdue`, every minute from beat); a paid invoice
  makes the subscription active and the organization active again;
- a canceled subscription returns the organization to the defaults, and its
  last period's credits are capped as a renewal would have capped them, once
  that period is over (`subscription_last_period_cap`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from accounts.models import Organization, Standing
from accounts.services import organization_entitlements_set
from accounts.services.organizations import ENTITLEMENT_FIELDS
from gymbilling.market.services import credits_trim_with_listings, seller_lock, sellers_lock
from gymbilling.models import PriceKind, StripePrice, Subscription
from gymbilling.services.catalog import price_meter, stripe_price_meter_record
from gymbilling.services.customers import organization_for_customer
from gymbilling.sweeps import each_isolated
from metering.models import LotSource
from metering.services import lots_expire_now

# What an organization without a live subscription may do: the field defaults
# of every entitlement (its standing is written on its own).
_DEFAULTS = {
    name: Organization._meta.get_field(name).get_default()
    for name in ENTITLEMENT_FIELDS
    if name != "standing"
}

Status = Subscription.Status
_ENTITLED = (Status.ACTIVE, Status.TRIALING, Status.PAST_DUE, Status.UNPAID)


class SubscriptionUnknown(LookupError):
    """A Stripe subscription we cannot tie to an organization and a plan (not ours)."""


class SubscriptionConflict(SubscriptionUnknown):
    """The organization has another live subscription here: most often the one a
    re-subscription replaced, whose deletion has not been processed yet."""


def ts(value) -> datetime | None:
    return datetime.fromtimestamp(int(value), tz=UTC) if value else None


@dataclass(frozen=True)
class StripeItems:
    """What Stripe's subscription object says is bought, read for API_VERSION."""

    plan_price: StripePrice
    seats: int
    period_start: datetime
    period_end: datetime
    # The metered price that invoices the overage meter, if one of ours is on it, and the
    # meter Stripe says it reads.
    overage_price: StripePrice | None = None
    overage_meter: str = ""


def stripe_items(stripe_sub: dict) -> StripeItems:
    items = (stripe_sub.get("items") or {}).get("data") or []
    price_ids = [(item.get("price") or {}).get("id") for item in items]
    prices = {
        p.stripe_price_id: p
        for p in StripePrice.objects.filter(
            stripe_price_id__in=price_ids, kind__in=[PriceKind.PLAN, PriceKind.OVERAGE]
        ).select_related("plan")
    }
    overage = next((p for p in prices.values() if p.kind == PriceKind.OVERAGE), None)
    overage_meter = next(
        (
            price_meter(item.get("price") or {})
            for item in items
            if overage and (item.get("price") or {}).get("id") == overage.stripe_price_id
        ),
        "",
    )
    for item in items:
        price = prices.get((item.get("price") or {}).get("id"))
        if price is None or price.kind != PriceKind.PLAN:
            continue
        # Since API version 2025-03-31 the period lives on each item.
        start = item.get("current_period_start") or stripe_sub.get("current_period_start")
        end = item.get("current_period_end") or stripe_sub.get("current_period_end")
        return StripeItems(
            plan_price=price,
            seats=int(item.get("quantity") or 1),
            period_start=ts(start),
            period_end=ts(end),
            overage_price=overage,
            overage_meter=overage_meter,
        )
    raise SubscriptionUnknown(f"subscription {stripe_sub.get('id')} has no price of ours")


def current_overage_price(plan) -> StripePrice | None:
    """The metered price that invoices `plan`'s overage now, reading the meter overage is
    reported to (the catalog's sync makes it so): the one each plan change and renewal puts
    on a subscription to it, where its currency allows; None when the plan has none."""
    if not plan.overage_allowed:
        return None
    return StripePrice.objects.filter(kind=PriceKind.OVERAGE, plan=plan, current=True).first()


def _organization_of(stripe_sub: dict) -> Organization:
    org = organization_for_customer(str(stripe_sub.get("customer") or ""))
    if org is None:
        raise SubscriptionUnknown(f"customer {stripe_sub.get('customer')} is not one of ours")
    return org


def plan_change_is_upgrade(sub: Subscription, price: StripePrice, seats: int) -> bool:
    """Whether moving `sub` to `price` x `seats` costs at least what the member pays now:
    an upgrade is applied (and prorated) now, a downgrade from the next period. Checkout
    and the webhook's sync must agree on it: both compare the price Stripe's item is put
    at with the price the period is paid at (`Subscription.period_amount`), not what the
    plans cost now. A member left on an old price pays that price, and Stripe prorates
    from it; by the plans now, a move between them would be charged as an upgrade that
    lowers the bill, or scheduled while it raises it."""
    return price.plan_amount_for(seats) >= sub.period_amount()[0]


def subscription_sync(*, stripe_sub: dict, now: datetime | None = None) -> Subscription:
    """Make our row and the organization's entitlements match Stripe's object."""
    now = now or timezone.now()
    org = _organization_of(stripe_sub)
    items = stripe_items(stripe_sub)
    if items.overage_price is not None:
        # A retired price made before prices recorded their meter: the grant of the period
        # checks it reads the meter overage is reported to (invoices.overage_price_billed).
        stripe_price_meter_record(price=items.overage_price, meter=items.overage_meter)
    status = str(stripe_sub.get("status") or Status.INCOMPLETE)
    rolled_from = None  # (plan, its credits, its start) of a period that just ended
    with transaction.atomic():
        # Before the organization's row (entitlements below): the rollover's
        # cap takes it, after a listing being created has (market lock order).
        seller_lock(org)
        sub = (
            Subscription.objects.select_for_update()
            .select_related("plan")
            .filter(stripe_subscription_id=stripe_sub["id"])
            .first()
        )
        if (
            sub is not None
            and items.plan_price.plan_id == sub.plan_id
            and sub.known_price() is None
        ):
            # A row synced before the price was recorded, or whose plan was moved without
            # it (a worker of the release before it, during the deploy): Stripe's item at
            # the plan paid for is the price that period was paid at (a member stays on
            # their price until a plan change moves them), as near as can be known now.
            # Before the renewal below reads the ended period's credits from it.
            sub.price = items.plan_price
        if sub is None:
            sub = Subscription(
                organization=org,
                stripe_subscription_id=stripe_sub["id"],
                plan=items.plan_price.plan,
                price=items.plan_price,
                seats=items.seats,
                current_period_start=items.period_start,
                current_period_end=items.period_end,
            )
        elif items.period_start > sub.current_period_start:
            rolled_from = (sub.plan, sub.period_credits(), sub.current_period_start)
            sub.plan, sub.price, sub.seats = items.plan_price.plan, items.plan_price, items.seats
            sub.scheduled_plan = sub.scheduled_seats = None
        elif (items.plan_price.plan_id, items.seats) != (sub.plan_id, sub.seats) or (
            # The same plan and seats at another price than the period's (known by now,
            # above): a member on an old price moved to the plan's price now
            # (checkout.plan_price_move), an upgrade or a downgrade as any change.
            items.plan_price.pk != sub.price_id
        ):
            if plan_change_is_upgrade(sub, items.plan_price, items.seats):
                sub.plan, sub.price = items.plan_price.plan, items.plan_price
                sub.seats = items.seats
                sub.scheduled_plan = sub.scheduled_seats = None
            else:
                sub.scheduled_plan, sub.scheduled_seats = items.plan_price.plan, items.seats
        else:
            sub.scheduled_plan = sub.scheduled_seats = None
        sub.current_period_start = max(sub.current_period_start, items.period_start)
        sub.current_period_end = max(sub.current_period_end, items.period_end)
        sub.overage_price = items.overage_price
        sub.stripe_customer_id = str(stripe_sub.get("customer") or "")
        sub.status = status
        sub.cancel_at_period_end = bool(stripe_sub.get("cancel_at_period_end"))
        sub.canceled_at = ts(stripe_sub.get("canceled_at") or stripe_sub.get("ended_at"))
        if status in (Status.PAST_DUE, Status.UNPAID):
            sub.grace_until = sub.grace_until or now + settings.BILLING_GRACE_PERIOD
        else:
            sub.grace_until = None
        try:
            with transaction.atomic():
                sub.save()
        except IntegrityError:
            # Another live subscription already holds this organization: Stripe
            # allows it, we do not grant twice. Keep it out of our books.
            raise SubscriptionConflict(
                f"organization {org.pk} already has a live subscription; "
                f"{stripe_sub['id']} needs a human"
            ) from None
        # An ended subscription's late event (Stripe's order is not guaranteed) must
        # not take away what the organization's live one entitles it to.
        entitles = sub.live or live_subscription(org) is None
        if entitles:
            entitlements_write(subscription=sub, now=now)
        if rolled_from is not None:
            # In the same transaction as the new period: a crash in between
            # would otherwise save the period and never trim its rollover.
            period_rollover(subscription=sub, previous=rolled_from)
        if entitles and not sub.live:
            # After the rollover: it locks the wallet, which the rollover's trim must
            # lock only after the listings and pending refunds (the market's lock
            # order: a pending refund's sweep holds its row and waits for the wallet).
            # The end state is the same either way; the timing is not. A job holding
            # the period's credits burns its allowance first once that has expired, so
            # ended first, the trim found the plan's lot free and a pending refund took
            # its credits at once; ended after, the refund waits for the job and the
            # excess stays set aside until then. Available credits are the same.
            overage_allowance_end(subscription=sub)
        if sub.status == Status.CANCELED:
            # Canceled at period end, Stripe's deletion comes as the period ends: the
            # cap applies now. Canceled at once, mid-period, the sweep applies it at
            # the period's end (subscriptions_last_period_cap).
            subscription_last_period_cap(subscription_id=sub.pk, now=now)
    return sub


def overage_allowance_end(*, subscription: Subscription) -> int:
    """End the overage allowance when the subscription ends: it expires now.

    Overage is invoiced by the subscription's meter: an ended subscription
    invoices none, so an allowance left to the end of its period (a
    cancellation mid-period) would be credits for nothing. Not a trim: what
    running work holds of the allowance must stay for that work, and a trim
    would leave it an ordinary lot, so that what the work gave back (it used
    less than its worst case, or failed) could be spent, unbilled, until the
    period's end. Expired now, the allowance is burned by that work's capture
    (reported to the meter, stamped before the end: overage.overage_used_at),
    and whatever the work gives back is expired by the next spend or sweep.
    Idempotent: a repeat finds the allowance already ended.
    """
    return lots_expire_now(organization=subscription.organization, source=LotSource.OVERAGE)


def period_rollover(*, subscription: Subscription, previous: tuple) -> int:
    """Expire what exceeds the ended period's rollover cap (once per period).

    `previous` is the ended period's (plan, credits, start): its credits are those its
    price sold (Subscription.period_credits), which its grant gave, so a member on an
    old price keeps a share of what they were sold, whatever the plan gives now.

    The cap counts the credits the organization has listed on the
    marketplace too: otherwise listing them before the period ends and
    taking them back after would carry them all over.
    """
    plan, period_credits, period_start = previous
    return credits_trim_with_listings(
        seller=subscription.organization,
        keep=plan.rollover_cap_of(period_credits),
        key=f"rollover:{subscription.stripe_subscription_id}:{int(period_start.timestamp())}",
        memo=f"rollover cap of {plan.code}: {plan.rollover_percent}% of a month",
    )


def subscription_last_period_cap(*, subscription_id: int, now: datetime | None = None) -> int:
    """Expire what exceeds the rollover cap of a canceled subscription's last period, once
    that period is over (once per subscription). Returns the micro-credits expired.

    A renewal caps the period that ended (`period_rollover`); the last period
    of a canceled subscription has no renewal, so without this its credits,
    which a rollover plan grants until a period after the period's end
    (invoices.invoice_credits), would all carry over, uncapped. The plan
    promises to roll over its cap, not more and not less, whether or not the
    member renews (DESIGN.md: "period end expires what is left beyond the
    rollover cap"); cancelling only stops the grants. So the member keeps up to
    the cap until those credits expire, as a member who renewed would. Not
    before the period is over: a member who cancels at once keeps the period
    they paid for, as a plan without rollover keeps its credits to the period's
    end.

    Not when the organization has a live subscription again (a re-subscription):
    its credits are subscription credits too, and its own renewal caps them all.
    """
    now = now or timezone.now()
    with transaction.atomic():
        organization_id = Subscription.objects.values_list("organization_id", flat=True).get(
            pk=subscription_id
        )
        # subscription_sync's lock order: the seller's market lock, then the subscription.
        sellers_lock([organization_id])
        sub = (
            Subscription.objects.select_for_update(of=("self",))
            .select_related("plan", "price__plan", "organization")
            .get(pk=subscription_id)
        )
        if (
            sub.status != Status.CANCELED
            or sub.last_period_capped_at is not None
            or sub.current_period_end > now
        ):
            return 0
        expired = 0
        if live_subscription(sub.organization) is None:
            # The renewal's key for this period: whichever came, it trims once.
            expired = period_rollover(
                subscription=sub,
                previous=(sub.plan, sub.period_credits(), sub.current_period_start),
            )
        Subscription.objects.filter(pk=sub.pk).update(last_period_capped_at=now)
        return expired


def subscriptions_last_period_cap(*, now: datetime | None = None) -> int:
    """The minute's sweep: the rollover cap of every canceled subscription whose last period
    has ended since (subscription_last_period_cap), each in its own transaction. Returns the
    micro-credits expired."""
    now = now or timezone.now()
    return each_isolated(
        Subscription.objects.filter(
            status=Status.CANCELED, last_period_capped_at__isnull=True, current_period_end__lte=now
        )
        .order_by("pk")
        .values_list("pk", flat=True),
        lambda pk: subscription_last_period_cap(subscription_id=pk, now=now),
        what="the last period's rollover cap of subscription",
    )


def standing_for(subscription: Subscription, now: datetime) -> str:
    if subscription.status in (Status.PAST_DUE, Status.UNPAID):
        if subscription.grace_until and subscription.grace_until > now:
            return Standing.PAST_DUE
        return Standing.SUSPENDED
    return Standing.ACTIVE


def entitlements_write(*, subscription: Subscription, now: datetime) -> bool:
    """Write what the subscription entitles the organization to (DESIGN.md)."""
    org = subscription.organization
    if subscription.status not in _ENTITLED:
        return organization_entitlements_set(
            organization=org,
            reason=f"{subscription.stripe_subscription_id} {subscription.status}",
            standing=Standing.ACTIVE,
            **_DEFAULTS,
        )
    plan = subscription.plan
    return organization_entitlements_set(
        organization=org,
        reason=f"{subscription.stripe_subscription_id} {plan.code}x{subscription.seats} "
        f"{subscription.status}",
        standing=standing_for(subscription, now),
        seats=subscription.seats if plan.seat_based else max(plan.max_seats, 1),
        model_tiers=list(plan.model_tiers),
        max_priority=plan.max_priority,
        requests_per_minute=plan.requests_per_minute,
        tokens_per_minute=plan.tokens_per_minute,
        concurrent_jobs=plan.concurrent_jobs,
    )


def subscriptions_suspend_overdue(*, now: datetime | None = None) -> int:
    """Suspend inference for organizations whose grace period has run out."""
    now = now or timezone.now()
    # Not those already suspended: each would lock its organization's row
    # every minute to write nothing, until Stripe ends the subscription.
    overdue = (
        Subscription.objects.filter(
            status__in=[Status.PAST_DUE, Status.UNPAID], grace_until__lte=now
        )
        .exclude(organization__standing=Standing.SUSPENDED)
        .select_related("organization", "plan")
    )
    changed = 0
    for sub in overdue:
        if entitlements_write(subscription=sub, now=now):
            changed += 1
    return changed


def live_subscription(organization: Organization) -> Subscription | None:
    return (
        Subscription.objects.filter(organization=organization)
        .exclude(status__in=[Status.CANCELED, Status.INCOMPLETE_EXPIRED])
        .select_related("plan", "price__plan", "scheduled_plan")
        .first()
    )
