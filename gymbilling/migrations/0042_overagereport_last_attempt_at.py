"""The last attempt of an overage batch that Stripe may have taken, so that only a meter
error report naming that attempt re-sends the batch (services/overage.py).

Nullable, no default: processes of the previous release, still running during a deploy,
write batches without it, and one they sent is read by its `sent_at` instead.

The ALTER waits at most a lock_timeout (metering/0016's AddFieldIfAbsentOnPostgres).
"""

import importlib

from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("gymbilling", "0041_overagereport_meter_error_counted"),
    ]

    operations = [
        _0016.AddFieldIfAbsentOnPostgres(
            model_name="overagereport",
            name="last_attempt_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
