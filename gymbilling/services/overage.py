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
names some of the dropped events (`sample_errors`) and counts the rest
(overage_meter_errors_apply). The rule that keeps a batch billed once: a batch gets a
new identifier, and is sent again, only when Stripe named its LAST attempt as failed;
anything less is flagged for finance or left alone, never re-sent, because re-sending
one Stripe counted, under a new identifier, bills it twice.

Stripe's report names a dropped event by its request's idempotency key, so each attempt
at a batch is sent with a key of its own: `<identifier>:<attempt>` (meter_event_key).
A batch is tried again under the same identifier when an attempt got no answer (or
Stripe refused it), and Stripe enforces an identifier's uniqueness for at least a day:
a second attempt while it holds one is refused (`resource_already_exists`). So at most
one attempt of a batch counts, and it is the last one Stripe took. `last_attempt_at` is
that attempt, as far as we know: written before the call (an attempt whose answer is
lost, or whose run died, may have been taken), put back when Stripe refused it (a 4xx,
or the identifier already had: it took nothing); `sent_at` equals it when Stripe
answered that attempt 200. Stripe's report naming an attempt of a batch then means:

- its last attempt (no later attempt answered since): Stripe took it and dropped it, so
  it never counted; nor did an earlier one, or Stripe would have refused the last as a
  duplicate instead of taking it. Re-queued under a new identifier (failed when its
  customer was deleted at Stripe; left to finance after BILLING_OVERAGE_MAX_RESENDS
  re-sends, as a cause that persists, say an archived meter, would have it re-sent and
  logged at ERROR every run for good).
- an earlier attempt, where Stripe answered the last one 200: that one counts, unless
  Stripe reports it dropped too: by its own key (the last), or among the failures the
  report counts without naming them, when it was sent in the report's window (flagged
  maybe dropped, as any batch sent then). Otherwise ignored, logged.
- otherwise Stripe's answers do not say whether another attempt counted: the last one
  got no answer (whether the batch waits for its next attempt, or a later one was
  refused as a duplicate, or was sent by a process of the previous release, which
  records no attempt), or the report names the batch without an attempt. Flagged
  maybe dropped, for finance to check at Stripe (its last attempt stands as its
  sending): re-sending could bill it twice, and waiting for the next attempt could
  bill it never, should Stripe keep a dropped event's identifier.

Stripe refuses an identifier again only "within a rolling period of at least 24 hours"
(its API reference), so the same identifier keeps a re-send from counting twice only
within a day of an attempt Stripe may have taken. A batch whose attempt got no answer (a
5xx, a timeout, a run that died) is sent again by itself only until its first such
attempt is RESEND_UNKNOWN_WITHIN (23 hours) old; past that (Stripe unreachable, or beat
stopped, for a day) it is left to finance, flagged maybe dropped and marked sent at its
last attempt (_overage_report_unknown_to_finance): whether that attempt counted is known
only among the meter's events at Stripe, and finance's "Not counted — send again" sends it
under a new identifier. `first_unknown_attempt_at` is that first attempt: written, with
`last_attempt_at`, before the call (where none is), put back with it when Stripe refused
the attempt, cleared once Stripe answers an attempt 200 (took it, or has the identifier),
and when the batch is re-queued under a new identifier.

A batch Stripe refuses at once (a 4xx: it took nothing; its customer not gone) is tried
again at the next run under the same identifier; a cause that persists (a deactivated
meter, an invalid parameter) would have it tried and logged every run for good, so each
such refusal counts (`refusals`) toward BILLING_OVERAGE_MAX_RESENDS beside the re-sends
after Stripe dropped it, and past the cap it is left to finance as one Stripe keeps
dropping is (_overage_report_refused). A run that finds Stripe unreachable (network, 429,
5xx: StripeUnavailable) counts toward nothing.

A batch finance found counted at Stripe (admin: "Counted at Stripe") is left so by
every report, named or not: finance looked at the meter's events themselves.

