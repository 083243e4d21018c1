"""The first attempt of an overage batch whose outcome is unknown (no answer, a 5xx, a run
that died), so that a batch is not sent again by itself once Stripe may have forgotten
its identifier (24 hours), which would bill it twice if that attempt counted; it is left
to finance instead (services/overage.py).

Nullable, no default: processes of the previous release, still running during a deploy,
write batches without it; for a batch not sent, its `last_attempt_at` stands in for it
(an attempt Stripe may have taken), read by the next attempt.

The ALTER waits at most a lock_timeout (metering/0016's AddFieldIfAbsentOnPostgres).
"""

import importlib

from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("gymbilling", "0044_overagereport_refusals"),
    ]

    operations = [
        _0016.AddFieldIfAbsentOnPostgres(
            model_name="overagereport",
            name="first_unknown_attempt_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
