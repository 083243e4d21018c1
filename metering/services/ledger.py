"""Grants, adjustments, transfers and reversals: every credit movement but holds."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q, Sum
from django.utils import timezone

from accounts.errors import ApplicationError
from accounts.models import Organization
from metering.models import (
    AccountKind,
    CreditLot,
    JournalTransaction,
    LedgerAccount,
    LotMovement,
    LotSource,
    TransactionKind,
)
from metering.selectors import lot_family_ids
from metering.services.lots import (
    LedgerInconsistent,
    LotSale,
    account_expire_lots,
    account_lower_next_expiry,
    burn_sort_key,
    debit_room,
    lot_create,
    lots_burn,
    lots_take,
    lots_unheld,
    take_in_order,
)
from metering.services.postings import (
    accounts_for,
    accounts_lock,
    amount_display,
    fingerprint,
    idempotent,
    post,
    require_key,
    require_positive,
    require_within_movement,
    retry_on_deadlock,
    transaction_open,
)

DEFAULT_LOT_PRIORITY = 100


def _require_future(expires_at: datetime | None, now: datetime) -> None:
    if expires_at is None:
        return
    if timezone.is_naive(expires_at):
        raise ApplicationError(
            code="invalid_expiry",
            message="expires_at must be timezone-aware.",
            param="expires_at",
        )
    if expires_at <= now:
        raise ApplicationError(
            code="lot_expired",
            message=f"expires_at {expires_at.isoformat()} is in the past; credits must expire in the future.",
            param="expires_at",
        )


def organization_account(organization: Organization, kind: str) -> LedgerAccount:
    """The organization's wallet or escrow account (KeyError for any other kind)."""
    org_accounts, _ = accounts_for(organization)
    return {
        AccountKind.WALLET: org_accounts.wallet,
        AccountKind.ESCROW: org_accounts.escrow,
    }[kind]


@retry_on_deadlock
def credits_grant(
    *,
    organization: Organization,
    amount: int,
    source: str,
    paid: bool,
    resellable: bool,
    key: str,
    expires_at: datetime | None = None,
    priority: int = DEFAULT_LOT_PRIORITY,
    memo: str = "",
    actor=None,
    sale: LotSale | None = None,
) -> CreditLot:
    """Issue new credits to the organization's wallet as one lot.

    `key` names the business event (an invoice id, a promotion code and the
    organization...); granting twice under one key grants once.
    `sale`: what the credits were sold for, for finance's revenue (LotSale); left
    out, free credits were sold for nothing and paid ones for an unknown price.
    It is not part of the grant's fingerprint: a replay returns the first lot.
    """
    require_positive(amount)
    require_key(key)
    if sale is not None:
        sale = sale.normalized(paid=paid)
    now = timezone.now()
    _require_future(expires_at, now)
    if source not in LotSource.values:
        raise ApplicationError(
            code="invalid_source", message=f"Unknown lot source {source!r}.", param="source"
        )
    if resellable and not paid:
        raise ApplicationError(
            code="invalid_lot",
            message="Only paid credits may be resellable.",
            param="resellable",
        )
    txn_key = f"grant:{key}"
    fp = fingerprint(
        op="grant",
        org=organization.pk,
        amount=amount,
        source=source,
        paid=paid,
        resellable=resellable,
        expires_at=expires_at,
        priority=priority,
    )
    return _lot_issue(
        organization=organization,
        amount=amount,
        source=source,
        paid=paid,
        resellable=resellable,
        expires_at=expires_at,
        priority=priority,
        memo=memo,
        actor=actor,
        txn_kind=TransactionKind.GRANT,
        txn_key=txn_key,
        fp=fp,
        now=now,
        sale=sale,
    )


