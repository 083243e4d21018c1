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

Stripe takes a meter event (200) before it validates it; one it then drops (a
customer it cannot find, a bad payload, no meter for the name) is reported later
in a `v1.billing.meter.error_report_triggered` (or `.no_meter_found`) event, which
names some of the dropped events by identifier (`sample_errors`) and counts the
rest (overage_meter_errors_apply). The rule that keeps a batch billed once: a
batch gets a new identifier, and is sent again, only when Stripe named its
identifier as failed, since a failed event is never counted. A batch Stripe may
have dropped but did not name is only flagged for finance: re-sending one that
was counted, under a new identifier, would bill it twice.

Stripe's report names a dropped event by its request's idempotency key, so each batch
is sent with a key of its own: `<identifier>:<attempt>` (meter_event_key).

A run and the reading of a report take the same lock (OVERAGE_LOCK), so a report never
re-queues or flags a batch while a run is sending it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F, Max, Q, Sum
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.services.audit import audit_record
from gymbilling import stripe_client
from gymbilling.locks import session_lock
from gymbilling.models import Invoice, MeterError, OverageReport, Subscription
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


# Held by a run across its Stripe calls (no transaction is: a session's advisory lock),
# and by the reading of a meter error report: one run at a time, and no report applied
# while a run is between sending a batch and marking it sent.
OVERAGE_LOCK = "overage-report"
# Joins a batch's identifier and the attempt in the idempotency key it is sent with.
# No identifier holds it (the overage_report_identifier_no_key_separator constraint), so
# the key read back from Stripe's report names the batch.
KEY_SEPARATOR = ":"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def meter_event_key(*, identifier: str, sent_at: datetime) -> str:
    """The idempotency key a batch is sent with: its identifier, which Stripe's report
    names it by, and the attempt (when it was sent, to the microsecond), so that a
    batch Stripe refused at once is tried afresh at the next run, not answered Stripe's
    saved refusal for a day. Its meter event `identifier` is the same at every attempt,
    and that is what keeps a resend of an event Stripe took from counting twice."""
    attempt = (sent_at - _EPOCH) // timedelta(microseconds=1)
    return f"{identifier}{KEY_SEPARATOR}{attempt}"


def _invoice_id(lot: CreditLot) -> str:
    return lot.created_by.idempotency_key.removeprefix("grant:overage:")  # grant:overage:<invoice>


def overage_report(*, now=None) -> int:
    """Report new overage to Stripe; returns the whole credits reported in this run."""
    now = now or timezone.now()
    with session_lock(OVERAGE_LOCK):
        _overage_batches_write(now=now)
        return _overage_batches_send(now=now)


def _overage_batches_write(*, now: datetime) -> None:
    """A batch of each allowance's whole credits burned since its last batch."""
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


