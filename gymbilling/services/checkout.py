"""Starting a purchase: Checkout for a new subscription or a pack, a direct
Stripe update for a plan or seat change, and the customer portal.

Nothing is written until Stripe has answered: a Stripe outage is a clear 503
(`payments_unavailable`) and leaves no row behind. Credits are never granted
here; they follow the webhook of the paid invoice or session.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import Organization
from gymbilling import stripe_client
from gymbilling.locks import session_lock
from gymbilling.models import (
    BillingCustomer,
    CheckoutKind,
    CheckoutSession,
    CheckoutStatus,
    CreditPack,
    Plan,
    PriceKind,
    StripePrice,
    Subscription,
)
from gymbilling.services.customers import billing_customer_call
from gymbilling.services.subscriptions import (
    SubscriptionUnknown,
    current_overage_price,
    live_subscription,
    plan_change_is_upgrade,
    stripe_items,
    subscription_sync,
    ts,
)
from gymbilling.sweeps import each_isolated

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckoutResult:
    url: str
    # "checkout" (pay on the page), "subscription_updated", "change_scheduled",
    # "change_canceled" (a scheduled change taken back)
    kind: str
    session_id: str = ""


def _unavailable(exc: Exception) -> ApplicationError:
    """Stripe unreachable before any request that charges was sent (a checkout session not
    yet created, a subscription not yet changed, the portal): nothing was charged. A change
    whose own request went unanswered is _unavailable_change's."""
    return ApplicationError(
        code="payments_unavailable",
        message="The payment provider cannot be reached right now; nothing was charged. Try again in a minute.",
        status=503,
    )


def _unavailable_change(*, upgrade: bool) -> ApplicationError:
    """Stripe did not answer the change itself: the request may have reached it and been
    applied (an answer lost on the way back), an upgrade charged with it. Saying "nothing
    was charged" would send the member to try again and pay twice, so it says what may
    have happened and how to see which."""
    if upgrade:
        happened = "if it went through, it was charged and will show here within a minute"
    else:
        happened = "if it went through, it applies from the next period and nothing is charged now"
    return ApplicationError(
        code="payments_unavailable",
        message="The payment provider stopped answering, so we could not confirm the change; "
        f"{happened}. Reload the subscription before trying again.",
        status=503,
    )


def _current_price(
    *, kind: str, plan: Plan | None = None, pack: CreditPack | None = None
) -> StripePrice:
    price = StripePrice.objects.filter(kind=kind, plan=plan, pack=pack, current=True).first()
    if price is None:
        raise ApplicationError(
            code="not_for_sale",
            message="This item has no price at the payment provider yet; staff must run stripe_sync_catalog.",
            status=409,
        )
    return price


def provider_refused(exc: stripe_client.StripeRequestRefused) -> ApplicationError:
    """Stripe refused a request this service built (a customer deleted at Stripe, a portal
    with no configuration, a subscription Stripe already ended): nothing was charged, and
    sending it again will not help. A 502 with Stripe's error code and request id, not a
    500. Stripe's own text is logged, not answered: it is written for the account's
    operators (object ids, live or test mode, the dashboard's settings), except a card
    decline's, which Stripe writes for the card holder."""
    logger.error(
        "Stripe refused a request (%s, HTTP %s, request %s): %s",
        exc.code or "no code",
        exc.status,
        exc.request_id or "without an id",
        exc,
    )
    stripe_code = f" ({exc.code})" if exc.code else ""
    said = f": {exc}" if isinstance(exc, stripe_client.StripeCardDeclined) else ""
    return ApplicationError(
        code="payment_provider_refused",
        message=f"The payment provider refused the request{stripe_code}{said}. Nothing was "
        "charged; contact support, with this error's provider_request_id, if it persists.",
        status=502,
        extra={"provider_code": exc.code or None, "provider_request_id": exc.request_id},
    )


def _require_configured() -> None:
    if not stripe_client.configured():
        raise ApplicationError(
            code="billing_not_configured",
            message="Billing is not enabled on this deployment (STRIPE_SECRET_KEY is not set).",
            status=503,
        )


def _urls() -> tuple[str, str]:
    base = settings.SITE_URL.rstrip("/")
    return f"{base}/billing/?checkout=success", f"{base}/billing/?checkout=canceled"


def checkout_create(
    *,
    organization: Organization,
    plan: Plan | None = None,
    pack: CreditPack | None = None,
    seats: int = 1,
) -> CheckoutResult:
    """Subscribe, change plan or seats, or buy a pack."""
    _require_configured()
    if (plan is None) == (pack is None):
        raise ApplicationError(
            code="invalid_request", message="Give exactly one of plan or pack.", param="plan"
        )
    if plan is not None:
        if not plan.active:
            raise ApplicationError(
                code="plan_not_available",
                message=f"The plan {plan.code!r} is not offered.",
                param="plan",
            )
        if not plan.seat_based and seats != 1:
            raise ApplicationError(
                code="invalid_seats",
                message=f"The plan {plan.code!r} is not sold per seat; use seats=1.",
                param="seats",
            )
        if not plan.min_seats <= seats <= plan.max_seats:
            raise ApplicationError(
                code="invalid_seats",
                message=f"The plan {plan.code!r} takes {plan.min_seats} to {plan.max_seats} seats.",
                param="seats",
            )
        current = live_subscription(organization)
        if current is not None:
            return subscription_change(subscription=current, plan=plan, seats=seats)
    elif not pack.active:
        raise ApplicationError(
            code="pack_not_available",
            message=f"The pack {pack.code!r} is not offered.",
            param="pack",
        )
    elif seats != 1:
        raise ApplicationError(
            code="invalid_seats",
            message="A credit pack is bought one at a time; leave seats out.",
            param="seats",
        )
    try:
        return _session_create(organization=organization, plan=plan, pack=pack, seats=seats)
    except stripe_client.StripeUnavailable as exc:
        raise _unavailable(exc) from exc
    except stripe_client.StripeRequestRefused as exc:
        raise provider_refused(exc) from exc