def _lot_issue(
    *,
    organization: Organization,
    amount: int,
    source: str,
    paid: bool,
    resellable: bool,
    expires_at: datetime | None,
    priority: int,
    memo: str,
    actor,
    txn_kind: str,
    txn_key: str,
    fp: str,
    now: datetime,
    sale: LotSale | None = None,
) -> CreditLot:
    """New credits into the wallet as one lot, once per `txn_key`."""
    counter = AccountKind.ADJUSTMENTS if source == LotSource.ADJUSTMENT else AccountKind.ISSUANCE

    def work() -> CreditLot:
        org_accounts, system = accounts_for(organization, counter)
        txn = transaction_open(
            kind=txn_kind,
            key=txn_key,
            fingerprint=fp,
            organization=organization,
            memo=memo,
            actor=actor,
        )
        post(txn, [(system[counter], -amount), (org_accounts.wallet, amount)], now=now)
        return lot_create(
            txn=txn,
            account=org_accounts.wallet,
            organization=organization,
            amount=amount,
            source=source,
            paid=paid,
            resellable=resellable,
            priority=priority,
            expires_at=expires_at,
            sale=sale,
        )

    return idempotent(
        key=txn_key, fingerprint=fp, work=work, replay=lambda txn: txn.created_lots.get()
    )


@retry_on_deadlock
def credits_adjust(
    *,
    organization: Organization,
    amount: int,
    reason: str,
    key: str,
    actor=None,
    expires_at: datetime | None = None,
) -> JournalTransaction:
    """A finance correction: add (positive) or remove (negative) credits, with a reason.

    Added credits are a free, non-resellable lot; removed credits burn the
    wallet's lots in burn order and cannot take credits held for running work,
    nor what pending refunds and rollovers set aside, nor a plan's overage
    allowance (lent, and invoiced as overage when burned: `debit_room`).
    Refused with `insufficient_credits` (402), writing nothing, when the rest
    does not cover it.
    """
    if not isinstance(amount, int) or isinstance(amount, bool) or amount == 0:
        raise ApplicationError(
            code="invalid_amount",
            message="amount must be a non-zero integer of micro-credits.",
            param="amount",
        )
    require_within_movement(amount)
    if not isinstance(reason, str) or not reason.strip():
        raise ApplicationError(
            code="reason_required",
            message="An adjustment needs a reason that finance can read later.",
            param="reason",
        )
    require_key(key)
    now = timezone.now()
    # Both signs share one key namespace and fingerprint, so +5 and then -5
    # under one key is a conflict, not two adjustments.
    txn_key = f"adjust:{key}"
    fp = fingerprint(op="adjust", org=organization.pk, amount=amount, expires_at=expires_at)
    if amount > 0:
        _require_future(expires_at, now)
        lot = _lot_issue(
            organization=organization,
            amount=amount,
            source=LotSource.ADJUSTMENT,
            paid=False,
            resellable=False,
            expires_at=expires_at,
            priority=DEFAULT_LOT_PRIORITY,
            memo=reason,
            actor=actor,
            txn_kind=TransactionKind.ADJUSTMENT,
            txn_key=txn_key,
            fp=fp,
            now=now,
        )
        return lot.created_by

    def work() -> JournalTransaction:
        org_accounts, system = accounts_for(organization, AccountKind.ADJUSTMENTS)
        txn = transaction_open(
            kind=TransactionKind.ADJUSTMENT,
            key=txn_key,
            fingerprint=fp,
            organization=organization,
            memo=reason,
            actor=actor,
        )
        # Locks the wallet and sweeps what expired first, as every spend does.
        post(
            txn,
            [(org_accounts.wallet, amount), (system[AccountKind.ADJUSTMENTS], -amount)],
            now=now,
        )
        wallet = LedgerAccount.objects.get(pk=org_accounts.wallet.pk)
        free, room = debit_room(organization=organization, wallet=wallet, now=now, lock=True)
        if -amount > room:
            # The atomic block of `idempotent` undoes the posting.
            raise ApplicationError(
                code="insufficient_credits",
                message=(
                    f"Not enough credits to remove: this removes {amount_display(-amount)} "
                    f"credits and {amount_display(room)} can be removed. A plan's overage "
                    "allowance, credits held by running work and credits set aside for a "
                    "pending refund or rollover are never removed."
                ),
                status=402,
                param="amount",
                extra={"required": -amount, "available": room},
            )
        lots_take(txn=txn, taken=_first_in_burn_order(free, -amount, now))
        return txn

    return idempotent(key=txn_key, fingerprint=fp, work=work, replay=lambda txn: txn)


