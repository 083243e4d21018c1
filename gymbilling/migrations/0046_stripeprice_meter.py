"""The Stripe billing meter each metered (overage) price reads, so that a period's overage
allowance is granted on a retired overage price the subscription still carries (a member
on an old dollar price of a plan sold in euros since) only when that price reads the meter
overage is reported to (services.invoices.overage_price_billed).

Blank by default, in the database too: processes of the previous release still write
prices during a deploy, without it. Prices already there are read from Stripe where they
are needed: the current ones at the next `stripe_sync_catalog`, a retired one carried by a
subscription at that subscription's next sync (every renewal syncs before its grant).

The ALTER waits at most a lock_timeout (metering/0016's AddFieldIfAbsentOnPostgres).
"""

import importlib

from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("gymbilling", "0045_overagereport_first_unknown_attempt_at"),
    ]

    operations = [
        _0016.AddFieldIfAbsentOnPostgres(
            model_name="stripeprice",
            name="meter",
            field=models.CharField(blank=True, db_default="", default="", max_length=255),
        ),
    ]
