"""metering/0016 (what lots were sold for) can be run again after it stopped partway.

It is not atomic (each step holds its lock only for itself), so a crash, or a lock it
waited for too long (its lock_timeout), leaves the steps before committed: `migrate`
again must finish the rest, not fail on a column or a constraint that is already there.
"""

from __future__ import annotations

import importlib
import threading

import psycopg
import pytest
from django.db import OperationalError, connection
from django.db.migrations.executor import MigrationExecutor

from metering.models import CreditLot
from metering.services import credits_transfer
from tests.factories import OrganizationFactory
from tests.helpers import credits

pytestmark = pytest.mark.django_db(transaction=True)

BEFORE = [
    ("metering", "0015_capture_burns_claimed_lots_last"),
    ("gymbilling", "0013_payment_reversal_lost_at"),
]
MIGRATION = importlib.import_module("metering.migrations.0016_creditlot_revenue")


def _latest() -> None:
    MigrationExecutor(connection).migrate(MigrationExecutor(connection).loader.graph.leaf_nodes())


@pytest.fixture
def migrates_forward_after():
    """Forward to the latest again whatever happens, for the next test's schema."""
    yield
    _latest()


def _apply_first(steps: int) -> None:
    """0016's first `steps` operations, as a run that crashed after them left the
    database (each committed on its own: the migration is not atomic); the migration
    itself is not recorded as applied."""
    state = MigrationExecutor(connection).loader.project_state(BEFORE[0])
    for operation in MIGRATION.Migration.operations[:steps]:
        after = state.clone()
        operation.state_forwards("metering", after)
        with connection.schema_editor(atomic=False) as editor:
            operation.database_forwards("metering", editor, state, after)
        state = after


@pytest.mark.parametrize(
    "steps", [3, 4], ids=["after-the-plain-columns", "after-the-foreign-key-not-valid"]
)
def test_migrate_again_after_a_crash_partway_finishes_0016(grant, steps, migrates_forward_after):
    # given lots, one split from another, and 0016 applied only partway (the columns
    # added, then a crash before the backfill)
    first, second = OrganizationFactory(), OrganizationFactory()
    granted = grant(first, credits(5), paid=False, resellable=False)
    credits_transfer(source=first, destination=second, amount=credits(2), key="split")
    MigrationExecutor(connection).migrate(BEFORE)
    _apply_first(steps)

    # when `migrate` runs again
    _latest()

    # then it finished: the split lot found its root, the free grant is priced at 0
    split = CreditLot.objects.get(organization=second)
    granted.refresh_from_db()
    assert (split.root_id, granted.revenue) == (granted.pk, 0)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT convalidated FROM pg_constraint WHERE conrelid = 'metering_creditlot'::regclass"
            " AND contype = 'f' AND pg_get_constraintdef(oid) LIKE 'FOREIGN KEY (root_id)%%'"
        )
        assert cursor.fetchall() == [(True,)]


def _columns() -> dict[str, tuple]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT column_name, data_type, is_nullable, column_default"
            " FROM information_schema.columns WHERE table_name = 'metering_creditlot'"
            " AND column_name IN ('origin', 'revenue', 'revenue_currency', 'root_id')"
        )
        return {name: tuple(rest) for name, *rest in cursor.fetchall()}


def test_a_lock_it_waits_too_long_for_fails_the_run_cleanly_and_migrate_again_finishes(
    grant, monkeypatch, migrates_forward_after
):
    # given 0016 undone, and a long reader holding the lots' table (a report's
    # transaction), with a lock timeout short enough for a test
    org = OrganizationFactory()
    granted = grant(org, credits(1), paid=False, resellable=False)
    MigrationExecutor(connection).migrate(BEFORE)
    monkeypatch.setattr(MIGRATION, "LOCK_TIMEOUT", "100ms")
    reader = psycopg.connect(
        dbname=connection.settings_dict["NAME"],
        user=connection.settings_dict["USER"],
        password=connection.settings_dict["PASSWORD"],
        host=connection.settings_dict["HOST"],
        port=connection.settings_dict["PORT"],
    )
    try:
        reader.execute("SELECT count(*) FROM metering_creditlot")  # ACCESS SHARE, held
        # Without a lock timeout the ALTER would wait for ever: cancel it after a minute,
        # so that such a regression fails (with another message) instead of hanging.
        migrating = connection.cursor().connection.info.backend_pid
        backstop = threading.Timer(
            60, lambda: reader.execute("SELECT pg_cancel_backend(%s)", [migrating])
        )
        backstop.start()

        # when `migrate` runs: its first ALTER cannot get its lock
        try:
            with pytest.raises(OperationalError, match="lock timeout"):
                _latest()
        finally:
            backstop.cancel()
    finally:
        reader.close()

    # then nothing was half-done, and `migrate` again, the reader gone, finishes: the
    # columns as the model declares them, the lot priced
    assert _columns() == {}
    _latest()
    assert _columns() == {
        "origin": ("character varying", "NO", "''::character varying"),
        "revenue": ("bigint", "YES", None),
        "revenue_currency": ("character varying", "NO", "''::character varying"),
        "root_id": ("bigint", "YES", None),
    }
    granted.refresh_from_db()
    assert granted.revenue == 0
