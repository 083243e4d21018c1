"""A seller's balance credit whose Stripe customer was deleted at Stripe: sent to the
organization's new customer when it has one (`deleted_destination` keeps the one it was
for), else `customer_deleted`, waiting for one, rather than failed and held for finance.

`deleted_destination` has a database default: workers of the previous release still
record payouts during the deploy, without it. The status is a CharField whose choices
live in Python only: no change to the table for them.

The column is added as 0035 added its, each ALTER waiting at most a lock_timeout.
"""

import importlib

from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("gymbilling", "0035_overagereport_meter_error"),
    ]

    operations = [
        _0016.AddFieldIfAbsentOnPostgres(
            model_name="marketpayout",
            name="deleted_destination",
            field=models.CharField(blank=True, db_default="", max_length=255),
        ),
        migrations.AlterField(
            model_name="marketpayout",
            name="status",
            field=models.CharField(
                choices=[
                    ("pending", "Recorded, not yet sent to Stripe"),
                    ("sent", "Sent"),
                    ("failed", "Refused by Stripe, proceeds returned to available"),
                    (
                        "customer_deleted",
                        "Not sent: the Stripe customer was deleted; proceeds wait for its "
                        "replacement",
                    ),
                ],
                default="pending",
                max_length=16,
            ),
        ),
    ]
