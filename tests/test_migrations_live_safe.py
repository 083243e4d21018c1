"""Migrations change a live database as README's "Running the parts yourself" says: each
ALTER TABLE waits at most a lock_timeout for its lock (queued behind a long reader, an
ACCESS EXCLUSIVE request holds every read and write of the table behind it), a CHECK or a
foreign key is added NOT VALID and validated apart (its scan under a lock that lets
writes go on), and an index on an existing table is built concurrently.

The migrations since the deploy-safety review (gymbilling 0033, metering 0019, accounts
0011 and inference 0011 on) are run for real, back to just before them and forward to
the latest, on PostgreSQL, and every statement they send is read as it is sent, with the
lock_timeout in force for it and its transaction: what sqlmigrate prints, but also what
operations that look at the database first (re-runnable ones) and data migrations send.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import psycopg
import pytest
from django.apps import apps
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from tests.factories import OrganizationFactory
from tests.helpers import migrate, migrate_to_latest

pytestmark = pytest.mark.django_db(transaction=True)

# The latest migration of each app before the first one held to these rules.
CUTOFF = [
    ("gymbilling", "0032_stripeprice_credits"),
    ("metering", "0018_settlement_says_nothing_with_lots_due"),
    ("accounts", "0010_invitation_invited_by_key"),
    ("inference", "0010_job_settle_with_usage_user"),
]


@dataclass
class Sent:
    sql: str
    lock_timeout: str
    transaction: int | None  # None: autocommit, a transaction of its own


class _Recorder:
    """Every statement of the migration connection, with the lock_timeout in force for it
    and the id of the transaction it runs in, read just before it runs."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def __call__(self, execute, sql, params, many, context):
        text = " ".join(str(sql).split())
        if re.match(r"(ALTER TABLE|CREATE|DROP|VALIDATE)\b", text, re.IGNORECASE):
            with connection.connection.cursor() as cursor:
                cursor.execute(
                    "SELECT current_setting('lock_timeout'), CASE WHEN %s THEN txid_current() END",
                    [connection.in_atomic_block],
                )
                lock_timeout, transaction = cursor.fetchone()
            self.sent.append(Sent(text, lock_timeout, transaction))
        return execute(sql, params, many, context)


def _sent_migrating(targets) -> list[Sent]:
    recorder = _Recorder()
    with connection.execute_wrapper(recorder):
        migrate(targets)
    return recorder.sent