# How long a subscription Checkout session can be paid: Stripe is told to expire it then
# (`expires_at`; its default, 24 hours, is also its maximum, which a clock a little behind
# Stripe's would overstep), and an open session younger than this is reused or expired
# here. The two must agree: a session still payable at Stripe but older than what is
# looked at here would be paid beside the next one, a second subscription charged monthly.
_SESSION_REUSE = timedelta(hours=23)
# A session handed out again has at least this long left to be paid in; an older one is
# expired at Stripe and a new one opened (a URL dead a minute after it was given is no use).
_SESSION_REUSE_LEFT = timedelta(minutes=30)


def _open_subscription_checkout(*, organization, plan, seats) -> CheckoutResult | None:
    """One open subscription checkout per organization.

    Two tabs paying two sessions would make two Stripe subscriptions, each
    charged monthly. The same plan and seats reuse the open session while it has
    half an hour left to be paid in; another choice, or an older one, expires it
    at Stripe first.
    """
    now = timezone.now()
    reusable_since = now - _SESSION_REUSE + _SESSION_REUSE_LEFT
    for session in CheckoutSession.objects.filter(
        organization=organization,
        kind=CheckoutKind.SUBSCRIPTION,
        status=CheckoutStatus.OPEN,
        created_at__gte=now - _SESSION_REUSE,
    ):
        if (session.plan_id, session.seats) == (plan.pk, seats) and (
            session.created_at >= reusable_since
        ):
            return CheckoutResult(
                url=session.url, kind="checkout", session_id=session.stripe_session_id
            )
        try:
            stripe_client.checkout_session_expire(session.stripe_session_id)
        except stripe_client.StripeRequestRefused as exc:
            if exc.status != 400:  # 400: already complete or expired at Stripe
                raise
            raise ApplicationError(
                code="checkout_in_progress",
                message="A subscription checkout of this organization was just completed; "
                "reload the subscription before changing it.",
                status=409,
            ) from exc
        CheckoutSession.objects.filter(pk=session.pk).update(status=CheckoutStatus.EXPIRED)
    return None


def _purchase_lock(organization: Organization):
    """One subscription purchase of the organization at a time, in every process: a new
    subscription's checkout or a change of its live one.

    Each is a read (our rows, Stripe's subscription), a decision, then Stripe calls: two
    at once (two tabs, the API and the dashboard) would decide from the same state and
    both act on it, as if the other had not happened. A session lock, held across the
    Stripe calls with no transaction open (the calls are not rolled back with one), so
    the later request decides from what the earlier one did, as one after the other.
    """
    return session_lock(f"subscription-checkout:{organization.pk}")


def _session_create(*, organization, plan, pack, seats) -> CheckoutResult:
    if plan is None:
        return billing_customer_call(
            organization=organization,
            call=lambda customer: _session_open(
                customer=customer, organization=organization, plan=None, pack=pack, seats=1
            ),
        )
    # The one-open-session rule is a read, Stripe calls, then a write: two requests at
    # once (two tabs, two plans) would both find none open and both open one, each
    # payable, each a subscription charged monthly. Under the lock the later request
    # finds the earlier's session, as it would one request after the other.
    with _purchase_lock(organization):
        reused = _open_subscription_checkout(organization=organization, plan=plan, seats=seats)
        if reused is not None:
            return reused

        def subscribe(customer: BillingCustomer) -> CheckoutResult:
            _refuse_if_subscribed_at_stripe(customer)
            return _session_open(
                customer=customer, organization=organization, plan=plan, pack=None, seats=seats
            )

        return billing_customer_call(organization=organization, call=subscribe)


# Stripe's subscription statuses that charge, now or once paid.
_CHARGING = frozenset({"active", "trialing", "past_due", "incomplete", "unpaid"})


def _refuse_if_subscribed_at_stripe(customer: BillingCustomer) -> None:
    """Refuse (409 `subscription_exists`, nothing opened) a new subscription's checkout while
    the customer has one at Stripe, and mirror it here.

    Our mirror shows none, but it is only as current as the webhooks processed: a
    checkout paid in its last minutes, whose events are late (Stripe's retries after an
    outage of ours, a worker backlog, or our row marked complete before Stripe could be
    read for its subscription), is no longer looked at here (_open_subscription_checkout:
    23 hours), and a second session paid beside it would be a second subscription charged
    monthly, whose events then fail as a conflict and grant nothing. Stripe is asked,
    under the purchase lock, before any session is opened; what it has is synced now, as
    its webhook would (the member's next request sees the subscription, and changes it).
    """
    found = [
        stripe_sub
        for stripe_sub in stripe_client.subscriptions_list(customer=customer.stripe_customer_id)
        if stripe_sub.get("status") in _CHARGING
    ]
    if not found:
        return
    for stripe_sub in found:
        try:
            subscription_sync(stripe_sub=stripe_sub)
        except SubscriptionUnknown as exc:
            # Not one we can mirror (made by hand at Stripe, a price not ours): it still
            # charges, so a second one is refused all the same; support sorts it out.
            logger.warning("subscription %s not mirrored: %s", stripe_sub.get("id"), exc)
    raise ApplicationError(
        code="subscription_exists",
        message="This organization already has a subscription at the payment provider "
        "(a checkout paid recently, still being set up here). Nothing new was opened or "
        "charged: reload the billing page in a minute to see it, and change it from there.",
        status=409,
    )


