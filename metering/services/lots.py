"""Credit lots: where credits came from, which are spent first, and expiry.

Burn order, fixed and documented (README "The credit ledger"):
  1. for a hold's capture, lots that expired after the hold was placed,
     soonest-expired first (they can only still hold credits that back a
     pending hold placed before they expired; spending them first leaves no
     expired credit behind when the hold settles);
  2. lower `priority` first;
  3. soonest `expires_at` first, lots that never expire last;
  4. free before paid (paid credits are the ones a member may resell or be
     refunded, so they are kept longest);
  5. oldest first (`pk`).
Lots that had expired before the hold was placed (or, for any other spend,
before now) come after all of these: their credits back older holds, which
the sweep keeps them for, and are never spent by work they did not back.

Which credits a pending hold will burn is therefore known without storing
it: `holds_backing` replays the pending holds over the lots in this order.
The sweep expires the rest of the expired lots, and a clawback or a trim
takes only what no pending hold will burn.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

from django.db import transaction
from django.db.models import F, Min, Q

from accounts.models import Organization
from metering.models import (
    AccountKind,
    CreditLot,
    Hold,
    HoldStatus,
    JournalTransaction,
    LedgerAccount,
    LotMovement,
    LotSource,
    TransactionKind,
)
from metering.services.postings import accounts_for, post, retry_on_deadlock

logger = logging.getLogger(__name__)

FAR_FUTURE_SORT_KEY = (1, 0.0)


def burn_sort_key(lot: CreditLot, now: datetime, placed_at: datetime | None = None) -> tuple:
    """The lot's place in the burn order of a spend at `now`, or of the capture of a hold
    placed at `placed_at`.

    Lots that expired since the hold was placed go soonest-expired first: a lot that
    expired earlier could back fewer holds (only those placed before it expired), so a
    capture that takes it leaves the later ones to the later holds that may still use
    them; `holds_backing`'s replay relies on it."""
    rank = _expiry_rank(lot, now, placed_at or now)
    expired_first = lot.expires_at.timestamp() if rank == 0 else 0.0
    return (rank, _claimed_before(lot, placed_at or now), expired_first, *_static_key(lot))


def _claimed_before(lot: CreditLot, placed_at: datetime) -> int:
    """1 when a pending refund claimed the lot before the hold was placed (or before a spend
    at `placed_at`): burned after the lots of the same expiry rank, so that new work takes
    the member's other credits and the claim finds its credits when the old work ends."""
    return 1 if lot.claimed_at is not None and lot.claimed_at < placed_at else 0


def _static_key(lot: CreditLot) -> tuple:
    """The burn order's terms that do not depend on the moment: priority, soonest expiry
    (never-expiring last), free before paid, oldest."""
    expiry = (0, lot.expires_at.timestamp()) if lot.expires_at else FAR_FUTURE_SORT_KEY
    return (lot.priority, expiry, lot.paid, lot.pk)


def _expiry_rank(lot: CreditLot, now: datetime, placed_at: datetime) -> int:
    """0: expired since the hold was placed (burned first); 1: not expired; 2: expired
    before it was placed (burned only if nothing else is left: a bug elsewhere, which a
    failed settlement would make worse)."""
    if lot.expires_at is None or lot.expires_at > now:
        return 1
    return 0 if lot.expires_at > placed_at else 2


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
    sale: LotSale | None = None,
) -> CreditLot:
    """A new lot of the account's: granted (`sale`: what it was sold for, if known) or
    split from `parent` (its credits keep the sale of the parent's root)."""
    if parent is not None:
        sale = None  # the root's sale stands for every lot split from it
    elif sale is None:
        sale = LotSale.unknown(paid=paid)
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
        root_id=lot_root_id(parent) if parent is not None else None,
        revenue=sale.revenue if sale is not None else None,
        revenue_currency=sale.currency if sale is not None else "",
        origin=sale.origin if sale is not None else "",
        created_by=txn,
    )
    LotMovement.objects.create(lot=lot, transaction=txn, amount=amount)
    account_lower_next_expiry(account_id=account.pk, expires_at=expires_at)
    return lot


