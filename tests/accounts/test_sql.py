"""accounts.sql: the prepared statements write and read rows exactly as the ORM does."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from accounts import sql
from inference.models import Job
from metering.selectors import model_price
from tests.factories import OrganizationFactory
from tests.helpers import served_model

pytestmark = pytest.mark.django_db


def _job(org, model, public_id: str, **extra) -> Job:
    return Job(
        public_id=public_id,
        organization=org,
        model=model,
        model_price=model_price(model_name=model.name),
        priority="standard",
        params={"max_tokens": 16, "stop": ["\n"], "temperature": 0.7, "seed": 2**40},
        hold_amount=12_500_000_000,  # past 32 bits
        **extra,
    )


@pytest.fixture
def model():
    return served_model("sql-model")


def _fields(job: Job) -> dict:
    skip = {"id", "public_id", "queued_at"}
    return {
        f.attname: getattr(job, f.attname) for f in Job._meta.concrete_fields if f.name not in skip
    }


def test_insert_writes_the_row_save_writes(model):
    org = OrganizationFactory()

    # when one job is inserted by the prepared statement, another by the ORM
    before = timezone.now()
    prepared = sql.insert(_job(org, model, "job_prepared"))
    orm = _job(org, model, "job_orm")
    orm.save(force_insert=True)

    # then both rows read back the same, defaults and JSON included, with a
    # primary key and an auto_now_add time the database holds
    read_prepared = Job.objects.get(public_id="job_prepared")
    read_orm = Job.objects.get(public_id="job_orm")
    assert read_prepared.pk == prepared.pk and not prepared._state.adding
    assert _fields(read_prepared) == _fields(read_orm)
    assert read_prepared.hold_amount == 12_500_000_000
    assert read_prepared.params["seed"] == 2**40
    assert read_prepared.status == "queued" and read_prepared.input_tokens == 0
    assert before <= read_prepared.queued_at == prepared.queued_at <= timezone.now()


def test_a_row_read_by_a_prepared_statement_is_the_model_the_orm_reads(model):
    # given a job with JSON, nulls and times
    org = OrganizationFactory()
    started = timezone.now() - timedelta(seconds=3)
    job = _job(org, model, "job_read", started_at=started)
    job.save(force_insert=True)

    # when its row is read by a prepared statement
    row = sql.execute(
        f"SELECT {sql.columns(Job)} FROM inference_job WHERE id = %(pk)s::bigint",
        {"pk": job.pk},
    )
    read = sql.from_row(Job, row)

    # then it is what the ORM reads: the JSON decoded, the times aware
    assert _fields(read) == _fields(Job.objects.get(pk=job.pk))
    assert read.params == job.params
    assert isinstance(read.started_at, datetime) and read.started_at == started
    assert read.finished_at is None


def test_prepared_statements_are_seen_by_execute_wrappers(model):
    # given a wrapper on the connection, as query logging or tracing installs
    seen = []

    def wrapper(execute, sql_text, params, many, context):
        seen.append(sql_text.split()[0])
        return execute(sql_text, params, many, context)

    # when a row is inserted by a prepared statement
    job = _job(OrganizationFactory(), model, "job_wrapped")
    with connection.execute_wrapper(wrapper), CaptureQueriesContext(connection):
        sql.insert(job)

    # then the wrapper saw it
    assert seen == ["INSERT"]


def test_without_prepared_statements_the_orm_writes_the_same_row(settings, model):
    from metering.services import fastpath

    # given prepared statements off (behind an old transaction-pooling PgBouncer)
    settings.DATABASE_PREPARED_STATEMENTS = False
    org = OrganizationFactory()
    job = _job(org, model, "job_unprepared")
    statements = []

    def wrapper(execute, sql_text, params, many, context):
        statements.append(sql_text)
        return execute(sql_text, params, many, context)

    # when a row is inserted
    with connection.execute_wrapper(wrapper):
        sql.insert(job)

    # then the ORM wrote it (client-side binding: no casts), and it reads back
    # as the prepared statement's would; the ledger's fast path is off too
    assert not sql.available() and not fastpath.enabled()
    assert len(statements) == 1 and "::" not in statements[0]
    read = Job.objects.get(public_id="job_unprepared")
    assert read.pk == job.pk and read.params == job.params
    assert read.hold_amount == 12_500_000_000


@pytest.mark.parametrize("prepared", [True, False], ids=["prepared", "orm"])
def test_a_value_too_long_for_its_column_is_refused_not_cut(settings, model, prepared):
    from django.db import DataError, transaction

    # given a job id longer than its column (40 characters)
    settings.DATABASE_PREPARED_STATEMENTS = prepared
    job = _job(OrganizationFactory(), model, "job_" + "x" * 60)

    # when it is inserted, then it is refused as the ORM refuses it, and
    # nothing was stored cut short
    with pytest.raises(DataError), transaction.atomic():
        sql.insert(job)
    assert not Job.objects.filter(public_id__startswith="job_xxx").exists()


@pytest.mark.django_db(transaction=True)
def test_a_statement_a_migration_made_stale_recycles_its_connection():
    import psycopg
    from django.db import NotSupportedError, close_old_connections

    # given a prepared statement on this connection, over a scratch table
    params = connection.get_connection_params()
    with psycopg.connect(**params, autocommit=True) as other:
        other.execute("CREATE TABLE sql_probe (id int, note varchar(10))")
        other.execute("INSERT INTO sql_probe VALUES (1, 'a')")
    try:
        probe = "SELECT note FROM sql_probe WHERE id = %(id)s::integer"
        assert sql.execute(probe, {"id": 1}) == ("a",)
        connection.close_at = None  # persistent, as production's conn_max_age keeps it

        # when a migration, elsewhere, changes the type of a column it returns
        with psycopg.connect(**params, autocommit=True) as other:
            other.execute("ALTER TABLE sql_probe ALTER COLUMN note TYPE text")

        # then the statement fails on this connection, which is marked to be
        # recycled at the end of the request or task; the next one works
        with pytest.raises(NotSupportedError):
            sql.execute(probe, {"id": 1})
        close_old_connections()
        assert sql.execute(probe, {"id": 1}) == ("a",)
    finally:
        with psycopg.connect(**params, autocommit=True) as other:
            other.execute("DROP TABLE IF EXISTS sql_probe")
