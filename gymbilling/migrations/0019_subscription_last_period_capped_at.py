"""Canceled subscriptions' last periods are capped at the plan's rollover cap once over.

Subscriptions whose last period was already over when this runs are marked as
capped without trimming anything: their members have seen those credits in
their balance since, under the rules of the release they were canceled under,
and taking them back now, unannounced, would be a retroactive change of terms.
Those canceled from now on, or still in their last period, are capped as it ends.
"""

from django.db import migrations, models
from django.utils import timezone


def mark_ended_as_capped(apps, schema_editor):
    Subscription = apps.get_model("gymbilling", "Subscription")
    now = timezone.now()
    Subscription.objects.using(schema_editor.connection.alias).filter(
        status="canceled", last_period_capped_at__isnull=True, current_period_end__lte=now
    ).update(last_period_capped_at=now)


class Migration(migrations.Migration):
    dependencies = [
        ("gymbilling", "0018_payment_reversal_refund_own_amount"),
    ]

    operations = [
        migrations.AddField(
            model_name="subscription",
            name="last_period_capped_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddIndex(
            model_name="subscription",
            index=models.Index(
                condition=models.Q(("last_period_capped_at__isnull", True), ("status", "canceled")),
                fields=["current_period_end"],
                name="subscription_last_cap_due",
            ),
        ),
        migrations.RunPython(mark_ended_as_capped, migrations.RunPython.noop),
    ]
