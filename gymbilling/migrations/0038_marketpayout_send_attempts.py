"""Payouts count their sends, and one that may have paid a customer deleted since waits for
finance.

`send_attempts`: a send that finds an earlier one may have reached Stripe (its answer
lost) no longer moves the payout to the seller's new customer by itself. Payouts pending
from before keep 0: a send reads their `last_error` as well. `may_have_paid` marks the
failed payout that holds the seller's payouts wherever they would go.

Both have a database default: workers of the previous release still record payouts
during the deploy, without them.
"""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("gymbilling", "0037_overagereport_identifier_no_key_separator"),
    ]

    operations = [
        migrations.AddField(
            model_name="marketpayout",
            name="may_have_paid",
            field=models.BooleanField(db_default=False, default=False),
        ),
        migrations.AddField(
            model_name="marketpayout",
            name="send_attempts",
            field=models.PositiveIntegerField(db_default=0, default=0),
        ),
    ]