def _session_open(*, customer: BillingCustomer, organization, plan, pack, seats) -> CheckoutResult:
    success_url, cancel_url = _urls()
    metadata = {"organization_id": str(organization.pk)}
    if plan is not None:
        price = _current_price(kind=PriceKind.PLAN, plan=plan)
        items = [{"price": price.stripe_price_id, "quantity": seats}]
        metadata["plan"] = plan.code
        overage = current_overage_price(plan)
        if overage is not None:
            items.append({"price": overage.stripe_price_id})
        params = {
            "mode": "subscription",
            "line_items": items,
            "subscription_data": {"metadata": metadata},
            "expires_at": int((timezone.now() + _SESSION_REUSE).timestamp()),
        }
        kind = CheckoutKind.SUBSCRIPTION
        credits = None  # a subscription's are granted by its invoices, at their lines' prices
    else:
        price = _current_price(kind=PriceKind.PACK, pack=pack)
        metadata["pack"] = pack.code
        params = {
            "mode": "payment",
            "line_items": [{"price": price.stripe_price_id, "quantity": 1}],
            "payment_intent_data": {"metadata": metadata},
        }
        kind = CheckoutKind.PACK
        # What this price sells, fixed now: the grant gives these, whatever finance change
        # before it is paid. A price made by hand without them sells the pack's now.
        credits = pack.credits if price.credits is None else price.credits
    session = stripe_client.checkout_session_create(
        key=f"checkout:{organization.pk}:{uuid.uuid4()}",
        customer=customer.stripe_customer_id,
        client_reference_id=str(organization.pk),
        success_url=success_url,
        cancel_url=cancel_url,
        metadata=metadata,
        **params,
    )
    CheckoutSession.objects.create(
        stripe_session_id=session["id"],
        organization=organization,
        kind=kind,
        plan=plan,
        pack=pack,
        seats=seats,
        price=price,
        credits=credits,
        url=session["url"],
        amount_total=int(session.get("amount_total") or 0),
        currency=str(session.get("currency") or price.currency),
    )
    return CheckoutResult(url=session["url"], kind="checkout", session_id=session["id"])


def subscription_change(*, subscription: Subscription, plan: Plan, seats: int) -> CheckoutResult:
    """Change the plan or seats of a live subscription, with the card on file.

    An upgrade is invoiced at once for the prorated difference (and, paid,
    grants the prorated credits); a downgrade changes the price from the next
    period, and the organization keeps what it paid for until then. Its own plan
    stays at the price the member pays, another plan is at its price now
    (plan_change_price); its own plan and seats as they are, asked for by a member on an
    old price of it, move it to the plan's price now, an upgrade or a downgrade by what
    the member pays (plan_price_move).
    """
    with _purchase_lock(subscription.organization):
        try:
            return _change(subscription=subscription, plan=plan, seats=seats)
        except stripe_client.StripeUnavailable as exc:
            raise _unavailable(exc) from exc
        except stripe_client.StripeCardDeclined as exc:
            raise ApplicationError(
                code="card_declined",
                message=f"The card on file was declined ({exc}); update it in the billing portal.",
                status=402,
            ) from exc
        except stripe_client.StripeRequestRefused as exc:
            raise provider_refused(exc) from exc


