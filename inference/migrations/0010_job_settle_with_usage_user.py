"""A job's one-call settlement passes on who sent it, for its usage record.

`inference_job_settle` (0004) with one argument more, `u_user`, last, passed
to the settlement function that takes it (metering/0017), so that a usage
record names the member who sent its job through the dashboard's session as
the job does (Job.user), in the same one statement. The 36-argument function
stays beside it, unchanged, for processes still running the code before this
one while it is deployed; a later migration drops it once none does.
"""

import importlib

from django.db import migrations

_0004 = importlib.import_module("inference.migrations.0004_job_settle_function")
_replaced = importlib.import_module("metering.migrations.0007_capture_burns_by_placement")._replaced

SETTLE_FUNCTION = _replaced(
    _0004.SETTLE_FUNCTION,
    (
        "    u_credits bigint, u_price bigint, u_cost bigint, u_currency text\n",
        "    u_credits bigint, u_price bigint, u_cost bigint, u_currency text, u_user bigint\n",
    ),
    (
        "               u_out, u_ms, u_credits, u_price, u_cost, u_currency\n",
        "               u_out, u_ms, u_credits, u_price, u_cost, u_currency, u_user\n",
    ),
)
SIGNATURE = _0004.SIGNATURE.replace(", text)", ", text, bigint)")
assert SIGNATURE != _0004.SIGNATURE


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(SETTLE_FUNCTION)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")


class Migration(migrations.Migration):
    dependencies = [
        ("inference", "0009_job_user"),
        ("metering", "0017_usagerecord_user"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
