"""What Stripe's meter error reports said of an overage batch (dropped, or maybe dropped)
and its error code. Database defaults: processes of the previous release keep inserting
batches during a deploy. Existing batches had no report handled: "" for both."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("gymbilling", "0034_subscription_price"),
    ]

    operations = [
        migrations.AddField(
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
        migrations.AddField(
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
