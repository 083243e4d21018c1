"""The money ledger of the marketplace: double entry, integers, append-only.

`money_post` is the only writer of `MoneyEntry`. A seller account is updated
with one conditional UPDATE (`... WHERE balance + delta >= 0`) in primary-key
order, as metering's `post` does for credits, so two writers can neither
overdraw it nor deadlock on it. That order holds within one posting only: a
caller that posts several (one per fill of an order) first takes every seller
account it will post to with `money_accounts_lock`, in one statement, so the
whole transaction locks them in primary-key order. Each transaction's
idempotency key is unique in the database: posting one business event twice
posts it once.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.db import IntegrityError, connection, transaction

from accounts.models import Organization
from gymbilling.models import (
    SELLER_KINDS,
    MoneyAccount,
    MoneyEntry,
    MoneyTransaction,
)

_UPDATE_CHECKED = """
UPDATE gymbilling_moneyaccount
   SET balance = balance + %s
 WHERE id = %s AND balance + %s >= 0
RETURNING balance
"""


def money_account(
    *, kind: str, currency: str, organization: Organization | None = None
) -> MoneyAccount:
    """The account, opened on first use."""
    org = organization if kind in SELLER_KINDS else None
    existing = MoneyAccount.objects.filter(kind=kind, currency=currency, organization=org).first()
    if existing is not None:
        return existing
    try:
        with transaction.atomic():
            return MoneyAccount.objects.create(kind=kind, currency=currency, organization=org)
    except IntegrityError:
        return MoneyAccount.objects.get(kind=kind, currency=currency, organization=org)


def money_accounts_lock(accounts: Iterable[MoneyAccount]) -> None:
    """Take the seller accounts' row locks in primary-key order, in one statement.

    For a transaction that posts several times (`money_post` orders only the
    accounts of one posting): taken before the first posting, the locks follow
    primary-key order across the whole transaction, whichever order its
    postings come in. The platform's accounts are never updated, so never
    locked. NO KEY UPDATE is the lock the posting's UPDATE takes anyway: taken
    early, it holds up no writer the posting would not have.
    """
    pks = sorted({a.pk for a in accounts if a.organization_id is not None})
    if not pks:
        return
    list(
        MoneyAccount.objects.select_for_update(no_key=True)
        .filter(pk__in=pks)
        .order_by("pk")
        .values_list("pk", flat=True)
    )


class MoneyInsufficient(Exception):
    """A seller account would go negative: the caller decides what that means."""


def money_post(
    *,
    kind: str,
    key: str,
    currency: str,
    organization: Organization,
    postings: Iterable[tuple[MoneyAccount, int]],
    fill=None,
    payout=None,
    memo: str = "",
) -> MoneyTransaction | None:
    """Write one balanced money transaction, once per `key`; None when it already exists.

    Raises MoneyInsufficient (the savepoint undoes the attempt) when a seller
    account would go negative.
    """
    merged: dict[int, int] = {}
    accounts: dict[int, MoneyAccount] = {}
    for account, amount in postings:
        if account.currency != currency:
            raise AssertionError(f"{key}: account {account} is not in {currency}")
        merged[account.pk] = merged.get(account.pk, 0) + amount
        accounts[account.pk] = account
    merged = {pk: amount for pk, amount in merged.items() if amount}
    if sum(merged.values()) != 0:
        raise AssertionError(f"unbalanced money transaction {key}: {merged}")
    if not merged:
        return None
    if MoneyTransaction.objects.filter(idempotency_key=key).exists():
        return None
    try:
        with transaction.atomic():
            txn = MoneyTransaction.objects.create(
                kind=kind,
                idempotency_key=key,
                currency=currency,
                organization=organization,
                fill=fill,
                payout=payout,
                memo=memo[:500],
            )
            balances: dict[int, int | None] = {}
            for pk in sorted(merged):
                account, amount = accounts[pk], merged[pk]
                if account.organization_id is None:
                    balances[pk] = None
                    continue
                with connection.cursor() as cursor:
                    cursor.execute(_UPDATE_CHECKED, [amount, pk, amount])
                    row = cursor.fetchone()
                if row is None:
                    raise MoneyInsufficient(f"{account} cannot take {amount}")
                balances[pk] = row[0]
                account.balance = row[0]
            MoneyEntry.objects.bulk_create(
                MoneyEntry(
                    transaction=txn, account_id=pk, amount=amount, balance_after=balances[pk]
                )
                for pk, amount in sorted(merged.items())
            )
            return txn
    except IntegrityError:
        if MoneyTransaction.objects.filter(idempotency_key=key).exists():
            return None
        raise
