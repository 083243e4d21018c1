"""The one-call job settlement without the record's user (0004's 36 arguments) is dropped.

0010 added `inference_job_settle` with `u_user` beside the 36-argument one, kept
for the processes still running the code before it while it was deployed. No
code since calls it: inference.services.jobs passes 37 arguments. It called the
ledger's 20-argument settlement, which metering/0020 drops, hence this one after
it. A process of a release before inference/0010 calling it now fails
("function does not exist"): apply this only once none runs (README, "Running
the parts yourself").

Backwards re-creates it as 0004 wrote it (no migration since changed it).
"""

import importlib

from django.db import migrations

_0004 = importlib.import_module("inference.migrations.0004_job_settle_function")


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP FUNCTION IF EXISTS {_0004.SIGNATURE}")


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(_0004.SETTLE_FUNCTION)


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0010_job_settle_with_usage_user"),
        ("metering", "0020_settlement_drops_the_20_argument_function"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