def lot_root_id(lot: CreditLot) -> int:
    """The granted lot `lot` was split from (itself if it was granted).

    Walks up `parent` while a lot's root is not written: a process still running the
    code before lots had roots (a rolling deploy) inserts split lots without theirs,
    and a lot split from such a one must still find the grant whose sale it earns at.
    Not on the settlement path (only splits: escrow, the marketplace, transfers); the
    `lots_backfill_sale` command writes the missing roots themselves."""
    while lot.root_id is None and lot.parent_id is not None:
        lot = CreditLot.objects.only("pk", "root_id", "parent_id").get(pk=lot.parent_id)
    return lot.root_id or lot.pk


@dataclass(frozen=True)
class LotSale:
    """What a granted lot's credits were sold for (CreditLot.revenue, revenue_currency,
    origin): `revenue` minor units of `currency` for all of them, sold by `origin` (the
    seller's label: a plan's code, "pack"). The seller of the credits says it at the
    grant; metering only keeps it for finance's report."""

    revenue: int | None
    currency: str = ""
    origin: str = ""

    @classmethod
    def unknown(cls, *, paid: bool) -> LotSale:
        """Nobody said: free credits (promotions, adjustments) were sold for nothing;
        paid ones for a price not known here."""
        return cls(revenue=None if paid else 0)

    def normalized(self, *, paid: bool) -> LotSale:
        """The sale as the lot keeps it: its currency lower-cased (invoices say "USD").

        A sale that is still malformed (no ISO currency for a revenue, a revenue that is
        not a non-negative integer) is report metadata gone wrong, never a reason to
        refuse a paying customer's credits: the lot is granted at a price not known
        (LotSale.unknown, the report shows it so), and the log says what was wrong."""
        currency = (self.currency or "").strip().lower()
        origin = self.origin[:ORIGIN_MAX_LENGTH]
        revenue_ok = self.revenue is None or (
            isinstance(self.revenue, int)
            and not isinstance(self.revenue, bool)
            and self.revenue >= 0
        )
        if revenue_ok and (not self.revenue or _CURRENCY.match(currency)) and origin == self.origin:
            return LotSale(revenue=self.revenue, currency=currency, origin=origin)
        logger.warning(
            "credit grant: malformed sale %r (revenue a non-negative integer, its lower-case "
            "ISO 4217 currency, origin at most %s characters); granted at a price unknown",
            self,
            ORIGIN_MAX_LENGTH,
        )
        return LotSale(revenue=LotSale.unknown(paid=paid).revenue, origin=origin)


_CURRENCY = re.compile(r"^[a-z]{3}$")
ORIGIN_MAX_LENGTH = CreditLot._meta.get_field("origin").max_length


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
    placed_at: datetime | None = None,
) -> list[tuple[CreditLot, int]]:
    """Take `amount` from the account's lots in burn order; returns (lot, taken) pairs.

    `placed_at`: the capture of a hold placed then (see the burn order). Locks
    the lots in primary-key order (the order every writer uses), then burns in
    burn order. The caller has already debited the account, so the lots must
    cover it; if they do not, the ledger is inconsistent and the whole
    transaction is refused.
    """
    lots_qs = CreditLot.objects.filter(account=account, remaining__gt=0)
    if only is not None:
        lots_qs = lots_qs.filter(only)
    lots = sorted(
        lots_qs.select_for_update().order_by("pk"),
        key=lambda lot: burn_sort_key(lot, now, placed_at),
    )
    taken, left = take_in_order(((lot, lot.remaining) for lot in lots), amount)
    if left:
        raise LedgerInconsistent(
            f"lots of account {account.pk} hold {amount - left} of the {amount} to burn"
        )
    lots_take(txn=txn, taken=taken)
    return taken


def take_in_order(
    available: Iterable[tuple[CreditLot, int]], amount: int
) -> tuple[list[tuple[CreditLot, int]], int]:
    """`amount` out of each (lot, what it has) in turn: the (lot, taken) pairs, and what
    was left that they did not cover."""
    taken = []
    for lot, has in available:
        if amount == 0:
            break
        take = min(has, amount)
        if take > 0:
            taken.append((lot, take))
            amount -= take
    return taken, amount


def lots_take(*, txn: JournalTransaction, taken: list[tuple[CreditLot, int]]) -> None:
    """Take each (lot, amount) from its lot, with its movement; the caller holds the lots'
    account's row lock and has posted the entries."""
    for lot, take in taken:
        CreditLot.objects.filter(pk=lot.pk).update(remaining=F("remaining") - take)
        lot.remaining -= take
    LotMovement.objects.bulk_create(
        LotMovement(lot=lot, transaction=txn, amount=-take) for lot, take in taken
    )


