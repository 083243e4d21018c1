"""What each lot's credits were sold for, for finance's revenue and margin report.

Four nullable or defaulted columns on credit lots: `root` (the granted lot a
split lot came from), `revenue` and `revenue_currency` (what the grant's
payment paid for all its credits), `origin` (an opaque label of the seller's:
gymbilling writes a plan's code or "pack"). The settlement function
(metering_hold_settle, 0005 to 0015) names the columns it reads and writes,
so it needs no change; no index is added, so a burn writes what it did.

Safe on a populated, live ledger (docs/BENCHMARKS.md, "Migrations on a
populated ledger"): not atomic, so each step holds its lock only for itself.
- The columns are added without rewriting the table (nullable, or a constant
  default that stays the column's default in the database, so that code not
  deployed yet, which inserts lots without them, still can).
- The foreign key is added NOT VALID (a brief lock, no scan), then validated
  under a lock that lets reads and writes go on.
- The backfill updates a thousand lots per transaction: lots split from
  another get their root (parents always have the lower id, so each batch
  finds its parents' roots already written), and free granted lots (neither
  paid nor an overage allowance, which gymbilling prices) a revenue of 0.
  Paid lots get theirs from gymbilling's invoices and checkouts
  (gymbilling/0014).
On SQLite (`make demo`) the foreign key is Django's ordinary one.

Re-runnable on PostgreSQL: a run that stopped partway (a crash, or a lock it waited for
too long) has committed the steps before, so each step does only what is missing (ADD
COLUMN IF NOT EXISTS, the constraint only if pg_constraint lacks it; VALIDATE and the
backfill are idempotent), and `migrate` again finishes the rest. Each ALTER waits at
most LOCK_TIMEOUT for its lock: queued behind a long reader, it would hold every
settlement's lot writes behind its ACCESS EXCLUSIVE request; it fails instead, and the
migration can be run again at a quieter moment. SQLite runs Django's own operations.
"""

import importlib

from django.db import NotSupportedError, migrations, models, transaction

_0008 = importlib.import_module("metering.migrations.0008_hold_pending_by_organization")

BATCH = 1_000
# How long each ALTER may wait for its lock before the migration fails (re-runnable).
LOCK_TIMEOUT = "5s"


def _alter(schema_editor, sql: str, params=()) -> None:
    """One ALTER in its own transaction, waiting at most LOCK_TIMEOUT for its lock (SET
    LOCAL: the setting ends with the transaction, never outliving it on the connection)."""
    with transaction.atomic(using=schema_editor.connection.alias):
        schema_editor.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
        schema_editor.execute(sql, params or None)


class AddFieldIfAbsentOnPostgres(migrations.AddField):
    """Django's AddField, but on PostgreSQL a column already there (a run that stopped
    after adding it) is left as it is, and each ALTER waits at most LOCK_TIMEOUT.

    The CHECK a field's type brings (a PositiveIntegerField's `>= 0`), which Django writes
    into the ADD COLUMN (a scan of the table under its ACCESS EXCLUSIVE lock), is added
    NOT VALID under the name PostgreSQL gives that one; ValidateFieldCheckOnPostgres
    validates it. Not for a field with an index (AddFieldIndexConcurrentlyOnPostgres
    builds it) or a foreign key (AddForeignKeyNotValidOnPostgres). Backwards drops the
    column, waiting at most LOCK_TIMEOUT too."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        model = to_state.apps.get_model(app_label, self.model_name)
        field = model._meta.get_field(self.name)
        if field.remote_field or field.unique:
            raise ValueError(f"{self.name}: a foreign key or a unique column, not added here")
        definition, params = schema_editor.column_sql(model, field, include_default=False)
        _alter(
            schema_editor,
            f"ALTER TABLE {schema_editor.quote_name(model._meta.db_table)} ADD COLUMN IF NOT "
            f"EXISTS {schema_editor.quote_name(field.column)} {definition}",
            params,
        )
        check = field.db_parameters(connection=schema_editor.connection)["check"]
        if check:
            _constraint_add_not_valid(
                schema_editor,
                model,
                _field_check_name(schema_editor, model, field),
                f"CHECK ({check})",
            )

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        model = from_state.apps.get_model(app_label, self.model_name)
        field = model._meta.get_field(self.name)
        # CASCADE, as Django's RemoveField: its constraints and indexes go with it.
        _alter(
            schema_editor,
            f"ALTER TABLE {schema_editor.quote_name(model._meta.db_table)} DROP COLUMN IF "
            f"EXISTS {schema_editor.quote_name(field.column)} CASCADE",
        )


class AddForeignKeyNotValidOnPostgres(AddFieldIfAbsentOnPostgres):
    """A nullable foreign key column, its constraint added NOT VALID on PostgreSQL (the
    next operation validates it without blocking writes); Django's AddField elsewhere.
    The index of a field with db_index (a ForeignKey's default) is not built here:
    AddFieldIndexConcurrentlyOnPostgres builds it, as the state says it exists."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return migrations.AddField.database_forwards(
                self, app_label, schema_editor, from_state, to_state
            )
        model = to_state.apps.get_model(app_label, self.model_name)
        field = model._meta.get_field(self.name)
        table = schema_editor.quote_name(model._meta.db_table)
        column = schema_editor.quote_name(field.column)
        target = field.target_field
        _alter(
            schema_editor,
            f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} "
            f"{field.db_type(schema_editor.connection)} NULL",
        )
        _constraint_add_not_valid(
            schema_editor,
            model,
            _fk_name(schema_editor, model, field),
            f"FOREIGN KEY ({column}) REFERENCES "
            f"{schema_editor.quote_name(target.model._meta.db_table)} "
            f"({schema_editor.quote_name(target.column)}) DEFERRABLE INITIALLY DEFERRED",
        )