A run and the reading of a report take the same lock (OVERAGE_LOCK), so a report never
re-queues or flags a batch while a run is sending it.
"""

from __future__ import annotations

import enum
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


# Stripe refuses a meter event's identifier again within at least 24 hours of taking it
# (its API reference: "a rolling period of at least 24 hours"), and no longer promises to
# after. A batch an attempt of which Stripe may have taken (no answer) is sent again under
# that identifier only this long after the first such attempt; an hour's margin covers
# the clocks and a run's length. Past it, it is left to finance.
IDENTIFIER_HELD_FOR = timedelta(hours=24)
RESEND_UNKNOWN_WITHIN = IDENTIFIER_HELD_FOR - timedelta(hours=1)


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
    """Report new overage to Stripe; returns the whole credits reported in this run.

    `now`: the run's clock (default the wall clock). A batch's attempts are stamped with
    the wall clock; how old its first unanswered one is is read at the later of the two."""
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
        first_unknown = _first_unknown_attempt(report)
        if first_unknown and max(now, sent_at) - first_unknown >= RESEND_UNKNOWN_WITHIN:
            # Stripe may have taken that attempt, and may no longer refuse its identifier:
            # sent again, it could be counted twice.
            _overage_report_unknown_to_finance(report=report, first=first_unknown)
            continue
        # Under the identifier sent: where there is no lock (the demo's SQLite), a report
        # applied meanwhile may have renamed it to be sent again, and it is not sent yet.
        attempt = OverageReport.objects.filter(pk=report.pk, identifier=report.identifier)
        # Before the call: Stripe may take an attempt whose answer is lost, and a report
        # acts only on the last attempt Stripe may have taken (the module's docstring).
        # The first such attempt stays (as read: the run's lock keeps other runs off the
        # batch), dated as _first_unknown_attempt dates it; else this one is the first.
        attempt.update(last_attempt_at=sent_at, first_unknown_attempt_at=first_unknown or sent_at)
        try:
            taken = stripe_client.meter_event_create(
                event_name=settings.STRIPE_OVERAGE_EVENT_NAME,
                customer=customer,
                value=report.credits,
                identifier=report.identifier,
                timestamp=meter_timestamp(used_at=report.used_at or report.created_at, now=now),
                key=meter_event_key(identifier=report.identifier, sent_at=sent_at),
            )
        except stripe_client.StripeRequestRefused as exc:
            attempt.update(  # Stripe took nothing
                last_attempt_at=report.last_attempt_at,
                first_unknown_attempt_at=report.first_unknown_attempt_at,
            )
            if exc.code == "resource_missing" and customer not in gone:
                try:
                    gone[customer] = stripe_client.customer_gone(customer)
                except stripe_client.StripeRequestRefused:
                    gone[customer] = False  # not known to be gone: tried again next run
            if gone.get(customer):
                _overage_report_fail(report=report, customer=customer, now=now)
                continue
            # This report alone: it stays unsent and is tried again next run, up to the
            # re-send cap; the others go on. Stripe being unreachable still ends the run
            # (StripeUnavailable), and counts toward nothing: nothing is wrong with the batch.
            _overage_report_refused(report=report, refused=exc, attempt=sent_at)
            continue
        if taken is None:
            # Stripe has the identifier already, from an earlier attempt whose answer was
            # lost, and took nothing now: that attempt stays the last, and no 200 vouches
            # for it (sent_at differs from it).
            attempt.update(
                sent_at=sent_at,
                last_attempt_at=report.last_attempt_at,
                first_unknown_attempt_at=None,
            )
        else:
            attempt.update(sent_at=sent_at, first_unknown_attempt_at=None)
        reported += report.credits
    return reported


def _first_unknown_attempt(report: OverageReport) -> datetime | None:
    """A batch not sent: its first attempt Stripe may have taken under its identifier, or
    None. Where the previous release sent it (which records only its LAST attempt, each
    retry moving it on), the batch's creation: it was written in the run that made its
    first attempt, just before it, so the clock never starts later than that attempt,
    which a retry through a day-long outage would else push past Stripe's window."""
    if report.first_unknown_attempt_at is not None:
        return report.first_unknown_attempt_at
    return report.created_at if report.last_attempt_at is not None else None


