"""Holds: reserve credits before work starts, settle exactly once after.

place:   wallet -> holds            (refused with insufficient_credits)
capture: holds -> consumption (the part used) and holds -> wallet (the rest);
         the used part burns the wallet's lots in burn order
release: holds -> wallet            (capture of nothing, status released)
expire:  holds -> wallet            (the sweeper, for holds nobody settled)

A hold is keyed by its business event (for inference, the job id): placing
twice places once, and settling is guarded by the hold's row lock and its
status, so retries and crashes can never capture twice.
"""

from __future__ import annotations

import functools
import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Model
from django.utils import timezone

from accounts import sql
from accounts.errors import ApplicationError
from accounts.models import Organization
from metering.models import AccountKind, Hold, HoldStatus, TransactionKind
from metering.services import fastpath
from metering.services.lots import lots_burn
from metering.services.postings import (
    accounts_for,
    accounts_lock,
    fingerprint,
    idempotent,
    post,
    require_key,
    require_positive,
    retry_on_deadlock,
    transaction_open,
)
from metering.services.usage import UsageDraft
from metering.signals import hold_expired

logger = logging.getLogger(__name__)


@retry_on_deadlock
def hold_place(
    *,
    organization: Organization,
    amount: int,
    key: str,
    ttl: timedelta | None = None,
    memo: str = "",
    new_key: bool = False,
    row: Model | None = None,
    durable: bool = True,
) -> Hold:
    """Reserve `amount` micro-credits, or raise `insufficient_credits` (402).

    `new_key`: the caller made `key` just now, unique by construction (a new
    job's id), so it cannot replay an earlier hold; the fast path then sets
    no savepoint (two round trips less on every inference request).

    `row` (with `new_key` only): a model instance not saved yet, inserted in
    the same transaction as the hold, and only if the hold is placed: a new
    job's row. On the fast path that is the same statement, so with no
    transaction open the job and its hold commit as it ends, with no BEGIN
    or COMMIT round trip, and the wallet's row lock is held for that one
    statement only. No save signals are sent for it (accounts.sql.insert).

    `durable=False` (with no transaction open; on the fast path): the hold commits
    without waiting for PostgreSQL's WAL flush, a round trip to the disk
    less. Only for a caller whose next durable commit comes before anything
    depends on the hold outside the database: the WAL is flushed in order,
    so that commit makes this one durable too, and a crash before it loses
    the hold and its row together (the request is never answered, and what
    an engine already did for it is not billed: nothing delivered it), and
    the row's primary key may then be given to another row: whatever names
    the row outside the database before that commit must name it by more
    than its key (inference's task message has the job's public id). An
    inference request answered only after its job settles is such a caller
    (inference.services.jobs.job_submit); one answered sooner (a stream, an
    asynchronous job's 202) is not. Elsewhere (the ORM path, inside a
    transaction) the commit is durable as always.
    """
    require_positive(amount)
    require_key(key)
    if row is not None and not new_key:
        raise ValueError("hold_place(row=...) needs new_key=True: a replay would not write it")
    now = timezone.now()
    ttl = ttl if ttl is not None else settings.METERING_HOLD_TTL
    txn_key = f"hold:{key}"
    fp = fingerprint(op="hold", org=organization.pk, amount=amount)

    if fastpath.enabled():
        hold = fastpath.hold_place_fast(
            organization_id=organization.pk,
            amount=amount,
            key=key,
            txn_key=txn_key,
            fp=fp,
            memo=memo,
            now=now,
            expires_at=now + ttl,
            savepoint=not new_key,
            row=sql.insert_parts(row) if row is not None else None,
            durable=durable,
        )
        if hold is not None:
            if row is not None:
                sql.mark_inserted(row, hold.row_pk)
            return hold

    def work() -> Hold:
        if row is not None:
            sql.insert(row)
        org_accounts, _ = accounts_for(organization)
        txn = transaction_open(
            kind=TransactionKind.HOLD_PLACE,
            key=txn_key,
            fingerprint=fp,
            organization=organization,
            memo=memo,
        )
        post(txn, [(org_accounts.wallet, -amount), (org_accounts.holds, amount)], now=now)
        return Hold.objects.create(
            organization=organization,
            key=key,
            amount=amount,
            expires_at=now + ttl,
            place_transaction=txn,
            created_at=now,  # the moment its placement swept expired lots at
        )

    return idempotent(key=txn_key, fingerprint=fp, work=work, replay=lambda txn: txn.placed_hold)