@retry_on_deadlock
def credits_transfer(
    *,
    source: Organization,
    destination: Organization,
    amount: int,
    key: str,
    source_kind: str = AccountKind.WALLET,
    destination_kind: str = AccountKind.WALLET,
    only_resellable: bool = False,
    lot_source: str | None = None,
    resellable: bool | None = None,
    memo: str = "",
    actor=None,
) -> JournalTransaction:
    """Move credits between two organization accounts, lots and expiry included.

    Each burned source lot becomes a new lot at the destination with the same
    expiry, priority and paid flag (and `lot_source`/`resellable` when given:
    a marketplace purchase arrives as source=marketplace, not resellable).
    `source_kind`/`destination_kind` pick wallet or escrow, which is how the
    marketplace moves listed credits into escrow and on to a buyer.
    """
    require_positive(amount)
    require_key(key)
    kinds = {AccountKind.WALLET, AccountKind.ESCROW}
    if source_kind not in kinds or destination_kind not in kinds:
        raise ApplicationError(
            code="invalid_account", message="Transfers move between wallets and escrow only."
        )
    if source.pk == destination.pk and source_kind == destination_kind:
        raise ApplicationError(
            code="invalid_transfer",
            message="The source and the destination are the same account.",
            param="destination",
        )
    if lot_source is not None and lot_source not in LotSource.values:
        raise ApplicationError(
            code="invalid_source", message=f"Unknown lot source {lot_source!r}.", param="lot_source"
        )
    now = timezone.now()
    txn_key = f"transfer:{key}"
    fp = fingerprint(
        op="transfer",
        src=source.pk,
        dst=destination.pk,
        amount=amount,
        src_kind=source_kind,
        dst_kind=destination_kind,
        only_resellable=only_resellable,
    )

    def work() -> JournalTransaction:
        from_account = organization_account(source, source_kind)
        to_account = organization_account(destination, destination_kind)
        txn = transaction_open(
            kind=TransactionKind.TRANSFER,
            key=txn_key,
            fingerprint=fp,
            organization=source,
            memo=memo,
            actor=actor,
        )
        try:
            transfer_post(
                txn=txn,
                from_account=from_account,
                to_account=to_account,
                destination=destination,
                amount=amount,
                now=now,
                only=Q(resellable=True) if only_resellable else None,
                lot_source=lot_source,
                resellable=resellable,
            )
        except LedgerInconsistent:
            if not only_resellable:
                raise
            raise ApplicationError(
                code="insufficient_resellable_credits",
                message="Not enough resellable credits: only paid subscription credits can be resold.",
                status=402,
                param="amount",
            ) from None
        return txn

    return idempotent(key=txn_key, fingerprint=fp, work=work, replay=lambda txn: txn)


def transfer_post(
    *,
    txn: JournalTransaction,
    from_account: LedgerAccount,
    to_account: LedgerAccount,
    destination: Organization,
    amount: int,
    now: datetime,
    only: Q | None = None,
    lot_source: str | None = None,
    resellable: bool | None = None,
) -> list[CreditLot]:
    """Post a transfer's entries and carry its lots over, inside `txn`.

    Burns `amount` from the source account's lots (those `only` selects, in
    burn order); each burned lot becomes a lot of the destination with the
    same expiry, priority and paid flag (`lot_source`/`resellable` override).
    The marketplace calls it with `only` naming a listing's escrow lots.
    """
    post(txn, [(from_account, -amount), (to_account, amount)], now=now)
    burned = lots_burn(txn=txn, account=from_account, amount=amount, now=now, only=only)
    return [
        lot_create(
            txn=txn,
            account=to_account,
            organization=destination,
            amount=taken,
            source=lot_source or lot.source,
            paid=lot.paid,
            resellable=lot.resellable if resellable is None else resellable,
            priority=lot.priority,
            expires_at=lot.expires_at,
            parent=lot,
        )
        for lot, taken in burned
    ]


REVERSIBLE = {
    TransactionKind.GRANT,
    TransactionKind.ADJUSTMENT,
    TransactionKind.TRANSFER,
    TransactionKind.HOLD_CAPTURE,
}