def _change(*, subscription: Subscription, plan: Plan, seats: int) -> CheckoutResult:
    # The decision is made from our row, made current inside the lock:
    # - Stripe's object alone cannot say what this period was paid at: a scheduled
    #   downgrade is Stripe's item already at the cheaper price (proration "none"), so
    #   an item at Basic may be Basic paid for, or Pro paid for with Basic from the next
    #   period. Our row keeps the plan paid for (`plan`) apart from the scheduled one,
    #   as long as it has seen each state of the item, in order.
    # - Webhooks bring those states, late: a change made before the previous change's
    #   webhook decided from the plan before it (A->B then B->C computed as A->C). So
    #   Stripe's subscription is read and synced first, as its webhook would be (the
    #   previous change, a renewal, a cancellation, a change in the portal), and each
    #   change's own answer is synced before the lock is released (the entitlements
    #   follow at once). The webhooks' later syncs of the same objects change nothing.
    _refuse_while_unconfirmed(subscription)
    stripe_sub = stripe_client.subscription_retrieve(subscription.stripe_subscription_id)
    stripe_sub = _lift_undo(stripe_sub=stripe_sub)
    subscription = _mirror(stripe_sub)
    moving = plan_change_refuse(subscription=subscription, plan=plan, seats=seats)
    # Taking back a scheduled change: this period is paid at the current plan and
    # seats already, so Stripe's item only goes back to them, at the price paid,
    # charging nothing (an always_invoice would prorate from the scheduled price and
    # charge it twice).
    restore = moving is None and (plan.pk, seats) == (subscription.plan_id, subscription.seats)
    price = moving or plan_change_price(subscription=subscription, plan=plan)
    upgrade = not restore and plan_change_is_upgrade(subscription, price, seats)
    # A scheduled downgrade already set Stripe's item to its cheaper price: an upgrade
    # would be prorated from that, charging again for the part of this period already
    # paid at the current plan. The item goes back to the price paid first.
    paid_price = (
        plan_change_price(subscription=subscription, plan=subscription.plan)
        if upgrade and subscription.scheduled_plan_id
        else None
    )
    key = f"change:{subscription.stripe_subscription_id}:{plan.code}:{seats}:{uuid.uuid4()}"
    item = _plan_item(stripe_sub)
    # Made usable at Stripe before anything changes there: one failing leaves all as it was.
    lift_to = (
        _item_change(item, at=item["price"]["id"], price=paid_price, seats=subscription.seats)
        if paid_price is not None
        else None
    )
    change_to = _item_change(
        item,
        at=paid_price.stripe_price_id if paid_price else item["price"]["id"],
        price=price,
        seats=seats,
    )
    lifted = None
    if paid_price is not None:
        try:
            lifted = _lift(
                stripe_sub=stripe_sub,
                item=item,
                change=lift_to,
                price_id=paid_price.stripe_price_id,
                key=key,
            )
        except stripe_client.StripeUnavailable:
            # The lift's answer may be lost with the lift made (and its marker set), or the
            # lift still on its way, to land later: nothing is charged by it, and nothing
            # upgraded, but the downgrade must go back, and no change may run before the
            # lift could land (_refuse_while_unconfirmed), or it would override that change.
            _lift_undo_later(subscription, countdown=_LIFT_UNDO_DELAY_S)
            raise
    try:
        changed = stripe_client.subscription_update(
            subscription.stripe_subscription_id,
            key=key,
            items=[
                change_to,
                # An upgrade's entitlements, the overage allowance among them, apply now:
                # so does the price that invoices that overage, in the same request. A
                # downgrade leaves it: this period's overage is the dearer plan's, billed
                # at its price by the renewal invoice (subscription_overage_align after it).
                *(overage_item_changes(stripe_sub, plan=plan) if upgrade else []),
            ],
            proration_behavior="always_invoice" if upgrade else "none",
            # An upgrade is charged now: a card that declines must leave the
            # subscription as it was (Stripe's default, allow_incomplete, would
            # apply the upgrade unpaid and put the whole subscription past due).
            **({"payment_behavior": "error_if_incomplete"} if upgrade else {}),
            # Whatever this change did, no lifted downgrade is left to put back.
            metadata={"plan": plan.code, LIFTED: ""},
        )
    except stripe_client.StripeUnavailable:
        # Unknown whether the change was made (Stripe may have applied it and the answer
        # been lost, or apply it late): a change run before it could land would be
        # overridden by it (refused until then: _refuse_while_unconfirmed). An upgrade
        # landing late is charged from what that change left; a downgrade landing late
        # sets the item back to the cheaper price after an upgrade paid for the period.
        # After a lift, putting the downgrade back now could undo a paid upgrade. The
        # change clears the marker in the same request, so a marker still there later
        # says it was not made, and the downgrade goes back then (by a task, or by this
        # subscription's next change, whichever is first); with no lift, the task finds
        # no marker and only ends the wait.
        _lift_undo_later(subscription, countdown=_LIFT_UNDO_DELAY_S)
        if lifted is not None:
            raise _unavailable_lifted(plan=subscription.scheduled_plan) from None
        raise _unavailable_change(upgrade=upgrade) from None
    except stripe_client.StripeRequestRefused:
        # Refused or declined: Stripe applied none of it; the scheduled downgrade goes
        # back as it was.
        if lifted is not None:
            try:
                _lift_undo(stripe_sub=lifted)
            except stripe_client.StripeUnavailable:
                _lift_undo_later(subscription, countdown=0)
                raise _unavailable_lifted(plan=subscription.scheduled_plan) from None
        raise
    _mirror(changed)
    # This change's request cleared the marker at Stripe (LIFTED: "" above), whatever an
    # earlier interrupted upgrade had lifted: nothing is left to put back, so nothing is
    # due. Left set, the sweep would read Stripe for nothing, and the earlier upgrade's
    # task would still run on a later lift's marker (subscription_downgrade_restore).
    _downgrade_restore_done(subscription)
    success_url, _ = _urls()
    if restore:
        return CheckoutResult(url=success_url, kind="change_canceled")
    return CheckoutResult(
        url=success_url, kind="subscription_updated" if upgrade else "change_scheduled"
    )


def plan_change_ask(*, subscription: Subscription, plan: Plan, seats: int) -> StripePrice | None:
    """plan_change_refuse, for the billing page before it asks the member to confirm a
    change: a question whose "yes" could only be refused is not asked, and nothing the
    change would do is refused.

    Every refusal there depends on Stripe's subscription, which changes without us: our
    row is only as current as the webhooks processed, and one late or being retried
    leaves it showing a cancellation the member took back in the portal, the plan or
    seats before a change there, or a scheduled change a renewal has applied. The change
    itself decides after syncing from Stripe, so a refusal from the row alone would
    refuse what its "yes" does. What the row refuses is read from Stripe, synced as the
    change syncs it, and decided again; what the row allows is asked without a Stripe
    call (the "yes" decides again, synced). Stripe unreachable is a 503
    (payments_unavailable): neither the row's refusal nor a question can be trusted.
    """
    try:
        return plan_change_refuse(subscription=subscription, plan=plan, seats=seats)
    except ApplicationError:
        if not stripe_client.configured():
            raise  # no Stripe to read: the row is all there is, and the "yes" fails anyway
    # Under the purchase lock, as the change's own sync: Stripe's subscription read before a
    # change made meanwhile and mirrored after it would take our row back to before it. No
    # transaction is open across the Stripe call (the lock has its own connection).
    with _purchase_lock(subscription.organization):
        try:
            stripe_sub = stripe_client.subscription_retrieve(subscription.stripe_subscription_id)
        except stripe_client.StripeUnavailable as exc:
            raise _unavailable(exc) from exc
        except stripe_client.StripeRequestRefused as exc:
            raise provider_refused(exc) from exc
        subscription = _mirror(stripe_sub)
    return plan_change_refuse(subscription=subscription, plan=plan, seats=seats)


