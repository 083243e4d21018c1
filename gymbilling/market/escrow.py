"""Moving marketplace credits lot by lot: wallet -> escrow -> buyer.

`metering.services.credits_transfer` burns an account's lots in burn order,
whichever they are. The marketplace needs to name the lots: a seller's escrow
holds the lots of all their listings (each with its own expiry), and a buyer
paid for one listing's credits, not the seller's soonest-expiring ones. So
the moves here open their own journal transaction and call metering's
`transfer_post` (what `credits_transfer` does inside) with a filter on which
lots may be burned.
"""

from __future__ import annotations

from datetime import datetime

from django.db.models import Q, Sum

from accounts.models import Organization
from metering.models import (
    AccountKind,
    CreditLot,
    JournalTransaction,
    LedgerAccount,
    TransactionKind,
)
from metering.services.ledger import transfer_post
from metering.services.lots import account_expire_lots, lots_burn
from metering.services.postings import (
    accounts_for,
    accounts_lock,
    fingerprint,
    idempotent,
    post,
    transaction_open,
)


def unexpired(now: datetime) -> Q:
    return Q(expires_at__isnull=True) | Q(expires_at__gt=now)


def lots_remaining(*, lots: Q, now: datetime) -> int:
    """Unexpired micro-credits left in the lots `lots` selects."""
    return (
        CreditLot.objects.filter(lots, remaining__gt=0)
        .filter(unexpired(now))
        .aggregate(total=Sum("remaining"))["total"]
        or 0
    )


def expired_sweep(*, account: LedgerAccount, lots: Q, now: datetime) -> int:
    """Expire the account's due lots now if any of `lots` is due (metering's sweep, same lock)."""
    due = CreditLot.objects.filter(lots, account=account, remaining__gt=0, expires_at__lte=now)
    if not due.exists():
        return 0
    return account_expire_lots(account=account, now=now)


def credits_move(
    *,
    key: str,
    organization: Organization,
    from_account: LedgerAccount,
    to_account: LedgerAccount,
    to_organization: Organization,
    amount: int,
    lots: Q,
    now: datetime,
    lot_source: str | None = None,
    resellable: bool | None = None,
    memo: str = "",
) -> tuple[JournalTransaction, list[CreditLot]]:
    """Move `amount` from the unexpired lots `lots` selects in `from_account`, once per key.

    Each burned lot becomes a lot of `to_account` with the same expiry,
    priority and paid flag (source and resellable overridable). The caller
    holds its own locks (listing rows) and runs inside its transaction.
    """
    txn_key = f"transfer:{key}"
    fp = fingerprint(
        op="market_move", src=from_account.pk, dst=to_account.pk, amount=amount, key=key
    )

    def work() -> tuple[JournalTransaction, list[CreditLot]]:
        txn = transaction_open(
            kind=TransactionKind.TRANSFER,
            key=txn_key,
            fingerprint=fp,
            organization=organization,
            memo=memo,
        )
        created = transfer_post(
            txn=txn,
            from_account=from_account,
            to_account=to_account,
            destination=to_organization,
            amount=amount,
            now=now,
            only=lots & unexpired(now),
            lot_source=lot_source,
            resellable=resellable,
        )
        return txn, created

    return idempotent(
        key=txn_key,
        fingerprint=fp,
        work=work,
        replay=lambda txn: (txn, list(txn.created_lots.order_by("pk"))),
    )


def credits_expire_early(
    *,
    key: str,
    organization: Organization,
    account: LedgerAccount,
    amount: int,
    lots: Q,
    now: datetime,
    memo: str,
) -> int:
    """Expire `amount` of the unexpired lots `lots` selects in escrow now, soonest first.

    The rollover cap reaching listed credits: they go to the expiry account
    as if they had expired. At most what the lots still hold once the escrow
    account is locked: the minute's expiry sweep, which takes that lock, may
    have moved some of them since the caller counted. Once per key: a repeat
    takes nothing more and returns 0 (as metering's `credits_trim` does),
    whatever its amount.
    """
    txn_key = f"trim:{key}"
    fp = fingerprint(op="escrow_trim", account=account.pk, key=key)

    def work() -> int:
        accounts_lock(account)
        take = min(amount, lots_remaining(lots=lots & Q(account=account), now=now))
        if take <= 0:
            return 0
        _, system = accounts_for(organization, AccountKind.EXPIRY)
        txn = transaction_open(
            kind=TransactionKind.EXPIRY,
            key=txn_key,
            fingerprint=fp,
            organization=organization,
            memo=memo,
        )
        post(txn, [(account, -take), (system[AccountKind.EXPIRY], take)], now=now, spend=False)
        lots_burn(txn=txn, account=account, amount=take, now=now, only=lots & unexpired(now))
        return take

    return idempotent(key=txn_key, fingerprint=fp, work=work, replay=lambda txn: 0)