@retry_on_deadlock
def transaction_reverse(
    *, original: JournalTransaction, reason: str, actor=None
) -> JournalTransaction:
    """Undo a transaction with its mirror image; the original stays as it was.

    Holds are never reopened: what a capture took from a hold goes back to
    the wallet. Lots the original created lose what it gave them (refused if
    those credits were already spent: reverse what can be, adjust the rest);
    lots it burned get their credits back, with their original expiry.
    A transaction is reversed at most once.
    """
    if original.kind not in REVERSIBLE:
        raise ApplicationError(
            code="not_reversible",
            message=f"A {original.kind} transaction cannot be reversed; settle or release holds instead.",
            param="transaction",
        )
    if not isinstance(reason, str) or not reason.strip():
        raise ApplicationError(
            code="reason_required", message="A reversal needs a reason.", param="reason"
        )
    now = timezone.now()
    txn_key = f"reverse:{original.pk}"
    fp = fingerprint(op="reverse", original=original.pk)

    def work() -> JournalTransaction:
        txn = transaction_open(
            kind=TransactionKind.REVERSAL,
            key=txn_key,
            fingerprint=fp,
            organization=original.organization,
            memo=reason,
            actor=actor,
            reverses=original,
        )
        entries = list(original.entries.select_related("account"))
        postings = []
        for entry in entries:
            account = entry.account
            if account.kind == AccountKind.HOLDS:
                account = accounts_for(account.organization)[0].wallet
            postings.append((account, -entry.amount))
        net: dict[int, int] = {}
        for account, amount in postings:
            net[account.pk] = net.get(account.pk, 0) + amount
        if not any(net.values()):
            # A capture of nothing: holds -> wallet and back nets to zero.
            raise ApplicationError(
                code="nothing_to_reverse",
                message="This transaction moved no credits once holds are settled; nothing to reverse.",
                status=409,
            )
        try:
            post(txn, postings, now=now)
        except ApplicationError as exc:
            if exc.code != "insufficient_credits":
                raise
            raise _not_reversible_anymore() from None

        movements = list(
            LotMovement.objects.filter(transaction=original)
            .select_related("lot")
            .order_by("lot_id")
        )
        locked = {
            lot.pk: lot
            for lot in CreditLot.objects.select_for_update()
            .filter(pk__in=[m.lot_id for m in movements])
            .order_by("pk")
        }
        for movement in movements:
            lot = locked[movement.lot_id]
            if lot.remaining - movement.amount < 0:
                raise _not_reversible_anymore()
            CreditLot.objects.filter(pk=lot.pk).update(remaining=F("remaining") - movement.amount)
            lot.remaining -= movement.amount
            LotMovement.objects.create(lot=lot, transaction=txn, amount=-movement.amount)
            if movement.amount < 0:
                # Credits came back to a lot that may be due: the next spend
                # from this account sweeps it first.
                account_lower_next_expiry(account_id=lot.account_id, expires_at=lot.expires_at)
        return txn

    return idempotent(key=txn_key, fingerprint=fp, work=work, replay=lambda txn: txn)


def _not_reversible_anymore() -> ApplicationError:
    return ApplicationError(
        code="reversal_not_possible",
        message=(
            "Some of these credits were already spent, transferred or expired; "
            "reverse what remains with an adjustment instead."
        ),
        status=409,
    )


def _wallet_withdraw(
    *,
    organization: Organization,
    key: str,
    fp: str,
    kind: str,
    system_kind: str,
    lots: Q,
    amount_for: Callable[[int, int], int],
    memo: str,
    actor=None,
    holds_placed_before: datetime | None = None,
) -> int:
    """Take credits from some of the wallet's lots to a system account, once per key.

    Locks the wallet, then asks `amount_for(credits in those lots, wallet
    balance)` how much to take: credits backing a pending hold are not in the
    wallet balance and are never taken. Taking nothing writes nothing; a
    repeat of a key that took something returns 0.
    """
    now = timezone.now()
    try:
        with transaction.atomic():
            org_accounts, system = accounts_for(organization, system_kind)
            accounts_lock(org_accounts.wallet)
            wallet = LedgerAccount.objects.get(pk=org_accounts.wallet.pk)
            # Expired lots are the sweep's business, not ours. Credits of these
            # lots that pending holds will burn (lots count held credits, the
            # wallet balance does not) stay: otherwise a capture would burn
            # other lots (a paid pack) in their place. Only those: a hold burns
            # other lots first where the burn order says so.
            free = lots_unheld(
                organization=organization,
                wallet=wallet,
                lots=lots,
                now=now,
                placed_before=holds_placed_before,
                lock=True,
            )
            in_lots = sum(lot.remaining for lot, _ in free)
            amount = min(
                amount_for(in_lots, wallet.balance), wallet.balance, sum(f for _, f in free)
            )
            if amount <= 0:
                return 0
            txn = transaction_open(
                kind=kind,
                key=key,
                fingerprint=fp,
                organization=organization,
                memo=memo,
                actor=actor,
            )
            post(txn, [(wallet, -amount), (system[system_kind], amount)], now=now, spend=False)
            lots_take(txn=txn, taken=_first_in_burn_order(free, amount, now))
            return amount
    except IntegrityError:
        # The key's unique index is the gate: this event was applied before.
        # The same request again takes nothing more; another request under
        # the same key is refused, as every ledger write refuses it.
        existing = JournalTransaction.objects.filter(idempotency_key=key).first()
        if existing is None:
            raise
        if existing.fingerprint != fp:
            raise ApplicationError(
                code="idempotency_conflict",
                message=f"The idempotency key {key!r} was already used for a different request.",
                status=409,
                param="key",
            ) from None
        return 0


