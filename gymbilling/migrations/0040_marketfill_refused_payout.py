"""A fill remembers the payout Stripe refused that last paid it.

A refused payout clears its fills' `payout` (their proceeds are back to available), so
nothing said which sales it was for. Finance marking one paid at Stripe after all (an
earlier send credited a customer deleted since) must put exactly those back as paid out.

Nullable, no default needed: workers of the previous release still write fills during
the deploy without it (NULL), and payouts they refuse then leave it unset; those cannot
be marked paid (payout_mark_paid says so).
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("gymbilling", "0039_payout_pending_sent_once"),
    ]

    operations = [
        migrations.AddField(
            model_name="marketfill",
            name="refused_payout",
            field=models.ForeignKey(
                blank=True,
                null=True,
                on_delete=django.db.models.deletion.PROTECT,
                related_name="refused_fills",
                to="gymbilling.marketpayout",
            ),
        ),
    ]
