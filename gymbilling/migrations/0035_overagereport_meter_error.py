"""What Stripe's meter error reports said of an overage batch (dropped, or maybe dropped)
and its error code. Database defaults: processes of the previous release keep inserting
batches during a deploy. Existing batches had no report handled: "" for both.

A constant default adds a column without rewriting the table; each ALTER waits at most
a lock_timeout (metering/0016's AddFieldIfAbsentOnPostgres), not atomic so each holds
its lock only for itself: queued behind a long reader, an ALTER would hold every batch's
write behind it. Re-runnable after a stop partway."""

import importlib

from django.db import migrations, models

_0016 = importlib.import_module("metering.migrations.0016_creditlot_revenue")


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("gymbilling", "0034_subscription_price"),
    ]

    operations = [
        _0016.AddFieldIfAbsentOnPostgres(
            model_name="overagereport",
            name="meter_error",
            field=models.CharField(
                blank=True,
                choices=[
                    ("", "None reported"),
                    ("dropped", "Dropped by Stripe"),
                    ("in_doubt", "Maybe dropped"),
                ],
                db_default="",
                max_length=16,
            ),
        ),
        _0016.AddFieldIfAbsentOnPostgres(
            model_name="overagereport",
            name="stripe_error_code",
            field=models.CharField(
                blank=True,
                db_default="",
                help_text="Stripe's code from the last meter error report about this batch, e.g. meter_event_customer_not_found.",
                max_length=64,
            ),
        ),
    ]