def plan_change_refuse(*, subscription: Subscription, plan: Plan, seats: int) -> StripePrice | None:
    """Refuse, from our row of `subscription`, a change to `plan` x `seats` that can only
    fail; else the move to the plan's price now that it is (plan_price_move), or None.

    Only as true as the row is current: the change asks it of the row synced from Stripe
    inside its lock, the billing page through plan_change_ask (a refusal synced first).
    """
    if not subscription.live:
        raise ApplicationError(
            code="subscription_ended",
            message="The subscription has ended; subscribe again to choose a plan.",
            status=409,
        )
    if subscription.cancel_at_period_end:
        # The member's cancellation stands until they take it back: a change would
        # either undo it without saying so (renewing, and charging, a subscription they
        # cancelled) or charge an upgrade for a subscription about to end.
        raise ApplicationError(
            code="subscription_canceling",
            message=(
                "The subscription is cancelled: it ends with its period, on "
                f"{subscription.current_period_end.date().isoformat()}. Renew it in the "
                "billing portal (POST /api/v1/billing/portal) first to change its plan or "
                "seats."
            ),
            status=409,
        )
    # The member's own plan and seats, asked for while they pay an old price of it and
    # nothing is scheduled: a move to the plan's price now, an upgrade or a downgrade by
    # what they pay as any other change (plan_price_move).
    moving = plan_price_move(subscription=subscription, plan=plan, seats=seats)
    if (
        (plan.pk, seats) == (subscription.plan_id, subscription.seats)
        and not subscription.scheduled_plan_id
        and moving is None
    ):
        paid = subscription.known_price()
        raise ApplicationError(
            code="no_change",
            message=(
                "The subscription already has this plan and seats. The plan sells in "
                f"{plan.currency.upper()} now, and a subscription cannot change currency: "
                "cancel it and subscribe again to pay its current price."
                if paid is not None and paid.currency != plan.currency
                else "The subscription already has this plan and seats, at the plan's "
                "current price."
            ),
            status=409,
        )
    # Against the currency the member pays in (their price's), not the one their plan
    # sells in now: Stripe keeps a customer, and its subscription's items, in one currency,
    # and a member left on an old price pays in its currency whatever finance sell the plan
    # in since. What the change is made at must be in it: their own plan at the price they
    # pay (a change of seats, a scheduled change taken back), another plan at its price now.
    _, paying_in = subscription.period_amount()
    made_at = moving or plan_change_price(subscription=subscription, plan=plan)
    if made_at.currency != paying_in:
        raise ApplicationError(
            code="currency_mismatch",
            message=(
                f"The subscription is paid in {paying_in.upper()} and {plan.name} sells in "
                f"{made_at.currency.upper()}: a subscription cannot change currency. Cancel "
                "it and subscribe again."
            ),
            param="plan",
        )
    return moving


@dataclass(frozen=True)
class PlanOffer:
    """A plan as the billing page offers it: at the price a purchase of it, or a change of
    the subscription to it, is made at (`unit_amount` and `credits` per seat where the plan
    is sold per seat); `refused`, one line saying why it cannot be had, empty when it can."""

    plan: Plan
    unit_amount: int
    currency: str
    credits: int
    refused: str = ""


def plan_offers(*, plans, subscription: Subscription | None) -> list[PlanOffer]:
    """`plans` as offered to an organization with `subscription` (None: it has none).

    Without a subscription every plan is offered at its current price, whatever its
    currency: checkout starts a new subscription at it (a Stripe customer whose
    subscriptions have all ended may subscribe in another currency). With one, a plan is
    offered only in the currency its subscription is paid in, the rule plan_change_refuse
    applies to a change: another plan at its price now; its own plan at its price now,
    or, sold now in another currency, at the price they pay (a change of seats stays on
    it: plan_change_price). A plan sold in another currency is still listed, with why it
    cannot be had, rather than left out: members compare plans with the public price
    list, and one gone from the page would read as withdrawn, not as out of reach of
    this subscription (cancel it and subscribe again). A plan with no price synced yet
    shows what the plan says; buying it is refused as not for sale, as before.
    """
    current = {
        price.plan_id: price
        for price in StripePrice.objects.filter(
            kind=PriceKind.PLAN, current=True, plan__in=plans
        ).select_related("plan")
    }
    paying_in = subscription.period_amount()[1] if subscription is not None else None
    offers = []
    for plan in plans:
        price = current.get(plan.pk)
        if (
            subscription is not None
            and plan.pk == subscription.plan_id
            and (price is None or price.currency != paying_in)
        ):
            price = subscription.known_price() or price
        if price is None:
            offers.append(
                PlanOffer(
                    plan=plan,
                    unit_amount=plan.monthly_price,
                    currency=plan.currency,
                    credits=plan.monthly_credits,
                )
            )
            continue
        refused = ""
        if paying_in is not None and price.currency != paying_in:
            refused = (
                f"Sold in {price.currency.upper()}, and your subscription is paid in "
                f"{paying_in.upper()}: a subscription cannot change currency."
            )
        offers.append(
            PlanOffer(
                plan=plan,
                unit_amount=price.plan_amount_for(1),
                currency=price.currency,
                credits=price.plan_credits_for(1),
                refused=refused,
            )
        )
    return offers


def plan_change_price(*, subscription: Subscription, plan: Plan) -> StripePrice:
    """The price a change of `subscription` to `plan`, at any seats, is made at.

    Its own plan stays at the price the member pays (`Subscription.price`), whatever the
    plan sells for now: taking back a scheduled change, the item put back before an upgrade
    is prorated, and a change of seats alike (the same plan at the same unit price; a
    price is per seat where the plan is). Another plan is a new purchase, at its price now.
    A row synced before prices were recorded (null) reads its plan's price now, as before.
    """
    # known_price: a stale price of another plan (a worker of the release before the
    # column moved the plan without it) is not what the member pays for any plan.
    paid = subscription.known_price()
    if paid is not None and paid.plan_id == plan.pk:
        return paid
    return _current_price(kind=PriceKind.PLAN, plan=plan)


