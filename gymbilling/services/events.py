"""Stripe webhook events: stored once, processed at least once, safely.

`stripe_event_record` runs in the webhook view: the signature is already
verified; the event is inserted by its Stripe id (unique), so a duplicate
delivery is a no-op, and a Celery task is queued after commit.

`stripe_event_process` runs in the task. It claims the event (one worker at a
time), re-reads the object the event names from Stripe (the payload may be
stale: events arrive late, twice and out of order), and applies it under a
per-customer lock, so two events about one customer never interleave their
read-from-Stripe and write. Every handler is idempotent: grants are keyed by
invoice or session id in the ledger.

Stripe unreachable -> the event goes back to pending with the error and is
retried (the task's retry, then the beat sweep); so does an event that needs
another processed first (SubscriptionConflict), or other work of ours finished
(EventWaits), for WAIT_FOR_OTHER_EVENTS. Any
other failure marks it failed with the error, to be replayed from the admin
once fixed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, OperationalError, transaction
from django.db.models import Q
from django.utils import timezone

from gymbilling import stripe_client
from gymbilling.locks import session_lock
from gymbilling.models import (
    CheckoutSession,
    EventStatus,
    MarketReversal,
    PaymentReversal,
    StripeEvent,
    Subscription,
)
from gymbilling.services.checkout import subscription_overage_align
from gymbilling.services.invoices import invoice_subscription_id, invoice_sync
from gymbilling.services.overage import meter_error_report_read, overage_meter_errors_apply
from gymbilling.services.payments import (
    checkout_session_mirror,
    pack_purchase_grant,
    payment_reversal_apply,
    payment_reversal_reinstate,
)
from gymbilling.services.subscriptions import (
    SubscriptionConflict,
    SubscriptionUnknown,
    subscription_sync,
)

logger = logging.getLogger(__name__)

# The marketplace (and any later module) adds what a completed or expired
# Checkout session of its kind means, and what a refund of its payment means.
CheckoutHandler = Callable[[CheckoutSession, dict], None]
_checkout_handlers: dict[str, CheckoutHandler] = {}
ReversalHandler = Callable[..., bool]
_reversal_handlers: list[ReversalHandler] = []
_reinstatement_handlers: list[ReversalHandler] = []


def checkout_handler_register(kind: str, handler: CheckoutHandler) -> None:
    _checkout_handlers[kind] = handler


def reversal_handler_register(handler: ReversalHandler) -> None:
    """`handler(kind=, key=, charge=, amount=, cumulative=, refund=) -> bool` (True: it was
    its payment). A refund comes one at a time: `amount` is that refund's, `refund` is
    Stripe's refund; a dispute's has no `refund`."""
    if handler not in _reversal_handlers:
        _reversal_handlers.append(handler)


def reinstatement_handler_register(handler: ReversalHandler) -> None:
    """`handler(key=, refund=) -> bool` (True: the reversal under `key` was of its payment;
    `refund`: the failed refund, None for a won dispute)."""
    if handler not in _reinstatement_handlers:
        _reinstatement_handlers.append(handler)


class EventRetryLater(RuntimeError):
    """Stripe could not be reached, or the event waits for another; it stays pending."""


class EventWaits(RuntimeError):
    """Work of ours still in flight (a payout being sent) must end before the event can
    be applied: it stays pending and is retried, as for a SubscriptionConflict."""


# How long an event that waits for another (SubscriptionConflict) is retried
# before it is marked failed for a human: Stripe retries a webhook it could
# not deliver for up to three days.
WAIT_FOR_OTHER_EVENTS = timedelta(days=3)


# --- receive ---------------------------------------------------------------------


def stripe_event_record(*, event: stripe_client.WebhookEvent) -> tuple[StripeEvent, bool]:
    """Store a verified event once; returns (row, created). Queues processing on commit."""
    from gymbilling.tasks import stripe_event_process_task

    try:
        with transaction.atomic():
            row = StripeEvent.objects.create(
                stripe_event_id=event.id,
                type=event.type,
                object_type=event.object_type,
                object_id=event.object_id,
                livemode=event.livemode,
                api_version=event.api_version,
                stripe_created_at=datetime.fromtimestamp(event.created, tz=UTC),
                payload=event.payload,
            )
            transaction.on_commit(lambda: stripe_event_process_task.delay(row.pk))
            return row, True
    except IntegrityError:
        return StripeEvent.objects.get(stripe_event_id=event.id), False


# --- process -----------------------------------------------------------------------


def _claim(event_pk: int, *, force: bool) -> StripeEvent | None:
    """Move the event to processing if nobody else is on it; None if not ours to run."""
    now = timezone.now()
    claimable = Q(status=EventStatus.PENDING)
    if force:
        claimable |= Q(status__in=[EventStatus.FAILED, EventStatus.PROCESSED, EventStatus.IGNORED])
    # A worker that died mid-event leaves it processing; after the retry delay
    # anyone may take it over.
    claimable |= Q(
        status=EventStatus.PROCESSING,
        processing_started_at__lt=now - settings.BILLING_EVENT_RETRY_AFTER,
    )
    from django.db.models import F

    claimed = StripeEvent.objects.filter(claimable, pk=event_pk).update(
        status=EventStatus.PROCESSING, processing_started_at=now, attempts=F("attempts") + 1
    )
    return StripeEvent.objects.get(pk=event_pk) if claimed else None


def _finish(event: StripeEvent, status: str, error: str = "") -> None:
    StripeEvent.objects.filter(pk=event.pk).update(
        status=status,
        last_error=error[:4000],
        processed_at=timezone.now()
        if status in (EventStatus.PROCESSED, EventStatus.IGNORED)
        else None,
    )


def stripe_event_process(*, event_pk: int, force: bool = False) -> str | None:
    """Apply one stored event; returns its final status, None if another worker has it."""
    event = _claim(event_pk, force=force)
    if event is None:
        return None
    obj = (event.payload.get("data") or {}).get("object") or {}
    customer = obj.get("customer") if isinstance(obj.get("customer"), str) else ""
    try:
        # Everything about one Stripe customer, one worker at a time.
        with session_lock(f"stripe-customer:{customer or event.object_id}"):
            handled = _dispatch(event)
    except stripe_client.StripeUnavailable as exc:
        _finish(event, EventStatus.PENDING, f"Stripe unreachable: {exc}")
        raise EventRetryLater(str(exc)) from exc
    except OperationalError as exc:
        # The database itself was briefly unavailable (a lock timeout, a
        # failover): nothing was applied, so this is a retry, not a failure.
        _finish(event, EventStatus.PENDING, f"database unavailable: {exc}")
        raise EventRetryLater(str(exc)) from exc
    except (SubscriptionConflict, EventWaits) as exc:
        if timezone.now() - event.received_at < WAIT_FOR_OTHER_EVENTS:
            # Events arrive out of order: the other subscription's deletion
            # is likely on its way. Until it is processed this one waits.
            # So does one that waits for a payout Stripe has yet to take.
            _finish(event, EventStatus.PENDING, f"waiting: {exc}")
            raise EventRetryLater(str(exc)) from exc
        logger.error("stripe event %s still waits: %s", event.stripe_event_id, exc)
        _finish(event, EventStatus.FAILED, f"{type(exc).__name__}: {exc}")
        return EventStatus.FAILED
    except Exception as exc:  # recorded for the admin's replay, then re-raised for the logs
        logger.exception("stripe event %s failed", event.stripe_event_id)
        _finish(event, EventStatus.FAILED, f"{type(exc).__name__}: {exc}")
        return EventStatus.FAILED
    status = EventStatus.PROCESSED if handled else EventStatus.IGNORED
    _finish(event, status)
    return status


# Events about an object Stripe has not made yet, so it has no id to read it back by: the
# invoice a renewal will issue (`invoice.upcoming`, sent to a webhook subscribed to
# `invoice.*`). Nothing to apply: once issued, the invoice has an id and its own events.
# Ignored, not failed: failed would put one in finance's replay list at every renewal.
# Any other event without an id is unexpected and still fails, to be looked at.
EVENTS_WITHOUT_OBJECT_ID = frozenset({"invoice.upcoming"})


# Thin events (v2) of the billing meter: meter events Stripe took, then dropped. The
# second is about events whose name has no meter, so it names no meter itself.
METER_ERROR_EVENTS = frozenset(
    {"v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"}
)


def _dispatch(event: StripeEvent) -> bool:
    kind, object_id = event.type, event.object_id
    if kind in METER_ERROR_EVENTS:
        return meter_error_report_refresh(event_id=event.stripe_event_id, meter_id=object_id)
    if not object_id and kind in EVENTS_WITHOUT_OBJECT_ID:
        return False
    if kind.startswith("checkout.session."):
        return checkout_session_refresh(session_id=object_id)
    if kind.startswith("customer.subscription."):
        return subscription_refresh(subscription_id=object_id) is not None
    if kind.startswith("invoice."):
        return invoice_refresh(invoice_id=object_id)
    if kind == "charge.refunded":
        return charge_refund_refresh(charge_id=object_id)
    if kind in ("charge.refund.updated", "refund.updated", "refund.failed"):
        # A refund's own events (one that failed, above all): its charge, as Stripe has it.
        charge_id = stripe_client.refund_retrieve(object_id).get("charge")
        if isinstance(charge_id, dict):
            charge_id = charge_id.get("id")
        return charge_refund_refresh(charge_id=str(charge_id or "")) if charge_id else False
    if kind.startswith("charge.dispute."):
        return dispute_refresh(dispute_id=object_id)
    return False


# --- handlers: read the current object, then apply it -----------------------------------


def meter_error_report_refresh(*, event_id: str, meter_id: str) -> bool:
    """Apply a billing meter error report, read whole from Stripe (its webhook is thin).

    Its window counts only for the overage meter (services/overage.py): another meter's
    unnamed failures are not our batches'. A `no_meter_found` report names no meter (and
    no event name): it counts for ours when it names one of our batches."""
    data = stripe_client.thin_event_retrieve(event_id).get("data") or {}
    our_meter = False
    if meter_id:
        try:
            meter = stripe_client.meter_retrieve(meter_id)
            our_meter = meter.get("event_name") == settings.STRIPE_OVERAGE_EVENT_NAME
        except stripe_client.StripeRequestRefused:
            pass  # a meter this account no longer has: not the one overage is sent to
    return overage_meter_errors_apply(report=meter_error_report_read(data), our_meter=our_meter) > 0


def subscription_refresh(*, subscription_id: str) -> Subscription | None:
    """Our row for Stripe's subscription, or None when it is not ours to mirror."""
    try:
        return subscription_sync(stripe_sub=stripe_client.subscription_retrieve(subscription_id))
    except SubscriptionConflict:
        raise  # ours, but not yet: the event is retried (stripe_event_process)
    except SubscriptionUnknown as exc:
        logger.warning("ignored subscription %s: %s", subscription_id, exc)
        return None