def _first_in_burn_order(
    free: list[tuple[CreditLot, int]], amount: int, now: datetime
) -> list[tuple[CreditLot, int]]:
    """`amount` out of what each lot has free, taken from the lots in burn order."""
    in_order = sorted(free, key=lambda pair: burn_sort_key(pair[0], now))
    return take_in_order(in_order, amount)[0]


@retry_on_deadlock
def credits_trim(*, organization: Organization, source: str, keep: int, key: str, memo: str) -> int:
    """Expire what exceeds `keep` among the wallet's unexpired lots of `source`.

    A plan's rollover cap at period end: credits beyond it go to the expiry
    account, soonest-expiring first, as if they had expired. Returns the
    micro-credits expired.
    """
    if not isinstance(keep, int) or keep < 0:
        raise ApplicationError(code="invalid_amount", message="keep must be >= 0.", param="keep")
    require_key(key)
    return _wallet_withdraw(
        organization=organization,
        key=f"trim:{key}",
        fp=fingerprint(op="trim", org=organization.pk, source=source, keep=keep),
        kind=TransactionKind.EXPIRY,
        system_kind=AccountKind.EXPIRY,
        lots=Q(source=source),
        amount_for=lambda in_lots, _balance: in_lots - keep,
        memo=memo,
    )


@retry_on_deadlock
def lots_expire_now(*, organization: Organization, source: str) -> int:
    """End the wallet's unexpired lots of `source` now, as if this were their expiry.

    Unlike a trim, which takes only what no pending hold will burn and leaves the
    rest an ordinary lot, this moves the lots' expiry itself: work already running
    keeps what it holds of them (a hold placed before a lot expired burns it first:
    the burn order, metering.services.lots), what that work gives back is expired by the next spend or sweep
    (the wallet stays due while they hold it), and no hold placed from now on can
    take them. What nothing holds goes to the expiry account at once. Returns the
    micro-credits expired now; a repeat finds nothing left to end.

    `now` is read under the wallet's row lock, which every placement takes: a hold
    placed before it was placed while the lots were unexpired and is backed by them,
    one placed after it sweeps them first.
    """
    with transaction.atomic():
        wallet = accounts_for(organization)[0].wallet
        accounts_lock(wallet)
        now = timezone.now()
        CreditLot.objects.filter(account=wallet, source=source).filter(
            Q(expires_at__isnull=True) | Q(expires_at__gt=now)
        ).update(expires_at=now)
        account_lower_next_expiry(account_id=wallet.pk, expires_at=now)
        return account_expire_lots(account=wallet, now=now)


@retry_on_deadlock
def lots_trim(
    *, organization: Organization, lot_ids: list[int], amount: int, key: str, memo: str
) -> int:
    """Expire up to `amount` of what is unspent in these wallet lots, in burn order.

    A rollover cap owed on credits that came back after the rollover (a
    dispute won): they go to the expiry account, as credits_trim's would
    have. Credits that pending holds will burn stay, as credits_trim leaves
    them. Once per key; returns the micro-credits expired.
    """
    require_positive(amount)
    require_key(key)
    return _wallet_withdraw(
        organization=organization,
        key=f"trim:{key}",
        fp=fingerprint(op="lots_trim", org=organization.pk, lots=sorted(lot_ids), amount=amount),
        kind=TransactionKind.EXPIRY,
        system_kind=AccountKind.EXPIRY,
        lots=Q(pk__in=lot_ids),
        amount_for=lambda _in_lots, _balance: amount,
        memo=memo,
    )