def plan_price_move(*, subscription: Subscription, plan: Plan, seats: int) -> StripePrice | None:
    """The price now of the member's own plan, when a change to `plan` x `seats` is a move
    to it; None when it is not.

    A member left on an old price of their plan (finance changed it since) keeps that price
    through every change that stays on the plan (plan_change_price), so asking for their
    plan and seats as they are is what moves them to the price the plan sells at now. Only
    while nothing is scheduled: with a change scheduled, the same request takes it back
    (a scheduled move to the price now among them). None too when they pay the current
    price already, or their price is unknown (no_change, as before), or the plan has no
    current price, or sells in another currency than they pay in now.
    """
    if (plan.pk, seats) != (subscription.plan_id, subscription.seats):
        return None
    if subscription.scheduled_plan_id:
        return None
    paid = subscription.known_price()
    current = StripePrice.objects.filter(kind=PriceKind.PLAN, plan=plan, current=True).first()
    if paid is None or current is None or current.pk == paid.pk:
        return None
    if current.currency != paid.currency:
        # Not a move there is: Stripe keeps a customer in one currency. Asking for their
        # plan and seats as they are then changes nothing (no_change, plan_change_refuse).
        return None
    return current


def _item_change(item: dict, *, at: str, price: StripePrice, seats: int) -> dict:
    """Stripe's item change that puts the plan item, its price then `at` (a price id), at
    `price` x `seats`.

    The price is sent only when it changes, made usable first (_price_usable). Called
    before the change is sent, so a Stripe that cannot be reached fails it with nothing
    changed there."""
    change = {"id": item["id"], "quantity": seats}
    if price.stripe_price_id != at:
        _price_usable(price.stripe_price_id)
        change["price"] = price.stripe_price_id
    return change


def _price_usable(price_id: str) -> None:
    """Make `price_id` one Stripe will put an item on. A price the catalog has retired
    since (a member's old price, or the one a scheduled downgrade was made at:
    StripePrice.current false) is archived at Stripe, which refuses to put an item on it:
    it is made active again, here, each time a change needs it. The daily sweep
    (catalog.stripe_prices_retired_archive) archives it again once no subscription of
    ours may need it, so that Stripe's own Checkout and dashboard do not sell it; should
    it archive one between this and the change, Stripe refuses the change (nothing
    changed) and asking again succeeds. A price we do not know is sent as it is, as
    before."""
    if StripePrice.objects.filter(stripe_price_id=price_id, current=False).exists():
        stripe_client.price_reactivate(price_id)


def _mirror(stripe_sub: dict) -> Subscription:
    try:
        return subscription_sync(stripe_sub=stripe_sub)
    except SubscriptionUnknown as exc:
        raise ApplicationError(
            code="subscription_unknown",
            message="The subscription is not one this organization can change here; "
            "contact support.",
            status=409,
        ) from exc


# The subscription's metadata key at Stripe while an upgrade has put the plan paid for
# back on the item (lifting the scheduled downgrade, see _change) and not finished: what
# to put back. At Stripe, not in our row: it is written in the same request as the lift,
# and cleared in the same request as the upgrade, so it is there exactly while the
# downgrade is lifted, whatever was lost between.
LIFTED = "gym_lifted_downgrade"
# How long after an upgrade Stripe did not answer its lifted downgrade is put back: a
# request whose answer was lost may still be applied at Stripe meanwhile.
_LIFT_UNDO_DELAY_S = 60


def _lift(*, stripe_sub: dict, item: dict, change: dict, price_id: str, key: str) -> dict:
    """Put the plan item back at the price and seats paid for (`change`, to `price_id`),
    charging nothing now, and mark what was scheduled; returns Stripe's subscription after."""
    start = int(stripe_items(stripe_sub).period_start.timestamp())
    scheduled = f"{item['price']['id']} {int(item.get('quantity') or 1)}"
    return stripe_client.subscription_update(
        stripe_sub["id"],
        key=f"{key}:paid",
        items=[change],
        proration_behavior="none",
        metadata={LIFTED: f"{key} {start} {price_id} {change['quantity']} {scheduled}"},
    )


def _lift_undo(*, stripe_sub: dict) -> dict:
    """Put back the scheduled downgrade an unfinished upgrade lifted, if the item is still
    as the lift left it, in the same period; returns Stripe's subscription after.

    Safe to run twice, and from the task and a change alike: one idempotency key per lift.
    """
    marker = str((stripe_sub.get("metadata") or {}).get(LIFTED) or "")
    parts = marker.split(" ")
    if len(parts) != 6:
        return stripe_sub
    key, start, lifted_price, lifted_seats, scheduled_price, scheduled_seats = parts
    item = _plan_item(stripe_sub)
    now = (
        item["price"]["id"],
        str(int(item.get("quantity") or 1)),
        str(int(stripe_items(stripe_sub).period_start.timestamp())),
    )
    if now != (lifted_price, lifted_seats, start):
        # Renewed since, or changed elsewhere (the portal): the downgrade was for a
        # period that is over, or someone chose again. The next change clears the marker.
        return stripe_sub
    # The catalog may have retired the downgrade's price since it was scheduled: refused
    # by Stripe, the marker would stay, every later change fail, and the renewal charge
    # the dearer plan.
    _price_usable(scheduled_price)
    return stripe_client.subscription_update(
        stripe_sub["id"],
        key=f"{key}:scheduled",
        items=[{"id": item["id"], "price": scheduled_price, "quantity": int(scheduled_seats)}],
        proration_behavior="none",
        metadata={LIFTED: ""},
    )