class AddCheckNotValidOnPostgres(migrations.AddConstraint):
    """Django's AddConstraint of a CheckConstraint, but on PostgreSQL added NOT VALID (a
    brief lock, no scan) under LOCK_TIMEOUT, if not there yet; ValidateConstraintOnPostgres
    validates it. Backwards drops it under LOCK_TIMEOUT."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        if not isinstance(self.constraint, models.CheckConstraint):
            raise ValueError(f"{self.constraint.name}: only a CHECK is added NOT VALID")
        model = to_state.apps.get_model(app_label, self.model_name)
        _constraint_add_not_valid(
            schema_editor,
            model,
            schema_editor.quote_name(self.constraint.name),
            f"CHECK ({self.constraint._get_check_sql(model, schema_editor)})",
        )

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        model = to_state.apps.get_model(app_label, self.model_name)
        _alter(
            schema_editor,
            f"ALTER TABLE {schema_editor.quote_name(model._meta.db_table)} DROP CONSTRAINT IF "
            f"EXISTS {schema_editor.quote_name(self.constraint.name)}",
        )


def _constraint_add_not_valid(schema_editor, model, name: str, definition: str) -> None:
    """ADD CONSTRAINT `name` (quoted) `definition` NOT VALID: the table's ACCESS EXCLUSIVE
    lock for a moment, no scan. Nothing if an earlier run added it (`sqlmigrate` shows
    it all the same: what a first run sends)."""
    table = model._meta.db_table
    if not schema_editor.collect_sql and _constraint_exists(schema_editor, table, name):
        return
    _alter(
        schema_editor,
        f"ALTER TABLE {schema_editor.quote_name(table)} ADD CONSTRAINT {name} {definition} "
        "NOT VALID",
    )


def _constraint_exists(schema_editor, table: str, name: str) -> bool:
    """Whether `table` has a constraint `name` (an earlier run that stopped added it)."""
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM pg_constraint WHERE conrelid = %s::regclass AND conname = %s",
            [table, name.strip('"')],  # quoted for SQL
        )
        return cursor.fetchone() is not None


class ValidateConstraintOnPostgres(migrations.operations.base.Operation):
    """VALIDATE CONSTRAINT `constraint` (one added NOT VALID): a scan under SHARE UPDATE
    EXCLUSIVE, which lets the table be read and written meanwhile. In a migration that is
    not atomic, so that the ADD's ACCESS EXCLUSIVE lock is not held through the scan."""

    reduces_to_sql = True
    reversible = True

    def __init__(self, model_name: str, constraint: str) -> None:
        self.model_name, self.constraint = model_name, constraint

    def state_forwards(self, app_label, state):
        pass

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return
        model = to_state.apps.get_model(app_label, self.model_name)
        # Validating a constraint already valid (an earlier run got this far) does nothing.
        _alter(
            schema_editor,
            f"ALTER TABLE {schema_editor.quote_name(model._meta.db_table)} "
            f"VALIDATE CONSTRAINT {self._name(schema_editor, model)}",
        )

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        pass

    def _name(self, schema_editor, model) -> str:
        return schema_editor.quote_name(self.constraint)

    def describe(self) -> str:
        return f"Validate the constraint {self.constraint} of {self.model_name}"


class ValidateForeignKeyOnPostgres(ValidateConstraintOnPostgres):
    """VALIDATE CONSTRAINT of the foreign key of the field `name`: a scan under SHARE
    UPDATE EXCLUSIVE, which lets lots be burned."""

    def __init__(self, model_name: str, name: str) -> None:
        self.model_name, self.name = model_name, name

    def _name(self, schema_editor, model) -> str:
        return _fk_name(schema_editor, model, model._meta.get_field(self.name))

    def describe(self) -> str:
        return f"Validate the foreign key of {self.model_name}.{self.name}"


class ValidateFieldCheckOnPostgres(ValidateConstraintOnPostgres):
    """VALIDATE CONSTRAINT of the CHECK that AddFieldIfAbsentOnPostgres added for the field
    `name` (its type's: a PositiveIntegerField's `>= 0`)."""

    def __init__(self, model_name: str, name: str) -> None:
        self.model_name, self.name = model_name, name

    def _name(self, schema_editor, model) -> str:
        return _field_check_name(schema_editor, model, model._meta.get_field(self.name))

    def describe(self) -> str:
        return f"Validate the check of {self.model_name}.{self.name}"


