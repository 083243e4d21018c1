"""Prepared statements for the few queries every inference request runs.

Django binds parameters on the client, so PostgreSQL parses and plans each of
its statements every time, and building the SQL of an INSERT or an UPDATE
costs the ORM more CPU than running it. For the statements on every
request's path (the ledger's fast path, the job row's insert, start and
claim) this module binds on the server and prepares: psycopg parses and
plans each once per connection (after `prepare_threshold` uses, or at once
with `prepare=True`).

Every parameter is cast to its column's type. Without a cast PostgreSQL
infers a parameter's type from the statement, once, for the prepared plan:
`remaining - $1` took a later 12,500,000,000 as a 32-bit integer and wrapped
(2026-12-01), which is why Django's own queries keep client-side binding
(gymbilling/settings/base.py).

PostgreSQL only, and only with DATABASE_PREPARED_STATEMENTS on (off behind
a transaction-pooling PgBouncer older than 1.21, which cannot keep a
connection's prepared statements): callers check `available()` and take the
ORM path otherwise, as on SQLite (the demo's default); `insert` does that
itself.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from django.conf import settings
from django.db import DatabaseError, connection, models
from django.db.models import Model


def available() -> bool:
    return connection.vendor == "postgresql" and settings.DATABASE_PREPARED_STATEMENTS


def _cursor():
    """A raw psycopg cursor on Django's connection: server-side binding."""
    import psycopg

    connection.ensure_connection()
    return psycopg.Cursor(connection.connection)


def execute(sql: str, params, *, fetch: str = "one"):
    """Run a prepared statement; its first row (fetch="one") or its row count ("count").

    Through Django's error wrapper, so callers see Django's exceptions
    (IntegrityError, OperationalError, ...), which retry_on_deadlock and the
    services expect; and through Django's execute wrappers, so tracing and
    the benchmarks' statement counts see these statements. (Django's own
    query log, DEBUG's and CaptureQueriesContext's, does not: it records
    only its own cursors.)

    A failed statement inside a transaction aborts that transaction, with no
    savepoint to go back to: the atomic block is marked for rollback, so a
    caller that catches the error and goes on gets Django's clear
    TransactionManagementError instead of PostgreSQL's "current transaction
    is aborted".
    """
    connection.validate_no_broken_transaction()

    def run(sql, params, many, context):
        cur = context["cursor"]
        cur.execute(sql, params, prepare=True)
        return cur.fetchone() if fetch == "one" else cur.rowcount

    executor = run
    for wrapper in reversed(connection.execute_wrappers):
        executor = functools.partial(wrapper, executor)
    try:
        with connection.wrap_database_errors, _cursor() as cur:
            return executor(sql, params, False, {"connection": connection, "cursor": cur})
    except DatabaseError as exc:
        if connection.in_atomic_block:
            connection.needs_rollback = True
        if _stale_plan(exc):
            # A migration changed a column this prepared statement returns:
            # PostgreSQL refuses it on this connection from now on, and psycopg
            # keeps it. Recycle the connection at the end of this request or
            # task (close_old_connections), so only this one fails.
            connection.close_at = 0
        raise


def _stale_plan(exc: DatabaseError) -> bool:
    cause = exc.__cause__
    return getattr(cause, "sqlstate", None) == "0A000" and "cached plan" in str(cause)


def cast_type(field) -> str:
    """The SQL type a parameter for `field` is cast to.

    Never a length: an explicit cast to varchar(n) truncates silently, where
    storing a too-long value into the column raises, as the ORM does.
    """
    if isinstance(field, models.CharField):
        return "varchar"
    return field.cast_db_type(connection)


@functools.cache
def _insert_fields(model: type[Model]) -> tuple:
    meta = model._meta
    # What the ORM would leave to the database, this statement would not:
    # refuse such models rather than write them differently.
    unsupported = [
        f.name
        for f in meta.concrete_fields
        if f.db_default is not models.NOT_PROVIDED
        or isinstance(f, models.GeneratedField)
        or (f.primary_key and not isinstance(f, models.AutoField))
    ]
    if unsupported:
        raise TypeError(f"sql.insert cannot write {model.__name__}: {', '.join(unsupported)}")
    return tuple(f for f in meta.concrete_fields if not f.primary_key)


