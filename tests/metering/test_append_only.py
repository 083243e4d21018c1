"""The ledger's history is append-only in PostgreSQL itself (migration 0002)."""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.db.utils import Error as DatabaseError

from metering.models import JournalTransaction, LedgerAccount, LedgerEntry, LotMovement
from metering.services import hold_capture, hold_place
from tests.helpers import credits

pytestmark = pytest.mark.django_db


@pytest.fixture
def history(org, grant):
    """A grant and a captured hold: every append-only table has rows."""
    lot = grant(org, credits(100))
    hold_place(organization=org, amount=credits(40), key="job-1")
    hold = hold_capture(key="job-1", amount=credits(25))
    return {
        "metering_journaltransaction": hold.settle_transaction.pk,
        "metering_ledgerentry": LedgerEntry.objects.filter(transaction=lot.created_by)
        .order_by("pk")
        .first()
        .pk,
        "metering_lotmovement": LotMovement.objects.filter(lot=lot).order_by("pk").first().pk,
    }


def snapshot() -> tuple[list, list, list]:
    return (
        list(JournalTransaction.objects.order_by("pk").values_list("pk", "kind", "memo")),
        list(LedgerEntry.objects.order_by("pk").values_list("pk", "account_id", "amount")),
        list(LotMovement.objects.order_by("pk").values_list("pk", "lot_id", "amount")),
    )


UPDATES = {
    "metering_journaltransaction": "UPDATE metering_journaltransaction SET memo = 'rewritten' WHERE id = %s",
    "metering_ledgerentry": "UPDATE metering_ledgerentry SET amount = amount + 1 WHERE id = %s",
    "metering_lotmovement": "UPDATE metering_lotmovement SET amount = amount + 1 WHERE id = %s",
}


@pytest.mark.parametrize("table", sorted(UPDATES))
def test_update_is_refused(history, table):
    # given
    before = snapshot()

    # when
    with (
        pytest.raises(DatabaseError) as exc,
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(UPDATES[table], [history[table]])

    # then
    assert "append-only" in str(exc.value)
    assert table in str(exc.value)
    assert snapshot() == before


@pytest.mark.parametrize("table", sorted(UPDATES))
def test_delete_is_refused(history, table):
    # given
    before = snapshot()

    # when
    with (
        pytest.raises(DatabaseError) as exc,
        transaction.atomic(),
        connection.cursor() as cursor,
    ):
        cursor.execute(f"DELETE FROM {table} WHERE id = %s", [history[table]])

    # then
    assert "append-only" in str(exc.value)
    assert snapshot() == before


@pytest.mark.parametrize("table", sorted(UPDATES))
def test_bulk_update_through_the_orm_is_refused(history, table):
    # given
    before = snapshot()
    model = {
        "metering_journaltransaction": JournalTransaction,
        "metering_ledgerentry": LedgerEntry,
        "metering_lotmovement": LotMovement,
    }[table]
    field = "memo" if model is JournalTransaction else "amount"
    value = "rewritten" if model is JournalTransaction else 1

    # when
    with pytest.raises(DatabaseError), transaction.atomic():
        model.objects.filter(pk=history[table]).update(**{field: value})

    # then
    assert snapshot() == before


def test_deleting_a_whole_table_through_the_orm_is_refused(history):
    # given
    before = snapshot()

    # when
    with pytest.raises(DatabaseError), transaction.atomic():
        LedgerEntry.objects.all().delete()

    # then
    assert snapshot() == before


def test_accounts_are_not_append_only(org, grant):
    # given: the cached balance lives on the account row, which services update
    lot = grant(org, credits(5))
    account = LedgerAccount.objects.get(pk=lot.account_id)

    # when
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE metering_ledgeraccount SET balance = balance WHERE id = %s", [account.pk]
        )
        updated = cursor.rowcount

    # then
    assert updated == 1
    account.refresh_from_db()
    assert account.balance == credits(5)
