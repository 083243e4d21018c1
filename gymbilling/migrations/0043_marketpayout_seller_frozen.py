"""A payout never sent whose seller a refund or dispute froze since it was recorded is
closed `seller_frozen`, its proceeds back to available, rather than left pending until
the freeze is lifted (gymbilling.market.services._payout_frozen).

The status is a CharField whose choices live in Python only: no change to the table.
Payouts held pending by the previous release (their `last_error` starting "held: the
seller's reselling is frozen", no send counted) are closed by the first send that finds
the seller still frozen; nothing to migrate.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("gymbilling", "0042_overagereport_last_attempt_at"),
    ]

    operations = [
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
                    (
                        "seller_frozen",
                        "Not sent: the seller's reselling is frozen; proceeds returned to "
                        "available",
                    ),
                ],
                default="pending",
                max_length=16,
            ),
        ),
    ]
