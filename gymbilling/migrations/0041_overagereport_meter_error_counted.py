"""An overage batch flagged "maybe dropped" that finance found counted at Stripe.

Choices only: no change to the column (older workers never write the new value).
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("gymbilling", "0040_marketfill_refused_payout"),
    ]

    operations = [
        migrations.AlterField(
            model_name="overagereport",
            name="meter_error",
            field=models.CharField(
                blank=True,
                choices=[
                    ("", "None reported"),
                    ("dropped", "Dropped by Stripe"),
                    ("in_doubt", "Maybe dropped"),
                    ("counted", "Counted at Stripe (checked by finance)"),
                ],
                db_default="",
                max_length=16,
            ),
        ),
    ]