@functools.cache
def _insert_statement(model: type[Model]) -> tuple[str, tuple]:
    quote = connection.ops.quote_name
    meta = model._meta
    fields = _insert_fields(model)
    columns = ", ".join(quote(f.column) for f in fields)
    values = ", ".join(f"%s::{cast_type(f)}" for f in fields)
    sql = (
        f"INSERT INTO {quote(meta.db_table)} ({columns}) VALUES ({values}) "
        f"RETURNING {quote(meta.pk.column)}"
    )
    return sql, fields


def _insert_params(obj: Model, fields) -> list:
    return [f.get_db_prep_save(f.pre_save(obj, True), connection) for f in fields]


def mark_inserted(obj: Model, pk) -> Model:
    """Mark `obj` as saved with primary key `pk` (after an INSERT from `insert_parts`)."""
    obj.pk = pk
    obj._state.adding = False
    obj._state.db = connection.alias
    return obj


@dataclass(frozen=True)
class RowInsert:
    """One INSERT to embed in a larger statement (see `insert_parts`)."""

    table: str  # quoted
    columns: str  # quoted, comma-separated
    values: str  # named placeholders, each cast: `%(row_0)s::bigint, ...`
    pk_column: str  # quoted
    params: dict


def insert_parts(obj: Model, *, prefix: str = "row_") -> RowInsert:
    """`insert(obj)`'s INSERT in parts, for a caller that writes it inside its own statement.

    Same values as `insert` (pre_save and get_db_prep_save), as named
    parameters `%(<prefix>N)s` so they cannot collide with the caller's.
    PostgreSQL only (check `available()`).
    """
    table, columns, values, pk_column, names = _insert_text(type(obj), prefix)
    params = _insert_params(obj, _insert_fields(type(obj)))
    return RowInsert(table, columns, values, pk_column, dict(zip(names, params, strict=True)))


@functools.cache
def _insert_text(model: type[Model], prefix: str) -> tuple[str, str, str, str, tuple]:
    quote = connection.ops.quote_name
    fields = _insert_fields(model)
    names = tuple(f"{prefix}{index}" for index in range(len(fields)))
    values = ", ".join(f"%({name})s::{cast_type(f)}" for name, f in zip(names, fields, strict=True))
    columns = ", ".join(quote(f.column) for f in fields)
    return quote(model._meta.db_table), columns, values, quote(model._meta.pk.column), names


def insert(obj: Model) -> Model:
    """INSERT `obj`'s row as `obj.save()` would, with a prepared statement.

    Defaults and `auto_now_add` are applied as the ORM applies them (the
    fields' own pre_save and get_db_prep_save); the primary key comes back
    from the database. No save signals are sent: use it only for models
    nothing listens to (a model cached by accounts.cache must go through
    save()).
    """
    if not available():
        obj.save(force_insert=True)
        return obj
    sql, fields = _insert_statement(type(obj))
    (pk,) = execute(sql, _insert_params(obj, fields))
    return mark_inserted(obj, pk)


@functools.cache
def _row_converters(model: type[Model]) -> tuple:
    """Per concrete field, the converters the ORM applies to a value read (JSON, ...)."""
    table = model._meta.db_table
    return tuple(
        tuple(connection.ops.get_db_converters(f.get_col(table)) + f.get_db_converters(connection))
        for f in model._meta.concrete_fields
    )


def columns(model: type[Model]) -> str:
    """The model's columns in field order, for a RETURNING that `from_row` reads."""
    return ", ".join(connection.ops.quote_name(f.column) for f in model._meta.concrete_fields)


def from_row(model: type[Model], row) -> Model:
    """A model instance from a row of `columns(model)`, converted as the ORM converts."""
    meta = model._meta
    values = []
    for field, converters, value in zip(
        meta.concrete_fields, _row_converters(model), row, strict=True
    ):
        for converter in converters:
            value = converter(value, field.get_col(meta.db_table), connection)
        values.append(value)
    return model.from_db(connection.alias, [f.attname for f in meta.concrete_fields], values)