def _overage_batches_send(*, now: datetime) -> int:
    """Send every batch not sent yet; returns the whole credits sent."""
    reported = 0
    gone: dict[str, bool] = {}  # customer -> deleted at Stripe, asked once a run
    for report in OverageReport.objects.filter(
        sent_at__isnull=True, failed_at__isnull=True
    ).select_related("organization__billing_customer", "subscription"):
        customer = _report_customer(report)
        # When this batch was sent, not the run's start: Stripe's report of what it
        # dropped says when it validated them, and a long run sends its last batches late.
        sent_at = timezone.now()
        try:
            stripe_client.meter_event_create(
                event_name=settings.STRIPE_OVERAGE_EVENT_NAME,
                customer=customer,
                value=report.credits,
                identifier=report.identifier,
                timestamp=meter_timestamp(used_at=report.used_at or report.created_at, now=now),
                key=meter_event_key(identifier=report.identifier, sent_at=sent_at),
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
        # Under the identifier sent: where there is no lock (the demo's SQLite), a report
        # applied meanwhile may have renamed it to be sent again, and it is not sent yet.
        OverageReport.objects.filter(pk=report.pk, identifier=report.identifier).update(
            sent_at=sent_at
        )
        reported += report.credits
    return reported


def _report_customer(report: OverageReport) -> str:
    """The Stripe customer a batch is sent to: its subscription's own (the organization's
    may since have replaced it, deleted at Stripe), as the usage is invoiced on that
    subscription or on none."""
    return (
        report.subscription.stripe_customer_id
        or report.organization.billing_customer.stripe_customer_id
    )


def _overage_report_fail(
    *, report: OverageReport, customer: str, now: datetime, dropped: DroppedEvent | None = None
) -> bool:
    """Give up on a report whose Stripe customer was deleted: no meter can invoice it, so
    sending it again every run would only log an error every run, for good. Marked
    failed with why, for finance (admin: Overage reports) to invoice it another way or
    write it off. `dropped`: Stripe took the event, then reported it dropped; otherwise
    it refused it, and only a batch no run has sent meanwhile is failed."""
    error = (
        f"Stripe customer {customer} was deleted at Stripe: these {report.credits} credits "
        "of overage cannot be invoiced through the meter; invoice them by hand or write "
        "them off."
    )
    rows = OverageReport.objects.filter(
        pk=report.pk, identifier=report.identifier, failed_at__isnull=True
    )
    if dropped is None:
        rows.filter(sent_at__isnull=True).update(failed_at=now, error=error)
        logger.warning("overage report %s failed for good: %s", report.identifier, error)
        return True
    return _overage_report_drop(
        rows, report=report, dropped=dropped, outcome="failed", error=error, failed_at=now
    )


# --- Stripe's meter error reports ---------------------------------------------------

CUSTOMER_NOT_FOUND = "meter_event_customer_not_found"
# Stripe validates an event after taking it, and a run stamps each batch with when it
# sent it: a batch validated in a report's window was sent at most this long before the
# window (Stripe's delay, with a wide margin).
SENT_BEFORE_VALIDATION = timedelta(hours=1)
# A re-sent batch's identifier: the first one's, `_r<n>` for the n-th re-send.
_RESENT = re.compile(r"^(?P<first>.+?)(?:_r(?P<n>\d+))?$")


@dataclass(frozen=True)
class DroppedEvent:
    """A meter event a report names as failed: its batch's identifier (read from the
    request's idempotency key), Stripe's code and message."""

    identifier: str
    code: str
    message: str


@dataclass(frozen=True)
class MeterErrorReport:
    """A meter error report's data, read: the events it names, how many failed unnamed
    (Stripe names a sample of each kind of error), and its validation window."""

    named: list[DroppedEvent]
    unnamed: int
    codes: list[str]
    start: datetime | None
    end: datetime | None


def meter_error_report_read(data: dict) -> MeterErrorReport:
    """Read a `v1.billing.meter.error_report_triggered` / `.no_meter_found` event's data:
    `reason.error_types[]` of `{code, error_count, sample_errors[{error_message,
    request: {identifier}}]}` and `validation_start` / `validation_end` (ISO times).

    A sample's `request.identifier` is the request's idempotency key (Stripe's types say
    so), `<identifier>:<attempt>` for a batch (meter_event_key): the batch is what comes
    before the separator. A bare identifier is taken as it is."""
    named: list[DroppedEvent] = []
    unnamed = 0
    codes: list[str] = []
    for error_type in (data.get("reason") or {}).get("error_types") or []:
        code = str(error_type.get("code") or "")
        codes.append(code)
        samples = error_type.get("sample_errors") or []
        for sample in samples:
            request = sample.get("request") or {}
            # `identifier` in the SDK's types; `idempotency_key` in an older example of
            # Stripe's docs. One that is no batch's is counted as unnamed (below).
            key = str(request.get("identifier") or request.get("idempotency_key") or "")
            identifier = key.partition(KEY_SEPARATOR)[0]
            if identifier:
                message = str(sample.get("error_message") or "")
                named.append(DroppedEvent(identifier, code, message))
            else:
                unnamed += 1
        unnamed += max(0, int(error_type.get("error_count") or 0) - len(samples))
    return MeterErrorReport(
        named=named,
        unnamed=unnamed,
        codes=codes,
        start=_iso_time(data.get("validation_start")),
        end=_iso_time(data.get("validation_end")),
    )


def _iso_time(value) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None


def overage_meter_errors_apply(
    *, report: MeterErrorReport, our_meter: bool, now: datetime | None = None
) -> int:
    """Apply a meter error report to the batches it concerns; returns how many it marked.

    A batch Stripe named was never counted: it is sent again under a new identifier at
    the next run (the cause fixed by then, or reported again), unless its customer was
    deleted at Stripe, where no re-send can bill it (failed, as when Stripe refuses it at
    once). `our_meter`: the report is about the overage meter, so the batches sent in its
    window may be the events it did not name: flagged in doubt, never re-sent. So is a
    report that names one of our batches: a `no_meter_found` report names no meter, and
    one naming ours is about the overage event name.

    Safe to apply twice: a named batch is found by the identifier Stripe named, which it
    no longer has once re-queued or failed; flagging in doubt is the same update again.
    Waits for a run sending batches to end (OVERAGE_LOCK): a batch it has sent is then
    marked sent, in the window a report flags, and one it was sending is not re-queued
    under the run.
    """
    now = now or timezone.now()
    with session_lock(OVERAGE_LOCK):
        return _overage_meter_errors_apply(report=report, our_meter=our_meter, now=now)


def _overage_meter_errors_apply(*, report: MeterErrorReport, our_meter: bool, now: datetime) -> int:
    batches, handled, unknown = _named_batches(report.named)
    # Asked before anything is written: Stripe unreachable retries the whole event.
    gone = {
        customer: stripe_client.customer_gone(customer)
        for customer in {
            _report_customer(batches[event.identifier])
            for event in report.named
            if event.code == CUSTOMER_NOT_FOUND and event.identifier in batches
        }
    }
    marked = 0
    for event in report.named:
        batch = batches.pop(event.identifier, None)
        if batch is None:
            continue  # handled by an earlier reading of the report, or no batch's
        customer = _report_customer(batch)
        if event.code == CUSTOMER_NOT_FOUND and gone.get(customer):
            done = _overage_report_fail(report=batch, customer=customer, now=now, dropped=event)
        else:
            done = _overage_report_requeue(report=batch, dropped=event)
        marked += done
    # A name that is no batch's, not even one re-sent since, may still have been one of
    # ours (the meter is overage's alone): as good as unnamed.
    unnamed = report.unnamed + unknown
    if unnamed and (our_meter or handled) and report.start and report.end:
        marked += _overage_reports_doubt(report=report, unnamed=unnamed, named=handled)
    return marked


def _named_batches(named: list[DroppedEvent]) -> tuple[dict[str, OverageReport], set[str], int]:
    """The batches a report names and still to mark (sent under that identifier, not
    failed), every identifier it names that a batch had, and how many it names that no
    batch ever had: a batch re-queued under a later `_r<n>`, or failed, was marked by an
    earlier reading of the report."""
    firsts = {_RESENT.match(event.identifier)["first"] for event in named}
    lineage = Q()
    for first in firsts:
        lineage |= Q(identifier__startswith=first)
    rows = list(
        OverageReport.objects.filter(lineage).select_related(
            "organization__billing_customer", "subscription"
        )
        if firsts
        else []
    )
    to_mark, handled, unknown = {}, set(), 0
    for event in named:
        same, later = _lineage_of(event.identifier, rows)
        if same is not None and same.failed_at is None:
            to_mark[event.identifier] = same
        if same is not None or later:
            handled.add(event.identifier)
        else:
            unknown += 1
    return to_mark, handled, unknown


def _lineage_of(identifier: str, rows: list[OverageReport]) -> tuple[OverageReport | None, bool]:
    """The batch sent under `identifier`, and whether one of its later re-sends is there."""
    match = _RESENT.match(identifier)
    sent = int(match["n"] or 0)
    same, later = None, False
    for row in rows:
        other = _RESENT.match(row.identifier)
        if other["first"] != match["first"]:
            continue
        if row.identifier == identifier:
            same = row
        elif int(other["n"] or 0) > sent:
            later = True
    return same, later


def _overage_report_requeue(
    *, report: OverageReport, dropped: DroppedEvent, finance: FinanceCheck | None = None
) -> bool:
    """Send a batch Stripe dropped again, under a new identifier (Stripe may refuse the
    old one as a duplicate for a day or more, counted or not). `finance`: Stripe did not
    name it, finance found it not counted (overage_report_resend)."""
    match = _RESENT.match(report.identifier)
    resend = f"{match['first']}_r{int(match['n'] or 0) + 1}"
    error = (
        f"Stripe dropped meter event {report.identifier} ({dropped.code}: {dropped.message}); "
        f"sent again as {resend} at the next overage run."
    )
    rows = OverageReport.objects.filter(
        pk=report.pk, identifier=report.identifier, failed_at__isnull=True
    )
    return _overage_report_drop(
        rows,
        report=report,
        dropped=dropped,
        outcome="resent",
        error=error,
        finance=finance,
        identifier=resend,
    )


def _overage_report_drop(
    rows,
    *,
    report: OverageReport,
    dropped: DroppedEvent,
    outcome: str,
    error: str,
    finance: FinanceCheck | None = None,
    **changes,
) -> bool:
    """Mark a batch Stripe dropped (re-queued or failed: `changes`); False when another
    reading of the report did it first."""
    return _overage_report_mark(
        rows,
        report=report,
        action="billing.overage_dropped",
        why="dropped by Stripe",
        data={
            "code": dropped.code,
            "message": dropped.message,
            "outcome": outcome,
            "resent_as": changes.get("identifier", ""),
        },
        finance=finance,
        sent_at=None,
        meter_error=MeterError.DROPPED,
        stripe_error_code=dropped.code[:64],
        error=error[:500],
        **changes,
    )


def _overage_report_mark(
    rows,
    *,
    report: OverageReport,
    action: str,
    why: str,
    data: dict,
    finance: FinanceCheck | None = None,
    **changes,
) -> bool:
    """Update a batch (`rows`: it, as it was read) with what Stripe's report said of it,
    with an audit record and an ERROR for finance; False when it was no longer as read.
    `finance`: what finance found at Stripe instead, by whom: in the audit record, and
    logged at INFO (nothing left for finance to do)."""
    with transaction.atomic():
        changed = rows.update(**changes)
        if changed:
            audit_record(
                organization=report.organization,
                action=action,
                target=report.identifier,
                actor_user=finance.actor if finance else None,
                data={
                    "identifier": report.identifier,
                    "credits": report.credits,
                    **data,
                    **({"note": finance.note} if finance else {}),
                },
            )
    if changed:
        logger.log(
            logging.INFO if finance else logging.ERROR,
            "overage report %s %s: %s",
            report.identifier,
            why,
            changes["error"],
        )
    return bool(changed)


# --- finance's word on a batch flagged maybe dropped ----------------------------------


@dataclass(frozen=True)
class FinanceCheck:
    """What finance found of a batch at Stripe: who looked, and their note."""

    actor: object
    note: str


def overage_report_counted(*, report_id: int, note: str, actor) -> OverageReport:
    """Finance found a batch flagged maybe dropped among the meter's events at Stripe: it
    was counted, so it is billed. The flag is cleared for good (`counted`: a later report
    that counts failures in its window flags it no more) and the batch stays sent, never
    re-sent. Audited (`billing.overage_counted`: who, `note`).

    Only a batch flagged maybe dropped (409 `overage_not_in_doubt`); under the lock runs
    and reports take (OVERAGE_LOCK), so no run or report changes it meanwhile."""
    finance = FinanceCheck(actor=actor, note=_finance_note(note))
    with session_lock(OVERAGE_LOCK):
        batch = _in_doubt(report_id)
        _overage_report_mark(
            _as_read(batch),
            report=batch,
            action="billing.overage_counted",
            why="counted at Stripe, checked by finance",
            data={},
            finance=finance,
            meter_error=MeterError.COUNTED,
            error=f"Counted at Stripe, checked by finance: {finance.note}"[:500],
        )
    batch.refresh_from_db()
    return batch


def overage_report_resend(*, report_id: int, note: str, actor) -> OverageReport:
    """Finance found a batch flagged maybe dropped missing from the meter's events at
    Stripe: never counted, so it is re-queued under a new identifier and sent at the next
    run, as a batch Stripe named as dropped is (_overage_report_requeue), its audit
    record (`billing.overage_dropped`, outcome `resent`) with who and `note`.

    Only a batch flagged maybe dropped (409 `overage_not_in_doubt`); under OVERAGE_LOCK,
    as overage_report_counted."""
    finance = FinanceCheck(actor=actor, note=_finance_note(note))
    with session_lock(OVERAGE_LOCK):
        batch = _in_doubt(report_id)
        _overage_report_requeue(
            report=batch,
            dropped=DroppedEvent(
                identifier=batch.identifier,
                code=batch.stripe_error_code,
                message=f"not counted at Stripe, checked by finance: {finance.note}",
            ),
            finance=finance,
        )
    batch.refresh_from_db()
    return batch


def _finance_note(note: str) -> str:
    note = note.strip()
    if not note:
        raise ApplicationError(
            code="reason_required",
            message="Say what you found among the meter's events at Stripe, and how.",
            param="note",
        )
    return note


def _in_doubt(report_id: int) -> OverageReport:
    """The batch, flagged maybe dropped and still sent; read under OVERAGE_LOCK."""
    batch = OverageReport.objects.select_related("organization").get(pk=report_id)
    if batch.meter_error != MeterError.IN_DOUBT or batch.sent_at is None or batch.failed_at:
        raise ApplicationError(
            code="overage_not_in_doubt",
            message=f"Only a batch flagged maybe dropped can be checked at Stripe here: "
            f"{batch.identifier} is {_batch_state(batch)}.",
            status=409,
        )
    return batch


def _batch_state(batch: OverageReport) -> str:
    if batch.failed_at:
        return "failed (its customer was deleted at Stripe)"
    if batch.meter_error == MeterError.COUNTED:
        return "already checked: counted at Stripe"
    if batch.meter_error == MeterError.DROPPED:
        return "dropped by Stripe, which named it, and re-queued"
    return "not sent yet" if batch.sent_at is None else "not flagged: no meter error reported"


def _as_read(batch: OverageReport):
    return OverageReport.objects.filter(
        pk=batch.pk, identifier=batch.identifier, sent_at=batch.sent_at
    )


def _overage_reports_doubt(*, report: MeterErrorReport, unnamed: int, named: set[str]) -> int:
    """Flag the batches sent in the window of failures Stripe did not name: any may be one.
    Not re-sent: those Stripe counted would be billed twice. Finance checks them against
    the meter's events at Stripe."""
    error = (
        f"Stripe reported {unnamed} more failed meter events "
        f"({', '.join(report.codes)}) validated {report.start.isoformat()} to "
        f"{report.end.isoformat()} without naming them: this batch, sent then, may not have "
        "been counted. Check it at Stripe; re-sending a counted batch bills it twice."
    )
    doubtful = (
        OverageReport.objects.filter(
            sent_at__gte=report.start - SENT_BEFORE_VALIDATION,
            sent_at__lte=report.end,
            failed_at__isnull=True,
        )
        .exclude(identifier__in=named)
        # Flagged already, or found counted at Stripe by finance since.
        .exclude(meter_error__in=(MeterError.IN_DOUBT, MeterError.COUNTED))
        .select_related("organization")
    )
    return sum(
        _overage_report_mark(
            # Still as read: one re-queued or failed meanwhile is no longer in doubt.
            _as_read(batch),
            report=batch,
            action="billing.overage_in_doubt",
            why="may have been dropped by Stripe",
            data={"codes": report.codes},
            meter_error=MeterError.IN_DOUBT,
            stripe_error_code=",".join(report.codes)[:64],
            error=error[:500],
        )
        for batch in list(doubtful)
    )