def _refuse_while_unconfirmed(subscription: Subscription) -> None:
    """Refuse (409 `change_pending`, nothing sent to Stripe, nothing written) every change
    while an earlier upgrade's request, or its lift, that Stripe did not answer may still
    land there: until our row's due time (_lift_undo_later, _LIFT_UNDO_DELAY_S).

    Whatever Stripe shows now: a request whose answer was lost may be applied late, after
    a change read Stripe without it. A lift landing then takes the item back to the plan
    paid for and marks it, and the restore puts the old downgrade back, over what the
    member chose meanwhile; an upgrade landing then is prorated from that choice. And
    with the lift shown (its marker), putting the downgrade back inline, as a later change
    otherwise does, races the upgrade: it lands, charged from the cheaper price, and the
    retry lifts and upgrades again, charging it a second time. The 503 freed its form
    token and Idempotency-Key (nothing was confirmed done), so a resend comes at once.
    """
    due = (
        Subscription.objects.filter(pk=subscription.pk)
        .values_list("downgrade_restore_due_at", flat=True)
        .first()
    )
    now = timezone.now()
    if due is not None and due > now:
        wait = max(1, math.ceil((due - now).total_seconds()))
        raise ApplicationError(
            code="change_pending",
            message="The previous plan change is still being confirmed with the payment "
            f"provider. Nothing was done: try again in {wait} seconds.",
            status=409,
            extra={"retry_after": wait},
        )


def _lift_undo_later(subscription: Subscription, *, countdown: int) -> None:
    from gymbilling.tasks import subscription_downgrade_restore_task

    pk = subscription.pk
    # Recorded on our row first: until it is due no change runs (_refuse_while_unconfirmed).
    # And the task gives up after its retries (Stripe down for half an hour), or never
    # reaches a broker, and with no later change of this subscription the marker would
    # stay at Stripe and the scheduled downgrade be lost at renewal. The sweep
    # (subscriptions_downgrade_restore) takes up what is still due. Under the purchase
    # lock, as the restore that clears it.
    Subscription.objects.filter(pk=pk).update(
        downgrade_restore_due_at=timezone.now() + timedelta(seconds=countdown)
    )
    # robust: a broker that cannot take it must not turn the member's 503 into a 500;
    # the marker stays at Stripe, and the subscription's next change puts it back.
    transaction.on_commit(
        lambda: subscription_downgrade_restore_task.apply_async(args=[pk], countdown=countdown),
        robust=True,
    )


def _unavailable_lifted(*, plan: Plan | None) -> ApplicationError:
    scheduled = f" to {plan.name}" if plan is not None else ""
    return ApplicationError(
        code="payments_unavailable",
        message="The payment provider stopped answering during the change. Unless the "
        f"upgrade went through (charged, then), your scheduled change{scheduled} is kept "
        "(it is put back at the payment provider as soon as it answers); reload the "
        "subscription in a minute to see which, then try again.",
        status=503,
    )


def subscription_downgrade_restore(*, subscription_pk: int, now: datetime | None = None) -> bool:
    """Put back a scheduled downgrade that an interrupted upgrade lifted (its task retries
    while Stripe is unreachable); False when there is none to put back, or none due yet.

    Only once our row says it is due, read under the purchase lock: a later change that
    went through cleared it (its request cleared the marker), and a later interrupted
    upgrade set it again, to its own delay. An earlier upgrade's task (or a sweep that
    listed the row before that change) acting then would put back the later lift's
    downgrade while that upgrade's lost request may still land at Stripe, charged from
    the cheaper price (_refuse_while_unconfirmed's race). That lift's own task, or the
    sweep, puts it back once due.
    """
    subscription = (
        Subscription.objects.select_related("organization").filter(pk=subscription_pk).first()
    )
    if subscription is None:
        return False
    with _purchase_lock(subscription.organization):
        due = (
            Subscription.objects.filter(pk=subscription.pk)
            .values_list("downgrade_restore_due_at", flat=True)
            .first()
        )
        if due is None or due > (now or timezone.now()):
            return False
        try:
            stripe_sub = stripe_client.subscription_retrieve(subscription.stripe_subscription_id)
            restored = _lift_undo(stripe_sub=stripe_sub)
        except stripe_client.StripeRequestRefused as exc:
            if exc.status in (401, 403):  # our credentials, not this request: retried
                raise
            # The subscription is gone at Stripe, or Stripe will not take the item back:
            # sending it again will not help. Logged for support, no longer retried.
            logger.error(
                "subscription %s: its lifted downgrade cannot be put back (%s): %s",
                subscription.stripe_subscription_id,
                exc.code or exc.status,
                exc,
            )
            _downgrade_restore_done(subscription)
            return False
        # Unreachable (StripeUnavailable): raised, the row still due, for a retry.
        _downgrade_restore_done(subscription)
        if restored is stripe_sub:
            return False
        _mirror(restored)
        return True


def _downgrade_restore_done(subscription: Subscription) -> None:
    Subscription.objects.filter(pk=subscription.pk).update(downgrade_restore_due_at=None)


def subscriptions_downgrade_restore(*, now=None) -> int:
    """The sweep behind subscription_downgrade_restore_task: every live subscription whose
    lifted downgrade is due to go back (the task gave up while Stripe was down, or was
    never queued), put back now; each on its own, one failing leaves the others. Returns
    how many were put back."""
    now = now or timezone.now()
    return each_isolated(
        Subscription.objects.filter(downgrade_restore_due_at__lte=now)
        .exclude(status__in=[Subscription.Status.CANCELED, Subscription.Status.INCOMPLETE_EXPIRED])
        .order_by("pk")
        .values_list("pk", flat=True),
        lambda pk: int(subscription_downgrade_restore(subscription_pk=pk, now=now)),
        what="putting back the lifted downgrade of subscription",
    )