def _overage_report_unknown_to_finance(*, report: OverageReport, first: datetime) -> bool:
    """Leave to finance a batch an attempt of which got no answer (Stripe may have counted
    it) at `first`, RESEND_UNKNOWN_WITHIN or longer ago: Stripe may have forgotten its
    identifier, and would then count a re-send beside it. Flagged maybe dropped and marked
    sent at its last attempt, as _overage_report_refused_to_finance leaves one, so that no
    run sends it and finance's "Counted at Stripe" or "Not counted — send again" applies
    to it; audited (`billing.overage_in_doubt`, reason `identifier_window`), logged once."""
    error = (
        f"Meter event {report.identifier} got no answer from Stripe when sent at "
        f"{first.isoformat(timespec='seconds')} (a timeout, a 5xx, a run that died), so "
        "Stripe may have counted it, and it was not sent again within "
        f"{RESEND_UNKNOWN_WITHIN.total_seconds() / 3600:g} hours: Stripe refuses an identifier "
        "twice only for 24, so a re-send now could bill it twice. Not sent again by itself. "
        "Look for it among the meter's events at Stripe: 'Counted at Stripe' if it is "
        "there, else 'Not counted — send again'."
    )[:500]
    return _overage_report_mark(
        _unfailed(report).filter(sent_at__isnull=True),
        report=report,
        action="billing.overage_in_doubt",
        why="left to finance",
        data={
            "reason": "identifier_window",
            "first_unknown_attempt": first.isoformat(),
            "last_attempt": (report.last_attempt_at or first).isoformat(),
        },
        meter_error=MeterError.IN_DOUBT,
        error=error,
        sent_at=report.last_attempt_at or first,
    )


# Refusals that say nothing of the batch: the key or the account (401, 403; every batch
# refused alike, and each left to finance would be a mass repair once the key is put
# right), or a request that collided with another (409). Network errors, 429 and 5xx are
# StripeUnavailable and never get here.
_REFUSALS_NOT_THE_BATCH = frozenset({401, 403, 409})


def _overage_report_refused(
    *, report: OverageReport, refused: stripe_client.StripeRequestRefused, attempt: datetime
) -> None:
    """Stripe refused an attempt of the batch at once (4xx; its customer not gone): it took
    nothing, so the batch is tried again at the next run under the same identifier. A
    refusal that persists (an invalid parameter, a meter deactivated) would have it tried,
    and logged, at every run for good: each one counts toward BILLING_OVERAGE_MAX_RESENDS
    (`refusals`, beside the re-sends after Stripe dropped it, `_r<n>`), and past the cap
    the batch is left to finance, as one Stripe keeps dropping is."""
    if refused.status in _REFUSALS_NOT_THE_BATCH:
        logger.exception("overage report %s refused by Stripe", report.identifier)
        return
    if _resends_all(report) >= settings.BILLING_OVERAGE_MAX_RESENDS:
        _overage_report_refused_to_finance(report=report, refused=refused, attempt=attempt)
        return
    # As read: a report applied meanwhile (no lock on the demo's SQLite) may have moved it.
    OverageReport.objects.filter(
        pk=report.pk, identifier=report.identifier, sent_at__isnull=True
    ).update(refusals=F("refusals") + 1)
    logger.warning(
        "overage report %s refused by Stripe (%s %s: %s): tried again at the next run "
        "(re-send %d of BILLING_OVERAGE_MAX_RESENDS=%d)",
        report.identifier,
        refused.status,
        refused.code,
        refused,
        _resends_all(report) + 1,
        settings.BILLING_OVERAGE_MAX_RESENDS,
        exc_info=refused,
    )


