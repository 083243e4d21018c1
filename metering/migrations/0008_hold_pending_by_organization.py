"""An organization's pending holds, found without reading its settled ones.

Built concurrently, outside a transaction, so a live ledger keeps placing and
settling holds while it builds (docs/BENCHMARKS.md, "Migrations on a
populated ledger")."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


def index_build_concurrently(schema_editor, statement) -> None:
    """Build the index of `statement`, a CREATE INDEX of Django's (its name, its columns),
    concurrently, so that a live table takes reads and writes meanwhile, and so that
    `migrate` can be run again whatever stopped an earlier build.

    A concurrent build that fails or is cancelled (a stopped `migrate`, a deadlock, a
    statement timeout) leaves its index behind, INVALID: unused by queries, still
    maintained by every write, and in the way of the same CREATE INDEX ("relation already
    exists"). It is dropped first, concurrently, so no write waits for it. A valid one (a
    run that built it and stopped before it was recorded) is kept: IF NOT EXISTS.
    """
    name = str(statement.parts["name"])  # quoted, as the statement names it
    with schema_editor.connection.cursor() as cursor:
        cursor.execute(
            "SELECT 1 FROM pg_index JOIN pg_class ON pg_class.oid = pg_index.indexrelid"
            " WHERE pg_class.oid = to_regclass(%s) AND NOT pg_index.indisvalid",
            [name],
        )
        invalid = cursor.fetchone() is not None
    if invalid:
        schema_editor.execute(schema_editor.sql_delete_index_concurrently % {"name": name})
    # The same placeholders, so the same index; another template (a unique index's) is
    # not one this builds.
    assert statement.template in (
        schema_editor.sql_create_index,
        schema_editor.sql_create_index_concurrently,
    ), statement.template
    statement.template = schema_editor.sql_create_index_concurrently.replace(
        "CREATE INDEX CONCURRENTLY ", "CREATE INDEX CONCURRENTLY IF NOT EXISTS ", 1
    )
    schema_editor.execute(statement, params=None)


class AddIndexConcurrentlyOnPostgres(AddIndexConcurrently):
    """Concurrently on PostgreSQL, and run again after a build that stopped
    (index_build_concurrently); an ordinary index elsewhere (`make demo`'s SQLite,
    where AddIndexConcurrently fails: it passes PostgreSQL's `concurrently`)."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return migrations.AddIndex.database_forwards(
                self, app_label, schema_editor, from_state, to_state
            )
        self._ensure_not_in_transaction(schema_editor)
        model = to_state.apps.get_model(app_label, self.model_name)
        if self.allow_migrate_model(schema_editor.connection.alias, model):
            index_build_concurrently(
                schema_editor, self.index.create_sql(model, schema_editor, concurrently=True)
            )

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_backwards(app_label, schema_editor, from_state, to_state)
        return migrations.AddIndex.database_backwards(
            self, app_label, schema_editor, from_state, to_state
        )


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("accounts", "0004_idempotency_replayed_headers"),
        ("metering", "0007_capture_burns_by_placement"),
    ]

    operations = [
        AddIndexConcurrentlyOnPostgres(
            model_name="hold",
            index=models.Index(
                condition=models.Q(("status", "pending")),
                fields=["organization", "created_at"],
                name="hold_pending_org",
            ),
        ),
    ]
