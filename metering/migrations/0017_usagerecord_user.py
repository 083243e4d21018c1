"""A usage record names the member who spent it when no API key did (the dashboard's session).

The column is added as 0016 added a lot's root, with its operations: not atomic,
nullable with no default (no rewrite), its foreign key added NOT VALID then
validated under a lock that lets settlements go on, each ALTER waiting at most
LOCK_TIMEOUT for its lock; no index. Re-runnable after a stop partway.

The settlement function writes the record, so it takes the user too: a new
`metering_hold_settle` with one argument more, `u_user`, last (0015's body, the
record's insert naming the column). The 20-argument function stays beside it,
unchanged, for the processes still running the code before this one while it
is deployed (a call names its arguments' types, so each finds its own); a later
migration drops it once none does. Adding a function locks nothing a
settlement waits for.
"""

import importlib

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

_0005 = importlib.import_module("metering.migrations.0005_hold_settle_function")
_0007 = importlib.import_module("metering.migrations.0007_capture_burns_by_placement")
_0015 = importlib.import_module("metering.migrations.0015_capture_burns_claimed_lots_last")
_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")

SETTLE_FUNCTION = _0007._replaced(
    _0015.SETTLE_FUNCTION,
    (
        "    u_credits bigint, u_price bigint, u_cost bigint, u_currency text\n",
        "    u_credits bigint, u_price bigint, u_cost bigint, u_currency text, u_user bigint\n",
    ),
    (
        "                    model_price_id, serving_cost, currency, created_at)\n",
        "                    model_price_id, serving_cost, currency, created_at, user_id)\n",
    ),
    (
        "                   u_ms, u_credits, u_price, u_cost, u_currency, p_now\n",
        "                   u_ms, u_credits, u_price, u_cost, u_currency, p_now, u_user\n",
    ),
)
SIGNATURE = _0005.SIGNATURES[0].replace(", text)", ", text, bigint)")
assert SIGNATURE != _0005.SIGNATURES[0]

# The column as metering.models.UsageRecord declares it (frozen here).
USER = models.ForeignKey(
    blank=True,
    db_index=False,
    null=True,
    on_delete=django.db.models.deletion.PROTECT,
    related_name="+",
    to=settings.AUTH_USER_MODEL,
)


def forwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(SETTLE_FUNCTION)


def backwards(apps, schema_editor):
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.execute(f"DROP FUNCTION IF EXISTS {SIGNATURE}")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("metering", "0016_creditlot_revenue"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        _0016.AddForeignKeyNotValidOnPostgres("usagerecord", "user", USER),
        _0016.ValidateForeignKeyOnPostgres(model_name="usagerecord", name="user"),
        # After the column, which the function's insert names; CREATE OR REPLACE:
        # a run that stopped after it finishes the same.
        migrations.RunPython(forwards, backwards, atomic=True),
    ]
