"""Who sent a job that no API key sent: the member signed in to the dashboard.

One nullable foreign key on jobs, added as metering/0016 added a lot's root, and
with its operations, so that it is safe on a populated, live jobs table (every
inference request inserts a row there): not atomic, so each step holds its lock
only for itself, and each ALTER waits at most 0016's LOCK_TIMEOUT for its lock,
failing rather than queueing every job's insert behind it (run it again later:
each step does only what is missing).
- The column is nullable, with no default: added without rewriting the table.
- Its constraint is added NOT VALID (a brief lock, no scan), then validated under
  a lock that lets jobs be inserted and settled meanwhile.
- No index (Job.user says why), so no build locks the table either.
The row's insert (accounts.sql, one statement with the hold's placement) names
every column of the model, so it writes this one with no statement more. On
SQLite (`make demo`) it is Django's ordinary AddField.
"""

import importlib

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")

# The column as inference.models.Job declares it (frozen here).
USER = models.ForeignKey(
    blank=True,
    db_index=False,
    null=True,
    on_delete=django.db.models.deletion.PROTECT,
    related_name="+",
    to=settings.AUTH_USER_MODEL,
)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("inference", "0008_catalog_prompt_special_and_input_limit"),
        ("metering", "0016_creditlot_revenue"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        _0016.AddForeignKeyNotValidOnPostgres("job", "user", USER),
        _0016.ValidateForeignKeyOnPostgres(model_name="job", name="user"),
    ]