class AddFieldIndexConcurrentlyOnPostgres(migrations.operations.base.Operation):
    """The index that db_index gives the field `name`, added just before (by
    AddForeignKeyNotValidOnPostgres, whose state says the field has it), built
    concurrently on PostgreSQL: Django's names and columns, so the database is what
    Django's AddField makes and later schema changes find it. Re-runnable (metering/0008's
    index_build_concurrently). Elsewhere AddField built it. Backwards nothing: the
    column's removal drops it."""

    reduces_to_sql = True
    reversible = True
    atomic = False

    def __init__(self, model_name: str, name: str) -> None:
        self.model_name, self.name = model_name, name

    def state_forwards(self, app_label, state):
        pass

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return
        if schema_editor.connection.in_atomic_block:
            raise NotSupportedError(f"{self.describe()}: set atomic = False on the migration")
        model = to_state.apps.get_model(app_label, self.model_name)
        statements = schema_editor._field_indexes_sql(model, model._meta.get_field(self.name))
        if not statements:
            raise ValueError(f"{self.model_name}.{self.name} has no index to build")
        for statement in statements:
            _0008.index_build_concurrently(schema_editor, statement)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        pass

    def describe(self) -> str:
        return f"Concurrently build the index of {self.model_name}.{self.name}"


def _fk_name(schema_editor, model, field) -> str:
    """The name Django gives the constraint, so that later schema changes find it."""
    return str(schema_editor._fk_constraint_name(model, field, "_fk_%(to_table)s_%(to_column)s"))


def _field_check_name(schema_editor, model, field) -> str:
    """The name PostgreSQL gives the CHECK that Django's AddField writes into the ADD
    COLUMN (`<table>_<column>_check`), so that the database is the same whichever added
    it; quoted. PostgreSQL shortens a name over 63 bytes: none is."""
    name = f"{model._meta.db_table}_{field.column}_check"
    assert len(name.encode()) <= 63, name
    return schema_editor.quote_name(name)


def _in_batches(queryset, apply) -> None:
    """`apply(ids)` to the rows of `queryset` a batch at a time, each batch its own
    transaction, in id order."""
    last = 0
    while True:
        with transaction.atomic(using=queryset.db):
            ids = list(
                queryset.filter(pk__gt=last).order_by("pk").values_list("pk", flat=True)[:BATCH]
            )
            if not ids:
                return
            apply(ids)
        last = ids[-1]


def backfill(apps, schema_editor):
    CreditLot = apps.get_model("metering", "CreditLot")
    lots = CreditLot.objects.using(schema_editor.connection.alias)

    def roots(ids: list[int]) -> None:
        parents = dict(lots.filter(pk__in=ids).values_list("pk", "parent_id"))
        found: dict[int, int] = {}
        for pk in ids:
            found[pk] = _root_of(lots, parents[pk], found)
        by_root: dict[int, list[int]] = {}
        for pk, root in found.items():
            by_root.setdefault(root, []).append(pk)
        for root, pks in by_root.items():
            lots.filter(pk__in=pks).update(root_id=root)

    _in_batches(lots.filter(parent__isnull=False, root__isnull=True), roots)
    _in_batches(
        lots.filter(parent__isnull=True, paid=False, revenue__isnull=True).exclude(
            source="overage"
        ),
        lambda ids: lots.filter(pk__in=ids).update(revenue=0),
    )


def _root_of(lots, parent: int, found: dict[int, int]) -> int:
    """The root of a lot split from `parent`: the parent's, found in this batch or
    written by an earlier one, else walked up to."""
    while True:
        if parent in found:
            return found[parent]
        up, root = lots.filter(pk=parent).values_list("parent_id", "root_id").get()
        if up is None:
            return parent
        if root is not None:
            return root
        parent = up


# The columns as metering.models.CreditLot declares them (frozen here).
ORIGIN = models.CharField(max_length=64, blank=True, default="", db_default="")
REVENUE = models.BigIntegerField(null=True, blank=True)
REVENUE_CURRENCY = models.CharField(max_length=3, blank=True, default="", db_default="")
ROOT = models.ForeignKey(
    "metering.creditlot", models.PROTECT, null=True, blank=True, related_name="+", db_index=False
)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [("metering", "0015_capture_burns_claimed_lots_last")]

    operations = [
        AddFieldIfAbsentOnPostgres("creditlot", "origin", ORIGIN),
        AddFieldIfAbsentOnPostgres("creditlot", "revenue", REVENUE),
        AddFieldIfAbsentOnPostgres("creditlot", "revenue_currency", REVENUE_CURRENCY),
        AddForeignKeyNotValidOnPostgres("creditlot", "root", ROOT),
        ValidateForeignKeyOnPostgres(model_name="creditlot", name="root"),
        migrations.RunPython(backfill, migrations.RunPython.noop),
    ]