def _unsafe(sent: list[Sent]) -> list[str]:
    """What of `sent` would hold a live table's reads or writes for longer than a moment."""
    found = []
    created = {
        m.group(1)
        for s in sent
        if (m := re.match(r'CREATE TABLE (?:IF NOT EXISTS )?"?(\w+)"?', s.sql, re.IGNORECASE))
    }
    added = {}  # constraint -> the transaction it was added NOT VALID in
    for s in sent:
        sql = s.sql
        upper = sql.upper()
        table = re.search(r'(?:ALTER TABLE|\bON)(?: ONLY)? (?:IF EXISTS )?"?(\w+)"?', sql, re.I)
        if table and table.group(1) in created:
            continue  # a table made by these migrations: nothing waits for it yet
        if re.match(r"CREATE (UNIQUE )?INDEX (?!CONCURRENTLY)", upper):
            found.append(f"index built under a lock that stops writes: {sql}")
        if re.match(r"DROP INDEX (?!CONCURRENTLY)", upper):
            # (names only the index: its table is not known here, so a table these
            # migrations made is not told apart; none of them drops such an index)
            found.append(f"index dropped under the table's ACCESS EXCLUSIVE lock: {sql}")
        if not upper.startswith("ALTER TABLE"):
            continue
        if s.lock_timeout in ("0", ""):
            found.append(f"ALTER TABLE with no lock_timeout: {sql}")
        for clause in re.split(r",(?![^()]*\))", sql):
            clause_upper = clause.upper()
            if re.search(r"ADD CONSTRAINT .*\b(CHECK|FOREIGN KEY)\b", clause_upper) and (
                "NOT VALID" not in clause_upper
            ):
                found.append(f"constraint checked under ACCESS EXCLUSIVE: {sql}")
            if re.search(r"ADD CONSTRAINT .*\b(UNIQUE|PRIMARY KEY|EXCLUDE)\b", clause_upper) and (
                "USING INDEX" not in clause_upper
            ):
                found.append(f"unique index built under ACCESS EXCLUSIVE: {sql}")
            if re.search(r"ADD COLUMN .*\b(CHECK|REFERENCES|UNIQUE|PRIMARY KEY)\b", clause_upper):
                found.append(f"column's constraint checked under ACCESS EXCLUSIVE: {sql}")
            if re.search(r"ALTER COLUMN \S+ (SET NOT NULL|(SET DATA )?TYPE )", clause_upper):
                found.append(f"table scanned or rewritten under ACCESS EXCLUSIVE: {sql}")
        if m := re.search(r"ADD CONSTRAINT (\S+) .*NOT VALID", sql, re.IGNORECASE):
            added[m.group(1)] = s.transaction
        validated = re.search(r"VALIDATE CONSTRAINT (\S+)", sql, re.IGNORECASE)
        if (
            validated
            and s.transaction is not None
            and added.get(validated.group(1)) == s.transaction
        ):
            found.append(f"validated while the ADD's ACCESS EXCLUSIVE is held: {sql}")
    return found


def _disagreements() -> list[str]:
    """Where the database is not what the models (the migrations' state) say: an index a
    field's db_index implies missing under Django's name, a foreign key's constraint
    missing or not validated, an index left INVALID, a constraint left NOT VALID."""
    editor = connection.SchemaEditorClass(connection)
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c"
            " ON c.oid = i.indexrelid WHERE c.relnamespace = 'public'::regnamespace"
        )
        indexes = dict(cursor.fetchall())
        cursor.execute(
            "SELECT conname, convalidated FROM pg_constraint"
            " WHERE connamespace = 'public'::regnamespace"
        )
        constraints = dict(cursor.fetchall())
    found = [f"index {name} INVALID" for name, valid in indexes.items() if not valid]
    found += [f"constraint {name} NOT VALID" for name, valid in constraints.items() if not valid]
    for model in apps.get_models(include_auto_created=True):
        if not model._meta.managed or model._meta.proxy:
            continue
        for field in model._meta.local_concrete_fields:
            if editor._field_should_be_indexed(model, field):
                name = editor._create_index_name(model._meta.db_table, [field.column])
                if name not in indexes:
                    found.append(f"{model._meta.label}.{field.name}: no index {name}")
            if field.remote_field and field.db_constraint:
                name = str(
                    editor._fk_constraint_name(model, field, "_fk_%(to_table)s_%(to_column)s")
                ).strip('"')
                if name not in constraints:
                    found.append(f"{model._meta.label}.{field.name}: no foreign key {name}")
    return found


def test_migrations_since_the_review_lock_a_live_table_only_for_a_moment():
    # given a database at the latest migration, as every deploy leaves it
    migrate_to_latest()
    try:
        # when it is migrated back to before the migrations the review covers, and forward
        backwards = _sent_migrating(CUTOFF)
        forwards = _sent_migrating(MigrationExecutor(connection).loader.graph.leaf_nodes())
    finally:
        migrate_to_latest()

    # then no statement either way takes a lock that holds a live table's reads or
    # writes for longer than a moment; the index builds are concurrent
    assert any("CONCURRENTLY" in s.sql for s in forwards)
    unsafe = _unsafe(forwards) + _unsafe(backwards)
    assert not unsafe, "\n".join(unsafe)
    # and no lock_timeout outlives the migration on its connection
    with connection.cursor() as cursor:
        cursor.execute("SHOW lock_timeout")
        assert cursor.fetchone() == ("0",)
    # and the database is what the models say: every index and foreign key under
    # Django's name, all of them valid
    disagreements = _disagreements()
    assert not disagreements, "\n".join(disagreements)