def invoice_refresh(*, invoice_id: str) -> bool:
    invoice = stripe_client.invoice_retrieve(invoice_id)
    subscription = None
    sub_id = invoice_subscription_id(invoice)
    if sub_id:
        try:
            subscription = subscription_refresh(subscription_id=sub_id)
        except SubscriptionConflict:
            # Mirrored meanwhile, granted nothing: reconcile reports it until
            # the retry, once the conflict is gone, grants it.
            invoice_sync(invoice=invoice, subscription=None)
            raise
    if subscription is not None:
        # Before the grant, which checks the overage price this may put on Stripe's
        # subscription (a renewal after a downgrade).
        subscription = subscription_overage_align(subscription=subscription, invoice=invoice)
    row = invoice_sync(invoice=invoice, subscription=subscription)
    if row is None:
        return False
    if row.status == "paid":
        payment_reversals_refresh(payment_intent_id=row.stripe_payment_intent_id)
    return True


def checkout_session_refresh(*, session_id: str) -> bool:
    session = stripe_client.checkout_session_retrieve(session_id)
    checkout = checkout_session_mirror(session=session)
    if checkout is None:
        return False
    if session.get("subscription"):
        sub_id = session["subscription"]
        subscription_refresh(subscription_id=sub_id if isinstance(sub_id, str) else sub_id["id"])
    handler = _checkout_handlers.get(checkout.kind)
    if handler is not None:
        handler(checkout, session)
    elif session.get("payment_status") == "paid" and pack_purchase_grant(checkout=checkout):
        payment_reversals_refresh(payment_intent_id=checkout.stripe_payment_intent_id)
    return True