@retry_on_deadlock
def lot_clawback(
    *,
    lot: CreditLot,
    amount: int,
    key: str,
    memo: str,
    actor=None,
    family: bool = False,
    holds_placed_before: datetime | None = None,
) -> int:
    """Take back up to `amount` of what is still unspent in one wallet lot.

    A refund or a dispute of the payment that bought the lot: spent credits
    cannot come back, so the caller records the difference as a loss. With
    `family`, the lot's descendants in the same wallet count too (credits
    that went to escrow and came back are lots split from it). Credits that
    pending holds will burn are not taken; with `holds_placed_before`, only
    those of holds placed by then (work started after a refund came does not
    shelter the refunded credits). Returns the micro-credits taken back (0
    when nothing was left).
    """
    require_positive(amount)
    require_key(key)
    return _wallet_withdraw(
        organization=lot.organization,
        key=f"clawback:{key}",
        fp=fingerprint(op="clawback", lot=lot.pk, amount=amount),
        kind=TransactionKind.ADJUSTMENT,
        system_kind=AccountKind.ADJUSTMENTS,
        lots=Q(pk__in=lot_family_ids(lot) if family else [lot.pk]),
        amount_for=lambda in_lots, _balance: amount,
        memo=memo,
        actor=actor,
        holds_placed_before=holds_placed_before,
    )


def clawbacks_under(key: str) -> Q:
    """The journal transactions lot_clawback made under `key` and the keys that extend it
    (`key:...`: a later take of the same event), for a filter of an organization's."""
    clawback = f"clawback:{key}"
    return Q(idempotency_key=clawback) | Q(idempotency_key__startswith=f"{clawback}:")


@retry_on_deadlock
def clawbacks_reverse(*, key: str, reason: str, organization: Organization, actor=None) -> int:
    """Give back what `lot_clawback` took under `key`, and under the keys that extend it.

    A refund or dispute undone (a dispute the merchant won): each clawback
    made under `key` or `key:...` (a later take of the same event, such as
    credits taken back once running work settled) is reversed, so the credits
    return to the very lots they were taken from, with their source, flags
    and expiry, and the adjustments account nets back to zero; a lot that
    expired meanwhile is swept as it would have been. Each clawback is
    reversed at most once (transaction_reverse), so a repeat gives back
    nothing more. Returns the micro-credits these clawbacks took, all given
    back now or before. The keys are found by the journal's prefix index
    (journal_key_prefix), among `organization`'s transactions.
    """
    require_key(key)
    with transaction.atomic():
        taken = list(
            JournalTransaction.objects.filter(organization=organization)
            .filter(clawbacks_under(key))
            .order_by("pk")
        )
        for original in taken:
            transaction_reverse(original=original, reason=reason, actor=actor)
        moved = LotMovement.objects.filter(transaction__in=taken).aggregate(total=Sum("amount"))
        return -(moved["total"] or 0)


# --- claims: what pending reversals set aside --------------------------------------------
#
# A refund or dispute cannot take back credits that running work holds (its
# capture burns them), so the reversal leaves them pending until that work
# settles. When the work gives them back they land in the wallet, and the
# reversal takes them from there a few seconds later (its beat task); a hold
# placed in between would take them first, and the member would spend
# refunded credits. So the reversal claims them on the wallet row as it
# leaves them pending: every spend the member starts (a hold, on the fast
# path too; a listing; a transfer) needs `balance - claimed`, while what
# takes claimed credits back or expires them (spend=False) does not.
#
# The claim is conservative while the work runs: the pending credits are in
# the holds account then, not in the wallet, yet the wallet's other credits
# are short of the whole claim until the work settles and the next pending
# settlement lowers it. Money first: a member with a refunded pack and a
# running job on it may have to wait for that job (seconds, at most the hold
# TTL) before spending other credits. A claim is only ever raised by what a
# reversal records as pending and lowered by what it stops waiting for, in
# the same transaction, so the wallet's claim is the sum of its reversals'
# pending credits (gymbilling's reconcile checks it). Several reversals of the
# same lots (a partial refund, then a dispute of one payment) share what those
# lots hold: each claims, and keeps pending, only what the others do not
# already wait for (`claimed_by_others`), so together they never claim more
# than is at stake.
#
# A period's rollover claims the same way what running jobs held over its cap
# (gymbilling.market.rollover): those credits come back to the wallet as the
# jobs end, to be expired by the next sweep, and no new work may spend them
# in between.
#
# The claim guards the wallet's balance; the lots it claimed are marked too
# (CreditLot.claimed_at, the reversal's time), and a hold placed after that
# burns them last (burn_sort_key, the settlement function since 0015), so work
# the member starts on what the claim leaves them spends their own credits,
# not the refunded ones the claim waits for. The marks go when the wallet's
# claim is all settled.