def holds_backing(
    *,
    organization: Organization,
    lots: list[CreditLot],
    now: datetime,
    placed_before: datetime | None = None,
) -> dict[int, int]:
    """How much of each of a wallet's `lots` the organization's pending holds will burn, by
    lot id: every pending hold replayed over the lots in its capture's burn order, the most
    recently placed first (it may use the fewest expired lots), as far as the lots reach.
    `placed_before`: only the holds placed by then. The caller holds the wallet's row lock,
    which every writer of holds and lots takes."""
    pending = Hold.objects.filter(organization=organization, status=HoldStatus.PENDING)
    if placed_before is not None:
        pending = pending.filter(created_at__lte=placed_before)
    pending = pending.order_by("-created_at", "-pk").values_list("created_at", "amount")
    free = {lot.pk: lot.remaining for lot in lots}
    # Sorted once: each hold's burn order is the expired lots it may use (those that
    # expired after it was placed, soonest first), then the unexpired ones, both in
    # these orders; lots expired before it was placed never backed it.
    expired = sorted(
        (lot for lot in lots if _expiry_rank(lot, now, now) == 2),
        key=lambda lot: (lot.expires_at, *_static_key(lot)),
    )
    unexpired = sorted((lot for lot in lots if _expiry_rank(lot, now, now) == 1), key=_static_key)
    for placed_at, amount in pending:
        usable = [lot for lot in expired if lot.expires_at > placed_at]
        # Each group with the lots a refund claimed before this hold last (stable: the
        # rest of the order stands), as its capture takes them (burn_sort_key).
        order = [
            lot
            for group in (usable, unexpired)
            for claimed in (0, 1)
            for lot in group
            if _claimed_before(lot, placed_at) == claimed
        ]
        taken, _ = take_in_order(((lot, free[lot.pk]) for lot in order), amount)
        for lot, take in taken:
            free[lot.pk] -= take
    return {lot.pk: lot.remaining - free[lot.pk] for lot in lots if free[lot.pk] < lot.remaining}


def lots_unheld(
    *,
    organization: Organization,
    wallet: LedgerAccount,
    lots: Q,
    now: datetime,
    placed_before: datetime | None = None,
    lock: bool = False,
) -> list[tuple[CreditLot, int]]:
    """The wallet's unexpired lots that `lots` selects, each with what pending holds will not
    burn of it (`holds_backing`; `placed_before`: only the holds placed by then).

    `lock`: lock those lots, for a writer that holds the wallet's row lock and takes from
    them; without it, a read as of its statements."""
    chosen = CreditLot.objects.filter(account=wallet, remaining__gt=0).filter(
        lots & (Q(expires_at__isnull=True) | Q(expires_at__gt=now))
    )
    if lock:
        chosen = chosen.select_for_update()
    chosen = list(chosen.order_by("pk"))
    # Every lot of the wallet: a hold burns those it may use in burn order, so what it
    # backs of the chosen depends on the others too.
    backing = holds_backing(
        organization=organization,
        lots=list(CreditLot.objects.filter(account=wallet, remaining__gt=0)),
        now=now,
        placed_before=placed_before,
    )
    return [(lot, lot.remaining - backing.get(lot.pk, 0)) for lot in chosen]


# What a finance debit (credits_adjust) may take: never a plan's overage allowance. It is
# lent, not the member's, and every credit burned from it is usage that the overage report
# invoices (gymbilling.services.overage): a ledger correction drawn on it would be billed
# to the customer as overage.
DEBITABLE_LOTS = ~Q(source=LotSource.OVERAGE)


def debit_room(
    *, organization: Organization, wallet: LedgerAccount, now: datetime, lock: bool = False
) -> tuple[list[tuple[CreditLot, int]], int]:
    """What a finance debit may take of the wallet: its debitable lots with what pending
    holds leave of each, and in all that less the wallet's claim (what pending refunds and
    rollovers wait for is the member's own credits, never the allowance, and is held back
    as every spend holds it back; conservative while the work they wait for runs).

    `wallet` as read under its row lock by a writer (`lock`), or just now by a read."""
    free = lots_unheld(
        organization=organization, wallet=wallet, lots=DEBITABLE_LOTS, now=now, lock=lock
    )
    return free, max(0, sum(take for _, take in free) - wallet.claimed)


