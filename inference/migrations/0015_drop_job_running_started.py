"""Drop 0012's index of running jobs by `started_at`: nothing reads it any more.

The orphaned jobs' sweep has read its current run's start (0014's index,
`job_running_run_started`) since 0014; 0012's index stayed only for the sweep of the
release before 0014, which has been gone for several releases. Every job's start and end
still wrote it.

Dropped concurrently, outside a transaction: a plain DROP INDEX takes the jobs table's
ACCESS EXCLUSIVE lock, and waits behind every open reader of it while every new read and
write of jobs waits behind it. IF EXISTS, so `migrate` can be run again after a drop
that stopped (a concurrent drop that fails leaves the index INVALID, and a second drop
removes it). Backwards, it is built again concurrently, as 0012 built it; elsewhere
(`make demo`'s SQLite) these are the ordinary RemoveIndex and AddIndex.
"""

import importlib

from django.contrib.postgres.operations import RemoveIndexConcurrently
from django.db import migrations

_0008 = importlib.import_module("metering.migrations.0008_hold_pending_by_organization")


class RemoveIndexConcurrentlyOnPostgres(RemoveIndexConcurrently):
    """Django's RemoveIndexConcurrently (DROP INDEX CONCURRENTLY IF EXISTS) on PostgreSQL;
    backwards, the index is built again as AddIndexConcurrentlyOnPostgres builds one
    (again after a build that stopped). The ordinary RemoveIndex elsewhere (`make demo`'s
    SQLite, where CONCURRENTLY does not exist)."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return migrations.RemoveIndex.database_forwards(
                self, app_label, schema_editor, from_state, to_state
            )
        return super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return migrations.RemoveIndex.database_backwards(
                self, app_label, schema_editor, from_state, to_state
            )
        self._ensure_not_in_transaction(schema_editor)
        model = to_state.apps.get_model(app_label, self.model_name)
        if self.allow_migrate_model(schema_editor.connection.alias, model):
            index = to_state.models[app_label, self.model_name_lower].get_index_by_name(self.name)
            _0008.index_build_concurrently(
                schema_editor, index.create_sql(model, schema_editor, concurrently=True)
            )


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("inference", "0014_job_run_started_at"),
    ]

    operations = [
        RemoveIndexConcurrentlyOnPostgres(model_name="job", name="job_running_started"),
    ]