def _plan_item(stripe_sub: dict) -> dict:
    plan_prices = set(
        StripePrice.objects.filter(kind=PriceKind.PLAN).values_list("stripe_price_id", flat=True)
    )
    for item in (stripe_sub.get("items") or {}).get("data") or []:
        if (item.get("price") or {}).get("id") in plan_prices:
            return item
    raise ApplicationError(
        code="subscription_unknown",
        message="The subscription has no plan item we know; contact support.",
        status=409,
    )


def overage_item_changes(stripe_sub: dict, *, plan: Plan) -> list[dict]:
    """The item changes that leave Stripe's subscription with `plan`'s current overage
    price, and no other of ours: the existing overage item's price swapped, one added, or
    the item deleted when the plan has no overage; none when it is so already.

    None either when the plan's overage sells in another currency than the subscription
    is in: Stripe keeps a subscription in one currency for life and refuses (400) a price
    in another on any of its items, which would fail the whole change (a member on an old
    price of their plan changing its seats, a renewal's alignment). The overage item stays
    at the price it has, in the subscription's currency, and the period's allowance is
    granted on it where it is an overage price of the plan reading the meter overage is
    reported to (invoices.overage_price_billed), withheld otherwise.

    Metered, so none of them is prorated or charged now: the meter's usage is invoiced at
    the period's end at the price on the item then."""
    target = current_overage_price(plan)
    currency = stripe_sub.get("currency")
    if target is not None and currency and target.currency != currency:
        return []
    overage_prices = set(
        StripePrice.objects.filter(kind=PriceKind.OVERAGE).values_list("stripe_price_id", flat=True)
    )
    items = [
        item
        for item in (stripe_sub.get("items") or {}).get("data") or []
        if (item.get("price") or {}).get("id") in overage_prices
    ]
    changes: list[dict] = []
    if target is not None and not items:
        changes.append({"price": target.stripe_price_id})
    for index, item in enumerate(items):
        if index == 0 and target is not None:
            if item["price"]["id"] != target.stripe_price_id:
                changes.append({"id": item["id"], "price": target.stripe_price_id})
        else:
            changes.append({"id": item["id"], "deleted": True})
    return changes


def subscription_overage_align(*, subscription: Subscription, invoice: dict) -> Subscription:
    """Once the paid invoice that bought the subscription's current period (a renewal, or
    the first) is processed, and before its grant, put the current overage price of the
    plan of that period on Stripe's subscription; returns our row, synced after.

    A downgrade left the overage item at the dearer plan's price (_change): the period
    it was paid for was that plan's, and so was its overage, which the renewal invoice
    bills at the price on the item then. That invoice is finalized (paid) by now, so the
    item moves to the new plan's price (or goes, if it has no overage) for the period
    starting, whose allowance is granted next: in this order, or the grant would withhold
    it (invoices.overage_price_billed). It also puts back an item removed by hand, and moves
    an overage price changed in the catalog onto the subscription from its next period.

    Outside any transaction, under the purchase lock (a plan change at the same moment
    decides from Stripe's subscription, as this does), safe to run twice: a repeat finds
    the item in place; the Stripe key is the invoice's and the price's. Stripe refusing
    is logged and the grant then withholds the allowance; Stripe unreachable is raised,
    and the event retried, its grant with it.
    """
    if not (subscription.live and _bought_current_period(invoice, subscription)):
        return subscription
    target = current_overage_price(subscription.plan)
    if subscription.overage_price_id == (target.pk if target else None):
        return subscription  # as read by this event's sync, moments ago
    with _purchase_lock(subscription.organization):
        stripe_sub = stripe_client.subscription_retrieve(subscription.stripe_subscription_id)
        subscription = subscription_sync(stripe_sub=stripe_sub)
        target = current_overage_price(subscription.plan)
        changes = overage_item_changes(stripe_sub, plan=subscription.plan)
        if not changes:
            return subscription
        try:
            aligned = stripe_client.subscription_update(
                subscription.stripe_subscription_id,
                key=f"overage:{invoice['id']}:{target.stripe_price_id if target else 'none'}",
                items=changes,
                proration_behavior="none",
            )
        except stripe_client.StripeRequestRefused as exc:
            logger.error(
                "subscription %s: its overage item could not be set to %s's overage price (%s): %s",
                subscription.stripe_subscription_id,
                subscription.plan.code,
                exc.code or exc.status,
                exc,
            )
            return subscription
        return subscription_sync(stripe_sub=aligned)


def _bought_current_period(invoice: dict, subscription: Subscription) -> bool:
    """Whether `invoice` is paid and bought the subscription's current period: its lines
    for the plan end with it (a renewal's metered lines are the period before's)."""
    if invoice.get("status") != "paid" or invoice.get("billing_reason") not in (
        "subscription_create",
        "subscription_cycle",
    ):
        return False
    lines = (invoice.get("lines") or {}).get("data") or []
    return subscription.current_period_end in [
        ts((line.get("period") or {}).get("end")) for line in lines
    ]


def portal_create(*, organization: Organization) -> str:
    """A Stripe customer-portal URL, to manage cards and cancel."""
    _require_configured()
    try:
        session = billing_customer_call(
            organization=organization,
            call=lambda customer: stripe_client.portal_session_create(
                customer=customer.stripe_customer_id,
                return_url=f"{settings.SITE_URL.rstrip('/')}/billing/",
            ),
        )
    except stripe_client.StripeUnavailable as exc:
        raise _unavailable(exc) from exc
    except stripe_client.StripeRequestRefused as exc:
        raise provider_refused(exc) from exc
    return session["url"]
