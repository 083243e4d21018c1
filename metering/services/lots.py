"""Credit lots: where credits came from, which are spent first, and expiry.

Burn order, fixed and documented (README "The credit ledger"):
  1. lots already past their expiry (they can only still hold credits that
     back a pending hold placed before they expired; spending them first
     leaves no expired credit behind when the hold settles);
  2. lower `priority` first;
  3. soonest `expires_at` first, lots that never expire last;
  4. free before paid (paid credits are the ones a member may resell or be
     refunded, so they are kept longest);
  5. oldest first (`pk`).
"""

from __future__ import annotations

import uuid
from datetime import datetime

from django.db import transaction
from django.db.models import F, Min, Q

from accounts.models import Organization
from metering.models import (
    AccountKind,
    CreditLot,
    JournalTransaction,
    LedgerAccount,
    LotMovement,
    TransactionKind,
)
from metering.services.postings import accounts_for, post, retry_on_deadlock

FAR_FUTURE_SORT_KEY = (1, 0.0)


def burn_sort_key(lot: CreditLot, now: datetime) -> tuple:
    expired = lot.expires_at is not None and lot.expires_at <= now
    expiry = (0, lot.expires_at.timestamp()) if lot.expires_at else FAR_FUTURE_SORT_KEY
    return (0 if expired else 1, lot.priority, expiry, lot.paid, lot.pk)


def lot_create(
    *,
    txn: JournalTransaction,
    account: LedgerAccount,
    organization: Organization,
    amount: int,
    source: str,
    paid: bool,
    resellable: bool,
    priority: int,
    expires_at: datetime | None,
    parent: CreditLot | None = None,
) -> CreditLot:
    lot = CreditLot.objects.create(
        account=account,
        organization=organization,
        source=source,
        paid=paid,
        resellable=resellable,
        priority=priority,
        expires_at=expires_at,
        amount=amount,
        remaining=amount,
        parent=parent,
        created_by=txn,
    )
    LotMovement.objects.create(lot=lot, transaction=txn, amount=amount)
    account_lower_next_expiry(account_id=account.pk, expires_at=expires_at)
    return lot


def account_lower_next_expiry(*, account_id: int, expires_at: datetime | None) -> None:
    """Bring the account's `next_expiry_at` forward to `expires_at` if that is sooner.

    Only ever lowers it, so the cached value is never later than the truth;
    a stale-early value merely triggers a sweep that finds less to do.
    """
    if expires_at is None:
        return
    LedgerAccount.objects.filter(pk=account_id).filter(
        Q(next_expiry_at__isnull=True) | Q(next_expiry_at__gt=expires_at)
    ).update(next_expiry_at=expires_at)


def lots_burn(
    *,
    txn: JournalTransaction,
    account: LedgerAccount,
    amount: int,
    now: datetime,
    only: Q | None = None,
) -> list[tuple[CreditLot, int]]:
    """Take `amount` from the account's lots in burn order; returns (lot, taken) pairs.

    Locks the lots in primary-key order (the order every writer uses), then
    burns in burn order. The caller has already debited the account, so the
    lots must cover it; if they do not, the ledger is inconsistent and the
    whole transaction is refused.
    """
    lots_qs = CreditLot.objects.filter(account=account, remaining__gt=0)
    if only is not None:
        lots_qs = lots_qs.filter(only)
    lots = sorted(
        lots_qs.select_for_update().order_by("pk"), key=lambda lot: burn_sort_key(lot, now)
    )
    taken: list[tuple[CreditLot, int]] = []
    left = amount
    for lot in lots:
        if left == 0:
            break
        take = min(lot.remaining, left)
        left -= take
        taken.append((lot, take))
    if left:
        raise LedgerInconsistent(
            f"lots of account {account.pk} hold {amount - left} of the {amount} to burn"
        )
    for lot, take in taken:
        CreditLot.objects.filter(pk=lot.pk).update(remaining=F("remaining") - take)
        lot.remaining -= take
    LotMovement.objects.bulk_create(
        LotMovement(lot=lot, transaction=txn, amount=-take) for lot, take in taken
    )
    return taken


class LedgerInconsistent(RuntimeError):
    """Lots and balances disagree: a bug or a manual edit; reconcile will say where."""


def account_expire_lots(*, account: LedgerAccount, now: datetime) -> int:
    """Move the unspent remainder of the account's expired lots to the expiry account.

    Takes the account's row lock. Credits of an expired lot that back a
    pending hold cannot move yet (they are in the holds account); they burn
    first when the hold is captured, and the next spend or sweep after the
    hold gives the rest back expires it. Returns the micro-credits expired.
    """
    locked = LedgerAccount.objects.select_for_update().get(pk=account.pk)
    org = locked.organization
    expired_lots = CreditLot.objects.filter(
        account=locked, remaining__gt=0, expires_at__lte=now
    ).order_by("pk")
    due = sum(lot.remaining for lot in expired_lots)
    held = 0
    if locked.kind == AccountKind.WALLET:
        # Pending holds are taken to be backed by expired lots first (the
        # burn order captures those first), so that much of `due` must wait.
        # Every writer of the holds account locks the wallet first, and we
        # hold that lock, so this read cannot go stale.
        held = LedgerAccount.objects.get(organization=org, kind=AccountKind.HOLDS).balance
    movable = max(0, due - held)
    expired = 0
    if movable > 0:
        _, system = accounts_for(org, AccountKind.EXPIRY)
        txn = JournalTransaction.objects.create(
            kind=TransactionKind.EXPIRY,
            idempotency_key=f"expiry:{locked.pk}:{uuid.uuid4()}",
            fingerprint="",
            organization=org,
            memo="expired credit lots",
        )
        # The whole amount is taken from expired lots only, soonest expiry first.
        lots_burn(txn=txn, account=locked, amount=movable, now=now, only=Q(expires_at__lte=now))
        post(txn, [(locked, -movable), (system[AccountKind.EXPIRY], movable)], now=now, spend=False)
        expired = movable
    if due > movable:
        # The rest backs pending holds and cannot move yet. Keep the account
        # due, so every spend sweeps again first and expires whatever a
        # settled hold has given back meanwhile.
        next_expiry = now
    else:
        next_expiry = CreditLot.objects.filter(
            account=locked, remaining__gt=0, expires_at__gt=now
        ).aggregate(m=Min("expires_at"))["m"]
    LedgerAccount.objects.filter(pk=locked.pk).update(next_expiry_at=next_expiry)
    account.next_expiry_at = next_expiry
    return expired


def credits_expire(*, now: datetime) -> int:
    """Sweep every account with a lot due; the beat task and `credits_expire` call this.

    Each account is swept in its own transaction, so one busy wallet never
    holds the others' locks. Safe to run concurrently and repeatedly.
    """
    account_ids = (
        CreditLot.objects.filter(remaining__gt=0, expires_at__lte=now)
        .values_list("account_id", flat=True)
        .distinct()
    )
    return sum(_account_sweep(account_id=pk, now=now) for pk in sorted(set(account_ids)))


@retry_on_deadlock
def _account_sweep(*, account_id: int, now: datetime) -> int:
    with transaction.atomic():
        return account_expire_lots(account=LedgerAccount.objects.get(pk=account_id), now=now)