def _index_valid(name: str) -> bool | None:
    """Whether index `name` is valid; None where there is none."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)", [f'"{name}"']
        )
        row = cursor.fetchone()
    return None if row is None else row[0]


def _stalled_index_build(name: str, table: str, columns: str) -> None:
    """A CREATE INDEX CONCURRENTLY of `name` that gave up, as one that a stopped `migrate`,
    or a lock it waited for too long, leaves: the index there, INVALID. Here it waits on a
    writer's open transaction (a concurrent build waits for every writer of the table to
    finish) and gives up at its lock_timeout."""
    settings = connection.settings_dict
    params = {
        "dbname": settings["NAME"],
        "user": settings["USER"],
        "password": settings["PASSWORD"],
        "host": settings["HOST"],
        "port": settings["PORT"],
    }
    with psycopg.connect(**params) as writer, psycopg.connect(**params, autocommit=True) as builder:
        writer.execute(f'LOCK TABLE "{table}" IN ROW EXCLUSIVE MODE')
        builder.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            builder.execute(f'CREATE INDEX CONCURRENTLY "{name}" ON "{table}" ({columns})')
    assert _index_valid(name) is False


@pytest.fixture
def left_invalid():
    """`names` of indexes a test leaves INVALID; after it, any still so is dropped (a
    failed run's) and the database migrated to the latest, for the next test's schema."""
    names: list[str] = []
    yield names
    for name in names:
        if _index_valid(name) is False:
            with connection.cursor() as cursor:
                cursor.execute(f'DROP INDEX "{name}"')
    migrate_to_latest()


@pytest.mark.parametrize(
    ("before", "name", "table", "columns"),
    [
        (
            ("metering", "0018_settlement_says_nothing_with_lots_due"),
            "ledger_account_next_expiry",
            "metering_ledgeraccount",
            "next_expiry_at",
        ),
        (
            ("gymbilling", "0039_payout_pending_sent_once"),
            "gymbilling_marketfill_refused_payout_id_89a40864",
            "gymbilling_marketfill",
            "id",
        ),
    ],
    ids=["metering-0019", "gymbilling-0040"],
)
def test_migrate_again_after_a_concurrent_index_build_gave_up_builds_it(
    before, name, table, columns, left_invalid
):
    # given the migration undone, and a concurrent build of its index that gave up,
    # leaving the index INVALID (accounts in the table, as on a live ledger)
    OrganizationFactory()
    migrate([before])
    left_invalid.append(name)
    _stalled_index_build(name, table, columns)

    # when `migrate` runs again
    migrate_to_latest()

    # then it built the index, valid, under the name the state gives it
    assert _index_valid(name) is True
    assert _disagreements() == []


def test_inference_0015_drops_the_sweeps_old_index_and_undone_builds_it_again():
    # given the jobs table as 0014 left it: both partial indexes of running jobs
    OrganizationFactory()
    try:
        migrate([("inference", "0014_job_run_started_at")])
        assert _index_valid("job_running_started") is True

        # when 0015 runs, the old index goes; undone, it is built again
        migrate([("inference", "0015_drop_job_running_started")])
        assert _index_valid("job_running_started") is None
        migrate([("inference", "0014_job_run_started_at")])
        assert _index_valid("job_running_started") is True

        # and a run that dropped it and stopped before recording 0015 is run again
        with connection.cursor() as cursor:
            cursor.execute('DROP INDEX CONCURRENTLY "job_running_started"')
    finally:
        migrate_to_latest()

    # then the old index is gone, the sweep's own stays, and the rest is as the models say
    assert _index_valid("job_running_started") is None
    assert _index_valid("job_running_run_started") is True
    assert _disagreements() == []