SETTLE_KINDS = {
    HoldStatus.CAPTURED: TransactionKind.HOLD_CAPTURE,
    HoldStatus.RELEASED: TransactionKind.HOLD_RELEASE,
    HoldStatus.EXPIRED: TransactionKind.HOLD_EXPIRE,
}


def _settle_fingerprint(status: str, captured: int) -> str:
    return f"{status}:{captured}"


def _settle(
    *, key: str, captured: int, status: str, now: datetime, usage: UsageDraft | None = None
) -> Hold:
    """Settle a pending hold once. The hold's row lock orders concurrent settlers.

    With `usage`, its usage record is written in the same transaction.
    """
    _check_usage(captured, usage)
    if fastpath.enabled():
        hold = fastpath.hold_settle_fast(
            key=key,
            captured=captured,
            status=status,
            txn_kind=SETTLE_KINDS[status],
            fp=_settle_fingerprint(status, captured),
            now=now,
            usage=usage,
        )
        if hold is not None:
            return hold
    with transaction.atomic():
        hold = _settle_orm(key=key, captured=captured, status=status, now=now)
        if usage is not None:
            usage.write(hold=hold)
        return hold


def _require_capture_amount(amount) -> None:
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
        raise ApplicationError(
            code="invalid_amount",
            message="The captured amount must be a non-negative integer of micro-credits.",
            param="amount",
        )


def _check_usage(captured: int, usage: UsageDraft | None) -> None:
    if usage is not None:
        usage.validate()
        if usage.credits != captured:
            raise ApplicationError(
                code="invalid_usage",
                message=f"The usage record charges {usage.credits} micro-credits; the "
                f"settlement captures {captured}.",
            )


def hold_settle_params(*, key: str, captured: int | None, usage: UsageDraft | None) -> dict:
    """What a caller's own statement passes to the settlement function (fastpath.SETTLE_ARGS).

    `captured`: the amount hold_capture would capture, or None for what
    hold_release does. Checked as they check it. For a caller that settles a
    hold in the same statement as its own write (inference's job claim,
    migration inference/0004); only with `fastpath.enabled()`. When that
    statement's function returns no row, the caller runs hold_capture or
    hold_release instead, in a transaction with its own write.
    """
    if captured is None:
        status, captured = HoldStatus.RELEASED, 0
    else:
        status = HoldStatus.CAPTURED
        _require_capture_amount(captured)
    require_key(key)
    _check_usage(captured, usage)
    return fastpath.settle_params(
        key=key,
        captured=captured,
        status=status,
        txn_kind=SETTLE_KINDS[status],
        fp=_settle_fingerprint(status, captured),
        now=timezone.now(),
        usage=usage,
    )


def _settle_orm(*, key: str, captured: int, status: str, now: datetime) -> Hold:
    """The reference path of _settle (the fast path's fallback), inside its transaction."""
    hold = (
        # of=("self",): lock the hold only. Locking the joined organization
        # row too would block every insert that references it (foreign
        # keys take a KEY SHARE lock), serializing all of its traffic.
        Hold.objects.select_for_update(of=("self",))
        .select_related("organization")
        .filter(key=key)
        .first()
    )
    if hold is None:
        raise ApplicationError(
            code="hold_not_found", message=f"No hold has the key {key!r}.", status=404
        )
    if hold.status != HoldStatus.PENDING:
        if hold.status == status and hold.captured == captured:
            return hold  # a retry of the settlement that already happened
        raise ApplicationError(
            code="hold_already_settled",
            message=(
                f"The hold {key!r} was already {hold.status} "
                f"({hold.captured} micro-credits captured); a hold settles once."
            ),
            status=409,
        )
    if captured > hold.amount:
        raise ApplicationError(
            code="capture_exceeds_hold",
            message=(
                f"Cannot capture {captured} micro-credits from a hold of {hold.amount}; "
                "the hold must cover the worst case."
            ),
            param="amount",
        )
    org_accounts, system = accounts_for(hold.organization, AccountKind.CONSUMPTION)
    # Lock the wallet even when nothing goes back to it (a full capture
    # posts nothing there): its row lock guards the lots burned below.
    accounts_lock(org_accounts.wallet, org_accounts.holds)
    txn = transaction_open(
        kind=SETTLE_KINDS[status],
        key=f"hold:{key}:settle",
        fingerprint=_settle_fingerprint(status, captured),
        organization=hold.organization,
    )
    post(
        txn,
        [
            (org_accounts.holds, -hold.amount),
            (system[AccountKind.CONSUMPTION], captured),
            (org_accounts.wallet, hold.amount - captured),
        ],
        now=now,
        spend=False,
    )
    if captured:
        lots_burn(
            txn=txn,
            account=org_accounts.wallet,
            amount=captured,
            now=now,
            placed_at=hold.created_at,
        )
    hold.status = status
    hold.captured = captured
    hold.settle_transaction = txn
    hold.settled_at = now
    hold.save(update_fields=["status", "captured", "settle_transaction", "settled_at"])
    return hold


