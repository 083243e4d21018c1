"""The lowest layer of the ledger: accounts, journal transactions and postings.

Everything that moves credits goes through `post()`, which is where the three
rules that keep money exact are enforced:

- entries of one transaction sum to zero;
- an organization account is updated with one conditional UPDATE
  (`... WHERE balance + delta >= 0`), so two racing debits can never overdraw
  it, and never after reading a stale balance; a spend from a wallet also
  leaves what pending reversals claimed (`>= claimed`, same statement);
- accounts are locked in primary-key order, so two transactions touching the
  same accounts cannot deadlock each other through the accounts.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_DOWN, Decimal
from functools import wraps
from typing import Any, TypeVar

from django.db import IntegrityError, OperationalError, connection, transaction
from django.db.models import Q

from accounts.errors import ApplicationError
from accounts.models import Organization
from metering.models import (
    MICRO,
    ORGANIZATION_KINDS,
    AccountKind,
    JournalTransaction,
    LedgerAccount,
    LedgerEntry,
)

T = TypeVar("T")

DEADLOCK_RETRIES = 5


def fingerprint(**params: Any) -> str:
    """A stable hash of a request's parameters, to tell a replay from a conflict."""
    canonical = json.dumps(params, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# The most micro-credits one movement may carry: a billion credits, far above
# any real grant or charge, and far enough below BIGINT's 9.2e18 that no sum of
# a ledger's movements reaches it (a larger amount was a 500 from PostgreSQL).
MAX_MOVEMENT = 10**15


def require_positive(amount: int, *, param: str = "amount") -> None:
    # bool is an int in Python; True is not one micro-credit.
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise ApplicationError(
            code="invalid_amount",
            message=f"{param} must be an integer number of micro-credits.",
            param=param,
        )
    if amount <= 0:
        raise ApplicationError(
            code="invalid_amount",
            message=f"{param} must be a positive number of micro-credits; got {amount}.",
            param=param,
        )
    require_within_movement(amount, param=param)


def require_within_movement(amount: int, *, param: str = "amount") -> None:
    if abs(amount) > MAX_MOVEMENT:
        raise ApplicationError(
            code="invalid_amount",
            message=f"{param} moves at most {MAX_MOVEMENT} micro-credits at once; got {amount}.",
            param=param,
        )


def require_key(key: str, *, param: str = "key") -> None:
    if not isinstance(key, str) or not key.strip() or len(key) > 200:
        raise ApplicationError(
            code="invalid_idempotency_key",
            message=f"{param} must be a non-empty string of at most 200 characters.",
            param=param,
        )


def retry_on_deadlock(func: Callable[..., T]) -> Callable[..., T]:
    """Re-run an outermost money flow that PostgreSQL chose as a deadlock victim.

    Only the outermost call may retry (a nested one cannot undo its caller's
    work), so inside another transaction the error propagates to that caller.
    """

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        attempt = 0
        while True:
            outermost = not connection.in_atomic_block
            try:
                return func(*args, **kwargs)
            except OperationalError as exc:
                sqlstate = getattr(getattr(exc, "__cause__", None), "sqlstate", None)
                attempt += 1
                # 40P01 deadlock_detected, 40001 serialization_failure.
                if (
                    not outermost
                    or sqlstate not in ("40P01", "40001")
                    or attempt > DEADLOCK_RETRIES
                ):
                    raise

    return wrapper


# --- accounts ----------------------------------------------------------------


@dataclass(frozen=True)
class OrgAccounts:
    wallet: LedgerAccount
    holds: LedgerAccount
    escrow: LedgerAccount


def _account_create(*, kind: str, organization: Organization | None) -> LedgerAccount:
    try:
        with transaction.atomic():
            return LedgerAccount.objects.create(
                kind=kind, organization=organization, non_negative=organization is not None
            )
    except IntegrityError:
        # Opened concurrently by another process: use that one.
        return LedgerAccount.objects.get(kind=kind, organization=organization)


def accounts_for(
    organization: Organization, *system_kinds: AccountKind
) -> tuple[OrgAccounts, dict[str, LedgerAccount]]:
    """The organization's accounts and the named system accounts, in one query.

    Accounts are opened on first use, so an organization needs no setup step.
    """
    rows = list(
        LedgerAccount.objects.filter(
            Q(organization=organization) | Q(organization__isnull=True, kind__in=system_kinds)
        )
    )
    org = {a.kind: a for a in rows if a.organization_id is not None}
    system = {a.kind: a for a in rows if a.organization_id is None}
    for kind in ORGANIZATION_KINDS:
        if kind not in org:
            org[kind] = _account_create(kind=kind, organization=organization)
    for kind in system_kinds:
        if kind not in system:
            system[kind] = _account_create(kind=kind, organization=None)
    return (
        OrgAccounts(
            wallet=org[AccountKind.WALLET],
            holds=org[AccountKind.HOLDS],
            escrow=org[AccountKind.ESCROW],
        ),
        system,
    )


def accounts_lock(*accounts: LedgerAccount) -> None:
    """Take the accounts' row locks in primary-key order, the order every writer uses."""
    list(
        LedgerAccount.objects.select_for_update()
        .filter(pk__in=[a.pk for a in accounts])
        .order_by("pk")
        .values_list("pk", flat=True)
    )


# --- journal transactions ----------------------------------------------------


def transaction_open(
    *,
    kind: str,
    key: str,
    fingerprint: str,
    organization: Organization | None,
    memo: str = "",
    actor=None,
    reverses: JournalTransaction | None = None,
) -> JournalTransaction:
    """Insert the transaction row first: its unique key is the idempotency gate.

    A concurrent caller with the same key blocks on the unique index until
    this one commits, then gets IntegrityError and replays (see `idempotent`).
    """
    return JournalTransaction.objects.create(
        kind=kind,
        idempotency_key=key,
        fingerprint=fingerprint,
        organization=organization,
        memo=memo[:500],
        actor=actor,
        reverses=reverses,
    )


def idempotent(
    *, key: str, fingerprint: str, work: Callable[[], T], replay: Callable[[JournalTransaction], T]
) -> T:
    """Run `work` once per key; a repeat with the same request replays the first result.

    `work` must open its JournalTransaction with this key before anything
    else. A repeat with a different request under the same key is refused.
    """
    try:
        with transaction.atomic():
            return work()
    except IntegrityError:
        existing = JournalTransaction.objects.filter(idempotency_key=key).first()
        if existing is None:
            raise  # some other constraint: a real bug, not a replay
    if existing.fingerprint != fingerprint:
        raise ApplicationError(
            code="idempotency_conflict",
            message=(
                f"The idempotency key {key!r} was already used for a different request. "
                "Use a new key for a new request."
            ),
            status=409,
            param="key",
        )
    return replay(existing)


# --- postings ------------------------------------------------------------------

# The wallet's claim binds spends only (`claim_bound`): credits may always
# arrive, and the sweeps and clawbacks (spend=False) are what takes claimed
# credits or expires them. The fast path's placement checks the same
# (fastpath._PLACE_CTES).
_UPDATE_CHECKED = """
UPDATE metering_ledgeraccount
   SET balance = balance + %s
 WHERE id = %s
   AND balance + %s >= CASE WHEN %s THEN claimed ELSE 0 END
   AND (%s OR next_expiry_at IS NULL OR next_expiry_at > %s)
RETURNING balance
"""


def post(
    txn: JournalTransaction,
    postings: Iterable[tuple[LedgerAccount, int]],
    *,
    now: datetime,
    spend: bool = True,
) -> dict[int, int | None]:
    """Write the transaction's entries and update the cached balances.

    Returns each account's balance after the posting (None for system
    accounts). Raises `insufficient_credits` when an organization account
    would go negative; the caller's atomic block then undoes everything.
    A debit of a wallet whose lots are due to expire first sweeps them, so
    expired credits can never be spent; `spend=False` is for the sweep itself.
    A spend from a wallet cannot take what pending refunds and disputes
    claimed (`LedgerAccount.claimed`): `insufficient_credits` too;
    `spend=False` is also for the clawbacks that take those credits back.
    """
    merged: dict[int, int] = {}
    accounts: dict[int, LedgerAccount] = {}
    for account, amount in postings:
        if amount == 0:
            continue
        merged[account.pk] = merged.get(account.pk, 0) + amount
        accounts[account.pk] = account
    merged = {pk: amount for pk, amount in merged.items() if amount != 0}
    if sum(merged.values()) != 0:
        raise AssertionError(f"unbalanced transaction {txn.idempotency_key}: {merged}")

    balances: dict[int, int | None] = {}
    # Primary-key order: every writer locks accounts in the same order.
    for pk in sorted(merged):
        account, amount = accounts[pk], merged[pk]
        if account.is_system:
            balances[pk] = None
            continue
        balances[pk] = _apply(account, amount, now=now, spend=spend)

    LedgerEntry.objects.bulk_create(
        LedgerEntry(transaction=txn, account_id=pk, amount=amount, balance_after=balances[pk])
        for pk, amount in sorted(merged.items())
    )
    return balances


def _apply(account: LedgerAccount, amount: int, *, now: datetime, spend: bool) -> int:
    # Only spending is guarded by expiry (credits may always arrive), and only
    # from accounts that hold lots: a wallet, or escrow on its way to a buyer.
    expiry_free = not (
        spend and amount < 0 and account.kind in (AccountKind.WALLET, AccountKind.ESCROW)
    )
    claim_bound = spend and amount < 0 and account.kind == AccountKind.WALLET
    for attempt in range(2):
        with connection.cursor() as cursor:
            cursor.execute(
                _UPDATE_CHECKED, [amount, account.pk, amount, claim_bound, expiry_free, now]
            )
            row = cursor.fetchone()
        if row is not None:
            account.balance = row[0]
            return row[0]
        locked = LedgerAccount.objects.select_for_update().get(pk=account.pk)
        if attempt == 0 and not expiry_free and _expiry_due(locked, now):
            from metering.services.lots import account_expire_lots

            account_expire_lots(account=locked, now=now)
            # Swept under this row lock: whatever the account holds now is
            # unexpired (expired credits still backing a pending hold sit in
            # the holds account, not here), so the retry needs no guard.
            expiry_free = True
            continue
        break
    claimed = locked.claimed if claim_bound else 0
    available = max(0, locked.balance - claimed)
    aside = (
        f" A refunded or disputed payment, or a period's rollover cap, has set "
        f"{amount_display(claimed)} credits aside until the work holding them ends."
        if claimed
        else ""
    )
    raise ApplicationError(
        code="insufficient_credits",
        message=(
            f"Not enough credits: this needs {amount_display(-amount)} credits and "
            f"{amount_display(available)} are available.{aside} Buy a credit pack or wait for "
            "pending work to finish."
        ),
        status=402,
        extra={"required": -amount, "available": available},
    )


def _expiry_due(account: LedgerAccount, now: datetime) -> bool:
    return account.next_expiry_at is not None and account.next_expiry_at <= now


# An amount as a person writes it: an optional sign, ASCII digits, at most one '.'.
# Decimal() alone reads far more: any script's digits ("٣", Arabic-Indic three, is 3),
# underscores ("1_000"), exponents ("1e3"), "NaN" and "Infinity". None of it is what finance
# means to type, and what one screen shows as text must not move credits or money (the
# dashboard's own forms check the same, without a sign: gymbilling.pages._PLAIN_NUMBER).
_DECIMAL_TEXT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def decimal_text_parse(text: object) -> Decimal | None:
    """`text` as a Decimal when it is a plain decimal number (_DECIMAL_TEXT) between
    optional whitespace, else None. Shared by credits_parse and gymbilling's money_parse,
    which bound and check places themselves."""
    if not isinstance(text, str):
        return None
    text = text.strip()
    if not _DECIMAL_TEXT.fullmatch(text):
        return None
    return Decimal(text)


def credits_parse(text: str) -> int:
    """Credits written by a person ("250", "0.5", "-10") as micro-credits, exactly, or
    ValueError saying why not. Decimal, never float: "0.1" is 100000 micro-credits.

    Only plain decimal text is read (decimal_text_parse): no exponent, no other script's
    digits. Nothing is rounded: a digit past the millionth is refused, and so is anything
    over the most one movement of the ledger may move (MAX_MOVEMENT), on its count of
    digits before it is multiplied out (a 100,000-digit argument is refused at once).
    """
    number = decimal_text_parse(text)
    if number is None:
        raise ValueError(
            f"{text!r} is not a number of credits: write ASCII digits with at most one '.', "
            "and a minus sign to take credits away, such as 250, 0.5 or -10."
        )
    if number.adjusted() >= len(str(MAX_MOVEMENT)) or abs(number) * MICRO > MAX_MOVEMENT:
        raise ValueError(
            f"{text!r} is more credits than one movement may move ({amount_display(MAX_MOVEMENT)})."
        )
    # (Bounded now, so the quantize below fits Decimal's 28 digits.)
    if number != number.quantize(Decimal("0.000001"), rounding=ROUND_DOWN):
        raise ValueError("Credits are exact to a millionth (6 decimal places).")
    return int(number.scaleb(6))


def amount_display(micro: int) -> str:
    """Micro-credits as a decimal string of credits, without floats."""
    sign = "-" if micro < 0 else ""
    whole, frac = divmod(abs(micro), 1_000_000)
    return f"{sign}{whole}.{frac:06d}".rstrip("0").rstrip(".")