# A refund that failed or was canceled gave the money back to us.
REFUND_UNDONE = ("failed", "canceled")


def charge_refund_refresh(*, charge_id: str) -> bool:
    """Apply a charge's refunds as Stripe has them now, whichever event this is.

    Each refund of a payment that bought credits, or paid for a marketplace order, is
    applied once, in the order they were made, under `refund:<charge>:<all refunded up
    to it, failed ones too>` (the running total of the refunds made, which only grows: a
    refund made after one failed never takes the failed one's key); a refund that then
    failed (`refund.failed`, `charge.refund.updated`) gives back what it took, once, as
    a won dispute does (a marketplace order's: the fee, the sellers' shares or the loss
    booked for shares already paid out, and the buyer's credits). A refund that failed
    before it was applied here takes nothing and gives nothing back. Refunds that rows of
    the old running-total keys account for already are left as they are
    (_old_running_totals_reach).

    One reading of a charge's refunds applied at a time: a refund's own events are not
    about a customer (stripe_event_process's lock), and a reading taken before a refund
    failed, applied after the failure was, would take its credits back again.
    """
    with session_lock(f"stripe-charge-refunds:{charge_id}"):
        return _charge_refunds_apply(charge_id=charge_id)


def _charge_refunds_apply(*, charge_id: str) -> bool:
    charge = stripe_client.charge_retrieve(charge_id)
    refunds = stripe_client.refunds_list(charge=charge_id)
    old_reach = _old_running_totals_reach(charge_id=charge_id, refunds=refunds)
    made = net = 0
    handled = False
    for position, refund in enumerate(refunds, start=1):
        amount = int(refund.get("amount") or 0)
        made += amount
        key = f"refund:{charge_id}:{made}"
        undone = refund.get("status") in REFUND_UNDONE
        if not undone:
            net += amount
        if position <= old_reach:
            # Applied by a running total of the old keys, or, failed, left out of it
            # (and made up for by it): nothing to take, nothing to give back.
            continue
        if undone:
            if reversal_reinstate(key=key, refund=refund):
                handled = True
            elif _refund_applied_before(charge_id=charge_id, key=key, made=made):
                # Applied together with a later refund, under one row: what it alone
                # took is not known here. Finance gives it back (an adjustment).
                logger.error(
                    "refund %s of %s failed, but was applied with later refunds: "
                    "its credits are not given back automatically",
                    refund.get("id"),
                    charge_id,
                )
            continue
        if _refund_applied_before(charge_id=charge_id, key=key, made=made):
            continue
        # A marketplace payment's: this refund alone (its money is taken back fill by
        # fill, and the marketplace knows its own refund of what it did not deliver).
        this_refund = {
            "kind": "refund",
            "key": key,
            "charge": charge,
            "amount": amount,
            "cumulative": False,
            "refund": refund,
        }
        if any(handler(**this_refund) for handler in _reversal_handlers):
            handled = True
            continue
        # A payment that bought credits: the refunds still standing up to this one, of
        # which payment_reversal_apply applies what earlier rows did not.
        handled |= (
            payment_reversal_apply(
                kind="refund", key=key, charge=charge, amount=net, cumulative=True
            )
            is not None
        )
    return handled