class LedgerInconsistent(RuntimeError):
    """Lots and balances disagree: a bug or a manual edit; reconcile will say where."""


def lots_expirable(
    *, account: LedgerAccount, organization: Organization | None, now: datetime, lock: bool
) -> tuple[list[tuple[CreditLot, int]], int]:
    """What of the account's lots past their expiry at `now` may move to the expiry account:
    (lot, credits) pairs, and what those lots hold in all (the difference backs pending
    holds placed before the lots expired, and waits for their captures).

    `lock`: lock the lots; the sweep, which holds the account's row lock. Without it, a
    read (the balance selector) sees what the sweep would take, as of its statements.
    """
    expired_qs = CreditLot.objects.filter(account=account, remaining__gt=0, expires_at__lte=now)
    if lock:
        expired_qs = expired_qs.select_for_update()
    expired_lots = list(expired_qs.order_by("pk"))
    due = sum(lot.remaining for lot in expired_lots)
    backing: dict[int, int] = {}
    if account.kind == AccountKind.WALLET and expired_lots:
        # What pending holds placed before these lots expired will burn of
        # them must wait for the holds' captures; the rest expires now. Every
        # writer of the holds locks the wallet first, and the sweep holds that lock.
        # Unexpired lots count too: a hold burns lots it may use in burn order.
        backing = holds_backing(
            organization=organization,
            lots=expired_lots
            + list(
                CreditLot.objects.filter(account=account, remaining__gt=0, expires_at__gt=now)
                | CreditLot.objects.filter(
                    account=account, remaining__gt=0, expires_at__isnull=True
                )
            ),
            now=now,
        )
    taken = [
        (lot, lot.remaining - backing.get(lot.pk, 0))
        for lot in expired_lots
        if lot.remaining > backing.get(lot.pk, 0)
    ]
    return taken, due


def account_expire_lots(*, account: LedgerAccount, now: datetime) -> int:
    """Move the unspent remainder of the account's expired lots to the expiry account.

    Takes the account's row lock. Credits of an expired lot that back a
    pending hold cannot move yet (they are in the holds account); they burn
    first when the hold is captured, and the next spend or sweep after the
    hold gives the rest back expires it. Returns the micro-credits expired.
    """
    locked = LedgerAccount.objects.select_for_update().get(pk=account.pk)
    org = locked.organization
    taken, due = lots_expirable(account=locked, organization=org, now=now, lock=True)
    movable = sum(take for _, take in taken)
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
        lots_take(txn=txn, taken=taken)
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
    """Sweep every account with a lot due, or whose next expiry has come though none is;
    the beat task and `credits_expire` call this.

    The second kind is an account left due with nothing left to expire: a sweep that
    kept an expired lot's credits for a pending hold (`account_expire_lots`) whose
    capture then burned all of them, or a lot spent before its expiry. Nothing but a
    spend's sweep would move its `next_expiry_at` on, and until then every settlement
    on it says no balance (metering/0018) and every balance read reckons the sweep's
    work (selectors._expirable): its sweep moves nothing and sets the next real expiry.

    Each account is swept in its own transaction, so one busy wallet never
    holds the others' locks, and one that fails (a ledger that disagrees with
    itself, which reconcile names) is logged and left for the next run
    without stopping the others. Safe to run concurrently and repeatedly.
    """
    account_ids = set(
        CreditLot.objects.filter(remaining__gt=0, expires_at__lte=now)
        .values_list("account_id", flat=True)
        .distinct()
    )
    account_ids.update(
        LedgerAccount.objects.filter(next_expiry_at__lte=now).values_list("pk", flat=True)
    )
    expired = 0
    for pk in sorted(account_ids):
        try:
            expired += _account_sweep(account_id=pk, now=now)
        except Exception:
            logger.exception("account %s: its expiry sweep failed; the next run tries again", pk)
    return expired


@retry_on_deadlock
def _account_sweep(*, account_id: int, now: datetime) -> int:
    with transaction.atomic():
        return account_expire_lots(account=LedgerAccount.objects.get(pk=account_id), now=now)
