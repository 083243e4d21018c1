"""Overage batches count Stripe's immediate refusals, so that one Stripe keeps refusing
(an invalid parameter, a meter deactivated) is left to finance after
BILLING_OVERAGE_MAX_RESENDS re-sends instead of being tried, and logged, at every run.

A database default of 0: processes of the previous release still write batches during a
deploy, without it; batches already there start at 0, so each gets the full cap.

Added as 0038 added `send_attempts`, not atomic, the ALTER waiting at most a lock_timeout:
a PositiveIntegerField, whose `>= 0` CHECK is added NOT VALID and validated apart, under a
lock that lets batches be written. The schema and the state are AddField's.
"""

import importlib

from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("gymbilling", "0043_marketpayout_seller_frozen"),
    ]

    operations = [
        _0016.AddFieldIfAbsentOnPostgres(
            model_name="overagereport",
            name="refusals",
            field=models.PositiveIntegerField(db_default=0, default=0),
        ),
        _0016.ValidateFieldCheckOnPostgres(model_name="overagereport", name="refusals"),
    ]