def _overage_report_refused_to_finance(
    *, report: OverageReport, refused: stripe_client.StripeRequestRefused, attempt: datetime
) -> bool:
    """Leave a batch Stripe refused at once again, past the re-send cap, to finance, as
    _overage_report_to_finance does one it keeps dropping: flagged maybe dropped and marked
    sent, so that no run sends it and finance's "Not counted — send again" (once the cause
    is put right) applies to it; audited and logged once.

    Marked sent at its last attempt Stripe may have taken (one whose answer was lost: it
    may have counted, which finance checks at Stripe first), or, where there is none, at
    the attempt refused: Stripe took no attempt of it, so nothing of it counted."""
    taken = report.last_attempt_at
    error = (
        f"Stripe refused meter event {report.identifier} at once ({refused.status} "
        f"{refused.code}: {refused}) after it was re-sent {_resends_all(report)} times "
        "(BILLING_OVERAGE_MAX_RESENDS): not sent again by itself. "
        + (
            "An earlier attempt got no answer and may have counted: look for it at Stripe "
            "first ('Counted at Stripe' if it is there). "
            if taken
            else "Stripe took no attempt of it. "
        )
        + "Put the cause right at Stripe (the meter, the customer, the request), then "
        "choose 'Not counted — send again'."
    )[:500]
    return _overage_report_mark(
        _unfailed(report).filter(sent_at__isnull=True),
        report=report,
        action="billing.overage_refused",
        why="left to finance",
        data={
            "code": refused.code,
            "status": refused.status,
            "message": str(refused)[:500],
            "outcome": "finance",
            "request_id": refused.request_id or "",
        },
        meter_error=MeterError.IN_DOUBT,
        stripe_error_code=(refused.code or str(refused.status or ""))[:64],
        error=error,
        sent_at=taken or attempt,
    )


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
    rows = _unfailed(report)
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
    """A meter event a report names as failed: its batch's identifier and the attempt
    (when it was sent; None where the report does not say), read from the request's
    idempotency key; Stripe's code and message."""

    identifier: str
    code: str
    message: str
    attempt: datetime | None = None

    @property
    def key(self) -> str:
        """How Stripe named it: the attempt's idempotency key, or the identifier alone."""
        if self.attempt is None:
            return self.identifier
        return meter_event_key(identifier=self.identifier, sent_at=self.attempt)


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
    before the separator, the attempt what follows. A bare identifier names the batch but
    no attempt."""
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
            identifier, _, attempt = key.partition(KEY_SEPARATOR)
            if identifier:
                message = str(sample.get("error_message") or "")
                named.append(DroppedEvent(identifier, code, message, _attempt_time(attempt)))
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


def _attempt_time(attempt: str) -> datetime | None:
    """When the attempt a key names was sent (meter_event_key); None for none, or not ours."""
    if not (attempt.isascii() and attempt.isdigit()):
        return None
    try:
        return _EPOCH + timedelta(microseconds=int(attempt))
    except OverflowError:
        return None


def _iso_time(value) -> datetime | None:
    try:
        return datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None


def overage_meter_errors_apply(
    *, report: MeterErrorReport, our_meter: bool, now: datetime | None = None
) -> int:
    """Apply a meter error report to the batches it concerns; returns how many it marked.

    A batch Stripe named by its last attempt was never counted: it is sent again under a
    new identifier at the next run (the cause fixed by then, or reported again), unless
    its customer was deleted at Stripe, where no re-send can bill it (failed, as when
    Stripe refuses it at once), or it was re-sent BILLING_OVERAGE_MAX_RESENDS times
    already (left to finance). One named by an earlier attempt, or by none, is ignored or
    flagged for finance (the module's docstring says which, and why). `our_meter`: the
    report is about the overage meter, so the batches sent in its window may be the
    events it did not name: flagged in doubt, never re-sent. So is a report that names
    one of our batches: a `no_meter_found` report names no meter, and one naming ours is
    about the overage event name. A batch finance found counted is never marked again.

    Safe to apply twice: a named batch is found by the identifier Stripe named, which it
    no longer has once re-queued or failed; flagging in doubt, or leaving to finance, is
    the same update again, which changes nothing. Waits for a run sending batches to end
    (OVERAGE_LOCK): a batch it has sent is then marked sent, in the window a report
    flags, and one it was sending is not re-queued under the run.
    """
    now = now or timezone.now()
    with session_lock(OVERAGE_LOCK):
        return _overage_meter_errors_apply(report=report, our_meter=our_meter, now=now)


class Named(enum.Enum):
    """Which attempt of a batch a report names, as far as Stripe's answers tell."""

    LAST = "last"  # the last Stripe may have taken: dropped, so none counted
    EARLIER = "earlier"  # an earlier one, and Stripe answered the last 200: that one counts
    UNSURE = "unsure"  # the answers do not say whether another attempt counted


def _attempt_named(batch: OverageReport, event: DroppedEvent) -> Named:
    """Which attempt of `batch` (as read under OVERAGE_LOCK) the report names."""
    attempt, last, sent = event.attempt, batch.last_attempt_at, batch.sent_at
    if attempt is None:
        return Named.UNSURE  # the batch alone
    if sent is not None and sent != last:
        # Marked sent by an attempt not recorded as its last: one Stripe refused as the
        # identifier it had (so the last it took got no answer), never named, as Stripe
        # took nothing; or one of a process of the previous release, which records no
        # attempt: then that one was its last, and answered (read as a 200: should it have
        # been a refusal, ignoring an earlier attempt can bill the batch never, not twice).
        if attempt == sent:
            return Named.LAST
        return Named.EARLIER if last is None and attempt < sent else Named.UNSURE
    if last is None:
        return Named.UNSURE  # not sent, no attempt recorded: nothing known of this one
    if attempt == last:
        return Named.LAST
    if attempt < last and sent == last:
        return Named.EARLIER
    return Named.UNSURE


def _overage_meter_errors_apply(*, report: MeterErrorReport, our_meter: bool, now: datetime) -> int:
    batches, handled, unknown = _named_batches(report.named)
    # Per batch, what the report names of it: its last attempt where one of its samples
    # does (Stripe may name several attempts of a batch), else the first it names.
    named: dict[str, tuple[OverageReport, DroppedEvent, Named]] = {}
    for event in report.named:
        batch = batches.get(event.identifier)
        if batch is None:
            continue  # handled by an earlier reading of the report, or no batch's
        which = _attempt_named(batch, event)
        if event.identifier not in named or which is Named.LAST:
            named[event.identifier] = (batch, event, which)
    # Asked before anything is written: Stripe unreachable retries the whole event.
    gone = {
        customer: stripe_client.customer_gone(customer)
        for customer in {
            _report_customer(batch)
            for batch, event, which in named.values()
            if which is Named.LAST and event.code == CUSTOMER_NOT_FOUND
        }
    }
    marked = sum(
        _overage_report_named(batch=batch, event=event, which=which, gone=gone, now=now)
        for batch, event, which in named.values()
    )
    # A name that is no batch's, not even one re-sent since, may still have been one of
    # ours (the meter is overage's alone): as good as unnamed.
    unnamed = report.unnamed + unknown
    if unnamed and (our_meter or handled) and report.start and report.end:
        # A batch named by an earlier attempt alone is judged as any batch sent in the
        # window: the attempt Stripe answered may be one of the failures it did not name
        # (samples are capped, and a cause that dropped one attempt, an archived meter,
        # drops the next). Every other name the report acted on, or an earlier reading did.
        earlier = {i for i, (_, _, which) in named.items() if which is Named.EARLIER}
        marked += _overage_reports_doubt(report=report, unnamed=unnamed, named=handled - earlier)
    return marked


def _overage_report_named(
    *,
    batch: OverageReport,
    event: DroppedEvent,
    which: Named,
    gone: dict[str, bool],
    now: datetime,
) -> bool:
    """Do what Stripe naming `event` as dropped calls for (the module's docstring)."""
    if batch.meter_error == MeterError.COUNTED:
        # Finance saw it among the meter's events at Stripe: a report naming it is late,
        # or about another attempt. Re-sending it would bill it twice.
        logger.warning(
            "overage report %s: Stripe reported %s dropped (%s), but finance found the "
            "batch counted at Stripe: left counted, not sent again.",
            batch.identifier,
            event.key,
            event.code,
        )
        return False
    if which is Named.EARLIER:
        logger.warning(
            "overage report %s: Stripe reported an earlier attempt, %s, dropped (%s); "
            "ignored: Stripe answered the attempt sent at %s, which counts unless Stripe "
            "reports that one dropped (by name, or among failures it does not name).",
            batch.identifier,
            event.key,
            event.code,
            batch.sent_at.isoformat(),
        )
        return False
    if which is Named.UNSURE:
        return _overage_report_unsure(report=batch, dropped=event)
    customer = _report_customer(batch)
    if event.code == CUSTOMER_NOT_FOUND and gone.get(customer):
        return _overage_report_fail(report=batch, customer=customer, now=now, dropped=event)
    if _resends_all(batch) >= settings.BILLING_OVERAGE_MAX_RESENDS:
        return _overage_report_to_finance(report=batch, dropped=event)
    return _overage_report_requeue(report=batch, dropped=event)


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
    resend = f"{match['first']}_r{_resends(report.identifier) + 1}"
    error = (
        f"Stripe dropped meter event {report.identifier} ({dropped.code}: {dropped.message}); "
        f"sent again as {resend} at the next overage run."
    )
    return _overage_report_drop(
        _unfailed(report),
        report=report,
        dropped=dropped,
        outcome="resent",
        error=error,
        finance=finance,
        identifier=resend,
        # attempts are the new identifier's from now on
        last_attempt_at=None,
        first_unknown_attempt_at=None,
    )


def _resends(identifier: str) -> int:
    """How often the batch was re-sent: n in its identifier's `_r<n>`."""
    return int(_RESENT.match(identifier)["n"] or 0)


def _resends_all(report: OverageReport) -> int:
    """How often the batch was sent again after an attempt failed: re-sent under a new
    identifier after Stripe dropped it, or tried again after Stripe refused it at once.
    Both count toward BILLING_OVERAGE_MAX_RESENDS; a retry after no answer does not."""
    return _resends(report.identifier) + report.refusals


def _unfailed(report: OverageReport):
    return OverageReport.objects.filter(
        pk=report.pk, identifier=report.identifier, failed_at__isnull=True
    )


def _overage_report_to_finance(*, report: OverageReport, dropped: DroppedEvent) -> bool:
    """Leave a batch Stripe named as dropped again, after BILLING_OVERAGE_MAX_RESENDS
    re-sends, to finance: a cause that persists (an archived meter, a wrong customer id)
    would have it re-sent, and logged at ERROR, at every run for good. Flagged maybe
    dropped and sent at the attempt Stripe dropped, so that no run sends it and finance's
    "Not counted — send again" (once the cause is put right) applies to it. Logged once:
    the same report read again makes the same update, which changes nothing."""
    error = (
        f"Stripe dropped meter event {report.identifier} ({dropped.code}: {dropped.message}) "
        f"after it was re-sent {_resends_all(report)} times "
        "(BILLING_OVERAGE_MAX_RESENDS): not sent again by itself. Put the cause right at "
        "Stripe (the meter, the customer), then choose 'Not counted — send again'."
    )[:500]
    return _overage_report_drop(
        _unfailed(report).exclude(meter_error=MeterError.IN_DOUBT, error=error),
        report=report,
        dropped=dropped,
        outcome="finance",
        why="left to finance",
        error=error,
        sent_at=dropped.attempt,
        meter_error=MeterError.IN_DOUBT,
    )


def _overage_report_unsure(*, report: OverageReport, dropped: DroppedEvent) -> bool:
    """Flag a batch maybe dropped where Stripe named an attempt of it (or it alone) and its
    answers do not say whether another attempt counted: finance checks at Stripe. One
    not marked sent is marked sent at its last attempt, which Stripe may have counted, so
    that no run sends it again and finance's actions apply to it. Where no attempt of it
    is known at all, there is nothing to check: logged only."""
    sent_at = report.sent_at or report.last_attempt_at or dropped.attempt
    what = (
        f"meter event {report.identifier}, naming no attempt,"
        if dropped.attempt is None
        else f"attempt {dropped.key}"
    )
    if sent_at is None:
        logger.warning(
            "overage report %s: Stripe reported %s dropped (%s), and no attempt of it is "
            "known: ignored, left to its next attempt.",
            report.identifier,
            what,
            dropped.code,
        )
        return False
    error = (
        f"Stripe reported {what} dropped ({dropped.code}: {dropped.message}), and its answers "
        "do not say whether another attempt of this batch counted (the last got no answer, "
        "or is not the one named). Check it at Stripe; re-sending a counted batch bills it "
        "twice."
    )
    return _overage_report_mark(
        _unfailed(report).exclude(meter_error__in=(MeterError.IN_DOUBT, MeterError.COUNTED)),
        report=report,
        action="billing.overage_in_doubt",
        why="may have been dropped by Stripe",
        data={"codes": [dropped.code], "named": dropped.key},
        meter_error=MeterError.IN_DOUBT,
        stripe_error_code=dropped.code[:64],
        error=error[:500],
        sent_at=sent_at,
    )


def _overage_report_drop(
    rows,
    *,
    report: OverageReport,
    dropped: DroppedEvent,
    outcome: str,
    error: str,
    finance: FinanceCheck | None = None,
    why: str = "dropped by Stripe",
    **changes,
) -> bool:
    """Mark a batch Stripe dropped (re-queued, failed or left to finance: `changes`; unless
    they say otherwise, no longer sent, its meter error `dropped`); False when another
    reading of the report did it first."""
    return _overage_report_mark(
        rows,
        report=report,
        action="billing.overage_dropped",
        why=why,
        data={
            "code": dropped.code,
            "message": dropped.message,
            "outcome": outcome,
            "resent_as": changes.get("identifier", ""),
        },
        finance=finance,
        stripe_error_code=dropped.code[:64],
        error=error[:500],
        **{"sent_at": None, "meter_error": MeterError.DROPPED, **changes},
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