_CLAIM_RAISE = """
UPDATE metering_ledgeraccount SET claimed = claimed + %s WHERE id = %s AND kind = 'wallet'
"""
# GREATEST: a claim never goes below zero, even for a reversal recorded
# pending before claims existed (reconcile names any such wallet).
_CLAIM_LOWER = """
UPDATE metering_ledgeraccount SET claimed = GREATEST(claimed - %s, 0)
 WHERE id = %s AND kind = 'wallet'
"""


def _claim_update(sql: str, wallet: LedgerAccount, amount: int) -> None:
    with connection.cursor() as cursor:
        cursor.execute(sql, [amount, wallet.pk])


def _claim_lower(wallet: LedgerAccount, amount: int) -> None:
    """Lower the wallet's claim; once nothing is claimed, its lots are no longer marked."""
    with connection.cursor() as cursor:
        cursor.execute(_CLAIM_LOWER + " RETURNING claimed", [amount, wallet.pk])
        row = cursor.fetchone()
    if row is not None and row[0] == 0:
        _lots_unmark(wallet)


def _lots_mark(wallet: LedgerAccount, lots: Q, at: datetime) -> None:
    """Mark the wallet's `lots` a claim covers as claimed at `at` (the reversal's time; a lot
    marked before keeps its first time): holds placed after it burn them last."""
    CreditLot.objects.filter(lots, account=wallet, remaining__gt=0, claimed_at__isnull=True).update(
        claimed_at=at
    )


def _lots_unmark(wallet: LedgerAccount) -> None:
    """Nothing is claimed any more: no lot of the wallet is burned last for a claim."""
    CreditLot.objects.filter(account=wallet, claimed_at__isnull=False).update(claimed_at=None)


def _wallet_unspent(*, wallet: LedgerAccount, lots: Q, now: datetime) -> int:
    """Unexpired micro-credits left in the wallet's lots that `lots` selects (held ones too)."""
    return (
        CreditLot.objects.filter(lots, account=wallet, remaining__gt=0)
        .filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now))
        .aggregate(total=Sum("remaining"))["total"]
        or 0
    )


def credits_claim(
    *,
    organization: Organization,
    lots: Q,
    amount: int,
    at: datetime | None = None,
    claimed_by_others: Callable[[], int] | None = None,
) -> int:
    """Set aside up to `amount` of what the wallet's `lots` still hold, for a reversal to wait on.

    A refund or dispute calls it, in its transaction, right after its
    clawback took all it could: what is left unspent in those lots is held
    by running work. The claim is at most that, and is what the reversal
    records as pending; returns it (0 claims nothing). Counted and claimed
    under the wallet's row lock, which every settlement takes before it gives
    credits back, so none can slip out between the two.

    `claimed_by_others`: what other reversals still have pending of these
    same lots (a partial refund, then a dispute of the same payment). That much
    of what the lots hold those reversals already wait for, so this one claims
    at most the rest: two reversals never set aside more than the lots hold.
    Called under the wallet's row lock, which every change of what a reversal
    has pending takes too (a claim, a settlement, a drop, each in the
    transaction that records it), so two reversals in flight at once cannot
    both miss the other: the second waits for the first to commit.

    `at`: the reversal's time, the `placed_before` its claim_settle will use.
    The lots are marked claimed then (CreditLot.claimed_at): holds placed after
    it burn them last, so that new work the claim allows, on the member's other
    credits, does not spend the refunded ones instead (the claim alone guards
    the balance, not which lots a capture burns).
    """
    require_positive(amount)
    now = timezone.now()
    with transaction.atomic():
        org_accounts, _ = accounts_for(organization)
        wallet = org_accounts.wallet
        accounts_lock(wallet)
        claimed = min(amount, _lots_unclaimed(wallet, lots, now, claimed_by_others))
        if claimed > 0:
            _claim_update(_CLAIM_RAISE, wallet, claimed)
            _lots_mark(wallet, lots, at or now)
        return claimed


