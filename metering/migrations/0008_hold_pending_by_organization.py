"""An organization's pending holds, found without reading its settled ones.

Built concurrently, outside a transaction, so a live ledger keeps placing and
settling holds while it builds (docs/BENCHMARKS.md, "Migrations on a
populated ledger")."""

from django.contrib.postgres.operations import AddIndexConcurrently
from django.db import migrations, models


class AddIndexConcurrentlyOnPostgres(AddIndexConcurrently):
    """Concurrently on PostgreSQL; an ordinary index elsewhere (`make demo`'s SQLite,
    where AddIndexConcurrently fails: it passes PostgreSQL's `concurrently`)."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            return super().database_forwards(app_label, schema_editor, from_state, to_state)
        return migrations.AddIndex.database_forwards(
            self, app_label, schema_editor, from_state, to_state
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