# The rows a charge's refunds are applied under: those of a payment that bought credits,
# and of a marketplace order. The marketplace's record the money taken back of what was
# delivered: a row of an order with a shortfall covers less than its span, never more.
_REFUND_ROWS = [
    (PaymentReversal, {"kind": PaymentReversal.Kind.REFUND}),
    (MarketReversal, {"kind": "refund"}),
]


def _key_total(key: str) -> int:
    """The running total a refund's key ends with, `refund:<charge>:<total>`."""
    return int(key.rsplit(":", 1)[1])


def _refund_applied_before(*, charge_id: str, key: str, made: int) -> bool:
    """A refund applied here together with later ones, under one later key (one event
    for both, before refunds were applied one by one): done already. (Rows of the old
    keys after a failed refund: _old_running_totals_reach, read first.)"""
    if any(model.objects.filter(key=key).exists() for model, _ in _REFUND_ROWS):
        return False  # applied on its own: payment_reversal_apply (or the market) finds it
    # A row covers the refunds made from its key's total less the money it recorded up
    # to that total (one refund's own row: just that refund).
    return any(
        _key_total(other) - amount < made < _key_total(other)
        for model, only in _REFUND_ROWS
        for other, amount in model.objects.filter(stripe_charge_id=charge_id, **only).values_list(
            "key", "amount"
        )
    )


def _old_running_totals_reach(*, charge_id: str, refunds: list[dict]) -> int:
    """How many of the charge's refunds, in the order made, rows of the old running-total
    keys account for already (0: none).

    Before refunds were applied one by one (until 123e974; a marketplace order's until
    5e00b59), a reading applied all of a charge's refunds at once, under
    `refund:<charge>:<Stripe's amount_refunded>`, topping the charge's rows up to that
    total. A refund that had failed by then was not in it: its row (if it was applied
    before it failed) stayed, and the top-up took that much less for the later refunds.
    Read one by one, under the new keys, such a row is no refund's: the later refund was
    applied again, and the failed one's row given back, although the top-up had made up
    for it already.

    Told apart from the new keys' rows by its total alone: a new key's total is the
    running total of the refunds made up to one of them, failed ones too, so a row whose
    total is none of those is never one. Only those rows are read here. An old row whose
    total is also a new key's (every old row of a charge with no failed refund before
    it) is left to the new keys' reading, as it has been: the same key, applied once.
    Such a row accounts for the refunds up to the one at which the running total of the
    refunds still standing now equals its total: the standing ones applied, the failed
    ones left out. Not when none does (a refund in its total failed after it was
    written), nor when it topped up nothing (amount 0: the rows before it held more than
    its total, after a failure they never saw); those are left to the new keys' reading,
    which gives back what each refund's own row took.
    """
    made = standing = 0
    new_totals: set[int] = set()
    standing_at: dict[int, int] = {}  # the standing refunds' running total -> position
    for position, refund in enumerate(refunds, start=1):
        amount = int(refund.get("amount") or 0)
        made += amount
        new_totals.add(made)
        if refund.get("status") not in REFUND_UNDONE:
            standing += amount
            standing_at[standing] = position
    reach = 0
    for model, only in _REFUND_ROWS:
        for key in model.objects.filter(
            stripe_charge_id=charge_id, amount__gt=0, reinstated_at__isnull=True, **only
        ).values_list("key", flat=True):
            total = _key_total(key)
            if total not in new_totals and total in standing_at:
                reach = max(reach, standing_at[total])
    return reach