def _lots_unclaimed(
    wallet: LedgerAccount, lots: Q, now: datetime, claimed_by_others: Callable[[], int] | None
) -> int:
    """What the wallet's `lots` hold unspent beyond what other reversals wait for of them.

    The caller holds the wallet's row lock."""
    unspent = _wallet_unspent(wallet=wallet, lots=lots, now=now)
    others = claimed_by_others() if claimed_by_others is not None else 0
    return max(0, unspent - others)


@retry_on_deadlock
def claim_settle(
    *,
    organization: Organization,
    lots: Q,
    pending: int,
    key: str,
    memo: str,
    placed_before: datetime,
    now: datetime | None = None,
    claimed_by_others: Callable[[], int] | None = None,
) -> tuple[int, int]:
    """Take back what a reversal left pending, as far as the work that held it has settled.

    Takes up to `pending` from the wallet's `lots`, as `lot_clawback` does
    under `clawback:<key>`, leaving what holds placed by `placed_before` (the
    reversal's time) will burn: work started since shelters nothing (the
    claim kept it off these credits). What is still unspent in the
    lots after that is still held by that work and stays pending; the rest
    (taken back, or spent or expired meanwhile: a loss for the caller) is no
    longer claimed. What other reversals still have pending of the same lots
    (`claimed_by_others`, as for credits_claim) they wait for: this one keeps
    pending only what the lots hold beyond it. One transaction with the
    caller's own record of it. Returns (taken, still pending).
    """
    require_positive(pending, param="pending")
    require_key(key)
    now = now or timezone.now()
    with transaction.atomic():
        org_accounts, _ = accounts_for(organization)
        wallet = org_accounts.wallet
        taken = _wallet_withdraw(
            organization=organization,
            key=f"clawback:{key}",
            fp=fingerprint(op="claim_settle", org=organization.pk, pending=pending),
            kind=TransactionKind.ADJUSTMENT,
            system_kind=AccountKind.ADJUSTMENTS,
            lots=lots,
            amount_for=lambda _in_lots, _balance: pending,
            memo=memo,
            holds_placed_before=placed_before,
        )
        # Under the wallet's row lock, which the withdrawal took.
        still = min(pending - taken, _lots_unclaimed(wallet, lots, now, claimed_by_others))
        if pending - still:
            _claim_lower(wallet, pending - still)
        return taken, still


def claim_reset(
    *, organization: Organization, amount: int, covers: list[tuple[Q, datetime]]
) -> int:
    """Set the wallet's claim to `amount`, what its reversals have pending, after old code
    left it apart (gymbilling's claims_repair); returns the claim it had.

    `covers`: the lots each pending reversal waits on, with that reversal's time. They are
    marked as credits_claim marks them, so that work placed from now on burns them last;
    with nothing claimed, no lot stays marked, as when a claim settles in full. Under the
    wallet's row lock, which the caller may hold already (to compare the claim with what
    is pending).
    """
    if not isinstance(amount, int) or isinstance(amount, bool) or amount < 0:
        raise ApplicationError(code="invalid_amount", message="A claim is >= 0.", param="amount")
    with transaction.atomic():
        org_accounts, _ = accounts_for(organization)
        wallet = org_accounts.wallet
        accounts_lock(wallet)
        before = LedgerAccount.objects.values_list("claimed", flat=True).get(pk=wallet.pk)
        LedgerAccount.objects.filter(pk=wallet.pk).update(claimed=amount)
        if amount == 0:
            _lots_unmark(wallet)
        for lots, at in covers if amount else []:
            _lots_mark(wallet, lots, at)
        return before


def claim_drop(*, organization: Organization, amount: int) -> None:
    """A reversal stops waiting for `amount` it left pending (a dispute won): unclaim it."""
    require_positive(amount)
    org_accounts, _ = accounts_for(organization)
    with transaction.atomic():
        _claim_lower(org_accounts.wallet, amount)
