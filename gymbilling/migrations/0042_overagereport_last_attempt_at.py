"""The last attempt of an overage batch that Stripe may have taken, so that only a meter
error report naming that attempt re-sends the batch (services/overage.py).

Nullable, no default: processes of the previous release, still running during a deploy,
write batches without it, and one they sent is read by its `sent_at` instead.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("gymbilling", "0041_overagereport_meter_error_counted"),
    ]

    operations = [
        migrations.AddField(
            model_name="overagereport",
            name="last_attempt_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