# Disputes whose funds were taken from us. Inquiries (warning_*) move no money.
DISPUTE_FUNDS_WITHDRAWN = {"needs_response", "under_review", "lost"}
# A dispute we won: Stripe reinstated the funds. Final, like lost.
DISPUTE_WON = "won"
DISPUTE_LOST = "lost"


def dispute_refresh(*, dispute_id: str) -> bool:
    """Apply a dispute as Stripe has it now, whichever of its events this is.

    Funds withdrawn: the payment is reversed, once. Won: what that reversal
    took is given back, once; a dispute won before its reversal was applied
    here (its events came late) never takes anything, since every event of
    it reads the status now, and won is final.
    """
    dispute = stripe_client.dispute_retrieve(dispute_id)
    if dispute.get("status") == DISPUTE_WON:
        return reversal_reinstate(key=f"dispute:{dispute_id}")
    if dispute.get("status") not in DISPUTE_FUNDS_WITHDRAWN:
        return False
    charge_id = dispute.get("charge")
    if isinstance(charge_id, dict):
        charge_id = charge_id.get("id")
    charge = stripe_client.charge_retrieve(str(charge_id))
    params = {
        "kind": "dispute",
        "key": f"dispute:{dispute_id}",
        "charge": charge,
        "amount": int(dispute.get("amount") or 0),
        "cumulative": False,
    }
    if any(handler(**params) for handler in _reversal_handlers):
        return True
    applied = payment_reversal_apply(**params) is not None
    if applied and dispute.get("status") == DISPUTE_LOST:
        PaymentReversal.objects.filter(key=params["key"], lost_at__isnull=True).update(
            lost_at=timezone.now()
        )
    return applied


def reversal_reinstate(*, key: str, refund: dict | None = None) -> bool:
    """A won dispute, or a refund that failed (`refund`: Stripe's refund), gives back
    what its reversal took; False when none was applied."""
    if any(handler(key=key, refund=refund) for handler in _reinstatement_handlers):
        return True
    return payment_reversal_reinstate(key=key) is not None


def payment_reversals_refresh(*, payment_intent_id: str) -> None:
    """Apply what Stripe has already refunded or disputed of a payment just granted.

    Events arrive out of order: a refund or dispute processed before the
    payment's grant found nothing to take back and was ignored. So every path
    that grants what a payment bought calls this after granting, and the
    reversal goes through the handlers above under the key its own event
    uses: applied once, whichever of the two comes first.
    """
    if not payment_intent_id:
        return
    charge = stripe_client.payment_intent_charge(payment_intent_id)
    if charge is None:
        return
    if int(charge.get("amount_refunded") or 0) > 0:
        charge_refund_refresh(charge_id=charge["id"])
    if charge.get("disputed"):
        for dispute in stripe_client.disputes_list(payment_intent=payment_intent_id):
            dispute_refresh(dispute_id=dispute["id"])


def stripe_events_retry(*, now: datetime | None = None) -> int:
    """Queue again every event left pending, or stuck processing, for a while."""
    from gymbilling.tasks import stripe_event_process_task

    now = now or timezone.now()
    stale = now - settings.BILLING_EVENT_RETRY_AFTER
    due = StripeEvent.objects.filter(
        Q(status=EventStatus.PENDING, received_at__lt=stale)
        | Q(status=EventStatus.PROCESSING, processing_started_at__lt=stale)
    ).values_list("pk", flat=True)[:500]
    count = 0
    for pk in due:
        stripe_event_process_task.delay(pk)
        count += 1
    return count
