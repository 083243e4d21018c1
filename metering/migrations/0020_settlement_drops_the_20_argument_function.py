"""The settlement function without the record's user (0005's 20 arguments) is dropped.

0017 added `metering_hold_settle` with `u_user` beside the 20-argument one, kept
for the processes still running the code before it while it was deployed (a
call names its arguments' types, so each found its own); 0018 rewrote both. No
code since calls the 20-argument one: metering.services.fastpath.SETTLE_ARGS
passes 21, and so does inference's one-call settlement, whose own old overload
(the only caller of this one) inference/0011 drops. A process of a release before
metering/0017 and inference/0010 calling it now fails ("function does not exist"):
apply this only once none runs (README, "Running the parts yourself").

Backwards re-creates it as 0018 left it. Dropping a function locks nothing a
settlement waits for.
"""

import importlib

from django.db import migrations

_0005 = importlib.import_module("metering.migrations.0005_hold_settle_function")
_0015 = importlib.import_module("metering.migrations.0015_capture_burns_claimed_lots_last")
_0018 = importlib.import_module("metering.migrations.0018_settlement_says_nothing_with_lots_due")

SIGNATURE = _0005.SIGNATURES[0]
# The 20-argument function as 0018 left it (0015's, reporting nothing with lots due).
DROPPED_FUNCTION = _0018.reporting_nothing_with_lots_due(_0015.SETTLE_FUNCTION)


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(DROPPED_FUNCTION)


class Migration(migrations.Migration):
    dependencies = [("metering", "0019_ledgeraccount_next_expiry_index")]

    operations = [migrations.RunPython(forwards, backwards)]