@retry_on_deadlock
def hold_capture(*, key: str, amount: int, usage: UsageDraft | None = None) -> Hold:
    """Capture `amount` (0 up to the hold) for the work really done; release the rest.

    With `usage`, the usage record that `amount` pays for is written with it.
    """
    _require_capture_amount(amount)
    return _settle(
        key=key, captured=amount, status=HoldStatus.CAPTURED, now=timezone.now(), usage=usage
    )


@retry_on_deadlock
def hold_release(*, key: str, usage: UsageDraft | None = None) -> Hold:
    """Give the whole hold back: the work was canceled or failed before any token.

    With `usage`, the (unbilled) usage record of that work is written with it.
    """
    return _settle(key=key, captured=0, status=HoldStatus.RELEASED, now=timezone.now(), usage=usage)


# A hold still pending this long past its expiry (its receivers failed at
# every sweep since, or the sweep did not run) is released without waiting for
# them, and they are told after the commit, best effort: a receiver that fails
# for good (a bug) must not keep a customer's credits held forever. Each such
# release is logged as an error.
HOLD_EXPIRY_FORCED_AFTER = timedelta(hours=24)


def holds_expire(*, now: datetime | None = None) -> int:
    """Release pending holds past their expiry (work that never settled). Returns how many.

    Each hold's release commits together with what its `hold_expired`
    receivers do (an inference job ends `expired`): a receiver that fails
    undoes that hold's release, which the next sweep tries again, so that no
    hold is released under work still shown open. The other holds go on.
    The receivers run first, inside the transaction: they lock their work's
    row (a job) before the hold is locked, the order in which the work's own
    settlement locks them (inference's job_settle), so the two never wait on
    each other in a cycle. Work settled meanwhile makes the release fail
    (`hold_already_settled`), which undoes the receivers' writes too. A hold
    HOLD_EXPIRY_FORCED_AFTER past its expiry is released first and its
    receivers told after the commit.
    """
    now = now or timezone.now()
    due = list(
        Hold.objects.filter(status=HoldStatus.PENDING, expires_at__lte=now)
        .order_by("pk")
        .values_list("key", "expires_at")
    )
    expired = 0
    for key, expires_at in due:
        forced = now - expires_at > HOLD_EXPIRY_FORCED_AFTER
        try:
            with transaction.atomic():
                if not forced:
                    hold_expired.send(sender=Hold, key=key)
                _settle(key=key, captured=0, status=HoldStatus.EXPIRED, now=now)
                if forced:
                    transaction.on_commit(functools.partial(_tell_expired, key))
        except ApplicationError as exc:
            if exc.code != "hold_already_settled":  # else settled meanwhile: nothing to do
                logger.error(
                    "hold %s: its expiry failed (%r); the next sweep tries again", key, exc
                )
        except Exception:
            logger.exception("hold %s: its expiry failed; the next sweep tries again", key)
        else:
            expired += 1
            if forced:
                logger.error(
                    "hold %s: released %s past its expiry before its receivers ended its work",
                    key,
                    now - expires_at,
                )
    return expired


def _tell_expired(key: str) -> None:
    for receiver, result in hold_expired.send_robust(sender=Hold, key=key):
        if isinstance(result, Exception):
            logger.error("hold %s expired; %r failed on it", key, receiver, exc_info=result)
